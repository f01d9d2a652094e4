//! `memory-bomb`: on the selected records, allocates and touches memory in
//! 1 MiB chunks without bound, to exercise the host's `memory` failure (the
//! instance's memory cap). Passes the other records. A test stub.
//!
//! When the allocator's `memory.grow` is refused the Rust allocation fails
//! and the module aborts (traps), unless the host already trapped on the
//! grow.
//!
//! Configuration:
//!
//! ```json
//! {"device_id": "356307042441013"}
//! ```
//!
//! bombs on that device's records only; `{}` on every record.

use livecast_plugin_sdk::prelude::*;

/// The plugin.
pub struct MemoryBomb {
    device: Option<String>,
}

impl MemoryBomb {
    /// Whether this record sets the bomb off.
    pub fn selects(&self, record: &Record) -> bool {
        match &self.device {
            None => true,
            Some(d) => record.device_id() == Some(d.as_str()),
        }
    }
}

impl Plugin for MemoryBomb {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["device_id"])?;
        Ok(MemoryBomb {
            device: cfg.str("device_id")?.map(str::to_string),
        })
    }

    fn filter(&mut self, record: &mut Record) -> Verdict {
        if self.selects(record) {
            explode();
        }
        Verdict::Pass
    }
}

fn explode() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        // A non-zero fill writes every page, so the memory is really used;
        // black_box stops the optimizer from proving the hoard dead.
        hoard.push(vec![0xA5; 1 << 20]);
        core::hint::black_box(&hoard);
    }
}

export_plugin!(MemoryBomb);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    // Exploding natively would exhaust the test machine; only the selection
    // is tested here.
    #[test]
    fn selection() {
        let mut h = Harness::<MemoryBomb>::new(r#"{"device_id":"111"}"#).unwrap();
        assert_eq!(
            h.filter(&SampleRecord::new().device("222").build()),
            Outcome::Passed
        );
        let one = SampleRecord::new().device("111").build();
        assert!(h.plugin().selects(&Record::new(&one)));
        assert!(Harness::<MemoryBomb>::new(r#"{"device_id":1}"#).is_err());
    }
}
