//! The server side of the WebSocket protocol (RFC 6455), after the upgrade,
//! on the raw TCP stream.
//!
//! Why not tungstenite here: it copies every outgoing frame into a
//! per-connection buffer that keeps its largest size for good (a snapshot
//! left that much behind on every idle connection: docs/benchmarks.md,
//! "Memory per idle connection"), and it allocates its read buffer up front. This module writes frames straight from the
//! shared `Bytes` of the record path with one vectored write per batch (no
//! copy), and holds no buffer at all while a connection is idle. It does
//! only what a live-position server needs: no subprotocols, text in
//! (≤ 16 KiB per message, inflated or not), text out, and one extension,
//! permessage-deflate, without context takeover either way (see
//! [`crate::deflate`]): compressed frames carry bytes compressed once for
//! every subscriber, and compressed client messages inflate without any
//! per-connection state.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;

use crate::deflate::{self, InflateError};

/// Opcodes.
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// RSV1: the message is compressed (RFC 7692 §6).
const RSV1: u8 = 0b100;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 2048;

/// A message from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    Binary,
    Ping(Bytes),
    Pong,
    /// The client closes, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why reading stopped.
#[derive(Debug)]
pub enum ReadError {
    /// A message over the limit: close with 1009.
    TooLarge,
    /// A protocol violation: close with 1002.
    Protocol(&'static str),
    /// A text message that is not UTF-8: close with 1007.
    InvalidUtf8,
    /// The connection is gone.
    Io(io::Error),
    Eof,
}

/// The reading side of one WebSocket connection. Writing goes through the
/// connection's outbox (see `outbox`), which shares the socket.
pub struct WebSocket {
    stream: Arc<TcpStream>,
    decoder: Decoder,
}

/// A server frame: its header and the shared payload. Queued frames are
/// written with [`slices`] and [`consume`], which resume a write cut short
/// exactly where it stopped, so a close frame never lands inside another.
pub struct OutFrame {
    header: [u8; 10],
    header_len: u8,
    /// The payload, in up to two shared pieces written back to back: a
    /// message made of a per-client head and a body shared by many clients
    /// (a `subscribed` reply: its `id`, then the event's snapshot) goes out
    /// without being copied together.
    payload: [Bytes; 2],
    /// Counts against the connection's control backlog until written.
    control: bool,
}

impl OutFrame {
    /// A text frame of shared bytes.
    pub fn text(payload: Bytes) -> Self {
        Self::new(TEXT, [payload, Bytes::new()])
    }

    /// A text frame whose payload is `head` followed by `tail`.
    pub fn text_parts(head: Bytes, tail: Bytes) -> Self {
        Self::new(TEXT, [head, tail])
    }

    /// A compressed text message (RSV1 set) of shared bytes, from
    /// [`deflate::compress`].
    pub fn deflated(payload: Bytes) -> Self {
        Self::deflated_parts(payload, Bytes::new())
    }

    /// A compressed text message made of two pieces: a head as stored
    /// blocks ([`deflate::stored`]) and a body compressed once.
    pub fn deflated_parts(head: Bytes, tail: Bytes) -> Self {
        let mut f = Self::new(TEXT, [head, tail]);
        f.header[0] |= RSV1 << 4;
        f
    }

    pub fn ping() -> Self {
        Self::new(PING, [Bytes::new(), Bytes::new()])
    }

    /// The answer to a ping, echoing its payload (at most 125 bytes).
    pub fn pong(payload: Bytes) -> Self {
        Self::new(
            PONG,
            [payload.slice(..payload.len().min(125)), Bytes::new()],
        )
    }

    /// A close frame with a status code and a short reason.
    pub fn close(code: u16, reason: &str) -> Self {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
        Self::new(CLOSE, [Bytes::from(payload), Bytes::new()])
    }

    /// Marks the frame as a control message (a reply, ping, pong, close):
    /// its bytes count against the backlog limit until they are written.
    pub fn into_control(mut self) -> Self {
        self.control = true;
        self
    }

    /// Payload bytes that count against the control backlog.
    pub fn control_len(&self) -> usize {
        if self.control { self.payload_len() } else { 0 }
    }

    fn payload_len(&self) -> usize {
        self.payload[0].len() + self.payload[1].len()
    }

    fn new(opcode: u8, payload: [Bytes; 2]) -> Self {
        let mut header = [0u8; 10];
        let len = payload[0].len() + payload[1].len();
        header[0] = 0x80 | opcode;
        let header_len = match len {
            0..=125 => {
                header[1] = len as u8;
                2
            }
            126..=65535 => {
                header[1] = 126;
                header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            _ => {
                header[1] = 127;
                header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
                10
            }
        };
        Self {
            header,
            header_len,
            payload,
            control: false,
        }
    }

    fn len(&self) -> usize {
        usize::from(self.header_len) + self.payload_len()
    }
}

/// Client frames to messages: the reading half, independent of the socket.
#[derive(Default)]
struct Decoder {
    /// Bytes of an incomplete frame; empty (and unallocated) when idle.
    pending: Vec<u8>,
    /// The payload of a fragmented message being received.
    message: Vec<u8>,
    fragmented: Option<u8>,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
    /// The fragmented message being received is compressed.
    compressed: bool,
    max_message: usize,
    /// Bytes still to drop of a frame that was refused, or skipped while
    /// closing: they are read off the socket (closing a socket with unread
    /// input resets it, and the reset can overtake our close frame) but
    /// never held.
    skip: u64,
    /// The frame being skipped is a close frame: once it is read, the
    /// client has closed, however malformed its close was.
    close_after_skip: bool,
    /// Our close frame is out: only the client's close matters now, and
    /// every other frame is skipped unchecked.
    closing: bool,
    /// The client's close frame has been read; nothing after it is parsed.
    peer_closed: bool,
}
impl WebSocket {
    /// Wraps an upgraded stream; `already_read` is what the HTTP layer read
    /// past the upgrade request; `deflate`: permessage-deflate was
    /// negotiated.
    pub fn new(
        stream: Arc<TcpStream>,
        already_read: &[u8],
        max_message: usize,
        deflate: bool,
    ) -> Self {
        Self {
            stream,
            decoder: Decoder {
                pending: already_read.to_vec(),
                max_message,
                deflate,
                ..Decoder::default()
            },
        }
    }

