//! Test-only fault injection, compiled out of release builds.
//!
//! The supervision tests need an aggregator to fail on demand, in a real server, at the worst
//! moment (with votes buffered but not yet flushed). Debug builds expose that through
//! [`FaultHooks`]; in release builds the type is empty and every check is a no-op.

#[cfg(debug_assertions)]
use std::sync::Arc;

#[cfg(debug_assertions)]
use dashmap::DashSet;

use crate::domain::PollId;

/// Shared switches that make actors fail on purpose (debug builds only).
#[derive(Debug, Clone, Default)]
pub struct FaultHooks {
    #[cfg(debug_assertions)]
    panic_at_flush: Arc<DashSet<PollId>>,
}

impl FaultHooks {
    /// Makes the aggregator of `poll` panic at its next flush that has votes to write,
    /// losing them from memory (they must come back from the vote log).
    #[cfg(debug_assertions)]
    pub fn panic_at_next_flush(&self, poll: PollId) {
        self.panic_at_flush.insert(poll);
    }

    /// Panics if a fault was armed for `poll`; disarms it first so the restarted actor
    /// replays the same votes without failing again.
    #[inline]
    pub(crate) fn check_flush(&self, poll: PollId) {
        #[cfg(debug_assertions)]
        if self.panic_at_flush.remove(&poll).is_some() {
            panic!("injected fault: aggregator of poll {poll} panics at flush");
        }
        #[cfg(not(debug_assertions))]
        let _ = poll;
    }
}
