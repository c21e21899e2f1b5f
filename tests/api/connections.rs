use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{Backend, TestApp};

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
    let resp = app
        .api
        .http
        .get(app.api.url("/healthz"))
        .header("x-padding", "p".repeat(40_000))
        .send()
        .await;
    match resp {
        Ok(resp) => assert_eq!(resp.status().as_u16(), 431),
        Err(e) => assert!(e.is_request() || e.is_connect() || e.is_body(), "{e}"),
    }
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
);

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