    /// Our close frame is queued: from now on [`WebSocket::read`] looks only
    /// for the client's close, skipping (never holding) everything else,
    /// the rest of a refused frame included.
    pub fn closing(&mut self) {
        self.decoder.start_closing();
    }

    /// Whether the client's close frame has been read, so that the closing
    /// handshake is complete once ours is written.
    pub fn peer_closed(&self) -> bool {
        self.decoder.peer_closed
    }

    /// The socket, shared with the connection's outbox.
    pub fn socket(&self) -> Arc<TcpStream> {
        self.stream.clone()
    }

    /// Waits for the next messages and appends them to `out`. Cancel-safe:
    /// nothing read is lost if the future is dropped.
    pub async fn read(&mut self, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        loop {
            self.decoder.parse(out)?;
            if !out.is_empty() {
                return Ok(());
            }
            self.stream.readable().await.map_err(ReadError::Io)?;
            let mut chunk = [0u8; READ_CHUNK];
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Err(ReadError::Eof),
                Ok(n) => self.decoder.pending.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

/// Fills `out` with the unwritten parts of the queued frames (the first
/// `written` bytes of the first frame are already out); returns how many
/// slices it used.
pub fn slices<'a>(
    frames: &'a VecDeque<OutFrame>,
    written: usize,
    out: &mut [IoSlice<'a>],
) -> usize {
    let mut used = 0;
    let mut skip = written;
    for f in frames {
        let header = &f.header[..usize::from(f.header_len)];
        for part in [header, &f.payload[0][..], &f.payload[1][..]] {
            let s = skip.min(part.len());
            skip -= s;
            if s < part.len() {
                if used == out.len() {
                    return used;
                }
                out[used] = IoSlice::new(&part[s..]);
                used += 1;
            }
        }
    }
    used
}

/// Records that `n` more bytes of the queue went out; returns the control
/// payload bytes of the frames it completed.
pub fn consume(out: &mut VecDeque<OutFrame>, written: &mut usize, mut n: usize) -> usize {
    let mut control = 0;
    while let Some(f) = out.front() {
        let left = f.len() - *written;
        if n < left {
            *written += n;
            break;
        }
        n -= left;
        *written = 0;
        control += f.control_len();
        out.pop_front();
    }
    control
}

impl Decoder {
    fn start_closing(&mut self) {
        self.closing = true;
        self.message = Vec::new();
        self.fragmented = None;
    }

    /// Parses every complete frame in `pending`. After an error, the rest of
    /// the refused frame is still to skip (see [`Decoder::skip`]).
    fn parse(&mut self, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        let result = if self.closing {
            self.parse_closing(out);
            Ok(())
        } else {
            self.parse_frames(out)
        };
        if self.pending.is_empty() && self.pending.capacity() > READ_CHUNK {
            self.pending = Vec::new();
        }
        result
    }

    fn parse_frames(&mut self, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        let mut at = 0;
        let result = loop {
            if self.peer_closed {
                // Nothing may follow a close frame.
                at = self.pending.len();
                break Ok(());
            }
            match parse_frame(&self.pending[at..], self.max_message, self.deflate) {
                Ok(None) => break Ok(()),
                Ok(Some((frame, used))) => {
                    at += used;
                    if let Err(e) = self.handle(frame, out) {
                        break Err(e);
                    }
                }
                Err((e, refused)) => {
                    self.skip = refused.frame_len();
                    self.close_after_skip = refused.opcode == CLOSE;
                    break Err(e);
                }
            }
        };
        self.pending.drain(..at);
        result
    }

    /// Skips frames until the client's close. Holds at most one frame
    /// header: payloads are dropped as they arrive.
    fn parse_closing(&mut self, out: &mut Vec<Incoming>) {
        loop {
            let n = self
                .pending
                .len()
                .min(usize::try_from(self.skip).unwrap_or(usize::MAX));
            self.pending.drain(..n);
            self.skip -= n as u64;
            if self.skip > 0 {
                return;
            }
            if std::mem::take(&mut self.close_after_skip) {
                self.peer_closed = true;
            }
            if self.peer_closed {
                self.pending.clear();
                if !out.iter().any(|m| matches!(m, Incoming::Close(_))) {
                    out.push(Incoming::Close(None));
                }
                return;
            }
            // Unchecked: a client that broke the protocol may send anything,
            // and its close is all that is left to find.
            let Some(h) = parse_header(&self.pending) else {
                return;
            };
            self.skip = h.frame_len();
            self.close_after_skip = h.opcode == CLOSE;
        }
    }

    fn handle(&mut self, f: Frame, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        match f.opcode {
            PING => out.push(Incoming::Ping(Bytes::from(f.payload))),
            PONG => out.push(Incoming::Pong),
            CLOSE => {
                // Whatever it holds, the client has closed: a refusal below
                // completes the closing handshake.
                self.peer_closed = true;
                out.push(Incoming::Close(close_code(&f.payload)?));
            }
            TEXT | BINARY if self.fragmented.is_some() => {
                return Err(ReadError::Protocol("a new message inside a fragmented one"));
            }
            TEXT | BINARY if f.fin => out.push(message(
                f.opcode,
                f.payload,
                f.compressed,
                self.max_message,
            )?),
            TEXT | BINARY => {
                self.fragmented = Some(f.opcode);
                self.compressed = f.compressed;
                self.message = f.payload;
            }
            CONTINUATION => {
                let Some(opcode) = self.fragmented else {
                    return Err(ReadError::Protocol("a continuation without a message"));
                };
                if self.message.len() + f.payload.len() > self.max_message {
                    return Err(ReadError::TooLarge);
                }
                self.message.extend_from_slice(&f.payload);
                if f.fin {
                    self.fragmented = None;
                    let payload = std::mem::take(&mut self.message);
                    out.push(message(opcode, payload, self.compressed, self.max_message)?);
                }
            }
            // parse_frame refuses every other opcode.
            _ => return Err(ReadError::Protocol("reserved opcode")),
        }
        Ok(())
    }
}

/// The status code of a client's close frame (RFC 6455 §5.5.1, §7.4): none,
/// or one that may be sent, followed by a UTF-8 reason.
fn close_code(payload: &[u8]) -> Result<Option<u16>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("a close frame with half a status code")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_valid(code) {
                return Err(ReadError::Protocol("a close code that may not be sent"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// Close codes that may appear on the wire (RFC 6455 §7.4 and the IANA
/// registry): 1004 is reserved; 1005, 1006 and 1015 only report a close
/// that carried no code, an abnormal closure and a TLS failure; 1016–2999
/// are unassigned; 3000–4999 belong to libraries and applications.
fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A whole data message; a compressed one is inflated first, up to the
/// same limit as an uncompressed one.
fn message(
    opcode: u8,
    payload: Vec<u8>,
    compressed: bool,
    max: usize,
) -> Result<Incoming, ReadError> {
    if opcode == BINARY {
        return Ok(Incoming::Binary);
    }
    let payload = if compressed {
        deflate::inflate(&payload, max).map_err(|e| match e {
            InflateError::TooLarge => ReadError::TooLarge,
            InflateError::Invalid => ReadError::Protocol("invalid compressed data"),
        })?
    } else {
        payload
    };
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| ReadError::InvalidUtf8)
}

struct Frame {
    fin: bool,
    /// RSV1: the first frame of a compressed message.
    compressed: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// A frame header as sent, before any check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    /// RSV1–RSV3, in the low bits.
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Payload length as announced (up to 2^64 - 1).
    len: u64,
    /// Bytes of the header itself.
    size: usize,
}

impl Header {
    /// Bytes of the whole frame, header included.
    fn frame_len(&self) -> u64 {
        self.len.saturating_add(self.size as u64)
    }
}

/// The header at the start of `buf`; `None` until all of it is there.
fn parse_header(buf: &[u8]) -> Option<Header> {
    let [b0, b1, ..] = *buf else { return None };
    let (len, mut size) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => {
            let b: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let key: [u8; 4] = buf.get(size..size + 4)?.try_into().ok()?;
        size += 4;
        Some(key)
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x7,
        opcode: b0 & 0x0F,
        mask,
        len,
        size,
    })
}

/// One complete client frame at the start of `buf`, unmasked, and the bytes
/// it used; `None` when more bytes are needed. A frame is refused as soon as
/// its header is in, with the header, so that the rest of it can be skipped
/// without being held. With `deflate` negotiated, RSV1 may mark the first
/// frame of a data message (RFC 7692 §6.1), and only that.
fn parse_frame(
    buf: &[u8],
    max: usize,
    deflate: bool,
) -> Result<Option<(Frame, usize)>, (ReadError, Header)> {
    let Some(h) = parse_header(buf) else {
        return Ok(None);
    };
    let refuse = |e| Err((e, h));
    let compressed = match h.rsv {
        0 => false,
        RSV1 if deflate && matches!(h.opcode, TEXT | BINARY) => true,
        RSV1 if deflate => {
            return refuse(ReadError::Protocol(
                "RSV1 on a control or continuation frame",
            ));
        }
        _ => return refuse(ReadError::Protocol("reserved bits set")),
    };
    let Some(key) = h.mask else {
        return refuse(ReadError::Protocol("client frames must be masked"));
    };
    if !matches!(h.opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return refuse(ReadError::Protocol("reserved opcode"));
    }
    let control = h.opcode & 0x8 != 0;
    if control && (!h.fin || h.len > 125) {
        return refuse(ReadError::Protocol("control frames are short and whole"));
    }
    if h.len > max as u64 {
        return refuse(ReadError::TooLarge);
    }
    // At most `max`, so it fits.
    let len = h.len as usize;
    let Some(data) = buf.get(h.size..h.size + len) else {
        return Ok(None);
    };
    let payload: Vec<u8> = data
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i & 3])
        .collect();
    Ok(Some((
        Frame {
            fin: h.fin,
            compressed,
            opcode: h.opcode,
            payload,
        },
        h.size + len,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(0x80 | n as u8),
            n @ 126..=65535 => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    fn parse_all(bytes: &[u8]) -> Result<Vec<Incoming>, ReadError> {
        let mut d = decoder(bytes);
        let mut out = Vec::new();
        d.parse(&mut out)?;
        Ok(out)
    }

    #[test]
    fn reads_text_fragments_and_control_frames() {
        let mut bytes = client_frame(true, TEXT, b"{\"a\":1}");
        bytes.extend(client_frame(false, TEXT, b"hel"));
        bytes.extend(client_frame(true, PING, b"p"));
        bytes.extend(client_frame(true, CONTINUATION, b"lo"));
        bytes.extend(client_frame(true, CLOSE, &1000u16.to_be_bytes()));
        let got = parse_all(&bytes).expect("valid");
        assert_eq!(
            got,
            [
                Incoming::Text("{\"a\":1}".into()),
                Incoming::Ping(Bytes::from_static(b"p")),
                Incoming::Text("hello".into()),
                Incoming::Close(Some(1000)),
            ]
        );
    }

    #[test]
    fn waits_for_a_whole_frame() {
        let f = client_frame(true, TEXT, &[b'x'; 300]);
        for cut in [1, 2, 5, 7, 299] {
            assert!(
                parse_all(&f[..cut]).expect("partial").is_empty(),
                "cut at {cut}"
            );
        }
        assert_eq!(parse_all(&f).expect("whole").len(), 1);
    }

    #[test]
    fn refuses_what_the_protocol_forbids() {
        let unmasked = [0x81, 0x01, b'x'];
        assert!(matches!(parse_all(&unmasked), Err(ReadError::Protocol(_))));
        let rsv = {
            let mut f = client_frame(true, TEXT, b"x");
            f[0] |= 0x40;
            f
        };
        assert!(matches!(parse_all(&rsv), Err(ReadError::Protocol(_))));
        let big = client_frame(true, TEXT, &vec![b'x'; 16 * 1024 + 1]);
        assert!(matches!(parse_all(&big), Err(ReadError::TooLarge)));
        let mut split = client_frame(false, TEXT, &vec![b'x'; 10_000]);
        split.extend(client_frame(true, CONTINUATION, &vec![b'x'; 10_000]));
        assert!(matches!(parse_all(&split), Err(ReadError::TooLarge)));
        assert!(matches!(
            parse_all(&client_frame(true, TEXT, &[0xff, 0xfe])),
            Err(ReadError::InvalidUtf8)
        ));
        assert!(matches!(
            parse_all(&client_frame(true, CONTINUATION, b"x")),
            Err(ReadError::Protocol(_))
        ));
        assert!(matches!(
            parse_all(&client_frame(false, PING, b"x")),
            Err(ReadError::Protocol(_))
        ));
        for opcode in (0x3..=0x7).chain(0xB..=0xF) {
            assert!(matches!(
                parse_all(&client_frame(true, opcode, b"x")),
                Err(ReadError::Protocol(_))
            ));
        }
        assert!(matches!(
            parse_all(&client_frame(true, PING, &[b'p'; 126])),
            Err(ReadError::Protocol(_))
        ));
        assert_eq!(
            parse_all(&client_frame(true, BINARY, b"x")).expect("binary"),
            [Incoming::Binary]
        );
    }

    fn decoder(bytes: &[u8]) -> Decoder {
        Decoder {
            pending: bytes.to_vec(),
            max_message: 16 * 1024,
            ..Decoder::default()
        }
    }

    fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason);
        client_frame(true, CLOSE, &p)
    }

    #[test]
    fn close_codes_that_may_not_be_sent_are_refused() {
        for code in [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4999] {
            assert_eq!(
                parse_all(&close_frame(code, "κόσμε".as_bytes())).expect("valid"),
                [Incoming::Close(Some(code))]
            );
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000] {
            let mut d = decoder(&close_frame(code, b""));
            let got = d.parse(&mut Vec::new());
            assert!(matches!(got, Err(ReadError::Protocol(_))), "{code}");
            assert!(d.peer_closed, "{code}: the client has closed all the same");
        }
        let mut d = decoder(&close_frame(1000, &[b'o', 0xff]));
        assert!(matches!(
            d.parse(&mut Vec::new()),
            Err(ReadError::InvalidUtf8)
        ));
        assert!(d.peer_closed);
        assert!(matches!(
            parse_all(&client_frame(true, CLOSE, &[3])),
            Err(ReadError::Protocol(_))
        ));
    }

    #[test]
    fn nothing_after_a_close_is_parsed() {
        let mut bytes = close_frame(1000, b"");
        bytes.extend(client_frame(true, TEXT, &[0xff]));
        bytes.extend([0x81, 0x01, b'x']);
        assert_eq!(
            parse_all(&bytes).expect("the close ends parsing"),
            [Incoming::Close(Some(1000))]
        );
    }

    /// Feeds `bytes` to a decoder in chunks of `chunk`, as the socket would,
    /// switching to closing mode at the first error as the connection does;
    /// the messages, the error, and the most bytes held while closing.
    fn feed(bytes: &[u8], chunk: usize) -> (Vec<Incoming>, Option<String>, usize) {
        let mut d = decoder(b"");
        let (mut out, mut error, mut held) = (Vec::new(), None, 0);
        for c in bytes.chunks(chunk) {
            d.pending.extend_from_slice(c);
            if let Err(e) = d.parse(&mut out) {
                error = Some(format!("{e:?}"));
                d.start_closing();
                d.parse(&mut out).expect("closing never fails");
            }
            if d.closing {
                held = held.max(d.pending.len());
            }
        }
        (out, error, held)
    }

    #[test]
    fn a_refused_frame_is_skipped_to_the_clients_close() {
        // A reserved opcode, a frame over the limit, and an unmasked one,
        // each followed by frames the host must not read as such and then
        // the client's close.
        let refused = [
            client_frame(true, 0x3, &[b'x'; 3000]),
            client_frame(true, TEXT, &[b'x'; 20_000]),
            [&[0x81, 126, 0x0b, 0xb8][..], &[0x88; 3000]].concat(),
        ];
        for frame in refused {
            let mut bytes = frame.clone();
            bytes.extend(client_frame(true, TEXT, b"ignored"));
            bytes.extend(client_frame(true, PING, b"ignored"));
            bytes.extend(close_frame(1000, b""));
            for chunk in [1, 7, 2048, bytes.len()] {
                let (out, error, held) = feed(&bytes, chunk);
                assert!(error.is_some(), "chunk {chunk}");
                assert_eq!(out, [Incoming::Close(None)], "chunk {chunk}");
                assert!(held < 14, "only a header is ever held: {held}");
            }
        }
    }

    #[test]
    fn a_refused_close_frame_is_the_clients_close() {
        let broken = [
            vec![0x88, 0x02, 0x03, 0xe8],              // unmasked
            client_frame(true, CLOSE, &[b'r'; 126]),   // too long
            client_frame(false, CLOSE, &[0x03, 0xe8]), // fragmented
            [0xc8]
                .into_iter()
                .chain(client_frame(true, CLOSE, b"")[1..].iter().copied())
                .collect(),
        ];
        for frame in broken {
            let mut d = decoder(&frame);
            assert!(matches!(
                d.parse(&mut Vec::new()),
                Err(ReadError::Protocol(_))
            ));
            d.start_closing();
            let mut out = Vec::new();
            d.parse(&mut out).expect("closing");
            assert_eq!(out, [Incoming::Close(None)], "{frame:?}");
        }
    }

    #[test]
    fn a_cut_short_write_resumes_where_it_stopped() {
        let f = |n: usize| OutFrame::text(Bytes::from(vec![b'x'; n]));
        let mut out: VecDeque<OutFrame> = [f(5), f(300), f(1)].into();
        let mut written = 0;
        let mut consume = |n: usize| {
            consume(&mut out, &mut written, n);
            (out.len(), written)
        };
        // (control accounting is covered by the outbox's tests)
        assert_eq!(consume(3), (3, 3), "inside the first frame");
        assert_eq!(consume(4), (2, 0), "exactly to its end");
        assert_eq!(consume(303), (2, 303), "one byte of the second frame left");
        assert_eq!(consume(1), (1, 0));
        assert_eq!(consume(3), (0, 0));
    }

    #[test]
    fn a_two_part_frame_is_written_as_one_and_resumes_inside_either_part() {
        let frame = OutFrame::text_parts(Bytes::from_static(b"head,"), Bytes::from_static(b"tail"));
        let mut out: VecDeque<OutFrame> = [frame].into();
        let whole = |out: &VecDeque<OutFrame>, written: usize| {
            let mut parts = [IoSlice::new(&[]); 4];
            let n = slices(out, written, &mut parts);
            parts[..n]
                .iter()
                .flat_map(|s| s.iter().copied())
                .collect::<Vec<u8>>()
        };
        assert_eq!(whole(&out, 0), b"\x81\x09head,tail");
        let mut written = 0;
        consume(&mut out, &mut written, 4);
        assert_eq!(whole(&out, written), b"ad,tail");
        consume(&mut out, &mut written, 4);
        assert_eq!(whole(&out, written), b"ail");
        consume(&mut out, &mut written, 3);
        assert!(out.is_empty());
    }

    /// A client frame with RSV1 set.
    fn rsv1_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = client_frame(fin, opcode, payload);
        f[0] |= 0x40;
        f
    }

    fn parse_deflate(bytes: &[u8]) -> Result<Vec<Incoming>, ReadError> {
        let mut d = Decoder {
            deflate: true,
            ..decoder(bytes)
        };
        let mut out = Vec::new();
        d.parse(&mut out)?;
        Ok(out)
    }

    #[test]
    fn rsv1_marks_a_compressed_message_where_negotiated() {
        let text = "{\"type\":\"subscribe\"} ".repeat(40);
        let packed = deflate::compress(text.as_bytes(), 6).expect("smaller");
        let want = [Incoming::Text(text.clone())];
        // Whole, and fragmented with RSV1 on the first frame only.
        assert_eq!(
            parse_deflate(&rsv1_frame(true, TEXT, &packed)).expect("valid"),
            want
        );
        let (a, b) = packed.split_at(packed.len() / 2);
        let mut split = rsv1_frame(false, TEXT, a);
        split.extend(client_frame(true, PING, b"p"));
        split.extend(client_frame(true, CONTINUATION, b));
        assert_eq!(
            parse_deflate(&split).expect("valid"),
            [Incoming::Ping(Bytes::from_static(b"p")), want[0].clone()]
        );
        // Uncompressed messages stay allowed.
        assert_eq!(
            parse_deflate(&client_frame(true, TEXT, b"plain")).expect("valid"),
            [Incoming::Text("plain".into())]
        );
        // Not negotiated: RSV1 is a reserved bit like the others.
        assert!(matches!(
            parse_all(&rsv1_frame(true, TEXT, &packed)),
            Err(ReadError::Protocol(_))
        ));
        // On a continuation, a control frame, or RSV2/RSV3: refused.
        let mut on_continuation = client_frame(false, TEXT, b"a");
        on_continuation.extend(rsv1_frame(true, CONTINUATION, b"b"));
        let mut rsv2 = client_frame(true, TEXT, b"x");
        rsv2[0] |= 0x20;
        let mut rsv3 = rsv1_frame(true, TEXT, &packed);
        rsv3[0] |= 0x10;
        for (case, bytes) in [
            ("continuation", on_continuation),
            ("ping", rsv1_frame(true, PING, b"")),
            ("close", rsv1_frame(true, CLOSE, &[0x03, 0xe8])),
            ("rsv2", rsv2),
            ("rsv1+rsv3", rsv3),
        ] {
            assert!(
                matches!(parse_deflate(&bytes), Err(ReadError::Protocol(_))),
                "{case}"
            );
        }
        // Compressed data that is not DEFLATE, or not UTF-8 once inflated.
        assert!(matches!(
            parse_deflate(&rsv1_frame(true, TEXT, &[0xff, 0xff])),
            Err(ReadError::Protocol(_))
        ));
        let not_utf8 = deflate::compress(&[0xff; 200], 6).expect("smaller");
        assert!(matches!(
            parse_deflate(&rsv1_frame(true, TEXT, &not_utf8)),
            Err(ReadError::InvalidUtf8)
        ));
    }

    #[test]
    fn a_decompression_bomb_is_too_large() {
        let bomb = deflate::compress(&vec![b' '; 1 << 20], 9).expect("smaller");
        assert!(bomb.len() < 16 * 1024);
        assert!(matches!(
            parse_deflate(&rsv1_frame(true, TEXT, &bomb)),
            Err(ReadError::TooLarge)
        ));
        // The compressed frame itself is limited too.
        let big = rsv1_frame(true, TEXT, &vec![0; 16 * 1024 + 1]);
        assert!(matches!(parse_deflate(&big), Err(ReadError::TooLarge)));
    }

    #[test]
    fn a_deflated_frame_sets_rsv1() {
        let f = OutFrame::deflated_parts(Bytes::from_static(b"ab"), Bytes::from_static(b"c"));
        assert_eq!(f.header[..2], [0xc1, 3]);
        assert_eq!(OutFrame::deflated(Bytes::from_static(b"a")).header[0], 0xc1);
        assert_eq!(OutFrame::text(Bytes::from_static(b"a")).header[0], 0x81);
    }

    #[test]
    fn server_headers() {
        let f = |n: usize| OutFrame::text(Bytes::from(vec![b'x'; n]));
        let (a, b, c) = (f(5), f(300), f(70_000));
        assert_eq!(a.header[..2], [0x81, 5]);
        assert_eq!(b.header[..4], [0x81, 126, 1, 44]);
        assert_eq!(c.header[..2], [0x81, 127]);
        assert_eq!(
            u64::from_be_bytes(c.header[2..10].try_into().unwrap()),
            70_000
        );
        assert_eq!((a.len(), b.len(), c.len()), (7, 304, 70_010));
    }
}

/// Property tests of the decoder (run more cases with `PROPTEST_CASES`, see
/// docs/operations.md). The reference encoder and header parser are
/// tungstenite's, an implementation independent of this one.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame as Reference, FrameHeader};

    /// A small limit, so that generated messages pass it too.
    const MAX: usize = 512;

    /// What a client sends, before framing.
    #[derive(Debug, Clone)]
    enum Msg {
        /// A data message cut into fragments at the given byte offsets (inside
        /// characters too), with a control frame after some of them.
        Data {
            text: bool,
            payload: Vec<u8>,
            cuts: Vec<usize>,
            between: Vec<Option<Msg>>,
        },
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn control() -> impl Strategy<Value = Msg> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Ping),
            prop::collection::vec(any::<u8>(), 0..=125).prop_map(Msg::Pong),
        ]
    }

