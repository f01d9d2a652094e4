//! One position: decoded once from the stream's `payload`, written once as
//! wire JSON.
//!
//! The wire message of a record differs between topics only in its prefix
//! (`{"type":"position","topic":"event:<id>",`), so the rest (the *body*) is
//! serialized once per record and shared by every topic, by the snapshot
//! cache and by every subscriber.

use std::borrow::Cow;
use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Why a stream entry was skipped. The names are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// The entry has no `payload` field.
    NoPayload,
    /// `payload` is not valid JSON, or a field has the wrong type.
    Json,
    /// `device_id`, `timestamp`, `latitude` or `longitude` is missing.
    MissingField,
    /// `timestamp` is not ISO-8601.
    Timestamp,
    /// Coordinates outside the globe, or not finite.
    Coordinates,
    /// Larger than `LIVE_MAX_RECORD_BYTES`.
    TooLarge,
}

impl Malformed {
    pub fn label(self) -> &'static str {
        match self {
            Malformed::NoPayload => "no_payload",
            Malformed::Json => "json",
            Malformed::MissingField => "missing_field",
            Malformed::Timestamp => "timestamp",
            Malformed::Coordinates => "coordinates",
            Malformed::TooLarge => "too_large",
        }
    }
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The fields of a position the host uses. Everything else in the payload
/// (altitude, satellites, priority, …) only matters to plugins, which see the
/// raw payload.
#[derive(Debug, Clone)]
pub struct Position {
    /// The tracker's IMEI.
    pub device: Box<str>,
    /// Fix time, epoch milliseconds.
    pub ts_ms: i64,
    pub lat: f64,
    pub lon: f64,
    /// km/h; 0 when absent.
    pub speed: f64,
    /// Degrees (the Teltonika angle); 0 when absent.
    pub course: f64,
    /// The IO elements, as raw JSON text passed through untouched.
    pub attributes: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow, default)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
    #[serde(default)]
    speed: Option<f64>,
    #[serde(default)]
    angle: Option<f64>,
    #[serde(borrow, default)]
    attributes: Option<&'a RawValue>,
}

impl Position {
    /// Decodes a stream entry's `payload`.
    pub fn decode(payload: &[u8]) -> Result<Position, Malformed> {
        let p: Payload<'_> = serde_json::from_slice(payload).map_err(|_| Malformed::Json)?;
        let (Some(device), Some(timestamp), Some(lat), Some(lon)) =
            (p.device_id, p.timestamp, p.latitude, p.longitude)
        else {
            return Err(Malformed::MissingField);
        };
        if device.is_empty() {
            return Err(Malformed::MissingField);
        }
        let ts_ms = parse_timestamp_ms(&timestamp).ok_or(Malformed::Timestamp)?;
        if !(lat.is_finite() && lon.is_finite() && lat.abs() <= 90.0 && lon.abs() <= 180.0) {
            return Err(Malformed::Coordinates);
        }
        let finite_or_zero = |v: Option<f64>| v.filter(|v| v.is_finite()).unwrap_or(0.0);
        Ok(Position {
            device: device.into(),
            ts_ms,
            lat,
            lon,
            speed: finite_or_zero(p.speed),
            course: finite_or_zero(p.angle),
            attributes: p
                .attributes
                .filter(|a| a.get() != "null")
                .map(|a| a.to_owned()),
        })
    }

    /// The wire body: every field of a `position` message after its topic, and
    /// the closing brace. `{` + body is a snapshot entry.
    pub fn body(&self) -> Bytes {
        let attrs = self.attributes.as_ref().map_or(0, |a| a.get().len());
        let mut b = BytesMut::with_capacity(96 + self.device.len() + attrs);
        b.put_slice(b"\"deviceId\":");
        write_json_str(&mut b, &self.device);
        b.put_slice(b",\"lat\":");
        write_number(&mut b, self.lat);
        b.put_slice(b",\"lon\":");
        write_number(&mut b, self.lon);
        b.put_slice(b",\"ts\":");
        b.put_slice(itoa::Buffer::new().format(self.ts_ms).as_bytes());
        // The contract omits speed and course when 0 (a parked car, or a
        // tracker that does not report them).
        if self.speed != 0.0 {
            b.put_slice(b",\"speed\":");
            write_number(&mut b, self.speed);
        }
        if self.course != 0.0 {
            b.put_slice(b",\"course\":");
            write_number(&mut b, self.course);
        }
        if let Some(a) = &self.attributes {
            b.put_slice(b",\"attributes\":");
            b.put_slice(a.get().as_bytes());
        }
        b.put_u8(b'}');
        b.freeze()
    }
}

