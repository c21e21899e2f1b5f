//! The open-file limit, on the real binary: raised at start, and what happens when the
//! connections use it all up.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{Backend, ServerProcess, TestEnv};

/// The JSON log lines whose message starts with `prefix`.
fn log_lines(server: &ServerProcess, prefix: &str) -> Vec<Value> {
    server
        .output()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["message"].as_str().is_some_and(|m| m.starts_with(prefix)))
        .collect()
}

/// `Max open files` of `/proc/<pid>/limits`: (soft, hard).
fn proc_nofile(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (nums[0], nums[1])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_raises_the_soft_open_file_limit_to_the_hard_one_and_warns_when_it_is_short() {
    let env = TestEnv::new(Backend::Embedded).await;
    let server = ServerProcess::start_with_nofile(&env, &[], (256, 1024));
    assert_eq!(
        proc_nofile(server.pid()),
        (1024, 1024),
        "soft raised to hard"
    );
    let limit = &log_lines(&server, "open-file limit")[0];
    assert_eq!(limit["soft_before"], 256, "{limit}");
    assert_eq!(limit["soft"], 1024, "{limit}");
    assert_eq!(limit["hard"], 1024, "{limit}");
    let reserve = limit["reserve"].as_u64().unwrap();
    assert!((100..1024).contains(&reserve), "{limit}");
    // The default http.max_connections (50,000) does not fit in 1024.
    let warning = log_lines(&server, "the open-file limit is below");
    assert_eq!(warning.len(), 1, "{}", server.output());
    assert_eq!(warning[0]["level"], "WARN");
    assert_eq!(warning[0]["max_connections"], 50_000);
    assert_eq!(warning[0]["connections_that_fit"], 1024 - reserve);
    assert!(
        warning[0]["reserve_parts"]
            .as_str()
            .unwrap()
            .contains("store="),
        "{}",
        warning[0]
    );
    drop(server);

    let env = TestEnv::new(Backend::Embedded).await;
    let server = ServerProcess::start_with_nofile(
        &env,
        &[("POLLCAST__HTTP__MAX_CONNECTIONS", "500")],
        (256, 1024),
    );
    assert_eq!(log_lines(&server, "open-file limit").len(), 1);
    assert!(
        log_lines(&server, "the open-file limit is below").is_empty(),
        "500 connections and the reserve fit in 1024: {}",
        server.output()
    );
}

/// An HTTP/1.1 keep-alive connection made by hand, so that the test knows it is one socket.
struct KeepAlive {
    reader: BufReader<TcpStream>,
}

impl KeepAlive {
    fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            reader: BufReader::new(stream),
        }
    }

    /// `GET path`; the status and body.
    fn get(&mut self, path: &str) -> (u16, String) {
        write!(
            self.reader.get_mut(),
            "GET {path} HTTP/1.1\r\nHost: pollcast\r\n\r\n"
        )
        .unwrap();
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let (mut length, mut chunked) = (0, false);
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let line = line.trim_end().to_ascii_lowercase();
            if line.is_empty() {
                break;
            }
            if let Some(n) = line.strip_prefix("content-length:") {
                length = n.trim().parse().unwrap();
            }
            if line.starts_with("transfer-encoding:") && line.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let mut size = String::new();
                self.reader.read_line(&mut size).unwrap();
                let size = usize::from_str_radix(size.trim(), 16).unwrap();
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).unwrap();
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else {
            body.resize(length, 0);
            self.reader.read_exact(&mut body).unwrap();
        }
        (status, String::from_utf8(body).unwrap())
    }

    /// `pollcast_accept_errors_total{kind="fd_exhausted"}`.
    fn fd_exhausted(&mut self) -> u64 {
        let (status, metrics) = self.get("/metrics");
        assert_eq!(status, 200);
        metrics
            .lines()
            .find(|l| l.starts_with(r#"pollcast_accept_errors_total{kind="fd_exhausted"}"#))
            .map_or(0, |l| l.rsplit(' ').next().unwrap().parse().unwrap())
    }
}

/// User + system CPU of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_open_connections_are_served_accepting_backs_off_and_recovers() {
    let env = TestEnv::new(Backend::Embedded).await;
    // Why a long header timeout: the flood's silent connections must hold their
    // descriptors for the whole test, not be closed after the default 10 s.
    let server = ServerProcess::start_with_nofile(
        &env,
        &[("POLLCAST__HTTP__HEADER_READ_TIMEOUT_MS", "120000")],
        (256, 256),
    );
    let addr = server.api.addr;
    let mut keep = KeepAlive::open(addr);
    assert_eq!(keep.get("/healthz").0, 200);

    // Connect until accepting has failed and a few hundred more wait in the listen queue
    // (it holds 4096): the server is then out of descriptors with clients still arriving.
    // Why stop at three failed connects in a row as well: a queue that does fill drops
    // every SYN, while one connect can also time out on a loaded machine. Bounded in count
    // and time.
    let mut flood = Vec::new();
    let mut failed_in_a_row = 0;
    let started = Instant::now();
    while flood.len() < 600 && started.elapsed() < Duration::from_secs(60) {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(stream) => {
                flood.push(stream);
                failed_in_a_row = 0;
            }
            Err(_) => {
                failed_in_a_row += 1;
                if failed_in_a_row >= 3 && keep.fd_exhausted() > 0 {
                    break;
                }
            }
        }
    }
    assert!(flood.len() > 256, "{} connections", flood.len());
    assert!(
        keep.fd_exhausted() > 0,
        "accept never failed with EMFILE: {} connections, server holds {} fds; {}",
        flood.len(),
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .unwrap()
            .count(),
        server.output()
    );

    // Exhausted: the open connection is served, and the process does not spin.
    let (errors_before, cpu_before, at) = (
        keep.fd_exhausted(),
        cpu_seconds(server.pid()),
        Instant::now(),
    );
    std::thread::sleep(Duration::from_millis(1_500));
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    let secs = at.elapsed().as_secs_f64();
    let errors = keep.fd_exhausted() - errors_before;
    assert!(
        cpu < 0.25 * secs,
        "{cpu:.2} s of CPU in {secs:.1} s while out of descriptors: spinning"
    );
    assert!(
        errors <= 20,
        "{errors} failed accepts in {secs:.1} s: no backoff"
    );
    for _ in 0..3 {
        assert_eq!(keep.get("/healthz").0, 200, "the open connection is served");
    }
    let warnings = log_lines(&server, "accepting connections fails");
    let exhausted_for = started.elapsed().as_secs_f64();
    assert!(!warnings.is_empty());
    assert!(
        warnings.len() as f64 <= exhausted_for + 2.0,
        "{} warnings in {exhausted_for:.1} s: at most one a second",
        warnings.len()
    );
    assert_eq!(warnings[0]["kind"], "fd_exhausted", "{}", warnings[0]);

    // The flood leaves: new connections are served again (within the longest pause).
    drop(flood);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client.get(server.api.url("/healthz")).send().await {
            Ok(resp) if resp.status() == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "no new connection served after the flood left: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(keep.get("/healthz").0, 200);
    assert!(
        !log_lines(&server, "accepting connections again").is_empty(),
        "{}",
        server.output()
    );
}
