//! Headless Chromium driven over WebDriver: Debian's chromedriver, started by the test on a
//! free port and killed with everything it started when the test ends, pass or fail.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tempfile::TempDir;

use crate::helpers::SETTLE;

const DEFAULT_CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

/// A desktop window and a small phone (iPhone SE class: the narrowest common screen).
pub const DESKTOP: (u32, u32) = (1280, 900);
pub const PHONE: (u32, u32) = (375, 812);

/// Where screenshots go: `target/browser/`, beside the build output, so CI can keep them.
pub fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("browser");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

fn required_binary(var: &str, default: &str) -> PathBuf {
    let path = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.into()));
    assert!(
        path.is_file(),
        "{} not found (set {var} to use another path). The browser tests need Debian's \
         Chromium and its driver: `apt-get install chromium chromium-driver`, or run the tests \
         with scripts/test, which installs them.",
        path.display()
    );
    path
}

/// A chromedriver process; it and the browsers it launched are killed on drop.
struct Chromedriver {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Chromedriver {
    fn start(dir: &Path) -> Self {
        let binary = required_binary("POLLCAST_TEST_CHROMEDRIVER", DEFAULT_CHROMEDRIVER);
        let addr = free_port();
        let log = dir.join("chromedriver.log");
        let child = Command::new(&binary)
            .arg(format!("--port={}", addr.port()))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that drop also reaches the Chromium processes, which
            // would otherwise outlive a killed chromedriver.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut driver = Self { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = driver.child.try_wait() {
                panic!(
                    "chromedriver exited at start ({status}):\n{}",
                    driver.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on {addr}:\n{}",
                driver.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        driver
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Chromedriver {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One headless Chromium window.
pub struct Browser {
    pub client: Client,
    name: &'static str,
    // Field order is drop order: the driver dies before its profile directory is removed.
    driver: Chromedriver,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver and a browser; `name` prefixes failure screenshots.
    pub async fn start(name: &'static str) -> Self {
        let chromium = required_binary("POLLCAST_TEST_CHROMIUM", DEFAULT_CHROMIUM);
        let profile = tempfile::tempdir().expect("profile dir");
        let driver = Chromedriver::start(profile.path());
        let (width, height) = DESKTOP;
        let caps = json!({
            "browserName": "chrome",
            // Console messages, read back by `console_errors`.
            "goog:loggingPrefs": { "browser": "ALL" },
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().join("chromium").display()),
                    // The test talks to loopback only; Chromium's own services stay off.
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--lang=en-US",
                ],
            },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{}", driver.addr))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not start Chromium: {e}\n{}",
                    driver.log_text()
                )
            });
        Self {
            client,
            name,
            driver,
            _profile: profile,
        }
    }

    /// Runs `script` (a function body: it must `return`) in the page.
    pub async fn js(&self, script: &str) -> Value {
        match self.client.execute(script, vec![]).await {
            Ok(value) => value,
            Err(e) => panic!(
                "{}",
                self.failure(&format!("script failed: {e}\n{script}")).await
            ),
        }
    }

    /// Waits until `script` returns something truthy, and returns it.
    pub async fn eventually(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + SETTLE;
        loop {
            let value = self.js(script).await;
            if truthy(&value) {
                return value;
            }
            if Instant::now() > deadline {
                let why = format!("waited {SETTLE:?} for {what}; last: {value}");
                panic!("{}", self.failure(&why).await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The element with this `data-testid`.
    pub async fn by_test_id(&self, id: &str) -> fantoccini::elements::Element {
        let selector = format!("[data-testid=\"{id}\"]");
        match self.client.find(Locator::Css(&selector)).await {
            Ok(element) => element,
            Err(e) => panic!(
                "{}",
                self.failure(&format!("no element {selector}: {e}")).await
            ),
        }
    }

    pub async fn click(&self, id: &str) {
        if let Err(e) = self.by_test_id(id).await.click().await {
            panic!("{}", self.failure(&format!("clicking {id}: {e}")).await);
        }
    }

    /// Types into a field as a person would (key events), replacing what it held.
    pub async fn type_into(&self, element: &fantoccini::elements::Element, text: &str) {
        let result = async {
            element.clear().await?;
            element.send_keys(text).await
        };
        if let Err(e) = result.await {
            panic!("{}", self.failure(&format!("typing {text:?}: {e}")).await);
        }
    }

    pub async fn resize(&self, (width, height): (u32, u32)) {
        if let Err(e) = self.client.set_window_size(width, height).await {
            let why = format!("resizing to {width}x{height}: {e}");
            panic!("{}", self.failure(&why).await);
        }
    }

    /// Errors the page logged to the console since the last call (script errors, policy
    /// violations, failed requests), as chromedriver reports them.
    pub async fn console_errors(&self) -> Vec<Value> {
        let session = self
            .client
            .session_id()
            .await
            .expect("session id")
            .expect("an open session");
        // Not part of W3C WebDriver, hence not in fantoccini: chromedriver's own endpoint.
        let url = format!("http://{}/session/{session}/se/log", self.driver.addr);
        let reply: Value = reqwest::Client::new()
            .post(url)
            .json(&json!({ "type": "browser" }))
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .expect("chromedriver log endpoint")
            .json()
            .await
            .expect("log JSON");
        reply["value"]
            .as_array()
            .expect("log entries")
            .iter()
            .filter(|entry| entry["level"] == "SEVERE")
            .cloned()
            .collect()
    }

    /// Saves a PNG screenshot of the window as `target/browser/<file>`.
    pub async fn screenshot(&self, file: &str) -> PathBuf {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
        let path = screenshot_dir().join(file);
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    /// A failure message with what the page showed; keeps a screenshot of it.
    pub async fn failure(&self, why: &str) -> String {
        let shot = match self.client.screenshot().await {
            Ok(png) => {
                let path = screenshot_dir().join(format!("{}-failure.png", self.name));
                std::fs::write(&path, png)
                    .map(|()| path.display().to_string())
                    .unwrap_or_else(|e| format!("(not written: {e})"))
            }
            Err(e) => format!("(none: {e})"),
        };
        let text = self
            .client
            .execute(
                "return document.body ? document.body.innerText : ''",
                vec![],
            )
            .await
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .unwrap_or_default();
        format!("{why}\nscreenshot: {shot}\npage text:\n{text}")
    }

    /// Ends the session; the browser exits with it. (Drop kills it in any case.)
    pub async fn close(self) {
        let Self { client, driver, .. } = self;
        let _ = client.close().await;
        drop(driver);
    }
}

fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}
