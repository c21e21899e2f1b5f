//! `pollcast-loadgen` against a real pollcast: its figures must match what the server did.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::services::TcpProxy;
use crate::helpers::{ADMIN_TOKEN, Backend, TestApp};

/// `pollcast-loadgen votes` against `urls` (comma-separated) with `args`.
fn votes_command(urls: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pollcast-loadgen"));
    cmd.args(["votes", "--url", urls, "--token", ADMIN_TOKEN, "--json"])
        .args(args);
    cmd
}

fn report_of(out: Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

fn loadgen(app: &TestApp, args: &[&str]) -> Value {
    let out = votes_command(&format!("http://{}", app.api.addr), args)
        .output()
        .expect("loadgen runs");
    report_of(out)
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

/// A child process killed when dropped.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A large audience is held by load generators that only watch, while another votes: each
/// says when all its viewers are in, holds them until SIGTERM, and then reports how many
/// ended showing the poll's final counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewers_only_load_generator_holds_its_audience_until_sigterm_and_checks_every_screen() {
    let app = TestApp::spawn(Backend::Embedded).await;
    let poll = app.api.create_poll(&["A", "B", "C"]).await.to_string();
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready.json");
    let watcher = votes_command(
        &format!("http://{}", app.api.addr),
        &[
            "--poll-ids",
            &poll,
            "--connections",
            "0",
            "--subscribers",
            "20",
            "--verify",
            "--duration",
            "300s",
            "--ready-file",
            ready.to_str().unwrap(),
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("loadgen runs");
    // Killed if an assertion fails before the end, rather than watching for 300 s.
    let watcher = KillOnDrop(Some(watcher));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "the viewers never said they were in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let said: Value = serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    assert_eq!(said["connected"], 20, "{said}");

    let votes = loadgen(
        &app,
        &[
            "--poll-ids",
            &poll,
            "--count",
            "150",
            "--connections",
            "3",
            "--rate",
            "300",
            "--verify",
        ],
    );
    assert_eq!(votes["accepted"], 150, "{votes}");
    assert_eq!(votes["verification"]["exact"], true);

    let mut watcher = watcher;
    let watcher = watcher.0.take().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watcher.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let report = report_of(watcher.wait_with_output().unwrap());
    let fanout = &report["fanout"];
    assert_eq!(report["sent"], 0, "it only watched: {report}");
    assert_eq!(
        report["verification"],
        Value::Null,
        "no 202s to compare: {report}"
    );
    assert_eq!(fanout["connected"], 20);
    assert_eq!(
        fanout["final_counts"],
        serde_json::json!({"checked": 20, "shown": 20}),
        "every screen ended at the final counts: {fanout}"
    );
    assert_eq!(fanout["backwards"], 0);
    let host = app.api.addr.to_string();
    assert!(
        fanout["delay_by_target"][&host]["samples"]
            .as_u64()
            .unwrap()
            >= 20,
        "{fanout}"
    );
    assert!(fanout["connect_ms"].as_u64().is_some(), "{fanout}");
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

/// Established TCP connections accepted on `ports` of this machine, by (port, peer
/// address), as the kernel lists them (`/proc/net/tcp`: the servers' side of each socket).
fn accepted_by_peer(ports: &[u16]) -> BTreeMap<(u16, Ipv4Addr), usize> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut seen = BTreeMap::new();
    for line in table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, state) = (fields[1], fields[2], fields[3]);
        if state != "01" {
            continue; // not ESTABLISHED
        }
        let port = u16::from_str_radix(local.split(':').nth(1).unwrap(), 16).unwrap();
        if !ports.contains(&port) {
            continue;
        }
        // The address is printed as the 32-bit word in memory order.
        let ip = u32::from_str_radix(remote.split(':').next().unwrap(), 16).unwrap();
        *seen
            .entry((port, Ipv4Addr::from(ip.to_ne_bytes())))
            .or_default() += 1;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_spread_over_source_addresses_and_servers_and_reports_merge() {
    // Two independent servers, each with poll `poll`: the load generator treats its URLs as
    // one cluster, which for subscribers only needs the poll to exist on each.
    let (a, b) = (
        TestApp::spawn(Backend::Embedded).await,
        TestApp::spawn(Backend::Embedded).await,
    );
    let poll = a.api.create_poll(&["x", "y"]).await;
    assert_eq!(b.api.create_poll(&["x", "y"]).await, poll);
    let poll = poll.to_string();
    let ports = [a.api.addr.port(), b.api.addr.port()];
    let urls = format!("http://{},http://{}", a.api.addr, b.api.addr);
    let sources: Vec<Ipv4Addr> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .map(|s| s.parse().unwrap())
        .to_vec();

    let mut run = votes_command(
        &urls,
        &[
            "--source-addrs",
            "127.0.0.2,127.0.0.3,127.0.0.4",
            "--poll-ids",
            &poll,
            "--subscribers",
            "60",
            "--count",
            "30",
            "--connections",
            "2",
            "--quiet",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("loadgen runs");
    // While it runs: the most connections each server held from each address at once.
    let mut most = BTreeMap::<(u16, Ipv4Addr), usize>::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while run.try_wait().unwrap().is_none() && Instant::now() < deadline {
        for (pair, n) in accepted_by_peer(&ports) {
            let held = most.entry(pair).or_default();
            *held = (*held).max(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = report_of(run.wait_with_output().unwrap());
    for port in ports {
        for &source in &sources {
            let held = most.get(&(port, source)).copied().unwrap_or(0);
            // 60 subscribers over 2 servers × 3 addresses, and maybe a vote connection.
            assert!(
                held >= 10,
                "server :{port} held {held} connections from {source}: {most:?}"
            );
        }
    }
    let fanout = &report["fanout"];
    assert_eq!(fanout["connected"], 60, "{report}");
    for port in ports {
        assert_eq!(
            fanout["by_target"][format!("127.0.0.1:{port}")],
            30,
            "{fanout}"
        );
    }
    for source in &sources {
        assert_eq!(fanout["by_source"][source.to_string()], 20, "{fanout}");
    }
    assert_eq!(
        report["accepted"], 30,
        "votes went to both servers: {report}"
    );
    let (pa, pb) = (
        a.api.poll(poll.parse().unwrap()).await,
        b.api.poll(poll.parse().unwrap()).await,
    );
    assert!(pa["totalVotes"].as_i64().unwrap() + pb["totalVotes"].as_i64().unwrap() <= 30);

    // A second load generator, and the two reports merged.
    let second = report_of(
        votes_command(
            &format!("http://{}", a.api.addr),
            &[
                "--source-addrs",
                "2",
                "--poll-ids",
                &poll,
                "--subscribers",
                "4",
                "--count",
                "20",
                "--connections",
                "1",
                "--quiet",
            ],
        )
        .output()
        .unwrap(),
    );
    assert_eq!(second["fanout"]["by_source"]["127.0.0.1"], 2, "{second}");
    let dir = tempfile::tempdir().unwrap();
    let (first_path, second_path) = (dir.path().join("a.json"), dir.path().join("b.json"));
    std::fs::write(&first_path, report.to_string()).unwrap();
    std::fs::write(&second_path, second.to_string()).unwrap();
    let merged = report_of(
        Command::new(env!("CARGO_BIN_EXE_pollcast-loadgen"))
            .arg("merge")
            .args([&first_path, &second_path])
            .arg("--json")
            .output()
            .unwrap(),
    );
    assert_eq!(merged["processes"], 2, "{merged}");
    assert_eq!(merged["sent"], 50);
    assert_eq!(merged["accepted"], 50);
    assert_eq!(merged["connections"], 3);
    assert_eq!(merged["latency"]["samples"], 50, "histograms merged");
    let slowest = |r: &Value| r["latency"]["max_ms"].as_f64().unwrap();
    assert!(slowest(&merged) >= slowest(&report).max(slowest(&second)) * 0.99);
    assert_eq!(merged["fanout"]["subscribers"], 64);
    assert_eq!(merged["fanout"]["connected"], 64);
    assert_eq!(merged["fanout"]["by_source"]["127.0.0.2"], 22, "{merged}");
    assert_eq!(
        merged["fanout"]["by_target"][format!("127.0.0.1:{}", ports[0])],
        34
    );
    let url = merged["url"].as_str().unwrap();
    assert!(url.contains(&b.api.addr.to_string()) && url.contains(&a.api.addr.to_string()));
    assert!(merged["verification"].is_null(), "neither run verified");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn votes_cut_off_in_flight_are_retried_with_their_vote_id_and_subscribers_come_back() {
    // One pollcast reached two ways: through a proxy that the test cuts, as a process going
    // away drops its connections with requests in flight (some taken, their 202 lost), and
    // directly, the next --url. A vote retried with its voteId must count once, not twice.
    let app = TestApp::spawn(Backend::Embedded).await;
    let proxy = TcpProxy::start(app.api.addr).await;
    let urls = format!("http://{},http://{}", proxy.addr, app.api.addr);
    let run = votes_command(
        &urls,
        &[
            "--duration",
            "4s",
            "--connections",
            "4",
            "--polls",
            "3",
            "--subscribers",
            "12",
            "--watch",
            "all",
            "--reconnect",
            "--retries",
            "6",
            "--verify",
            "--quiet",
        ],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("loadgen runs");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    proxy.restore();
    let report = report_of(run.wait_with_output().unwrap());

    let verification = &report["verification"];
    assert_eq!(verification["exact"], true, "{report}");
    assert_eq!(
        (&verification["lost"], &verification["doubled"]),
        (&0.into(), &0.into())
    );
    let retry = &report["retry"];
    let cut_off =
        retry["first_errors"].as_u64().unwrap() + retry["first_not_sent"].as_u64().unwrap();
    assert!(cut_off >= 1, "votes on the cut connections failed: {retry}");
    assert!(retry["retries"].as_u64().unwrap() >= 1, "{retry}");
    assert_eq!(
        retry["unresolved"], 0,
        "every retry found the other way: {retry}"
    );
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    let (_, polls) = app.api.get("/polls").await;
    let counted: u64 = polls
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["totalVotes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        counted,
        report["accepted"].as_u64().unwrap(),
        "the server agrees"
    );

    // Half the subscribers watched through the proxy: each came back on the other way.
    let fanout = &report["fanout"];
    assert_eq!(fanout["connected"], 12, "{fanout}");
    assert!(fanout["disconnects"].as_u64().unwrap() >= 6, "{fanout}");
    assert_eq!(fanout["reconnects"], fanout["disconnects"], "{fanout}");
    assert_eq!(fanout["live_at_end"], 12, "{fanout}");
    assert_eq!(fanout["backwards"], 0, "{fanout}");
    assert_eq!(fanout["stall"]["polls_watched"], 3, "{fanout}");
}
