use std::time::Duration;

use crate::helpers::{Backend, SETTLE, ServerProcess, TestApp, TestEnv};

async fn arm_aggregator_panic(api: &crate::helpers::Api, poll: i64) {
    let resp = api
        .post(&format!("/debug/faults/aggregator-panic/{poll}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
}

async fn a_panicking_aggregator_is_restarted_and_its_votes_are_replayed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let poll = app.api.create_poll(&["A", "B"]).await;
    let steady = app.api.create_poll(&["A", "B"]).await;
    for i in 0..10 {
        app.api.vote(poll, 1, &format!("before-{i}")).await;
        app.api.vote(steady, 1, &format!("before-{i}")).await;
    }
    app.api.wait_for_total(poll, 10, SETTLE).await;

    // Armed now, the panic hits the next flush that has votes: these 15 are lost from the
    // aggregator's memory and must come back from the log.
    arm_aggregator_panic(&app.api, poll).await;
    for i in 0..15 {
        assert_eq!(app.api.vote(poll, 2, &format!("during-{i}")).await.0, 202);
        assert_eq!(app.api.vote(steady, 2, &format!("during-{i}")).await.0, 202);
    }
    let counted = app.api.wait_for_total(poll, 25, SETTLE).await;
    assert_eq!(crate::helpers::Api::votes_of(&counted, 2), 15);
    app.api.wait_for_total(steady, 25, SETTLE).await;

    assert_eq!(
        app.api.vote(poll, 1, "after").await.0,
        202,
        "the restarted aggregator counts new votes"
    );
    app.api.wait_for_total(poll, 26, SETTLE).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        app.api.poll(poll).await["totalVotes"],
        26,
        "replay counted nothing twice"
    );
    assert_eq!(app.api.poll(steady).await["totalVotes"], 25);
    let metrics = app.api.metrics().await;
    assert!(
        metrics.contains(r#"pollcast_actor_restarts_total{actor="aggregator"} 1"#),
        "the restart is counted: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausting_the_restart_budget_exits_non_zero_saying_why() {
    let env = TestEnv::new(Backend::Embedded).await;
    let mut server = ServerProcess::start(&env, &[("POLLCAST__SUPERVISION__MAX_RESTARTS", "2")]);
    server.api.wait_ready().await;
    let poll = server.api.create_poll(&["A", "B"]).await;
    for round in 0..3 {
        arm_aggregator_panic(&server.api, poll).await;
        // A vote gives the aggregator something to flush, and so to panic on.
        let _ = server.api.vote(poll, 1, &format!("round-{round}")).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let status = server.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1), "{}", server.output());
    assert!(
        server.output().contains("restart budget exhausted"),
        "{}",
        server.output()
    );
}

crate::contract_tests!(a_panicking_aggregator_is_restarted_and_its_votes_are_replayed);
