//! `[http]`: the listeners, their limits and timeouts; and `[socketio]`, served on them.

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::ConfigError;

/// Connections from one address when `http.max_connections_per_ip` is unset and no proxy
/// is configured. Why this many: an audience on a venue's network often shares one address
/// behind NAT, and each viewer holds a WebSocket; one client still cannot take every slot.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 5_000;

/// `[http]` as written.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawHttp {
    /// Address to listen on; port 0 picks a free port.
    pub addr: String,
    /// Largest accepted request body, in bytes (larger: 413).
    pub max_body_bytes: u64,
    /// Open connections at most (WebSockets included); more are closed at once.
    pub max_connections: usize,
    /// Open connections from one peer address at most (WebSockets included); 0: no cap.
    /// Unset: 5000, or no cap behind a proxy (`rate_limit.client_ip_header` set), where
    /// every connection comes from the proxy's address.
    pub max_connections_per_ip: Option<usize>,
    /// A second listener for `/healthz`, `/readyz` and `/metrics` alone (plain HTTP), so
    /// that probes get through while the public one is saturated. Unset: none.
    pub admin_addr: Option<String>,
    /// Longest a client may take to send a request body once its head is in.
    pub body_read_timeout_ms: u64,
    /// The address the audience reaches pollcast at (`https://polls.example.com`), for the
    /// join links and QR codes of the presenter screen. Unset: the host each request named.
    pub public_url: Option<String>,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Longest a client may take to send a request head.
    pub header_read_timeout_ms: u64,
    /// WebSocket subscribers are pinged this often.
    pub ws_ping_interval_secs: u64,
    /// A WebSocket subscriber that sends nothing (not even a pong) for this long is closed.
    pub ws_idle_timeout_secs: u64,
    /// Serve HTTPS with this certificate chain (PEM); needs `tls_key_path` too.
    pub tls_cert_path: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert_path`.
    pub tls_key_path: Option<PathBuf>,
    /// Origins allowed to call the API from a browser on another origin
    /// (`https://polls.example.com`); empty: no cross-origin access.
    pub cors_origins: Vec<String>,
}

impl Default for RawHttp {
    fn default() -> Self {
        Self {
            addr: "127.0.0.1:8080".into(),
            max_body_bytes: 16 * 1024,
            max_connections: 50_000,
            max_connections_per_ip: None,
            admin_addr: None,
            body_read_timeout_ms: 10_000,
            public_url: None,
            max_header_bytes: 16 * 1024,
            header_read_timeout_ms: 10_000,
            ws_ping_interval_secs: 30,
            ws_idle_timeout_secs: 90,
            cors_origins: Vec::new(),
            tls_cert_path: None,
            tls_key_path: None,
        }
    }
}

/// `[http]`, checked (see [`RawHttp`] for what each key means).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// The public listener.
    pub addr: SocketAddr,
    /// Largest request body, in bytes (at least 256).
    pub max_body_bytes: u64,
    /// Open connections at most (positive).
    pub max_connections: usize,
    /// Open connections from one peer address at most; 0: no cap. Resolved: the default
    /// depends on whether a proxy is configured.
    pub max_connections_per_ip: usize,
    /// The admin listener (health and metrics alone), if any.
    pub admin_addr: Option<SocketAddr>,
    /// Longest a request body may take (positive).
    pub body_read_timeout: Duration,
    /// Where the audience reaches pollcast; `None`: the host each request named.
    pub public_url: Option<Origin>,
    /// Largest request head, in bytes (at least 8192).
    pub max_header_bytes: usize,
    /// Longest a request head may take (positive).
    pub header_read_timeout: Duration,
    /// WebSocket ping interval (positive).
    pub ws_ping_interval: Duration,
    /// WebSocket idle timeout (longer than the ping interval).
    pub ws_idle_timeout: Duration,
    /// Serve HTTPS with these files; `None`: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Origins allowed cross-origin access (empty: none).
    pub cors_origins: Vec<Origin>,
}

/// The certificate chain and private key (PEM) HTTPS is served with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// `http.tls_cert_path`.
    pub cert: PathBuf,
    /// `http.tls_key_path`.
    pub key: PathBuf,
}

/// A web origin, `http://` or `https://` and a host (with its port, if any), nothing
/// after: what a browser sends as `Origin`, and the base of join links.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin(String);

impl Origin {
    /// `text` if it is a scheme and a non-empty host, with no path.
    fn parse(text: &str) -> Option<Self> {
        let host = text
            .strip_prefix("https://")
            .or_else(|| text.strip_prefix("http://"))?;
        (!host.is_empty() && !host.contains('/')).then(|| Self(text.to_owned()))
    }

