//! `reject-config`: its `init` rejects every configuration, for the host's
//! "bad chain entry" test. The message it logs at level 0 (and so the reason
//! the operator sees) is [`MESSAGE`].

use livecast_plugin_sdk::prelude::*;

/// Why every configuration is rejected.
pub const MESSAGE: &str = "reject-config: this test plugin rejects every configuration";

/// The plugin (never instantiated).
pub struct RejectConfig;

impl Plugin for RejectConfig {
    fn init(_config: &str) -> Result<Self, String> {
        Err(MESSAGE.to_string())
    }

    fn filter(&mut self, _record: &mut Record) -> Verdict {
        Verdict::Pass
    }
}

export_plugin!(RejectConfig);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::log::{self, Level};
    use livecast_plugin_sdk::testing::Harness;

    #[test]
    fn rejects_and_logs_at_error() {
        let _ = log::take();
        for cfg in ["{}", "null", r#"{"a":1}"#] {
            assert_eq!(
                Harness::<RejectConfig>::new(cfg).err().as_deref(),
                Some(MESSAGE)
            );
        }
        assert!(
            log::take()
                .iter()
                .all(|(level, msg)| *level == Level::Error && msg == MESSAGE)
        );
    }
}
