//! `/openapi.json` against real responses: every endpoint, its success and each error it
//! can answer, must be described, and each JSON body must match the documented schema, so
//! the document cannot drift from the code.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp};

/// Checks `value` against `schema` (JSON Schema as OpenAPI 3.1 uses it: `$ref`, `type`,
/// `properties`, `required`, `items`, `oneOf`, `anyOf`, `allOf`, `enum`,
/// `additionalProperties`). Why objects are treated as closed: a field the code sends and
/// the document does not describe is exactly the drift this test is for.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(all) = schema["allOf"].as_array() {
        for part in all {
            check_open(doc, part, value, at, errors);
        }
        check_closed(doc, schema, value, at, errors);
        return;
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(any) = schema[key].as_array() {
            let fits = any.iter().filter(|s| {
                let mut e = Vec::new();
                check(doc, s, value, at, &mut e);
                e.is_empty()
            });
            let n = fits.count();
            if n == 0 || (key == "oneOf" && n > 1) {
                errors.push(format!("{at}: {value} fits {n} of the {key} schemas"));
            }
            return;
        }
    }
    check_open(doc, schema, value, at, errors);
    check_closed(doc, schema, value, at, errors);
}

/// The schema's own constraints, without the closed-object rule (an `allOf` part sees only
/// some of the fields).
fn check_open(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if schema.get("allOf").is_some()
        || schema.get("oneOf").is_some()
        || schema.get("anyOf").is_some()
    {
        let mut e = Vec::new();
        check(doc, schema, value, at, &mut e);
        errors.extend(e.into_iter().filter(|e| !e.contains("not in the document")));
        return;
    }
    if let Some(types) = types_of(schema)
        && !types.iter().any(|t| is_type(value, t))
    {
        errors.push(format!("{at}: {value} is not {types:?}"));
        return;
    }
    if let Some(options) = schema["enum"].as_array()
        && !options.contains(value)
    {
        errors.push(format!("{at}: {value} is not one of {options:?}"));
    }
    if let Value::Object(fields) = value {
        for name in schema["required"].as_array().into_iter().flatten() {
            let name = name.as_str().unwrap();
            if !fields.contains_key(name) {
                errors.push(format!("{at}: required {name} is missing"));
            }
        }
        for (name, field) in fields {
            if let Some(property) = schema["properties"].get(name) {
                check(doc, property, field, &format!("{at}.{name}"), errors);
            } else if let Some(extra) = schema.get("additionalProperties")
                && extra.is_object()
            {
                check(doc, extra, field, &format!("{at}.{name}"), errors);
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (value, schema.get("items")) {
        for (i, element) in items.iter().enumerate() {
            check(doc, item, element, &format!("{at}[{i}]"), errors);
        }
    }
}

/// Fields of an object that no part of its schema describes.
fn check_closed(doc: &Value, schema: &Value, value: &Value, at: &str, errors: &mut Vec<String>) {
    let Value::Object(fields) = value else {
        return;
    };
    if resolve(doc, schema)
        .get("additionalProperties")
        .is_some_and(Value::is_object)
    {
        return;
    }
    let mut known = BTreeSet::new();
    properties(doc, schema, &mut known);
    if known.is_empty() {
        return; // any object (the document itself)
    }
    for name in fields.keys() {
        if !known.contains(name) {
            errors.push(format!("{at}.{name} is sent but not in the document"));
        }
    }
}

fn properties(doc: &Value, schema: &Value, known: &mut BTreeSet<String>) {
    let schema = resolve(doc, schema);
    if let Some(props) = schema["properties"].as_object() {
        known.extend(props.keys().cloned());
    }
    for part in schema["allOf"].as_array().into_iter().flatten() {
        properties(doc, part, known);
    }
}

fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    match schema["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.trim_start_matches('#');
            let target = doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("no {reference}"));
            resolve(doc, target)
        }
        None => schema,
    }
}

