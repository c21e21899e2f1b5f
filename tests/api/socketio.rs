//! The seed app's live clients: the real `socket.io-client` (npm, pinned in
//! `tests/socketio/package-lock.json`, installed by `scripts/test`) run by node against
//! `/socket.io/`, over each transport.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::helpers::{Backend, TEST_FLUSH_MS, TestApp};

/// Longest a test waits for one thing the client prints.
const WAIT: Duration = Duration::from_secs(15);
/// Long enough for several flushes: what has not arrived by then is not coming.
const QUIET: Duration = Duration::from_millis(8 * TEST_FLUSH_MS + 500);

/// `node tests/socketio/client.js <url> <options>`, killed when dropped.
pub struct NodeClient {
    child: Child,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl NodeClient {
    fn start(app: &TestApp, options: Value) -> Self {
        Self::start_at(app.api.addr, options)
    }

    /// The client against the pollcast at `addr`.
    pub fn start_at(addr: std::net::SocketAddr, options: Value) -> Self {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/socketio");
        assert!(
            dir.join("node_modules/socket.io-client").exists(),
            "socket.io-client is not installed: run scripts/test (or `npm ci` in {})",
            dir.display()
        );
        let mut child = Command::new("node")
            .arg(dir.join("client.js"))
            .arg(format!("http://{addr}"))
            .arg(options.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("node runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        // Why a thread: reading a pipe is blocking, and tokio's process support is not
        // among the features this crate builds tokio with.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({ "event": "unparsed", "data": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The next line the client prints.
    async fn next(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.lines.recv())
            .await
            .expect("the client printed something in time")
            .expect("the client is running")
    }

    /// The data of the next `event`, skipping other events; a connection error fails.
    pub async fn next_event(&mut self, event: &str) -> Value {
        loop {
            let line = self.next().await;
            match line["event"].as_str() {
                Some(e) if e == event => return line["data"].clone(),
                Some("connect_error" | "timeout") => panic!("waiting for {event}: {line}"),
                _ => {}
            }
        }
    }

    /// Every `event` printed within `within`.
    async fn collect(&mut self, event: &str, within: Duration) -> Vec<Value> {
        let until = tokio::time::Instant::now() + within;
        let mut seen = Vec::new();
        while let Ok(Some(line)) = tokio::time::timeout_at(until, self.lines.recv()).await {
            if line["event"] == event {
                seen.push(line["data"].clone());
            }
        }
        seen
    }
}

impl Drop for NodeClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stats(poll: i64, option: i64, count: i64) -> Value {
    json!({ "pollId": poll.to_string(), "optionId": option.to_string(), "newCount": count })
}

/// The seed's client (`io(url)`, `on('poll-stats')`) sees the counts move on `transport`,
/// `poll-stats` by `poll-stats` in the seed's format.
async fn seed_client_gets_poll_stats(backend: Backend, options: Value, transports: &[&str]) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let mut client = NodeClient::start(&app, options);
    if let Some(upgraded) = transports.get(1) {
        // Why not the connection first: the upgrade may be done before it is reported.
        assert_eq!(client.next_event("upgrade").await["transport"], *upgraded);
    } else {
        let connected = client.next_event("connect").await;
        assert_eq!(connected["transport"], transports[0], "{connected}");
    }

    assert_eq!(app.api.vote(poll, 2, "u1").await.0, 202);
    assert_eq!(client.next_event("poll-stats").await, stats(poll, 2, 1));
    assert_eq!(app.api.vote(poll, 1, "u2").await.0, 202);
    assert_eq!(app.api.vote(poll, 2, "u3").await.0, 202);
    // One flush or two: either way the newest count of each option arrives.
    let mut newest = std::collections::HashMap::new();
    while newest.get("1") != Some(&json!(1)) || newest.get("2") != Some(&json!(2)) {
        let got = client.next_event("poll-stats").await;
        assert_eq!(got["pollId"], poll.to_string(), "{got}");
        assert!(got.get("seq").is_none(), "the seed's format: {got}");
        newest.insert(
            got["optionId"].as_str().unwrap().to_owned(),
            got["newCount"].clone(),
        );
    }
    if transports.len() == 1 {
        assert!(
            client.collect("upgrade", Duration::ZERO).await.is_empty(),
            "stays on {}",
            transports[0]
        );
    }
}

async fn seed_client_polling_then_websocket(backend: Backend) {
    seed_client_gets_poll_stats(backend, json!({}), &["polling", "websocket"]).await;
}

async fn seed_client_websocket_only(backend: Backend) {
    let options = json!({ "io": { "transports": ["websocket"] } });
    seed_client_gets_poll_stats(backend, options, &["websocket"]).await;
}

async fn seed_client_polling_only(backend: Backend) {
    let options = json!({ "io": { "transports": ["polling"] } });
    seed_client_gets_poll_stats(backend, options, &["polling"]).await;
}

/// Each client hears every poll; the counts a client missed while not yet connected are not
/// replayed (the seed's behaviour), but everything after is.
async fn seed_client_hears_every_poll(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (first, second) = (
        app.api.create_poll(&["A", "B"]).await,
        app.api.create_poll(&["A", "B"]).await,
    );
    let mut client = NodeClient::start(&app, json!({}));
    client.next_event("connect").await;
    assert_eq!(app.api.vote(first, 1, "u1").await.0, 202);
    assert_eq!(app.api.vote(second, 2, "u1").await.0, 202);
    let mut got = vec![
        client.next_event("poll-stats").await,
        client.next_event("poll-stats").await,
    ];
    got.sort_by_key(|s| s["pollId"].as_str().unwrap().parse::<i64>().unwrap());
    assert_eq!(got, vec![stats(first, 1, 1), stats(second, 2, 1)]);
}

/// `subscribe` narrows a client to one poll: a snapshot with its `seq` (also the answer),
/// then only that poll's `poll-stats`, each with `seq`.
async fn subscribed_client_gets_only_its_poll_with_a_snapshot_and_seq(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (watched, other) = (
        app.api.create_poll(&["A", "B"]).await,
        app.api.create_poll(&["A", "B"]).await,
    );
    assert_eq!(app.api.vote(watched, 1, "early").await.0, 202);
    app.api.wait_for_total(watched, 1, WAIT).await;

    let options = json!({ "subscribe": { "pollId": watched.to_string() } });
    let mut client = NodeClient::start(&app, options);
    let snapshot = client.next_event("snapshot").await;
    assert_eq!(snapshot["pollId"], watched.to_string());
    assert_eq!(snapshot["seq"], 1);
    assert_eq!(snapshot["poll"]["options"][0]["votes"], 1);
    let ack = client.next_event("ack").await;
    assert_eq!(ack, snapshot, "the answer to subscribe is the snapshot");

    assert_eq!(app.api.vote(other, 1, "u1").await.0, 202);
    assert_eq!(app.api.vote(watched, 2, "u1").await.0, 202);
    let got = client.next_event("poll-stats").await;
    assert_eq!(
        got,
        json!({ "pollId": watched.to_string(), "optionId": "2", "newCount": 1, "seq": 2 })
    );
    let later = client.collect("poll-stats", QUIET).await;
    assert!(later.is_empty(), "nothing of the other poll: {later:?}");

    // An unknown poll is refused in the answer.
    let mut lost = NodeClient::start(&app, json!({ "subscribe": { "pollId": 999 } }));
    assert_eq!(lost.next_event("ack").await["error"], "poll_not_found");
}

/// The handshake's query narrows too; with `socketio.broadcast_all = false` a client that
/// does not narrow gets nothing.
async fn the_handshake_query_narrows_and_broadcast_all_can_be_off(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.socketio.broadcast_all = false).await;
    let (watched, other) = (
        app.api.create_poll(&["A", "B"]).await,
        app.api.create_poll(&["A", "B"]).await,
    );
    let query = json!({ "io": { "query": { "pollId": watched.to_string() } } });
    let mut narrowed = NodeClient::start(&app, query);
    let mut plain = NodeClient::start(&app, json!({}));
    assert_eq!(narrowed.next_event("snapshot").await["seq"], 0);
    plain.next_event("connect").await;

    assert_eq!(app.api.vote(other, 2, "u1").await.0, 202);
    assert_eq!(app.api.vote(watched, 1, "u1").await.0, 202);
    assert_eq!(
        narrowed.next_event("poll-stats").await,
        json!({ "pollId": watched.to_string(), "optionId": "1", "newCount": 1, "seq": 1 })
    );
    let more = narrowed.collect("poll-stats", QUIET).await;
    assert!(more.is_empty(), "only the chosen poll: {more:?}");
    let heard = plain.collect("poll-stats", Duration::ZERO).await;
    assert!(heard.is_empty(), "broadcast_all is off: {heard:?}");

    // A client that subscribes after connecting is fed as well.
    let options = json!({ "subscribe": [other] });
    let mut late = NodeClient::start(&app, options);
    assert_eq!(late.next_event("ack").await["seq"], 1);
    assert_eq!(app.api.vote(other, 1, "u2").await.0, 202);
    assert_eq!(
        late.next_event("poll-stats").await,
        json!({ "pollId": other.to_string(), "optionId": "1", "newCount": 1, "seq": 2 })
    );
}

/// A poll hiding its results sends nothing until it closes; then every option's final count.
async fn a_hidden_poll_sends_nothing_until_its_close(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app
        .api
        .create_poll_with(
            json!({ "question": "Secret?", "options": ["A", "B"], "hideResults": true }),
        )
        .await["id"]
        .as_i64()
        .unwrap();
    let mut client = NodeClient::start(&app, json!({}));
    client.next_event("connect").await;
    assert_eq!(app.api.vote(poll, 2, "u1").await.0, 202);
    let early = client.collect("poll-stats", QUIET).await;
    assert!(early.is_empty(), "hidden until the close: {early:?}");

    app.api.close_poll(poll).await;
    let mut finals = vec![
        client.next_event("poll-stats").await,
        client.next_event("poll-stats").await,
    ];
    finals.sort_by_key(|s| s["optionId"].as_str().unwrap().to_owned());
    assert_eq!(finals, vec![stats(poll, 1, 0), stats(poll, 2, 1)]);
}

/// Cross-origin pages: same-origin and `http.cors_origins` pass (the latter with CORS
/// headers), other sites get 403 before a session is made.
async fn socketio_follows_the_cors_origins(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.http.cors_origins = vec!["https://polls.example.com".into()];
    })
    .await;
    let handshake = |origin: String| {
        app.api
            .http
            .get(app.api.url("/socket.io/?EIO=4&transport=polling"))
            .header("origin", origin)
            .send()
    };
    let allowed = handshake("https://polls.example.com".into()).await.unwrap();
    assert_eq!(allowed.status().as_u16(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://polls.example.com"
    );
    assert!(allowed.text().await.unwrap().contains("\"sid\""));
    let own = handshake(format!("http://{}", app.api.addr)).await.unwrap();
    assert_eq!(own.status().as_u16(), 200);
    let foreign = handshake("https://evil.example.net".into()).await.unwrap();
    assert_eq!(foreign.status().as_u16(), 403);
}

