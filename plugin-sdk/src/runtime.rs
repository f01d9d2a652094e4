//! The state behind a plugin's exports: the plugin, its input region and
//! its two outputs, driven through the ABI's calls. `export_plugin!` keeps one
//! per wasm instance; the testing harness keeps one per `Harness`.

use crate::abi::{DeliverInput, Output, RecordTable, Region};
use crate::record::Lazy;
use crate::{Plugin, Record, log};

/// Everything a plugin instance owns: the plugin, its input region and its
/// two outputs. [`export_plugin!`](crate::export_plugin) keeps one in a
/// static; the harness keeps one per [`Harness`](crate::testing::Harness).
#[derive(Debug)]
pub struct Runtime<P> {
    plugin: Option<P>,
    region: Region,
    filtered: Output,
    delivered: Output,
}

impl<P> Default for Runtime<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P> Runtime<P> {
    /// A runtime before `init`.
    pub const fn new() -> Self {
        Runtime {
            plugin: None,
            region: Region::new(),
            filtered: Output::new(),
            delivered: Output::new(),
        }
    }
}

impl<P: Plugin> Runtime<P> {
    /// `livecast_reserve`.
    pub fn reserve(&mut self, size: usize) -> Option<usize> {
        self.region.reserve(size)
    }

    /// The input region, for writing into it.
    pub fn region_mut(&mut self) -> &mut Region {
        &mut self.region
    }

    /// The plugin, once `init` accepted its configuration.
    pub fn plugin(&mut self) -> Option<&mut P> {
        self.plugin.as_mut()
    }

    /// `init`: runs [`Plugin::init`] on the configuration at `ptr .. ptr+len`.
    /// A rejection is logged at level 0, which is how the host learns why.
    pub fn init(&mut self, ptr: usize, len: usize) -> Result<(), String> {
        // A panic aborts the instance (the host sees a trap); its message is
        // the only clue the author gets, so send it to the host's log first.
        #[cfg(target_arch = "wasm32")]
        std::panic::set_hook(Box::new(|info| log::error(&info.to_string())));
        let result = match self.region.slice(ptr, len).map(core::str::from_utf8) {
            None => Err("init: configuration is outside the input region".to_string()),
            Some(Err(_)) => Err("init: configuration is not UTF-8".to_string()),
            Some(Ok(config)) => P::init(config).map(|p| self.plugin = Some(p)),
        };
        if let Err(msg) = &result {
            self.plugin = None;
            log::error(msg);
        }
        result
    }

    /// `filter_batch`: returns the output table's address, or `None` (the
    /// ABI's 0) when the input is unreadable or `init` has not succeeded.
    pub fn filter_batch(&mut self, ptr: usize, len: usize) -> Option<usize> {
        let Some(plugin) = self.plugin.as_mut() else {
            log::error("filter_batch called before a successful init");
            return None;
        };
        let Some((records, _)) = self
            .region
            .slice(ptr, len)
            .and_then(|input| RecordTable::parse(input, 0))
        else {
            log::error("filter_batch: input table out of bounds");
            return None;
        };
        let out = &mut self.filtered;
        out.begin(records.len());
        let mut lazy = Lazy::new();
        for i in 0..records.len() {
            let Some(bytes) = records.get(i) else {
                log::error("filter_batch: record out of bounds");
                return None;
            };
            lazy.reset();
            let mut record = Record::with_lazy(bytes, &lazy);
            let verdict = plugin.filter(&mut record);
            out.push_verdict(verdict, &record);
        }
        Some(out.finish())
    }

    /// `deliver_batch`, as [`filter_batch`](Self::filter_batch).
    pub fn deliver_batch(&mut self, ptr: usize, len: usize) -> Option<usize> {
        let Some(plugin) = self.plugin.as_mut() else {
            log::error("deliver_batch called before a successful init");
            return None;
        };
        let Some(input) = self.region.slice(ptr, len).and_then(DeliverInput::parse) else {
            log::error("deliver_batch: input tables out of bounds");
            return None;
        };
        let out = &mut self.delivered;
        out.begin(input.pair_count());
        // The host lists a record's audiences together: a record's members,
        // once found, are reused for its next pair instead of rescanned.
        let mut lazy = Lazy::new();
        let mut lazy_for = usize::MAX;
        for i in 0..input.pair_count() {
            let item = input
                .pair(i)
                .and_then(|(r, a)| Some((r, input.records.get(r)?, input.audience(a)?)));
            let Some((index, bytes, audience)) = item else {
                log::error("deliver_batch: pair out of bounds");
                return None;
            };
            if index != lazy_for {
                lazy.reset();
                lazy_for = index;
            }
            let mut record = Record::with_lazy(bytes, &lazy);
            let verdict = plugin.deliver(&mut record, &audience);
            out.push_verdict(verdict, &record);
        }
        Some(out.finish())
    }

    /// The output of the last `filter_batch`.
    pub fn filter_output(&self) -> &Output {
        &self.filtered
    }

