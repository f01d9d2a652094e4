//! The wire protocol (docs/protocol.md): strict parsing of client frames and
//! the server's messages, written straight to bytes.

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use uuid::Uuid;

use crate::record::write_json_str;

/// Longest correlation `id` a client may send.
pub const MAX_ID_LEN: usize = 128;

/// A valid client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestKind,
    pub event: Uuid,
    pub id: Option<String>,
    /// Resume (subscribe only): the newest `ts` the client holds for the
    /// topic, in ms. See `resume`.
    pub since: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Subscribe,
    Unsubscribe,
}

impl Request {
    /// The topic in its canonical form, `event:<lowercase uuid>`.
    pub fn topic(&self) -> String {
        topic_of(self.event)
    }
}

pub fn topic_of(event: Uuid) -> String {
    format!("event:{}", event.hyphenated())
}

/// Error codes of `error` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Forbidden,
    NotFound,
    UnknownTopic,
    /// Transient: Directus or the database is unavailable; the client may retry.
    Error,
    BadRequest,
    TooManySubscriptions,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not-found",
            ErrorCode::UnknownTopic => "unknown-topic",
            ErrorCode::Error => "error",
            ErrorCode::BadRequest => "bad-request",
            ErrorCode::TooManySubscriptions => "too-many-subscriptions",
        }
    }
}

/// An `error` message to send, echoing what the request carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub topic: Option<String>,
    pub id: Option<String>,
    pub message: &'static str,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    topic: String,
    #[serde(default)]
    id: Option<String>,
    /// Absent, or an integer ≥ 0: `null`, a fraction, a negative number or
    /// a string is a `bad-request` like any other wrong type.
    #[serde(default, deserialize_with = "present_u64")]
    since: Option<u64>,
}

fn present_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(d).map(Some)
}

/// Parses a text frame. Anything that is not exactly a subscribe or
/// unsubscribe frame is an error reply; nothing else changes.
pub fn parse(text: &str) -> Result<Request, ErrorReply> {
    // serde would also accept a JSON array for a struct; only objects are frames.
    let object = text.trim_start().starts_with('{');
    let frame: Frame = match serde_json::from_str(text).ok().filter(|_| object) {
        Some(f) => f,
        None => {
            let (topic, id) = echo_fields(text);
            return Err(ErrorReply {
                code: ErrorCode::BadRequest,
                topic,
                id,
                message: "expected {\"type\": \"subscribe\"|\"unsubscribe\", \"topic\": string, \"id\"?: string, \"since\"?: integer >= 0} and nothing else",
            });
        }
    };
    let bad = |message| ErrorReply {
        code: ErrorCode::BadRequest,
        topic: Some(frame.topic.clone()),
        id: frame.id.clone().filter(|i| id_fits(i)),
        message,
    };
    if frame.id.as_ref().is_some_and(|i| !id_fits(i)) {
        return Err(bad("id is longer than 128 characters"));
    }
    let kind = match frame.kind.as_str() {
        "subscribe" => RequestKind::Subscribe,
        "unsubscribe" => RequestKind::Unsubscribe,
        _ => return Err(bad("type must be \"subscribe\" or \"unsubscribe\"")),
    };
    if kind == RequestKind::Unsubscribe && frame.since.is_some() {
        return Err(bad("since belongs to subscribe"));
    }
    let event = frame
        .topic
        .strip_prefix("event:")
        .and_then(|id| Uuid::try_parse(id).ok());
    let Some(event) = event else {
        return Err(ErrorReply {
            code: ErrorCode::UnknownTopic,
            topic: Some(frame.topic),
            id: frame.id,
            message: "the only topic is event:<event uuid>",
        });
    };
    Ok(Request {
        kind,
        event,
        id: frame.id,
        since: frame.since,
    })
}

fn id_fits(id: &str) -> bool {
    id.chars().count() <= MAX_ID_LEN
}

/// Best effort: the `topic` and `id` of a frame that failed strict parsing, so
/// the client can match the error to its request.
fn echo_fields(text: &str) -> (Option<String>, Option<String>) {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(text) else {
        return (None, None);
    };
    let field = |k: &str| {
        map.get(k)
            .and_then(|v| v.as_str())
            .filter(|s| id_fits(s))
            .map(str::to_owned)
    };
    (field("topic"), field("id"))
}

