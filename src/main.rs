//! The `pollcast` binary: parse the command line, load settings, run until a signal.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use pollcast::telemetry::{self, LogFormat};
use pollcast::{Application, Settings};

/// Why jemalloc and not glibc malloc: with 10,000 subscribers, the buffers of their
/// handshakes are freed between long-lived session state, and glibc kept that memory (RSS
/// 170-180 MB against jemalloc's 111-114 MB in alternating runs); jemalloc also cost less
/// server CPU per vote. docs/BENCHMARKS.md has the figures.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Live-polling vote service.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Config file. Without it ./config.toml is used if present, else built-in defaults.
    /// Any key can be overridden with POLLCAST__SECTION__KEY environment variables.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Log line format.
    #[arg(
        long,
        value_enum,
        default_value = "pretty",
        env = "POLLCAST_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve,
    /// Apply the store's migrations and exit (they are also applied at every start).
    Migrate,
    /// Print a voter token signed with voters.secret (for trying out signed identity; your
    /// backend issues them in production, see README).
    VoterToken {
        /// The voter's userId.
        #[arg(long)]
        user: String,
        /// How long the token is valid, in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let (path, required) = match cli.config {
        Some(path) => (path, true),
        None => (PathBuf::from("config.toml"), false),
    };
    let settings = match Settings::load(&path, required) {
        Ok(settings) => settings,
        Err(err) => {
            tracing::error!(config = %path.display(), "configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::VoterToken { user, ttl_secs }) = &cli.command {
        let Some(tokens) = pollcast::startup::voter_tokens(&settings) else {
            tracing::error!("voter tokens need voters.identity = \"signed\" and voters.secret");
            return ExitCode::from(2);
        };
        let expires = (pollcast_actors::domain::now_millis() / 1000) as u64 + ttl_secs;
        println!("{}", tokens.issue(user, expires));
        return ExitCode::SUCCESS;
    }
    if let Some(Command::Migrate) = cli.command {
        let background = pollcast::background::Background::new();
        let migrated = pollcast::startup::open_store(&settings, &background).await;
        background.stop_all().await;
        return match migrated {
            Ok(_) => {
                tracing::info!("migrations applied");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!("migration failed: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!("could not start: {err:#}");
            return ExitCode::FAILURE;
        }
    };
    match app.run_until_stopped(shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}
