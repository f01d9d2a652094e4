//! The smallest configurable plugin: drops the records of one device.
//!
//! ```sh
//! cargo build --release --target wasm32-unknown-unknown --example minimal
//! ```

use livecast_plugin_sdk::prelude::*;

/// Config: `{"device_id": "<imei>"}`.
pub struct DropDevice {
    imei: String,
}

impl Plugin for DropDevice {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["device_id"])?;
        let imei = cfg.str("device_id")?.ok_or("`device_id` is required")?;
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
