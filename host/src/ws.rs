//! The server side of the WebSocket protocol (RFC 6455), after the upgrade,
//! on the raw TCP stream.
//!
//! Why not tungstenite here: it copies every outgoing frame into a
//! per-connection buffer that keeps its largest size for good (a snapshot of
//! 50 devices left ~16 KiB behind on every idle connection), and it allocates
//! its read buffer up front. This module writes frames straight from the
//! shared `Bytes` of the record path with one vectored write per batch (no
//! copy), and holds no buffer at all while a connection is idle. It does
//! only what a live-position server needs: no extensions, no subprotocols,
//! text in (≤ 16 KiB per message), text out.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;

/// Opcodes.
const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

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
    payload: Bytes,
    /// Counts against the connection's control backlog until written.
    control: bool,
}

impl OutFrame {
    /// A text frame of shared bytes.
    pub fn text(payload: Bytes) -> Self {
        Self::new(TEXT, payload)
    }

    pub fn ping() -> Self {
        Self::new(PING, Bytes::new())
    }

    /// The answer to a ping, echoing its payload (at most 125 bytes).
    pub fn pong(payload: Bytes) -> Self {
        Self::new(PONG, payload.slice(..payload.len().min(125)))
    }

    /// A close frame with a status code and a short reason.
    pub fn close(code: u16, reason: &str) -> Self {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
        Self::new(CLOSE, Bytes::from(payload))
    }

    /// Marks the frame as a control message (a reply, ping, pong, close):
    /// its bytes count against the backlog limit until they are written.
    pub fn into_control(mut self) -> Self {
        self.control = true;
        self
    }

    /// Payload bytes that count against the control backlog.
    pub fn control_len(&self) -> usize {
        if self.control { self.payload.len() } else { 0 }
    }

    fn new(opcode: u8, payload: Bytes) -> Self {
        let mut header = [0u8; 10];
        let len = payload.len();
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
        usize::from(self.header_len) + self.payload.len()
    }
}

/// Client frames to messages: the reading half, independent of the socket.
#[derive(Default)]
struct Decoder {
    /// After a protocol error nothing more is parsed; input is read and
    /// dropped (closing a socket with unread input resets it, and the reset
    /// can overtake our close frame).
    discarding: bool,
    /// Bytes of an incomplete frame; empty (and unallocated) when idle.
    pending: Vec<u8>,
    /// The payload of a fragmented message being received.
    message: Vec<u8>,
    fragmented: Option<u8>,
    max_message: usize,
}

impl WebSocket {
    /// Wraps an upgraded stream; `already_read` is what the HTTP layer read
    /// past the upgrade request.
    pub fn new(stream: Arc<TcpStream>, already_read: &[u8], max_message: usize) -> Self {
        Self {
            stream,
            decoder: Decoder {
                pending: already_read.to_vec(),
                max_message,
                ..Decoder::default()
            },
        }
    }

    /// Stops parsing: from now on [`WebSocket::read`] only drains the socket,
    /// until the client closes it.
    pub fn discard_input(&mut self) {
        self.decoder.discarding = true;
        self.decoder.pending = Vec::new();
        self.decoder.message = Vec::new();
    }

    /// The socket, shared with the connection's outbox.
    pub fn socket(&self) -> Arc<TcpStream> {
        self.stream.clone()
    }

    /// Waits for the next messages and appends them to `out`. Cancel-safe:
    /// nothing read is lost if the future is dropped.
    pub async fn read(&mut self, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        loop {
            if self.decoder.discarding {
                self.decoder.pending.clear();
            } else {
                self.decoder.parse(out)?;
            }
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
        for part in [header, &f.payload[..]] {
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
    /// Parses every complete frame in `pending`.
    fn parse(&mut self, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        let mut at = 0;
        while let Some((frame, used)) = parse_frame(&self.pending[at..], self.max_message)? {
            at += used;
            self.handle(frame, out)?;
        }
        if at > 0 {
            self.pending.drain(..at);
        }
        if self.pending.is_empty() && self.pending.capacity() > READ_CHUNK {
            self.pending = Vec::new();
        }
        Ok(())
    }

    fn handle(&mut self, f: Frame, out: &mut Vec<Incoming>) -> Result<(), ReadError> {
        match f.opcode {
            PING => out.push(Incoming::Ping(Bytes::from(f.payload))),
            PONG => out.push(Incoming::Pong),
            CLOSE if f.payload.len() == 1 => {
                return Err(ReadError::Protocol("a close frame with half a status code"));
            }
            CLOSE => {
                let code = (f.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([f.payload[0], f.payload[1]]));
                out.push(Incoming::Close(code));
            }
            TEXT | BINARY if self.fragmented.is_some() => {
                return Err(ReadError::Protocol("a new message inside a fragmented one"));
            }
            TEXT | BINARY if f.fin => out.push(message(f.opcode, f.payload)?),
            TEXT | BINARY => {
                self.fragmented = Some(f.opcode);
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
                    out.push(message(opcode, std::mem::take(&mut self.message))?);
                }
            }
            _ => return Err(ReadError::Protocol("reserved opcode")),
        }
        Ok(())
    }
}

fn message(opcode: u8, payload: Vec<u8>) -> Result<Incoming, ReadError> {
    if opcode == BINARY {
        return Ok(Incoming::Binary);
    }
    String::from_utf8(payload)
        .map(Incoming::Text)
        .map_err(|_| ReadError::InvalidUtf8)
}

struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// One complete client frame at the start of `buf`, unmasked, and the bytes
/// it used; `None` when more bytes are needed.
fn parse_frame(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, ReadError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(ReadError::Protocol("reserved bits set"));
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if b1 & 0x80 == 0 {
        return Err(ReadError::Protocol("client frames must be masked"));
    }
    let (len, mut at) = match b1 & 0x7F {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => (u64::from_be_bytes(b.try_into().unwrap_or_default()), 10),
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let control = opcode & 0x8 != 0;
    if control && (!fin || len > 125) {
        return Err(ReadError::Protocol("control frames are short and whole"));
    }
    if len > max as u64 {
        return Err(ReadError::TooLarge);
    }
    let len = len as usize;
    let Some(key) = buf.get(at..at + 4) else {
        return Ok(None);
    };
    let key = [key[0], key[1], key[2], key[3]];
    at += 4;
    let Some(data) = buf.get(at..at + len) else {
        return Ok(None);
    };
    let payload: Vec<u8> = data
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ key[i & 3])
        .collect();
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload,
        },
        at + len,
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
        let mut d = Decoder {
            pending: bytes.to_vec(),
            max_message: 16 * 1024,
            ..Decoder::default()
        };
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
        assert!(matches!(
            parse_all(&client_frame(true, 0x3, b"x")),
            Err(ReadError::Protocol(_))
        ));
        assert_eq!(
            parse_all(&client_frame(true, BINARY, b"x")).expect("binary"),
            [Incoming::Binary]
        );
    }

    #[test]
    fn a_cut_short_write_resumes_where_it_stopped() {
        let f = |n: usize| OutFrame::new(TEXT, Bytes::from(vec![b'x'; n]));
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
    fn server_headers() {
        let f = |n: usize| OutFrame::new(TEXT, Bytes::from(vec![b'x'; n]));
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
