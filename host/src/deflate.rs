//! permessage-deflate (RFC 7692), compressed once per message, not once per
//! connection.
//!
//! The host accepts a client's offer only as
//! `permessage-deflate; server_no_context_takeover; client_no_context_takeover`
//! (with `server_max_window_bits=15` when the offer names it, as §7.1.2.1
//! requires):
//!
//! - *server_no_context_takeover*: no message refers back to an earlier
//!   one, so a message compressed once is valid on every connection that
//!   negotiated the extension, whatever each client received before. The
//!   record path compresses a position once per topic, a snapshot once per
//!   audience, and shares the compressed bytes exactly as it shares the
//!   plain ones.
//! - *client_no_context_takeover* (a server may add it unasked, RFC 7692
//!   §7.1.1.1): each client message inflates on its own, with the worker
//!   thread's inflater, so a connection keeps no compression state at all.
//!
//! A `subscribed` reply is the client's own head and a body shared by its
//! audience. DEFLATE blocks concatenate, so its compressed form is the head
//! as a *stored* block (five bytes of framing, no compressor per client)
//! followed by the body compressed once, with back-references that stay
//! inside the body.
//!
//! Messages under a threshold (`LIVE_WS_DEFLATE_MIN_BYTES`) go out as they
//! are (RSV1 clear): the extension lets every message choose.

use std::cell::RefCell;
use std::sync::OnceLock;

use bytes::{BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The `Sec-WebSocket-Extensions` value of an accepted offer.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The same for an offer with `server_max_window_bits`, which the response
/// must repeat (§7.1.2.1); 15 is the only value the host accepts.
const RESPONSE_WINDOW: &str = "permessage-deflate; server_no_context_takeover; \
     client_no_context_takeover; server_max_window_bits=15";

/// What every sync-flushed message ends with, left off on the wire
/// (RFC 7692 §7.2.1) and put back before inflating (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Compression level of positions: small messages, compressed once per
/// record and topic on the record path.
pub const POSITION_LEVEL: u32 = 1;
/// Compression level of snapshot bodies: compressed once per snapshot and
/// audience, and the largest messages by far.
pub const SNAPSHOT_LEVEL: u32 = 6;

/// The `Sec-WebSocket-Extensions` response to the client's offers (the
/// values of every `Sec-WebSocket-Extensions` header of the request, in
/// order): the first permessage-deflate offer the host can honour, if any.
/// An offer it cannot (a parameter it does not know, a value out of range,
/// `server_max_window_bits` under 15: the compressor always uses a 32 KiB
/// window) is declined, and the next one considered; a malformed header
/// offers nothing.
pub fn negotiate<'a>(headers: impl IntoIterator<Item = &'a [u8]>) -> Option<&'static str> {
    headers
        .into_iter()
        .filter_map(|h| std::str::from_utf8(h).ok().and_then(parse_extensions))
        .flatten()
        .find_map(|offer| honour(&offer))
}

/// One offered extension: its name and parameters, values unquoted.
#[derive(Debug, PartialEq, Eq)]
struct Offer {
    name: String,
    params: Vec<(String, Option<String>)>,
}

/// The response to one offer, if the host can honour it.
fn honour(offer: &Offer) -> Option<&'static str> {
    if !offer.name.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut seen: Vec<String> = Vec::new();
    for (name, value) in &offer.params {
        let name = name.to_ascii_lowercase();
        // A parameter given twice makes the offer invalid (§7).
        if seen.contains(&name) {
            return None;
        }
        let ok = match (name.as_str(), value.as_deref()) {
            ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
            // The client can take a window smaller than 15 bits; the host
            // does not ask for one, so the client keeps using 15.
            ("client_max_window_bits", None) => true,
            ("client_max_window_bits", Some(v)) => window_bits(v).is_some(),
            ("server_max_window_bits", Some(v)) => window_bits(v) == Some(15),
            _ => false,
        };
        if !ok {
            return None;
        }
        seen.push(name);
    }
    if seen.iter().any(|p| p == "server_max_window_bits") {
        Some(RESPONSE_WINDOW)
    } else {
        Some(RESPONSE)
    }
}

