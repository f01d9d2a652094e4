//! Run a plugin in `cargo test`, without a host (native builds only).
//!
//! A [`Harness`] drives the plugin through the same ABI code the host calls
//! (batch encoding, the input region, the output table), so what passes here
//! behaves the same inside livecast. Replacements are checked with the
//! host's rules ([`check_record`]): one the host would reject as a
//! malformed output fails the test.
//!
//! ```
//! use livecast_plugin_sdk::prelude::*;
//! use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};
//!
//! struct SlowOnly { max: f64 }
//! impl Plugin for SlowOnly {
//!     fn init(config: &str) -> Result<Self, String> {
//!         let cfg = Config::parse(config)?;
//!         Ok(SlowOnly { max: cfg.f64("max")?.unwrap_or(100.0) })
//!     }
//!     fn filter(&mut self, r: &mut Record) -> Verdict {
//!         if r.speed().is_some_and(|s| s > self.max) { Verdict::Drop } else { Verdict::Pass }
//!     }
//! }
//!
//! let mut h = Harness::<SlowOnly>::new(r#"{"max": 50}"#)?;
//! assert_eq!(h.filter(&SampleRecord::new().speed(63.0).build()), Outcome::Dropped);
//! assert_eq!(h.filter(&SampleRecord::new().speed(20.0).build()), Outcome::Passed);
//! assert!(Harness::<SlowOnly>::new(r#"{"max": "fast"}"#).is_err());
//! # Ok::<(), String>(())
//! ```

use std::time::{Duration, Instant};

use crate::abi::{self, Output};
use crate::runtime::Runtime;
use crate::{Audience, Config, Plugin, Record, json, log};

/// What the plugin did with one item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Verdict 0: goes on unchanged.
    Passed,
    /// Verdict 1: goes no further.
    Dropped,
    /// Verdict 2: goes on as this JSON.
    Replaced(String),
}

impl Outcome {
    /// The replacement JSON, if replaced.
    pub fn replaced(&self) -> Option<&str> {
        match self {
            Outcome::Replaced(s) => Some(s),
            _ => None,
        }
    }
}

/// A plugin instance plus everything the host would do around it.
pub struct Harness<P: Plugin> {
    rt: Runtime<P>,
}

impl<P: Plugin> Harness<P> {
    /// Instantiates the plugin with a configuration (`"{}"` for none), as the
    /// host does. `Err` carries the plugin's rejection message.
    pub fn new(config: &str) -> Result<Self, String> {
        let mut rt = Runtime::new();
        let ptr = write_input(&mut rt, config.as_bytes());
        rt.init(ptr, config.len())?;
        Ok(Harness { rt })
    }

    /// The plugin, to inspect its state.
    pub fn plugin(&mut self) -> &mut P {
        self.rt.plugin().expect("init succeeded in Harness::new")
    }

    /// Runs the record stage on one record.
    pub fn filter(&mut self, record: &str) -> Outcome {
        self.filter_batch(&[record]).remove(0)
    }

    /// Runs the record stage on a batch, as one `filter_batch` call.
    pub fn filter_batch(&mut self, records: &[&str]) -> Vec<Outcome> {
        let bytes: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let input = abi::encode_filter_batch(&bytes);
        let ptr = write_input(&mut self.rt, &input);
        self.rt
            .filter_batch(ptr, input.len())
            .expect("filter_batch failed (returned 0)");
        outcomes(self.rt.filter_output(), records.len())
    }

    /// Runs the delivery stage on one record for one audience.
    pub fn deliver(&mut self, record: &str, audience: &Audience<'_>) -> Outcome {
        self.deliver_batch(&[record], std::slice::from_ref(audience), &[(0, 0)])
            .remove(0)
    }

    /// Runs the delivery stage on `(record index, audience index)` pairs, as
    /// one `deliver_batch` call. One outcome per pair.
    pub fn deliver_batch(
        &mut self,
        records: &[&str],
        audiences: &[Audience<'_>],
        pairs: &[(u32, u32)],
    ) -> Vec<Outcome> {
        let bytes: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let input = abi::encode_deliver_batch(&bytes, audiences, pairs);
        let ptr = write_input(&mut self.rt, &input);
        self.rt
            .deliver_batch(ptr, input.len())
            .expect("deliver_batch failed (returned 0)");
        outcomes(self.rt.deliver_output(), pairs.len())
    }

    /// Average time the record stage takes per record, running `records` as
    /// one batch `iterations` times. This is native code: inside the host the
    /// same plugin compiled to wasm typically runs 2 to 3 times slower, and
    /// the host adds its own per-batch cost. Run with `--release` for
    /// meaningful numbers.
    pub fn bench(&mut self, records: &[&str], iterations: u32) -> Duration {
        let bytes: Vec<&[u8]> = records.iter().map(|r| r.as_bytes()).collect();
        let input = abi::encode_filter_batch(&bytes);
        let ptr = write_input(&mut self.rt, &input);
        let start = Instant::now();
        for _ in 0..iterations {
            std::hint::black_box(self.rt.filter_batch(std::hint::black_box(ptr), input.len()));
        }
        let n = u32::try_from(records.len())
            .unwrap_or(u32::MAX)
            .saturating_mul(iterations)
            .max(1);
        start.elapsed() / n
    }

    /// Takes what the plugin logged on this thread so far.
    pub fn take_logs(&mut self) -> Vec<(log::Level, String)> {
        log::take()
    }
}

impl<P: Plugin> std::fmt::Debug for Harness<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("plugin", &std::any::type_name::<P>())
            .finish_non_exhaustive()
    }
}

