//! `rewrite`: sets one top-level field of every record to a fixed JSON
//! value (ABI verdict 2, replace). A test stub for the host's end-to-end
//! tests.
//!
//! Configuration (both required; `value` is any JSON, `null` included):
//!
//! ```json
//! {"field": "speed", "value": 99}
//! ```
//!
//! The field is added when the record lacks it. Nothing stops a
//! configuration from breaking the record shape (`{"field": "latitude",
//! "value": "x"}`); the host then rejects the replacement as malformed, which
//! is also useful to test.

use livecast_plugin_sdk::prelude::*;

/// The plugin.
pub struct Rewrite {
    field: String,
    /// JSON text of the configured value, as written in the config.
    value: String,
}

impl Plugin for Rewrite {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["field", "value"])?;
        let field = cfg
            .str("field")?
            .filter(|s| !s.is_empty())
            .ok_or("rewrite: `field` is required")?;
        let value = cfg.get_raw("value").ok_or("rewrite: `value` is required")?;
        Ok(Rewrite {
            field: field.to_string(),
            value: value.to_string(),
        })
    }

    fn filter(&mut self, record: &mut Record) -> Verdict {
        // `value` is part of a validated config, so it is valid JSON and
        // set_raw cannot refuse it.
        let _ = record.set_raw(&self.field, &self.value);
        Verdict::Pass
    }
}

export_plugin!(Rewrite);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    #[test]
    fn sets_the_field() {
        let mut h = Harness::<Rewrite>::new(r#"{"field":"speed","value":99}"#).unwrap();
        let out = h.filter(&SampleRecord::new().build());
        let json = out.replaced().expect("replaced");
        let r = Record::new(json);
        assert_eq!(r.speed(), Some(99.0));
        assert_eq!(r.device_id(), Some("356307042441013"));
        assert_eq!(
            r.attribute("78"),
            Some(r#"{"__bigint":"18446744073709551615"}"#)
        );
    }

    #[test]
    fn any_json_value_and_new_fields() {
        let mut h =
            Harness::<Rewrite>::new(r#"{"field":"tag","value":{"a":[1,"x"],"b":null}}"#).unwrap();
        let out = h.filter(&SampleRecord::new().build());
        assert_eq!(
            Record::new(out.replaced().unwrap()).get_raw("tag"),
            Some(r#"{"a":[1,"x"],"b":null}"#)
        );
        let mut h = Harness::<Rewrite>::new(r#"{"field":"speed","value":null}"#).unwrap();
        assert!(matches!(
            h.filter(&SampleRecord::new().build()),
            Outcome::Replaced(_)
        ));
    }

    #[test]
    fn config_is_required() {
        assert!(Harness::<Rewrite>::new("{}").is_err());
        assert!(Harness::<Rewrite>::new(r#"{"field":"speed"}"#).is_err());
        assert!(Harness::<Rewrite>::new(r#"{"value":1}"#).is_err());
    }
}