/// A Socket.IO session holds its place under `max_connections_per_ip` as a plain WebSocket
/// does, and gives it back when it ends.
async fn socketio_sessions_count_under_the_per_ip_cap(backend: Backend) {
    let mut app = TestApp::spawn_with(backend, |s| s.http.max_connections_per_ip = Some(1)).await;
    // Why a client without a pool: an idle pooled connection would hold the one place.
    app.api.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(WAIT)
        .build()
        .unwrap();
    let healthy = |app: &TestApp| {
        let request = app.api.http.get(app.api.url("/healthz")).send();
        async move { request.await.is_ok_and(|r| r.status().is_success()) }
    };
    let place_is_free = async |app: &TestApp| {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !healthy(app).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the place is not free"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    place_is_free(&app).await;
    let mut client = NodeClient::start(&app, json!({ "io": { "transports": ["websocket"] } }));
    client.next_event("connect").await;
    assert!(
        !healthy(&app).await,
        "the session holds the address's one place"
    );
    drop(client);
    place_is_free(&app).await;
}

/// A graceful stop answers Socket.IO's pending long-polls at once (rather than waiting for
/// their ping interval) and tells the clients.
async fn a_stop_does_not_wait_for_long_polls(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut client = NodeClient::start(&app, json!({ "io": { "transports": ["polling"] } }));
    client.next_event("connect").await;
    let started = std::time::Instant::now();
    app.shutdown().await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "stopped in {:?}",
        started.elapsed()
    );
    client.next_event("disconnect").await;
}

