//! `spin`: loops forever on the selected records and passes the others, to
//! exercise the host's `timeout` failure (epoch deadline). A test stub.
//!
//! Configuration:
//!
//! ```json
//! {"device_id": "356307042441013"}
//! ```
//!
//! spins on that device's records only; `{}` spins on every record.

use livecast_plugin_sdk::prelude::*;

/// The plugin.
pub struct Spin {
    device: Option<String>,
}

impl Spin {
    /// Whether this record starts the endless loop.
    pub fn selects(&self, record: &Record) -> bool {
        match &self.device {
            None => true,
            Some(d) => record.device_id() == Some(d.as_str()),
        }
    }
}

impl Plugin for Spin {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["device_id"])?;
        Ok(Spin {
            device: cfg.str("device_id")?.map(str::to_string),
        })
    }

    fn filter(&mut self, record: &mut Record) -> Verdict {
        if self.selects(record) {
            spin();
        }
        Verdict::Pass
    }
}

fn spin() -> ! {
    // black_box keeps the loop a real loop: the host's epoch check sits on
    // its back edge.
    let mut n: u64 = 0;
    loop {
        n = core::hint::black_box(n.wrapping_add(1));
    }
}

export_plugin!(Spin);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    // The loop itself cannot run in a test; the selection can.
    #[test]
    fn selection() {
        let mut h = Harness::<Spin>::new(r#"{"device_id":"111"}"#).unwrap();
        assert_eq!(
            h.filter(&SampleRecord::new().device("222").build()),
            Outcome::Passed
        );
        let one = SampleRecord::new().device("111").build();
        assert!(h.plugin().selects(&Record::new(&one)));
        let all = Harness::<Spin>::new("{}")
            .unwrap()
            .plugin()
            .selects(&Record::new("{}"));
        assert!(all);
    }
}