fn open(b: &mut BytesMut, kind: &str, topic: Option<&str>, id: Option<&str>) {
    b.put_slice(b"{\"type\":\"");
    b.put_slice(kind.as_bytes());
    b.put_u8(b'"');
    if let Some(topic) = topic {
        b.put_slice(b",\"topic\":");
        write_json_str(b, topic);
    }
    if let Some(id) = id {
        b.put_slice(b",\"id\":");
        write_json_str(b, id);
    }
}

/// The head of a `subscribed` reply, the client's own part:
/// `{"type":"subscribed","topic":…,"id":…,` (and `"delta":true,` when the
/// snapshot that follows is a resume's delta). The snapshot body
/// ([`snapshot_body`]) follows it on the wire, in the same frame.
pub fn subscribed_head(topic: &str, id: Option<&str>, delta: bool) -> Bytes {
    let mut b = BytesMut::with_capacity(54 + topic.len() + id.map_or(0, |i| i.len() + 8));
    open(&mut b, "subscribed", Some(topic), id);
    if delta {
        b.put_slice(b",\"delta\":true");
    }
    b.put_u8(b',');
    b.freeze()
}

/// The rest of a `subscribed` reply, `"snapshot":[{entry},…]}`, from
/// position bodies (see [`crate::record::Position::body`]): written once
/// per snapshot and audience, shared by every subscriber it is sent to.
pub fn snapshot_body<'a>(bodies: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Bytes {
    let size: usize = bodies.clone().map(|b| b.len() + 2).sum();
    let mut b = BytesMut::with_capacity(16 + size);
    b.put_slice(b"\"snapshot\":[");
    for (i, body) in bodies.enumerate() {
        if i > 0 {
            b.put_u8(b',');
        }
        b.put_u8(b'{');
        b.put_slice(body);
    }
    b.put_slice(b"]}");
    b.freeze()
}

/// `{"type":"unsubscribed","topic":…,"id":…}`
pub fn unsubscribed(topic: &str, id: Option<&str>) -> Bytes {
    let mut b = BytesMut::with_capacity(64 + topic.len());
    open(&mut b, "unsubscribed", Some(topic), id);
    b.put_u8(b'}');
    b.freeze()
}

/// `{"type":"error","code":…,"topic":…,"id":…,"message":…}`
pub fn error(e: &ErrorReply) -> Bytes {
    let mut b = BytesMut::with_capacity(160);
    b.put_slice(b"{\"type\":\"error\",\"code\":\"");
    b.put_slice(e.code.as_str().as_bytes());
    b.put_u8(b'"');
    if let Some(topic) = &e.topic {
        b.put_slice(b",\"topic\":");
        write_json_str(&mut b, topic);
    }
    if let Some(id) = &e.id {
        b.put_slice(b",\"id\":");
        write_json_str(&mut b, id);
    }
    b.put_slice(b",\"message\":");
    write_json_str(&mut b, e.message);
    b.put_u8(b'}');
    b.freeze()
}

/// The part of every `position` message of a topic before the record's body.
pub fn position_prefix(event: Uuid) -> Bytes {
    let mut b = BytesMut::with_capacity(80);
    b.put_slice(b"{\"type\":\"position\",\"topic\":\"event:");
    b.put_slice(
        event
            .hyphenated()
            .encode_lower(&mut Uuid::encode_buffer())
            .as_bytes(),
    );
    b.put_slice(b"\",");
    b.freeze()
}

