//! Hostile input: generated bodies, bytes and paths never crash the server nor get a 5xx.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Map, Value, json};

use crate::helpers::{Backend, TestApp};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
        "-?[0-9]{1,30}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Objects shaped like the API's bodies, with fields of any type (or missing).
fn shaped(fields: &'static [&'static str]) -> impl Strategy<Value = Value> {
    prop::collection::vec(prop::option::of(json_value()), fields.len()).prop_map(move |values| {
        let mut object = Map::new();
        for (field, value) in fields.iter().zip(values) {
            if let Some(value) = value {
                object.insert((*field).to_owned(), value);
            }
        }
        Value::Object(object)
    })
}

/// `n` values of a strategy, from a seeded runner so a failure can be reproduced.
fn sample<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

async fn hostile_bodies_and_paths_never_get_a_5xx_nor_crash_the_server(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let check = |what: String, status: u16| {
        assert!(status < 500, "{what} -> {status}");
    };
    let mut votes = sample(shaped(&["pollId", "optionId", "userId"]), 300);
    votes.extend(sample(json_value(), 100));
    for body in votes {
        let status = app
            .api
            .post("/vote")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        check(format!("POST /vote {body}"), status);
    }
    for body in sample(shaped(&["question", "options"]), 200) {
        let status = app
            .api
            .post("/polls")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        check(format!("POST /polls {body}"), status);
    }
    for bytes in sample(prop::collection::vec(any::<u8>(), 0..300), 100) {
        for path in ["/vote", "/polls"] {
            let resp = app.api.post(path).body(bytes.clone()).send().await.unwrap();
            check(format!("POST {path} {bytes:?}"), resp.status().as_u16());
        }
    }
    for segment in sample("[a-zA-Z0-9%._~!$'()*+,;=:@-]{0,24}", 150) {
        for path in [
            format!("/polls/{segment}"),
            format!("/ws/polls/{segment}"),
            format!("/polls/{segment}/close"),
        ] {
            let Ok(resp) = app.api.http.get(app.api.url(&path)).send().await else {
                continue; // not a URL reqwest will send
            };
            check(format!("GET {path}"), resp.status().as_u16());
        }
        let url = format!("ws://{}/ws/polls/{segment}", app.api.addr);
        if let Err(tokio_tungstenite::tungstenite::Error::Http(resp)) =
            tokio_tungstenite::connect_async(url).await
        {
            check(format!("WS /ws/polls/{segment}"), resp.status().as_u16());
        }
    }
    assert_eq!(app.api.get("/healthz").await.0, 200, "still serving");
    assert_eq!(app.api.vote(poll, 1, "after-the-storm").await.0, 202);
}

crate::contract_tests!(hostile_bodies_and_paths_never_get_a_5xx_nor_crash_the_server);
