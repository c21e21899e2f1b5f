//! Attacks on the real binary while a normal client keeps voting and watching.
//!
//! Each test starts its own pollcast (embedded backends, small limits), lets a normal client
//! on 127.0.0.1 vote and watch a poll, runs one attack from 127.0.0.2 for a few seconds, and
//! then checks what a live event needs: every normal vote got 202 without a stall, `/healthz`
//! kept answering, the server's memory came back to its level, and every 202 was counted.
//! Each prints one `ATTACK|…` line (what the server did, the normal client's latency, memory)
//! for the table in the closing notes; run with `--no-capture` to see them. Every loop is
//! bounded in count and in time, and all traffic stays on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Api, Backend, SETTLE, ServerProcess, TestEnv};

/// Where the attacks come from: not the normal client's address, as on the internet.
const ATTACKER: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// How long each attack runs while the normal client votes.
const ATTACK: Duration = Duration::from_secs(4);
/// Longest a normal vote may take during an attack before it counts as a stall. Generous on
/// purpose (2 shared cores, other tests running): the p99 printed is the figure to read.
const STALL: Duration = Duration::from_secs(3);
/// How much more memory the server may hold once an attack is over.
const MEMORY_SLACK_KB: u64 = 40 * 1024;

/// The settings every attacked server runs with: small limits, so that an attack reaches
/// them within seconds.
const LIMITS: &[(&str, &str)] = &[
    ("POLLCAST__HTTP__HEADER_READ_TIMEOUT_MS", "1000"),
    ("POLLCAST__HTTP__BODY_READ_TIMEOUT_MS", "1000"),
    ("POLLCAST__HTTP__MAX_CONNECTIONS", "1000"),
    ("POLLCAST__HTTP__MAX_CONNECTIONS_PER_IP", "200"),
];

/// A TCP connection from the attacker's address.
async fn connect_from(server: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ATTACKER.into(), 0))?;
    socket.connect(server).await
}

/// Resident memory of a process, in KiB.
fn rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// What the normal client saw during an attack.
struct Normal {
    latencies: Vec<Duration>,
    refused: Vec<String>,
    health_failures: usize,
    updates: u64,
}

impl Normal {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        sorted[((sorted.len() - 1) as f64 * p).round() as usize]
    }
}