/// 8 to 15, written without leading zeros (§7.1.2.1).
fn window_bits(v: &str) -> Option<u8> {
    if v.starts_with('0') {
        return None;
    }
    v.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

/// `1#extension`, `extension = token *( ";" param )`, `param = token [ "="
/// (token | quoted-string) ]` (RFC 6455 §9.1); `None` if malformed.
fn parse_extensions(s: &str) -> Option<Vec<Offer>> {
    let mut p = Parser {
        s: s.as_bytes(),
        at: 0,
    };
    let mut offers = Vec::new();
    loop {
        p.spaces();
        // Empty list elements are allowed (RFC 7230 §7).
        if p.eat(b',') {
            continue;
        }
        if p.done() {
            break;
        }
        let name = p.token()?;
        let mut params = Vec::new();
        loop {
            p.spaces();
            if !p.eat(b';') {
                break;
            }
            p.spaces();
            let key = p.token()?;
            p.spaces();
            let value = if p.eat(b'=') {
                p.spaces();
                Some(if p.peek() == Some(b'"') {
                    p.quoted()?
                } else {
                    p.token()?
                })
            } else {
                None
            };
            params.push((key, value));
        }
        offers.push(Offer { name, params });
        p.spaces();
        if !p.done() && !p.eat(b',') {
            return None;
        }
    }
    (!offers.is_empty()).then_some(offers)
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    fn done(&self) -> bool {
        self.at >= self.s.len()
    }

    fn eat(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.at += usize::from(hit);
        hit
    }

    fn spaces(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.at += 1;
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.at;
        while self.peek().is_some_and(is_tchar) {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    /// A quoted string; its content must be a token (§9.1).
    fn quoted(&mut self) -> Option<String> {
        self.eat(b'"').then_some(())?;
        let mut out = Vec::new();
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    break;
                }
                b'\\' => {
                    out.push(*self.s.get(self.at + 1)?);
                    self.at += 2;
                }
                c => {
                    out.push(c);
                    self.at += 1;
                }
            }
        }
        (!out.is_empty() && out.iter().copied().all(is_tchar))
            .then(|| String::from_utf8_lossy(&out).into_owned())
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

thread_local! {
    /// One compressor per thread and level, reset between messages: a
    /// compressor is hundreds of KiB, too much to make per message.
    static COMPRESSORS: RefCell<Vec<(u32, Compress)>> = const { RefCell::new(Vec::new()) };
    static INFLATER: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// `data` as the payload of a compressed message: raw DEFLATE, sync-flushed,
/// without the trailing `00 00 ff ff`, referring to nothing before it.
/// `None` if that is no smaller than `data` (send it as it is).
pub fn compress(data: &[u8], level: u32) -> Option<Bytes> {
    compress_parts(&[data], level)
}

/// [`compress`] of the concatenation of `parts`.
pub fn compress_parts(parts: &[&[u8]], level: u32) -> Option<Bytes> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let out = COMPRESSORS.with_borrow_mut(|all| {
        let at = match all.iter().position(|(l, _)| *l == level) {
            Some(at) => at,
            None => {
                all.push((level, Compress::new(Compression::new(level), false)));
                all.len() - 1
            }
        };
        let c = &mut all[at].1;
        let out = deflate_into(c, parts, len);
        // Whatever happened, the next message starts from nothing.
        c.reset();
        out
    })?;
    (out.len() < len).then(|| Bytes::from(out))
}

fn deflate_into(c: &mut Compress, parts: &[&[u8]], len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len / 3 + 64);
    for (i, part) in parts.iter().enumerate() {
        let flush = if i + 1 == parts.len() {
            FlushCompress::Sync
        } else {
            FlushCompress::None
        };
        let start = c.total_in();
        loop {
            let done = (c.total_in() - start) as usize;
            c.compress_vec(&part[done..], &mut out, flush).ok()?;
            let all_in = (c.total_in() - start) as usize == part.len();
            // Full output: there may be more to come out.
            if all_in && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
    }
    if parts.is_empty() {
        c.compress_vec(&[], &mut out, FlushCompress::Sync).ok()?;
    }
    out.ends_with(&TAIL).then(|| {
        out.truncate(out.len() - TAIL.len());
        out
    })
}

/// `head` as stored (uncompressed) DEFLATE blocks, which a compressed body
/// can follow: how a per-client head joins a body compressed once.
pub fn stored(head: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(head.len() + 5 * (head.len() / 65_535 + 1));
    for chunk in head.chunks(65_535) {
        // BFINAL 0, BTYPE 00, padded to the byte; then LEN and NLEN.
        b.put_u8(0x00);
        b.put_u16_le(chunk.len() as u16);
        b.put_u16_le(!(chunk.len() as u16));
        b.put_slice(chunk);
    }
    b.freeze()
}

/// A position's bytes as one connection is to receive them: the record
/// path's shared message, or its compressed form for a connection that
/// negotiated permessage-deflate.
#[derive(Clone, Copy)]
pub struct Message<'m> {
    pub bytes: &'m Bytes,
    pub deflated: bool,
}

impl<'m> From<&'m Bytes> for Message<'m> {
    fn from(bytes: &'m Bytes) -> Self {
        Self {
            bytes,
            deflated: false,
        }
    }
}

