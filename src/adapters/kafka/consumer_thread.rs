//! The consumer's own thread: `consumer.poll` runs there, and only while the ingest actor
//! asks for records, so nothing fetched sits in a buffer of ours when the actor seeks. The
//! rebalance callbacks run on it too (see `rebalance.rs`).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pollcast_actors::{LogEntry, LogError, LogRecord, SourceEvent};
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use tokio::sync::{mpsc, oneshot};

use super::rebalance::{IngestContext, Reply};

/// What the ingest actor asks of the consumer thread.
pub(super) enum Request {
    /// Fetch up to `max` records, waiting at most `wait` for the first.
    Poll {
        max: usize,
        wait: Duration,
        reply: Reply,
    },
    /// Leave the group and stop; answered once left.
    Close(oneshot::Sender<()>),
}

/// Longest a graceful stop waits for the consumer to leave its group.
pub(super) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the ingest actor's requests until it asks to close or goes away.
pub(super) fn serve_polls(
    consumer: Arc<BaseConsumer<IngestContext>>,
    reply_slot: Arc<Mutex<Option<Reply>>>,
    mut requests: mpsc::Receiver<Request>,
) {
    while let Some(request) = requests.blocking_recv() {
        let (max, wait, reply) = match request {
            Request::Poll { max, wait, reply } => (max, wait, reply),
            Request::Close(done) => {
                leave_group(consumer);
                let _ = done.send(());
                return;
            }
        };
        *reply_slot.lock().expect("not poisoned") = Some(reply);
        let deadline = Instant::now() + wait;
        let mut records = Vec::new();
        let mut failure = None;
        while records.len() < max {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout = if records.is_empty() {
                whole_millis(remaining)
            } else {
                Duration::ZERO
            };
            match consumer.poll(timeout) {
                Some(Ok(message)) => records.push(LogRecord {
                    partition: message.partition(),
                    offset: message.offset(),
                    next_offset: message.offset() + 1,
                    entry: decode_entry(&message),
                }),
                Some(Err(e)) => {
                    failure = Some(read_error(e));
                    break;
                }
                None if records.is_empty() && !remaining.is_zero() => {}
                None => break,
            }
            if reply_slot.lock().expect("not poisoned").is_none() {
                break; // revoked while fetching
            }
        }
        let Some(reply) = reply_slot.lock().expect("not poisoned").take() else {
            // The revocation answered this request. Records fetched before it are dropped:
            // their partitions' next owner reads them again from the committed offsets.
            continue;
        };
        let _ = reply.send(match failure {
            Some(e) if records.is_empty() => Err(e),
            _ => Ok(SourceEvent::Records(records)),
        });
    }
    tracing::debug!("vote consumer thread stopped");
}

/// `wait` rounded up to whole milliseconds. Why: librdkafka waits in milliseconds, and
/// rdkafka rounds a timeout down to them, so the last fraction of a millisecond of every
/// wait was a `poll` that returned at once, again and again until it ran out: a spin at the
/// end of each idle read that cost an idle process 1.8 % of a core in this thread
/// (docs/BENCHMARKS.md, "Large audience").
fn whole_millis(wait: Duration) -> Duration {
    Duration::from_millis(wait.as_micros().div_ceil(1000) as u64)
}

/// What a consumer error means for the operator.
fn read_error(e: KafkaError) -> LogError {
    if e.rdkafka_error_code() == Some(RDKafkaErrorCode::InvalidSessionTimeout) {
        tracing::error!(
            error = %e,
            "the Kafka broker refused the consumer's session timeout: set \
             log.kafka.consumer_properties.session_timeout_ms within the broker's \
             group.min.session.timeout.ms and group.max.session.timeout.ms (Kafka's defaults: \
             6000 and 1800000; pollcast's default is 6000), or change the broker's limits"
        );
        return LogError::new(
            "join the Kafka consumer group",
            format!(
                "{e}: log.kafka.consumer_properties.session_timeout_ms is outside the broker's group.min/max.session.timeout.ms"
            ),
        );
    }
    LogError::new("read from Kafka", e)
}

/// Leaves the consumer group. Dropping the last handle of the consumer does it: rdkafka's
/// drop closes it (librdkafka revokes the assignment, which our callback lets pass as there
/// is no request to answer and nothing left to flush, sends the coordinator a LeaveGroup and
/// waits until that is done). Closing it here as well would make that drop fail. The
/// coordinator then rebalances the group at once instead of waiting for this member's
/// session to time out.
fn leave_group(consumer: Arc<BaseConsumer<IngestContext>>) {
    let started = Instant::now();
    match Arc::into_inner(consumer) {
        Some(consumer) => drop(consumer),
        None => {
            tracing::warn!("the Kafka consumer is still in use; it leaves its group when released");
            return;
        }
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "left the Kafka consumer group"
    );
}

fn decode_entry(message: &impl Message) -> Option<LogEntry> {
    let payload = message.payload()?;
    match LogEntry::from_json(payload) {
        Ok(entry) => Some(entry),
        Err(e) => {
            tracing::warn!(partition = message.partition(), offset = message.offset(), error = %e, "skipping a raw-votes record that is not a vote");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_rounded_up_to_a_whole_millisecond_and_never_to_zero() {
        assert_eq!(
            whole_millis(Duration::from_micros(1)),
            Duration::from_millis(1)
        );
        assert_eq!(
            whole_millis(Duration::from_micros(49_001)),
            Duration::from_millis(50)
        );
        assert_eq!(
            whole_millis(Duration::from_millis(50)),
            Duration::from_millis(50)
        );
        assert_eq!(whole_millis(Duration::ZERO), Duration::ZERO);
    }
}
