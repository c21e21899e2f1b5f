//! What a request knows of the connection it came on: the peer's address, and the
//! connection's place under the connection caps. Its own module because the server, the
//! rate limiter and the WebSocket and Socket.IO sessions all use them, and none of those
//! should depend on another for it.

use std::net::SocketAddr;
use std::sync::Arc;

use super::read_budget::Throttle;

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
