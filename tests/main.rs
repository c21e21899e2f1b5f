//! pollcast's integration tests: one binary (one link step on 2 cores), real servers on
//! port 0, no mocks of our own components.
//!
//! - `api`: the HTTP and WebSocket API, against an in-process server per test.
//! - `process`: the real binary: crash recovery, supervision, configuration, signals.
//! - `store`: the stores' own contract, against a real SQLite file and PostgreSQL database.
//! - `service`: the vote path (`PollService`) against a real store, with a scripted vote log.

mod api;
mod browser;
mod helpers;
mod process;
mod service;
mod store;
