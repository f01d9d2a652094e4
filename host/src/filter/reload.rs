//! Hot reload of the chain file: on SIGHUP, or when the file or a module it
//! names changes. The new chain is read, compiled and `init`ed off the record
//! path; only a chain that loaded completely is sent to the record path, on
//! a channel of its own, and swapped in before the next batch. Anything
//! wrong keeps the running chain.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Chain;
use super::config::ChainSpec;
use crate::metrics::{FilterMetrics, inc};

/// A digest of everything a chain is made of: two chains with the same
/// fingerprint behave the same.
pub fn fingerprint(spec: &ChainSpec) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(spec.max_module_bytes.to_le_bytes());
    for p in &spec.plugins {
        for part in [
            p.name.as_bytes(),
            p.origin.as_bytes(),
            &p.wasm,
            p.config_json.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update([p.policy as u8]);
        h.update((p.timeout.as_micros() as u64).to_le_bytes());
        h.update((p.memory_limit as u64).to_le_bytes());
    }
    h.finalize().into()
}

/// Watches `path` until cancelled. Without a chain file (the default chain)
/// there is nothing to reload, but SIGHUP is still taken so that it does not
/// end the process.
pub async fn watch(
    path: Option<PathBuf>,
    started_with: [u8; 32],
    every: Duration,
    metrics: Arc<FilterMetrics>,
    chains: mpsc::Sender<Box<Chain>>,
    cancel: CancellationToken,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut running = started_with;
    let mut last_seen = started_with;
    let mut last_error = String::new();
    loop {
        let forced = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = async {
                match hangup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
            _ = tokio::time::sleep(every) => false,
        };
        let Some(p) = path.clone() else {
            if forced {
                tracing::info!(
                    "SIGHUP: no LIVE_FILTER_CHAIN file to reload; the default chain stays"
                );
            }
            continue;
        };
        let read = tokio::task::spawn_blocking(move || ChainSpec::read(&p)).await;
        let spec = match read {
            Ok(Ok(spec)) => spec,
            Ok(Err(e)) => {
                // Report a broken file once per distinct problem, not once
                // per poll.
                let e = format!("{:#}", anyhow::Error::new(e));
                if forced || e != last_error {
                    inc(&metrics.reloads, "result", "error");
                    tracing::error!(error = %e, "filter chain reload failed; keeping the running chain");
                    last_error = e;
                }
                continue;
            }
            Err(_) => continue,
        };
        last_error.clear();
        let print = fingerprint(&spec);
        if !forced && (print == running || print == last_seen) {
            continue;
        }
        last_seen = print;
        let m = metrics.clone();
        let loaded = tokio::task::spawn_blocking(move || Chain::load(&spec, &m)).await;
        match loaded {
            Ok(Ok(chain)) => {
                let names = chain.names();
                if chains.send(Box::new(chain)).await.is_err() {
                    return;
                }
                running = print;
                inc(&metrics.reloads, "result", "ok");
                tracing::info!(plugins = ?names, "filter chain reloaded");
            }
            Ok(Err(e)) => {
                inc(&metrics.reloads, "result", "error");
                let e = format!("{:#}", anyhow::Error::new(e));
                tracing::error!(error = %e, "filter chain reload failed; keeping the running chain");
            }
            Err(_) => inc(&metrics.reloads, "result", "error"),
        }
    }
}
