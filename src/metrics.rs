//! Prometheus metrics: the process-wide recorder behind `GET /metrics`.
//!
//! Code anywhere records through the `metrics` facade (`metrics::counter!(…)`); this module
//! installs the one recorder that collects them and renders the text format.

use std::borrow::Cow;
use std::sync::{LazyLock, OnceLock};

use dashmap::DashMap;
use metrics::Histogram;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const SIZES: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];

/// Installs the recorder (once per process; later calls return the same handle).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".into()), SIZES))
                .expect("bucket lists are not empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            describe();
            register();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "pollcast_votes_total",
        "Votes received, by result (accepted, or why not)"
    );
    describe_counter!(
        "pollcast_votes_counted_total",
        "Votes written to the ledger by flushes"
    );
    describe_histogram!(
        "pollcast_http_request_duration_seconds",
        "HTTP request latency"
    );
    describe_histogram!(
        "pollcast_flush_duration_seconds",
        "Duration of a poll's flush transaction"
    );
    describe_histogram!("pollcast_flush_batch_size", "Votes in a poll's flush");
    describe_counter!(
        "pollcast_flush_failures_total",
        "Flushes that failed and will be retried"
    );
    describe_gauge!(
        "pollcast_votes_pending_flush",
        "Votes read from the log, not yet flushed"
    );
    describe_gauge!(
        "pollcast_consumer_lag",
        "Records of the vote log not yet read, by partition"
    );
    describe_gauge!(
        "pollcast_websocket_subscribers",
        "Open WebSocket subscriptions"
    );
    describe_counter!(
        "pollcast_websocket_updates_coalesced_total",
        "Count updates a slow subscriber skipped (it received a later one with every count)"
    );
    describe_counter!(
        "pollcast_websocket_clients_dropped_total",
        "Subscribers dropped for not reading"
    );
    describe_counter!(
        "pollcast_accept_errors_total",
        "Failed accepts of new connections, by kind: fd_exhausted (EMFILE/ENFILE: out of file \
         descriptors), no_memory (ENOBUFS/ENOMEM), other; the accept loop backs off meanwhile"
    );
    describe_gauge!(
        "pollcast_open_files_limit",
        "The process's open-file limit (soft RLIMIT_NOFILE) after start-up raised it"
    );
    describe_counter!(
        "pollcast_log_syncs_total",
        "fdatasync calls of the embedded vote log's writer (one per group of appends)"
    );
    describe_counter!(
        "pollcast_kafka_produce_requests_total",
        "Produce requests sent to the Kafka brokers, by producer (votes, counts), from \
         librdkafka's statistics (every second)"
    );
    describe_counter!(
        "pollcast_kafka_produced_records_total",
        "Records sent to the Kafka brokers, by producer (votes, counts), from librdkafka's \
         statistics (every second)"
    );
    describe_counter!(
        "pollcast_actor_restarts_total",
        "Actors restarted by their supervisor, by kind"
    );
    describe_counter!(
        "pollcast_webhook_deliveries_total",
        "Webhook events by type and outcome: delivered, failed (attempts exhausted) or \
         dropped (queue full, superseded, or shutdown)"
    );
    describe_counter!(
        "pollcast_webhook_attempts_total",
        "Webhook HTTP attempts by result: delivered, rejected (not 2xx), timeout, error"
    );
    describe_histogram!(
        "pollcast_webhook_delivery_seconds",
        "Duration of one webhook HTTP attempt"
    );
}

/// Registers, at zero, the series that only an event would create otherwise (a failed flush,
/// a restart, a webhook, a dropped subscriber…). Why: dashboards and alert rules then find
/// every series from the start (a rate over a missing series is no data, not 0), and
/// `tests/api/dashboards.rs` can check every name they use against a fresh server. Series
/// with open-ended labels (`pollcast_votes_total{result}` beyond `accepted`,
/// `pollcast_consumer_lag{partition}`, request latencies) appear with their first event.
fn register() {
    use metrics::{counter, gauge, histogram};
    for name in [
        "pollcast_votes_counted_total",
        "pollcast_flush_failures_total",
        "pollcast_vote_id_reused_total",
        "pollcast_websocket_updates_coalesced_total",
        "pollcast_websocket_clients_dropped_total",
        "pollcast_rate_limited_total",
        "pollcast_connections_timed_out_total",
        "pollcast_log_syncs_total",
    ] {
        counter!(name).absolute(0);
    }
    counter!("pollcast_votes_total", "result" => "accepted").absolute(0);
    for reason in ["max_connections", "max_connections_per_ip"] {
        counter!("pollcast_connections_refused_total", "reason" => reason).absolute(0);
    }
    for actor in ["pipeline", "http", "aggregator"] {
        counter!("pollcast_actor_restarts_total", "actor" => actor).absolute(0);
    }
    for event in ["poll.opened", "poll.results", "poll.closed"] {
        for result in ["delivered", "failed", "dropped"] {
            counter!("pollcast_webhook_deliveries_total", "event" => event, "result" => result)
                .absolute(0);
        }
    }
    for result in ["delivered", "rejected", "timeout", "error"] {
        counter!("pollcast_webhook_attempts_total", "result" => result).absolute(0);
    }
    gauge!("pollcast_votes_pending_flush").increment(0.0);
    gauge!("pollcast_websocket_subscribers").increment(0.0);
    // A histogram's handle registers it; its buckets, sum and count render as 0.
    drop(histogram!("pollcast_flush_duration_seconds"));
    drop(histogram!("pollcast_flush_batch_size"));
    drop(histogram!("pollcast_webhook_delivery_seconds"));
}

