//! pollcast: a live-polling vote service. Votes arrive over HTTP, are counted exactly once,
//! and the counts reach WebSocket subscribers within seconds.
//!
//! The core (domain, ports, the vote path's `PollService`, the actor tree) is the
//! `pollcast-actors` crate; this crate holds what touches the outside world: [`config`],
//! [`adapters`], the [`http`] API, [`startup`], where everything is wired together, and
//! [`background`], where every task outside the actor tree runs and stops.

pub mod adapters;
pub mod background;
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