/// A message shared by many connections, and its compressed form, made the
/// first time a connection that negotiated permessage-deflate needs it (so a
/// topic without such subscribers never pays for it).
#[derive(Debug)]
pub struct Packed {
    plain: Bytes,
    /// Unset: not tried yet; `None`: too short, or did not shrink.
    deflated: OnceLock<Option<Bytes>>,
}

impl Packed {
    pub fn new(plain: Bytes) -> Self {
        Self {
            plain,
            deflated: OnceLock::new(),
        }
    }

    /// What a connection is sent: the compressed form if it negotiated
    /// permessage-deflate (`deflate`) and the message is at least `min`
    /// bytes and shrinks. `compressed(in, out)` is called when it is made.
    pub fn for_connection(
        &self,
        deflate: bool,
        min: usize,
        compressed: impl FnOnce(usize, usize),
    ) -> Message<'_> {
        if !deflate || self.plain.len() < min {
            return Message::from(&self.plain);
        }
        let plain = &self.plain;
        let made = self.deflated.get_or_init(|| {
            let made = compress(plain, POSITION_LEVEL);
            if let Some(c) = &made {
                compressed(plain.len(), c.len());
            }
            made
        });
        match made {
            Some(bytes) => Message {
                bytes,
                deflated: true,
            },
            None => Message::from(&self.plain),
        }
    }
}

/// Why a compressed message could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates past the limit (a decompression bomb): 1009.
    TooLarge,
    /// Not valid DEFLATE data.
    Invalid,
}

/// The message a client compressed, at most `max` bytes of it. Never holds
/// more than `max + 1` bytes however much the input would inflate to.
pub fn inflate(payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    INFLATER.with_borrow_mut(|slot| {
        let d = slot.get_or_insert_with(|| Decompress::new(false));
        let out = inflate_with(d, payload, max);
        d.reset(false);
        out
    })
}

