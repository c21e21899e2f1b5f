use serde_json::{Value, json};

use crate::helpers::{Api, Backend, TestApp};

async fn post_poll(api: &Api, body: Value) -> (u16, Value) {
    let resp = api.post("/polls").json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn creating_a_poll_returns_201_with_numbered_options_at_zero(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, poll) = post_poll(
        &app.api,
        json!({ "question": "Tabs or spaces?", "options": ["Tabs", "Spaces"] }),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(poll["question"], "Tabs or spaces?");
    assert_eq!(
        poll["options"],
        json!([{ "id": 1, "text": "Tabs", "votes": 0 }, { "id": 2, "text": "Spaces", "votes": 0 }])
    );
    assert_eq!(poll["closed"], false);
    assert_eq!(poll["totalVotes"], 0);
    assert_eq!(poll["seq"], 0);
    assert!(poll["id"].as_i64().unwrap() > 0);
}

async fn poll_with_fewer_than_two_or_more_than_32_options_is_rejected_with_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let many: Vec<String> = (0..33).map(|i| format!("option {i}")).collect();
    for options in [json!(["only"]), json!([]), json!(many)] {
        let (status, body) =
            post_poll(&app.api, json!({ "question": "Q?", "options": options })).await;
        assert_eq!(status, 422, "{options}");
        assert_eq!(body["error"], "invalid_request");
    }
}

async fn poll_with_blank_or_overlong_texts_is_rejected_with_422(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let long = "x".repeat(501);
    for body in [
        json!({ "question": "  ", "options": ["A", "B"] }),
        json!({ "question": long, "options": ["A", "B"] }),
        json!({ "question": "Q?", "options": ["A", " "] }),
        json!({ "question": "Q?", "options": ["A", "x".repeat(201)] }),
        json!({ "question": "Q?", "options": ["A", "A"] }),
    ] {
        let (status, _) = post_poll(&app.api, body.clone()).await;
        assert_eq!(status, 422, "{body}");
    }
}

async fn poll_body_of_wrong_shape_is_422_and_not_json_is_400(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, _) = post_poll(&app.api, json!({ "question": 5, "options": ["A", "B"] })).await;
    assert_eq!(status, 422);
    let (status, _) = post_poll(
        &app.api,
        json!({ "question": "Q", "options": ["A", "B"], "colour": 1 }),
    )
    .await;
    assert_eq!(status, 422, "unknown fields are refused");
    let resp = app
        .api
        .post("/polls")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"],
        "malformed_json"
    );
}

async fn oversized_body_is_rejected_with_413(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let options: Vec<String> = (0..32).map(|i| format!("{i}{}", "y".repeat(190))).collect();
    let body =
        json!({ "question": "x".repeat(500), "options": options, "pad": "z".repeat(20_000) });
    let (status, body) = post_poll(&app.api, body).await;
    assert_eq!(status, 413);
    assert_eq!(body["error"], "payload_too_large");
}

async fn polls_are_listed_newest_first(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let first = app.api.create_poll(&["A", "B"]).await;
    let second = app.api.create_poll(&["C", "D"]).await;
    let (status, list) = app.api.get("/polls").await;
    assert_eq!(status, 200);
    let ids: Vec<i64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [second, first]);
}

async fn the_poll_list_comes_in_pages_with_a_cursor(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(app.api.create_poll(&["A", "B"]).await);
    }
    created.reverse(); // newest first, as listed
    let page = |query: String| {
        let api = app.api.clone();
        async move {
            let response = api
                .http
                .get(api.url(&format!("/polls{query}")))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let next = response
                .headers()
                .get("pollcast-next-before")
                .map(|v| v.to_str().unwrap().parse::<i64>().unwrap());
            let body: Value = response.json().await.unwrap();
            let ids: Vec<i64> = body
                .as_array()
                .map(|polls| polls.iter().map(|p| p["id"].as_i64().unwrap()).collect())
                .unwrap_or_default();
            (status, ids, next)
        }
    };
    let (status, first, next) = page("?limit=2".into()).await;
    assert_eq!((status, &first[..]), (200, &created[..2]));
    let (_, second, next) = page(format!("?limit=2&before={}", next.unwrap())).await;
    assert_eq!(second, created[2..4]);
    let (_, last, next) = page(format!("?limit=2&before={}", next.unwrap())).await;
    assert_eq!(
        (&last[..], next),
        (&created[4..], None),
        "no cursor after the last page"
    );
    let (_, all, next) = page(String::new()).await;
    assert_eq!(
        (all, next),
        (created.clone(), None),
        "a default page holds them all"
    );
    for bad in ["?limit=0", "?limit=201", "?limit=x", "?before=1&nope=2"] {
        assert_eq!(page(bad.into()).await.0, 422, "{bad}");
    }
}

