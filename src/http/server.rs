//! The HTTP server as the [`ServerActor`](pollcast_actors::server_actor::ServerActor) runs it.
//!
//! The accept loop is ours (hyper-util, as inside `warp::serve`) so that every connection
//! and request passes through one place: the connection cap, header limits, the client's
//! address for the rate limiter, and a request id that is logged with every line of the
//! request and returned in `x-request-id`.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use pollcast_actors::{ServeFuture, Server};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::Instrument;

use super::connection::{ConnectionHold, PeerAddr, PlainConnection};
use super::read_budget::{ReadBudget, Throttle};
use super::socketio::Endpoint as SocketIoEndpoint;
use super::votes::FastPath;
use super::write_deadline::{WRITE_STALL_LIMIT, WriteDeadline};
use super::{ApiContext, routes};

/// How long open WebSocket sessions get to send their close frames at shutdown.
const SESSION_GRACE: Duration = Duration::from_secs(5);
/// How long in-flight requests get to finish at shutdown.
const REQUEST_GRACE: Duration = Duration::from_secs(10);
/// Why a named constant rather than the string: inserting a header by a `&str` name that
/// is not a standard one allocates a copy of the name, twice per request.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Connection limits (from `[http]` in config.toml).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Open connections (WebSockets included) from one peer address at most; 0: no cap.
    pub max_connections_per_ip: usize,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Longest a client may take to send a request head, counted from the accept (TLS
    /// handshake and protocol detection included) for a connection's first request.
    pub header_read_timeout: Duration,
}

/// HTTP/2 streams a client may have open at once on one connection. Why so few: each holds
/// a request in progress and its response's buffers; browsers open a handful.
const H2_MAX_STREAMS: u32 = 16;
/// Bytes of response a stream may have buffered that the client has not read.
const H2_SEND_BUFFER: usize = 16 * 1024;
/// Bytes a client may send on one stream, and on the whole connection, before pollcast has
/// read them (HTTP/2 flow control). Request bodies are at most `http.max_body_bytes`.
const H2_STREAM_WINDOW: u32 = 64 * 1024;
const H2_CONNECTION_WINDOW: u32 = 128 * 1024;
/// How often an HTTP/2 connection is pinged, and how long its answer may take: a peer that
/// vanished is let go, not kept until the kernel notices.
const H2_KEEPALIVE: Duration = Duration::from_secs(20);

/// Connections open per peer address, for `max_connections_per_ip`.
#[derive(Clone)]
struct PerIp {
    open: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    max: usize,
}

impl PerIp {
    fn new(max: usize) -> Self {
        Self {
            open: Arc::default(),
            max,
        }
    }

    /// A slot for one more connection from `ip`, or `None` when it holds its share.
    fn open(&self, ip: IpAddr) -> Option<IpSlot> {
        if self.max == 0 {
            return Some(IpSlot(None));
        }
        let mut open = self.open.lock().expect("not poisoned");
        let held = open.entry(ip).or_insert(0);
        if *held >= self.max {
            return None;
        }
        *held += 1;
        Some(IpSlot(Some((self.clone(), ip))))
    }
}

/// One connection's share of its address's cap, given back when the connection ends.
struct IpSlot(Option<(PerIp, IpAddr)>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        let Some((per_ip, ip)) = self.0.take() else {
            return;
        };
        let mut open = per_ip.open.lock().expect("not poisoned");
        if let std::collections::hash_map::Entry::Occupied(mut held) = open.entry(ip) {
            *held.get_mut() -= 1;
            if *held.get() == 0 {
                held.remove();
            }
        }
    }
}

/// Serves the API on a listener bound at start-up, and health and metrics alone on the
/// admin listener when one is configured. Restarting the server reuses the same sockets,
/// so the ports never change under clients.
pub struct HttpServer {
    listener: TcpListener,
    admin: Option<TcpListener>,
    ctx: ApiContext,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
}

/// Connections the admin listener takes at once: probes and scrapers, not an audience.
const ADMIN_CONNECTIONS: usize = 64;

