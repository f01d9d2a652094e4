//! livecast: live GPS positions from a Redis stream to browser maps over
//! WebSocket, through a chain of sandboxed WebAssembly filters.
//!
//! An embedder needs little: a [`Config`] (every setting, read from the
//! environment by the binary), a [`Host`] bound from it and run until a
//! shutdown future completes, and the wire types of [`protocol`]. Everything
//! else is the host's own business and private to this crate; the tests and
//! benchmarks reach further through the `test-util` feature.
//!
//! One record's way, one direction only:
//!
//! ```text
//! consumer   XREADGROUP batch (own group, NOACK)
//! broadcast  decode once → filter::Chain → latest → route via devices + registry
//! outbox     per connection: ordered control lane + positions in arrival order
//! flusher    writes quiet connections at once, busy ones at their tick: one
//!            vectored write each (the connection's task writes control
//!            messages and waits out a blocked socket)
//! ```
//!
//! One client's way: `server` (upgrade) → `auth` (Origin, Directus
//! `/users/me`) → `connection` → `protocol` (strict frames) → `directus`
//! (authorize the event) → `registry` → `snapshots` (one per event) →
//! `outbox`.

#![forbid(unsafe_code)]

mod auth;
mod broadcast;
pub mod cli;
mod config;
mod connection;
mod consumer;
mod deflate;
mod dev;
mod devices;
mod directus;
mod filter;
mod flusher;
mod ids;
mod latest;
mod logging;
mod metrics;
mod outbox;
pub mod protocol;
mod ratelimit;
mod record;
mod registry;
mod resume;
mod server;
mod snapshot;
mod snapshots;
mod state;
mod ws;

pub use config::{Config, LogFormat};
pub use server::Host;

/// What the end-to-end tests and the benchmarks need of the host's insides.
/// Not a stable interface.
#[cfg(feature = "test-util")]
#[doc(hidden)]
pub mod test_util {
    pub use crate::dev::{demo, directus_standin, page, schema};
    pub use crate::filter::config::{
        ChainSpec, DEFAULT_MAX_MODULE_BYTES, DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT, PLUGIN_DIR,
        PluginSpec, Policy,
    };
    pub use crate::filter::{AudienceRef, Chain, Record};
    pub use crate::metrics::{FailureLabel, FilterMetrics, Metrics};
    pub use crate::record::{Malformed, Position};
    pub use crate::server::{Inspector, install_crypto};
    pub use crate::snapshot::SNAPSHOT_SQL;
}
