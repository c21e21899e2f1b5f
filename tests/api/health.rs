use crate::helpers::{Backend, TestApp};

async fn healthz_answers_200_with_json(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, body) = app.api.get("/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
}

async fn unknown_path_is_404_with_a_json_error(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, body) = app.api.get("/nope").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].is_string());
}

crate::contract_tests!(
    healthz_answers_200_with_json,
    unknown_path_is_404_with_a_json_error,
);