    fn data() -> impl Strategy<Value = Msg> {
        let text = "\\PC{0,120}"
            .prop_map(String::into_bytes)
            .prop_map(|p| (true, p));
        let binary = prop::collection::vec(any::<u8>(), 0..MAX).prop_map(|p| (false, p));
        (
            prop_oneof![3 => text, 1 => binary],
            prop::collection::vec(any::<prop::sample::Index>(), 0..4),
            prop::collection::vec(prop::option::weighted(0.3, control()), 4),
        )
            .prop_map(|((text, payload), cuts, between)| {
                let mut cuts: Vec<usize> =
                    cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
                cuts.sort_unstable();
                Msg::Data {
                    text,
                    payload,
                    cuts,
                    between,
                }
            })
    }

    fn close() -> impl Strategy<Value = Msg> {
        let code = prop_oneof![1000..=1003u16, 1007..=1014u16, 3000..=4999u16];
        prop::option::of((code, "\\PC{0,30}"))
            .prop_filter("a reason fits in 123 bytes", |c| {
                c.as_ref().is_none_or(|(_, r)| r.len() <= 123)
            })
            .prop_map(Msg::Close)
    }

    /// A conversation: messages and control frames, maybe a close at the end.
    fn conversation() -> impl Strategy<Value = Vec<Msg>> {
        (
            prop::collection::vec(prop_oneof![3 => data(), 1 => control()], 0..8),
            prop::option::of(close()),
        )
            .prop_map(|(mut msgs, close)| {
                msgs.extend(close);
                msgs
            })
    }