fn write_input<P: Plugin>(rt: &mut Runtime<P>, input: &[u8]) -> usize {
    let ptr = rt
        .reserve(input.len())
        .expect("input region allocation failed");
    rt.region_mut().bytes_mut()[..input.len()].copy_from_slice(input);
    ptr
}

fn outcomes(out: &Output, n: usize) -> Vec<Outcome> {
    assert_eq!(
        out.table().first().copied(),
        Some(n as u32),
        "output count differs from the input"
    );
    (0..n)
        .map(|i| match out.entry(i) {
            Some((abi::PASS, _)) => Outcome::Passed,
            Some((abi::DROP, _)) => Outcome::Dropped,
            Some((abi::REPLACE, bytes)) => {
                let json = String::from_utf8(bytes.to_vec()).expect("replacement is not UTF-8");
                if let Err(why) = check_record(&json) {
                    panic!("the host would reject this replacement ({why}): {json}");
                }
                Outcome::Replaced(json)
            }
            other => panic!("malformed output entry {i}: {other:?}"),
        })
        .collect()
}

/// The host's check on a replacement, which is the check every stream entry
/// passes too (`docs/plugin-abi.md`, "A valid record"): one JSON object in
/// which `device_id` is a non-empty string, `timestamp` an RFC 3339 string
/// with an offset, `latitude` and `longitude` numbers within ±90 and ±180,
/// `speed` and `angle` numbers if present, and none of these (nor
/// `attributes`) appears twice. `null` counts as absent. The reason is for
/// a test failure message.
///
/// One difference: JSON nested deeper than [`json::MAX_DEPTH`] is refused
/// here, where the host would take it.
///
/// ```
/// use livecast_plugin_sdk::testing::{check_record, SampleRecord};
/// assert_eq!(check_record(&SampleRecord::new().build()), Ok(()));
/// let far = SampleRecord::new().position(91.0, 0.0).build();
/// assert_eq!(check_record(&far), Err("`latitude` or `longitude` is outside the globe"));
/// ```
pub fn check_record(json: &str) -> Result<(), &'static str> {
    if !json::is_valid(json) {
        return Err("not valid JSON");
    }
    if !json
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err("not a JSON object");
    }
    let config = Config::parse(json).map_err(|_| "not valid JSON")?;
    let keys: Vec<String> = config.keys().collect();
    for key in [
        "device_id",
        "timestamp",
        "latitude",
        "longitude",
        "speed",
        "angle",
        "attributes",
    ] {
        if keys.iter().filter(|k| *k == key).count() > 1 {
            return Err("a member the host reads appears twice");
        }
    }
    let r = Record::new(json);
    let absent = |key: &str| matches!(r.get_raw(key), None | Some("null"));
    for key in ["device_id", "timestamp"] {
        if !absent(key) && r.get_str(key).is_none() {
            return Err("`device_id` and `timestamp` must be strings");
        }
    }
    for key in ["latitude", "longitude", "speed", "angle"] {
        if !absent(key) && r.get_f64(key).is_none() {
            return Err("`latitude`, `longitude`, `speed` and `angle` must be numbers");
        }
    }
    if r.device_id().is_none_or(str::is_empty)
        || ["timestamp", "latitude", "longitude"]
            .into_iter()
            .any(absent)
    {
        return Err("`device_id`, `timestamp`, `latitude` or `longitude` is missing or empty");
    }
    if r.timestamp_ms().is_none() {
        return Err("`timestamp` is not RFC 3339 with an offset");
    }
    match (r.latitude(), r.longitude()) {
        (Some(lat), Some(lon)) if lat.abs() <= 90.0 && lon.abs() <= 180.0 => Ok(()),
        _ => Err("`latitude` or `longitude` is outside the globe"),
    }
}