/// Socket.IO's HTTP requests count against `rate_limit.per_ip_*` like the API's.
async fn socketio_requests_are_rate_limited_per_ip(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit.per_ip_per_sec = 1;
        s.rate_limit.per_ip_burst = 2;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let resp = app
            .api
            .http
            .get(app.api.url("/socket.io/?EIO=4&transport=polling"))
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status().as_u16() == 429 {
            assert!(resp.headers().contains_key("retry-after"));
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
}

/// `socketio.enabled = false`: no Socket.IO at all.
async fn socketio_can_be_turned_off(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.socketio.enabled = false).await;
    let (status, _) = app.api.get("/socket.io/?EIO=4&transport=polling").await;
    assert_eq!(status, 404);
}

crate::contract_tests!(
    a_stop_does_not_wait_for_long_polls,
    socketio_can_be_turned_off,
    socketio_requests_are_rate_limited_per_ip,
    seed_client_polling_then_websocket,
    seed_client_websocket_only,
    seed_client_polling_only,
    seed_client_hears_every_poll,
    subscribed_client_gets_only_its_poll_with_a_snapshot_and_seq,
    the_handshake_query_narrows_and_broadcast_all_can_be_off,
    a_hidden_poll_sends_nothing_until_its_close,
    socketio_follows_the_cors_origins,
    socketio_sessions_count_under_the_per_ip_cap,
);