    fn encode(fin: bool, opcode: OpCode, payload: &[u8], mask: [u8; 4], out: &mut Vec<u8>) {
        encode_rsv1(fin, false, opcode, payload, mask, out);
    }

    fn encode_rsv1(
        fin: bool,
        rsv1: bool,
        opcode: OpCode,
        payload: &[u8],
        mask: [u8; 4],
        out: &mut Vec<u8>,
    ) {
        let header = FrameHeader {
            is_final: fin,
            rsv1,
            rsv2: false,
            rsv3: false,
            opcode,
            mask: Some(mask),
        };
        Reference::from_payload(header, Bytes::copy_from_slice(payload))
            .format(out)
            .expect("writing to a Vec");
    }

    /// The bytes a client sends and the messages the decoder must give.
    fn frames(msgs: &[Msg], mask: [u8; 4]) -> (Vec<u8>, Vec<Incoming>) {
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for m in msgs {
            match m {
                Msg::Ping(p) => {
                    encode(true, OpCode::Control(Control::Ping), p, mask, &mut bytes);
                    want.push(Incoming::Ping(Bytes::copy_from_slice(p)));
                }
                Msg::Pong(p) => {
                    encode(true, OpCode::Control(Control::Pong), p, mask, &mut bytes);
                    want.push(Incoming::Pong);
                }
                Msg::Close(c) => {
                    let mut p = Vec::new();
                    if let Some((code, reason)) = c {
                        p.extend_from_slice(&code.to_be_bytes());
                        p.extend_from_slice(reason.as_bytes());
                    }
                    encode(true, OpCode::Control(Control::Close), &p, mask, &mut bytes);
                    want.push(Incoming::Close(c.as_ref().map(|(code, _)| *code)));
                }
                Msg::Data {
                    text,
                    payload,
                    cuts,
                    between,
                } => {
                    let mut bounds = vec![0];
                    bounds.extend(cuts);
                    bounds.push(payload.len());
                    let mut controls = Vec::new();
                    for (i, w) in bounds.windows(2).enumerate() {
                        let last = i + 2 == bounds.len();
                        let opcode = match (i, text) {
                            (0, true) => OpCode::Data(Data::Text),
                            (0, false) => OpCode::Data(Data::Binary),
                            _ => OpCode::Data(Data::Continue),
                        };
                        encode(last, opcode, &payload[w[0]..w[1]], mask, &mut bytes);
                        if let (false, Some(Some(c))) = (last, between.get(i)) {
                            let (b, w) = frames(std::slice::from_ref(c), mask);
                            bytes.extend(b);
                            controls.extend(w);
                        }
                    }
                    // Control frames between fragments arrive before the
                    // message they interrupt.
                    want.extend(controls);
                    want.push(if *text {
                        Incoming::Text(String::from_utf8(payload.clone()).expect("text"))
                    } else {
                        Incoming::Binary
                    });
                }
            }
        }
        (bytes, want)
    }

