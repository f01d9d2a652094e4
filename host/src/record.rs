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