type RequestLabels = (&'static str, &'static str, Cow<'static, str>);

/// Request latency histograms by label set. Why kept: building a key from three variable
/// labels allocates and hashes it, and then the registry looks it up again, for every
/// request (its share of a vote: docs/BENCHMARKS.md, "Fast paths"). The label sets are few
/// (see the label functions below), so the cache stays small.
static REQUEST_DURATIONS: LazyLock<DashMap<RequestLabels, Histogram>> = LazyLock::new(DashMap::new);

/// Adds one to a gauge for as long as it lives, however what it counts ends (a session
/// that errors out, a task that is aborted).
pub struct Held(&'static str);

impl Held {
    /// One more in the gauge `name`, until dropped.
    pub fn new(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}

/// The latency histogram of an accepted vote, the one label set of nearly every request
/// under load: looked up once rather than through the cache's hashed key per vote.
static ACCEPTED_VOTE_DURATIONS: LazyLock<Histogram> =
    LazyLock::new(|| request_histogram(("POST", "/vote", Cow::Borrowed("202"))));

/// Records the latency of one HTTP request in `pollcast_http_request_duration_seconds`.
pub fn record_request(method: &http::Method, path: &str, status: http::StatusCode, secs: f64) {
    if status == http::StatusCode::ACCEPTED && *method == http::Method::POST && path == "/vote" {
        ACCEPTED_VOTE_DURATIONS.record(secs);
        return;
    }
    let labels = (
        method_label(method),
        route_label(path),
        status_label(status),
    );
    if let Some(histogram) = REQUEST_DURATIONS.get(&labels) {
        histogram.record(secs);
        return;
    }
    let histogram = REQUEST_DURATIONS
        .entry(labels.clone())
        .or_insert_with(|| request_histogram(labels))
        .clone();
    histogram.record(secs);
}

fn request_histogram((method, route, status): RequestLabels) -> Histogram {
    metrics::histogram!(
        "pollcast_http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status" => status,
    )
}

/// Every route of the API, with `:id` for a poll id; the hot ones first.
const ROUTES: &[&str] = &[
    "/vote",
    "/polls",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/app.js",
    "/app.css",
    "/polls/:id",
    "/polls/:id/close",
    "/polls/:id/export",
    "/ws/polls/:id",
    "/debug/faults/aggregator-panic/:id",
];

/// The route a path belongs to (one of [`ROUTES`]), so that latency labels stay few; any
/// path that is not a route of the API is `other`: a scanner's random paths must not each
/// become a series of their own. The paths without ids are answered without allocating.
pub fn route_label(path: &str) -> &'static str {
    if let Some(route) = ROUTES.iter().find(|route| **route == path) {
        return route;
    }
    // warp serves a route with one trailing slash too, and reads ids as signed integers.
    let path = match path.strip_suffix('/') {
        Some(trimmed) if !trimmed.is_empty() => trimmed,
        _ => path,
    };
    let label = path
        .split('/')
        .map(|segment| {
            if segment.parse::<i64>().is_ok() {
                ":id"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/");
    ROUTES
        .iter()
        .find(|route| **route == label)
        .copied()
        .unwrap_or("other")
}

/// A label for a status code; the common ones without allocating.
pub fn status_label(status: http::StatusCode) -> Cow<'static, str> {
    match status.as_u16() {
        200 => Cow::Borrowed("200"),
        201 => Cow::Borrowed("201"),
        202 => Cow::Borrowed("202"),
        409 => Cow::Borrowed("409"),
        429 => Cow::Borrowed("429"),
        other => Cow::Owned(other.to_string()),
    }
}

/// A label for a method: the standard ones by name, any other (a client may send any
/// token) as `other`, so that they cannot add series without bound.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::{method_label, route_label};

    #[test]
    fn ids_in_paths_become_one_label() {
        assert_eq!(route_label("/polls/17/close"), "/polls/:id/close");
        assert_eq!(route_label("/ws/polls/3"), "/ws/polls/:id");
        assert_eq!(route_label("/vote"), "/vote");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        let made_up = http::Method::from_bytes(b"BREW").unwrap();
        assert_eq!(method_label(&made_up), "other");
        assert_eq!(method_label(&http::Method::POST), "POST");
    }

    #[test]
    fn paths_that_are_no_route_share_one_label() {
        assert_eq!(route_label("/wp-admin/setup.php"), "other");
        assert_eq!(route_label("/polls/17/nonsense"), "other");
        assert_eq!(route_label("/"), "/");
        assert_eq!(route_label("/polls/-1/"), "/polls/:id");
        assert_eq!(route_label("/vote/"), "/vote");
    }
}
