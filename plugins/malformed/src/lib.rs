//! `malformed`: answers a batch that contains a selected record with output
//! that breaks the ABI, to exercise the host's `malformed` failure handling.
//! Batches without a selected record get a correct all-pass output, and a
//! batch of the selected record alone fails the same way, so the host can
//! isolate it. A test stub.
//!
//! It implements the ABI exports by hand (with the SDK's
//! [`abi`](livecast_plugin_sdk::abi) pieces) since the [`Plugin`] trait
//! cannot produce malformed output.
//!
//! Configuration (both optional):
//!
//! ```json
//! {"device_id": "356307042441013", "mode": "count"}
//! ```
//!
//! Without `device_id` every record is selected. `mode` picks the breakage:
//!
//! | mode | output for a batch with a selected record |
//! |---|---|
//! | `count` (default) | a well-formed table whose count is the input count + 1 |
//! | `verdict` | verdict 7 for the selected records |
//! | `pointer` | verdict 2 for the selected records, replacement at `0xFFFF_FF00` (outside memory), 64 bytes |
//! | `json` | verdict 2 for the selected records, replacement bytes `this is not a record` |
//! | `table` | returns `0xFFFF_FFF0`, a table pointer outside memory |
//! | `null` | returns 0 |

use livecast_plugin_sdk::abi::{PASS, REPLACE, RecordTable, Region};
use livecast_plugin_sdk::prelude::*;

/// How the output is broken; see the crate documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Count = input count + 1.
    Count,
    /// Unknown verdict 7.
    Verdict,
    /// Replacement outside memory.
    Pointer,
    /// Replacement that is not a record.
    Json,
    /// Table pointer outside memory.
    Table,
    /// Returns 0.
    Null,
}

/// A replacement pointer and a table pointer no 32-bit memory can contain
/// whole.
pub const OUTSIDE: u32 = 0xFFFF_FF00;
/// The table pointer returned in `table` mode.
pub const OUTSIDE_TABLE: u32 = 0xFFFF_FFF0;
/// The bytes of a `json`-mode replacement.
pub static NOT_A_RECORD: &[u8] = b"this is not a record";

struct Settings {
    device: Option<String>,
    mode: Mode,
}

/// The whole instance state.
pub struct Malformed {
    region: Region,
    settings: Option<Settings>,
    table: Vec<u32>,
}

impl Default for Malformed {
    fn default() -> Self {
        Self::new()
    }
}

impl Malformed {
    /// Before `init`.
    pub const fn new() -> Self {
        Malformed {
            region: Region::new(),
            settings: None,
            table: Vec::new(),
        }
    }

    /// `livecast_reserve`.
    pub fn reserve(&mut self, size: usize) -> Option<usize> {
        self.region.reserve(size)
    }

    /// The input region, to write into (tests).
    pub fn region_mut(&mut self) -> &mut Region {
        &mut self.region
    }

    /// `init`: 0 accepts, 1 rejects (the reason is logged at level 0).
    pub fn init(&mut self, ptr: usize, len: usize) -> i32 {
        let config = self
            .region
            .slice(ptr, len)
            .and_then(|b| core::str::from_utf8(b).ok())
            .unwrap_or("");
        match parse_settings(config) {
            Ok(s) => {
                self.settings = Some(s);
                0
            }
            Err(msg) => {
                log::error(&msg);
                1
            }
        }
    }

    /// The table built by the last `filter_batch` (tests).
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// `filter_batch`: the pointer to return (0 included).
    pub fn filter_batch(&mut self, ptr: usize, len: usize) -> usize {
        let Some(settings) = &self.settings else {
            return 0;
        };
        let Some((records, _)) = self
            .region
            .slice(ptr, len)
            .and_then(|input| RecordTable::parse(input, 0))
        else {
            return 0;
        };
        let n = records.len();
        let selected = |i: usize| {
            let Some(bytes) = records.get(i) else {
                return false;
            };
            match &settings.device {
                None => true,
                Some(d) => Record::from_bytes(bytes).device_id() == Some(d.as_str()),
            }
        };
        let hit = (0..n).any(selected);
        self.table.clear();
        if !hit {
            self.table.push(n as u32);
            self.table.extend((0..n).flat_map(|_| [PASS, 0, 0]));
            return self.table.as_ptr() as usize;
        }
        match settings.mode {
            Mode::Null => return 0,
            Mode::Table => return OUTSIDE_TABLE as usize,
            Mode::Count => {
                self.table.push(n as u32 + 1);
                self.table.extend((0..=n).flat_map(|_| [PASS, 0, 0]));
            }
            Mode::Verdict | Mode::Pointer | Mode::Json => {
                self.table.push(n as u32);
                for i in 0..n {
                    let entry = match (selected(i), settings.mode) {
                        (false, _) => [PASS, 0, 0],
                        (true, Mode::Verdict) => [7, 0, 0],
                        (true, Mode::Pointer) => [REPLACE, OUTSIDE, 64],
                        (true, _) => [
                            REPLACE,
                            NOT_A_RECORD.as_ptr() as usize as u32,
                            NOT_A_RECORD.len() as u32,
                        ],
                    };
                    self.table.extend(entry);
                }
            }
        }
        self.table.as_ptr() as usize
    }
}

