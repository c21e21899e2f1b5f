//! What a request knows of the connection it came on: the peer's address, the connection's
//! place under the connection caps, and what the socket is wrapped in. Its own module because
//! the server, the rate limiter and the WebSocket and Socket.IO sessions all use them, and
//! none of those should depend on another for it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::read_budget::{ReadBudget, Throttle};
use super::write_deadline::WriteDeadline;

/// What the server serves a plain (not TLS) connection over: the socket in its wrappers.
pub type PlainConnection = ReadBudget<WriteDeadline<TcpStream>>;

/// The socket under an upgraded plain connection, with the bytes the client sent after its
/// request that hyper has read already; the upgrade back when the connection is not plain
/// TCP (TLS). Why unwrap it: a WebSocket session writes its socket from several tasks
/// (`ws::outlet`). What the wrappers did is then the session's: it has its own write
/// timeout, and only Socket.IO connections are ever read under a budget.
pub fn plain_tcp(upgraded: Upgraded) -> Result<(TcpStream, Bytes), Upgraded> {
    let parts =
        hyper_util::server::conn::auto::upgrade::downcast::<TokioIo<PlainConnection>>(upgraded)?;
    Ok((
        parts.io.into_inner().into_inner().into_inner(),
        parts.read_buf,
    ))
}

/// The address of the client (the TCP peer), in every request's extensions.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// A connection's place under `max_connections` and `max_connections_per_ip`, given back
/// when the last clone is dropped: when the connection ends, or the WebSocket or Socket.IO
/// session it was upgraded to.
#[derive(Clone)]
pub struct ConnectionHold {
    /// Whatever holds the places (the server's permits), released on drop.
    #[allow(dead_code)] // held for its drop
    places: Arc<dyn Send + Sync>,
    /// Slows the connection's reads once it is a Socket.IO WebSocket (see `read_budget.rs`).
    pub throttle: Throttle,
}

impl ConnectionHold {
    /// Holds `places` for as long as the connection, or what it is upgraded to, lives.
    pub fn new(places: Arc<dyn Send + Sync>, throttle: Throttle) -> Self {
        Self { places, throttle }
    }
}
