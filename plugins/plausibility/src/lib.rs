//! `plausibility`: drops positions that imply an impossible jump.
//!
//! For each device the plugin remembers the last position it accepted. A
//! new record is judged by the speed it implies: the great-circle (haversine)
//! distance from that position, less a GPS jitter allowance, over the time
//! between the two timestamps. Above `max_speed_kmh` the record is dropped
//! and the anchor stays where it was.
//!
//! - A device's first record is accepted as the anchor.
//! - A record older than the anchor (trackers upload their offline buffer
//!   after a reconnect) is passed without judging and does not move it.
//! - A record more than `max_gap_s` after the anchor re-anchors: after a long
//!   silence (a tunnel, a transport on a trailer) any jump is possible.
//! - After `reanchor_after` consecutive drops the next implausible record is
//!   accepted as the new anchor, so one bad fix cannot hide a car for long.
//! - With `drop_zero_position`, `0, 0` is dropped: Teltonika trackers report
//!   it when they have no fix. Coordinates out of range are always dropped.
//! - Records without a readable `device_id`, `timestamp`, `latitude` or
//!   `longitude` are passed (the host already rejects such records).
//! - At most `max_devices` devices are remembered; a new one then evicts the
//!   device whose anchor is oldest.
//!
//! Configuration (all optional):
//!
//! ```json
//! {"max_speed_kmh": 250, "max_gap_s": 600, "jitter_m": 20, "reanchor_after": 5,
//!  "max_devices": 10000, "drop_zero_position": true}
//! ```

use core::f64::consts::{FRAC_PI_2, PI};

use livecast_plugin_sdk::prelude::*;

/// Mean Earth radius (IUGG), metres.
const EARTH_RADIUS_M: f64 = 6_371_008.8;

/// Great-circle distance in metres between two points given in degrees
/// (latitudes within ±90°, longitudes within ±180°).
pub fn haversine_m(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let (a, b) = (sin((p2 - p1) / 2.0), sin((lon2 - lon1).to_radians() / 2.0));
    let h = a * a + cos(p1) * cos(p2) * b * b;
    2.0 * EARTH_RADIUS_M * asin(h.clamp(0.0, 1.0).sqrt())
}

// Series instead of the std functions: the arguments here are bounded, and
// libm's general sin/cos (with their huge-argument reduction) would add
// about 10 KB to the module. Accurate to about 1e-15.

/// sin(x) for |x| ≤ π.
fn sin(x: f64) -> f64 {
    let x = if x > FRAC_PI_2 {
        PI - x
    } else if x < -FRAC_PI_2 {
        -PI - x
    } else {
        x
    };
    // Taylor series; at |x| ≤ π/2 the terms past x^23 are below 1e-17.
    let x2 = x * x;
    let (mut term, mut sum) = (x, x);
    for k in SIN_STEP {
        term *= -x2 * k;
        sum += term;
    }
    sum
}

// The series' coefficients, computed at compile time: a division is several
// times the cost of a multiplication, and these loops run for every record.

/// 1 / ((2n)(2n + 1)) for n = 1..12: each sine term from the one before.
const SIN_STEP: [f64; 11] = {
    let mut k = [0.0; 11];
    let mut n = 1;
    while n < 12 {
        k[n - 1] = 1.0 / ((2 * n) * (2 * n + 1)) as f64;
        n += 1;
    }
    k
};

/// (1·3·…·(2n−1)) / (2·4·…·2n) / (2n + 1) for n = 1..30: the arcsine
/// series' coefficient of z^(2n+1).
const ASIN_COEF: [f64; 29] = {
    let mut c = [0.0; 29];
    let (mut coef, mut n) = (1.0, 1);
    while n < 30 {
        coef *= (2 * n - 1) as f64 / (2 * n) as f64;
        c[n - 1] = coef / (2 * n + 1) as f64;
        n += 1;
    }
    c
};

/// cos(x) for |x| ≤ π/2.
fn cos(x: f64) -> f64 {
    sin(FRAC_PI_2 - x.abs())
}

/// asin(y) for 0 ≤ y ≤ 1.
fn asin(y: f64) -> f64 {
    // The series converges fast below 0.5; above, asin(y) = π/2 − 2·asin(√((1−y)/2)).
    fn series(z: f64) -> f64 {
        let z2 = z * z;
        let (mut power, mut sum) = (z, z);
        for c in ASIN_COEF {
            power *= z2;
            sum += c * power;
        }
        sum
    }
    if y <= 0.5 {
        series(y)
    } else {
        FRAC_PI_2 - 2.0 * series(((1.0 - y) / 2.0).sqrt())
    }
}

