//! Test harness: a real pollcast per test, in-process ([`TestApp`]) or as the real binary
//! ([`ServerProcess`]), each on port 0 with its own data directory.

#![allow(dead_code)]

pub mod services;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pollcast::startup::Application;
use pollcast::{RawSettings, Settings};
use serde_json::{Value, json};
use tempfile::TempDir;

pub use services::{Backend, Production};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Flush interval used by tests: short, so counts settle quickly.
pub const TEST_FLUSH_MS: u64 = 100;

/// The admin token of test servers.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Longest wait for counts to settle. Generous: a Kafka consumer first joins its group.
pub const SETTLE: Duration = Duration::from_secs(30);

/// An HTTP client for one server.
#[derive(Clone)]
pub struct Api {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl Api {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            token: Some(ADMIN_TOKEN.into()),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        let req = self.http.post(self.url(path));
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// The `/metrics` page, as text.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        resp.text().await.unwrap()
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.http.get(self.url(path)).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Creates a poll and returns its id.
    pub async fn create_poll(&self, options: &[&str]) -> i64 {
        let resp = self
            .post("/polls")
            .json(&json!({ "question": "Which one?", "options": options }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201, "creating a poll");
        resp.json::<Value>().await.unwrap()["id"].as_i64().unwrap()
    }

    /// Creates a poll from a whole `POST /polls` body and returns the 201 body.
    pub async fn create_poll_with(&self, body: Value) -> Value {
        let resp = self.post("/polls").json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 201, "creating {body}");
        resp.json().await.unwrap()
    }

