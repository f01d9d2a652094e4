//! `attributes-allowlist`: strips every IO attribute whose id is not in the
//! list, keeping the rest of the record (and the kept attribute values, e.g.
//! `{"__bigint": "…"}`) byte for byte. A record with nothing to strip passes
//! unchanged (ABI verdict 0, no rewrite), so the common case costs one scan
//! of the record.
//!
//! Configuration (`keep` required; `[]` strips every attribute):
//!
//! ```json
//! {"keep": ["239", "66", "21"]}
//! ```

use livecast_plugin_sdk::prelude::*;

/// The plugin.
pub struct AttributesAllowlist {
    keep: Vec<String>,
}

impl Plugin for AttributesAllowlist {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["keep"])?;
        let keep = cfg
            .str_list("keep")?
            .ok_or("attributes-allowlist: `keep` (a list of IO ids) is required")?;
        Ok(AttributesAllowlist { keep })
    }

    fn filter(&mut self, record: &mut Record) -> Verdict {
        // A linear search beats hashing for the handful of ids a map uses.
        record.retain_attributes(|id, _| self.keep.iter().any(|k| k == id));
        Verdict::Pass
    }
}

export_plugin!(AttributesAllowlist);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    fn harness(cfg: &str) -> Harness<AttributesAllowlist> {
        Harness::new(cfg).unwrap()
    }

    #[test]
    fn strips_unlisted_attributes_verbatim() {
        let mut h = harness(r#"{"keep":["66","78"]}"#);
        let input = SampleRecord::new().build();
        let out = h.filter(&input);
        assert_eq!(
            out.replaced(),
            Some(input.replace(r#"{"239":1,"66":12841,"78":{"__bigint":"18446744073709551615"},"385":{"__buffer_b64":"AQID"}}"#, r#"{"66":12841,"78":{"__bigint":"18446744073709551615"}}"#).as_str())
        );
    }

    #[test]
    fn passes_when_nothing_is_stripped() {
        let mut h = harness(r#"{"keep":["239","66","78","385","1"]}"#);
        assert_eq!(h.filter(&SampleRecord::new().build()), Outcome::Passed);
        assert_eq!(
            h.filter(&SampleRecord::new().no_attributes().build()),
            Outcome::Passed
        );
        let mut no_attrs = SampleRecord::new().build();
        no_attrs.truncate(no_attrs.find(",\"attributes\"").unwrap());
        no_attrs.push('}');
        assert_eq!(h.filter(&no_attrs), Outcome::Passed);
    }

    #[test]
    fn empty_list_strips_everything() {
        let mut h = harness(r#"{"keep":[]}"#);
        let out = h.filter(&SampleRecord::new().build());
        assert_eq!(
            Record::new(out.replaced().unwrap()).get_raw("attributes"),
            Some("{}")
        );
    }

    #[test]
    fn malformed_records_pass() {
        let mut h = harness(r#"{"keep":["66"]}"#);
        assert_eq!(
            h.filter_batch(&["", "{", r#"{"attributes":[1]}"#, r#"{"attributes":{"1":}}"#]),
            [
                Outcome::Passed,
                Outcome::Passed,
                Outcome::Passed,
                Outcome::Passed
            ]
        );
    }

    #[test]
    fn config() {
        assert!(Harness::<AttributesAllowlist>::new("{}").is_err());
        assert!(Harness::<AttributesAllowlist>::new(r#"{"keep":[66]}"#).is_err());
        assert!(Harness::<AttributesAllowlist>::new(r#"{"keep":["66"],"drop":["1"]}"#).is_err());
    }

    #[test]
    fn cost() {
        let mut h = harness(r#"{"keep":["239","66"]}"#);
        let strip = SampleRecord::new().build();
        let keep = SampleRecord::new()
            .no_attributes()
            .attribute("66", "1")
            .build();
        eprintln!(
            "attributes-allowlist, stripping: {:?}/record (native)",
            h.bench(&vec![strip.as_str(); 256], 100)
        );
        eprintln!(
            "attributes-allowlist, nothing to strip: {:?}/record (native)",
            h.bench(&vec![keep.as_str(); 256], 100)
        );
    }
}