fn inflate_with(d: &mut Decompress, payload: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    let limit = max.saturating_add(1);
    let mut out = Vec::with_capacity(limit.min(payload.len().saturating_mul(4) + 256));
    for input in [payload, &TAIL[..]] {
        let start = d.total_in();
        loop {
            let done = (d.total_in() - start) as usize;
            let before = (d.total_in(), out.len());
            let status = d
                .decompress_vec(&input[done..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Invalid)?;
            if out.len() > max {
                return Err(InflateError::TooLarge);
            }
            if status == Status::StreamEnd {
                // A final block (§7.2.3.3 allows one): what follows is
                // not part of the message.
                return Ok(out);
            }
            let all_in = (d.total_in() - start) as usize == input.len();
            if out.len() == out.capacity() {
                out.reserve((out.capacity().max(256)).min(limit - out.len()));
                continue;
            }
            if all_in {
                break;
            }
            if (d.total_in(), out.len()) == before {
                return Err(InflateError::Invalid);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offers(h: &str) -> bool {
        negotiate([h.as_bytes()]).is_some()
    }

    #[test]
    fn offers_browsers_send_are_accepted() {
        for h in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate",
            "Permessage-Deflate; Server_No_Context_Takeover",
            "permessage-deflate; client_max_window_bits=15; server_max_window_bits=15",
            "permessage-deflate;client_no_context_takeover;server_no_context_takeover",
            "permessage-deflate; client_max_window_bits=\"10\"",
            "x-webkit-deflate-frame, permessage-deflate",
            "permessage-deflate; server_max_window_bits=10, permessage-deflate",
            ", permessage-deflate ,",
        ] {
            assert!(offers(h), "{h}");
        }
    }

    #[test]
    fn offers_the_host_cannot_honour_are_declined() {
        for h in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; client_max_window_bits=16",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; client_max_window_bits=015",
            "permessage-deflate; client_max_window_bits=\"\"",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; unknown",
            "permessage-deflate; client_max_window_bits=\"1 0\"",
            // Malformed lists offer nothing, whatever else they hold.
            "permessage-deflate; =15",
            "permessage-deflate; client_max_window_bits=\"15",
            "permessage-deflate permessage-deflate",
            "permessage-deflate; client_max_window_bits=15 15",
        ] {
            assert!(!offers(h), "{h}");
        }
        // Offers spread over several header lines.
        assert_eq!(
            negotiate([&b"foo"[..], b"permessage-deflate"]),
            Some(RESPONSE)
        );
        assert_eq!(negotiate([&b"foo"[..], &[0xff][..]]), None);
    }

    #[test]
    fn a_window_the_client_names_is_repeated_and_the_first_offer_wins() {
        let h = |s: &str| negotiate([s.as_bytes()]);
        assert_eq!(
            h("permessage-deflate; server_max_window_bits=15"),
            Some(RESPONSE_WINDOW)
        );
        assert_eq!(
            h("permessage-deflate; client_max_window_bits"),
            Some(RESPONSE)
        );
        assert_eq!(
            h("permessage-deflate; server_max_window_bits=\"15\", permessage-deflate"),
            Some(RESPONSE_WINDOW)
        );
        assert_eq!(
            h("permessage-deflate; server_max_window_bits=12, permessage-deflate"),
            Some(RESPONSE)
        );
        assert_eq!(
            negotiate([
                &b"permessage-deflate"[..],
                b"permessage-deflate; server_max_window_bits=15"
            ]),
            Some(RESPONSE)
        );
    }

    #[test]
    fn quoted_values_and_escapes_are_read() {
        let o = parse_extensions(r#"a; b="1\5"; c , d"#).expect("valid");
        assert_eq!(
            o,
            [
                Offer {
                    name: "a".into(),
                    params: vec![("b".into(), Some("15".into())), ("c".into(), None)],
                },
                Offer {
                    name: "d".into(),
                    params: vec![],
                },
            ]
        );
    }

    /// What a client does with a message: put the tail back and inflate,
    /// with a fresh inflater (flate2's, independent of ours).
    fn reference_inflate(payload: &[u8]) -> Vec<u8> {
        let mut all = payload.to_vec();
        all.extend_from_slice(&TAIL);
        let mut out = Vec::new();
        let mut r = flate2::read::DeflateDecoder::new(&all[..]);
        // The stream has no final block, so the reader ends on its input.
        let _ = std::io::Read::read_to_end(&mut r, &mut out);
        out
    }

    fn json(n: usize) -> Vec<u8> {
        let mut s = String::from("\"snapshot\":[");
        for i in 0..n {
            s += &format!(
                "{{\"deviceId\":\"3560{i:011}\",\"ts\":\"2026-05-01T10:{:02}:00.000Z\",\"lat\":48.{i:04},\"lon\":2.{i:04},\"speed\":{i}}},",
                i % 60
            );
        }
        s += "]}";
        s.into_bytes()
    }

    #[test]
    fn a_stored_head_and_a_body_compressed_once_inflate_to_both() {
        let body = json(200);
        let packed = compress(&body, SNAPSHOT_LEVEL).expect("smaller");
        assert!(
            packed.len() * 5 < body.len(),
            "{} of {}",
            packed.len(),
            body.len()
        );
        for head in [
            &b"{\"type\":\"subscribed\",\"topic\":\"event:x\",\"id\":\"1\","[..],
            b"",
            b"{",
        ] {
            let mut wire = stored(head).to_vec();
            wire.extend_from_slice(&packed);
            let want = [head, &body[..]].concat();
            assert_eq!(reference_inflate(&wire), want);
            assert_eq!(inflate(&wire, 1 << 20).expect("valid"), want);
        }
        // A head longer than a stored block takes several.
        let long = vec![b'h'; 70_000];
        let wire = [&stored(&long)[..], &packed[..]].concat();
        assert_eq!(reference_inflate(&wire), [&long[..], &body[..]].concat());
    }

    #[test]
    fn messages_compress_independently_of_each_other() {
        let a = compress(&json(20), POSITION_LEVEL).expect("smaller");
        let b = compress(&json(20), POSITION_LEVEL).expect("smaller");
        assert_eq!(a, b, "nothing carried over from the previous message");
        assert_eq!(reference_inflate(&a), json(20));
        let parts = compress_parts(&[&json(3), &json(4)], SNAPSHOT_LEVEL).expect("smaller");
        assert_eq!(reference_inflate(&parts), [json(3), json(4)].concat());
    }

    #[test]
    fn a_shared_message_is_compressed_once_and_only_when_asked() {
        let msg = Bytes::from(json(3));
        let p = Packed::new(msg.clone());
        let mut made = 0;
        let m = p.for_connection(false, 0, |_, _| made += 1);
        assert!(!m.deflated && m.bytes == &msg);
        let m = p.for_connection(true, msg.len() + 1, |_, _| made += 1);
        assert!(!m.deflated, "under the threshold");
        assert_eq!(made, 0);
        let first = p.for_connection(true, 16, |_, _| made += 1).bytes.clone();
        let again = p.for_connection(true, 16, |_, _| made += 1);
        assert!(again.deflated);
        assert_eq!(again.bytes.as_ptr(), first.as_ptr(), "the same bytes");
        assert_eq!(made, 1);
        assert_eq!(reference_inflate(&first), json(3));
        // What does not shrink goes out plain, and is not tried again.
        let tiny = Packed::new(Bytes::from_static(b"{}"));
        assert!(!tiny.for_connection(true, 0, |_, _| made += 1).deflated);
        assert!(!tiny.for_connection(true, 0, |_, _| made += 1).deflated);
        assert_eq!(made, 1);
    }

    #[test]
    fn what_would_not_shrink_is_left_as_it_is() {
        assert_eq!(compress(b"", POSITION_LEVEL), None);
        assert_eq!(compress(b"{\"a\":1}", POSITION_LEVEL), None);
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        let bomb = compress(&vec![b' '; 10 << 20], 9).expect("smaller");
        assert!(bomb.len() < 16 * 1024, "{}", bomb.len());
        assert_eq!(inflate(&bomb, 16 * 1024), Err(InflateError::TooLarge));
        // Exactly at the limit is fine.
        let at = compress(&vec![b' '; 16 * 1024], 9).expect("smaller");
        assert_eq!(inflate(&at, 16 * 1024).map(|v| v.len()), Ok(16 * 1024));
        assert_eq!(inflate(&at, 16 * 1024 - 1), Err(InflateError::TooLarge));
    }

    #[test]
    fn invalid_data_is_refused_and_the_inflater_recovers() {
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff], 1024),
            Err(InflateError::Invalid)
        );
        let ok = compress(&json(5), POSITION_LEVEL).expect("smaller");
        assert_eq!(inflate(&ok, 1024).expect("valid"), json(5));
    }

    #[test]
    fn a_final_block_ends_the_message() {
        // A client may flush with BFINAL set (§7.2.3.3).
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), Compression::fast());
        std::io::Write::write_all(&mut e, b"hello hello hello").expect("memory");
        let wire = e.finish().expect("memory");
        assert_eq!(inflate(&wire, 1024).expect("valid"), b"hello hello hello");
    }
}