    /// `http.public_url`: an origin, a trailing `/` allowed (and dropped).
    fn parse_public_url(url: &str) -> Result<Self, ConfigError> {
        Self::parse(url.trim_end_matches('/'))
            .filter(|origin| !origin.0.contains(['?', '#', ' ', '"']))
            .ok_or_else(|| {
                ConfigError::invalid(
                    "http.public_url",
                    "must be an origin like https://polls.example.com (no path)",
                )
            })
    }

    /// One of `http.cors_origins`: an origin, as a browser sends it in a header.
    fn parse_cors_origin(origin: &str) -> Result<Self, ConfigError> {
        Self::parse(origin)
            .filter(|_| http::HeaderValue::from_str(origin).is_ok())
            .ok_or_else(|| {
                ConfigError::invalid(
                    "http.cors_origins",
                    format!("{origin:?} is not an origin like https://polls.example.com"),
                )
            })
    }

    /// The origin as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Origin {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Origin {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl RawHttp {
    /// Checks every key. `behind_proxy`: `rate_limit.client_ip_header` is set, so that
    /// every connection comes from the proxy (no per-address cap by default).
    pub(super) fn parse(self, behind_proxy: bool) -> Result<HttpSettings, ConfigError> {
        let addr = |key, text: &str| {
            text.parse::<SocketAddr>()
                .map_err(|e| ConfigError::invalid(key, format!("{e} (expected IP:PORT)")))
        };
        let positive_ms = |key, ms| match ms {
            0 => Err(ConfigError::invalid(key, "must be positive")),
            ms => Ok(Duration::from_millis(ms)),
        };
        let listen = addr("http.addr", &self.addr)?;
        if self.max_connections == 0 {
            return Err(ConfigError::invalid(
                "http.max_connections",
                "must be positive",
            ));
        }
        if self.max_header_bytes < 8192 {
            return Err(ConfigError::invalid(
                "http.max_header_bytes",
                "must be at least 8192",
            ));
        }
        if self.ws_ping_interval_secs == 0
            || self.ws_idle_timeout_secs <= self.ws_ping_interval_secs
        {
            return Err(ConfigError::invalid(
                "http.ws_idle_timeout_secs",
                "must exceed http.ws_ping_interval_secs, which must be positive",
            ));
        }
        if self.max_body_bytes < 256 {
            return Err(ConfigError::invalid(
                "http.max_body_bytes",
                "must be at least 256",
            ));
        }
        let tls = match (self.tls_cert_path, self.tls_key_path) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::invalid(
                    "http.tls_cert_path",
                    "http.tls_cert_path and http.tls_key_path go together",
                ));
            }
        };
        Ok(HttpSettings {
            addr: listen,
            max_body_bytes: self.max_body_bytes,
            max_connections: self.max_connections,
            max_connections_per_ip: match (self.max_connections_per_ip, behind_proxy) {
                (Some(max), _) => max,
                // The peer is the proxy, which holds every client's connection.
                (None, true) => 0,
                (None, false) => DEFAULT_MAX_CONNECTIONS_PER_IP,
            },
            admin_addr: self
                .admin_addr
                .map(|a| addr("http.admin_addr", &a))
                .transpose()?,
            body_read_timeout: positive_ms("http.body_read_timeout_ms", self.body_read_timeout_ms)?,
            public_url: self
                .public_url
                .as_deref()
                .map(Origin::parse_public_url)
                .transpose()?,
            max_header_bytes: self.max_header_bytes,
            header_read_timeout: positive_ms(
                "http.header_read_timeout_ms",
                self.header_read_timeout_ms,
            )?,
            ws_ping_interval: Duration::from_secs(self.ws_ping_interval_secs),
            ws_idle_timeout: Duration::from_secs(self.ws_idle_timeout_secs),
            tls,
            cors_origins: self
                .cors_origins
                .iter()
                .map(|o| Origin::parse_cors_origin(o))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// `[socketio]`: the seed app's live clients (`io(url)`, `on('poll-stats')`), served at
/// `/socket.io/` on `http.addr`. Nothing to check: used as written.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketIoSettings {
    /// Serve Socket.IO at all.
    pub enabled: bool,
    /// Send every poll's updates to a client that has not narrowed to chosen polls (the
    /// seed's behaviour). Off: such a client gets nothing until it subscribes.
    pub broadcast_all: bool,
}

impl Default for SocketIoSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            broadcast_all: true,
        }
    }
}
