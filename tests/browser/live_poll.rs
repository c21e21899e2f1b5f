//! Creating, voting on and closing a poll through the page, against a real in-process
//! pollcast. Only what every server version offers is relied on: a poll of a question and
//! options, single-choice votes, live counts, closing.

use fantoccini::Locator;
use serde_json::{Value, json};

use super::driver::{Browser, PHONE};
use crate::helpers::{ADMIN_TOKEN, Backend, SETTLE, TestApp};

/// Long enough that a flush is visibly asynchronous, short enough to keep the test quick.
const FLUSH_MS: u64 = 200;

async fn spawn_app() -> TestApp {
    TestApp::spawn_with(Backend::Embedded, |s| {
        s.aggregator.flush_interval_ms = FLUSH_MS;
    })
    .await
}

/// Enters the admin token in its field, opening the panel if it is folded.
async fn set_admin_token(browser: &Browser, token: &str) {
    if browser
        .js("return document.getElementById('admin').open")
        .await
        != json!(true)
    {
        browser.click("admin-summary").await;
    }
    let field = browser.by_test_id("admin-token").await;
    browser.type_into(&field, token).await;
}

/// Fills and submits the create form; returns the id of the poll the page then shows.
async fn create_poll_on_page(browser: &Browser, question: &str, options: &[&str]) -> i64 {
    browser.click("nav-new").await;
    let field = browser.by_test_id("question").await;
    browser.type_into(&field, question).await;
    let inputs = browser
        .client
        .find_all(Locator::Css("[data-testid=\"option-input\"]"))
        .await
        .expect("option inputs");
    assert_eq!(inputs.len(), 2, "the form starts with two option rows");
    for _ in inputs.len()..options.len() {
        browser.click("add-option").await;
    }
    let inputs = browser
        .client
        .find_all(Locator::Css("[data-testid=\"option-input\"]"))
        .await
        .expect("option inputs");
    for (input, text) in inputs.iter().zip(options) {
        browser.type_into(input, text).await;
    }
    browser.click("create-submit").await;
    browser
        .eventually(
            "the new poll's page",
            r#"const m = /^#\/polls\/(\d+)$/.exec(location.hash);
               const view = document.querySelector('[data-testid="view-poll"]');
               return m && !view.hidden && view.dataset.pollId === m[1] ? Number(m[1]) : null;"#,
        )
        .await
        .as_i64()
        .expect("a poll id")
}

