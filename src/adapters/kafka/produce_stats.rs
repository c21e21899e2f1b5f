//! What pollcast's producers cost the brokers: librdkafka's periodic statistics turned into
//! `pollcast_kafka_produce_requests_total` and `pollcast_kafka_produced_records_total`, per
//! producer. Records per request is how well the producer batches, and requests are what a
//! broker pays for most (docs/BENCHMARKS.md, "What one vote costs").

use std::sync::atomic::{AtomicU64, Ordering};

use rdkafka::{ClientContext, Statistics};

/// How often librdkafka reports (the `statistics.interval.ms` property).
pub(super) const STATISTICS_INTERVAL_MS: &str = "1000";

/// A producer's context: adds what each report says was sent since the last one.
pub(super) struct ProduceStats {
    producer: &'static str,
    requests: AtomicU64,
    records: AtomicU64,
}

impl ProduceStats {
    /// For the producer named `producer` in the metrics' `producer` label.
    pub(super) fn new(producer: &'static str) -> Self {
        // Why here: a series that exists from the start reads as 0, not as no data. Why not
        // `absolute(0)`: a replacement producer must not reset what its predecessor counted.
        metrics::counter!("pollcast_kafka_produce_requests_total", "producer" => producer)
            .increment(0);
        metrics::counter!("pollcast_kafka_produced_records_total", "producer" => producer)
            .increment(0);
        Self {
            producer,
            requests: AtomicU64::new(0),
            records: AtomicU64::new(0),
        }
    }

    /// Counts a report's totals (since this client started) as increments over the last
    /// report's: a replaced producer starts from zero, and the series must not go back.
    fn record(&self, requests: u64, records: u64) {
        let more =
            |seen: &AtomicU64, now: u64| now.saturating_sub(seen.swap(now, Ordering::Relaxed));
        let producer = self.producer;
        metrics::counter!("pollcast_kafka_produce_requests_total", "producer" => producer)
            .increment(more(&self.requests, requests));
        metrics::counter!("pollcast_kafka_produced_records_total", "producer" => producer)
            .increment(more(&self.records, records));
    }
}

/// Produce requests sent to every broker, from one report.
fn produce_requests(statistics: &Statistics) -> u64 {
    statistics
        .brokers
        .values()
        .filter_map(|broker| broker.req.get("Produce"))
        .map(|n| (*n).max(0) as u64)
        .sum()
}

impl ClientContext for ProduceStats {
    fn stats(&self, statistics: Statistics) {
        self.record(
            produce_requests(&statistics),
            statistics.txmsgs.max(0) as u64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_adds_only_what_was_sent_since_the_last_and_never_goes_back() {
        let stats = ProduceStats::new("test");
        let more = |seen: &AtomicU64| seen.load(Ordering::Relaxed);
        stats.record(10, 400);
        stats.record(25, 900);
        assert_eq!((more(&stats.requests), more(&stats.records)), (25, 900));
        // A report older than the last (never from one client; saturating all the same).
        stats.record(20, 800);
        assert_eq!((more(&stats.requests), more(&stats.records)), (20, 800));
    }

    #[test]
    fn produce_requests_add_up_over_brokers_and_ignore_other_requests() {
        let broker = |requests: &[(&str, i64)]| rdkafka::statistics::Broker {
            req: requests.iter().map(|(k, n)| (k.to_string(), *n)).collect(),
            ..Default::default()
        };
        let report = Statistics {
            txmsgs: 500,
            brokers: [
                ("a".to_owned(), broker(&[("Produce", 12), ("Metadata", 3)])),
                ("b".to_owned(), broker(&[("Produce", 8)])),
            ]
            .into(),
            ..Default::default()
        };
        assert_eq!(produce_requests(&report), 20);
    }
}