    /// Decodes `bytes` as the socket would deliver them, cut at `cuts`: the
    /// messages up to the first error, and that error.
    fn decode(bytes: &[u8], cuts: &[prop::sample::Index], max: usize) -> (Vec<Incoming>, String) {
        decode_with(bytes, cuts, max, false)
    }

    /// [`decode`], with permessage-deflate negotiated or not.
    fn decode_with(
        bytes: &[u8],
        cuts: &[prop::sample::Index],
        max: usize,
        deflate: bool,
    ) -> (Vec<Incoming>, String) {
        let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort_unstable();
        let mut d = Decoder {
            max_message: max,
            deflate,
            ..Decoder::default()
        };
        let mut out = Vec::new();
        let mut from = 0;
        for end in ends {
            d.pending.extend_from_slice(&bytes[from..end]);
            from = end;
            if let Err(e) = d.parse(&mut out) {
                return (out, format!("{e:?}"));
            }
        }
        (out, String::new())
    }

    fn cuts() -> impl Strategy<Value = Vec<prop::sample::Index>> {
        prop::collection::vec(any::<prop::sample::Index>(), 0..12)
    }

    /// Valid frames with up to a few bytes changed: the interesting errors.
    fn mangled() -> impl Strategy<Value = Vec<u8>> {
        (
            conversation(),
            any::<[u8; 4]>(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        )
            .prop_map(|(msgs, mask, changes)| {
                let (mut bytes, _) = frames(&msgs, mask);
                if !bytes.is_empty() {
                    for (at, x) in changes {
                        let i = at.index(bytes.len());
                        bytes[i] ^= x;
                    }
                }
                bytes
            })
    }

    fn any_input() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![prop::collection::vec(any::<u8>(), 0..2048), mangled(),]
    }

