//! The `livecast` command line: `serve` (the default), `demo` and `watch`.

use clap::{Parser, Subcommand};

use crate::{Config, Host};

/// Live GPS positions over WebSocket. Every setting is an environment
/// variable (shown in brackets) or the matching flag.
#[derive(Parser)]
#[command(
    name = "livecast",
    version,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    config: Option<Config>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the live channel (the default).
    Serve {
        #[command(flatten)]
        config: Box<Config>,
    },
    /// Run the whole path on local Redis and PostgreSQL with a development-only
    /// Directus stand-in and synthetic moving trackers.
    Demo(crate::dev::demo::DemoArgs),
    /// Connect to a host, subscribe, and print every message.
    Watch(crate::dev::watch::WatchArgs),
}

/// Runs the command line and returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Serve { config }) => *config,
        Some(Command::Demo(args)) => return tool(crate::dev::demo::run(args)),
        Some(Command::Watch(args)) => return tool(crate::dev::watch::run(args)),
        None => match cli.config {
            Some(c) => c,
            None => {
                eprintln!("livecast: missing configuration");
                return std::process::ExitCode::from(2);
            }
        },
    };
    crate::logging::init(config.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("livecast: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let host = match Host::bind(config).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("livecast: {e:#}");
                return std::process::ExitCode::from(2);
            }
        };
        match host.run(shutdown_signal()).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("livecast: {e:#}");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

/// Runs a development subcommand to completion.
fn tool(f: impl std::future::Future<Output = anyhow::Result<()>>) -> std::process::ExitCode {
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(f));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("livecast: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM (orchestrators) or SIGINT (a terminal).
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
