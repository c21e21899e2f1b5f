//! Running a poll for a room: the presenter screen on the projector, and the audience
//! joining by its QR code and voting from phones.

use std::time::Duration;

use serde_json::json;

use super::driver::{Browser, DESKTOP, PHONE};
use crate::helpers::{Backend, TestApp};

async fn spawn_app() -> TestApp {
    TestApp::spawn_with(Backend::Embedded, |s| s.aggregator.flush_interval_ms = 200).await
}

/// The text the QR code in a PNG screenshot encodes.
fn decode_qr(png_bytes: &[u8]) -> String {
    let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut pixels).expect("a frame");
    let channels = info.color_type.samples();
    let (width, height) = (info.width as usize, info.height as usize);
    let grey = |x: usize, y: usize| {
        let at = (y * width + x) * channels;
        let rgb = &pixels[at..at + 3.min(channels)];
        (rgb.iter().map(|&c| c as u32).sum::<u32>() / rgb.len() as u32) as u8
    };
    let mut image = rqrr::PreparedImage::prepare_from_greyscale(width, height, grey);
    let grids = image.detect_grids();
    assert!(!grids.is_empty(), "no QR code in the screenshot");
    grids[0].decode().expect("a readable QR code").1
}

/// The presenter's bar of an option: its count, once it shows `votes`.
fn present_votes(option: i64, votes: u64) -> String {
    format!(
        r#"const row = document.querySelector('[data-testid="present-bar-{option}"]');
           return row && row.dataset.votes === '{votes}'
             ? row.querySelector('.nums').textContent : null;"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_presenter_screen_moves_with_votes_and_its_qr_code_opens_the_voting_view() {
    let app = spawn_app().await;
    let poll = app.api.create_poll(&["Pizza", "Sushi", "Tacos"]).await;
    let browser = Browser::start("presenter").await;
    browser.resize(DESKTOP).await;
    let present = app.api.url(&format!("/#/polls/{poll}/present"));
    browser.client.goto(&present).await.expect("page loads");
    let join = format!("http://{}/j/{poll}", app.api.addr);
    browser
        .eventually(
            "the join link under the QR code",
            &format!(
                r#"const url = document.querySelector('[data-testid="present-url"]').textContent;
                   const code = document.querySelector('[data-testid="present-qr-code"]');
                   return code && url === '{}' ? url : null;"#,
                join.trim_start_matches("http://")
            ),
        )
        .await;
    // No admin tools and no navigation on the projector.
    let chrome = browser
        .js(r#"return ['admin', 'nav-new', 'admin-actions'].map((id) =>
                 document.querySelector(`[data-testid="${id}"]`).offsetParent !== null);"#)
        .await;
    assert_eq!(chrome, json!([false, false, false]));
    assert_eq!(
        browser
            .js(r#"return document.querySelector('[data-testid="present-state"]').textContent"#)
            .await,
        "Live"
    );

    for (i, option) in [1, 1, 3].into_iter().enumerate() {
        assert_eq!(
            app.api.vote(poll, option, &format!("room-{i}")).await.0,
            202
        );
    }
    browser
        .eventually("two votes for Pizza", &present_votes(1, 2))
        .await;
    let tacos = browser
        .eventually("one vote for Tacos", &present_votes(3, 1))
        .await;
    assert_eq!(tacos, "1 · 33%");
    assert_eq!(
        browser
            .js(r#"return document.querySelector('[data-testid="present-total"]').textContent"#)
            .await,
        "3 votes"
    );
    // Once the width transition has run, the screenshot shows the settled bars.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let shot = browser.screenshot("presenter.png").await;
    let decoded = decode_qr(&std::fs::read(shot).unwrap());
    assert_eq!(decoded, join, "the QR code on the screen");

    // What a phone that scans it opens: the audience's voting view of this poll.
    browser
        .client
        .goto(&decoded)
        .await
        .expect("join link loads");
    browser
        .eventually(
            "the voting view",
            &format!(
                r#"return location.hash === '#/vote/{poll}' && document.body.dataset.mode === 'audience'
                     && document.querySelector('[data-testid="view-poll"]').dataset.pollId === '{poll}'"#
            ),
        )
        .await;

    app.api.close_poll(poll).await;
    browser.client.goto(&present).await.expect("page loads");
    browser
        .eventually(
            "the closed state",
            r#"const s = document.querySelector('[data-testid="present-state"]');
               return s.textContent === 'Closed' ? s.dataset.state : null;"#,
        )
        .await;
    assert!(browser.console_errors().await.is_empty());
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_in_the_audience_votes_and_then_sees_the_results_and_its_choice() {
    let app = spawn_app().await;
    let poll = app.api.create_poll(&["Morning", "Afternoon"]).await;
    let hidden = app
        .api
        .create_poll_with(json!({
            "question": "Secret?", "options": ["Yes", "No"], "hideResults": true
        }))
        .await["id"]
        .as_i64()
        .unwrap();
    let browser = Browser::start("audience").await;
    browser.resize(PHONE).await;
    browser
        .client
        .goto(&app.api.url(&format!("/j/{poll}")))
        .await
        .expect("join link loads");
    browser
        .eventually(
            "the choices",
            r#"return document.querySelector('[data-testid="choice-2"]') !== null"#,
        )
        .await;
    let before = browser
        .js(
            r#"return ['admin', 'nav-new', 'admin-actions', 'results'].map((id) =>
                 document.querySelector(`[data-testid="${id}"]`).offsetParent !== null);"#,
        )
        .await;
    assert_eq!(
        before,
        json!([false, false, false, false]),
        "no admin tools, and the results wait for the vote"
    );
    browser.click("choice-2").await;
    browser.click("vote-submit").await;
    browser
        .eventually(
            "the own choice and the results",
            r#"const own = document.querySelector('[data-testid="own-choice"]');
               const results = document.querySelector('[data-testid="results"]');
               return !own.hidden && results.offsetParent !== null ? own.textContent : null;"#,
        )
        .await;
    assert_eq!(
        browser
            .js(r#"return document.querySelector('[data-testid="own-choice"]').textContent"#)
            .await,
        "Your choice: Afternoon"
    );
    browser
        .eventually(
            "the vote in the live results",
            r#"return document.querySelector('[data-testid="bar-count-2"]').textContent === '1'"#,
        )
        .await;
    // The phone's width holds the page: nothing scrolls sideways.
    let overflow = browser
        .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        .await;
    assert_eq!(overflow, 0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    browser.screenshot("audience-phone.png").await;

    // A poll that hides its results says when they come instead.
    browser
        .client
        .goto(&app.api.url(&format!("/j/{hidden}")))
        .await
        .expect("join link loads");
    browser
        .eventually(
            "the hidden poll's choices",
            r#"return document.querySelector('[data-testid="view-poll"]').dataset.pollId"#,
        )
        .await;
    browser
        .eventually(
            "its choices",
            r#"return document.querySelector('[data-testid="choice-1"]') !== null"#,
        )
        .await;
    browser.click("choice-1").await;
    browser.click("vote-submit").await;
    browser
        .eventually(
            "results at the close",
            r#"const box = document.querySelector('[data-testid="results-hidden"]');
               return box.offsetParent !== null ? box.textContent : null;"#,
        )
        .await;
    browser.screenshot("audience-phone-hidden.png").await;
    assert!(browser.console_errors().await.is_empty());
    browser.close().await;
}
