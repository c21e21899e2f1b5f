use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::helpers::{Backend, SETTLE, TestApp};

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub async fn subscribe(app: &TestApp, poll: i64) -> Socket {
    let url = format!("ws://{}/ws/polls/{poll}", app.api.addr);
    tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade")
        .0
}

pub async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let msg = tokio::time::timeout(SETTLE, socket.next())
            .await
            .expect("a message within 10 s")
            .expect("socket open")
            .expect("valid frame");
        if let Message::Text(text) = msg {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

async fn subscriber_gets_a_snapshot_then_the_counts_of_each_flush(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut socket = subscribe(&app, poll).await;

    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["seq"], 0);
    assert_eq!(snapshot["poll"]["id"], poll);
    assert_eq!(snapshot["poll"]["options"][1]["votes"], 0);

    assert_eq!(app.api.vote(poll, 2, "u1").await.0, 202);
    let first = next_json(&mut socket).await;
    assert_eq!(first["type"], "counts");
    assert_eq!(first["pollId"], poll);
    assert_eq!(first["seq"], 1);
    assert_eq!(
        first["counts"],
        serde_json::json!([{ "optionId": 2, "newCount": 1 }])
    );
    assert!(first["flushedAt"].as_i64().unwrap() > 0);

    assert_eq!(app.api.vote(poll, 1, "u2").await.0, 202);
    let second = next_json(&mut socket).await;
    assert_eq!(second["seq"], 2);
    assert_eq!(
        second["counts"],
        serde_json::json!([{ "optionId": 1, "newCount": 1 }])
    );
}

async fn a_flush_forced_by_the_vote_cap_puts_the_next_tick_a_whole_interval_later(
    backend: Backend,
) {
    // Why it matters: a tick moments after the early flush would send subscribers a second
    // update while they are still sending the first, and they would skip one.
    let interval = Duration::from_millis(1000);
    let app = TestApp::spawn_with(backend, |s| {
        s.aggregator.flush_interval_ms = interval.as_millis() as u64;
        s.aggregator.flush_max_votes = 3;
    })
    .await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut socket = subscribe(&app, poll).await;
    assert_eq!(next_json(&mut socket).await["type"], "snapshot");

    // The first vote's update comes at a tick; the cap is reached most of an interval later,
    // so the ticker's next tick, unless restarted, is due soon after the early flush.
    assert_eq!(app.api.vote(poll, 1, "u1").await.0, 202);
    assert_eq!(next_json(&mut socket).await["seq"], 1);
    tokio::time::sleep(interval * 6 / 10).await;
    for user in ["u2", "u3", "u4"] {
        assert_eq!(app.api.vote(poll, 1, user).await.0, 202);
    }
    let early = next_json(&mut socket).await;
    let early_at = Instant::now();
    assert_eq!(
        early["counts"],
        serde_json::json!([{ "optionId": 1, "newCount": 4 }])
    );

    assert_eq!(app.api.vote(poll, 2, "u5").await.0, 202);
    let next = next_json(&mut socket).await;
    let gap = early_at.elapsed();
    assert_eq!(next["seq"], early["seq"].as_i64().unwrap() + 1);
    assert_eq!(
        next["counts"],
        serde_json::json!([{ "optionId": 2, "newCount": 1 }])
    );
    assert!(
        gap >= interval * 8 / 10,
        "the next flush came {gap:?} after the early one, not a whole interval"
    );
}

async fn snapshot_includes_votes_counted_before_subscribing(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    app.api.vote(poll, 1, "early").await;
    app.api.wait_for_total(poll, 1, SETTLE).await;
    let mut socket = subscribe(&app, poll).await;
    let snapshot = next_json(&mut socket).await;
    assert_eq!(snapshot["seq"], 1);
    assert_eq!(snapshot["poll"]["totalVotes"], 1);
}

async fn subscriber_only_receives_its_own_polls_updates(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let watched = app.api.create_poll(&["A", "B"]).await;
    let other = app.api.create_poll(&["A", "B"]).await;
    let mut socket = subscribe(&app, watched).await;
    next_json(&mut socket).await;
    app.api.vote(other, 1, "u1").await;
    app.api.wait_for_total(other, 1, SETTLE).await;
    app.api.vote(watched, 2, "u1").await;
    let update = next_json(&mut socket).await;
    assert_eq!(
        update["pollId"], watched,
        "the other poll's update was not sent"
    );
}

async fn websocket_for_an_unknown_poll_is_404_before_the_upgrade(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let url = format!("ws://{}/ws/polls/12345", app.api.addr);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 404),
        other => panic!("expected a 404, got {other:?}"),
    }
}

