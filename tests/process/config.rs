use crate::helpers::{Backend, ServerProcess, TestEnv, run_to_exit};

#[test]
fn unknown_config_key_stops_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let (status, output) = run_to_exit(
        dir.path(),
        &[("POLLCAST__HTTP__ADRESS", "127.0.0.1:0")],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("adress"), "names the key: {output}");
}

#[test]
fn unknown_key_in_the_config_file_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("custom.toml");
    std::fs::write(&file, "[aggregator]\nflush_interval = 5\n").unwrap();
    let (status, output) = run_to_exit(dir.path(), &[], &["--config", file.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("flush_interval"), "{output}");
}

#[test]
fn bad_values_stop_startup_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, named) in [
        (
            "POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS",
            "5",
            "aggregator.flush_interval_ms",
        ),
        (
            "POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS",
            "soon",
            "flush_interval_ms",
        ),
        (
            "POLLCAST__AGGREGATOR__MAX_UNFLUSHED_VOTES",
            "0",
            "aggregator.max_unflushed_votes",
        ),
        ("POLLCAST__HTTP__ADDR", "localhost", "http.addr"),
        ("POLLCAST__STORE__URL", "mysql://x", "store.url"),
        ("POLLCAST__LOG__KIND", "carrier-pigeon", "carrier-pigeon"),
    ] {
        let (status, output) = run_to_exit(dir.path(), &[(key, value)], &[]);
        assert_eq!(status.code(), Some(2), "{key}={value}: {output}");
        assert!(
            output.contains(named),
            "{key}={value} should name {named}: {output}"
        );
    }
}

#[test]
fn kafka_properties_that_break_exactly_once_stop_startup_naming_the_property() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, named) in [
        (
            "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__ENABLE_AUTO_COMMIT",
            "true",
            "enable_auto_commit",
        ),
        (
            "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__PARTITION_ASSIGNMENT_STRATEGY",
            "cooperative-sticky",
            "partition_assignment_strategy",
        ),
        (
            "POLLCAST__LOG__KAFKA__CONSUMER_PROPERTIES__ISOLATION_LEVEL",
            "read_uncommitted",
            "isolation_level",
        ),
        (
            "POLLCAST__LOG__KAFKA__PRODUCER_PROPERTIES__ENABLE_IDEMPOTENCE",
            "false",
            "enable_idempotence",
        ),
        ("POLLCAST__LOG__KAFKA__PROPERTIES__ACKS", "1", "acks"),
    ] {
        let (status, output) = run_to_exit(
            dir.path(),
            &[
                ("POLLCAST__LOG__KIND", "kafka"),
                // Nothing listens there: start-up must stop before it tries.
                ("POLLCAST__LOG__KAFKA__BROKERS", "127.0.0.1:1"),
                (key, value),
            ],
            &[],
        );
        assert_eq!(status.code(), Some(2), "{key}={value}: {output}");
        assert!(
            output.contains(named) && output.contains("exactly once"),
            "{key}={value} should name {named}: {output}"
        );
    }
}

#[test]
fn missing_config_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (status, output) =
        run_to_exit(dir.path(), &[], &["--config", "/nonexistent/pollcast.toml"]);
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.contains("not found"), "{output}");
}

#[test]
fn shipped_config_toml_is_valid() {
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let settings = pollcast::Settings::load(&shipped, true).expect("config.toml loads");
    assert_eq!(
        settings.aggregator.flush_interval,
        std::time::Duration::from_millis(2000)
    );
    assert!(matches!(
        &settings.store.url,
        pollcast::config::StoreUrl::Sqlite(url) if url.starts_with("sqlite://")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_admin_token_one_is_generated_and_logged_once() {
    let env = TestEnv::new(Backend::Embedded).await;
    let server = ServerProcess::start_without(&env, &[], &["POLLCAST__ADMIN__TOKEN"]);
    let output = server.output();
    let tokens: Vec<String> = output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|e| e["admin_token"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(tokens.len(), 1, "logged once: {output}");
    assert!(tokens[0].len() >= 32, "a long random token");

    let mut api = server.api.clone();
    api.token = None;
    let body = serde_json::json!({ "question": "Q?", "options": ["A", "B"] });
    let open = api.post("/polls").json(&body).send().await.unwrap();
    assert_eq!(open.status().as_u16(), 401, "never open by accident");
    api.token = Some(tokens[0].clone());
    assert_eq!(
        api.post("/polls")
            .json(&body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        201
    );
    assert_eq!(
        server.output().matches(tokens[0].as_str()).count(),
        1,
        "never logged again"
    );
}
