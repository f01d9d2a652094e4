//! A TCP proxy in front of a real service, so a test can take the service
//! "down" (cut every connection, refuse new ones) and bring it back, or
//! leave its open connections silently dead (a failover whose resets never
//! arrive), without stopping the shared Redis or PostgreSQL other tests use.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    /// Bumped on every cut; live connections watch it and end.
    generation: watch::Sender<u64>,
    /// Bumped on every freeze; live connections watch it and go silent.
    frozen: watch::Sender<u64>,
    /// Frozen connections, kept open (neither forwarded nor closed).
    silent: Arc<Mutex<Vec<(TcpStream, TcpStream)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.silent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl Proxy {
    /// Proxies to `upstream` (host:port).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let up = Arc::new(AtomicBool::new(true));
        let (generation, _) = watch::channel(0u64);
        let (frozen, _) = watch::channel(0u64);
        let silent = Arc::new(Mutex::new(Vec::new()));
        let gen_tx = generation.clone();
        let frozen_tx = frozen.clone();
        let held = silent.clone();
        let up2 = up.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !up2.load(Ordering::Relaxed) {
                    continue; // dropped: the connection is refused/reset
                }
                let mut cut = gen_tx.subscribe();
                let mut freeze = frozen_tx.subscribe();
                let upstream = upstream.clone();
                let held = held.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let silenced = tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
                        _ = cut.changed() => false,
                        _ = freeze.changed() => true,
                    };
                    if silenced {
                        held.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((client, server));
                    }
                });
            }
        });
        Proxy {
            addr,
            up,
            generation,
            frozen,
            silent,
            task,
        }
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Leaves every open connection silently dead: nothing is forwarded and
    /// nothing closed, as after a failover whose resets never reach the
    /// client. New connections are forwarded as usual.
    pub fn freeze(&self) {
        self.frozen.send_modify(|g| *g += 1);
    }

    /// Accepts connections again.
    pub fn up(&self) {
        self.up.store(true, Ordering::Relaxed);
    }
}

/// `host:port` of a `scheme://[user@]host:port/...` URL.
pub fn authority(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.split(['/', '?']).next().unwrap_or(rest);
    rest.rsplit_once('@').map_or(rest, |(_, h)| h).to_owned()
}

/// `url` with its `host:port` replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    url.replacen(&authority(url), &addr.to_string(), 1)
}
