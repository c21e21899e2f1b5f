//! The open-file limit (`RLIMIT_NOFILE`): every connection, WebSocket included, holds one
//! file descriptor, and so do the backends' sockets and files.
//!
//! At start pollcast raises its soft limit to the hard one (the soft limit is often 1024,
//! far below an audience), logs both, and warns when the limit cannot hold
//! `http.max_connections` plus what the backends need ([`FdReserve`]). Why warn rather than
//! lower `max_connections`: the reserve is an estimate, and a cap lowered from an estimate
//! would turn viewers away while descriptors are still free; when the descriptors do run
//! out, the accept loop backs off (see `http/server.rs`) and open connections keep being
//! served. Operators who want the backends' share guaranteed set `max_connections` below
//! the limit by the reserve the warning names.

use std::io;

use crate::config::{GuardSettings, LogSettings, Settings, StoreUrl};

/// Soft and hard `RLIMIT_NOFILE` (`u64::MAX`: unlimited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

/// The process's open-file limit now.
pub fn current() -> io::Result<NofileLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NofileLimit {
        soft: from_rlim(lim.rlim_cur),
        hard: from_rlim(lim.rlim_max),
    })
}

#[allow(
    clippy::unnecessary_cast,
    reason = "rlim_t is u64 on Linux, not everywhere"
)]
fn from_rlim(value: libc::rlim_t) -> u64 {
    if value == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        value as u64
    }
}

