//! The host and the plugin SDK read a record the same way.
//!
//! The host decodes every stream entry with serde_json and the `time`
//! crate (`livecast::test_util::Position::decode`); a plugin reads the same
//! bytes with the SDK's own scanner, number parser and timestamp parser
//! (`Record`). If the two disagreed, a geofence plugin could keep a position
//! the map then shows outside the fence. These properties generate payloads,
//! valid and nearly valid, and check that for device id, timestamp,
//! latitude, longitude, speed and angle both sides produce the same value,
//! bit for bit, or both reject the record, for the same reason.
//!
//! CI runs a bounded number of cases. To search longer:
//!
//! ```sh
//! PROPTEST_CASES=200000 cargo test --release -p livecast-tests --test sdk_differential
//! ```

use livecast::test_util::{Malformed, Position};
use livecast_plugin_sdk::Record;
use livecast_plugin_sdk::json;
use livecast_plugin_sdk::testing::check_record;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};

/// Cases per property when `PROPTEST_CASES` is unset: enough to hit every
/// generator branch many times, cheap enough for a debug build in CI.
const CI_CASES: u32 = 2_000;

fn runner() -> TestRunner {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(CI_CASES);
    TestRunner::new(ProptestConfig {
        cases,
        // A failure must be reproducible from its printed input, not from a
        // file the CI machine threw away.
        failure_persistence: None,
        ..ProptestConfig::default()
    })
}

// ---------------------------------------------------------------------------
// What each side makes of a payload
// ---------------------------------------------------------------------------

/// The fields both sides read, with the host's conventions: speed and angle
/// are 0 when absent or null.
#[derive(Debug, Clone, PartialEq)]
struct Fields {
    device: String,
    ts_ms: i64,
    /// As bits, so that -0.0 and 0.0 differ and NaN cannot hide.
    lat: u64,
    lon: u64,
    speed: u64,
    angle: u64,
}

fn host(payload: &str) -> Result<Fields, Malformed> {
    Position::decode(payload.as_bytes()).map(|p| Fields {
        device: p.device.to_string(),
        ts_ms: p.ts_ms,
        lat: p.lat.to_bits(),
        lon: p.lon.to_bits(),
        speed: p.speed.to_bits(),
        angle: p.course.to_bits(),
    })
}

/// The SDK's accessors, read the way a plugin reads them.
fn sdk_values(payload: &str) -> Fields {
    let r = Record::new(payload);
    Fields {
        device: r.device_id().unwrap_or("<none>").to_string(),
        ts_ms: r.timestamp_ms().unwrap_or(i64::MIN),
        lat: r.latitude().map_or(u64::MAX, f64::to_bits),
        lon: r.longitude().map_or(u64::MAX, f64::to_bits),
        speed: r.speed().unwrap_or(0.0).to_bits(),
        angle: r.angle().unwrap_or(0.0).to_bits(),
    }
}

/// The host's verdict as a plugin can reach it: the test harness's
/// replacement check (`testing::check_record`, the host's rules applied
/// through the SDK's public API), its reason mapped to the host's, then
/// the accessors.
fn sdk_decode(payload: &str) -> Result<Fields, Malformed> {
    check_record(payload).map_err(|why| match why {
        "`device_id`, `timestamp`, `latitude` or `longitude` is missing or empty" => {
            Malformed::MissingField
        }
        "`timestamp` is not RFC 3339 with an offset" => Malformed::Timestamp,
        "`latitude` or `longitude` is outside the globe" => Malformed::Coordinates,
        _ => Malformed::Json,
    })?;
    Ok(sdk_values(payload))
}

