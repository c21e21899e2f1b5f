//! Where the CPU went during the load: this load generator's, the server's (`--server-pid`,
//! same machine), named other processes' (`--watch-pid redis=PID`: the server's dependencies)
//! and the machine's idle share, from Linux's `/proc`.
//!
//! Why a load generator reports this: on a shared machine the load generator and the server
//! compete for the same cores, so a throughput figure alone cannot say whether the server,
//! the load or waiting (idle cores) set it. Elsewhere than Linux the figures are absent.

use std::collections::{BTreeMap, HashMap};
use std::fs;

use serde::{Deserialize, Serialize};

/// Processes to watch beside the server: a name, and the processes whose CPU it adds up.
#[derive(Debug, Clone, PartialEq)]
pub struct Watched {
    pub name: String,
    pub pids: Vec<u32>,
    /// Their children too, found afresh at each sample: Postgres forks a process per
    /// connection, and a pool opens some during the load.
    pub children: bool,
}

impl std::str::FromStr for Watched {
    type Err = String;

    /// `NAME=PID[,PID...]`, or `NAME=PID+` for a process and its children.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, pids) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected NAME=PID[,PID...] or NAME=PID+"))?;
        let (pids, children) = match pids.strip_suffix('+') {
            Some(parent) => (parent, true),
            None => (pids, false),
        };
        if name.is_empty() {
            return Err(format!("'{s}': the name is empty"));
        }
        let pids = pids
            .split(',')
            .map(|pid| {
                pid.trim()
                    .parse::<u32>()
                    .map_err(|_| format!("'{s}': '{pid}' is not a process id"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            name: name.to_owned(),
            pids,
            children,
        })
    }
}

/// One reading of the counters.
#[derive(Debug, Clone)]
pub struct CpuSample {
    /// This process's user + system time, in clock ticks.
    own: Option<u64>,
    /// The server's, in clock ticks.
    server: Option<u64>,
    /// The machine's (idle, total) time over all cores, in clock ticks.
    machine: Option<(u64, u64)>,
    /// Each watched name's processes and their clock ticks (those running then).
    watched: Vec<(String, HashMap<u32, u64>)>,
}

/// CPU use between two samples.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuUse {
    /// Logical cores of the machine.
    pub cores: usize,
    /// CPU seconds this load generator used.
    pub loadgen_cpu_s: Option<f64>,
    /// CPU seconds the server used (with `--server-pid`).
    pub server_cpu_s: Option<f64>,
    /// Load generator CPU per accepted vote, in microseconds.
    pub loadgen_us_per_vote: Option<f64>,
    /// Server CPU per accepted vote, in microseconds.
    pub server_us_per_vote: Option<f64>,
    /// Share of the machine's CPU time (all cores) that was idle, 0 to 1.
    pub machine_idle: Option<f64>,
    /// CPU seconds of each watched name (`--watch-pid`).
    #[serde(default)]
    pub watched_cpu_s: BTreeMap<String, f64>,
    /// CPU per accepted vote of each watched name, in microseconds.
    #[serde(default)]
    pub watched_us_per_vote: BTreeMap<String, f64>,
}

/// User + system ticks of a process: fields 14 and 15 of `/proc/<pid>/stat`, counted after
/// the parenthesised command name (which may itself hold spaces).
fn process_ticks(pid: &str) -> Option<u64> {
    parse_process_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The fields of a `/proc/<pid>/stat` line after the parenthesised command name (which may
/// itself hold spaces and parentheses): the state first.
fn fields_after_name(stat: &str) -> Option<Vec<&str>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace().collect())
}

fn parse_process_ticks(stat: &str) -> Option<u64> {
    let fields = fields_after_name(stat)?;
    // After the name, field 3 (state) comes first: utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The processes whose parent is one of `parents` (field 4 of `/proc/<pid>/stat`).
fn children_of(parents: &[u32]) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                .is_some_and(|parent| parents.contains(&parent))
        })
        .collect()
}

/// The parent's process id in a `/proc/<pid>/stat` line.
fn parent_of(stat: &str) -> Option<u32> {
    fields_after_name(stat)?.get(1)?.parse().ok()
}

/// (idle + iowait, total) ticks over all cores, from the first line of `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    let total = ticks.iter().take(8).sum();
    Some((ticks.get(3)? + ticks.get(4).unwrap_or(&0), total))
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

impl CpuSample {
    /// Reads the counters now; `server_pid` is the server's process id on this machine.
    pub fn now(server_pid: Option<u32>, watched: &[Watched]) -> Self {
        Self {
            own: process_ticks("self"),
            server: server_pid.and_then(|pid| process_ticks(&pid.to_string())),
            machine: machine_ticks(),
            watched: watched
                .iter()
                .map(|w| {
                    let mut pids = w.pids.clone();
                    if w.children {
                        pids.extend(children_of(&w.pids));
                    }
                    let ticks = pids
                        .into_iter()
                        .filter_map(|pid| Some((pid, process_ticks(&pid.to_string())?)));
                    (w.name.clone(), ticks.collect())
                })
                .collect(),
        }
    }