/// Property tests: whatever the head and body, the client reads exactly
/// their concatenation.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn prop_stored_head_and_compressed_body_inflate_to_their_concatenation(
            head in prop::collection::vec(any::<u8>(), 0..300),
            body in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..2000),
                "[a-c{}\":,0-9]{0,3000}".prop_map(String::into_bytes),
            ],
            level in 1u32..=9,
        ) {
            let want = [&head[..], &body[..]].concat();
            let wire = match compress(&body, level) {
                Some(packed) => [&stored(&head)[..], &packed[..]].concat(),
                // Incompressible: both stored, and the empty stored block
                // whose LEN and NLEN the client puts back.
                None => [&stored(&head)[..], &stored(&body)[..], &[0x00][..]].concat(),
            };
            prop_assert_eq!(inflate(&wire, 1 << 20).expect("valid"), want);
        }
    }
}

/// Sizes and times behind `LIVE_WS_DEFLATE_MIN_BYTES` and the levels
/// (docs/benchmarks.md, "permessage-deflate"); run with
/// `cargo test --release -p livecast --lib deflate::measure -- --ignored --nocapture`.
#[cfg(test)]
mod measure {
    use std::time::Instant;

    use super::*;

    /// Position bodies of `n` devices spread over an area, as the record
    /// path writes them.
    fn bodies(n: u64) -> Vec<Bytes> {
        (0..n)
            .map(|d| {
                let p = format!(
                    r#"{{"device_id":"35{:013}","timestamp":"2026-05-01T10:{:02}:{:02}.{:03}Z","latitude":{},"longitude":{},"altitude":112,"angle":{},"speed":{},"satellites":11,"priority":0,"attributes":{{"239":1,"240":1,"21":4,"66":{},"24":63,"16":{}}}}}"#,
                    d * 7919,
                    d % 60,
                    (d * 7) % 60,
                    (d * 389) % 1000,
                    41.3 + ((d * 7907) % 1000) as f64 * 1.7e-4,
                    19.8 + ((d * 6011) % 1000) as f64 * 2.3e-4,
                    (d * 37) % 360,
                    d % 120,
                    12000 + d * 3,
                    1_000_000 + d * 101
                );
                crate::record::Position::decode(p.as_bytes())
                    .expect("valid")
                    .body()
            })
            .collect()
    }

