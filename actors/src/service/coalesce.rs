//! Reads of one key that arrive together share one read.
//!
//! Why: a viewer's WebSocket starts with a snapshot of its poll, read from the store. When
//! a process of a cluster dies its viewers reconnect to the others by the thousand within a
//! second, and so does a large audience arriving at a poll: in `scripts/bench viewers`,
//! 16,700 reads of one poll's row queued on a process's 8 store connections for longer
//! than the pool's acquire timeout, and were answered 503 (docs/BENCHMARKS.md, "Large
//! audience").
//!
//! Why a caller never joins a read already under way, and waits for the next one instead:
//! a WebSocket subscribes to its poll's updates *before* it reads the snapshot, so that an
//! update flushed in between reaches it. A read that started before the subscription could
//! show the counts from before such an update, and if that was the poll's last update the
//! viewer would keep the older counts. So every caller gets a read that started after it
//! asked; one read serves everyone who arrived while the previous one ran.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Shares reads per key (see the module's doc).
pub struct Coalesced<K, V> {
    slots: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

struct Slot<V> {
    /// Callers so far: a caller's ticket is its place in the order of arrival.
    tickets: AtomicU64,
    /// Held by the one read under way; keeps the last read's value and the tickets it
    /// covers (those handed out before it started).
    last: tokio::sync::Mutex<Option<(u64, V)>>,
}

impl<K: Hash + Eq + Copy, V: Clone> Coalesced<K, V> {
    pub fn new() -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// `read`'s value for `key`, from a read that started after this call did: this
    /// caller's own, or one shared with callers that arrived while the previous read ran.
    pub async fn get<F, Fut>(&self, key: K, read: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let slot = self
            .slots
            .lock()
            .expect("slots lock")
            .entry(key)
            .or_insert_with(|| {
                Arc::new(Slot {
                    tickets: AtomicU64::new(0),
                    last: tokio::sync::Mutex::new(None),
                })
            })
            .clone();
        let held = Held {
            slots: &self.slots,
            key,
            slot,
        };
        let slot = &held.slot;
        let ticket = slot.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut last = slot.last.lock().await;
        match &*last {
            Some((covered, value)) if *covered >= ticket => value.clone(),
            _ => {
                // Every ticket up to here was handed out before this read starts.
                let covers = slot.tickets.load(Ordering::SeqCst);
                let value = read().await;
                *last = Some((covers, value.clone()));
                value
            }
        }
    }

    /// Keys with callers now (for tests).
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.slots.lock().expect("slots lock").len()
    }
}

/// A caller's hold on its key's slot. Why the slot is let go in `drop`: a caller whose
/// request was cancelled mid-read (its client went away) must not leave its key behind, or
/// requests for ever new keys would grow the map without bound.
struct Held<'a, K: Hash + Eq, V> {
    slots: &'a Mutex<HashMap<K, Arc<Slot<V>>>>,
    key: K,
    slot: Arc<Slot<V>>,
}

impl<K: Hash + Eq, V> Drop for Held<'_, K, V> {
    /// Drops the key's slot when no other caller holds it. Why a race here is harmless: a
    /// caller that took the slot just before it was dropped still reads after it asked; a
    /// later one starts a new slot, and the two read apart.
    fn drop(&mut self) {
        let mut slots = self.slots.lock().expect("slots lock");
        let ours = slots
            .get(&self.key)
            .is_some_and(|slot| Arc::ptr_eq(slot, &self.slot));
        // Ours and the map's.
        if ours && Arc::strong_count(&self.slot) == 2 {
            slots.remove(&self.key);
        }
    }
}

impl<K: Hash + Eq + Copy, V: Clone> Default for Coalesced<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::sync::Semaphore;

    use super::*;

    #[tokio::test]
    async fn callers_that_arrive_during_a_read_share_the_next_one() {
        let shared = Arc::new(Coalesced::<u8, usize>::new());
        let reads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(Semaphore::new(0));
        let read = |reads: Arc<AtomicUsize>, gate: Arc<Semaphore>| async move {
            let _ = gate.acquire().await.unwrap();
            reads.fetch_add(1, Ordering::SeqCst) + 1
        };
        let first = tokio::spawn({
            let (shared, reads, gate) = (shared.clone(), reads.clone(), gate.clone());
            async move { shared.get(1, || read(reads, gate)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let later: Vec<_> = (0..100)
            .map(|_| {
                let (shared, reads, gate) = (shared.clone(), reads.clone(), gate.clone());
                tokio::spawn(async move { shared.get(1, || read(reads, gate)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.add_permits(1_000);
        assert_eq!(first.await.unwrap(), 1);
        for caller in later {
            assert_eq!(caller.await.unwrap(), 2, "the read after the first, shared");
        }
        assert_eq!(reads.load(Ordering::SeqCst), 2, "two reads for 101 callers");
        assert_eq!(shared.keys(), 0, "an idle key is forgotten");
    }

    #[tokio::test]
    async fn a_caller_never_gets_a_read_that_started_before_it_asked() {
        let shared = Arc::new(Coalesced::<u8, &'static str>::new());
        let gate = Arc::new(Semaphore::new(0));
        let first = tokio::spawn({
            let (shared, gate) = (shared.clone(), gate.clone());
            async move {
                shared
                    .get(1, || async move {
                        let _ = gate.acquire().await.unwrap();
                        "read before the update"
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Asked while that read ran (after an update it may not show).
        let second = tokio::spawn({
            let shared = shared.clone();
            async move { shared.get(1, || async { "read after" }).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        gate.add_permits(1);
        assert_eq!(first.await.unwrap(), "read before the update");
        assert_eq!(second.await.unwrap(), "read after");
    }

    #[tokio::test]
    async fn a_caller_cancelled_mid_read_leaves_no_key_behind() {
        let shared = Coalesced::<u8, u8>::new();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            shared.get(1, std::future::pending::<u8>),
        )
        .await;
        assert!(cancelled.is_err());
        assert_eq!(shared.keys(), 0);
        assert_eq!(
            shared.get(1, || async { 7 }).await,
            7,
            "the key reads again"
        );
    }

    #[tokio::test]
    async fn keys_are_read_apart() {
        let shared = Coalesced::<u8, u8>::new();
        assert_eq!(shared.get(1, || async { 1 }).await, 1);
        assert_eq!(shared.get(2, || async { 2 }).await, 2);
    }
}
