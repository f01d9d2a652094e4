//! livecast: live GPS positions from a Redis stream to browser maps over
//! WebSocket, through a chain of sandboxed WebAssembly filters.
//!
//! One record's way, one direction only:
//!
//! ```text
//! consumer   XREADGROUP batch (own group, NOACK)
//! broadcast  decode once → filter::Chain → latest → route via devices + registry
//! outbox     per connection: ordered control lane + one slot per (topic, device)
//! connection writer drains the outbox, one flush per batch of frames
//! ```
//!
//! One client's way: `server` (upgrade) → `auth` (Origin, Directus
//! `/users/me`) → `connection` → `protocol` (strict frames) → `directus`
//! (authorize the event) → `registry` → `snapshot` → `outbox`.

pub mod auth;
pub mod broadcast;
pub mod cli;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod dev;
pub mod devices;
pub mod directus;
pub mod filter;
pub mod latest;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod ratelimit;
pub mod record;
pub mod registry;
pub mod server;
pub mod snapshot;
pub mod ws;

pub use config::Config;
pub use server::Host;