    /// The output of the last `deliver_batch`.
    pub fn deliver_output(&self) -> &Output {
        &self.delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::{DROP, PASS, REPLACE, encode_deliver_batch, encode_filter_batch};
    use crate::{Audience, Verdict};

    struct Upper;
    impl Plugin for Upper {
        const DELIVERY: bool = true;
        fn init(config: &str) -> Result<Self, String> {
            if config.contains("bad") {
                Err("bad config".into())
            } else {
                Ok(Upper)
            }
        }
        fn filter(&mut self, r: &mut Record) -> Verdict {
            match r.device_id() {
                Some("drop") => Verdict::Drop,
                Some("edit") => {
                    r.set_i64("speed", 1);
                    Verdict::Pass
                }
                _ => Verdict::Pass,
            }
        }
        fn deliver(&mut self, r: &mut Record, a: &Audience) -> Verdict {
            if a.role().is_empty() {
                r.set_str("who", a.user_id());
            }
            Verdict::Pass
        }
    }

    fn run(rt: &mut Runtime<Upper>, input: &[u8]) -> Option<usize> {
        let ptr = rt.reserve(input.len())?;
        rt.region_mut().bytes_mut()[..input.len()].copy_from_slice(input);
        rt.filter_batch(ptr, input.len())
    }

    fn init(config: &str) -> (Runtime<Upper>, Result<(), String>) {
        let mut rt = Runtime::<Upper>::new();
        let ptr = rt.reserve(config.len()).unwrap();
        rt.region_mut().bytes_mut()[..config.len()].copy_from_slice(config.as_bytes());
        let r = rt.init(ptr, config.len());
        (rt, r)
    }

    #[test]
    fn filter_batch_round_trip() {
        let (mut rt, ok) = init("{}");
        ok.unwrap();
        let recs: [&[u8]; 4] = [
            br#"{"device_id":"a"}"#,
            br#"{"device_id":"drop"}"#,
            br#"{"device_id":"edit","speed":5}"#,
            b"garbage",
        ];
        let input = encode_filter_batch(&recs);
        assert!(run(&mut rt, &input).is_some());
        let out = rt.filter_output();
        assert_eq!(out.table()[0], 4);
        assert_eq!(out.entry(0), Some((PASS, &b""[..])));
        assert_eq!(out.entry(1), Some((DROP, &b""[..])));
        assert_eq!(
            out.entry(2),
            Some((REPLACE, &br#"{"device_id":"edit","speed":1}"#[..]))
        );
        assert_eq!(out.entry(3), Some((PASS, &b""[..])));
        assert_eq!(out.entry(4), None);
    }

    #[test]
    fn rejects_bad_input() {
        let (mut rt, _) = init("{}");
        // Count larger than the table, record beyond the input, empty input.
        assert_eq!(run(&mut rt, &[9, 0, 0, 0]), None);
        assert_eq!(run(&mut rt, &[1, 0, 0, 0, 0, 1, 0, 0, 4, 0, 0, 0]), None);
        assert_eq!(run(&mut rt, &[]), None);
        assert!(run(&mut rt, &[0, 0, 0, 0]).is_some());
        // Pointer outside the region.
        assert_eq!(rt.filter_batch(1, 4), None);
    }

    #[test]
    fn init_rejection_is_logged() {
        let _ = log::take();
        let (mut rt, r) = init(r#"{"bad":1}"#);
        assert_eq!(r, Err("bad config".into()));
        assert_eq!(log::take(), [(log::Level::Error, "bad config".to_string())]);
        assert_eq!(run(&mut rt, &encode_filter_batch(&[])), None);
    }

    #[test]
    fn deliver_batch_round_trip() {
        let (mut rt, _) = init("{}");
        let recs: [&[u8]; 2] = [br#"{"a":1}"#, br#"{"a":2}"#];
        let auds = [
            Audience::new("event:1", "", "u1"),
            Audience::new("event:1", "admin", "u2"),
        ];
        let input = encode_deliver_batch(&recs, &auds, &[(0, 0), (0, 1), (1, 0)]);
        let ptr = rt.reserve(input.len()).unwrap();
        rt.region_mut().bytes_mut()[..input.len()].copy_from_slice(&input);
        assert!(rt.deliver_batch(ptr, input.len()).is_some());
        let out = rt.deliver_output();
        assert_eq!(out.table()[0], 3);
        assert_eq!(out.entry(0), Some((REPLACE, &br#"{"a":1,"who":"u1"}"#[..])));
        assert_eq!(out.entry(1), Some((PASS, &b""[..])));
        assert_eq!(out.entry(2), Some((REPLACE, &br#"{"a":2,"who":"u1"}"#[..])));

        for pairs in [[(2, 0)], [(0, 2)]] {
            let bad = encode_deliver_batch(&recs, &auds, &pairs);
            let ptr = rt.reserve(bad.len()).unwrap();
            rt.region_mut().bytes_mut()[..bad.len()].copy_from_slice(&bad);
            assert_eq!(rt.deliver_batch(ptr, bad.len()), None);
        }
    }
}
