use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Api, Backend, SETTLE, TestApp};

async fn every_response_carries_a_request_id_and_a_given_one_is_kept(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app
        .api
        .http
        .get(app.api.url("/healthz"))
        .send()
        .await
        .unwrap();
    let generated = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(generated.len(), 32);
    let other = app.api.http.get(app.api.url("/nope")).send().await.unwrap();
    assert_ne!(
        other.headers()["x-request-id"].to_str().unwrap(),
        generated,
        "one per request"
    );
    let kept = app
        .api
        .http
        .get(app.api.url("/healthz"))
        .header("x-request-id", "trace-abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(kept.headers()["x-request-id"], "trace-abc-123");
}

async fn oversized_headers_are_refused(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    // A raw socket: the answer is read before the server closes, whatever the client would
    // make of a reset while it still sends.
    let mut socket = tokio::net::TcpStream::connect(app.api.addr).await.unwrap();
    let head = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: {}\r\n\r\n",
        "p".repeat(20_000)
    );
    let _ = socket.write_all(head.as_bytes()).await;
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut answer))
        .await
        .expect("an answer")
        .expect("readable");
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

async fn connections_past_the_limit_are_closed(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.http.max_connections = 2).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(app.api.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(app.api.addr).await.unwrap();
    let _ = third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without an answer: {read:?}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        app.api.get("/healthz").await.0,
        200,
        "served again once connections close"
    );
}

crate::contract_tests!(
    every_response_carries_a_request_id_and_a_given_one_is_kept,
    oversized_headers_are_refused,
    connections_past_the_limit_are_closed,
    cross_origin_access_is_granted_only_to_configured_origins,
    with_no_origin_configured_a_page_on_another_site_cannot_vote,
);

async fn with_no_origin_configured_a_page_on_another_site_cannot_vote(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    // What a form or `fetch(…, {mode: "no-cors"})` on evil.example sends: a "simple" request,
    // which a browser does not preflight.
    let vote = |origin: String, user: &'static str| {
        let api = app.api.clone();
        async move {
            api.http
                .post(api.url("/vote"))
                .header("origin", origin)
                .header("content-type", "text/plain")
                .body(format!(
                    r#"{{"pollId": {poll}, "optionId": 1, "userId": "{user}"}}"#
                ))
                .send()
                .await
                .unwrap()
        }
    };
    let refused = vote("https://evil.example".into(), "victim").await;
    assert_eq!(refused.status().as_u16(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    let own = vote(format!("http://{}", app.api.addr), "u-1").await;
    assert_eq!(own.status().as_u16(), 202, "the page's own votes pass");
    let counted = app.api.wait_for_total(poll, 1, SETTLE).await;
    assert_eq!(Api::votes_of(&counted, 1), 1, "only the page's own vote");
}

async fn cross_origin_access_is_granted_only_to_configured_origins(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.http.cors_origins = vec!["https://polls.example.com".into()];
    })
    .await;
    let preflight = |origin: &'static str| {
        let api = app.api.clone();
        async move {
            api.http
                .request(reqwest::Method::OPTIONS, api.url("/vote"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "content-type")
                .send()
                .await
                .unwrap()
        }
    };
    let allowed = preflight("https://polls.example.com").await;
    assert_eq!(allowed.status().as_u16(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://polls.example.com"
    );
    let refused = preflight("https://evil.example").await;
    assert_eq!(refused.status().as_u16(), 403);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "forbidden");
    // The page pollcast serves is same-origin: browsers still send Origin on its POSTs.
    let own_origin = format!("http://{}", app.api.addr);
    let poll = app
        .api
        .post("/polls")
        .header("origin", &own_origin)
        .json(&serde_json::json!({ "question": "Q?", "options": ["A", "B"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status().as_u16(), 201, "the page's own requests pass");
}

// The connection layer is the same whatever the backends: these run on the embedded ones.

/// Reads until the server closes the connection; what it sent before that.
async fn read_to_close(socket: &mut tokio::net::TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "still open after {within:?}");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_whole_request_head_in_time_is_closed() {
    let app = TestApp::spawn_with(Backend::Embedded, |s| {
        s.http.header_read_timeout_ms = 300;
    })
    .await;
    // Nothing at all; one byte that could begin HTTP/2's preface; half a request line.
    for sent in [&b""[..], b"P", b"GET /healthz HT"] {
        let mut socket = tokio::net::TcpStream::connect(app.api.addr).await.unwrap();
        socket.write_all(sent).await.unwrap();
        let started = std::time::Instant::now();
        read_to_close(&mut socket, Duration::from_secs(5)).await;
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{sent:?}: closed only at the deadline"
        );
    }
    assert_eq!(app.api.get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_share_of_connections() {
    let app = TestApp::spawn_with(Backend::Embedded, |s| {
        s.http.max_connections_per_ip = Some(3);
    })
    .await;
    let peer = std::net::SocketAddr::new(std::net::Ipv4Addr::new(127, 0, 0, 2).into(), 0);
    let server = app.api.addr;
    let from = |source: std::net::SocketAddr| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(source).unwrap();
        socket.connect(server).await.unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(from(peer).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = from(peer).await;
    let _ = fourth
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let answer = read_to_close(&mut fourth, Duration::from_secs(5)).await;
    assert_eq!(answer, "", "closed without an answer");
    // Another address is served meanwhile, and the capped one again once it lets go.
    assert_eq!(app.api.get("/healthz").await.0, 200);
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = from(peer).await;
    again
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut again, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_answer_on_the_admin_listener_while_the_public_one_is_full() {
    let app = TestApp::spawn_with(Backend::Embedded, |s| {
        s.http.max_connections = 2;
        s.http.admin_addr = Some("127.0.0.1:0".into());
    })
    .await;
    let admin = app.admin.expect("an admin listener");
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(app.api.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let admin = crate::helpers::Api::new(admin);
    assert_eq!(admin.get("/healthz").await.0, 200);
    assert_eq!(admin.get("/readyz").await.0, 200);
    let metrics = admin.http.get(admin.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status().as_u16(), 200);
    // Only those: the API is not served there.
    assert_eq!(admin.get("/polls").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_does_not_arrive_in_time_gets_408() {
    let app = TestApp::spawn_with(Backend::Embedded, |s| {
        s.http.body_read_timeout_ms = 300;
    })
    .await;
    let mut socket = tokio::net::TcpStream::connect(app.api.addr).await.unwrap();
    socket
        .write_all(b"POST /vote HTTP/1.1\r\nhost: x\r\ncontent-length: 60\r\n\r\n{\"pollId\"")
        .await
        .unwrap();
    let answer = read_to_close(&mut socket, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
}
