//! `passthrough`: the default chain. Passes every record unchanged (ABI
//! verdict 0) without reading it, so it costs the SDK's loop over the batch
//! table and nothing else.
//!
//! Configuration: none (`{}`); anything else is rejected.

use livecast_plugin_sdk::prelude::*;

/// Passes the record without looking at it.
pub fn pass(_record: &mut Record) -> Verdict {
    Verdict::Pass
}

filter!(pass);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    #[test]
    fn passes_everything_even_garbage() {
        let mut h = Harness::<Filter>::new("{}").unwrap();
        let sample = SampleRecord::new().build();
        assert_eq!(
            h.filter_batch(&[&sample, "not json", ""]),
            [Outcome::Passed, Outcome::Passed, Outcome::Passed]
        );
    }

    #[test]
    fn takes_no_config() {
        assert!(Harness::<Filter>::new("null").is_ok());
        assert!(Harness::<Filter>::new(r#"{"x":1}"#).is_err());
    }

    #[test]
    fn cost() {
        let mut h = Harness::<Filter>::new("{}").unwrap();
        let sample = SampleRecord::new().build();
        let batch = vec![sample.as_str(); 256];
        let per_record = h.bench(&batch, 200);
        eprintln!("passthrough: {per_record:?} per record (native)");
    }
}
