//! `drop-device`: drops every record of one device and passes the others
//! unchanged. A test stub for the host's end-to-end tests.
//!
//! Configuration (required):
//!
//! ```json
//! {"device_id": "356307042441013"}
//! ```

use livecast_plugin_sdk::prelude::*;

/// The plugin.
pub struct DropDevice {
    imei: String,
}

impl Plugin for DropDevice {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["device_id"])?;
        let imei = cfg
            .str("device_id")?
            .filter(|s| !s.is_empty())
            .ok_or("drop-device: `device_id` is required")?;
        Ok(DropDevice {
            imei: imei.to_string(),
        })
    }

    fn filter(&mut self, record: &mut Record) -> Verdict {
        if record.device_id() == Some(self.imei.as_str()) {
            Verdict::Drop
        } else {
            Verdict::Pass
        }
    }
}

export_plugin!(DropDevice);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    #[test]
    fn drops_only_that_device() {
        let mut h = Harness::<DropDevice>::new(r#"{"device_id":"111"}"#).unwrap();
        let a = SampleRecord::new().device("111").build();
        let b = SampleRecord::new().device("222").build();
        assert_eq!(
            h.filter_batch(&[&a, &b, "{}", "junk"]),
            [
                Outcome::Dropped,
                Outcome::Passed,
                Outcome::Passed,
                Outcome::Passed
            ]
        );
    }

    #[test]
    fn config_is_required() {
        assert!(
            Harness::<DropDevice>::new("{}")
                .unwrap_err()
                .contains("device_id")
        );
        assert!(Harness::<DropDevice>::new(r#"{"device_id":""}"#).is_err());
        assert!(Harness::<DropDevice>::new(r#"{"device_id":111}"#).is_err());
        assert!(Harness::<DropDevice>::new(r#"{"device":"111"}"#).is_err());
    }
}
