//! The HTTP server as the [`HttpActor`](pollcast_actors::http_actor::HttpActor) runs it.
//!
//! The accept loop is ours (hyper-util, as inside `warp::serve`) so that every connection
//! and request passes through one place: the connection cap, header limits, the client's
//! address for the rate limiter, and a request id that is logged with every line of the
//! request and returned in `x-request-id`.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Request};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use pollcast_actors::{HttpServer, ServeFuture};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;
use tracing::Instrument;

use super::{ApiContext, routes};

/// How long open WebSocket sessions get to send their close frames at shutdown.
const SESSION_GRACE: Duration = Duration::from_secs(5);
/// How long a client may take to complete a TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish at shutdown.
const REQUEST_GRACE: Duration = Duration::from_secs(10);
/// Why a named constant rather than the string: inserting a header by a `&str` name that
/// is not a standard one allocates a copy of the name, twice per request.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The address of the client (the TCP peer), in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Connection limits (from `[http]` in config.toml).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at most; more are closed at once.
    pub max_connections: usize,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// Longest a client may take to send a request head.
    pub header_read_timeout: Duration,
}

/// Serves the API on a listener bound at start-up. Restarting the server reuses the same
/// socket, so the port never changes under clients.
pub struct WarpServer {
    listener: TcpListener,
    ctx: ApiContext,
    limits: ConnectionLimits,
    tls: Option<TlsAcceptor>,
}

impl WarpServer {
    /// Serves `ctx`'s routes on `listener`, over TLS when `tls` is given.
    pub fn new(
        listener: TcpListener,
        ctx: ApiContext,
        limits: ConnectionLimits,
        tls: Option<TlsAcceptor>,
    ) -> Self {
        Self {
            listener,
            ctx,
            limits,
            tls,
        }
    }
}

impl HttpServer for WarpServer {
    fn serve(&self, stop: CancellationToken) -> ServeFuture {
        let listener = self.listener.try_clone();
        let mut ctx = self.ctx.clone();
        ctx.shutdown = stop.clone();
        let limits = self.limits;
        let tls = self.tls.clone();
        Box::pin(async move {
            let listener = listener?;
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let sessions = ctx.sessions.clone();
            sessions.reopen();
            let service = warp::service(routes(ctx));
            let connections = Arc::new(Semaphore::new(limits.max_connections));
            let graceful = GracefulShutdown::new();
            let mut builder = Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(limits.max_header_bytes.max(8192));
            loop {
                let (stream, peer) = tokio::select! {
                    _ = stop.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(e) => {
                            // Out of file descriptors and the like: pause rather than spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    metrics::counter!("pollcast_connections_refused_total").increment(1);
                    continue; // dropping the stream closes it
                };
                let _ = stream.set_nodelay(true);
                let (service, builder, tls) = (service.clone(), builder.clone(), tls.clone());
                let watcher = graceful.watcher();
                tokio::spawn(async move {
                    let _permit = permit;
                    let Some(tls) = tls else {
                        return serve_connection(stream, peer, service, builder, watcher).await;
                    };
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, service, builder, watcher).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
            drop(listener);
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

/// Serves HTTP/1.1 and HTTP/2 (with WebSocket upgrades) on one accepted connection.
async fn serve_connection<I, S>(
    io: I,
    peer: SocketAddr,
    service: S,
    builder: Builder<TokioExecutor>,
    watcher: Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = warp::reply::Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let handler = hyper::service::service_fn(move |req| handle(service.clone(), peer, req));
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), handler)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
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

/// Runs one request through the routes, inside a span carrying its request id.
async fn handle<S>(
    mut service: S,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<warp::reply::Response, Infallible>
where
    S: Service<Request<Incoming>, Response = warp::reply::Response, Error = Infallible>,
{
    let id = request_id(&req);
    req.headers_mut().insert(X_REQUEST_ID, id.clone());
    req.extensions_mut().insert(PeerAddr(peer));
    if req.headers().contains_key(hyper::header::UPGRADE) {
        // Why take it here: warp's own WebSocket filter cannot size tungstenite's buffers, so
        // the WebSocket route upgrades the connection itself (see `ws.rs`).
        let upgrade = hyper::upgrade::on(&mut req);
        req.extensions_mut()
            .insert(super::ws::PendingUpgrade::new(upgrade));
    }
    let span = tracing::info_span!(
        "request",
        request_id = id.to_str().unwrap_or_default(),
        method = %req.method(),
        path = req.uri().path(),
    );
    let mut resp = service.call(req).instrument(span).await?;
    resp.headers_mut().insert(X_REQUEST_ID, id);
    Ok(resp)
}

/// The client's `x-request-id` when it is short and printable, else a new random one.
fn request_id(req: &Request<Incoming>) -> HeaderValue {
    if let Some(given) = req.headers().get(&X_REQUEST_ID)
        && given.len() <= 64
        && given.as_bytes().iter().all(|b| b.is_ascii_graphic())
    {
        return given.clone();
    }
    HeaderValue::from_bytes(&crate::ids::random_hex()).expect("hex is a valid header value")
}
