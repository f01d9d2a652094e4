//! End-to-end tests of the live channel: a real host in this process (or as
//! a real process where signals matter), real Redis, real PostgreSQL, real
//! WebSocket clients, and the Directus stand-in.

mod auth;
mod filters;
mod lifecycle;
mod load_smoke;
mod outage;
mod page;
mod plan;
mod resume;
mod shared_snapshot;
mod slow;
mod stream;
mod subscribe;
mod ws_conformance;
