use serde_json::{Value, json};

use crate::helpers::{Backend, ServerProcess, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_of_a_request_carry_its_request_id() {
    let env = TestEnv::new(Backend::Embedded).await;
    let server = ServerProcess::start(&env, &[]);
    let resp = server
        .api
        .post("/polls")
        .header("x-request-id", "trace-4711")
        .json(&json!({ "question": "Logged?", "options": ["Yes", "No"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let output = server.output();
    let line = output
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|e| e["message"] == "poll created")
        .unwrap_or_else(|| panic!("no 'poll created' line in:\n{output}"));
    assert_eq!(line["span"]["request_id"], "trace-4711", "{line}");
    assert_eq!(line["level"], "INFO");
}