    fn time<T>(runs: u32, mut f: impl FnMut() -> T) -> (T, f64) {
        let start = Instant::now();
        let mut last = f();
        for _ in 1..runs {
            last = f();
        }
        (last, start.elapsed().as_secs_f64() * 1e6 / f64::from(runs))
    }

    #[test]
    #[ignore = "a measurement, not a check; run in release"]
    fn sizes_and_times() {
        let all = bodies(500);
        let prefix = crate::protocol::position_prefix(uuid::Uuid::from_u128(7));
        let positions: Vec<Bytes> = all
            .iter()
            .map(|b| crate::protocol::position(&prefix, b))
            .collect();
        let plain: usize = positions.iter().map(Bytes::len).sum();
        // Each level twice: the first round also warms the caches.
        for level in [1, 3, 6, 9, 1, 3, 6, 9] {
            let mut i = 0;
            let (_, us) = time(5_000, || {
                i = (i + 1) % positions.len();
                compress(&positions[i], level)
            });
            let packed: usize = positions
                .iter()
                .map(|p| compress(p, level).map_or(p.len(), |c| c.len()))
                .sum();
            println!(
                "level {level}: a position {} -> {} bytes on average, {us:.1} us",
                plain / positions.len(),
                packed / positions.len()
            );
        }
        let body = crate::protocol::snapshot_body(all.iter().map(|b| &b[..]));
        for level in [1, 3, 6, 9] {
            let (packed, us) = time(20, || compress(&body, level).expect("smaller"));
            println!(
                "level {level}: a 500-device snapshot body {} -> {} bytes ({:.1}x), {:.2} ms",
                body.len(),
                packed.len(),
                body.len() as f64 / packed.len() as f64,
                us / 1000.0
            );
        }
        let one = &positions[1];
        for len in [64, 96, 128, 160, 192, one.len()] {
            let head = &one[..len.min(one.len())];
            let out = compress(head, POSITION_LEVEL).map_or(head.len(), |c| c.len());
            println!("the first {} bytes of a position -> {out}", head.len());
        }
        let mut wire = stored(b"{\"type\":\"subscribed\",\"topic\":\"event:x\",").to_vec();
        wire.extend_from_slice(&compress(&body, SNAPSHOT_LEVEL).expect("smaller"));
        let (_, us) = time(200, || inflate(&wire, 1 << 20).expect("valid"));
        println!("inflating that snapshot: {us:.0} us");
    }
}
