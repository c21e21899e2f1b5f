//! The live results page (`GET /`) in a real headless Chromium, used as a person would:
//! typing, clicking, and watching the bars move while votes arrive.
//!
//! Needs Debian's `chromium` and `chromium-driver` (scripts/test installs them); without
//! them these tests fail saying so, they are never skipped.

mod driver;
mod event;
mod files;
mod live_poll;
