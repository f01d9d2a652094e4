//! `audience`: a delivery-stage filter that gives race control the exact
//! record and everyone else a coarsened one.
//!
//! - A subscriber whose Directus role is in `full_roles` gets every record
//!   unchanged.
//! - Everyone else (no role included) gets `latitude` and `longitude` rounded
//!   to `decimals` decimal places and, with `strip_attributes`, no
//!   `attributes` (the IO elements can carry the car's exact odometer, fuel,
//!   ignition…). A record without a readable position is withheld from them
//!   (fail closed).
//!
//! The record stage passes everything without reading it.
//!
//! Configuration (all optional):
//!
//! ```json
//! {"full_roles": ["5d1d3c2e-…"], "decimals": 2, "strip_attributes": true}
//! ```
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `full_roles` | `[]` | role ids that see exact records |
//! | `decimals` | `2` | 0 to 9 |
//! | `strip_attributes` | `true` | remove `attributes` for the others |
//!
//! Rounding to `d` decimals moves a point by at most half a step, 0.5·10⁻ᵈ
//! degrees. One degree of latitude is about 111.2 km, one degree of
//! longitude 111.2 km × cos(latitude) (84 km at 41°N):
//!
//! | decimals | worst error north–south | east–west at 41°N |
//! |---|---|---|
//! | 0 | 56 km | 42 km |
//! | 1 | 5.6 km | 4.2 km |
//! | 2 | 556 m | 420 m |
//! | 3 | 56 m | 42 m |
//! | 4 | 5.6 m | 4.2 m |
//!
//! So the default shows which part of a town a car is in, not which road.
//! Note that the timing of coarse position changes still hints at movement.

use livecast_plugin_sdk::prelude::*;

/// The plugin.
pub struct AudienceFilter {
    full_roles: Vec<String>,
    decimals: u32,
    strip_attributes: bool,
}

impl Plugin for AudienceFilter {
    const DELIVERY: bool = true;

    fn init(config: &str) -> Result<Self, String> {
        let cfg = Config::parse(config)?;
        cfg.deny_unknown(&["full_roles", "decimals", "strip_attributes"])?;
        let full_roles = cfg.str_list("full_roles")?.unwrap_or_default();
        if full_roles.iter().any(String::is_empty) {
            return Err("audience: `full_roles` cannot contain an empty role (users without a role are public)".into());
        }
        let decimals = match cfg.i64("decimals")?.unwrap_or(2) {
            d @ 0..=9 => d as u32,
            _ => return Err("audience: `decimals` must be between 0 and 9".into()),
        };
        let strip_attributes = cfg.bool("strip_attributes")?.unwrap_or(true);
        Ok(AudienceFilter {
            full_roles,
            decimals,
            strip_attributes,
        })
    }

    fn filter(&mut self, _record: &mut Record) -> Verdict {
        Verdict::Pass
    }

    fn deliver(&mut self, record: &mut Record, audience: &Audience) -> Verdict {
        if audience.has_role() && self.full_roles.iter().any(|r| r == audience.role()) {
            return Verdict::Pass;
        }
        let (Some(lat), Some(lon)) = (record.latitude(), record.longitude()) else {
            return Verdict::Drop;
        };
        let coarse = record
            .set_f64_rounded("latitude", lat, self.decimals)
            .is_ok()
            && record
                .set_f64_rounded("longitude", lon, self.decimals)
                .is_ok();
        if !coarse {
            return Verdict::Drop;
        }
        if self.strip_attributes {
            record.remove("attributes");
        }
        Verdict::Pass
    }
}

export_plugin!(AudienceFilter, deliver);

#[cfg(test)]
mod tests {
    use super::*;
    use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};

    const CONTROL: &str = "5d1d3c2e-race-control";

    fn harness(cfg: &str) -> Harness<AudienceFilter> {
        Harness::new(cfg).unwrap()
    }

    fn public() -> Audience<'static> {
        Audience::new("event:1", "", "user-1")
    }

    #[test]
    fn race_control_gets_everything() {
        let mut h = harness(&format!(r#"{{"full_roles":["{CONTROL}"]}}"#));
        let rec = SampleRecord::new().build();
        assert_eq!(
            h.deliver(&rec, &Audience::new("event:1", CONTROL, "u")),
            Outcome::Passed
        );
    }

    #[test]
    fn others_get_a_coarse_position_without_attributes() {
        let mut h = harness(&format!(r#"{{"full_roles":["{CONTROL}"]}}"#));
        let rec = SampleRecord::new().build();
        for a in [public(), Audience::new("event:1", "spectator-role", "u")] {
            let out = h.deliver(&rec, &a);
            let json = out.replaced().expect("replaced");
            let r = Record::new(json);
            assert_eq!(r.get_raw("latitude"), Some("41.33"));
            assert_eq!(r.get_raw("longitude"), Some("19.82"));
            assert_eq!(r.get_raw("attributes"), None);
            assert_eq!(r.speed(), Some(63.0));
            assert_eq!(r.device_id(), Some("356307042441013"));
        }
    }

    #[test]
    fn batch_with_mixed_audiences() {
        let mut h = harness(&format!(
            r#"{{"full_roles":["{CONTROL}"],"decimals":3,"strip_attributes":false}}"#
        ));
        let a = SampleRecord::new().build();
        let b = SampleRecord::new()
            .position(-33.8688197, 151.2092955)
            .build();
        let audiences = [public(), Audience::new("event:1", CONTROL, "u2")];
        let out = h.deliver_batch(&[&a, &b], &audiences, &[(0, 0), (0, 1), (1, 0), (1, 1)]);
        assert_eq!(out[1], Outcome::Passed);
        assert_eq!(out[3], Outcome::Passed);
        let r = Record::new(out[2].replaced().unwrap());
        assert_eq!(
            (r.get_raw("latitude"), r.get_raw("longitude")),
            (Some("-33.869"), Some("151.209"))
        );
        assert!(r.get_raw("attributes").is_some());
        assert_eq!(
            Record::new(out[0].replaced().unwrap()).get_raw("latitude"),
            Some("41.328")
        );
    }

    #[test]
    fn record_stage_passes_everything() {
        let mut h = harness("{}");
        assert_eq!(
            h.filter_batch(&[&SampleRecord::new().build(), "junk"]),
            [Outcome::Passed, Outcome::Passed]
        );
    }

    #[test]
    fn unreadable_positions_are_withheld_from_the_public() {
        let mut h = harness("{}");
        assert_eq!(
            h.deliver(
                r#"{"device_id":"1","latitude":"x","longitude":1}"#,
                &public()
            ),
            Outcome::Dropped
        );
        assert_eq!(
            h.deliver(
                r#"{"device_id":"1","latitude":1e400,"longitude":1}"#,
                &public()
            ),
            Outcome::Dropped
        );
        assert_eq!(h.deliver("garbage", &public()), Outcome::Dropped);
    }

    #[test]
    fn config() {
        assert!(Harness::<AudienceFilter>::new(r#"{"decimals":10}"#).is_err());
        assert!(Harness::<AudienceFilter>::new(r#"{"decimals":2.5}"#).is_err());
        assert!(Harness::<AudienceFilter>::new(r#"{"full_roles":[""]}"#).is_err());
        assert!(Harness::<AudienceFilter>::new(r#"{"full_role":["x"]}"#).is_err());
        let mut h = harness(r#"{"decimals":0}"#);
        let out = h.deliver(&SampleRecord::new().build(), &public());
        assert_eq!(
            Record::new(out.replaced().unwrap()).get_raw("latitude"),
            Some("41")
        );
    }
}
