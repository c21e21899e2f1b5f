//! The ingest actor's commit bookkeeping: which log positions are safe to commit. A
//! partition may be committed up to the lowest offset of a batch not yet flushed by its
//! aggregator (and never past what was read), and a read that skipped an offset is read
//! again before anything after it counts as read.

use std::collections::{BTreeMap, HashMap};

use ractor::ActorId;

use crate::messages::RouteSeq;
use crate::ports::{LogRecord, Offset, Partition};

/// A batch routed to an aggregator and not yet acknowledged as flushed.
#[derive(Debug, Clone, Copy)]
pub(super) struct InFlight {
    pub(super) seq: RouteSeq,
    pub(super) partition: Partition,
    pub(super) min_offset: Offset,
    pub(super) votes: usize,
    /// The aggregator the batch was handed to; `None` if none could take it, in which case
    /// the batch is read again from the log once one can.
    pub(super) to: Option<ActorId>,
}

#[derive(Debug, Default)]
pub(super) struct PartitionState {
    /// Offset after the last record read.
    pub(super) read_next: Option<Offset>,
    pub(super) committed: Option<Offset>,
    /// Lowest offsets of in-flight batches, as a multiset (offset → number of batches).
    pub(super) in_flight: BTreeMap<Offset, usize>,
}

impl PartitionState {
    /// How far this partition can be committed right now.
    pub(super) fn committable(&self) -> Option<Offset> {
        // Why also read_next: after a rewind it is below the other polls' in-flight batches,
        // and the records between must be read (and flushed) again before committing them.
        let lowest = self.in_flight.first_key_value().map(|(&offset, _)| offset);
        match (lowest, self.read_next) {
            (Some(lowest), Some(next)) => Some(lowest.min(next)),
            (lowest, next) => lowest.or(next),
        }
    }

    pub(super) fn forget(&mut self, min_offset: Offset) {
        if let Some(n) = self.in_flight.get_mut(&min_offset) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(&min_offset);
            }
        }
    }
}

/// The records of a read that continue each partition where its last record ended, and the
/// partitions to read again from there: those where the read jumped past an offset. Why: a
/// record never read would never be counted once the offsets after it are committed, and
/// the ledger makes a second read harmless. Kafka does not skip offsets of a topic like
/// `raw-votes` (no compaction, no transactions), but the broker the tests use can serve a
/// later batch before an earlier one is stored (docs/tansu-offset-gaps.md). Each gap is
/// read again once: one that is still there is taken as real (a compacted or transactional
/// topic written by another producer) and read past.
pub(super) fn contiguous(
    partitions: &HashMap<Partition, PartitionState>,
    gaps: &mut HashMap<Partition, Offset>,
    records: Vec<LogRecord>,
) -> (Vec<LogRecord>, Vec<(Partition, Offset)>) {
    let mut expected: HashMap<Partition, Offset> = HashMap::new();
    let mut reread: Vec<(Partition, Offset)> = Vec::new();
    let mut kept = Vec::with_capacity(records.len());
    for record in records {
        let p = record.partition;
        if reread.iter().any(|(r, _)| *r == p) {
            continue;
        }
        let next = expected
            .get(&p)
            .copied()
            .or_else(|| partitions.get(&p).and_then(|s| s.read_next));
        if let Some(next) = next
            && record.offset > next
            && gaps.get(&p) != Some(&next)
        {
            gaps.insert(p, next);
            reread.push((p, next));
            continue;
        }
        expected.insert(
            p,
            next.map_or(record.next_offset, |n| n.max(record.next_offset)),
        );
        kept.push(record);
    }
    (kept, reread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_a_rewind_nothing_past_the_rewind_point_is_committable() {
        // Poll B's batch at 150 is in flight; poll A's at 100 was lost and rewound to.
        let mut p = PartitionState {
            read_next: Some(100),
            committed: None,
            in_flight: BTreeMap::from([(150, 1)]),
        };
        assert_eq!(p.committable(), Some(100));
        p.read_next = Some(200);
        assert_eq!(p.committable(), Some(150));
        p.forget(150);
        assert_eq!(p.committable(), Some(200));
    }

    fn record(partition: Partition, offset: Offset) -> LogRecord {
        LogRecord {
            partition,
            offset,
            next_offset: offset + 1,
            entry: None,
        }
    }

    fn offsets(records: &[LogRecord]) -> Vec<(Partition, Offset)> {
        records.iter().map(|r| (r.partition, r.offset)).collect()
    }

    #[test]
    fn a_read_that_skips_an_offset_is_read_again_from_it_once() {
        let partitions = HashMap::from([(
            0,
            PartitionState {
                read_next: Some(10),
                ..Default::default()
            },
        )]);
        let mut gaps = HashMap::new();
        // Offset 12 is missing from partition 0; partition 1 is read for the first time.
        let read = vec![
            record(0, 10),
            record(1, 50),
            record(0, 11),
            record(0, 13),
            record(1, 51),
        ];
        let (kept, reread) = contiguous(&partitions, &mut gaps, read);
        assert_eq!(offsets(&kept), [(0, 10), (1, 50), (0, 11), (1, 51)]);
        assert_eq!(
            reread,
            [(0, 12)],
            "read again from the first offset not read"
        );
        // Read again, and the record is there: nothing more to do.
        let mut after = partitions;
        after.get_mut(&0).unwrap().read_next = Some(12);
        let (kept, reread) = contiguous(&after, &mut gaps, vec![record(0, 12), record(0, 13)]);
        assert_eq!((offsets(&kept), reread), (vec![(0, 12), (0, 13)], vec![]));
    }

    #[test]
    fn a_gap_still_there_when_read_again_is_read_past() {
        let partitions = HashMap::from([(
            0,
            PartitionState {
                read_next: Some(12),
                ..Default::default()
            },
        )]);
        let mut gaps = HashMap::from([(0, 12)]);
        let (kept, reread) = contiguous(&partitions, &mut gaps, vec![record(0, 14), record(0, 15)]);
        assert_eq!((offsets(&kept), reread), (vec![(0, 14), (0, 15)], vec![]));
    }
}