    /// What was used from `self` to `later`, for `votes` accepted votes.
    pub fn until(&self, later: &CpuSample, votes: u64) -> CpuUse {
        let hz = ticks_per_second();
        let seconds = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / hz);
        let per_vote = |s: Option<f64>| s.filter(|_| votes > 0).map(|s| s * 1e6 / votes as f64);
        let loadgen = seconds(self.own, later.own);
        let server = seconds(self.server, later.server);
        // Why per process: one that started between the samples (a new Postgres backend)
        // counts from zero; one that exited is absent from the later one and not counted.
        let watched: BTreeMap<String, f64> = self
            .watched
            .iter()
            .zip(&later.watched)
            .map(|((name, before), (_, after))| {
                let ticks: u64 = after
                    .iter()
                    .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
                    .sum();
                (name.clone(), ticks as f64 / hz)
            })
            .collect();
        let machine_idle = match (self.machine, later.machine) {
            (Some((idle0, total0)), Some((idle1, total1))) if total1 > total0 => {
                Some((idle1 - idle0) as f64 / (total1 - total0) as f64)
            }
            _ => None,
        };
        CpuUse {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            loadgen_cpu_s: loadgen,
            server_cpu_s: server,
            loadgen_us_per_vote: per_vote(loadgen),
            server_us_per_vote: per_vote(server),
            machine_idle,
            watched_cpu_s: watched.clone(),
            watched_us_per_vote: per_vote_each(&watched, per_vote),
        }
    }
}

/// Each name's CPU seconds as microseconds per vote.
fn per_vote_each(
    seconds: &BTreeMap<String, f64>,
    per_vote: impl Fn(Option<f64>) -> Option<f64>,
) -> BTreeMap<String, f64> {
    seconds
        .iter()
        .filter_map(|(name, s)| Some((name.clone(), per_vote(Some(*s))?)))
        .collect()
}

impl CpuUse {
    /// The CPU of several load generators run together against one server (`accepted`: their
    /// votes): their own CPU adds up; the server's was measured by each over about the same
    /// time, so the largest reading stands for it; the machine's idle share is the mean.
    pub fn merge(all: &[&CpuUse], accepted: u64) -> Self {
        let sum = |f: fn(&CpuUse) -> Option<f64>| all.iter().map(|c| f(c)).sum::<Option<f64>>();
        let loadgen = sum(|c| c.loadgen_cpu_s);
        let server = all
            .iter()
            .filter_map(|c| c.server_cpu_s)
            .max_by(f64::total_cmp);
        let per_vote = |s: Option<f64>| {
            s.filter(|_| accepted > 0)
                .map(|s| s * 1e6 / accepted as f64)
        };
        let idle: Vec<f64> = all.iter().filter_map(|c| c.machine_idle).collect();
        // Like the server's: each load generator watched the same processes over about the
        // same time, so the largest reading stands for each.
        let mut watched = BTreeMap::<String, f64>::new();
        for (name, s) in all.iter().flat_map(|c| &c.watched_cpu_s) {
            let most = watched.entry(name.clone()).or_insert(*s);
            *most = most.max(*s);
        }
        Self {
            cores: all.iter().map(|c| c.cores).max().unwrap_or(1),
            loadgen_cpu_s: loadgen,
            server_cpu_s: server,
            loadgen_us_per_vote: per_vote(loadgen),
            server_us_per_vote: per_vote(server),
            machine_idle: (!idle.is_empty()).then(|| idle.iter().sum::<f64>() / idle.len() as f64),
            watched_us_per_vote: per_vote_each(&watched, per_vote),
            watched_cpu_s: watched,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_while_working() {
        let me = Some(std::process::id());
        let watched = [Watched {
            name: "me".into(),
            pids: vec![std::process::id(), u32::MAX],
            children: false,
        }];
        let before = CpuSample::now(me, &watched);
        // Spin until 100 ms of CPU are counted, not for 100 ms of wall time: on a loaded
        // machine the thread may get only part of a core.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        let used = loop {
            for _ in 0..1_000_000 {
                x = x.wrapping_mul(31).wrapping_add(1);
            }
            let used = before.until(&CpuSample::now(me, &watched), 1000);
            if used.loadgen_cpu_s.expect("Linux /proc") >= 0.1 {
                break used;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no CPU time counted in 10 s"
            );
        };
        std::hint::black_box(x);
        // Read one after the other, so a clock tick may fall between the two.
        let (own, server) = (used.loadgen_cpu_s.unwrap(), used.server_cpu_s.unwrap());
        assert!(
            (own - server).abs() <= 0.02,
            "same process: {own} s and {server} s"
        );
        assert!(used.loadgen_us_per_vote.unwrap() >= 50.0);
        let watched = used.watched_us_per_vote["me"];
        let own = used.loadgen_us_per_vote.unwrap();
        assert!(
            (watched - own).abs() <= 20.0,
            "the watched process is this one (and no process {}): {watched} and {own} us",
            u32::MAX
        );
        let idle = used.machine_idle.expect("Linux /proc/stat");
        assert!((0.0..=1.0).contains(&idle));
    }

    #[test]
    fn a_process_name_with_spaces_and_parentheses_does_not_shift_the_fields() {
        let stat = "4242 (a) b (c) S 1 2 3 4 5 6 7 8 9 10 70 30 0 0 20 0 1";
        assert_eq!(parse_process_ticks(stat), Some(100));
        assert_eq!(parse_process_ticks("4242 (short) S 1 2"), None);
        assert!(process_ticks("0").is_none(), "no process 0 in /proc");
    }

    #[test]
    fn watched_processes_are_named_with_their_ids() {
        let w: Watched = "postgres=10,11, 12".parse().unwrap();
        assert_eq!(w.name, "postgres");
        assert_eq!(w.pids, [10, 11, 12]);
        assert!("redis".parse::<Watched>().is_err());
        assert!("=1".parse::<Watched>().is_err());
        assert!("redis=x".parse::<Watched>().is_err());
        let tree: Watched = "postgres=7+".parse().unwrap();
        assert_eq!((tree.pids, tree.children), (vec![7], true));
    }

    #[test]
    fn a_child_process_is_found_under_its_parent() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let found = children_of(&[std::process::id()]);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(
            found.contains(&child.id()),
            "{found:?} holds {}",
            child.id()
        );
        assert_eq!(parent_of("9 (a) b) S 4242 1"), Some(4242));
    }
}
