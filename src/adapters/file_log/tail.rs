//! The writer's tail: the writer keeps the entries it made durable last, in memory, and the
//! reader takes them from there while it keeps up: reading back and decoding every vote it
//! had just written cost the embedded server a share of every vote (docs/BENCHMARKS.md,
//! "Fast paths"). The files stay the truth; a reader behind that tail (after a restart, a
//! rewind, or a backlog) reads them.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use pollcast_actors::LogRecord;

/// Durable entries kept in memory for the reader (about 200 bytes each). Why this many: the
/// reader takes them every few milliseconds, so this is a backlog of a second or more at
/// full rate before it has to read the files.
pub(super) const TAIL_RECORDS: usize = 64 * 1024;

/// The last durable records, decoded and contiguous: each one's `offset` is the previous
/// one's `next_offset`.
#[derive(Debug)]
pub(super) struct Tail {
    records: VecDeque<LogRecord>,
    capacity: usize,
}

/// The tail, shared by the writer and the readers.
pub(super) type SharedTail = Arc<Mutex<Tail>>;

pub(super) fn lock(tail: &Mutex<Tail>) -> MutexGuard<'_, Tail> {
    // Why not give up on a poisoned lock: the tail only ever holds whole records, and the
    // files hold all of them anyway.
    tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Tail {
    /// A tail of at most `capacity` records (0: none are kept).
    pub(super) fn shared(capacity: usize) -> SharedTail {
        Arc::new(Mutex::new(Self {
            records: VecDeque::new(),
            capacity,
        }))
    }

    pub(super) fn push(&mut self, record: LogRecord) {
        if self
            .records
            .back()
            .is_some_and(|last| last.next_offset != record.offset)
        {
            self.records.clear();
        }
        if self.records.len() == self.capacity {
            self.records.pop_front();
        }
        if self.capacity > 0 {
            self.records.push_back(record);
        }
    }

    /// Up to `max` records from exactly `position` on, or `None` if the tail does not hold
    /// `position`. Records before it are dropped: their reader is past them.
    pub(super) fn take_from(&mut self, position: u64, max: usize) -> Option<Vec<LogRecord>> {
        while let Some(first) = self.records.front()
            && (first.offset as u64) < position
        {
            self.records.pop_front();
        }
        if self.records.front()?.offset as u64 != position {
            return None;
        }
        let n = self.records.len().min(max);
        (n > 0).then(|| self.records.drain(..n).collect())
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}