/// JavaScript for the element with this `data-testid`.
fn q(test_id: &str) -> String {
    format!(r#"document.querySelector('[data-testid="{test_id}"]')"#)
}

/// What the page shows for one option's bar.
fn bar_script(option: i64) -> String {
    format!(
        r#"const meter = document.querySelector('[data-testid="bar-{option}"]');
           if (!meter || meter.closest('[hidden]')) return null;
           const text = (id) => document.querySelector(`[data-testid="${{id}}"]`).textContent;
           return {{
             count: text('bar-count-{option}'),
             percent: text('bar-percent-{option}'),
             role: meter.getAttribute('role'),
             valuenow: meter.getAttribute('aria-valuenow'),
             valuemax: meter.getAttribute('aria-valuemax'),
             label: meter.getAttribute('aria-label'),
             fill: meter.firstElementChild.getBoundingClientRect().width,
             track: meter.getBoundingClientRect().width,
           }};"#
    )
}

/// Waits until option `option`'s bar shows `count` votes and its fill, once the width
/// transition has run, covers `share` of the track.
async fn wait_for_bar(browser: &Browser, option: i64, count: u64, share: f64) -> Value {
    let check = format!(
        r#"const bar = (() => {{ {script} }})();
           return bar && bar.count === '{count}' && bar.valuenow === '{count}'
             && Math.abs(bar.fill - bar.track * {share}) < 1.5 ? bar : null;"#,
        script = bar_script(option)
    );
    browser
        .eventually(
            &format!(
                "bar {option} to show {count} votes at {}% width",
                share * 100.0
            ),
            &check,
        )
        .await
}

async fn text_of(browser: &Browser, test_id: &str) -> String {
    browser
        .by_test_id(test_id)
        .await
        .text()
        .await
        .expect("element text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_poll_created_on_the_page_shows_live_bars_that_move_with_votes() {
    let app = spawn_app().await;
    let browser = Browser::start("live-poll").await;
    browser
        .client
        .goto(&app.api.url("/"))
        .await
        .expect("page loads");

    set_admin_token(&browser, ADMIN_TOKEN).await;
    let poll = create_poll_on_page(&browser, "Tabs or spaces?", &["Tabs", "Spaces"]).await;
    let created = app.api.poll(poll).await;
    assert_eq!(created["question"], "Tabs or spaces?");
    assert_eq!(created["options"][0]["text"], "Tabs");
    assert_eq!(created["options"][1]["text"], "Spaces");
    assert_eq!(text_of(&browser, "poll-question").await, "Tabs or spaces?");

    browser
        .eventually(
            "the live connection",
            &format!("return {}.dataset.state === 'live'", q("live-state")),
        )
        .await;
    let before = browser.js(&bar_script(1)).await;
    assert_eq!(before["role"], "meter", "{before}");
    assert_eq!(before["count"], "0", "{before}");
    assert_eq!(before["valuenow"], "0", "{before}");
    assert_eq!(
        before["fill"], 0.0,
        "an empty poll's bars are empty: {before}"
    );
    assert_eq!(before["label"], "Tabs: 0 votes, 0%", "{before}");
    // The page's own stylesheet is in force (the policy allows no inline style): the Vote
    // button is a full-size tap target.
    let button_height = browser
        .js(&format!(
            "return {}.getBoundingClientRect().height",
            q("vote-submit")
        ))
        .await;
    assert!(
        button_height.as_f64().unwrap() >= 44.0,
        "Vote button is {button_height}px high"
    );

    // Vote on the page. The count moves only after a flush, over the WebSocket.
    browser.click("choice-1").await;
    browser.click("vote-submit").await;
    browser
        .eventually(
            "the vote to be accepted",
            &format!(
                "return {}.textContent.includes('Vote counted soon')",
                q("vote-status")
            ),
        )
        .await;
    let after = wait_for_bar(&browser, 1, 1, 1.0).await;
    assert_eq!(after["percent"], "100%", "{after}");
    assert_eq!(after["label"], "Tabs: 1 vote, 100%", "{after}");
    let voter = text_of(&browser, "voter-id").await;
    assert!(!voter.is_empty(), "the page shows its voter id");
    assert_eq!(
        app.env.ledger(poll).await,
        vec![voter.clone()],
        "the vote was cast under the page's voter id"
    );
    assert_eq!(
        browser
            .js(&format!("return {}.disabled", q("vote-submit")))
            .await,
        json!(true),
        "a poll without vote changes takes one vote per voter"
    );

    // Someone else votes through the API: the open page follows without a reload.
    browser
        .js("window.pollcastTestSameDocument = true; return true")
        .await;
    let (status, body) = app.api.vote(poll, 2, "someone-else").await;
    assert_eq!(status, 202, "{body}");
    let second = wait_for_bar(&browser, 2, 1, 0.5).await;
    assert_eq!(second["percent"], "50%", "{second}");
    let first = wait_for_bar(&browser, 1, 1, 0.5).await;
    assert_eq!(first["valuemax"], "2", "{first}");
    assert_eq!(first["label"], "Tabs: 1 vote, 50%", "{first}");
    assert_eq!(text_of(&browser, "total-votes").await, "2 votes");
    assert_eq!(
        browser
            .js("return window.pollcastTestSameDocument === true")
            .await,
        json!(true),
        "the page was reloaded instead of updated live"
    );
    app.api.wait_for_total(poll, 2, SETTLE).await;

    browser.js("window.scrollTo(0, 0); return true").await;
    browser.screenshot("live-poll.png").await;

    browser.resize(PHONE).await;
    let layout = browser
        .eventually(
            "the phone layout",
            &format!(
                r#"if (window.innerWidth > {width}) return null;
                   const doc = document.documentElement;
                   const vote = document.querySelector('[data-testid="vote-submit"]');
                   const choice = {choice}.closest('.choice');
                   return {{
                     overflow: doc.scrollWidth - doc.clientWidth,
                     vote: vote.getBoundingClientRect().height,
                     choice: choice.getBoundingClientRect().height,
                   }};"#,
                width = PHONE.0,
                choice = q("choice-1"),
            ),
        )
        .await;
    assert_eq!(
        layout["overflow"], 0,
        "the page scrolls sideways on a phone: {layout}"
    );
    assert!(layout["vote"].as_f64().unwrap() >= 44.0, "{layout}");
    assert!(layout["choice"].as_f64().unwrap() >= 44.0, "{layout}");
    browser.js("window.scrollTo(0, 0); return true").await;
    browser.screenshot("live-poll-phone.png").await;

    assert_eq!(browser.console_errors().await, Vec::<Value>::new());
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_admin_token_is_explained_and_creates_nothing() {
    let app = spawn_app().await;
    let browser = Browser::start("refused-token").await;
    browser
        .client
        .goto(&app.api.url("/"))
        .await
        .expect("page loads");

    set_admin_token(&browser, "not-the-token").await;
    browser.click("nav-new").await;
    let question = browser.by_test_id("question").await;
    browser.type_into(&question, "Tea or coffee?").await;
    let inputs = browser
        .client
        .find_all(Locator::Css("[data-testid=\"option-input\"]"))
        .await
        .expect("option inputs");
    browser.type_into(&inputs[0], "Tea").await;
    browser.type_into(&inputs[1], "Coffee").await;
    browser.click("create-submit").await;

    let message = browser
        .eventually(
            "the refusal to be explained",
            r#"const box = document.querySelector('[data-testid="create-error"]');
               return box.hidden ? null : box.textContent;"#,
        )
        .await;
    let message = message.as_str().unwrap();
    assert!(message.contains("admin token was refused"), "{message}");
    assert!(
        message.contains("log"),
        "says where the token is: {message}"
    );
    assert_eq!(browser.js("return location.hash").await, "#/new");
    let (status, polls) = app.api.get("/polls").await;
    assert_eq!(status, 200);
    assert_eq!(polls, json!([]), "nothing was created");

    // The refused request itself is logged by the browser; nothing else may be.
    let unexpected: Vec<Value> = browser
        .console_errors()
        .await
        .into_iter()
        .filter(|e| !(e["source"] == "network" && e["message"].as_str().unwrap().contains("401")))
        .collect();
    assert_eq!(unexpected, Vec::<Value>::new());
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_poll_on_the_page_shows_the_final_result_and_stops_voting() {
    let app = spawn_app().await;
    let poll = app.api.create_poll(&["Red", "Blue"]).await;
    assert_eq!(app.api.vote(poll, 2, "early").await.0, 202);
    app.api.wait_for_total(poll, 1, SETTLE).await;

    let browser = Browser::start("close-poll").await;
    browser
        .client
        .goto(&app.api.url(&format!("/#/polls/{poll}")))
        .await
        .expect("page loads");
    set_admin_token(&browser, ADMIN_TOKEN).await;
    wait_for_bar(&browser, 2, 1, 1.0).await;
    assert_eq!(text_of(&browser, "results-title").await, "Live results");

    browser.click("close-poll").await;
    browser
        .client
        .accept_alert()
        .await
        .expect("closing asks for confirmation");
    browser
        .eventually(
            "the final result",
            &format!(
                "return {}.textContent === 'Final result'",
                q("results-title")
            ),
        )
        .await;
    let state = browser
        .js(r#"return {
                 vote: document.querySelector('[data-testid="vote-submit"]').disabled,
                 choices: [...document.querySelectorAll('input[data-testid^="choice-"]')]
                   .every((c) => c.disabled),
                 badge: !document.querySelector('[data-testid="poll-badge"]').hidden,
                 close: document.querySelector('[data-testid="close-poll"]').disabled,
                 live: document.querySelector('[data-testid="live-state"]').textContent,
               };"#)
        .await;
    assert_eq!(
        state,
        json!({ "vote": true, "choices": true, "badge": true, "close": true, "live": "final" }),
        "voting stops on a closed poll"
    );
    assert_eq!(app.api.poll(poll).await["closed"], true);
    assert_eq!(
        wait_for_bar(&browser, 2, 1, 1.0).await["label"],
        "Blue: 1 vote, 100%",
        "the final result keeps the counts"
    );

    assert_eq!(browser.console_errors().await, Vec::<Value>::new());
    browser.close().await;
}