/// Parses an ISO-8601 / RFC 3339 timestamp to epoch milliseconds.
pub fn parse_timestamp_ms(s: &str) -> Option<i64> {
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Writes a number the way JavaScript's `JSON.stringify` does for the values
/// positions carry: integers without a fraction (`63`, not `63.0`), others in
/// their shortest round-trip form. The SPA was built against the TypeScript
/// processor's output, so the bytes match it.
pub fn write_number(b: &mut BytesMut, v: f64) {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        b.put_slice(itoa::Buffer::new().format(v as i64).as_bytes());
    } else if v.is_finite() {
        b.put_slice(ryu::Buffer::new().format_finite(v).as_bytes());
    } else {
        b.put_slice(b"null");
    }
}

/// Writes `s` as a JSON string literal.
pub fn write_json_str(b: &mut BytesMut, s: &str) {
    // IMEIs and UUIDs never need escaping; only foreign text takes the slow path.
    if s.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
        b.put_u8(b'"');
        b.put_slice(s.as_bytes());
        b.put_u8(b'"');
    } else {
        // Serializing a &str to JSON cannot fail.
        let _ = serde_json::to_writer((&mut *b).writer(), s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"device_id": "356307042441013", "timestamp": "2026-05-02T10:15:30.123Z",
 "latitude": 41.327953, "longitude": 19.819025, "altitude": 112,
 "angle": 271, "speed": 63, "satellites": 11, "priority": 0,
 "attributes": {"239": 1, "66": 12841,
                "78": {"__bigint": "18446744073709551615"},
                "385": {"__buffer_b64": "AQID"}}}"#;

    #[test]
    fn maps_the_payload_to_the_wire_shape() {
        let p = Position::decode(SAMPLE.as_bytes()).unwrap();
        assert_eq!(p.ts_ms, 1_777_716_930_123);
        let body = String::from_utf8(p.body().to_vec()).unwrap();
        assert_eq!(
            body,
            r#""deviceId":"356307042441013","lat":41.327953,"lon":19.819025,"ts":1777716930123,"speed":63,"course":271,"attributes":{"239": 1, "66": 12841,
                "78": {"__bigint": "18446744073709551615"},
                "385": {"__buffer_b64": "AQID"}}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&format!("{{{body}")).unwrap();
        assert_eq!(v["attributes"]["78"]["__bigint"], "18446744073709551615");
    }

    #[test]
    fn omits_zero_speed_and_course() {
        let p = Position::decode(
            br#"{"device_id":"1","timestamp":"2026-05-02T10:15:30Z","latitude":1.5,"longitude":-2,"speed":0,"angle":0}"#,
        )
        .unwrap();
        assert_eq!(
            &p.body()[..],
            br#""deviceId":"1","lat":1.5,"lon":-2,"ts":1777716930000}"#
        );
    }

    #[test]
    fn rejects_what_it_cannot_map() {
        let cases: [(&[u8], Malformed); 5] = [
            (b"not json", Malformed::Json),
            (br#"{"device_id":"1","timestamp":"2026-05-02T10:15:30Z","latitude":1}"#, Malformed::MissingField),
            (br#"{"device_id":"1","timestamp":"yesterday","latitude":1,"longitude":2}"#, Malformed::Timestamp),
            (br#"{"device_id":"1","timestamp":"2026-05-02T10:15:30Z","latitude":91,"longitude":2}"#, Malformed::Coordinates),
            (br#"{"device_id":1,"timestamp":"2026-05-02T10:15:30Z","latitude":1,"longitude":2}"#, Malformed::Json),
        ];
        for (input, want) in cases {
            assert_eq!(
                Position::decode(input).err(),
                Some(want),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn timestamps_with_offsets() {
        assert_eq!(parse_timestamp_ms("1970-01-01T01:00:00.001+01:00"), Some(1));
        assert_eq!(parse_timestamp_ms("2026-05-02"), None);
        assert_eq!(parse_timestamp_ms("2026-05-02T10:15:30"), None, "no offset");
    }

    #[test]
    fn escapes_foreign_text() {
        let mut b = BytesMut::new();
        write_json_str(&mut b, "a\"b\n");
        assert_eq!(&b[..], br#""a\"b\n""#);
    }
}

/// Property tests of payload decoding (run more cases with `PROPTEST_CASES`,
/// see docs/operations.md). The SDK's decoder is compared with this one in
/// the tests crate; these check the host's decoder alone.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;
    use std::collections::BTreeMap;

    /// Year 9999 minus a day, so that any offset stays within RFC 3339.
    const LAST_MS: i64 = 253_402_214_400_000;

    /// A fix time and how it is written: what the host must read from it.
    #[derive(Debug, Clone)]
    struct Stamp {
        text: String,
        ms: i64,
    }

    fn stamp() -> impl Strategy<Value = Stamp> {
        (
            0..LAST_MS,
            0..1_000_000u32,
            0..=9u32,
            prop::option::of(-(23 * 60 + 59)..=(23 * 60 + 59i32)),
        )
            .prop_map(|(ms, sub_ns, digits, offset)| {
                let nanos = i128::from(ms) * 1_000_000 + i128::from(sub_ns);
                let utc = time::OffsetDateTime::from_unix_timestamp_nanos(nanos).expect("in range");
                let off = offset.unwrap_or(0);
                let local =
                    utc.to_offset(time::UtcOffset::from_whole_seconds(off * 60).expect("offset"));
                // The fraction as written, cut to `digits` digits: the host
                // keeps its milliseconds.
                let frac_ns = (ms.rem_euclid(1000) as u32) * 1_000_000 + sub_ns;
                let shown = frac_ns / 10u32.pow(9 - digits);
                let kept_ms = i64::from(shown * 10u32.pow(9 - digits) / 1_000_000);
                let mut text = format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                    local.year(),
                    u8::from(local.month()),
                    local.day(),
                    local.hour(),
                    local.minute(),
                    local.second()
                );
                if digits > 0 {
                    text += &format!(".{shown:0width$}", width = digits as usize);
                }
                match offset {
                    None => text.push('Z'),
                    Some(o) => {
                        let sign = if o < 0 { '-' } else { '+' };
                        text += &format!("{sign}{:02}:{:02}", o.abs() / 60, o.abs() % 60);
                    }
                }
                Stamp {
                    text,
                    ms: ms - ms.rem_euclid(1000) + kept_ms,
                }
            })
    }

    /// How far the host's float parsing may land from the correctly rounded
    /// value: nowhere, since serde_json is built with `float_roundtrip`
    /// (without it, 6% of random doubles in ±90 came back 1 ulp off).
    const PARSE_ULPS: u64 = 0;

    /// A number of the payload, and whether it must be read exactly.
    #[derive(Debug, Clone, Copy)]
    struct Num {
        v: f64,
        exact: bool,
    }

    /// Numbers as trackers and the ingestion service write them (whole,
    /// up to 7 decimals, the limits, signed zero), or any double in range.
    fn number(limit: f64) -> impl Strategy<Value = Num> {
        let exact = prop_oneof![
            (-limit as i64..=limit as i64).prop_map(|v| v as f64),
            (-limit * 1e7..=limit * 1e7).prop_map(|v: f64| v.round() / 1e7),
            Just(limit),
            Just(-limit),
            Just(0.0),
            Just(-0.0),
        ]
        .prop_map(|v| Num { v, exact: true });
        let any = (-limit..=limit).prop_map(|v| Num { v, exact: false });
        prop_oneof![exact, any]
    }

    /// Any normal double, for fields the host does not bound.
    fn unbounded() -> impl Strategy<Value = Num> {
        prop_oneof![
            number(400.0),
            any::<f64>()
                .prop_filter("normal", |f| f.is_normal())
                .prop_map(|v| Num { v, exact: false }),
        ]
    }

    /// Distance between two doubles in units in the last place.
    fn ulps(a: f64, b: f64) -> u64 {
        if a == b {
            return 0;
        }
        if a.is_sign_negative() != b.is_sign_negative() {
            return u64::MAX;
        }
        a.to_bits().abs_diff(b.to_bits())
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A valid payload as the ingestion service might write it.
    #[derive(Debug, Clone)]
    struct Input {
        device: String,
        stamp: Stamp,
        lat: Num,
        lon: Num,
        speed: Option<Num>,
        angle: Option<Num>,
        /// The attributes' JSON text, written compact or pretty.
        attributes: Option<String>,
        text: String,
    }

    fn input() -> impl Strategy<Value = Input> {
        (
            prop_oneof!["\\PC{1,20}", "[\\x00-\\x20\"\\\\/\\x7fa-zé€😀]{1,20}"],
            stamp(),
            number(90.0),
            number(180.0),
            prop::option::of(unbounded()),
            prop::option::of(number(360.0)),
            prop::option::of((json(), any::<bool>())),
            prop::collection::btree_map("[a-z_]{1,10}", json(), 0..4),
            prop::collection::vec(any::<u32>(), 11),
        )
            .prop_map(
                |(device, stamp, lat, lon, speed, angle, attrs, extra, ranks)| {
                    let attributes = attrs.map(|(v, pretty)| {
                        if pretty {
                            serde_json::to_string_pretty(&v)
                        } else {
                            serde_json::to_string(&v)
                        }
                        .expect("JSON")
                    });
                    // Fields the host reads, in an order given by `ranks`,
                    // among others it must ignore.
                    let mut fields: Vec<(String, String)> = extra
                        .into_iter()
                        .map(|(k, v)| (format!("x_{k}"), v.to_string()))
                        .collect();
                    let mut put = |k: &str, v: String| fields.push((k.to_owned(), v));
                    put("device_id", Value::from(device.as_str()).to_string());
                    put("timestamp", Value::from(stamp.text.as_str()).to_string());
                    put("latitude", number_text(lat));
                    put("longitude", number_text(lon));
                    if let Some(s) = speed {
                        put("speed", number_text(s));
                    }
                    if let Some(a) = angle {
                        put("angle", number_text(a));
                    }
                    if let Some(a) = &attributes {
                        put("attributes", a.clone());
                    }
                    let mut ranked: Vec<_> = ranks.iter().zip(fields).collect();
                    ranked.sort_by_key(|(rank, _)| **rank);
                    let body: Vec<String> = ranked
                        .into_iter()
                        .map(|(_, (k, v))| format!("{}:{v}", Value::from(k)))
                        .collect();
                    Input {
                        device,
                        stamp,
                        lat,
                        lon,
                        speed,
                        angle,
                        attributes,
                        text: format!("{{{}}}", body.join(",")),
                    }
                },
            )
    }

    /// A number as JSON text, in the shortest form that reads back exactly.
    fn number_text(n: Num) -> String {
        Value::from(n.v).to_string()
    }

    /// The body's fields as JSON text, so numbers can be read exactly.
    fn fields(body: &[u8]) -> BTreeMap<String, Box<RawValue>> {
        let mut entry = b"{".to_vec();
        entry.extend_from_slice(body);
        serde_json::from_slice(&entry).expect("the body is a JSON object")
    }

    fn number_in(fields: &BTreeMap<String, Box<RawValue>>, k: &str) -> Option<f64> {
        fields
            .get(k)
            .map(|v| v.get().parse::<f64>().expect("a number"))
    }

    proptest! {
        /// The body of a decoded position is a JSON object whose fields equal
        /// the payload's: the device id, the fix time in ms, the numbers
        /// bit for bit (read with a correctly rounded parser), speed and
        /// course left out when zero, and the attributes byte for byte.
        #[test]
        fn prop_a_decoded_position_is_written_back_exactly(input in input()) {
            let p = Position::decode(input.text.as_bytes());
            let p = match p {
                Ok(p) => p,
                Err(e) => return Err(TestCaseError::fail(format!("{e}: {}", input.text))),
            };
            let body = p.body();
            let f = fields(&body);
            let device: String = serde_json::from_str(f["deviceId"].get()).expect("a string");
            prop_assert_eq!(&device, &input.device);
            prop_assert_eq!(f["ts"].get().parse::<i64>().ok(), Some(input.stamp.ms), "{}", input.stamp.text);
            // The writer is exact: the body's text reads back (correctly
            // rounded) to what the decoder holds. The decoder is exact for
            // numbers as trackers write them, close for any other.
            let read = |got: f64, want: Num, field: &str| {
                let off = ulps(got, want.v);
                if off > if want.exact { 0 } else { PARSE_ULPS } {
                    return Err(TestCaseError::fail(format!(
                        "{field}: read {got:e} from {}, {off} ulps off", number_text(want)
                    )));
                }
                Ok(())
            };
            prop_assert_eq!(number_in(&f, "lat"), Some(p.lat));
            prop_assert_eq!(number_in(&f, "lon"), Some(p.lon));
            read(p.lat, input.lat, "lat")?;
            read(p.lon, input.lon, "lon")?;
            let zero = Num { v: 0.0, exact: true };
            read(p.speed, input.speed.unwrap_or(zero), "speed")?;
            read(p.course, input.angle.unwrap_or(zero), "angle")?;
            let nonzero = |v: f64| (v != 0.0).then_some(v);
            prop_assert_eq!(number_in(&f, "speed"), nonzero(p.speed));
            prop_assert_eq!(number_in(&f, "course"), nonzero(p.course));
            let attributes = input.attributes.filter(|a| a != "null");
            prop_assert_eq!(f.get("attributes").map(|a| a.get()), attributes.as_deref());
        }

        /// Anything: no panic, and what is accepted writes a JSON body.
        #[test]
        fn prop_decode_never_panics(bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            input().prop_map(|i| i.text.into_bytes()),
            (input(), prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4))
                .prop_map(|(i, changes)| {
                    let mut b = i.text.into_bytes();
                    for (at, x) in changes {
                        let n = at.index(b.len());
                        b[n] ^= x;
                    }
                    b
                }),
            json().prop_map(|v| v.to_string().into_bytes()),
        ]) {
            if let Ok(p) = Position::decode(&bytes) {
                let f = fields(&p.body());
                prop_assert!(f.contains_key("deviceId") && f.contains_key("ts"));
            }
        }
    }
}