    proptest! {
        /// Text messages compressed by a client (flate2, level 1 to 9) or
        /// not, whole or fragmented (RSV1 on the first frame only), with a
        /// ping between fragments: decoded to their text however the bytes
        /// are cut; and the same bytes on a connection that did not
        /// negotiate the extension are a protocol error at the first RSV1.
        #[test]
        fn prop_compressed_messages_decode_to_their_text(
            texts in prop::collection::vec(
                prop_oneof!["\\PC{0,200}", "[a-d\"{},:0-9]{0,2000}"], 1..4),
            compress in prop::collection::vec(any::<bool>(), 4),
            level in 1u32..=9,
            frags in prop::collection::vec(any::<prop::sample::Index>(), 0..3),
            mask in any::<[u8; 4]>(),
            cuts in cuts(),
        ) {
            let mut bytes = Vec::new();
            let mut want = Vec::new();
            let mut any_rsv1 = false;
            for (t, c) in texts.iter().zip(&compress) {
                let packed = c.then(|| {
                    let mut e = flate2::Compress::new(flate2::Compression::new(level), false);
                    let mut out = Vec::with_capacity(t.len() + 64);
                    e.compress_vec(t.as_bytes(), &mut out, flate2::FlushCompress::Sync)
                        .expect("compress");
                    out.truncate(out.len() - 4);
                    out
                });
                let rsv1 = packed.is_some();
                any_rsv1 |= rsv1;
                let payload = packed.unwrap_or_else(|| t.as_bytes().to_vec());
                let mut bounds: Vec<usize> =
                    frags.iter().map(|i| i.index(payload.len() + 1)).collect();
                bounds.push(0);
                bounds.push(payload.len());
                bounds.sort_unstable();
                for (i, w) in bounds.windows(2).enumerate() {
                    let last = i + 2 == bounds.len();
                    let opcode = if i == 0 { OpCode::Data(Data::Text) } else { OpCode::Data(Data::Continue) };
                    encode_rsv1(last, rsv1 && i == 0, opcode, &payload[w[0]..w[1]], mask, &mut bytes);
                    if !last {
                        encode(true, OpCode::Control(Control::Ping), b"", mask, &mut bytes);
                        want.push(Incoming::Ping(Bytes::new()));
                    }
                }
                want.push(Incoming::Text(t.clone()));
            }
            let (got, error) = decode_with(&bytes, &cuts, 16 * 1024, true);
            prop_assert_eq!(error, "");
            prop_assert_eq!(got, want);
            if any_rsv1 {
                let (_, error) = decode_with(&bytes, &cuts, 16 * 1024, false);
                prop_assert!(error.starts_with("Protocol"), "{}", error);
            }
        }

        /// What the reference encoder framed is decoded to the messages sent,
        /// however the bytes are cut.
        #[test]
        fn prop_decodes_what_the_reference_encoder_framed(
            msgs in conversation(),
            mask in any::<[u8; 4]>(),
            cuts in cuts(),
        ) {
            let (bytes, want) = frames(&msgs, mask);
            let (got, error) = decode(&bytes, &cuts, MAX);
            prop_assert_eq!(error, "");
            prop_assert_eq!(got, want);
        }

        /// Any input: no panic, and the same messages and the same error
        /// whether it arrives whole or cut anywhere.
        #[test]
        fn prop_cutting_the_input_changes_nothing(
            bytes in any_input(),
            cuts in cuts(),
            max in prop_oneof![Just(MAX), 0..64usize],
        ) {
            let whole = decode(&bytes, &[], max);
            prop_assert_eq!(decode(&bytes, &cuts, max), whole);
        }

        /// After an error, closing mode never fails, never holds more than a
        /// frame header, and finds a close appended to anything.
        #[test]
        fn prop_closing_holds_a_header_at_most_and_finds_the_close(
            bytes in any_input(),
            cuts in cuts(),
        ) {
            let mut d = Decoder { max_message: MAX, ..Decoder::default() };
            let mut out = Vec::new();
            let mut ends: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            ends.push(bytes.len());
            ends.sort_unstable();
            let mut from = 0;
            for end in ends {
                d.pending.extend_from_slice(&bytes[from..end]);
                from = end;
                if d.parse(&mut out).is_err() {
                    d.start_closing();
                    d.parse(&mut out).expect("closing never fails");
                }
                if d.closing {
                    prop_assert!(d.pending.len() < 14, "held {}", d.pending.len());
                    prop_assert!(d.message.is_empty());
                }
            }
            // The client's close, sent after all that, is found once the
            // frame the input ended in is complete.
            d.start_closing();
            out.clear();
            d.parse(&mut out).expect("closing never fails");
            if d.pending.is_empty() && d.skip <= 1 << 16 {
                let rest = usize::try_from(d.skip).expect("small");
                d.pending.resize(rest, 0);
                encode(true, OpCode::Control(Control::Close), &[3, 232], [1, 2, 3, 4], &mut d.pending);
                d.parse(&mut out).expect("closing never fails");
                prop_assert!(out.contains(&Incoming::Close(None)), "{:?}", out);
            }
        }

        /// Headers are read as tungstenite reads them.
        #[test]
        fn prop_headers_match_tungstenite(bytes in prop::collection::vec(any::<u8>(), 0..16)) {
            let mut cursor = std::io::Cursor::new(&bytes);
            let reference = FrameHeader::parse(&mut cursor);
            let ours = parse_header(&bytes);
            match (reference, ours) {
                (Ok(None), None) => {}
                (Ok(Some((h, len))), Some(o)) => {
                    let rsv = u8::from(h.rsv1) << 2 | u8::from(h.rsv2) << 1 | u8::from(h.rsv3);
                    prop_assert_eq!(
                        (h.is_final, rsv, u8::from(h.opcode), h.mask, len, cursor.position()),
                        (o.fin, o.rsv, o.opcode, o.mask, o.len, o.size as u64)
                    );
                }
                // tungstenite refuses reserved opcodes at the header.
                (Err(_), Some(o)) => {
                    prop_assert!(!matches!(o.opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG));
                }
                (r, o) => prop_assert!(false, "tungstenite {:?}, ours {:?}", r.map(|h| h.is_some()), o),
            }
        }
    }
}