#[allow(
    clippy::unnecessary_cast,
    reason = "rlim_t is u64 on Linux, not everywhere"
)]
fn set_soft(soft: u64, hard: u64) -> io::Result<()> {
    let to_rlim = |v: u64| {
        if v == u64::MAX {
            libc::RLIM_INFINITY
        } else {
            v as libc::rlim_t
        }
    };
    let lim = libc::rlimit {
        rlim_cur: to_rlim(soft),
        rlim_max: to_rlim(hard),
    };
    // SAFETY: `lim` is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft limit to the hard one. Returns the limit before and after. Why a
/// fallback: an unlimited hard limit cannot be the soft one for open files (Linux caps it at
/// `fs.nr_open`, macOS at `OPEN_MAX`), so that case takes the largest the kernel allows.
pub fn raise_to_hard() -> io::Result<(NofileLimit, NofileLimit)> {
    let before = current()?;
    if before.soft < before.hard && set_soft(before.hard, before.hard).is_err() {
        let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(10_240)
            .min(before.hard);
        if ceiling > before.soft {
            set_soft(ceiling, before.hard)?;
        }
    }
    Ok((before, current()?))
}

/// File descriptors pollcast needs besides its HTTP connections, by what needs them: an
/// estimate from the configuration (each part says how it is counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdReserve {
    pub parts: Vec<(&'static str, u64)>,
}

/// Descriptors of the process itself: stdio, the runtime's epoll and wakers, the signal
/// pipe, the listeners, jemalloc, `/proc` reads, DNS lookups, blocking-pool threads' files.
/// Measured: an idle embedded pollcast holds about 40 in all (`ls /proc/PID/fd`).
const PROCESS_FDS: u64 = 64;
/// SQLite: one writer, four readers and one flag reader (`sqlite_store.rs`), each with the
/// database, its `-wal` and its `-shm` open.
const SQLITE_FDS: u64 = 6 * 3;
/// The embedded log: the segment written, the one read, the directory, the next segment.
const FILE_LOG_FDS: u64 = 4;
/// librdkafka clients: the producer, the consumer, the counts bus's producer and consumer,
/// and the admin client at start.
const KAFKA_CLIENTS: u64 = 5;
/// Connections the admin listener takes at most, and the listener (`http/server.rs`).
const ADMIN_FDS: u64 = 64 + 1;

impl FdReserve {
    /// The estimate for `settings`.
    pub fn estimate(settings: &Settings) -> Self {
        let mut parts = vec![("process", PROCESS_FDS)];
        // Postgres: the pool and the two-connection flag pool (`postgres_store.rs`).
        let store = match settings.store.url {
            StoreUrl::Postgres(_) => u64::from(settings.store.max_connections) + 2,
            StoreUrl::Sqlite(_) => SQLITE_FDS,
        };
        parts.push(("store", store));
        let log = match &settings.log {
            LogSettings::Embedded(_) => FILE_LOG_FDS,
            // Each client: a socket per broker (the bootstrap list counted twice, as the
            // cluster may have more brokers than it names) and its wake-up pipes.
            LogSettings::Kafka(kafka) => {
                let brokers = kafka.brokers.split(',').count() as u64;
                KAFKA_CLIENTS * (2 * brokers + 4)
            }
        };
        parts.push(("log", log));
        if let GuardSettings::Redis { .. } = settings.dedup.guard {
            // The connection manager's socket, and its replacement while reconnecting.
            parts.push(("redis", 2));
        }
        // One socket per webhook attempt in flight.
        parts.push(("webhooks", settings.webhooks.max_in_flight.get() as u64));
        if settings.http.admin_addr.is_some() {
            parts.push(("admin listener", ADMIN_FDS));
        }
        Self { parts }
    }

    pub fn total(&self) -> u64 {
        self.parts.iter().map(|(_, n)| n).sum()
    }

    /// The parts as `name=n, …`, for the log.
    pub fn describe(&self) -> String {
        self.parts
            .iter()
            .map(|(name, n)| format!("{name}={n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// When `limit` cannot hold `max_connections` plus `reserve`: how many connections it can.
pub fn shortfall(limit: u64, max_connections: usize, reserve: &FdReserve) -> Option<u64> {
    let needed = (max_connections as u64).saturating_add(reserve.total());
    (limit < needed).then(|| limit.saturating_sub(reserve.total()))
}

/// Raises the soft limit, logs it, and warns when it is too low for `settings`. Never
/// fails: a limit that cannot be read or raised is logged and start-up goes on.
pub fn prepare(settings: &Settings) {
    let reserve = FdReserve::estimate(settings);
    let (before, now) = match raise_to_hard() {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(error = %e, "could not read or raise the open-file limit");
            return;
        }
    };
    let max_connections = settings.http.max_connections;
    tracing::info!(
        soft_before = before.soft,
        soft = now.soft,
        hard = now.hard,
        max_connections,
        reserve = reserve.total(),
        "open-file limit (RLIMIT_NOFILE): soft raised to the hard limit"
    );
    metrics::gauge!("pollcast_open_files_limit").set(now.soft as f64);
    if let Some(fit) = shortfall(now.soft, max_connections, &reserve) {
        tracing::warn!(
            soft = now.soft,
            hard = now.hard,
            max_connections,
            reserve = reserve.total(),
            reserve_parts = %reserve.describe(),
            connections_that_fit = fit,
            "the open-file limit is below http.max_connections plus what the backends need: \
             raise the hard limit (ulimit -Hn, LimitNOFILE= in systemd, --ulimit in Docker) \
             or lower http.max_connections to {fit}; past the limit new connections wait \
             in the listen queue"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DedupKind, LogKind, RawSettings};

    #[test]
    fn the_reserve_counts_each_backend() {
        let mut settings = RawSettings::default();
        let embedded = FdReserve::estimate(&Settings::parse(settings.clone()).unwrap());
        assert_eq!(
            embedded.total(),
            PROCESS_FDS + SQLITE_FDS + FILE_LOG_FDS + 64
        );
        settings.store.url = "postgres://p@h/db".into();
        settings.store.max_connections = 16;
        settings.log.kind = LogKind::Kafka;
        settings.log.kafka.brokers = "a:9092,b:9092,c:9092".into();
        settings.dedup.kind = DedupKind::Redis;
        settings.http.admin_addr = Some("127.0.0.1:9000".into());
        let production = FdReserve::estimate(&Settings::parse(settings).unwrap());
        assert_eq!(
            production.parts,
            vec![
                ("process", 64),
                ("store", 18),
                ("log", 5 * (6 + 4)),
                ("redis", 2),
                ("webhooks", 64),
                ("admin listener", 65),
            ]
        );
        assert!(production.describe().contains("store=18"));
    }

    #[test]
    fn a_limit_below_the_connections_and_the_reserve_is_a_shortfall() {
        let reserve = FdReserve {
            parts: vec![("process", 100)],
        };
        assert_eq!(shortfall(20_000, 50_000, &reserve), Some(19_900));
        assert_eq!(shortfall(1_024, 2_000, &reserve), Some(924));
        assert_eq!(shortfall(50, 10, &reserve), Some(0));
        assert_eq!(shortfall(20_000, 19_900, &reserve), None);
        assert_eq!(shortfall(u64::MAX, usize::MAX, &reserve), None);
    }

    #[test]
    fn raising_reaches_the_hard_limit() {
        let (before, now) = raise_to_hard().unwrap();
        assert!(now.soft >= before.soft);
        assert_eq!(now.hard, before.hard);
        if before.hard != u64::MAX {
            assert_eq!(now.soft, now.hard);
        }
    }
}