/// The order `anchors` is kept in: any total order serves a lookup, and this
/// one is a few word compares, where `str`'s calls `memcmp` (a byte loop
/// behind a call on wasm32, a tenth of this filter's time).
fn order(a: &str, b: &str) -> core::cmp::Ordering {
    fn words(s: &str) -> impl Iterator<Item = u64> + '_ {
        s.as_bytes()
            .chunks(8)
            .map(|c| c.iter().fold(0u64, |w, &x| (w << 8) | u64::from(x)))
    }
    a.len().cmp(&b.len()).then_with(|| words(a).cmp(words(b)))
}

#[derive(Debug, Clone, Copy)]
struct Anchor {
    ts_ms: i64,
    lat: f64,
    lon: f64,
    rejected: u32,
}

/// The plugin.
pub struct Plausibility {
    max_speed_kmh: f64,
    max_gap_ms: i64,
    jitter_m: f64,
    reanchor_after: u32,
    max_devices: usize,
    drop_zero_position: bool,
    /// Sorted by device id: a binary search is as fast as a map here and
    /// far smaller in wasm.
    anchors: Vec<(Box<str>, Anchor)>,
}

impl Plausibility {
    /// How many devices are remembered.
    pub fn tracked_devices(&self) -> usize {
        self.anchors.len()
    }

    /// Adds a device not yet tracked; `at` is where it sorts.
    fn track(&mut self, mut at: usize, id: &str, anchor: Anchor) {
        if self.anchors.len() >= self.max_devices {
            // Linear, but only when the cap is reached and a new device shows up.
            let stalest = self
                .anchors
                .iter()
                .enumerate()
                .min_by_key(|(_, (_, a))| a.ts_ms)
                .map(|(i, _)| i);
            if let Some(i) = stalest {
                self.anchors.remove(i);
                if i < at {
                    at -= 1;
                }
            }
        }
        self.anchors.insert(at, (id.into(), anchor));
    }
}

fn positive(cfg: &Config, key: &str, default: f64) -> Result<f64, String> {
    match cfg.f64(key)? {
        None => Ok(default),
        Some(v) if v > 0.0 => Ok(v),
        Some(_) => Err(String::from("plausibility: `") + key + "` must be positive"),
    }
}

fn count(cfg: &Config, key: &str, default: i64, max: i64) -> Result<i64, String> {
    match cfg.i64(key)? {
        None => Ok(default),
        Some(v) if (1..=max).contains(&v) => Ok(v),
        Some(_) => Err(String::from("plausibility: `") + key + "` is out of range"),
    }
}

impl Plugin for Plausibility {
    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&[
            "max_speed_kmh",
            "max_gap_s",
            "jitter_m",
            "reanchor_after",
            "max_devices",
            "drop_zero_position",
        ])?;
        let jitter_m = match cfg.f64("jitter_m")? {
            None => 20.0,
            Some(v) if v >= 0.0 => v,
            Some(_) => return Err("plausibility: `jitter_m` cannot be negative".into()),
        };
        Ok(Plausibility {
            max_speed_kmh: positive(&cfg, "max_speed_kmh", 250.0)?,
            max_gap_ms: (positive(&cfg, "max_gap_s", 600.0)?.min(1e9) * 1000.0) as i64,
            jitter_m,
            reanchor_after: count(&cfg, "reanchor_after", 5, 1_000_000)? as u32,
            // Each device costs about 100 bytes; 100k stays far below the
            // 16 MiB default memory cap.
            max_devices: count(&cfg, "max_devices", 10_000, 100_000)? as usize,
            drop_zero_position: cfg.bool("drop_zero_position")?.unwrap_or(true),
            anchors: Vec::new(),
        })
    }

    fn filter(&mut self, record: &mut Record) -> Verdict {
        let (Some(id), Some(ts_ms), Some(lat), Some(lon)) = (
            record.device_id(),
            record.timestamp_ms(),
            record.latitude(),
            record.longitude(),
        ) else {
            return Verdict::Pass;
        };
        if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
            return Verdict::Drop;
        }
        if self.drop_zero_position && lat == 0.0 && lon == 0.0 {
            return Verdict::Drop;
        }
        let fresh = Anchor {
            ts_ms,
            lat,
            lon,
            rejected: 0,
        };
        let found = self.anchors.binary_search_by(|(k, _)| order(k, id));
        let anchor = match found {
            Ok(i) => match self.anchors.get_mut(i) {
                Some((_, a)) => a,
                None => return Verdict::Pass,
            },
            Err(at) => {
                self.track(at, id, fresh);
                return Verdict::Pass;
            }
        };
        if ts_ms < anchor.ts_ms {
            return Verdict::Pass;
        }
        if ts_ms - anchor.ts_ms > self.max_gap_ms {
            *anchor = fresh;
            return Verdict::Pass;
        }
        let excess_m = (haversine_m(anchor.lat, anchor.lon, lat, lon) - self.jitter_m).max(0.0);
        let dt_s = (ts_ms - anchor.ts_ms) as f64 / 1000.0;
        let plausible =
            excess_m == 0.0 || (dt_s > 0.0 && excess_m / dt_s * 3.6 <= self.max_speed_kmh);
        if plausible || anchor.rejected >= self.reanchor_after {
            *anchor = fresh;
            Verdict::Pass
        } else {
            anchor.rejected += 1;
            Verdict::Drop
        }
    }
}