/// Builds sample record JSON in the upstream shape; every field has a
/// realistic default.
///
/// ```
/// use livecast_plugin_sdk::testing::SampleRecord;
/// let json = SampleRecord::new().device("42").position(41.0, 19.5).attribute("66", "12841").build();
/// let r = livecast_plugin_sdk::Record::new(&json);
/// assert_eq!(r.device_id(), Some("42"));
/// assert_eq!(r.latitude(), Some(41.0));
/// assert_eq!(r.attribute("66"), Some("12841"));
/// ```
#[derive(Debug, Clone)]
pub struct SampleRecord {
    device_id: String,
    timestamp: String,
    latitude: f64,
    longitude: f64,
    altitude: f64,
    angle: f64,
    speed: f64,
    satellites: i64,
    priority: i64,
    attributes: Vec<(String, String)>,
}

impl Default for SampleRecord {
    fn default() -> Self {
        Self::new()
    }
}

impl SampleRecord {
    /// The example record of the upstream contract.
    pub fn new() -> Self {
        SampleRecord {
            device_id: "356307042441013".into(),
            timestamp: "2026-05-02T10:15:30.123Z".into(),
            latitude: 41.327953,
            longitude: 19.819025,
            altitude: 112.0,
            angle: 271.0,
            speed: 63.0,
            satellites: 11,
            priority: 0,
            attributes: vec![
                ("239".into(), "1".into()),
                ("66".into(), "12841".into()),
                ("78".into(), r#"{"__bigint":"18446744073709551615"}"#.into()),
                ("385".into(), r#"{"__buffer_b64":"AQID"}"#.into()),
            ],
        }
    }

    /// `device_id`.
    pub fn device(mut self, imei: &str) -> Self {
        self.device_id = imei.into();
        self
    }

    /// `timestamp`, RFC 3339.
    pub fn timestamp(mut self, ts: &str) -> Self {
        self.timestamp = ts.into();
        self
    }

    /// `timestamp` from Unix milliseconds.
    pub fn timestamp_ms(mut self, ms: i64) -> Self {
        self.timestamp = format_rfc3339_ms(ms);
        self
    }

    /// `latitude` and `longitude`.
    pub fn position(mut self, latitude: f64, longitude: f64) -> Self {
        self.latitude = latitude;
        self.longitude = longitude;
        self
    }

    /// `speed`, km/h.
    pub fn speed(mut self, kmh: f64) -> Self {
        self.speed = kmh;
        self
    }

    /// Replaces the attributes with none.
    pub fn no_attributes(mut self) -> Self {
        self.attributes.clear();
        self
    }

    /// Adds (or replaces) one IO element, as raw JSON: `attribute("66", "12841")`.
    pub fn attribute(mut self, id: &str, raw: &str) -> Self {
        self.attributes.retain(|(k, _)| k != id);
        self.attributes.push((id.into(), raw.into()));
        self
    }

    /// The JSON text.
    pub fn build(&self) -> String {
        let mut s = String::from("{\"device_id\":");
        json::write_str(&mut s, &self.device_id);
        s.push_str(",\"timestamp\":");
        json::write_str(&mut s, &self.timestamp);
        s.push_str(&format!(
            ",\"latitude\":{},\"longitude\":{},\"altitude\":{},\"angle\":{},\"speed\":{},\"satellites\":{},\"priority\":{},\"attributes\":{{",
            self.latitude, self.longitude, self.altitude, self.angle, self.speed, self.satellites, self.priority
        ));
        for (i, (k, v)) in self.attributes.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            json::write_str(&mut s, k);
            s.push(':');
            s.push_str(v);
        }
        s.push_str("}}");
        s
    }
}

/// Unix milliseconds to `YYYY-MM-DDThh:mm:ss.sssZ`.
///
/// ```
/// use livecast_plugin_sdk::testing::format_rfc3339_ms;
/// assert_eq!(format_rfc3339_ms(1_777_716_930_123), "2026-05-02T10:15:30.123Z");
/// ```
pub fn format_rfc3339_ms(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::parse_rfc3339_ms;

    #[test]
    fn sample_record_is_valid() {
        let json = SampleRecord::new().build();
        assert!(check_record(&json).is_ok());
        assert_eq!(
            json,
            r#"{"device_id":"356307042441013","timestamp":"2026-05-02T10:15:30.123Z","latitude":41.327953,"longitude":19.819025,"altitude":112,"angle":271,"speed":63,"satellites":11,"priority":0,"attributes":{"239":1,"66":12841,"78":{"__bigint":"18446744073709551615"},"385":{"__buffer_b64":"AQID"}}}"#
        );
    }

    #[test]
    fn timestamps_round_trip() {
        for ms in [0, -1, 951_868_799_999, 1_777_716_930_123, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)), Some(ms));
        }
    }
}