fn types_of(schema: &Value) -> Option<Vec<String>> {
    match &schema["type"] {
        Value::String(t) => Some(vec![t.clone()]),
        Value::Array(ts) => Some(ts.iter().map(|t| t.as_str().unwrap().to_owned()).collect()),
        _ => None,
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "string" => value.is_string(),
        "array" => value.is_array(),
        "object" => value.is_object(),
        _ => false,
    }
}

/// One real exchange, to be found in the document.
struct Seen {
    method: &'static str,
    template: &'static str,
    status: u16,
    content_type: String,
    body: Vec<u8>,
}

/// Finds the exchange's path, method and status in the document and checks its body.
fn conforms(doc: &Value, seen: &Seen) -> Result<(), String> {
    let what = format!("{} {} -> {}", seen.method, seen.template, seen.status);
    let operation = &doc["paths"][seen.template][seen.method.to_lowercase()];
    if operation.is_null() {
        return Err(format!("{what}: the operation is not documented"));
    }
    let response = &operation["responses"][seen.status.to_string()];
    if response.is_null() {
        return Err(format!("{what}: the status is not documented"));
    }
    let media = seen
        .content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim();
    let Some(content) = response["content"].as_object() else {
        return if seen.body.is_empty() || seen.status == 101 || seen.status == 302 {
            Ok(())
        } else {
            Err(format!(
                "{what}: a body ({media}) where the document has none"
            ))
        };
    };
    let Some(described) = content.get(media) else {
        return Err(format!(
            "{what}: {media} is not among {:?}",
            content.keys().collect::<Vec<_>>()
        ));
    };
    if media != "application/json" {
        return Ok(());
    }
    let value: Value = serde_json::from_slice(&seen.body)
        .map_err(|e| format!("{what}: the body is not JSON: {e}"))?;
    let mut errors = Vec::new();
    check(doc, &described["schema"], &value, "body", &mut errors);
    if errors.is_empty() {
        Ok(())
    } else {
        Err(format!("{what}: {}", errors.join("; ")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_as_the_openapi_document_describes() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let api = &app.api;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let doc: Value = http
        .get(api.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");

    let poll = api.create_poll(&["A", "B"]).await;
    let hidden = api
        .create_poll_with(
            json!({ "question": "Hidden?", "options": ["A", "B"], "hideResults": true }),
        )
        .await["id"]
        .as_i64()
        .unwrap();
    let closed = api.create_poll(&["A", "B"]).await;
    api.close_poll(closed).await;
    let admin = format!("Bearer {ADMIN_TOKEN}");
    let big = "x".repeat(20_000);

    // (method, documented path, actual path, admin?, body)
    let exchanges: Vec<(&str, &str, String, bool, Option<String>)> = vec![
        ("POST", "/polls", "/polls".into(), true, Some(json!({"question": "Q?", "options": ["A", "B"], "webhook": {"url": "http://127.0.0.1:9/hook"}}).to_string())),
        ("POST", "/polls", "/polls".into(), true, Some("{oops".into())),
        ("POST", "/polls", "/polls".into(), false, Some(json!({"question": "Q?", "options": ["A", "B"]}).to_string())),
        ("POST", "/polls", "/polls".into(), true, Some(format!(r#"{{"question": "{big}"}}"#))),
        ("POST", "/polls", "/polls".into(), true, Some(json!({"question": "Q?", "options": ["A"]}).to_string())),
        ("GET", "/polls", "/polls?limit=1".into(), false, None),
        ("GET", "/polls", "/polls?limit=0".into(), false, None),
        ("GET", "/polls/{id}", format!("/polls/{poll}"), false, None),
        ("GET", "/polls/{id}", format!("/polls/{hidden}"), false, None),
        ("GET", "/polls/{id}", "/polls/999999".into(), false, None),
        ("POST", "/vote", "/vote".into(), false, Some(json!({"pollId": poll, "optionId": 1, "userId": "u1", "voteId": "k1"}).to_string())),
        ("POST", "/vote", "/vote".into(), false, Some(json!({"pollId": poll, "optionId": 2, "userId": "u1", "voteId": "k1"}).to_string())),
        ("POST", "/vote", "/vote".into(), false, Some(json!({"pollId": poll, "optionId": 2, "userId": "u1"}).to_string())),
        ("POST", "/vote", "/vote".into(), false, Some("{oops".into())),
        ("POST", "/vote", "/vote".into(), false, Some(json!({"pollId": 999999, "optionId": 1, "userId": "u2"}).to_string())),
        ("POST", "/vote", "/vote".into(), false, Some(json!({"pollId": poll, "optionId": 9, "userId": "u2"}).to_string())),
        ("POST", "/vote", "/vote".into(), false, Some(json!({"pollId": closed, "optionId": 1, "userId": "u2"}).to_string())),
        ("POST", "/vote", "/vote".into(), false, Some(json!({"pollId": poll, "userId": "u2"}).to_string())),
        ("POST", "/vote", "/vote".into(), false, Some(format!(r#"{{"userId": "{big}"}}"#))),
        ("GET", "/polls/{id}/export", format!("/polls/{poll}/export"), false, None),
        ("GET", "/polls/{id}/export", format!("/polls/{poll}/export?format=csv"), false, None),
        ("GET", "/polls/{id}/export", format!("/polls/{poll}/export?data=ledger"), true, None),
        ("GET", "/polls/{id}/export", format!("/polls/{poll}/export?data=ledger"), false, None),
        ("GET", "/polls/{id}/export", format!("/polls/{hidden}/export"), false, None),
        ("GET", "/polls/{id}/export", "/polls/999999/export".into(), false, None),
        ("GET", "/polls/{id}/export", format!("/polls/{poll}/export?format=xml"), false, None),
        ("POST", "/polls/{id}/close", format!("/polls/{poll}/close"), true, None),
        ("POST", "/polls/{id}/close", format!("/polls/{poll}/close"), false, None),
        ("POST", "/polls/{id}/close", "/polls/999999/close".into(), true, None),
        ("GET", "/ws/polls/{id}", format!("/ws/polls/{poll}"), false, None),
        ("GET", "/ws/polls/{id}", "/ws/polls/999999".into(), false, None),
        ("GET", "/polls/{id}/qr.svg", format!("/polls/{poll}/qr.svg"), false, None),
        ("GET", "/polls/{id}/qr.svg", "/polls/999999/qr.svg".into(), false, None),
        ("GET", "/j/{id}", format!("/j/{poll}"), false, None),
        ("GET", "/healthz", "/healthz".into(), false, None),
        ("GET", "/readyz", "/readyz".into(), false, None),
        ("GET", "/metrics", "/metrics".into(), false, None),
        ("GET", "/openapi.json", "/openapi.json".into(), false, None),
    ];
    let mut failures = Vec::new();
    let mut exercised = BTreeSet::new();
    let mut statuses = BTreeSet::new();
    for (method, template, path, as_admin, body) in exchanges {
        let mut request = http.request(method.parse().unwrap(), api.url(&path));
        if as_admin {
            request = request.header("authorization", &admin);
        }
        // The upgrade request of a WebSocket client, for the WebSocket route.
        if template == "/ws/polls/{id}" && path.ends_with("999999") {
            request = request
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==");
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = response.bytes().await.unwrap().to_vec();
        exercised.insert((method, template));
        statuses.insert((template, status));
        let seen = Seen {
            method,
            template,
            status,
            content_type,
            body,
        };
        if let Err(e) = conforms(&doc, &seen) {
            failures.push(format!("{path}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every documented operation was tried.
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .unwrap()
                .keys()
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect();
    let tried: BTreeSet<(String, String)> = exercised
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, tried, "operations documented vs tried");
    // The errors of the vote path were each reached (a broken case would hide one).
    for status in [202, 400, 404, 409, 410, 413, 422] {
        assert!(
            statuses.contains(&("/vote", status)),
            "POST /vote never answered {status}"
        );
    }
}
