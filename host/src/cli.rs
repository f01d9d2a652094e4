//! The `livecast` command line: `serve` (the default), `demo` and `watch`.

use clap::{Parser, Subcommand};

use crate::{Config, Host};

/// Live GPS positions over WebSocket. Every setting is an environment
/// variable (shown in brackets) or the matching flag.
#[derive(Parser)]
#[command(name = "livecast", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the live channel (the default when no command is given).
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

/// The arguments, with `serve` inserted when no command is named, so that
/// `livecast` alone (or with setting flags) serves, as a container expects.
fn arguments() -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let named = args.get(1).and_then(|a| a.to_str()).is_some_and(|a| {
        [
            "serve",
            "demo",
            "watch",
            "help",
            "-h",
            "--help",
            "-V",
            "--version",
        ]
        .contains(&a)
    });
    if !named {
        args.insert(1.min(args.len()), "serve".into());
    }
    args
}

/// Runs the command line and returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let config = match Cli::parse_from(arguments()).command {
        Command::Serve { config } => *config,
        Command::Demo(args) => return tool(crate::dev::demo::run(args)),
        Command::Watch(args) => return tool(crate::dev::watch::run(args)),
    };
    livecast_main(config)
}

fn livecast_main(config: Config) -> std::process::ExitCode {
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
        match host.run(crate::server::shutdown_signal()).await {
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