/// How deeply `text` nests arrays and objects (brackets in strings aside).
fn nesting(text: &str) -> usize {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0, false, false);
    for c in text.bytes() {
        match (in_string, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') | (false, _, b'"') => in_string = !in_string,
            (false, _, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The property: when the host accepts, every SDK accessor returns the
/// host's value; when it rejects, the host's rules applied through the SDK
/// reject for the same reason. (The SDK's validators stop at
/// `json::MAX_DEPTH` levels, which the host does not; its record reader
/// does not stop.)
fn agree(payload: &str) -> Result<(), TestCaseError> {
    let h = host(payload);
    if let Ok(fields) = &h {
        prop_assert_eq!(&sdk_values(payload), fields, "{}", payload);
    }
    if nesting(payload) <= json::MAX_DEPTH {
        prop_assert_eq!(sdk_decode(payload), h, "{}", payload);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

fn digits(min: usize, max: usize) -> BoxedStrategy<String> {
    proptest::collection::vec(0u8..10, min..=max)
        .prop_map(|d| d.into_iter().map(|d| char::from(b'0' + d)).collect())
        .boxed()
}

/// A double, written the ways JSON writers write them.
fn written_double() -> BoxedStrategy<String> {
    let value = prop_oneof![
        -180.0..180.0f64,
        -1e3..1e3f64,
        any::<f64>().prop_filter("finite", |v| v.is_finite()),
        (any::<u64>(), -330i32..330).prop_map(|(m, e)| m as f64 * 10f64.powi(e)),
    ]
    .prop_filter("finite", |v| v.is_finite());
    (value, 0u8..6, 10usize..30)
        .prop_map(|(v, style, prec)| match style {
            // Shortest round trip: what JavaScript and ryu write.
            0 | 1 => ryu::Buffer::new().format_finite(v).to_string(),
            2 => format!("{v:e}"),
            // Long mantissas: more digits than a double holds, exact or rounded.
            3 => format!("{v:.prec$e}"),
            4 => format!("{v:.prec$}"),
            _ => format!("{v:.7}"),
        })
        .boxed()
}

/// Number-like text, valid or not: odd digit counts, exponents, signs.
fn number_text() -> BoxedStrategy<String> {
    let built = (
        prop_oneof![Just(""), Just("-"), Just("+"), Just("--")],
        prop_oneof![
            3 => digits(1, 1).prop_filter("no leading zero", |d| d != "0"),
            3 => (1u8..10, digits(0, 30)).prop_map(|(h, t)| format!("{h}{t}")),
            2 => Just("0".to_string()),
            1 => (digits(1, 1), digits(1, 3)).prop_map(|(a, b)| format!("0{a}{b}")),
            1 => Just(String::new()),
        ],
        prop_oneof![
            3 => Just(String::new()),
            4 => digits(1, 40).prop_map(|d| format!(".{d}")),
            1 => Just(".".to_string()),
        ],
        prop_oneof![
            4 => Just(String::new()),
            3 => (
                prop_oneof![Just("e"), Just("E")],
                prop_oneof![Just(""), Just("+"), Just("-")],
                prop_oneof![digits(1, 3), digits(4, 12)],
            )
                .prop_map(|(e, s, d)| format!("{e}{s}{d}")),
            1 => Just("e".to_string()),
        ],
    )
        .prop_map(|(s, i, f, e)| format!("{s}{i}{f}{e}"));
    prop_oneof![
        4 => written_double(),
        4 => built,
        1 => prop_oneof![
            Just("1.7976931348623157e308".to_string()),
            Just("1.7976931348623158e308".to_string()),
            Just("1.7976931348623159e308".to_string()),
            Just("2.2250738585072011e-308".to_string()),
            Just("4.9e-324".to_string()),
            Just("2.4703282292062328e-324".to_string()),
            Just("2.4703282292062327e-324".to_string()),
            Just("9007199254740993".to_string()),
            Just("-9223372036854775809".to_string()),
            Just("18446744073709551616".to_string()),
            Just("-0".to_string()),
            Just("-0.0e-7".to_string()),
            Just("1e400".to_string()),
            Just("1e-400".to_string()),
            Just("0e99999999999".to_string()),
            Just("1e99999999999".to_string()),
            Just("NaN".to_string()),
            Just("0x10".to_string()),
        ],
    ]
    .boxed()
}

/// A JSON string literal, optionally with escapes, of `s`.
fn quoted(s: String, escape: bool) -> String {
    if !escape {
        return format!("\"{s}\"");
    }
    let mut out = String::from("\"");
    for (i, c) in s.chars().enumerate() {
        if i % 3 == 0 && (c as u32) < 0x80 {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.push('"');
    out
}

/// Timestamp text, valid or nearly: offsets, fractions, leap seconds,
/// separators, out-of-range fields.
fn timestamp_text() -> BoxedStrategy<String> {
    let two = |max: u32| (0..max).prop_map(|v| format!("{v:02}"));
    let year = prop_oneof![
        4 => (1960u32..2100).prop_map(|y| format!("{y:04}")),
        1 => (0u32..10_000).prop_map(|y| format!("{y:04}")),
        1 => prop_oneof![Just("1969"), Just("1970"), Just("2016"), Just("0000"), Just("9999"), Just("20266"), Just("+2026"), Just("２０２6")].prop_map(str::to_string),
    ];
    let month = prop_oneof![6 => (1u32..13).prop_map(|v| format!("{v:02}")), 1 => two(100)];
    let day = prop_oneof![
        6 => (1u32..29).prop_map(|v| format!("{v:02}")),
        2 => prop_oneof![Just("29"), Just("30"), Just("31")].prop_map(str::to_string),
        1 => two(100),
    ];
    let sep = prop_oneof![
        6 => Just("T"),
        1 => Just("t"),
        2 => Just(" "),
        1 => Just("x"),
        1 => Just("é"),
        1 => Just(""),
        1 => Just("TT"),
    ];
    let hour = prop_oneof![6 => two(24), 1 => two(100)];
    let minute = prop_oneof![6 => two(60), 1 => two(100)];
    let second = prop_oneof![
        6 => two(60),
        2 => Just("60".to_string()),
        1 => two(100),
    ];
    let frac = prop_oneof![
        3 => Just(String::new()),
        4 => digits(1, 12).prop_map(|d| format!(".{d}")),
        1 => Just(".".to_string()),
        1 => Just(",5".to_string()),
    ];
    let offset = prop_oneof![
        4 => Just("Z".to_string()),
        1 => Just("z".to_string()),
        1 => Just(String::new()),
        3 => (prop_oneof![Just('+'), Just('-')], two(24), two(60)).prop_map(|(s, h, m)| format!("{s}{h}:{m}")),
        1 => (prop_oneof![Just('+'), Just('-')], two(30), two(70)).prop_map(|(s, h, m)| format!("{s}{h}:{m}")),
        1 => (prop_oneof![Just('+'), Just('-')], two(24), two(60)).prop_map(|(s, h, m)| format!("{s}{h}{m}")),
    ];
    // Leap seconds only count at the end of a month: steer some there.
    let leap = prop_oneof![
        Just("2016-12-31T23:59:60Z"),
        Just("2016-06-30T23:59:60.123Z"),
        Just("2017-01-01T00:59:60+01:00"),
        Just("2016-12-31T22:59:60-01:00"),
        Just("1969-12-31T23:59:60Z"),
        Just("2016-06-29T23:59:60Z"),
        Just("1969-12-31T23:59:59.9995Z"),
        Just("1969-12-31T23:59:59.000001Z"),
    ]
    .prop_map(str::to_string);
    prop_oneof![
        9 => (year, month, day, sep, hour, minute, second, frac, offset).prop_map(
            |(y, mo, d, sep, h, mi, s, f, o)| format!("{y}-{mo}-{d}{sep}{h}:{mi}:{s}{f}{o}")
        ),
        1 => leap,
    ]
    .boxed()
}

/// Any JSON value that is not a number or a string (wrong types), or null.
fn other_value() -> BoxedStrategy<String> {
    prop_oneof![
        Just("null"),
        Just("true"),
        Just("false"),
        Just("{}"),
        Just("[]"),
        Just("[1]"),
        Just("{\"a\":1}"),
    ]
    .prop_map(str::to_string)
    .boxed()
}

/// A member's value: present and of the expected kind most of the time.
fn member(kind: BoxedStrategy<String>) -> BoxedStrategy<Option<String>> {
    prop_oneof![
        12 => kind.prop_map(Some),
        1 => Just(None),
        1 => other_value().prop_map(Some),
        1 => number_text().prop_map(Some),
        1 => any::<bool>().prop_map(|e| Some(quoted("41.5".into(), e))),
    ]
    .boxed()
}

fn device_value() -> BoxedStrategy<String> {
    prop_oneof![
        8 => (any::<bool>(), 100_000_000_000_000u64..999_999_999_999_999).prop_map(|(e, v)| quoted(v.to_string(), e)),
        1 => Just("\"\"".to_string()),
        1 => Just("\"d\\u00e9vice \\\"7\\\"\"".to_string()),
        1 => Just("\"\\ud800\"".to_string()),
        1 => Just("\"\\ud83d\\ude00\"".to_string()),
    ]
    .boxed()
}

fn latitude_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => written_double_in(-90.0, 90.0),
        2 => number_text(),
    ]
    .boxed()
}

fn longitude_value() -> BoxedStrategy<String> {
    prop_oneof![
        3 => written_double_in(-180.0, 180.0),
        2 => number_text(),
    ]
    .boxed()
}

fn written_double_in(lo: f64, hi: f64) -> BoxedStrategy<String> {
    (lo..=hi, 0u8..4, 17usize..25)
        .prop_map(|(v, style, prec)| match style {
            0 | 1 => ryu::Buffer::new().format_finite(v).to_string(),
            2 => format!("{v:.prec$}"),
            _ => format!("{v:.6}"),
        })
        .boxed()
}

/// Nested JSON for `attributes`, sometimes deeper than the SDK's config
/// parser goes (records are read at any depth, as the host reads them).
fn attributes_value() -> BoxedStrategy<String> {
    prop_oneof![
        4 => Just(r#"{"239": 1, "66": 12841, "78": {"__bigint": "18446744073709551615"}, "385": {"__buffer_b64": "AQID"}}"#.to_string()),
        1 => Just("null".to_string()),
        1 => (1usize..200).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
        1 => (1usize..200).prop_map(|d| format!("{}{}", "{\"a\":".repeat(d), "}".repeat(d)).replace(":}", ":0}")),
        1 => Just(r#"{"s": "a \"quoted\" ] } string \\", "x": [{}, [], "\ud800"]}"#.to_string()),
    ]
    .boxed()
}

/// A payload: the host's members, extra ones, in any order, with any JSON
/// whitespace, keys sometimes escaped or repeated.
fn payload() -> BoxedStrategy<String> {
    let members = (
        member(device_value()),
        member(
            timestamp_text()
                .prop_flat_map(|t| any::<bool>().prop_map(move |e| quoted(t.clone(), e)))
                .boxed(),
        ),
        member(latitude_value()),
        member(longitude_value()),
        prop_oneof![3 => member(number_text()), 1 => Just(None)],
        prop_oneof![3 => member(number_text()), 1 => Just(None)],
        prop_oneof![2 => attributes_value().prop_map(Some), 1 => Just(None)],
        proptest::collection::vec(
            prop_oneof![
                Just(("altitude", "112")),
                Just(("satellites", "11")),
                Just(("priority", "0")),
                Just(("note", "\"a\\nb\"")),
                Just(("nested", "{\"latitude\": 1, \"device_id\": 2}")),
            ],
            0..3,
        ),
    );
    (
        members,
        any::<u64>(),
        prop_oneof![8 => Just(None), 1 => (0usize..6).prop_map(Some)],
        prop_oneof![4 => Just(""), 1 => Just(" "), 1 => Just("\n\t "), 1 => Just("\r\n")],
        any::<bool>(),
    )
        .prop_map(
            |((d, t, la, lo, sp, an, at, extra), order, repeat, ws, escape_keys)| {
                let mut fields: Vec<(String, String)> = Vec::new();
                for (key, value) in [
                    ("device_id", d),
                    ("timestamp", t),
                    ("latitude", la),
                    ("longitude", lo),
                    ("speed", sp),
                    ("angle", an),
                    ("attributes", at),
                ] {
                    if let Some(v) = value {
                        fields.push((key.to_string(), v));
                    }
                }
                for (k, v) in extra {
                    fields.push((k.to_string(), v.to_string()));
                }
                if let Some(i) = repeat
                    && let Some(f) = fields.get(i % fields.len().max(1)).cloned()
                {
                    fields.push(f);
                }
                // A deterministic shuffle from the generated seed.
                let mut seed = order | 1;
                for i in (1..fields.len()).rev() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    fields.swap(i, (seed % (i as u64 + 1)) as usize);
                }
                let body: Vec<String> = fields
                    .into_iter()
                    .enumerate()
                    .map(|(i, (k, v))| {
                        let key = quoted(k, escape_keys && i % 2 == 0);
                        format!("{ws}{key}{ws}:{ws}{v}{ws}")
                    })
                    .collect();
                format!("{ws}{{{}}}{ws}", body.join(","))
            },
        )
        .boxed()
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

#[test]
fn whole_payloads_agree() {
    runner().run(&payload(), |p| agree(&p)).unwrap();
}

/// Numbers alone, in every field that holds one.
#[test]
fn numbers_agree() {
    runner()
        .run(&number_text(), |n| {
            let ts = "2026-05-02T10:15:30.123Z";
            agree(&format!(
                r#"{{"device_id":"1","timestamp":"{ts}","latitude":{n},"longitude":19.8}}"#
            ))?;
            agree(&format!(
                r#"{{"device_id":"1","timestamp":"{ts}","latitude":41.3,"longitude":{n}}}"#
            ))?;
            agree(&format!(
                r#"{{"device_id":"1","timestamp":"{ts}","latitude":41.3,"longitude":19.8,"speed":{n},"angle":{n}}}"#
            ))
        })
        .unwrap();
}

/// Timestamps alone.
#[test]
fn timestamps_agree() {
    runner()
        .run(&timestamp_text(), |t| {
            let t = t.replace('\\', "\\\\").replace('"', "\\\"");
            agree(&format!(
                r#"{{"device_id":"1","timestamp":"{t}","latitude":41.3,"longitude":19.8}}"#
            ))
        })
        .unwrap();
}

/// Known cases, including every one the property tests once disagreed on.
#[test]
fn known_cases_agree() {
    let record = |ts: &str, lat: &str| {
        format!(
            r#"{{"device_id":"356307042441013","timestamp":"{ts}","latitude":{lat},"longitude":19.819025}}"#
        )
    };
    for (ts, lat) in [
        ("2026-05-02T10:15:30.123Z", "41.327953"),
        // A 17-digit coordinate serde_json's default parser rounds wrong.
        ("2026-05-02T10:15:30.123Z", "38.936333999245676"),
        ("2026-05-02 10:15:30Z", "4.1327953e1"),
        ("2026-05-02x10:15:30Z", "41"),
        ("2016-12-31T23:59:60Z", "-0"),
        ("2016-12-30T23:59:60Z", "0"),
        ("1969-12-31T23:59:59.9995Z", "1e-400"),
        (
            "2026-05-02T10:15:30.123456789123Z",
            "89.99999999999999999999999",
        ),
        ("2026-05-02T10:15:30Z", "90.000000000000000000001"),
        ("2026-05-02T10:15:30Z", "1e400"),
    ] {
        agree(&record(ts, lat)).unwrap();
    }
    // Deeper than any limit of the SDK's config parser, before the fields.
    let deep = format!(
        r#"{{"attributes":{}{}, "device_id":"1","timestamp":"2026-05-02T10:15:30Z","latitude":1,"longitude":2}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    assert!(host(&deep).is_ok());
    assert_eq!(Record::new(&deep).latitude(), Some(1.0));
    assert_eq!(sdk_values(&deep), host(&deep).unwrap());
}