fn parse_settings(config: &str) -> Result<Settings, String> {
    let cfg = Config::parse(config)?;
    cfg.deny_unknown(&["device_id", "mode"])?;
    let mode = match cfg.str("mode")?.unwrap_or("count") {
        "count" => Mode::Count,
        "verdict" => Mode::Verdict,
        "pointer" => Mode::Pointer,
        "json" => Mode::Json,
        "table" => Mode::Table,
        "null" => Mode::Null,
        _ => {
            return Err(
                "malformed: `mode` must be one of count, verdict, pointer, json, table, null"
                    .into(),
            );
        }
    };
    Ok(Settings {
        device: cfg.str("device_id")?.map(str::to_string),
        mode,
    })
}

#[cfg(target_arch = "wasm32")]
const _: () = {
    use std::cell::RefCell;

    // The instance's state: a plain static on wasm, which has no threads.
    thread_local! {
        static STATE: RefCell<Malformed> = const { RefCell::new(Malformed::new()) };
    }

    /// Runs `f` on the state; `None` only if an export were re-entered.
    fn with_state<R>(f: impl FnOnce(&mut Malformed) -> R) -> Option<R> {
        STATE.with(|s| Some(f(&mut *s.try_borrow_mut().ok()?)))
    }

    #[unsafe(no_mangle)]
    extern "C" fn livecast_abi_v1() {}

    #[unsafe(no_mangle)]
    extern "C" fn livecast_reserve(size: i32) -> i32 {
        with_state(|s| s.reserve(size as u32 as usize))
            .flatten()
            .map_or(0, |p| p as i32)
    }

    #[unsafe(no_mangle)]
    extern "C" fn init(ptr: i32, len: i32) -> i32 {
        with_state(|s| s.init(ptr as u32 as usize, len as u32 as usize)).unwrap_or(1)
    }

    #[unsafe(no_mangle)]
    extern "C" fn filter_batch(ptr: i32, len: i32) -> i32 {
        with_state(|s| s.filter_batch(ptr as u32 as usize, len as u32 as usize)).unwrap_or(0) as i32
    }
};

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::abi::encode_filter_batch;
    use livecast_plugin_sdk::testing::SampleRecord;

    fn instance(config: &str) -> Malformed {
        let mut m = Malformed::new();
        let ptr = m.reserve(config.len()).unwrap();
        m.region_mut().bytes_mut()[..config.len()].copy_from_slice(config.as_bytes());
        assert_eq!(m.init(ptr, config.len()), 0);
        m
    }

    fn run(m: &mut Malformed, devices: &[&str]) -> usize {
        let records: Vec<String> = devices
            .iter()
            .map(|d| SampleRecord::new().device(d).build())
            .collect();
        let bytes: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let input = encode_filter_batch(&bytes);
        let ptr = m.reserve(input.len()).unwrap();
        m.region_mut().bytes_mut()[..input.len()].copy_from_slice(&input);
        m.filter_batch(ptr, input.len())
    }

    #[test]
    fn correct_without_the_device() {
        let mut m = instance(r#"{"device_id":"111"}"#);
        assert_ne!(run(&mut m, &["222", "333"]), 0);
        assert_eq!(m.table(), [2, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn each_mode() {
        let mut m = instance(r#"{"device_id":"111"}"#);
        assert_ne!(run(&mut m, &["222", "111"]), 0);
        assert_eq!(m.table(), [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

        let mut m = instance(r#"{"device_id":"111","mode":"verdict"}"#);
        run(&mut m, &["222", "111"]);
        assert_eq!(m.table(), [2, 0, 0, 0, 7, 0, 0]);

        let mut m = instance(r#"{"device_id":"111","mode":"pointer"}"#);
        run(&mut m, &["111"]);
        assert_eq!(m.table(), [1, REPLACE, OUTSIDE, 64]);

        let mut m = instance(r#"{"mode":"json"}"#);
        run(&mut m, &["111"]);
        assert_eq!(m.table()[..2], [1, REPLACE]);

        let mut m = instance(r#"{"mode":"table"}"#);
        assert_eq!(run(&mut m, &["1"]), OUTSIDE_TABLE as usize);
        let mut m = instance(r#"{"mode":"null"}"#);
        assert_eq!(run(&mut m, &["1"]), 0);
    }

    #[test]
    fn bad_config() {
        let mut m = Malformed::new();
        let cfg = r#"{"mode":"loud"}"#;
        let ptr = m.reserve(cfg.len()).unwrap();
        m.region_mut().bytes_mut()[..cfg.len()].copy_from_slice(cfg.as_bytes());
        assert_eq!(m.init(ptr, cfg.len()), 1);
        assert_eq!(m.filter_batch(ptr, 4), 0);
    }
}