/// Votes (a new user each time, about 25 a second), watches the poll over a WebSocket and
/// checks `/healthz` until `stop`.
async fn normal_client(api: Api, poll: i64, stop: Arc<AtomicBool>) -> Normal {
    let url = format!("ws://{}/ws/polls/{poll}", api.addr);
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade");
    let updates = Arc::new(AtomicU64::new(0));
    let seen = updates.clone();
    let watching = tokio::spawn(async move {
        while let Some(Ok(msg)) = socket.next().await {
            if msg.is_text() {
                seen.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let mut normal = Normal {
        latencies: Vec::new(),
        refused: Vec::new(),
        health_failures: 0,
        updates: 0,
    };
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < 10_000 {
        n += 1;
        let started = Instant::now();
        let user = format!("normal-{n}");
        let vote = tokio::time::timeout(STALL * 3, api.vote(poll, 1 + (n % 2) as i64, &user));
        match vote.await {
            Ok((202, _)) => normal.latencies.push(started.elapsed()),
            Ok((status, body)) => normal.refused.push(format!("{status} {body}")),
            Err(_) => normal.refused.push("no answer".into()),
        }
        if n % 10 == 0 {
            let health = tokio::time::timeout(STALL, api.get("/healthz")).await;
            if !matches!(health, Ok((200, _))) {
                normal.health_failures += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    // The last flush reaches the watcher within a flush interval or two.
    tokio::time::sleep(Duration::from_millis(500)).await;
    watching.abort();
    normal.updates = updates.load(Ordering::Relaxed);
    normal
}

/// The counters of `/metrics` whose names contain one of `names`, as `name{labels} value`.
async fn counters(api: &Api, names: &[&str]) -> String {
    let text = api.metrics().await;
    text.lines()
        .filter(|l| !l.starts_with('#') && names.iter().any(|n| l.contains(n)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates `n` polls of 8 options each, 16 at a time.
async fn create_polls(server: SocketAddr, n: usize) {
    let admin = Api::new(server);
    futures_util::stream::iter(0..n)
        .map(|i| {
            let admin = admin.clone();
            async move {
                let options: Vec<String> =
                    (0..8).map(|o| format!("Option {o} of poll {i}")).collect();
                let body =
                    serde_json::json!({ "question": format!("Poll {i}?"), "options": options });
                admin.create_poll_with(body).await;
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<()>>()
        .await;
}

/// Runs `attack` (bounded by the deadline it is given) against a fresh server while the
/// normal client votes, then checks and reports. `extra` adds settings.
async fn under_attack<F, Fut>(name: &str, extra: &[(&str, &str)], attack: F) -> u64
where
    F: FnOnce(SocketAddr, i64, Instant) -> Fut,
    Fut: std::future::Future<Output = String> + Send + 'static,
{
    let env = TestEnv::new(Backend::Embedded).await;
    let settings: Vec<(&str, &str)> = LIMITS.iter().chain(extra).copied().collect();
    let server = ServerProcess::start(&env, &settings);
    let api = server.api.clone();
    api.wait_ready().await;
    let poll = api.create_poll(&["A", "B"]).await;
    // Warm up: the first votes open the log, the catalog and the aggregator.
    for i in 0..20 {
        assert_eq!(api.vote(poll, 1, &format!("warm-{i}")).await.0, 202);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kb(server.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let normal = tokio::spawn(normal_client(api.clone(), poll, stop.clone()));
    let pid = server.pid();
    let peak = Arc::new(AtomicU64::new(before));
    let sampling = {
        let (peak, stop) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kb(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let deadline = Instant::now() + ATTACK;
    let attacker = tokio::spawn(attack(api.addr, poll, deadline));
    let observed = tokio::time::timeout(ATTACK + Duration::from_secs(20), attacker)
        .await
        .expect("the attack ends by itself")
        .expect("the attack task did not panic");
    // An attack that was cut off early still leaves the normal client its whole window.
    tokio::time::sleep_until(deadline.into()).await;
    stop.store(true, Ordering::Relaxed);
    let normal = normal.await.unwrap();
    sampling.await.unwrap();

    // Memory: what the attack took must be given back (jemalloc returns it within seconds).
    let settle = Instant::now() + Duration::from_secs(15);
    let mut after = rss_kb(pid);
    while after > before + MEMORY_SLACK_KB && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = rss_kb(pid);
    }
    let did = counters(
        &api,
        &[
            "pollcast_connections_refused_total",
            "pollcast_connections_timed_out_total",
            "pollcast_websocket_clients_dropped_total",
            "pollcast_rate_limited_total",
            "route=\"/ws/polls/{id}\",status=\"404\"",
        ],
    )
    .await;
    let accepted = normal.latencies.len() as i64;
    println!(
        "ATTACK|{name}|{observed}|{did}|votes {accepted}, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms|RSS {} MB before, {} MB peak, {} MB after",
        normal.percentile(0.5).as_secs_f64() * 1e3,
        normal.percentile(0.99).as_secs_f64() * 1e3,
        normal.percentile(1.0).as_secs_f64() * 1e3,
        before / 1024,
        peak.load(Ordering::Relaxed) / 1024,
        after / 1024,
    );

    assert!(
        normal.refused.is_empty(),
        "{name}: normal votes refused: {:?}",
        normal.refused
    );
    assert!(accepted >= 20, "{name}: only {accepted} normal votes");
    let slowest = normal.percentile(1.0);
    assert!(slowest < STALL, "{name}: a normal vote took {slowest:?}");
    assert_eq!(normal.health_failures, 0, "{name}: /healthz failed");
    assert!(normal.updates > 0, "{name}: the watcher saw no update");
    assert!(
        after <= before + MEMORY_SLACK_KB,
        "{name}: RSS {before} KiB before, {after} KiB after"
    );
    // Every 202 counted, the warm-up's included.
    let counted = api.wait_for_total(poll, 20 + accepted, SETTLE).await;
    assert_eq!(counted["totalVotes"], 20 + accepted, "{name}");
    // What the attack made the server hold at its worst, in KiB.
    peak.load(Ordering::Relaxed).saturating_sub(before)
}

/// Opens connections from the attacker until `deadline`, at most `limit` at once, each
/// sending `first` and then `drip` every 200 ms; returns what became of them.
async fn hold_connections(
    server: SocketAddr,
    deadline: Instant,
    limit: usize,
    first: &'static [u8],
    drip: &'static [u8],
) -> String {
    let opened = Arc::new(AtomicU64::new(0));
    let closed_by_server = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let mut attempts = 0;
    while Instant::now() < deadline && attempts < 20_000 {
        attempts += 1;
        while tasks.len() >= limit {
            tasks.join_next().await;
        }
        let Ok(mut socket) = connect_from(server).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        let closed = closed_by_server.clone();
        tasks.spawn(async move {
            let _ = socket.write_all(first).await;
            let mut buf = [0u8; 1024];
            while Instant::now() < deadline {
                if !drip.is_empty() && socket.write_all(drip).await.is_err() {
                    closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                match tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        closed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
        });
    }
    tasks.shutdown().await;
    format!(
        "{} connections opened, {} closed by the server",
        opened.load(Ordering::Relaxed),
        closed_by_server.load(Ordering::Relaxed)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_do_not_take_the_voters_slots() {
    under_attack("silent sockets", &[], |server, _, deadline| {
        hold_connections(server, deadline, 2000, b"", b"")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte_then_silence_does_not_take_the_voters_slots() {
    under_attack("one byte then silence", &[], |server, _, deadline| {
        hold_connections(server, deadline, 2000, b"P", b"")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_request_head_is_cut_off() {
    under_attack("slowloris (head)", &[], |server, _, deadline| {
        hold_connections(
            server,
            deadline,
            2000,
            b"GET /polls HTTP/1.1\r\nhost: x\r\n",
            b"x",
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_on_the_request_body_is_cut_off() {
    under_attack("slowloris (body)", &[], |server, _, deadline| {
        hold_connections(
            server,
            deadline,
            2000,
            b"POST /vote HTTP/1.1\r\nhost: x\r\ncontent-length: 10000\r\n\r\n{",
            b" ",
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_websockets_from_one_address_get_only_its_share() {
    under_attack(
        "3,000 WebSockets from one IP",
        &[],
        |server, poll, deadline| async move {
            let mut held = Vec::new();
            let mut refused = 0;
            for _ in 0..3000 {
                if Instant::now() >= deadline {
                    break;
                }
                let Ok(stream) = connect_from(server).await else {
                    refused += 1;
                    continue;
                };
                let url = format!("ws://{server}/ws/polls/{poll}");
                match tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio_tungstenite::client_async(url, stream),
                )
                .await
                {
                    Ok(Ok((socket, _))) => held.push(socket),
                    _ => refused += 1,
                }
            }
            let open = held.len();
            tokio::time::sleep_until(deadline.into()).await;
            drop(held);
            format!("{open} upgraded and held, {refused} refused")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_fragmented_websocket_frames_close_only_their_socket() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    under_attack(
        "oversized and fragmented WebSocket frames",
        &[],
        |server, poll, deadline| async move {
            let (mut closed, mut sockets) = (0, 0);
            while Instant::now() < deadline && sockets < 400 {
                sockets += 1;
                let Ok(stream) = connect_from(server).await else {
                    continue;
                };
                let url = format!("ws://{server}/ws/polls/{poll}");
                let Ok((mut socket, _)) = tokio_tungstenite::client_async(url, stream).await else {
                    continue;
                };
                let sent = if sockets % 2 == 0 {
                    // One 1 MiB message.
                    socket.send(Message::binary(vec![0u8; 1 << 20])).await
                } else {
                    // A message that never ends: fragments of 1 KiB, each not final.
                    let mut result = Ok(());
                    for _ in 0..64 {
                        let frame =
                            Frame::message(vec![b'f'; 1024], OpCode::Data(Data::Continue), false);
                        result = socket.send(Message::Frame(frame)).await;
                        if result.is_err() {
                            break;
                        }
                    }
                    result
                };
                let ended = sent.is_err()
                    || matches!(
                        tokio::time::timeout(Duration::from_secs(2), async {
                            loop {
                                match socket.next().await {
                                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                                    Some(Ok(_)) => {}
                                }
                            }
                        })
                        .await,
                        Ok(())
                    );
                if ended {
                    closed += 1;
                }
            }
            format!("{sockets} sockets, {closed} closed by the server")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_garbage_and_header_floods_are_refused() {
    under_attack(
        "pipelined garbage and header floods",
        &[],
        |server, _, deadline| async move {
            let mut answers = std::collections::BTreeMap::<String, u64>::new();
            let mut n = 0u64;
            while Instant::now() < deadline && n < 5_000 {
                n += 1;
                let Ok(mut socket) = connect_from(server).await else {
                    continue;
                };
                let payload: Vec<u8> = match n % 4 {
                    // Requests back to back, then bytes that are no HTTP at all.
                    0 => [&b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n"[..]; 50]
                        .concat()
                        .into_iter()
                        .chain((0..4096).map(|i| (i * 7 % 251) as u8))
                        .collect(),
                    // 2,000 headers.
                    1 => {
                        let mut head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n".to_vec();
                        for i in 0..2000 {
                            head.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
                        }
                        head.extend_from_slice(b"\r\n");
                        head
                    }
                    // One header of 1 MiB.
                    2 => [
                        &b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: "[..],
                        &vec![b'a'; 1 << 20],
                        b"\r\n\r\n",
                    ]
                    .concat(),
                    _ => (0..65_536).map(|i| (i * 31 % 256) as u8).collect(),
                };
                let _ = socket.write_all(&payload).await;
                let mut buf = vec![0u8; 64 * 1024];
                let answer =
                    match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buf)).await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => "closed".to_owned(),
                        Ok(Ok(k)) => String::from_utf8_lossy(&buf[..k.min(12)]).into_owned(),
                        Err(_) => "no answer in 2 s".to_owned(),
                    };
                *answers.entry(answer).or_default() += 1;
            }
            format!("{n} connections: {answers:?}")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_unknown_poll_websockets_leaves_no_memory_behind() {
    under_attack(
        "unknown-poll WebSocket sweep",
        &[],
        |server, _, deadline| async move {
            let client = reqwest::Client::builder()
                .local_address(std::net::IpAddr::from(ATTACKER))
                .build()
                .unwrap();
            let mut not_found = 0u64;
            let mut id: i64 = 1_000_000;
            while Instant::now() < deadline && id < 1_000_000 + 50_000 {
                id += 1;
                let response = client
                    .get(format!("http://{server}/ws/polls/{id}"))
                    .header("connection", "upgrade")
                    .header("upgrade", "websocket")
                    .header("sec-websocket-version", "13")
                    .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
                    .send()
                    .await;
                if response.is_ok_and(|r| r.status() == 404) {
                    not_found += 1;
                }
            }
            format!("{not_found} unknown polls asked for, each 404")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_that_ping_and_never_read_are_closed() {
    under_attack(
        "WebSocket pings, never reading",
        &[],
        |server, poll, deadline| async move {
            let mut flooders = tokio::task::JoinSet::new();
            for _ in 0..2 {
                let stream = connect_from(server).await.unwrap();
                let url = format!("ws://{server}/ws/polls/{poll}");
                let (socket, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
                flooders.spawn(async move {
                    let (mut tx, _never_read) = socket.split();
                    let payload = tokio_tungstenite::tungstenite::Bytes::from(vec![b'p'; 125]);
                    let mut sent = 0u64;
                    while Instant::now() < deadline && sent < 5_000_000 {
                        let ping = tx.send(Message::Ping(payload.clone()));
                        match tokio::time::timeout(Duration::from_secs(1), ping).await {
                            Ok(Ok(())) => sent += 1,
                            _ => return (sent, true),
                        }
                    }
                    (sent, false)
                });
            }
            let mut outcome = Vec::new();
            while let Some(Ok((sent, cut))) = flooders.join_next().await {
                outcome.push(format!(
                    "{sent} pings sent, {}",
                    if cut { "then cut off" } else { "never cut off" }
                ));
            }
            outcome.join("; ")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_polls_as_fast_as_the_rate_limit_allows_does_not_stall_votes() {
    let limits = [
        ("POLLCAST__RATE_LIMIT__PER_IP_PER_SEC", "200"),
        ("POLLCAST__RATE_LIMIT__PER_IP_BURST", "2000"),
    ];
    under_attack(
        "GET /polls flood within the rate limit (1,000 polls)",
        &limits,
        |server, _, deadline| async move {
            create_polls(server, 1000).await;
            let client = reqwest::Client::builder()
                .local_address(std::net::IpAddr::from(ATTACKER))
                .pool_max_idle_per_host(1000)
                .build()
                .unwrap();
            let mut readers = tokio::task::JoinSet::new();
            for _ in 0..64 {
                let client = client.clone();
                readers.spawn(async move {
                    let mut statuses = std::collections::BTreeMap::<u16, u64>::new();
                    let mut n = 0;
                    while Instant::now() < deadline && n < 100_000 {
                        n += 1;
                        let url = format!("http://{server}/polls?limit=200");
                        if let Ok(response) = client.get(url).send().await {
                            let status = response.status().as_u16();
                            let _ = response.bytes().await;
                            *statuses.entry(status).or_default() += 1;
                        }
                    }
                    statuses
                });
            }
            let mut total = std::collections::BTreeMap::<u16, u64>::new();
            while let Some(Ok(statuses)) = readers.join_next().await {
                for (status, n) in statuses {
                    *total.entry(status).or_default() += n;
                }
            }
            format!("64 readers of 200-poll pages: {total:?}")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_clients_that_never_read_their_responses_hold_bounded_memory() {
    under_attack(
        "HTTP/2 streams of 200-poll pages, never read",
        &[],
        |server, _, deadline| async move {
            use http_body_util::Empty;
            use hyper_util::rt::{TokioExecutor, TokioIo};
            create_polls(server, 400).await;
            let (mut streams, mut refused) = (0, 0);
            let mut held = Vec::new();
            for _ in 0..40 {
                let Ok(stream) = connect_from(server).await else {
                    refused += 1;
                    continue;
                };
                let Ok((mut sender, conn)) = hyper::client::conn::http2::handshake(
                    TokioExecutor::new(),
                    TokioIo::new(stream),
                )
                .await
                else {
                    refused += 1;
                    continue;
                };
                held.push(tokio::spawn(async move {
                    let _ = conn.await;
                }));
                for _ in 0..16 {
                    let request = hyper::Request::get(format!("http://{server}/polls?limit=200"))
                        .body(Empty::<bytes::Bytes>::new())
                        .unwrap();
                    // The response's head arrives; its body is never read, so flow control
                    // stops the server at its buffers.
                    match tokio::time::timeout(Duration::from_secs(2), sender.send_request(request))
                        .await
                    {
                        Ok(Ok(response)) => {
                            streams += 1;
                            held.push(tokio::spawn(async move {
                                let _unread = response;
                                std::future::pending::<()>().await
                            }));
                        }
                        _ => refused += 1,
                    }
                }
                held.push(tokio::spawn(async move {
                    let _sender = sender;
                    std::future::pending::<()>().await
                }));
            }
            tokio::time::sleep_until(deadline.into()).await;
            for task in held {
                task.abort();
            }
            format!("{streams} streams opened and left unread, {refused} refused")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_socketio_websocket_messages_are_read_slowly_and_not_held() {
    let grew = under_attack(
        "Socket.IO WebSocket, 60 MiB messages",
        &[],
        |server, _, deadline| async move {
            let mut senders = tokio::task::JoinSet::new();
            for _ in 0..2 {
                let stream = connect_from(server).await.unwrap();
                let url = format!("ws://{server}/socket.io/?EIO=4&transport=websocket");
                let (mut socket, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
                senders.spawn(async move {
                    // Engine.IO's open packet, then one message as large as tungstenite allows.
                    let _ = tokio::time::timeout(Duration::from_secs(2), socket.next()).await;
                    let huge = Message::text(format!("4{}", "x".repeat(60 << 20)));
                    let until = tokio::time::Instant::from_std(deadline);
                    match tokio::time::timeout_at(until, socket.send(huge)).await {
                        Ok(Ok(())) => "sent whole",
                        Ok(Err(_)) => "cut off",
                        Err(_) => "still sending at the end",
                    }
                });
            }
            let mut outcome = Vec::new();
            while let Some(Ok(what)) = senders.join_next().await {
                outcome.push(what);
            }
            format!("2 clients: {outcome:?}")
        },
    )
    .await;
    // Two 60 MiB messages held would be 120 MiB; read at 4 KiB/s they stay a few hundred KiB.
    assert!(
        grew < 20 * 1024,
        "the server grew by {grew} KiB at its peak"
    );
}
