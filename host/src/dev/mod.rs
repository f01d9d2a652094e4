//! Development tools: the demo and its map page, a terminal client, the dev
//! schema and the **development-only** Directus stand-in. Nothing here runs in
//! `livecast serve`.

pub mod demo;
pub mod directus_standin;
pub mod page;
pub mod schema;
pub mod watch;