    /// Closes a poll (with the admin token) and returns the 200 body.
    pub async fn close_poll(&self, poll: i64) -> Value {
        let resp = self
            .post(&format!("/polls/{poll}/close"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "closing poll {poll}");
        resp.json().await.unwrap()
    }

    /// Posts a vote; returns the status and body.
    pub async fn vote(&self, poll: i64, option: i64, user: &str) -> (u16, Value) {
        self.vote_body(json!({ "pollId": poll, "optionId": option, "userId": user }))
            .await
    }

    pub async fn vote_body(&self, body: Value) -> (u16, Value) {
        let resp = self.post("/vote").json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn poll(&self, poll: i64) -> Value {
        let (status, body) = self.get(&format!("/polls/{poll}")).await;
        assert_eq!(status, 200, "GET /polls/{poll}: {body}");
        body
    }

    /// Waits until `/readyz` answers 200 (with Kafka: the consumer has joined its group).
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + SETTLE;
        loop {
            let (status, body) = self.get("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not ready after {SETTLE:?}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the poll's total reaches `expected` (flushes are asynchronous), then
    /// returns the poll. Fails after `within` with the last total seen.
    pub async fn wait_for_total(&self, poll: i64, expected: i64, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let body = self.poll(poll).await;
            let total = body["totalVotes"].as_i64().unwrap();
            if total == expected {
                return body;
            }
            assert!(
                total < expected,
                "poll {poll} counted {total} votes, more than the {expected} expected"
            );
            assert!(
                Instant::now() < deadline,
                "poll {poll} counted {total} of {expected} votes after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Count of one option.
    pub fn votes_of(poll: &Value, option: i64) -> i64 {
        poll["options"]
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["id"] == option)
            .map(|o| o["votes"].as_i64().unwrap())
            .unwrap()
    }
}

/// Settings for a test server with its data under `dir`.
pub fn test_settings(dir: &Path) -> RawSettings {
    let mut settings = RawSettings::default();
    settings.http.addr = "127.0.0.1:0".into();
    settings.store.url = format!("sqlite://{}", dir.join("pollcast.db").display());
    settings.log.path = dir.join("log");
    settings.aggregator.flush_interval_ms = TEST_FLUSH_MS;
    // Short, but still a grace: closing tests see the wait for late votes.
    settings.aggregator.close_grace_ms = 300;
    settings.admin.token = Some(ADMIN_TOKEN.into());
    // Load tests send thousands of votes from one address; the limits have their own tests.
    settings.rate_limit.per_ip_per_sec = 0;
    settings.rate_limit.per_user_per_sec = 0;
    settings.supervision.backoff_initial_ms = 20;
    settings.supervision.backoff_max_ms = 200;
    settings
}

/// With `RUST_LOG` set, in-process servers log to the test's output (nextest shows it for
/// failing tests).
fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Where a test's pollcast keeps its state: a data directory, and for the production
/// backends its own database, Redis key prefix, topics and consumer group.
pub struct TestEnv {
    pub dir: TempDir,
    pub production: Option<Production>,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> Self {
        let production = match backend {
            Backend::Embedded => None,
            Backend::Production => Some(Production::create().await),
        };
        Self {
            dir: tempfile::tempdir().unwrap(),
            production,
        }
    }

    pub fn settings(&self) -> RawSettings {
        let mut settings = test_settings(self.dir.path());
        if let Some(p) = &self.production {
            p.apply(&mut settings);
        }
        settings
    }

    /// Environment variables that give the binary the same state.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = data_env(self.dir.path());
        if let Some(p) = &self.production {
            env.extend(p.env());
        }
        env
    }

    /// User ids in the ledger of a poll, read from the store itself.
    pub async fn ledger(&self, poll: i64) -> Vec<String> {
        match &self.production {
            Some(p) => p.ledger(poll).await,
            None => services::sqlite_ledger(self.dir.path().join("pollcast.db"), poll).await,
        }
    }
}

/// A pollcast running inside the test process.
pub struct TestApp {
    pub api: Api,
    /// The admin listener, when the test configured `http.admin_addr`.
    pub admin: Option<SocketAddr>,
    pub env: TestEnv,
    stop: CancellationToken,
    task: JoinHandle<Result<(), pollcast::startup::Stopped>>,
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, configure: impl FnOnce(&mut RawSettings)) -> Self {
        Self::start(TestEnv::new(backend).await, configure).await
    }

    /// Starts a pollcast on `env` (again, after [`TestApp::shutdown`]).
    pub async fn start(env: TestEnv, configure: impl FnOnce(&mut RawSettings)) -> Self {
        init_logs();
        let mut settings = env.settings();
        configure(&mut settings);
        let settings = Settings::parse(settings).expect("test settings are valid");
        let app = Application::build(settings).await.expect("app starts");
        let api = Api::new(app.local_addr());
        let admin = app.admin_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        api.wait_ready().await;
        Self {
            api,
            admin,
            env,
            stop,
            task,
        }
    }

    /// Starts a pollcast without waiting for `/readyz` (which plain HTTP cannot reach when
    /// the server speaks TLS); returns its address.
    pub async fn start_without_waiting(
        backend: Backend,
        configure: impl FnOnce(&mut RawSettings),
    ) -> RunningApp {
        init_logs();
        let env = TestEnv::new(backend).await;
        let mut settings = env.settings();
        configure(&mut settings);
        let settings = Settings::parse(settings).expect("test settings are valid");
        let app = Application::build(settings).await.expect("app starts");
        let addr = app.local_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run_until_stopped(stop.clone().cancelled_owned()));
        RunningApp {
            addr,
            _env: env,
            _stop: stop.drop_guard(),
            _task: task,
        }
    }

    /// Graceful shutdown, as on SIGTERM; returns the state for a restart.
    pub async fn shutdown(self) -> TestEnv {
        self.stop.cancel();
        self.task
            .await
            .unwrap()
            .expect("graceful shutdown succeeds");
        self.env
    }
}

/// A pollcast started by [`TestApp::start_without_waiting`]; stopped when dropped.
pub struct RunningApp {
    pub addr: SocketAddr,
    _env: TestEnv,
    _stop: tokio_util::sync::DropGuard,
    _task: JoinHandle<Result<(), pollcast::startup::Stopped>>,
}

/// The real `pollcast` binary, with JSON logs captured.
pub struct ServerProcess {
    pub api: Api,
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

/// The pollcast binary under test: cargo's, or `POLLCAST_TEST_BINARY` (a copy kept apart
/// from a target directory that other checkouts' builds also write to).
pub fn binary() -> PathBuf {
    std::env::var_os("POLLCAST_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_pollcast")))
}

/// Environment that points the binary at `dir` for all its state.
pub fn data_env(dir: &Path) -> Vec<(String, String)> {
    vec![
        ("POLLCAST__HTTP__ADDR".into(), "127.0.0.1:0".into()),
        (
            "POLLCAST__STORE__URL".into(),
            format!("sqlite://{}", dir.join("pollcast.db").display()),
        ),
        (
            "POLLCAST__LOG__PATH".into(),
            dir.join("log").display().to_string(),
        ),
        (
            "POLLCAST__AGGREGATOR__FLUSH_INTERVAL_MS".into(),
            TEST_FLUSH_MS.to_string(),
        ),
        (
            "POLLCAST__SUPERVISION__BACKOFF_INITIAL_MS".into(),
            "20".into(),
        ),
        ("POLLCAST__SUPERVISION__BACKOFF_MAX_MS".into(), "200".into()),
        ("POLLCAST__ADMIN__TOKEN".into(), ADMIN_TOKEN.into()),
        ("POLLCAST__RATE_LIMIT__PER_IP_PER_SEC".into(), "0".into()),
        ("POLLCAST__RATE_LIMIT__PER_USER_PER_SEC".into(), "0".into()),
    ]
}

fn command(dir: &Path, env: &[(String, String)], args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.current_dir(dir)
        .args(["--log-format", "json"])
        .args(args)
        .env_remove("RUST_LOG")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

impl ServerProcess {
    /// Starts the binary on `env`'s state and waits for its "listening" line.
    pub fn start(env: &TestEnv, extra_env: &[(&str, &str)]) -> Self {
        Self::start_without(env, extra_env, &[])
    }

    /// Like [`ServerProcess::start`], leaving the variables in `unset` out of the environment.
    pub fn start_without(env: &TestEnv, extra_env: &[(&str, &str)], unset: &[&str]) -> Self {
        Self::launch(env, extra_env, unset, None)
    }

    /// Like [`ServerProcess::start`], with the open-file limit (`RLIMIT_NOFILE`) set to
    /// `(soft, hard)` before the binary runs (the hard one can only be lowered).
    pub fn start_with_nofile(
        env: &TestEnv,
        extra_env: &[(&str, &str)],
        nofile: (u64, u64),
    ) -> Self {
        Self::launch(env, extra_env, &[], Some(nofile))
    }

    fn launch(
        env: &TestEnv,
        extra_env: &[(&str, &str)],
        unset: &[&str],
        nofile: Option<(u64, u64)>,
    ) -> Self {
        let dir = env.dir.path();
        let mut env = env.env();
        env.extend(
            extra_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        env.retain(|(k, _)| !unset.contains(&k.as_str()));
        let mut cmd = command(dir, &env, &[]);
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: setrlimit is async-signal-safe and `limit` is a plain value copied in.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("binary starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(event) = serde_json::from_str::<Value>(&line)
                    && event["message"] == "listening"
                {
                    let _ = addr_tx.send(event["addr"].as_str().unwrap().parse().unwrap());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let addr: SocketAddr = match addr_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "pollcast did not report listening; output:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Self {
            api: Api::new(addr),
            child,
            logs,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "pollcast did not exit within {within:?}; output:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn output(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion (for start-up failures) and returns its status and output.
pub fn run_to_exit(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (ExitStatus, String) {
    let mut all = data_env(dir);
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    output_of(command(dir, &all, args))
}

fn output_of(mut command: Command) -> (ExitStatus, String) {
    let out = command.output().expect("binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// Runs the binary with `args` on `env`'s state to completion.
pub fn run_to_exit_in(env: &TestEnv, args: &[&str]) -> (ExitStatus, String) {
    output_of(command(env.dir.path(), &env.env(), args))
}

/// Declares each listed `async fn name(backend: Backend)` as two tests, `embedded::name` and
/// `production::name`: the same behaviour, proven on both sets of adapters.
#[macro_export]
macro_rules! contract_tests {
    ($($name:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Embedded).await
                }
            )*
        }
        mod production {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Production).await
                }
            )*
        }
    };
}
