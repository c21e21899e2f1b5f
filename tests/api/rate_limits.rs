use serde_json::json;

use crate::helpers::{Backend, TestApp};

async fn a_thousand_distinct_users_from_one_ip_over_the_limit_get_429(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit.per_ip_per_sec = 50;
        s.rate_limit.per_ip_burst = 100;
    })
    .await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let started = std::time::Instant::now();
    let (mut accepted, mut limited) = (0, 0);
    for i in 0..1000 {
        let resp = app
            .api
            .post("/vote")
            .json(&json!({ "pollId": poll, "optionId": 1, "userId": format!("user-{i}") }))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            202 => accepted += 1,
            429 => {
                limited += 1;
                let retry: u64 = resp.headers()["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=2).contains(&retry), "Retry-After {retry}");
                let body: serde_json::Value = resp.json().await.unwrap();
                assert_eq!(body["error"], "rate_limited");
            }
            other => panic!("unexpected {other}"),
        }
    }
    let allowed = 100.0 + 50.0 * started.elapsed().as_secs_f64() + 1.0;
    assert!(limited > 0, "over the limit");
    assert!(
        f64::from(accepted) <= allowed,
        "{accepted} accepted, at most {allowed} allowed"
    );
    assert_eq!(
        app.api.get("/healthz").await.0,
        200,
        "probes are never limited"
    );
}

async fn one_user_voting_too_fast_gets_429(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit.per_user_per_sec = 1;
        s.rate_limit.per_user_burst = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let poll = app.api.create_poll(&["A", "B"]).await;
        statuses.push(app.api.vote(poll, 1, "busy-user").await.0);
    }
    assert_eq!(statuses, [202, 202, 202, 429, 429]);
    let poll = app.api.create_poll(&["A", "B"]).await;
    assert_eq!(
        app.api.vote(poll, 1, "someone-else").await.0,
        202,
        "other users unaffected"
    );
}

async fn behind_a_proxy_the_configured_header_names_the_client(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit.per_ip_per_sec = 1;
        s.rate_limit.per_ip_burst = 2;
        s.rate_limit.client_ip_header = Some("x-forwarded-for".into());
    })
    .await;
    let get = |forwarded: &'static str| {
        let api = app.api.clone();
        async move {
            // A short page: one request's worth of the limit (long ones cost more).
            let req = api.http.get(api.url("/polls?limit=5"));
            let req = if forwarded.is_empty() {
                req
            } else {
                req.header("x-forwarded-for", forwarded)
            };
            req.send().await.unwrap().status().as_u16()
        }
    };
    // The last address is the one the proxy appended; what the client put before it is ignored.
    assert_eq!(get("6.6.6.6, 10.0.0.1").await, 200);
    assert_eq!(get("7.7.7.7, 10.0.0.1").await, 200);
    assert_eq!(get("8.8.8.8, 10.0.0.1").await, 429, "same client 10.0.0.1");
    assert_eq!(get("10.0.0.2").await, 200, "another client");
    assert_eq!(get("").await, 400, "the header is required when configured");
}

async fn a_forwarded_header_sent_twice_is_read_from_the_line_the_proxy_appended(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit.per_ip_per_sec = 1;
        s.rate_limit.per_ip_burst = 2;
        s.rate_limit.client_ip_header = Some("x-forwarded-for".into());
    })
    .await;
    let mut statuses = Vec::new();
    for forged in ["1.1.1.1", "2.2.2.2", "3.3.3.3"] {
        // The client's own line first, then the proxy's: a proxy that appends a header line
        // rather than extending the client's one sends exactly this.
        let response = app
            .api
            .http
            .get(app.api.url("/polls?limit=5"))
            .header("x-forwarded-for", forged)
            .header("x-forwarded-for", "10.0.0.3")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 429],
        "one client, 10.0.0.3, whatever it forged"
    );
}

crate::contract_tests!(
    a_thousand_distinct_users_from_one_ip_over_the_limit_get_429,
    one_user_voting_too_fast_gets_429,
    behind_a_proxy_the_configured_header_names_the_client,
    a_forwarded_header_sent_twice_is_read_from_the_line_the_proxy_appended,
);