/// A `position` message: the topic's prefix and the record's body, joined
/// once per topic and shared by every subscriber of that topic.
pub fn position(prefix: &[u8], body: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(prefix.len() + body.len());
    b.put_slice(prefix);
    b.put_slice(body);
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = "0b6c7c1e-3a3b-4b8e-9d1a-2f6f5c4e8a10";

    #[test]
    fn parses_requests() {
        let r = parse(&format!(
            r#"{{"type":"subscribe","topic":"event:{EVENT}","id":"r1"}}"#
        ))
        .unwrap();
        assert_eq!(r.kind, RequestKind::Subscribe);
        assert_eq!(r.topic(), format!("event:{EVENT}"));
        assert_eq!(r.id.as_deref(), Some("r1"));
        let r = parse(&format!(
            r#"{{"topic":"event:{EVENT}","type":"unsubscribe"}}"#
        ))
        .unwrap();
        assert_eq!((r.kind, r.id), (RequestKind::Unsubscribe, None));
        assert_eq!(r.since, None);
        let r = parse(&format!(
            r#"{{"type":"subscribe","topic":"event:{EVENT}","since":1777716930123}}"#
        ))
        .unwrap();
        assert_eq!(r.since, Some(1_777_716_930_123));
        let r = parse(&format!(
            r#"{{"type":"subscribe","topic":"event:{EVENT}","since":0}}"#
        ))
        .unwrap();
        assert_eq!(r.since, Some(0));
    }

    #[test]
    fn since_is_an_integer_of_a_subscribe_or_a_bad_request() {
        let topic = format!("event:{EVENT}");
        for since in [
            "-1",
            "1.5",
            "1e3",
            "\"17\"",
            "null",
            "true",
            "[1]",
            "18446744073709551616",
        ] {
            let frame =
                format!(r#"{{"type":"subscribe","topic":"{topic}","id":"s","since":{since}}}"#);
            let e = parse(&frame).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{frame}");
            assert_eq!(e.id.as_deref(), Some("s"), "{frame}");
        }
        let e = parse(&format!(
            r#"{{"type":"unsubscribe","topic":"{topic}","since":5}}"#
        ))
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert_eq!(e.message, "since belongs to subscribe");
    }

    #[test]
    fn a_delta_says_so_in_its_head() {
        let topic = format!("event:{EVENT}");
        let full = [
            subscribed_head(&topic, Some("a"), false),
            snapshot_body([].into_iter()),
        ]
        .concat();
        let delta = [
            subscribed_head(&topic, Some("a"), true),
            snapshot_body([].into_iter()),
        ]
        .concat();
        let full: serde_json::Value = serde_json::from_slice(&full).unwrap();
        let delta: serde_json::Value = serde_json::from_slice(&delta).unwrap();
        assert_eq!(full.get("delta"), None, "a full snapshot is as before");
        assert_eq!(delta["delta"], serde_json::Value::Bool(true));
        assert_eq!(delta["snapshot"], serde_json::Value::Array(vec![]));
    }

    #[test]
    fn rejects_everything_else() {
        let topic = format!("event:{EVENT}");
        let bad = [
            "nope".to_owned(),
            "[]".to_owned(),
            format!(r#"["subscribe","{topic}","r1"]"#),
            format!(r#"{{"topic":"{topic}"}}"#),
            r#"{"type":"subscribe"}"#.to_owned(),
            format!(r#"{{"type":"publish","topic":"{topic}","id":"x"}}"#),
            format!(r#"{{"type":"subscribe","topic":"{topic}","id":7}}"#),
            format!(r#"{{"type":"subscribe","topic":"{topic}","extra":true}}"#),
            format!(
                r#"{{"type":"subscribe","topic":"{topic}","id":"{}"}}"#,
                "x".repeat(129)
            ),
        ];
        for frame in &bad {
            let e = parse(frame).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{frame}");
        }
        let e = parse(r#"{"type":"publish","topic":"t","id":"x"}"#).unwrap_err();
        assert_eq!(
            (e.topic.as_deref(), e.id.as_deref()),
            (Some("t"), Some("x"))
        );
        for topic in ["device:1", "event:not-a-uuid", "event:"] {
            let e = parse(&format!(
                r#"{{"type":"subscribe","topic":"{topic}","id":"q"}}"#
            ))
            .unwrap_err();
            assert_eq!(e.code, ErrorCode::UnknownTopic);
            assert_eq!(e.topic.as_deref(), Some(topic));
        }
    }

    #[test]
    fn writes_messages() {
        let event = Uuid::parse_str(EVENT).unwrap();
        let topic = topic_of(event);
        let bodies: [&[u8]; 2] = [
            br#""deviceId":"1","lat":1,"lon":2,"ts":3}"#,
            br#""deviceId":"2","lat":1,"lon":2,"ts":3}"#,
        ];
        let subscribed = |id, body: Bytes| [subscribed_head(&topic, id, false), body].concat();
        let msg = subscribed(Some("r1"), snapshot_body(bodies.iter().copied()));
        assert_eq!(
            &msg[..],
            format!(
                r#"{{"type":"subscribed","topic":"{topic}","id":"r1","snapshot":[{{"deviceId":"1","lat":1,"lon":2,"ts":3}},{{"deviceId":"2","lat":1,"lon":2,"ts":3}}]}}"#
            )
            .as_bytes(),
            "the same bytes as one message, field order kept"
        );
        let v: serde_json::Value = serde_json::from_slice(&msg).unwrap();
        assert_eq!(v["type"], "subscribed");
        assert_eq!(v["id"], "r1");
        assert_eq!(v["snapshot"][1]["deviceId"], "2");
        let msg = subscribed(None, snapshot_body(std::iter::empty()));
        assert_eq!(
            &msg[..],
            format!(r#"{{"type":"subscribed","topic":"{topic}","snapshot":[]}}"#).as_bytes()
        );
        let msg = subscribed(Some("a\"b"), snapshot_body(std::iter::empty()));
        let v: serde_json::Value = serde_json::from_slice(&msg).unwrap();
        assert_eq!(v["id"], "a\"b", "the id is escaped in the head");
        let msg = position(&position_prefix(event), bodies[0]);
        assert_eq!(
            &msg[..],
            format!(
                r#"{{"type":"position","topic":"{topic}","deviceId":"1","lat":1,"lon":2,"ts":3}}"#
            )
            .as_bytes()
        );
        let e = error(&ErrorReply {
            code: ErrorCode::Forbidden,
            topic: Some(topic.clone()),
            id: Some("r\"1".into()),
            message: "no",
        });
        let v: serde_json::Value = serde_json::from_slice(&e).unwrap();
        assert_eq!(
            (v["code"].as_str(), v["id"].as_str()),
            (Some("forbidden"), Some("r\"1"))
        );
    }
}

/// Property tests of request parsing (run more cases with `PROPTEST_CASES`,
/// see docs/operations.md).
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// JSON whitespace, sometimes none.
    fn ws() -> impl Strategy<Value = String> {
        "[ \t\r\n]{0,3}"
    }

    /// The forms `Uuid::try_parse` accepts, any case.
    fn topic_of_form(event: Uuid, form: u8, upper: bool) -> String {
        let id = match form {
            0 => event.hyphenated().to_string(),
            1 => event.simple().to_string(),
            2 => event.braced().to_string(),
            _ => event.urn().to_string(),
        };
        format!("event:{}", if upper { id.to_uppercase() } else { id })
    }

    /// Characters JSON must escape, and a few it need not.
    const ESCAPES: &str = "[\\x00-\\x20\"\\\\/\\x7fa-zé€😀]{0,40}";

    /// Any string a client may put in `id` (128 characters at most).
    fn id() -> impl Strategy<Value = Option<String>> {
        prop::option::of(prop_oneof![any::<String>(), "\\PC{0,128}", ESCAPES])
            .prop_map(|id| id.map(|s| s.chars().take(MAX_ID_LEN).collect()))
    }

    /// A well-formed request: its text (fields in any order, any
    /// whitespace, `"id": null` for no id) and what it must parse to.
    fn request() -> impl Strategy<Value = (String, Request)> {
        (
            any::<bool>(),
            any::<u128>(),
            (0..4u8, any::<bool>()),
            id(),
            any::<bool>(),
            prop::option::of(any::<u64>()),
            Just(()).prop_perturb(|_, mut rng| {
                let mut order = [0usize, 1, 2, 3];
                for i in (1..4).rev() {
                    order.swap(i, rng.random_range(0..=i));
                }
                order
            }),
            prop::collection::vec(ws(), 16),
        )
            .prop_map(
                |(sub, uuid, (form, upper), id, null_id, since, order, gaps)| {
                    // `since` belongs to subscribe only.
                    let since = since.filter(|_| sub);
                    let event = Uuid::from_u128(uuid);
                    let kind = if sub { "subscribe" } else { "unsubscribe" };
                    let topic = topic_of_form(event, form, upper);
                    let id_json = match (&id, null_id) {
                        (Some(i), _) => Some(Value::from(i.as_str()).to_string()),
                        (None, true) => Some("null".to_owned()),
                        (None, false) => None,
                    };
                    let fields: Vec<(&str, String)> = [
                        Some(("type", Value::from(kind).to_string())),
                        Some(("topic", Value::from(topic).to_string())),
                        id_json.map(|j| ("id", j)),
                        since.map(|n| ("since", n.to_string())),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    let mut text = format!("{}{{", gaps[0]);
                    let mut g = gaps[1..].iter();
                    let mut sep = "";
                    for &i in order.iter().filter(|&&i| i < fields.len()) {
                        let (k, v) = &fields[i];
                        let mut gap = || g.next().map_or("", String::as_str);
                        text += &format!("{sep}{}\"{k}\"{}:{}{v}{}", gap(), gap(), gap(), gap());
                        sep = ",";
                    }
                    text += "}";
                    let kind = if sub {
                        RequestKind::Subscribe
                    } else {
                        RequestKind::Unsubscribe
                    };
                    (
                        text,
                        Request {
                            kind,
                            event,
                            id,
                            since,
                        },
                    )
                },
            )
    }

    /// Text near the grammar: fragments of requests, glued at random.
    fn near_json() -> impl Strategy<Value = String> {
        let token = prop_oneof![
            Just("{".to_owned()),
            Just("}".to_owned()),
            Just("[".to_owned()),
            Just("]".to_owned()),
            Just(",".to_owned()),
            Just(":".to_owned()),
            Just("\"type\"".to_owned()),
            Just("\"topic\"".to_owned()),
            Just("\"id\"".to_owned()),
            Just("\"subscribe\"".to_owned()),
            Just("\"unsubscribe\"".to_owned()),
            Just("\"event:0b6c7c1e-3a3b-4b8e-9d1a-2f6f5c4e8a10\"".to_owned()),
            Just("null".to_owned()),
            Just("true".to_owned()),
            Just("-1.5e3".to_owned()),
            Just("\"\\u0000\\ud800\"".to_owned()),
            "\"[^\"\\\\]{0,140}\"",
            ESCAPES.prop_map(|s| Value::from(s).to_string()),
            ws(),
        ];
        prop::collection::vec(token, 0..16).prop_map(|t| t.concat())
    }

    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            near_json(),
            request().prop_map(|(t, _)| t),
            // A request with a piece cut out or a character put in.
            (
                request(),
                any::<prop::sample::Index>(),
                any::<char>(),
                0..4usize
            )
                .prop_map(|((t, _), at, c, cut)| {
                    let mut chars: Vec<char> = t.chars().collect();
                    let i = at.index(chars.len() + 1);
                    let end = (i + cut).min(chars.len());
                    chars.splice(i..end, [c]);
                    chars.into_iter().collect()
                }),
        ]
    }

    proptest! {
        #[test]
        fn prop_a_well_formed_request_parses_to_itself((text, want) in request()) {
            let got = parse(&text);
            prop_assert_eq!(got.as_ref(), Ok(&want), "{}", text);
            let topic = want.topic();
            prop_assert_eq!(topic.len(), "event:".len() + 36);
            // Its replies carry the canonical topic and the id, as sent.
            let reply: Value = serde_json::from_slice(&unsubscribed(&topic, want.id.as_deref()))
                .expect("JSON reply");
            prop_assert_eq!(reply["topic"].as_str(), Some(topic.as_str()));
            prop_assert_eq!(reply["id"].as_str(), want.id.as_deref());
        }

        /// Anything: no panic; a refusal is `bad-request` or
        /// `unknown-topic`, echoes no id over 128 characters, and makes a
        /// valid `error` message; an accepted text is a request object.
        #[test]
        fn prop_any_text_gets_a_request_or_a_valid_error(text in any_text()) {
            match parse(&text) {
                Ok(req) => {
                    let v: Value = serde_json::from_str(&text).expect("accepted text is JSON");
                    prop_assert_eq!(v["type"].as_str(), Some(match req.kind {
                        RequestKind::Subscribe => "subscribe",
                        RequestKind::Unsubscribe => "unsubscribe",
                    }));
                    prop_assert_eq!(v["id"].as_str(), req.id.as_deref());
                    prop_assert_eq!(v["since"].as_u64(), req.since);
                    prop_assert!(v["topic"].as_str().is_some_and(|t| t.starts_with("event:")));
                }
                Err(e) => {
                    prop_assert!(matches!(e.code, ErrorCode::BadRequest | ErrorCode::UnknownTopic));
                    prop_assert!(e.id.as_ref().is_none_or(|i| i.chars().count() <= MAX_ID_LEN));
                    let msg: Value = serde_json::from_slice(&error(&e)).expect("JSON error");
                    prop_assert_eq!(msg["type"].as_str(), Some("error"));
                    prop_assert_eq!(msg["code"].as_str(), Some(e.code.as_str()));
                    prop_assert_eq!(msg["id"].as_str(), e.id.as_deref());
                    prop_assert_eq!(msg["topic"].as_str(), e.topic.as_deref());
                    prop_assert_eq!(msg["message"].as_str(), Some(e.message));
                }
            }
        }
    }
}
