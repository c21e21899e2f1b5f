//! `pollcast-loadgen` against a real pollcast: its figures must match what the server did.

use std::process::Command;

use serde_json::Value;

use crate::helpers::{ADMIN_TOKEN, Backend, TestApp};

fn loadgen(app: &TestApp, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_pollcast-loadgen"))
        .args([
            "votes",
            "--url",
            &format!("http://{}", app.api.addr),
            "--token",
            ADMIN_TOKEN,
            "--json",
        ])
        .args(args)
        .output()
        .expect("loadgen runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

/// Votes the server counted in the probes' own polls.
async fn probe_votes_counted(app: &TestApp) -> u64 {
    let (_, polls) = app.api.get("/polls").await;
    polls
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["question"] == "loadgen probe")
        .map(|p| p["totalVotes"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_reports_what_the_server_counted() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let report = loadgen(
        &app,
        &[
            "--count",
            "300",
            "--connections",
            "4",
            "--polls",
            "3",
            "--verify",
        ],
    );
    assert_eq!(report["sent"], 300);
    assert_eq!(report["accepted"], 300);
    assert_eq!(report["polls"], 3);
    assert_eq!(report["verification"]["counted"], 300);
    assert_eq!(report["verification"]["exact"], true);
    assert!(report["latency"]["p99_ms"].as_f64().unwrap() > 0.0);
    let (_, polls) = app.api.get("/polls").await;
    let total: i64 = polls
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["totalVotes"].as_i64().unwrap())
        .sum();
    assert_eq!(total, 300, "the server agrees");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadgen_duplicates_get_409_and_subscribers_see_every_update() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let report = loadgen(
        &app,
        &[
            "--count",
            "400",
            "--connections",
            "2",
            "--duplicate-ratio",
            "0.5",
            "--subscribers",
            "3",
            "--verify",
        ],
    );
    let (accepted, duplicates) = (
        report["accepted"].as_u64().unwrap(),
        report["duplicates"].as_u64().unwrap(),
    );
    assert_eq!(accepted + duplicates, 400, "{report}");
    assert!(duplicates > 50, "about half are duplicates: {duplicates}");
    assert_eq!(report["verification"]["exact"], true);
    assert_eq!(report["fanout"]["connected"], 3);
    assert!(
        report["fanout"]["messages"].as_u64().unwrap() >= 3,
        "{report}"
    );
    assert_eq!(report["fanout"]["missed_updates"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_times_votes_until_a_subscriber_sees_them_without_touching_the_verification() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let report = loadgen(
        &app,
        &[
            "--duration",
            "2s",
            "--connections",
            "2",
            "--probe",
            "--verify",
        ],
    );
    let probes = report["visibility"]["samples"].as_u64().unwrap();
    assert!(probes >= 1, "{report}");
    assert!(report["visibility"]["max_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(report["verification"]["exact"], true, "{report}");
    let probed = probe_votes_counted(&app).await;
    assert_eq!(
        probed, probes,
        "each probe vote was seen once, in the probes' own polls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prober_whose_connection_the_server_closed_while_it_waited_votes_on_a_new_one() {
    // Each probe vote takes about a flush interval to show, longer than the server keeps
    // an idle keep-alive connection open: every vote after the first finds its connection
    // closed.
    let app = TestApp::spawn_with(Backend::Embedded, |s| {
        s.http.header_read_timeout_ms = 300;
        s.aggregator.flush_interval_ms = 1_000;
    })
    .await;
    let report = loadgen(&app, &["--duration", "4s", "--connections", "1", "--probe"]);
    let probes = report["visibility"]["samples"].as_u64().unwrap();
    assert!(probes > 4, "a prober voted again after waiting: {report}");
    let probed = probe_votes_counted(&app).await;
    assert_eq!(probed, probes, "each probe vote counted once");
}