impl HttpServer {
    /// Serves `ctx`'s routes on `listener`, over TLS when `tls` is given; `/healthz`,
    /// `/readyz` and `/metrics` also on `admin` (plain HTTP).
    pub fn new(
        listener: TcpListener,
        admin: Option<TcpListener>,
        ctx: ApiContext,
        limits: ConnectionLimits,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        Self {
            listener,
            admin,
            ctx,
            limits,
            tls,
        }
    }
}

impl Server for HttpServer {
    fn serve(&self, stop: CancellationToken) -> ServeFuture {
        let listener = self.listener.try_clone();
        let admin = self.admin.as_ref().map(TcpListener::try_clone).transpose();
        let mut ctx = self.ctx.clone();
        ctx.shutdown = stop.clone();
        let limits = self.limits;
        let tls = self.tls.clone();
        Box::pin(async move {
            let listener = tokio_listener(listener?)?;
            let sessions = ctx.sessions.clone();
            sessions.reopen();
            // Why shared: the admin listener's loop is a task of its own.
            let graceful = Arc::new(GracefulShutdown::new());
            let builder = builder(&limits);
            let admin = match admin? {
                Some(admin) => {
                    let admin = tokio_listener(admin)?;
                    let service = warp::service(super::admin_routes(&ctx));
                    let limits = ConnectionLimits {
                        max_connections: ADMIN_CONNECTIONS,
                        max_connections_per_ip: 0,
                        ..limits
                    };
                    let accepting = accept_loop(
                        admin,
                        service,
                        Ahead::default(),
                        limits,
                        None,
                        builder.clone(),
                        graceful.clone(),
                        stop.clone(),
                    );
                    Some(tokio::spawn(accepting))
                }
                None => None,
            };
            let socketio = ctx
                .settings
                .socketio
                .enabled
                .then(|| SocketIoEndpoint::new(&ctx));
            let ahead = Ahead {
                socketio: socketio.clone(),
                votes: Some(FastPath::new(&ctx)),
            };
            let service = warp::service(routes(ctx));
            accept_loop(
                listener,
                service,
                ahead,
                limits,
                tls,
                builder,
                graceful.clone(),
                stop.clone(),
            )
            .await;
            if let Some(admin) = admin {
                let _ = admin.await;
            }
            // Before the requests' grace: a Socket.IO long-poll in progress is a request that
            // would otherwise wait for its ping interval.
            if let Some(socketio) = socketio
                && tokio::time::timeout(SESSION_GRACE, socketio.close())
                    .await
                    .is_err()
            {
                tracing::warn!("Socket.IO clients still open after {SESSION_GRACE:?}");
            }
            let graceful = Arc::into_inner(graceful).expect("both accept loops have ended");
            if tokio::time::timeout(REQUEST_GRACE, graceful.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("requests still running after {REQUEST_GRACE:?}");
            }
            sessions.close();
            if tokio::time::timeout(SESSION_GRACE, sessions.wait())
                .await
                .is_err()
            {
                tracing::warn!("WebSocket sessions still open after {SESSION_GRACE:?}");
            }
            Ok(())
        })
    }
}

/// Connections the kernel holds for a listener before it accepts them (Linux caps it at
/// `net.core.somaxconn`, 4096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening socket. Why not `std::net::TcpListener::bind`: its queue holds 128
/// connections. When a process of a cluster dies, its viewers reconnect to the others by the
/// thousand within a second, and a handshake that finds the queue full is dropped: its
/// client tries again only a second later, then two, then four.
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std does: a restarted process can bind its port while old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