async fn a_long_page_costs_the_client_more_of_its_rate_limit(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.rate_limit.per_ip_per_sec = 1;
        s.rate_limit.per_ip_burst = 30;
    })
    .await;
    let status = |query: &'static str| {
        let api = app.api.clone();
        async move {
            let url = api.url(&format!("/polls{query}"));
            api.http.get(url).send().await.unwrap().status().as_u16()
        }
    };
    // 1 + 200 / 10 = 21 of the burst of 30: the second long page does not fit.
    assert_eq!(status("?limit=200").await, 200);
    assert_eq!(status("?limit=200").await, 429);
    // Small requests still fit in what is left.
    assert_eq!(status("?limit=5").await, 200);
}

async fn unknown_poll_is_404_with_a_json_error(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, body) = app.api.get("/polls/999").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "poll_not_found");
}

async fn closing_a_poll_marks_it_closed_and_is_idempotent(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let resp = app
        .api
        .post(&format!("/polls/{poll}/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let closed: Value = resp.json().await.unwrap();
    assert_eq!(closed["closed"], true);
    assert!(closed["closedAt"].is_string());
    let again: Value = app
        .api
        .post(&format!("/polls/{poll}/close"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["closedAt"], closed["closedAt"]);
    assert_eq!(app.api.poll(poll).await["closed"], true);
}

async fn closing_an_unknown_poll_is_404(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let resp = app.api.post("/polls/999/close").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
}

async fn creating_and_closing_polls_need_the_admin_token(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| s.admin.token = Some("s3cret-token".into())).await;
    let mut anonymous = app.api.clone();
    anonymous.token = None;
    let body = json!({ "question": "Q?", "options": ["A", "B"] });
    let (status, err) = post_poll(&anonymous, body.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(err["error"], "unauthorized");
    let mut wrong = app.api.clone();
    wrong.token = Some("s3cret-tokem".into());
    assert_eq!(post_poll(&wrong, body).await.0, 401);

    let mut admin = app.api.clone();
    admin.token = Some("s3cret-token".into());
    let poll = admin.create_poll(&["A", "B"]).await;
    let anonymous_close = anonymous
        .post(&format!("/polls/{poll}/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous_close.status().as_u16(), 401);
    let close = admin
        .post(&format!("/polls/{poll}/close"))
        .send()
        .await
        .unwrap();
    assert_eq!(close.status().as_u16(), 200);
    let (status, _) = anonymous.get(&format!("/polls/{poll}")).await;
    assert_eq!(status, 200, "reading needs no token");
    assert_eq!(
        anonymous.vote(poll, 1, "u").await.0,
        410,
        "voting needs no token"
    );
}

async fn a_polls_seq_always_comes_with_the_same_counts(backend: Backend) {
    // Fast flushes, and reads racing them: a read torn between the version and the counts
    // would show one seq with two different totals.
    let app = TestApp::spawn_with(backend, |s| s.aggregator.flush_interval_ms = 20).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let api = app.api.clone();
    let voter = tokio::spawn(async move {
        for i in 0..150 {
            assert_eq!(api.vote(poll, 1 + i % 2, &format!("u{i}")).await.0, 202);
        }
    });
    let mut seen: std::collections::HashMap<i64, i64> = Default::default();
    let deadline = std::time::Instant::now() + crate::helpers::SETTLE;
    while !voter.is_finished() || seen.values().all(|total| *total < 150) {
        assert!(
            std::time::Instant::now() < deadline,
            "not all 150 votes counted"
        );
        let read = app.api.poll(poll).await;
        let (seq, total) = (
            read["seq"].as_i64().unwrap(),
            read["totalVotes"].as_i64().unwrap(),
        );
        let first = *seen.entry(seq).or_insert(total);
        assert_eq!(
            first, total,
            "seq {seq} was shown with two different totals"
        );
    }
    voter.await.unwrap();
}

crate::contract_tests!(
    a_polls_seq_always_comes_with_the_same_counts,
    creating_a_poll_returns_201_with_numbered_options_at_zero,
    poll_with_fewer_than_two_or_more_than_32_options_is_rejected_with_422,
    poll_with_blank_or_overlong_texts_is_rejected_with_422,
    poll_body_of_wrong_shape_is_422_and_not_json_is_400,
    oversized_body_is_rejected_with_413,
    polls_are_listed_newest_first,
    the_poll_list_comes_in_pages_with_a_cursor,
    a_long_page_costs_the_client_more_of_its_rate_limit,
    unknown_poll_is_404_with_a_json_error,
    closing_a_poll_marks_it_closed_and_is_idempotent,
    closing_an_unknown_poll_is_404,
    creating_and_closing_polls_need_the_admin_token,
);