export_plugin!(Plausibility);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    const T0: i64 = 1_777_716_930_000;
    /// Metres per degree of latitude.
    const M_PER_DEG: f64 = 111_195.08;

    fn rec(device: &str, dt_s: f64, north_m: f64) -> String {
        SampleRecord::new()
            .device(device)
            .timestamp_ms(T0 + (dt_s * 1000.0) as i64)
            .position(41.0 + north_m / M_PER_DEG, 19.8)
            .build()
    }

    fn harness(cfg: &str) -> Harness<Plausibility> {
        Harness::new(cfg).unwrap()
    }

    #[test]
    fn haversine_matches_known_distances() {
        // One degree of latitude, and Tirana to Durrës (about 33 km).
        assert!((haversine_m(41.0, 19.8, 42.0, 19.8) - M_PER_DEG).abs() < 1.0);
        let d = haversine_m(41.3275, 19.8187, 41.3231, 19.4414);
        assert!((31_000.0..33_000.0).contains(&d), "{d}");
        assert_eq!(haversine_m(10.0, 10.0, 10.0, 10.0), 0.0);
        // Antipodes: half the circumference.
        let half = haversine_m(0.0, 0.0, 0.0, 180.0);
        assert!((half - PI * EARTH_RADIUS_M).abs() < 1e-6, "{half}");
    }

    #[test]
    fn series_match_std() {
        let mut worst: f64 = 0.0;
        for i in -1000i32..=1000 {
            let x = PI * f64::from(i) / 1000.0;
            worst = worst.max((sin(x) - x.sin()).abs());
            if x.abs() <= FRAC_PI_2 {
                worst = worst.max((cos(x) - x.cos()).abs());
            }
            let y = f64::from(i.abs()) / 1000.0;
            worst = worst.max((asin(y) - y.asin()).abs());
        }
        assert!(worst < 1e-14, "{worst}");
    }

    #[test]
    fn drops_an_impossible_jump_and_keeps_the_anchor() {
        let mut h = harness("{}");
        assert_eq!(h.filter(&rec("a", 0.0, 0.0)), Outcome::Passed);
        // 100 km/h: 278 m in 10 s.
        assert_eq!(h.filter(&rec("a", 10.0, 278.0)), Outcome::Passed);
        // 5 km in 10 s = 1800 km/h.
        assert_eq!(h.filter(&rec("a", 20.0, 5_278.0)), Outcome::Dropped);
        // Judged against the last accepted position, not the dropped one.
        assert_eq!(h.filter(&rec("a", 30.0, 834.0)), Outcome::Passed);
    }

    #[test]
    fn speed_limit_is_configurable() {
        let mut h = harness(r#"{"max_speed_kmh": 50, "jitter_m": 0}"#);
        assert_eq!(h.filter(&rec("a", 0.0, 0.0)), Outcome::Passed);
        // 20 m/s = 72 km/h.
        assert_eq!(h.filter(&rec("a", 10.0, 200.0)), Outcome::Dropped);
        // 10 m/s = 36 km/h.
        assert_eq!(h.filter(&rec("a", 10.0, 100.0)), Outcome::Passed);
    }

    #[test]
    fn jitter_is_tolerated_even_with_equal_timestamps() {
        let mut h = harness("{}");
        assert_eq!(h.filter(&rec("a", 0.0, 0.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 0.0, 15.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 0.0, 100.0)), Outcome::Dropped);
    }

    #[test]
    fn out_of_order_records_pass_unjudged() {
        let mut h = harness("{}");
        assert_eq!(h.filter(&rec("a", 100.0, 0.0)), Outcome::Passed);
        // Far away but older: buffered upload, passed, anchor unchanged.
        assert_eq!(h.filter(&rec("a", 50.0, 90_000.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 110.0, 50_000.0)), Outcome::Dropped);
        assert_eq!(h.filter(&rec("a", 110.0, 100.0)), Outcome::Passed);
    }

    #[test]
    fn a_long_silence_re_anchors() {
        let mut h = harness(r#"{"max_gap_s": 60}"#);
        assert_eq!(h.filter(&rec("a", 0.0, 0.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 61.0, 50_000.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 71.0, 50_200.0)), Outcome::Passed);
    }

    #[test]
    fn consecutive_drops_re_anchor() {
        let mut h = harness(r#"{"reanchor_after": 2}"#);
        assert_eq!(h.filter(&rec("a", 0.0, 0.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 1.0, 10_000.0)), Outcome::Dropped);
        assert_eq!(h.filter(&rec("a", 2.0, 10_010.0)), Outcome::Dropped);
        assert_eq!(h.filter(&rec("a", 3.0, 10_020.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 4.0, 10_030.0)), Outcome::Passed);
    }

    #[test]
    fn every_device_finds_its_own_anchor() {
        // Ids of several lengths, sharing long prefixes: the lookup order
        // compares 8-byte words, so prefixes past 8 bytes must still tell
        // devices apart.
        let ids: Vec<String> = (0..300)
            .map(|i| match i % 3 {
                0 => format!("3563070424{i:05}"),
                1 => format!("d{i}"),
                _ => format!("3563070424{i:05}-spare"),
            })
            .collect();
        // Devices 2 km apart: 50 m in 10 s is plausible only from a
        // device's own anchor (from another one it is 700+ km/h).
        let home = |i: usize| i as f64 * 2_000.0;
        let mut h = harness("{}");
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(h.filter(&rec(id, 0.0, home(i))), Outcome::Passed, "{id}");
        }
        assert_eq!(h.plugin().tracked_devices(), ids.len());
        for (i, id) in ids.iter().enumerate() {
            let near = rec(id, 10.0, home(i) + 50.0);
            assert_eq!(h.filter(&near), Outcome::Passed, "{id}: its own anchor");
        }
        // And each is found, not taken for a new device: a jump is judged.
        for (i, id) in ids.iter().enumerate() {
            let jump = rec(id, 20.0, home(i) + 90_000.0);
            assert_eq!(h.filter(&jump), Outcome::Dropped, "{id}: found again");
        }
    }

    #[test]
    fn devices_are_independent_and_bounded() {
        let mut h = harness(r#"{"max_devices": 2}"#);
        assert_eq!(h.filter(&rec("a", 0.0, 0.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("b", 5.0, 90_000.0)), Outcome::Passed);
        assert_eq!(h.filter(&rec("a", 10.0, 90_000.0)), Outcome::Dropped);
        // A third device evicts the stalest anchor ("a", at T0).
        assert_eq!(h.filter(&rec("c", 6.0, 0.0)), Outcome::Passed);
        assert_eq!(h.plugin().tracked_devices(), 2);
        assert_eq!(h.filter(&rec("a", 11.0, 90_000.0)), Outcome::Passed);
    }

    #[test]
    fn bad_coordinates_and_unreadable_records() {
        let mut h = harness("{}");
        let zero = SampleRecord::new().position(0.0, 0.0).build();
        let off_earth = SampleRecord::new().position(91.0, 0.0).build();
        assert_eq!(
            h.filter_batch(&[&zero, &off_earth, "{}", "junk", r#"{"device_id":"a"}"#]),
            [
                Outcome::Dropped,
                Outcome::Dropped,
                Outcome::Passed,
                Outcome::Passed,
                Outcome::Passed
            ]
        );
        let mut h = harness(r#"{"drop_zero_position": false}"#);
        assert_eq!(h.filter(&zero), Outcome::Passed);
    }

    #[test]
    fn config() {
        for bad in [
            r#"{"max_speed_kmh": 0}"#,
            r#"{"max_speed_kmh": "fast"}"#,
            r#"{"max_gap_s": -1}"#,
            r#"{"jitter_m": -1}"#,
            r#"{"max_devices": 0}"#,
            r#"{"reanchor_after": 1.5}"#,
            r#"{"max_speed": 100}"#,
        ] {
            assert!(Harness::<Plausibility>::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cost() {
        let mut h = harness("{}");
        let records: Vec<String> = (0..256)
            .map(|i| rec(&format!("dev{}", i % 32), f64::from(i), f64::from(i) * 10.0))
            .collect();
        let batch: Vec<&str> = records.iter().map(String::as_str).collect();
        eprintln!("plausibility: {:?}/record (native)", h.bench(&batch, 100));
    }
}
