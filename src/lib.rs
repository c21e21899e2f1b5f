//! pollcast: a live-polling vote service. Votes arrive over HTTP, are counted exactly once,
//! and the counts reach WebSocket subscribers within seconds.
//!
//! The core (domain, ports, actor tree) is the `pollcast-actors` crate; this crate holds what
//! touches the outside world: [`config`], [`adapters`], the [`http`] API, the vote path
//! ([`voting`]), and [`startup`], where everything is wired together.

pub mod adapters;
pub mod config;
pub mod fdlimit;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod startup;
pub mod telemetry;
pub mod voter_token;

pub use config::{RawSettings, Settings};
pub use startup::Application;
