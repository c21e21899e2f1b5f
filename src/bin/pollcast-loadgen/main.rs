//! `pollcast-loadgen`: load for any pollcast, and what it measured.
//!
//! ```text
//! pollcast-loadgen votes --url http://127.0.0.1:8080 --token T --connections 64 --duration 10s \
//!     --polls 10 [--duplicate-ratio 0.1] [--subscribers 1000] [--probe] [--verify] [--json]
//! pollcast-loadgen votes --url http://127.0.0.1:8080,http://127.0.0.1:8081 --polls 12 \
//!     --retries 8 --subscribers 300 --watch all --reconnect --verify   # while processes restart
//! pollcast-loadgen merge a.json b.json [--json]
//! ```
//!
//! Votes go over HTTP/1.1 keep-alive connections, one request in flight per connection, each
//! with a unique userId (or a repeated one, for the duplicate ratio). Subscribers are
//! WebSocket clients of the first poll (of every poll with `--watch all`); for each counts
//! message they record the delay from the server's flush (`flushedAt`) to receipt, and any
//! update they missed (a gap in `seq`), and they check that no count ever goes down.
//! `--probe` times single votes from sending to being seen counted on a WebSocket.
//! `--verify` then waits for the counts to stop moving and compares them, poll by poll, with
//! the 202s.
//!
//! For a cluster whose processes stop and start during the run (a rolling restart):
//! `--retries` sends every vote with a voteId and retries one answered 5xx or left
//! unanswered with the same voteId on the next `--url` (a vote retried is still one vote,
//! counted once); `--reconnect` brings a subscriber whose server went away back on the next
//! `--url`, as the live page does; and the report gives the longest time any watched poll's
//! counts stood still while it was given votes.
//! With `--server-pid` (a server on this machine) the report also says how much CPU the
//! server and the load generator each spent per vote, and how idle the machine was.
//!
//! One process holds at most its open-file limit of connections, and one source address
//! about 28,000 ports per target (and 5000 connections on a pollcast, by default): a large
//! audience takes several `--source-addrs`, several `--url`s and several load generators,
//! whose JSON reports `merge` adds up.

mod client;
mod cpu;
mod net;
mod probe;
mod report;
mod retry;
mod stalls;
mod subscribers;
mod votes;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Load generator for pollcast.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send votes (and optionally watch with WebSocket subscribers).
    Votes(Box<votes::VoteArgs>),
    /// Merge the JSON reports (`votes --json`) of load generators run at the same time.
    Merge(MergeArgs),
}

#[derive(Debug, clap::Args)]
struct MergeArgs {
    /// JSON reports, one per load generator.
    #[arg(required = true)]
    reports: Vec<std::path::PathBuf>,
    /// Print the merged report as JSON.
    #[arg(long)]
    json: bool,
}

fn merge(args: MergeArgs) -> anyhow::Result<report::Report> {
    use anyhow::Context;
    let mut reports = Vec::with_capacity(args.reports.len());
    for path in &args.reports {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let report: report::Report = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a JSON report of `votes --json`", path.display())
        })?;
        reports.push(report);
    }
    let mut merged = report::Report::merge(&reports)?;
    merged.json = args.json;
    Ok(merged)
}

/// Parses `10s`, `500ms`, `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Votes(args) => votes::run(*args).await,
        Command::Merge(args) => merge(args),
    };
    match result {
        Ok(report) => {
            report.print();
            if report.verified_exact() == Some(false) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(err) => {
            eprintln!("pollcast-loadgen: {err:#}");
            ExitCode::from(2)
        }
    }
}