fn tokio_listener(listener: TcpListener) -> std::io::Result<tokio::net::TcpListener> {
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// HTTP/1.1 and HTTP/2 settings: every buffer a peer can fill without reading is bounded
/// (see the README's "Limits").
fn builder(limits: &ConnectionLimits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_send_buf_size(H2_SEND_BUFFER)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_header_list_size(limits.max_header_bytes as u32)
        .keep_alive_interval(Some(H2_KEEPALIVE))
        .keep_alive_timeout(H2_KEEPALIVE);
    builder
}

/// What a connection answers before warp's route tree: Socket.IO, and the fast path of
/// `POST /vote`. The admin listener has neither.
#[derive(Clone, Default)]
struct Ahead {
    socketio: Option<SocketIoEndpoint>,
    votes: Option<FastPath>,
}

/// Accepts connections until `stop`, each within the connection caps.
#[allow(clippy::too_many_arguments)]
async fn accept_loop<S>(
    listener: tokio::net::TcpListener,
    service: S,
    ahead: Ahead,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
    builder: Builder<TokioExecutor>,
    graceful: Arc<GracefulShutdown>,
    stop: CancellationToken,
) where
    S: Service<Request<Incoming>, Response = warp::reply::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = PerIp::new(limits.max_connections_per_ip);
    let mut backoff = AcceptBackoff::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    let Some(pause) = backoff.failed(&e) else { continue };
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(pause) => continue,
                    }
                }
            },
        };
        backoff.accepted();
        let accepted = Instant::now();
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("pollcast_connections_refused_total", "reason" => "max_connections")
                .increment(1);
            continue; // dropping the stream closes it
        };
        let Some(slot) = per_ip.open(peer.ip()) else {
            metrics::counter!("pollcast_connections_refused_total", "reason" => "max_connections_per_ip")
                .increment(1);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let stream = WriteDeadline::new(stream, WRITE_STALL_LIMIT);
        let (service, builder, tls) = (service.clone(), builder.clone(), tls.clone());
        let ahead = ahead.clone();
        let watcher = graceful.watcher();
        let deadline = accepted + limits.header_read_timeout;
        let throttle = Throttle::default();
        let stream: PlainConnection = ReadBudget::new(stream, throttle.clone());
        let hold = ConnectionHold::new(Arc::new((permit, slot)), throttle);
        tokio::spawn(async move {
            let Some(tls) = tls else {
                return serve_connection(
                    stream, peer, service, ahead, builder, watcher, deadline, hold,
                )
                .await;
            };
            match tokio::time::timeout_at(deadline, tls.accept(stream)).await {
                Ok(Ok(stream)) => {
                    serve_connection(
                        stream, peer, service, ahead, builder, watcher, deadline, hold,
                    )
                    .await
                }
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// The first pause after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause: how long, at worst, a freed descriptor waits to take a new connection.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accept failures are logged at most this often (the rest are counted in the next line).
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(1);

/// What the accept loop does after `accept` fails. Why pause at all: out of file descriptors
/// (EMFILE, ENFILE) the pending connection stays in the listen queue and the listener stays
/// readable, so accepting again at once fails again at once, a busy loop on a core that the
/// open connections need. The pause doubles (10 ms to 1 s) while failures go on and is back
/// to the first at the next connection accepted. Every failure is counted in
/// `pollcast_accept_errors_total{kind}`; the log gets one line a second at most.
struct AcceptBackoff {
    pause: Duration,
    /// Failures since the last line logged, and when that was.
    unlogged: u64,
    logged_at: Option<Instant>,
    /// Whether the last accept failed (so the next success is logged).
    failing: bool,
}

impl AcceptBackoff {
    fn new() -> Self {
        Self {
            pause: ACCEPT_BACKOFF_MIN,
            unlogged: 0,
            logged_at: None,
            failing: false,
        }
    }

    /// How long to pause after `error`; `None`: accept again at once (the error was one
    /// connection's, which the peer reset before it was accepted).
    fn failed(&mut self, error: &std::io::Error) -> Option<Duration> {
        use std::io::ErrorKind;
        if matches!(
            error.kind(),
            ErrorKind::ConnectionAborted
                | ErrorKind::ConnectionReset
                | ErrorKind::ConnectionRefused
        ) {
            tracing::debug!(%error, "a connection ended before it was accepted");
            return None;
        }
        let kind = accept_error_kind(error);
        metrics::counter!("pollcast_accept_errors_total", "kind" => kind).increment(1);
        self.unlogged += 1;
        self.failing = true;
        let pause = self.pause;
        if self
            .logged_at
            .is_none_or(|at| at.elapsed() >= ACCEPT_LOG_EVERY)
        {
            tracing::warn!(
                %error,
                kind,
                failures = self.unlogged,
                pause_ms = pause.as_millis() as u64,
                "accepting connections fails; open connections are still served, new ones \
                 wait in the listen queue (see pollcast_accept_errors_total)"
            );
            (self.unlogged, self.logged_at) = (0, Some(Instant::now()));
        }
        self.pause = (pause * 2).min(ACCEPT_BACKOFF_MAX);
        Some(pause)
    }

    /// A connection was accepted: the next failure pauses the shortest time again.
    fn accepted(&mut self) {
        if self.failing {
            tracing::info!(failures = self.unlogged, "accepting connections again");
            (self.failing, self.unlogged, self.pause) = (false, 0, ACCEPT_BACKOFF_MIN);
        }
    }
}

/// The `kind` label of a failed accept.
fn accept_error_kind(error: &std::io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => "fd_exhausted",
        Some(libc::ENOBUFS | libc::ENOMEM) => "no_memory",
        _ => "other",
    }
}

/// Serves HTTP/1.1 and HTTP/2 (with WebSocket upgrades) on one accepted connection. A
/// connection that has not delivered a whole request head by `deadline` is closed. Why ours
/// and not only hyper's `header_read_timeout`: that one starts once the protocol is known,
/// and hyper waits without a deadline for the bytes that tell HTTP/1 from HTTP/2, so a
/// silent socket (or one byte, then silence) held its slot for ever.
#[allow(clippy::too_many_arguments)]
async fn serve_connection<I, S>(
    io: I,
    peer: SocketAddr,
    service: S,
    ahead: Ahead,
    builder: Builder<TokioExecutor>,
    watcher: Watcher,
    deadline: Instant,
    hold: ConnectionHold,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = warp::reply::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let heard = Arc::new(AtomicBool::new(false));
    let first = heard.clone();
    let handler = hyper::service::service_fn(move |req| {
        // Why a relaxed store: it only has to be seen by this connection's own task, later.
        first.store(true, Ordering::Relaxed);
        handle(service.clone(), &ahead, peer, &hold, req)
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), handler)
        .into_owned();
    let mut conn = std::pin::pin!(watcher.watch(conn));
    let ended = tokio::select! {
        ended = &mut conn => Some(ended),
        _ = tokio::time::sleep_until(deadline) => None,
    };
    let ended = match ended {
        Some(ended) => ended,
        None if !heard.load(Ordering::Relaxed) => {
            metrics::counter!("pollcast_connections_timed_out_total").increment(1);
            tracing::debug!(%peer, "closing a connection that sent no request head in time");
            return; // dropping the connection closes the socket
        }
        None => conn.await,
    };
    if let Err(e) = ended {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Loads a certificate chain and its private key (PEM) for HTTPS.
pub fn load_tls(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    use anyhow::Context;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading http.tls_cert_path {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading http.tls_key_path {}", key.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("http.tls_cert_path and http.tls_key_path do not make a valid pair")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs one request through the routes (or Socket.IO, for `/socket.io/…`), inside a span
/// carrying its request id.
fn handle<S>(
    mut service: S,
    ahead: &Ahead,
    peer: SocketAddr,
    hold: &ConnectionHold,
    mut req: Request<Incoming>,
) -> impl Future<Output = Result<warp::reply::Response, Infallible>> + use<S>
where
    S: Service<Request<Incoming>, Response = warp::reply::Response, Error = Infallible>,
{
    use futures_util::future::Either;
    let id = request_id(&req);
    if let Some(votes) = &ahead.votes
        && FastPath::takes(&req)
    {
        let span = tracing::info_span!(
            "request",
            request_id = id.to_str().unwrap_or_default(),
            method = "POST",
            path = "/vote",
        );
        let votes = votes.clone();
        return Either::Left(Either::Right(
            async move {
                let mut resp = votes.answer(peer, req).await;
                resp.headers_mut().insert(X_REQUEST_ID, id);
                Ok(resp)
            }
            .instrument(span),
        ));
    }
    req.headers_mut().insert(X_REQUEST_ID, id.clone());
    req.extensions_mut().insert(PeerAddr(peer));
    if let Some(socketio) = &ahead.socketio
        && SocketIoEndpoint::handles(req.uri().path())
    {
        // Why before the upgrade below: Socket.IO takes its WebSocket upgrade itself.
        if req.headers().contains_key(hyper::header::UPGRADE) {
            hold.throttle.engage();
        }
        let span = tracing::info_span!(
            "request",
            request_id = id.to_str().unwrap_or_default(),
            method = %req.method(),
            path = req.uri().path(),
        );
        let call = socketio.call(req, hold).instrument(span);
        return Either::Left(Either::Left(async move {
            let mut resp = call.await?;
            resp.headers_mut().insert(X_REQUEST_ID, id);
            Ok(resp)
        }));
    }
    if req.headers().contains_key(hyper::header::UPGRADE) {
        // Why take it here: warp's own WebSocket filter cannot size tungstenite's buffers, so
        // the WebSocket route upgrades the connection itself (see `ws.rs`).
        let upgrade = hyper::upgrade::on(&mut req);
        req.extensions_mut()
            .insert(super::ws::PendingUpgrade::new(upgrade, hold.clone()));
    }
    let span = tracing::info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        method = %req.method(),
        path = req.uri().path(),
    );
    // Why an async block after the synchronous part: the hold is borrowed, not moved into
    // every request's future (only an upgrade takes a clone of it).
    let call = service.call(req).instrument(span);
    Either::Right(async move {
        let mut resp = call.await?;
        resp.headers_mut().insert(X_REQUEST_ID, id);
        Ok(resp)
    })
}

/// The client's `x-request-id` when it is short and printable, else a new random one.
fn request_id(req: &Request<Incoming>) -> HeaderValue {
    if let Some(given) = req.headers().get(&X_REQUEST_ID)
        && given.len() <= 64
        && given.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return given.clone();
    }
    HeaderValue::from_bytes(&pollcast_actors::ids::random_hex())
        .expect("hex is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os_error(code: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(code)
    }

    #[test]
    fn accept_failures_back_off_exponentially_up_to_a_second_and_reset_on_success() {
        let mut backoff = AcceptBackoff::new();
        let pauses: Vec<u64> = (0..10)
            .map(|_| backoff.failed(&os_error(libc::EMFILE)).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.accepted();
        assert_eq!(
            backoff.failed(&os_error(libc::ENFILE)),
            Some(ACCEPT_BACKOFF_MIN)
        );
    }

    #[test]
    fn a_connection_reset_before_accept_does_not_pause() {
        let mut backoff = AcceptBackoff::new();
        assert_eq!(backoff.failed(&os_error(libc::ECONNABORTED)), None);
        assert_eq!(backoff.pause, ACCEPT_BACKOFF_MIN);
    }

    /// Why it matters: a process that has not accepted yet (busy, or just started) still
    /// completes the handshakes of a reconnect storm instead of dropping them.
    #[tokio::test]
    async fn the_listen_queue_holds_a_burst_of_connections_not_yet_accepted() {
        // The kernel caps every queue at net.core.somaxconn (4096 since Linux 5.4).
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(4096);
        assert!(
            cap >= 400,
            "net.core.somaxconn is {cap}: this machine queues too few connections to test"
        );
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        // Nothing accepts: every connection waits in the queue. A std listener's queue
        // holds 128 (129 on Linux); the rest would time out.
        let waiting: Vec<_> = (0..400)
            .map(|i| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .unwrap_or_else(|e| panic!("connection {i} was not queued: {e}"))
            })
            .collect();
        assert_eq!(waiting.len(), 400);
    }

    #[test]
    fn accept_errors_are_labelled_by_kind() {
        assert_eq!(accept_error_kind(&os_error(libc::EMFILE)), "fd_exhausted");
        assert_eq!(accept_error_kind(&os_error(libc::ENFILE)), "fd_exhausted");
        assert_eq!(accept_error_kind(&os_error(libc::ENOBUFS)), "no_memory");
        assert_eq!(accept_error_kind(&os_error(libc::EPERM)), "other");
    }
}
