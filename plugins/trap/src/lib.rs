//! `trap`: traps (wasm `unreachable`) on the selected records and passes the
//! others, to exercise the host's `trap` failure handling. A test stub.
//!
//! Configuration:
//!
//! ```json
//! {"device_id": "356307042441013"}
//! ```
//!
//! traps on that device's records only; `{}` traps on every record.

use livecast_plugin_sdk::prelude::*;

/// The plugin.
pub struct Trap {
    device: Option<String>,
}

impl Trap {
    /// Whether this record triggers the trap.
    pub fn selects(&self, record: &Record) -> bool {
        match &self.device {
            None => true,
            Some(d) => record.device_id() == Some(d.as_str()),
        }
    }
}

impl Plugin for Trap {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["device_id"])?;
        Ok(Trap {
            device: cfg.str("device_id")?.map(str::to_string),
        })
    }

    fn filter(&mut self, record: &mut Record) -> Verdict {
        if self.selects(record) {
            trap();
        }
        Verdict::Pass
    }
}

fn trap() -> ! {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("trap plugin: selected record");
}

export_plugin!(Trap);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    #[test]
    fn passes_other_devices() {
        let mut h = Harness::<Trap>::new(r#"{"device_id":"111"}"#).unwrap();
        assert_eq!(
            h.filter(&SampleRecord::new().device("222").build()),
            Outcome::Passed
        );
    }

    #[test]
    #[should_panic(expected = "trap plugin")]
    fn traps_on_the_device() {
        let mut h = Harness::<Trap>::new(r#"{"device_id":"111"}"#).unwrap();
        let _ = h.filter(&SampleRecord::new().device("111").build());
    }

    #[test]
    #[should_panic(expected = "trap plugin")]
    fn traps_on_everything_without_config() {
        let mut h = Harness::<Trap>::new("{}").unwrap();
        let _ = h.filter("{}");
    }
}
