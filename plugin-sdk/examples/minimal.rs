//! A complete plugin in a few lines: drops positions computed from fewer
//! than 4 satellites.
//!
//! ```sh
//! cargo build --release --target wasm32-unknown-unknown --example minimal
//! ```

use livecast_plugin_sdk::prelude::*;

fn enough_satellites(record: &mut Record) -> Verdict {
    match record.satellites() {
        Some(n) if n < 4 => Verdict::Drop,
        _ => Verdict::Pass,
    }
}

filter!(enough_satellites);