async fn shutdown_closes_websockets_with_a_close_frame(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut socket = subscribe(&app, poll).await;
    next_json(&mut socket).await;
    let stopping = tokio::spawn(app.shutdown());
    let close = loop {
        match tokio::time::timeout(SETTLE, socket.next()).await.unwrap() {
            Some(Ok(Message::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(close.unwrap().code, CloseCode::Away);
    stopping.await.unwrap();
}

crate::contract_tests!(
    subscriber_gets_a_snapshot_then_the_counts_of_each_flush,
    a_flush_forced_by_the_vote_cap_puts_the_next_tick_a_whole_interval_later,
    snapshot_includes_votes_counted_before_subscribing,
    subscriber_only_receives_its_own_polls_updates,
    websocket_for_an_unknown_poll_is_404_before_the_upgrade,
    shutdown_closes_websockets_with_a_close_frame,
    silent_subscribers_are_pinged_and_closed_when_they_never_answer,
    an_oversized_client_message_closes_the_socket,
);

async fn an_oversized_client_message_closes_the_socket(backend: Backend) {
    use futures_util::SinkExt;
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut socket = subscribe(&app, poll).await;
    next_json(&mut socket).await;
    let _ = socket.send(Message::text("x".repeat(64 * 1024))).await;
    let closed = loop {
        match tokio::time::timeout(std::time::Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) => break true,
            Ok(Some(Ok(_))) => continue,
            Err(_) => break false,
        }
    };
    assert!(closed, "the server closed the socket");
    assert_eq!(app.api.get("/healthz").await.0, 200);
}

/// One WebSocket upgrade, then pings as fast as the socket takes them, never reading: each
/// ping queues a pong on the server. Once took gigabytes and a core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_floods_pings_and_never_reads_is_closed() {
    use futures_util::SinkExt;
    let app = TestApp::spawn(Backend::Embedded).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let socket = subscribe(&app, poll).await;
    let (mut tx, _never_read) = socket.split();
    let payload = tokio_tungstenite::tungstenite::Bytes::from(vec![b'p'; 125]);
    let started = Instant::now();
    let mut sent = 0u64;
    let refused = loop {
        if started.elapsed() > Duration::from_secs(20) || sent >= 2_000_000 {
            break false;
        }
        match tokio::time::timeout(
            Duration::from_secs(5),
            tx.send(Message::Ping(payload.clone())),
        )
        .await
        {
            Ok(Ok(())) => sent += 1,
            // Refused (reset), or the server stopped reading: it has let go of us.
            Ok(Err(_)) | Err(_) => break true,
        }
    };
    assert!(
        refused,
        "still taking pings after {sent} in {:?}",
        started.elapsed()
    );
    assert_eq!(app.api.get("/healthz").await.0, 200);
}

/// Clients send pongs and now and then a ping; one that sends messages by the dozen is
/// closed with 1008, while it still reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_sends_more_than_its_allowance_is_closed_with_a_policy_code() {
    use futures_util::SinkExt;
    let app = TestApp::spawn(Backend::Embedded).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut socket = subscribe(&app, poll).await;
    next_json(&mut socket).await;
    for i in 0..40 {
        if socket
            .send(Message::text(format!("hello {i}")))
            .await
            .is_err()
        {
            break;
        }
    }
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Policy));
    // A client within its allowance (a burst of 20, then 2 a second) stays, and its pings
    // are answered.
    let mut calm = subscribe(&app, poll).await;
    next_json(&mut calm).await;
    for _ in 0..10 {
        calm.send(Message::Ping(Default::default())).await.unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(5), calm.next()).await {
                Ok(Some(Ok(Message::Pong(_)))) => break,
                // The server's own pings, or counts.
                Ok(Some(Ok(Message::Ping(_) | Message::Text(_)))) => continue,
                other => panic!("a calm client's ping is answered, got {other:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn silent_subscribers_are_pinged_and_closed_when_they_never_answer(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.http.ws_ping_interval_secs = 1;
        s.http.ws_idle_timeout_secs = 2;
    })
    .await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut lively = subscribe(&app, poll).await;
    let mut silent = subscribe(&app, poll).await;
    // The lively client reads (and so answers pings) throughout.
    let reading = tokio::spawn(async move {
        let until = tokio::time::Instant::now() + std::time::Duration::from_millis(4500);
        while let Ok(Some(Ok(msg))) = tokio::time::timeout_at(until, lively.next()).await {
            assert!(
                !msg.is_close(),
                "a client that answers pings stays connected"
            );
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(4000)).await;
    let mut closed = false;
    while let Ok(Some(frame)) =
        tokio::time::timeout(std::time::Duration::from_secs(2), silent.next()).await
    {
        if matches!(frame, Ok(Message::Close(_)) | Err(_)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "the silent client was closed");
    reading.await.unwrap();
}

/// A client may send its first frame in the same packet as its upgrade request: the server
/// has then read it with the request, and must still answer it once the session starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_sent_with_the_upgrade_request_is_answered_after_the_snapshot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = TestApp::spawn(Backend::Embedded).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut tcp = tokio::net::TcpStream::connect(app.api.addr).await.unwrap();
    let mut request = format!(
        "GET /ws/polls/{poll} HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    .into_bytes();
    // A masked ping (a client's frames are masked) whose payload is "abcd".
    let mask = [1u8, 2, 3, 4];
    request.extend_from_slice(&[0x89, 0x80 | 4]);
    request.extend_from_slice(&mask);
    request.extend(b"abcd".iter().zip(mask).map(|(b, m)| b ^ m));
    tcp.write_all(&request).await.unwrap();

    let pong = [0x8a, 4, b'a', b'b', b'c', b'd'];
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before the pong: {:?}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
            if let Some(at) = seen.windows(pong.len()).position(|w| w == pong) {
                return at;
            }
        }
    })
    .await
    .expect("a pong within 10 s");
    let before = String::from_utf8_lossy(&seen[..found]);
    assert!(before.starts_with("HTTP/1.1 101"), "{before}");
    assert!(before.contains("\"type\":\"snapshot\""), "{before}");
}
