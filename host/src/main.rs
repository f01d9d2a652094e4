use clap::{Parser, Subcommand};
use livecast::{Config, Host};

/// Live GPS positions over WebSocket. Every setting is an environment
/// variable (shown in brackets) or the matching flag.
#[derive(Parser)]
#[command(name = "livecast", version)]
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
        config: Config,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let config = match cli.command {
        Some(Command::Serve { config }) => config,
        None => match cli.config {
            Some(c) => c,
            None => {
                eprintln!("livecast: missing configuration");
                return std::process::ExitCode::from(2);
            }
        },
    };
    livecast::logging::init(config.log_format);
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
