//! A small JSON toolkit: the scanner [`Record`](crate::Record) is built on,
//! string escaping, number parsing and formatting, and a value tree
//! ([`Value`], [`Config`]) for plugin configurations.
//!
//! Nothing here depends on `core::fmt` except [`write_f64`] and the
//! [`Display`](core::fmt::Display) impls: float formatting alone adds about
//! 20 KB to a wasm module, so a plugin only pays for it when it uses it.
//!
//! ```
//! use livecast_plugin_sdk::json::{self, Value};
//!
//! let v = json::parse(r#"{"keep": ["66", "239"], "decimals": 2}"#)?;
//! assert_eq!(v.get("decimals").and_then(Value::as_i64), Some(2));
//! assert_eq!(v.get("keep").and_then(|k| k.as_array()).map(|a| a.len()), Some(2));
//! # Ok::<(), livecast_plugin_sdk::json::Error>(())
//! ```

use core::cmp::Ordering;
use core::fmt;

/// Deepest nesting that [`is_valid`], [`parse`] and [`Config`] follow: they
/// recurse, and hostile input must not exhaust the wasm stack. A
/// [`Record`](crate::Record) is read at any depth, as the host reads it.
pub const MAX_DEPTH: usize = 64;

/// A JSON syntax error: where it was found and what was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error {
    offset: usize,
    message: &'static str,
}

impl Error {
    pub(crate) const fn new(offset: usize, message: &'static str) -> Self {
        Self { offset, message }
    }

    /// Byte offset of the error in the input.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// What went wrong, e.g. `"expected ':'"`.
    pub fn message(&self) -> &'static str {
        self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.offset, self.message)
    }
}

impl std::error::Error for Error {}

/// Lets `?` turn a JSON error into the `String` that
/// [`Plugin::init`](crate::Plugin::init) returns, without pulling in
/// `core::fmt`.
impl From<Error> for String {
    fn from(e: Error) -> String {
        let mut s = String::from("invalid JSON at byte ");
        push_u64(&mut s, e.offset as u64);
        s.push_str(": ");
        s.push_str(e.message);
        s
    }
}

type Result<T> = core::result::Result<T, Error>;

// ---------------------------------------------------------------------------
// Scanner
// ---------------------------------------------------------------------------

#[inline]
pub(crate) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(&c) = b.get(i) {
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            i += 1;
        } else {
            break;
        }
    }
    i
}

/// `i` is at the opening quote. Returns the index just past the closing quote
/// and whether the string contains escapes (callers can then borrow it as is).
pub(crate) fn scan_string(b: &[u8], i: usize) -> Result<(usize, bool)> {
    let mut j = i + 1;
    let mut escaped = false;
    loop {
        // Strings are most of a record's bytes: skip eight ordinary bytes at
        // a time, and look at bytes one by one only around a quote, a
        // backslash or a control character.
        while let Some(chunk) = b.get(j..j + 8) {
            let x = u64::from_le_bytes(chunk.try_into().unwrap_or([0; 8]));
            if has_special_byte(x) {
                break;
            }
            j += 8;
        }
        let Some(&c) = b.get(j) else {
            return Err(Error::new(j, "unterminated string"));
        };
        match c {
            b'"' => return Ok((j + 1, escaped)),
            b'\\' => {
                escaped = true;
                match b.get(j + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => j += 2,
                    Some(b'u') => {
                        let hex = b.get(j + 2..j + 6).ok_or(Error::new(j, "bad \\u escape"))?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return Err(Error::new(j, "bad \\u escape"));
                        }
                        j += 6;
                    }
                    _ => return Err(Error::new(j, "invalid escape")),
                }
            }
            0..=0x1f => return Err(Error::new(j, "control character in string")),
            _ => j += 1,
        }
    }
}

/// Whether any byte of `x` is `"`, `\\` or below 0x20 (SWAR: the classic
/// "has zero byte" test, exact as a yes/no answer).
#[inline(always)]
fn has_special_byte(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let zero = |v: u64| v.wrapping_sub(ONES) & !v;
    (zero(quote) | zero(backslash) | (x.wrapping_sub(ONES * 0x20) & !x)) & HIGH != 0
}

/// `i` is at the first byte of a number. Returns the index just past it.
pub(crate) fn scan_number(b: &[u8], i: usize) -> Result<usize> {
    let mut j = i;
    if b.get(j) == Some(&b'-') {
        j += 1;
    }
    match b.get(j) {
        Some(b'0') => j += 1,
        Some(b'1'..=b'9') => {
            while matches!(b.get(j), Some(b'0'..=b'9')) {
                j += 1;
            }
        }
        _ => return Err(Error::new(j, "expected a digit")),
    }
    if b.get(j) == Some(&b'.') {
        j += 1;
        if !matches!(b.get(j), Some(b'0'..=b'9')) {
            return Err(Error::new(j, "expected a digit after '.'"));
        }
        while matches!(b.get(j), Some(b'0'..=b'9')) {
            j += 1;
        }
    }
    if matches!(b.get(j), Some(b'e' | b'E')) {
        j += 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        if !matches!(b.get(j), Some(b'0'..=b'9')) {
            return Err(Error::new(j, "expected a digit in exponent"));
        }
        while matches!(b.get(j), Some(b'0'..=b'9')) {
            j += 1;
        }
    }
    Ok(j)
}

fn scan_literal(b: &[u8], i: usize, lit: &'static [u8]) -> Result<usize> {
    if b.get(i..i + lit.len()) == Some(lit) {
        Ok(i + lit.len())
    } else {
        Err(Error::new(i, "invalid literal"))
    }
}

/// `i` is at the first byte of a value (whitespace already skipped). Returns
/// the index just past the value. Validates the whole value strictly.
pub(crate) fn skip_value(b: &[u8], i: usize, depth: usize) -> Result<usize> {
    if depth > MAX_DEPTH {
        return Err(Error::new(i, "nesting too deep"));
    }
    match b.get(i) {
        Some(b'"') => scan_string(b, i).map(|(end, _)| end),
        Some(b'{') => {
            let mut cur = ObjCursor::open(b, i)?;
            while let Some(_m) = cur.next_member(b, depth + 1)? {}
            Ok(cur.pos)
        }
        Some(b'[') => {
            let mut j = skip_ws(b, i + 1);
            if b.get(j) == Some(&b']') {
                return Ok(j + 1);
            }
            loop {
                j = skip_value(b, j, depth + 1)?;
                j = skip_ws(b, j);
                match b.get(j) {
                    Some(b',') => j = skip_ws(b, j + 1),
                    Some(b']') => return Ok(j + 1),
                    _ => return Err(Error::new(j, "expected ',' or ']'")),
                }
            }
        }
        Some(b't') => scan_literal(b, i, b"true"),
        Some(b'f') => scan_literal(b, i, b"false"),
        Some(b'n') => scan_literal(b, i, b"null"),
        Some(b'-' | b'0'..=b'9') => scan_number(b, i),
        _ => Err(Error::new(i, "expected a value")),
    }
}

/// Skips a value inside a record: scalars strictly, but an object or array
/// only as far as matching its brackets and scanning its strings. The host
/// has validated the record already, and nested values (the attributes) are
/// copied verbatim, so a full check would only cost time: it is the bulk of a
/// record.
///
/// Any depth is followed, as the host's parser follows it, without
/// recursion: the kind of each bracket is checked for the outer 64 levels
/// (one bit each) and only counted deeper, where nothing but hostile input
/// goes, and the host has rejected any mismatch there already.
pub(crate) fn skip_value_fast(b: &[u8], i: usize) -> Result<usize> {
    if !matches!(b.get(i), Some(b'{' | b'[')) {
        return skip_value(b, i, 0);
    }
    // One bit per open container, 1 for an object.
    let (mut stack, mut depth) = (0u64, 0usize);
    let mut j = i;
    loop {
        match b.get(j) {
            None => return Err(Error::new(j, "unterminated value")),
            Some(b'"') => {
                j = scan_string(b, j)?.0;
                continue;
            }
            Some(&open @ (b'{' | b'[')) => {
                if depth < 64 {
                    stack = (stack << 1) | u64::from(open == b'{');
                }
                depth += 1;
            }
            Some(&close @ (b'}' | b']')) => {
                if depth == 0 || (depth <= 64 && (stack & 1 == 1) != (close == b'}')) {
                    return Err(Error::new(j, "mismatched bracket"));
                }
                if depth <= 64 {
                    stack >>= 1;
                }
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            Some(_) => {}
        }
        j += 1;
    }
}

/// True when `text` is exactly one JSON value (surrounding whitespace allowed).
///
/// ```
/// use livecast_plugin_sdk::json::is_valid;
/// assert!(is_valid(r#" {"a": [1, 2.5e3, "x\n"]} "#));
/// assert!(!is_valid("{\"a\": 01}"));
/// assert!(!is_valid("1 2"));
/// ```
pub fn is_valid(text: &str) -> bool {
    let b = text.as_bytes();
    let i = skip_ws(b, 0);
    match skip_value(b, i, 0) {
        Ok(end) => skip_ws(b, end) == b.len(),
        Err(_) => false,
    }
}

/// One `"key": value` member of an object, as byte spans of the input.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Member {
    /// Key contents, without the quotes.
    pub key_start: u32,
    pub key_end: u32,
    /// Whether the key contains escapes (then it must be decoded to compare).
    pub key_escaped: bool,
    /// The raw value text.
    pub value_start: u32,
    pub value_end: u32,
}

impl Member {
    pub fn key_raw<'b>(&self, b: &'b [u8]) -> &'b [u8] {
        b.get(self.key_start as usize..self.key_end as usize)
            .unwrap_or_default()
    }

    pub fn value_raw<'b>(&self, b: &'b [u8]) -> &'b [u8] {
        b.get(self.value_start as usize..self.value_end as usize)
            .unwrap_or_default()
    }

    /// The whole `"key": value` text, quotes included.
    pub fn span(&self) -> (usize, usize) {
        (self.key_start as usize - 1, self.value_end as usize)
    }

    pub fn key_is(&self, b: &[u8], key: &str) -> bool {
        let raw = self.key_raw(b);
        if !self.key_escaped {
            return same(raw, key.as_bytes());
        }
        match core::str::from_utf8(raw).ok().and_then(unescape) {
            Some(k) => k == key,
            None => false,
        }
    }
}

/// Byte equality for short strings (keys), written out so that it compiles
/// to a few inline loads: slice `==` calls `memcmp`, which on wasm32 is a
/// byte-at-a-time loop behind a call, and was a sixth of a parsing
/// filter's time.
#[inline]
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut a8, mut b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let word = |c: &[u8]| c.iter().rev().fold(0u64, |w, &x| (w << 8) | u64::from(x));
    if a8
        .by_ref()
        .zip(b8.by_ref())
        .any(|(x, y)| word(x) != word(y))
    {
        return false;
    }
    word(a8.remainder()) == word(b8.remainder())
}

/// A resumable walk over the members of one object. Being `Copy`, a
/// [`Record`](crate::Record) keeps one in a `Cell` and continues a lookup where
/// the previous one stopped, which is what makes its parsing lazy.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ObjCursor {
    /// Just past the `{` or just past the previous member's value; after the
    /// last member, just past the `}`.
    pub pos: usize,
    first: bool,
    pub done: bool,
    /// Skip nested containers with [`skip_value_fast`] (records) rather
    /// than validating them (configs, `is_valid`).
    fast: bool,
}

impl ObjCursor {
    /// `i` is at the `{`. Validates everything.
    pub fn open(b: &[u8], i: usize) -> Result<Self> {
        if b.get(i) != Some(&b'{') {
            return Err(Error::new(i, "expected '{'"));
        }
        Ok(Self {
            pos: i + 1,
            first: true,
            done: false,
            fast: false,
        })
    }

    /// `i` is at the `{`. Members strictly, nested containers fast.
    pub fn open_fast(b: &[u8], i: usize) -> Result<Self> {
        Self::open(b, i).map(|c| Self { fast: true, ..c })
    }

    pub fn next_member(&mut self, b: &[u8], depth: usize) -> Result<Option<Member>> {
        if self.done {
            return Ok(None);
        }
        let mut j = skip_ws(b, self.pos);
        if self.first {
            if b.get(j) == Some(&b'}') {
                self.done = true;
                self.pos = j + 1;
                return Ok(None);
            }
        } else {
            match b.get(j) {
                Some(b',') => j = skip_ws(b, j + 1),
                Some(b'}') => {
                    self.done = true;
                    self.pos = j + 1;
                    return Ok(None);
                }
                _ => return Err(Error::new(j, "expected ',' or '}'")),
            }
        }
        if b.get(j) != Some(&b'"') {
            return Err(Error::new(j, "expected a key"));
        }
        let (key_end, key_escaped) = scan_string(b, j)?;
        let mut k = skip_ws(b, key_end);
        if b.get(k) != Some(&b':') {
            return Err(Error::new(k, "expected ':'"));
        }
        k = skip_ws(b, k + 1);
        let value_end = if self.fast {
            skip_value_fast(b, k)?
        } else {
            skip_value(b, k, depth)?
        };
        self.first = false;
        self.pos = value_end;
        let span = |x: usize| u32::try_from(x).map_err(|_| Error::new(x, "input too large"));
        Ok(Some(Member {
            key_start: span(j + 1)?,
            key_end: span(key_end - 1)?,
            key_escaped,
            value_start: span(k)?,
            value_end: span(value_end)?,
        }))
    }
}

// ---------------------------------------------------------------------------
// Strings
// ---------------------------------------------------------------------------

/// Decodes the contents of a JSON string (without its quotes): `\n`, `\"`,
/// `\u00e9`, surrogate pairs. Returns `None` for an invalid escape or a lone
/// surrogate.
///
/// ```
/// use livecast_plugin_sdk::json::unescape;
/// assert_eq!(unescape(r#"a\"b\u00e9\ud83d\ude00"#).as_deref(), Some("a\"bé😀"));
/// assert_eq!(unescape(r"\ud83d"), None);
/// ```
pub fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find('\\') {
        out.push_str(rest.get(..at)?);
        let b = rest.as_bytes();
        let (ch, used) = match b.get(at + 1)? {
            b'"' => ('"', 2),
            b'\\' => ('\\', 2),
            b'/' => ('/', 2),
            b'b' => ('\u{8}', 2),
            b'f' => ('\u{c}', 2),
            b'n' => ('\n', 2),
            b'r' => ('\r', 2),
            b't' => ('\t', 2),
            b'u' => {
                let hi = hex4(b.get(at + 2..at + 6)?)?;
                if (0xD800..0xDC00).contains(&hi) {
                    if b.get(at + 6..at + 8)? != b"\\u" {
                        return None;
                    }
                    let lo = hex4(b.get(at + 8..at + 12)?)?;
                    if !(0xDC00..0xE000).contains(&lo) {
                        return None;
                    }
                    let c = 0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00);
                    (char::from_u32(c)?, 12)
                } else {
                    (char::from_u32(hi)?, 6)
                }
            }
            _ => return None,
        };
        out.push(ch);
        rest = rest.get(at + used..)?;
    }
    out.push_str(rest);
    Some(out)
}

fn hex4(h: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in h {
        let d = (c as char).to_digit(16)?;
        v = v * 16 + d;
    }
    Some(v)
}

/// Appends `s` as a quoted, escaped JSON string.
///
/// ```
/// let mut out = String::new();
/// livecast_plugin_sdk::json::write_str(&mut out, "say \"hi\"\n");
/// assert_eq!(out, r#""say \"hi\"\n""#);
/// ```
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    let mut start = 0;
    // Bytes, not chars: everything that needs escaping is ASCII, and no byte
    // of a multi-byte UTF-8 sequence is.
    for (i, &c) in s.as_bytes().iter().enumerate() {
        let esc: &str = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0..0x20 => "",
            _ => continue,
        };
        out.push_str(s.get(start..i).unwrap_or_default());
        if esc.is_empty() {
            out.push_str("\\u00");
            out.push(char::from_digit(u32::from(c >> 4), 16).unwrap_or('0'));
            out.push(char::from_digit(u32::from(c & 15), 16).unwrap_or('0'));
        } else {
            out.push_str(esc);
        }
        start = i + 1;
    }
    out.push_str(s.get(start..).unwrap_or_default());
    out.push('"');
}

// ---------------------------------------------------------------------------
// Numbers
// ---------------------------------------------------------------------------

/// Parses a JSON number. `None` when `raw` is not exactly one JSON number or
/// when it overflows to infinity (`1e400`): a non-finite value is never what a
/// record meant, and the host rejects such a record too.
///
/// The result is correctly rounded for every input, identical to
/// `str::parse::<f64>` and to the host's parser, whatever the number of
/// digits or the exponent. Coordinates and speeds take a fast path of one
/// IEEE operation; only numbers with more than 19 significant digits whose
/// rounding the first 19 do not decide, or with extreme exponents, take a
/// slower exact one. (The standard library's parser is not used: its tables
/// add about 18 KB to every wasm module.)
///
/// ```
/// use livecast_plugin_sdk::json::parse_f64;
/// assert_eq!(parse_f64("41.327953"), Some(41.327953));
/// assert_eq!(parse_f64("41.327953299999996"), Some(41.327953299999996));
/// assert_eq!(parse_f64("4.1327953e1"), Some(41.327953));
/// assert_eq!(parse_f64("-1.5e3"), Some(-1500.0));
/// assert_eq!(parse_f64("2.2250738585072011e-308"), Some(2.225073858507201e-308));
/// assert_eq!(parse_f64("1e400"), None);
/// assert_eq!(parse_f64("01"), None);
/// ```
pub fn parse_f64(raw: &str) -> Option<f64> {
    let b = raw.as_bytes();
    if b.is_empty() || scan_number(b, 0).ok()? != b.len() {
        return None;
    }
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    // Up to 19 significant digits in `mant`, the rest only noted.
    let (mut mant, mut kept, mut exp, mut dropped) = (0u64, 0u32, 0i64, false);
    let mut in_fraction = false;
    let mut i = 0;
    while let Some(&c) = digits.get(i) {
        match c {
            b'0'..=b'9' => {
                if mant == 0 && c == b'0' {
                    exp -= i64::from(in_fraction);
                } else if kept < 19 {
                    mant = mant * 10 + u64::from(c - b'0');
                    kept += 1;
                    exp -= i64::from(in_fraction);
                } else {
                    dropped |= c != b'0';
                    exp += i64::from(!in_fraction);
                }
            }
            b'.' => in_fraction = true,
            _ => break,
        }
        i += 1;
    }
    if let Some(e) = digits.get(i + 1..) {
        // A validated number has only `e`/`E`, a sign and digits left here.
        let (e_neg, e_digits) = match e.split_first() {
            Some((b'-', r)) => (true, r),
            Some((b'+', r)) => (false, r),
            _ => (false, e),
        };
        // Saturate: past ±100000 every result is 0 or infinite anyway.
        let n = e_digits
            .iter()
            .fold(0i64, |n, &d| (n * 10 + i64::from(d - b'0')).min(100_000));
        exp += if e_neg { -n } else { n };
    }
    let v = if mant == 0 {
        0.0
    } else {
        let exact = if dropped {
            // The value lies strictly between mant and mant + 1 (times 10^exp);
            // rounding is monotonic, so when both bounds round to the same
            // double, so does the value.
            exact_f64(mant, exp).filter(|&lo| exact_f64(mant + 1, exp) == Some(lo))
        } else {
            exact_f64(mant, exp)
        };
        match exact {
            Some(v) => v,
            None => slow_f64(digits, approx_f64(mant, exp))?,
        }
    };
    let v = if neg { -v } else { v };
    v.is_finite().then_some(v)
}

/// The powers of ten a double holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// `mant × 10^exp`, correctly rounded, when 128-bit integer arithmetic can do
/// it exactly. 10^exp = 5^exp × 2^exp, and scaling by a power of two is exact,
/// so only `mant × 5^exp` (or `mant / 5^-exp`) has to be computed; the
/// conversion of an integer to f64 then rounds once, correctly.
fn exact_f64(mant: u64, exp: i64) -> Option<f64> {
    // Clinger's fast path, which covers coordinates and speeds: both
    // operands are exact doubles, so one IEEE operation rounds correctly.
    // It spares the 128-bit division, a slow library call on wasm32.
    if mant < 1 << 53 {
        match usize::try_from(exp.unsigned_abs())
            .ok()
            .and_then(|e| POW10.get(e))
        {
            Some(p) if exp < 0 => return Some(mant as f64 / p),
            Some(p) => return Some(mant as f64 * p),
            None => {}
        }
    }
    let m = u128::from(mant);
    let two_pow = |e: i64| f64::from_bits(u64::try_from(1023 + e).unwrap_or(0) << 52);
    if exp >= 0 {
        let p = m.checked_mul(5u128.checked_pow(u32::try_from(exp).ok()?)?)?;
        return Some(p as f64 * two_pow(exp));
    }
    let k = u32::try_from(-exp).ok()?;
    if k > 31 {
        return None;
    }
    // Normalize the dividend to 128 bits: 5^31 < 2^72, so the quotient keeps
    // at least 56 bits, and folding the remainder into its lowest bit (a
    // sticky bit below the rounding position) rounds like the true quotient.
    let shift = m.leading_zeros();
    let n = m << shift;
    let d = 5u128.pow(k);
    let q = (n / d) | u128::from(n % d != 0);
    // 2^-(shift + k) is at least 2^-158: the result stays a normal number.
    Some(q as f64 * two_pow(-i64::from(shift) - i64::from(k)))
}

/// Within a few ulps: a rounded mantissa scaled by exact powers of ten. The
/// slow path's first guess.
fn approx_f64(mant: u64, mut exp: i64) -> f64 {
    let mut v = mant as f64;
    while exp > 0 {
        let step = exp.min(22);
        v *= 10f64.powi(step as i32);
        exp -= step;
    }
    while exp < 0 {
        let step = (-exp).min(22);
        v /= 10f64.powi(step as i32);
        exp += step;
    }
    v
}

/// Significant digits the slow path keeps. A midpoint between two doubles
/// has at most 767 significant digits, so past this many only "is any
/// remaining digit nonzero" matters (kept as one more digit, a sticky 1).
const SLOW_DIGITS: u32 = 800;

/// Room for the largest number compared: about 2670 bits (801 digits, or a
/// 55-bit midpoint times 5^1124), with margin for a guess a few ulps off.
const LIMBS: usize = 96;

/// A fixed-size unsigned integer, least significant 32-bit limb first.
/// Only what the slow path needs, kept small: it is in every module that
/// reads a number.
#[derive(Clone, Copy)]
struct Big {
    len: usize,
    limbs: [u32; LIMBS],
}

impl Big {
    fn new(v: u64) -> Big {
        let mut b = Big {
            len: 2,
            limbs: [0; LIMBS],
        };
        b.limbs[0] = v as u32;
        b.limbs[1] = (v >> 32) as u32;
        while b.len > 0 && b.limbs.get(b.len - 1) == Some(&0) {
            b.len -= 1;
        }
        b
    }

    /// `self × m + a`; `false` on overflow.
    #[inline(never)]
    fn mul_add(&mut self, m: u32, a: u32) -> bool {
        let mut carry = u64::from(a);
        for limb in self.limbs.iter_mut().take(self.len) {
            let v = u64::from(*limb) * u64::from(m) + carry;
            *limb = v as u32;
            carry = v >> 32;
        }
        if carry != 0 {
            let Some(top) = self.limbs.get_mut(self.len) else {
                return false;
            };
            *top = carry as u32;
            self.len += 1;
        }
        true
    }

    /// `self × 5^n`, or `self × 2^n`; `false` on overflow. By repeated
    /// multiplication, which is slow but small: this path is rare.
    fn mul_pow(&mut self, five: bool, mut n: u32) -> bool {
        let (step, factor) = if five {
            (13, 1_220_703_125)
        } else {
            (31, 1 << 31)
        };
        while n >= step {
            if !self.mul_add(factor, 0) {
                return false;
            }
            n -= step;
        }
        self.mul_add(if five { 5u32.pow(n) } else { 1 << n }, 0)
    }

    fn cmp(&self, other: &Big) -> Ordering {
        let (a, b) = (&self.limbs[..], &other.limbs[..]);
        self.len.cmp(&other.len).then_with(|| {
            a.iter()
                .zip(b)
                .take(self.len)
                .rev()
                .map(|(x, y)| x.cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
    }
}

/// The correctly rounded value of a validated, unsigned JSON number whose
/// fast paths failed: its digits as an integer `d` times `10^e`, compared
/// exactly with the midpoints next to `guess` (within a few ulps), stepping
/// until the value lies between them. `None` when it rounds to infinity.
#[cold]
#[inline(never)]
fn slow_f64(digits: &[u8], guess: f64) -> Option<f64> {
    let (mut d, mut kept, mut e, mut sticky) = (Big::new(0), 0u32, 0i64, false);
    let mut in_fraction = false;
    let mut i = 0;
    while let Some(&c) = digits.get(i) {
        match c {
            b'0'..=b'9' => {
                if kept == 0 && c == b'0' {
                    e -= i64::from(in_fraction);
                } else if kept < SLOW_DIGITS {
                    // 801 digits fit in LIMBS: this cannot overflow.
                    d.mul_add(10, u32::from(c - b'0'));
                    kept += 1;
                    e -= i64::from(in_fraction);
                } else {
                    sticky |= c != b'0';
                    e += i64::from(!in_fraction);
                }
            }
            b'.' => in_fraction = true,
            _ => break,
        }
        i += 1;
    }
    if sticky {
        d.mul_add(10, 1);
        kept += 1;
        e -= 1;
    }
    if let Some(x) = digits.get(i + 1..) {
        let (neg, x) = match x.split_first() {
            Some((b'-', r)) => (true, r),
            Some((b'+', r)) => (false, r),
            _ => (false, x),
        };
        let n = x
            .iter()
            .fold(0i64, |n, &c| (n * 10 + i64::from(c - b'0')).min(100_000));
        e += if neg { -n } else { n };
    }
    if kept == 0 {
        return Some(0.0);
    }
    // The value lies in [10^(e+kept-1), 10^(e+kept)).
    let magnitude = e + i64::from(kept);
    if magnitude > 310 {
        return None;
    }
    if magnitude < -324 {
        // Below 10^-324, less than half the smallest subnormal.
        return Some(0.0);
    }
    if e > 0 && !d.mul_pow(true, e as u32) {
        return finite(guess);
    }
    const INF: u64 = 0x7FF0_0000_0000_0000;
    let mut bits = guess.to_bits().min(INF);
    loop {
        let (biased, fraction) = ((bits >> 52) as i64, bits & ((1 << 52) - 1));
        // bits = m * 2^q, with INF standing for 2^1024.
        let (m, q) = if biased == 0 {
            (fraction, -1074)
        } else {
            (fraction | 1 << 52, biased - 1075)
        };
        let odd = m & 1 == 1;
        // Up while the value is above the midpoint with the next double
        // (or on it, when that rounds to even).
        if bits < INF {
            match compare(&d, e, 2 * m + 1, q - 1) {
                Some(Ordering::Greater) => {
                    bits += 1;
                    continue;
                }
                Some(Ordering::Equal) if odd => {
                    bits += 1;
                    continue;
                }
                Some(_) => {}
                None => return finite(guess),
            }
        }
        if bits == 0 {
            break;
        }
        // Down likewise. At the bottom of a binade the double below is half
        // as far away.
        let (low, k) = if fraction == 0 && biased > 1 {
            (4 * m - 1, q - 2)
        } else {
            (2 * m - 1, q - 1)
        };
        match compare(&d, e, low, k) {
            Some(Ordering::Less) => bits -= 1,
            Some(Ordering::Equal) if odd => bits -= 1,
            Some(_) => break,
            None => return finite(guess),
        }
    }
    finite(f64::from_bits(bits))
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// Compares `d × 10^e` (where `d` already holds `d × 5^e` when `e > 0`)
/// with `m × 2^k`, exactly: both sides are scaled to integers, the powers of
/// five onto the midpoint's side when `e < 0`, and the powers of two onto
/// whichever side `2^(k - e)` leaves. `None` if a number outgrows [`Big`],
/// which the bounds on the exponents rule out.
#[inline(never)]
fn compare(d: &Big, e: i64, m: u64, k: i64) -> Option<Ordering> {
    let mut mid = Big::new(m);
    if e < 0 && !mid.mul_pow(true, e.unsigned_abs() as u32) {
        return None;
    }
    let mut lhs = *d;
    let shift = k - e;
    let ok = if shift >= 0 {
        mid.mul_pow(false, shift as u32)
    } else {
        lhs.mul_pow(false, shift.unsigned_abs() as u32)
    };
    ok.then(|| lhs.cmp(&mid))
}

/// Parses a JSON number as an integer. Accepts `12`, `-3`, and also `12.0` or
/// `1.2e1` when the value is integral and fits in an `i64`.
///
/// ```
/// use livecast_plugin_sdk::json::parse_i64;
/// assert_eq!(parse_i64("11"), Some(11));
/// assert_eq!(parse_i64("11.0"), Some(11));
/// assert_eq!(parse_i64("11.5"), None);
/// assert_eq!(parse_i64("99999999999999999999"), None);
/// ```
pub fn parse_i64(raw: &str) -> Option<i64> {
    let b = raw.as_bytes();
    let (neg, digits) = match b.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, b),
    };
    if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
        if digits.len() > 1 && digits.first() == Some(&b'0') {
            return None;
        }
        // Accumulate negatively so that i64::MIN parses too.
        let mut v: i64 = 0;
        for &c in digits {
            v = v.checked_mul(10)?.checked_sub(i64::from(c - b'0'))?;
        }
        return if neg { Some(v) } else { v.checked_neg() };
    }
    let f = parse_f64(raw)?;
    // 2^63 is exact in f64; the range check keeps the cast lossless.
    if f.fract() == 0.0 && (-9.223_372_036_854_776e18..9.223_372_036_854_776e18).contains(&f) {
        Some(f as i64)
    } else {
        None
    }
}

fn push_u64(out: &mut String, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut used = 0;
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (v % 10) as u8;
        used += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &c in buf.iter().skip(buf.len() - used) {
        out.push(c as char);
    }
}

/// Appends an integer in decimal, without `core::fmt`.
///
/// ```
/// let mut s = String::new();
/// livecast_plugin_sdk::json::write_i64(&mut s, i64::MIN);
/// assert_eq!(s, "-9223372036854775808");
/// ```
pub fn write_i64(out: &mut String, v: i64) {
    if v < 0 {
        out.push('-');
    }
    push_u64(out, v.unsigned_abs());
}

/// Appends a float with Rust's shortest round-trip formatting (`63`, `41.327953`,
/// `0.0000001`). Returns `false` and appends nothing for NaN or infinity,
/// which JSON cannot represent.
///
/// This is the one function in the SDK that uses `core::fmt`'s float
/// formatting (about 20 KB of wasm); [`write_f64_rounded`] does not.
pub fn write_f64(out: &mut String, v: f64) -> bool {
    use core::fmt::Write;
    if !v.is_finite() {
        return false;
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        write_i64(out, v as i64);
        return true;
    }
    write!(out, "{v}").is_ok()
}

/// Appends `v` rounded half away from zero to `decimals` decimal places
/// (trailing zeros dropped: `41.3`, not `41.30`). Returns `false` and appends
/// nothing when `v` is not finite, `decimals > 9`, or the rounded value has
/// more than 15 significant digits (it would no longer be exact).
///
/// ```
/// let mut s = String::new();
/// assert!(livecast_plugin_sdk::json::write_f64_rounded(&mut s, 41.327953, 2));
/// assert_eq!(s, "41.33");
/// ```
pub fn write_f64_rounded(out: &mut String, v: f64, decimals: u32) -> bool {
    if !v.is_finite() || decimals > 9 {
        return false;
    }
    // Powers of ten up to 1e9 are exact, so the scaling rounds once.
    let scaled = (v * 10f64.powi(decimals as i32)).round();
    if scaled.abs() >= 1e15 {
        return false;
    }
    let k = scaled as i64;
    let div = 10u64.pow(decimals);
    let (int, mut frac) = (k.unsigned_abs() / div, k.unsigned_abs() % div);
    if k < 0 {
        out.push('-');
    }
    push_u64(out, int);
    if frac != 0 {
        let mut width = decimals;
        while frac % 10 == 0 {
            frac /= 10;
            width -= 1;
        }
        out.push('.');
        let mut digits = String::new();
        push_u64(&mut digits, frac);
        for _ in digits.len()..width as usize {
            out.push('0');
        }
        out.push_str(&digits);
    }
    true
}

// ---------------------------------------------------------------------------
// Value tree (for configurations)
// ---------------------------------------------------------------------------

/// A parsed JSON value. Meant for configurations, where convenience matters
/// more than speed; records use the lazy [`Record`](crate::Record) instead.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number, kept as its JSON text so that nothing is lost
    /// (`18446744073709551615` stays exact).
    Number(String),
    /// A string, decoded.
    String(String),
    /// An array.
    Array(Vec<Value>),
    /// An object, members in document order.
    Object(Vec<(String, Value)>),
}

impl Value {
    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The number as an `f64`, if this is a finite number.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Number(n) => parse_f64(n),
            _ => None,
        }
    }

    /// The number as an `i64`, if this is an integral number in range.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Number(n) => parse_i64(n),
            _ => None,
        }
    }

    /// The boolean, if this is `true` or `false`.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The elements, if this is an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The members, if this is an object.
    pub fn as_object(&self) -> Option<&[(String, Value)]> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// Whether this is `null`.
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The first member named `key`, if this is an object that has one.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_object()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Compact JSON text of this value.
    ///
    /// ```
    /// let v = livecast_plugin_sdk::json::parse(r#"{ "a" : [1, "x\ty"] }"#)?;
    /// assert_eq!(v.to_json(), r#"{"a":[1,"x\ty"]}"#);
    /// # Ok::<(), livecast_plugin_sdk::json::Error>(())
    /// ```
    pub fn to_json(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    /// Appends the compact JSON text of this value.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(true) => out.push_str("true"),
            Value::Bool(false) => out.push_str("false"),
            Value::Number(n) => out.push_str(n),
            Value::String(s) => write_str(out, s),
            Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write_json(out);
                }
                out.push(']');
            }
            Value::Object(o) => {
                out.push('{');
                for (i, (k, v)) in o.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_str(out, k);
                    out.push(':');
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }
}

/// Parses one JSON value (surrounding whitespace allowed, nothing else).
///
/// ```
/// use livecast_plugin_sdk::json::{parse, Value};
/// assert_eq!(parse("[true, null]")?, Value::Array(vec![Value::Bool(true), Value::Null]));
/// assert!(parse("{\"a\":1,}").is_err());
/// # Ok::<(), livecast_plugin_sdk::json::Error>(())
/// ```
pub fn parse(text: &str) -> Result<Value> {
    let b = text.as_bytes();
    let i = skip_ws(b, 0);
    let (v, end) = parse_at(text, i, 0)?;
    let end = skip_ws(b, end);
    if end != b.len() {
        return Err(Error::new(end, "unexpected data after the value"));
    }
    Ok(v)
}

fn parse_at(text: &str, i: usize, depth: usize) -> Result<(Value, usize)> {
    let b = text.as_bytes();
    if depth > MAX_DEPTH {
        return Err(Error::new(i, "nesting too deep"));
    }
    match b.get(i) {
        Some(b'"') => {
            let (end, _) = scan_string(b, i)?;
            let s = text
                .get(i + 1..end - 1)
                .and_then(unescape)
                .ok_or(Error::new(i, "invalid string"))?;
            Ok((Value::String(s), end))
        }
        Some(b'{') => {
            let mut cur = ObjCursor::open(b, i)?;
            let mut members = Vec::new();
            // Shallow scan per member, then a full parse of its value: the
            // cursor validates it once more, which configs can afford.
            while let Some(m) = cur.next_member(b, depth + 1)? {
                let raw_key = text.get(m.key_start as usize..m.key_end as usize);
                let key = raw_key
                    .and_then(unescape)
                    .ok_or(Error::new(i, "invalid key"))?;
                let (v, _) = parse_at(text, m.value_start as usize, depth + 1)?;
                members.push((key, v));
            }
            Ok((Value::Object(members), cur.pos))
        }
        Some(b'[') => {
            let mut items = Vec::new();
            let mut j = skip_ws(b, i + 1);
            if b.get(j) == Some(&b']') {
                return Ok((Value::Array(items), j + 1));
            }
            loop {
                let (v, end) = parse_at(text, j, depth + 1)?;
                items.push(v);
                j = skip_ws(b, end);
                match b.get(j) {
                    Some(b',') => j = skip_ws(b, j + 1),
                    Some(b']') => return Ok((Value::Array(items), j + 1)),
                    _ => return Err(Error::new(j, "expected ',' or ']'")),
                }
            }
        }
        Some(b't') => scan_literal(b, i, b"true").map(|e| (Value::Bool(true), e)),
        Some(b'f') => scan_literal(b, i, b"false").map(|e| (Value::Bool(false), e)),
        Some(b'n') => scan_literal(b, i, b"null").map(|e| (Value::Null, e)),
        Some(b'-' | b'0'..=b'9') => {
            let end = scan_number(b, i)?;
            Ok((
                Value::Number(text.get(i..end).unwrap_or_default().to_string()),
                end,
            ))
        }
        _ => Err(Error::new(i, "expected a value")),
    }
}

// ---------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------

/// A plugin configuration: the JSON object of the chain entry's `config`.
///
/// A lazy view like [`Record`](crate::Record) (no value tree is built, which
/// keeps plugins small). Typed getters return `Ok(None)` when a key is absent
/// or `null` (so `"strip": null` leaves the default in force), and an error
/// message naming the key when it has the wrong type, so `init` reads as a
/// list of `?`s.
///
/// ```
/// use livecast_plugin_sdk::json::Config;
///
/// let cfg = Config::parse(r#"{"keep": ["66", "239"], "decimals": 3, "strip": null, "value": {"a": 1}}"#)?;
/// cfg.deny_unknown(&["keep", "decimals", "strip", "value"])?;
/// assert_eq!(cfg.str_list("keep")?, Some(vec!["66".to_string(), "239".to_string()]));
/// assert_eq!(cfg.i64("decimals")?.unwrap_or(2), 3);
/// assert_eq!(cfg.bool("strip")?.unwrap_or(true), true);
/// assert_eq!(cfg.get_raw("value"), Some(r#"{"a": 1}"#));
/// assert!(cfg.f64("keep").is_err());
/// # Ok::<(), String>(())
/// ```
#[derive(Debug)]
pub struct Config<'a> {
    text: &'a str,
    record: crate::Record<'a>,
}

impl<'a> Config<'a> {
    /// Validates a configuration. It must be a JSON object; `null` counts as
    /// `{}`.
    pub fn parse(text: &'a str) -> core::result::Result<Config<'a>, String> {
        let b = text.as_bytes();
        let start = skip_ws(b, 0);
        let end =
            skip_value(b, start, 0).map_err(|e| String::from("config: ") + &String::from(e))?;
        if skip_ws(b, end) != b.len() {
            return Err("config: unexpected data after the value".into());
        }
        let text = match b.get(start) {
            Some(b'{') => text,
            Some(b'n') => "{}",
            _ => return Err("config must be a JSON object".into()),
        };
        Ok(Config {
            text,
            record: crate::Record::new(text),
        })
    }

    /// The raw JSON text of `key`'s value, if present (`null` included).
    pub fn get_raw(&self, key: &str) -> Option<&str> {
        self.record.get_raw(key)
    }

    /// `key`'s value as a [`Value`] tree, if present.
    pub fn value(&self, key: &str) -> Option<Value> {
        parse(self.get_raw(key)?).ok()
    }

    /// Whether the configuration has no keys.
    pub fn is_empty(&self) -> bool {
        self.keys().next().is_none()
    }

    /// The keys present, in document order.
    pub fn keys(&self) -> impl Iterator<Item = String> + '_ {
        let b = self.text.as_bytes();
        let mut cur = ObjCursor::open(b, skip_ws(b, 0)).ok();
        core::iter::from_fn(move || {
            let m = cur.as_mut()?.next_member(b, 1).ok()??;
            let raw = self.text.get(m.key_start as usize..m.key_end as usize)?;
            if m.key_escaped {
                unescape(raw)
            } else {
                Some(raw.to_string())
            }
        })
    }

    /// Rejects keys not in `known`: a typo such as `max_sped_kmh` must fail
    /// the chain entry instead of silently leaving the default in force.
    pub fn deny_unknown(&self, known: &[&str]) -> core::result::Result<(), String> {
        match self.keys().find(|k| !known.contains(&k.as_str())) {
            None => Ok(()),
            Some(k) => {
                let mut msg = String::from("unknown config key `");
                msg.push_str(&k);
                msg.push_str("` (expected one of:");
                for (i, name) in known.iter().enumerate() {
                    msg.push_str(if i == 0 { " " } else { ", " });
                    msg.push_str(name);
                }
                msg.push(')');
                Err(msg)
            }
        }
    }

    fn typed<T>(
        &self,
        key: &str,
        what: &str,
        f: impl FnOnce(&str) -> Option<T>,
    ) -> core::result::Result<Option<T>, String> {
        match self.get_raw(key) {
            None | Some("null") => Ok(None),
            Some(raw) => f(raw).map(Some).ok_or_else(|| {
                let mut msg = String::from("config key `");
                msg.push_str(key);
                msg.push_str("` must be ");
                msg.push_str(what);
                msg
            }),
        }
    }

    /// A string.
    pub fn str(&self, key: &str) -> core::result::Result<Option<&str>, String> {
        if matches!(self.get_raw(key), Some(raw) if raw.starts_with('"')) {
            // Decoded (and cached) by the record view.
            return Ok(self.record.get_str(key));
        }
        self.typed(key, "a string", |_| None)
    }

    /// A number, integers included: TOML's `41` arrives as JSON `41` and
    /// reads as `41.0`; `4.1e1` and `41.0` read the same. `Err` for
    /// anything else, and for a number too large for a double (`1e400`).
    ///
    /// ```
    /// let cfg = livecast_plugin_sdk::Config::parse(r#"{"max": 41, "min": 2.5e-1}"#)?;
    /// assert_eq!(cfg.f64("max")?, Some(41.0));
    /// assert_eq!(cfg.f64("min")?, Some(0.25));
    /// # Ok::<(), String>(())
    /// ```
    pub fn f64(&self, key: &str) -> core::result::Result<Option<f64>, String> {
        self.typed(key, "a number", parse_f64)
    }

    /// An integer: `12`, also `12.0` or `1.2e1`; `Err` for a fraction or
    /// a value outside `i64`.
    pub fn i64(&self, key: &str) -> core::result::Result<Option<i64>, String> {
        self.typed(key, "an integer", parse_i64)
    }

    /// A boolean.
    pub fn bool(&self, key: &str) -> core::result::Result<Option<bool>, String> {
        self.typed(key, "true or false", |raw| match raw {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        })
    }

    /// An array of strings.
    pub fn str_list(&self, key: &str) -> core::result::Result<Option<Vec<String>>, String> {
        self.typed(key, "an array of strings", string_array)
    }
}

/// The elements of a JSON array of strings, decoded; `None` for anything else.
fn string_array(raw: &str) -> Option<Vec<String>> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'[') {
        return None;
    }
    let mut out = Vec::new();
    let mut j = skip_ws(b, 1);
    if b.get(j) == Some(&b']') {
        return Some(out);
    }
    loop {
        if b.get(j) != Some(&b'"') {
            return None;
        }
        let (end, escaped) = scan_string(b, j).ok()?;
        let inner = raw.get(j + 1..end - 1)?;
        out.push(if escaped {
            unescape(inner)?
        } else {
            inner.to_string()
        });
        j = skip_ws(b, end);
        match b.get(j) {
            Some(b',') => j = skip_ws(b, j + 1),
            Some(b']') => return Some(out),
            _ => return None,
        }
    }
}

/// For plugins that take no configuration: accepts `{}` (what the host passes
/// when the chain entry has none) or `null`, and rejects anything else.
pub fn expect_empty_config(config: &str) -> core::result::Result<(), String> {
    // Matched by hand rather than parsed: stateless plugins should not carry
    // the scanner's code for this.
    let b = config.as_bytes();
    let i = skip_ws(b, 0);
    let end = match b.get(i) {
        Some(b'{') => {
            let j = skip_ws(b, i + 1);
            (b.get(j) == Some(&b'}')).then_some(j + 1)
        }
        _ => scan_literal(b, i, b"null").ok(),
    };
    match end {
        Some(end) if skip_ws(b, end) == b.len() => Ok(()),
        _ => Err("this plugin takes no configuration (expected {})".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_compares_every_byte() {
        let key = b"deviceId_and_more";
        for len in 0..=key.len() {
            let a = &key[..len];
            assert!(same(a, a));
            assert!(!same(a, &key[..len.saturating_sub(1)]) || len == 0);
            for i in 0..len {
                let mut b = a.to_vec();
                b[i] ^= 1;
                assert!(!same(a, &b), "{len} {i}");
            }
        }
    }

    #[test]
    fn numbers_are_correctly_rounded_in_the_exact_range() {
        for s in [
            "0",
            "-0",
            "1",
            "41.327953",
            "19.819025",
            "-179.9999999",
            "1e22",
            "1e-19",
            "123456789012345678",
            "0.1",
            "41.327953299999996",
            "9007199254740993",
            "0.00000000022565087007668002",
            "18446744073709551615",
            "0.000000000000000000123",
            "1e38",
            "3.4e38",
            "100000000000000000000000",
            "1.2345678901234567e-14",
            "1e-31",
            "9999999999999999999e27",
        ] {
            assert_eq!(
                parse_f64(s).map(f64::to_bits),
                Some(s.parse::<f64>().unwrap().to_bits()),
                "{s}"
            );
        }
        for s in [
            "", "-", "1.", ".5", "+1", "1e", "0x10", "1 ", "NaN", "Infinity", "1e999", "-1e400",
        ] {
            assert_eq!(parse_f64(s), None, "{s}");
        }
    }

    /// Every double printed the way JSON writers print them (shortest round
    /// trip, up to 17 digits) parses back to itself, and random decimals with
    /// up to 19 digits match the standard library bit for bit.
    #[test]
    fn random_numbers_match_the_standard_library() {
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200_000 {
            let exp = next() % 103 + 983; // magnitudes 2^-40 .. 2^62
            let v = f64::from_bits((next() >> 12) | (exp << 52));
            for text in [format!("{v}"), format!("{v:e}"), format!("{:.7}", v)] {
                let ours = parse_f64(&text).unwrap();
                assert_eq!(
                    ours.to_bits(),
                    text.parse::<f64>().unwrap().to_bits(),
                    "{text}"
                );
            }
            let digits = next() % 10_000_000_000_000_000_000;
            let e = (next() % 59) as i64 - 31;
            let text = format!("{digits}e{e}");
            assert_eq!(
                parse_f64(&text).map(f64::to_bits),
                Some(text.parse::<f64>().unwrap().to_bits()),
                "{text}"
            );
        }
    }

    /// Numbers past the fast paths: long mantissas, extreme exponents,
    /// subnormals, the edges of overflow, and the classic hard cases.
    #[test]
    fn numbers_outside_the_fast_paths_are_correctly_rounded() {
        for s in [
            "2.2250738585072014e-308",
            "2.2250738585072011e-308",
            "2.2250738585072012e-308",
            "4.4501477170144023e-308",
            "1.7976931348623157e308",
            "1.7976931348623158e308",
            "1e300",
            "8.98846567431158e307",
            "123456789e-250",
            "1.2345678901234567890123456789",
            "98765432109876543210987654321e-5",
            "1.00000000000000011102230246251565",
            "1.00000000000000011102230246251565404236316680908203125",
            "1.00000000000000011102230246251565404236316680908203124",
            "1.00000000000000011102230246251565404236316680908203126",
            "9007199254740993.0000000000000000000000001",
            "1.2345678901234567e-20",
            "5e-324",
            "2.4703282292062328e-324",
            "2.4703282292062327e-324",
            "1e-400",
            "0.000000000000000000000000000000000000000000001e45",
            "1e23",
            "0e99999999999",
            "1e-99999999999",
        ] {
            assert_eq!(
                parse_f64(s).map(f64::to_bits),
                Some(s.parse::<f64>().unwrap().to_bits()),
                "{s}"
            );
        }
        for s in ["1.7976931348623159e308", "1e309", "1e99999999999"] {
            assert_eq!(parse_f64(s), None, "{s}");
        }
    }

    /// Exact decimal digits of `m × 2^q`, as `(digits, e)` with value
    /// `digits × 10^e`: a midpoint between two doubles, written out in full.
    fn exact_decimal(m: u64, q: i64) -> (String, i64) {
        // Little-endian base 10^9, independent of the parser's big integer.
        let mut n: Vec<u64> = vec![m % 1_000_000_000, m / 1_000_000_000 % 1_000_000_000];
        n.push(m / 1_000_000_000_000_000_000);
        let times = |n: &mut Vec<u64>, k: u64| {
            let mut carry = 0;
            for x in n.iter_mut() {
                let v = *x * k + carry;
                *x = v % 1_000_000_000;
                carry = v / 1_000_000_000;
            }
            if carry > 0 {
                n.push(carry);
            }
        };
        for _ in 0..q.unsigned_abs() {
            times(&mut n, if q >= 0 { 2 } else { 5 });
        }
        while n.len() > 1 && n.last() == Some(&0) {
            n.pop();
        }
        let mut s = n.last().unwrap().to_string();
        for x in n.iter().rev().skip(1) {
            s += &format!("{x:09}");
        }
        (s, q.min(0))
    }

    /// The midpoint between a double and the next, exactly, and just above
    /// and below it (by a digit far past the 19th, and past the 800th): the
    /// inputs where a parser that is only nearly right goes wrong.
    fn midpoint_cases(bits: u64) -> Vec<String> {
        let (biased, fraction) = ((bits >> 52) as i64, bits & ((1 << 52) - 1));
        let (m, q) = if biased == 0 {
            (fraction, -1074)
        } else {
            (fraction | 1 << 52, biased - 1075)
        };
        let (d, e) = exact_decimal(2 * m + 1, q - 1);
        let zeros = "0".repeat(800);
        let mut below = d.clone().into_bytes();
        let mut i = below.len();
        while i > 0 {
            i -= 1;
            if below[i] > b'0' {
                below[i] -= 1;
                break;
            }
            below[i] = b'9';
        }
        let below = String::from_utf8(below).unwrap();
        vec![
            format!("{d}e{e}"),
            format!("{d}000000001e{}", e - 9),
            format!("{d}{zeros}1e{}", e - 801),
            format!("{d}{zeros}e{}", e - 800),
            format!("{below}999e{}", e - 3),
            format!("0.{}{d}e{}", "0".repeat(30), e + 30 + d.len() as i64),
        ]
    }

    #[test]
    fn midpoints_round_to_even_and_neighbours_away() {
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut edges = vec![0, 1, 2, (1 << 52) - 1, 1 << 52, (1 << 52) + 1];
        edges.extend([
            0x7FEF_FFFF_FFFF_FFFE,
            0x7FEF_FFFF_FFFF_FFFF,
            0x3FF0_0000_0000_0000,
        ]);
        let random = (0..if cfg!(miri) { 2 } else { 300 }).map(|i| match i % 3 {
            0 => next() % 0x7FF0_0000_0000_0000,
            1 => next() >> 12,
            _ => (next() >> 12) | (2000 << 52),
        });
        for bits in edges.into_iter().chain(random) {
            for text in midpoint_cases(bits) {
                let want = text.parse::<f64>().ok().filter(|v| v.is_finite());
                assert_eq!(
                    parse_f64(&text).map(f64::to_bits),
                    want.map(f64::to_bits),
                    "{text}"
                );
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: if cfg!(miri) { 4 } else { 2_000 },
            failure_persistence: None,
            ..Default::default()
        })]

        /// Any JSON number, however many digits and whatever its exponent,
        /// parses exactly as the standard library's correctly rounded parser.
        #[test]
        fn any_number_matches_the_standard_library(
            neg in proptest::bool::ANY,
            int in "0|[1-9][0-9]{0,30}",
            frac in proptest::option::of("[0-9]{1,60}"),
            exp in proptest::option::of((proptest::bool::ANY, 0u32..400)),
        ) {
            let mut text = String::new();
            if neg {
                text.push('-');
            }
            text += &int;
            if let Some(f) = frac {
                text += ".";
                text += &f;
            }
            if let Some((e_neg, e)) = exp {
                text += if e_neg { "e-" } else { "e+" };
                text += &e.to_string();
            }
            let want = text.parse::<f64>().ok().filter(|v| v.is_finite());
            proptest::prop_assert_eq!(parse_f64(&text).map(f64::to_bits), want.map(f64::to_bits), "{}", text);
        }

        /// Every finite double, written with any number of significant
        /// digits, parses back as the standard library parses that text.
        #[test]
        fn written_doubles_match_the_standard_library(
            bits in 0u64..0x7FF0_0000_0000_0000,
            precision in 0usize..40,
        ) {
            let v = f64::from_bits(bits);
            for text in [format!("{v:e}"), format!("{v:.precision$e}"), format!("{v}")] {
                let want = text.parse::<f64>().ok().filter(|v| v.is_finite());
                proptest::prop_assert_eq!(parse_f64(&text).map(f64::to_bits), want.map(f64::to_bits), "{}", text);
            }
        }

        /// Whatever the bytes, the number parser never panics, and accepts
        /// exactly the JSON numbers.
        #[test]
        fn number_parser_never_panics(text in "[-+0-9.eE]{0,40}|\\PC{0,20}") {
            let parsed = parse_f64(&text);
            let syntax = !text.is_empty() && scan_number(text.as_bytes(), 0).ok() == Some(text.len());
            proptest::prop_assert!(parsed.is_none() || syntax, "{}", text);
        }
    }

    #[test]
    fn integers() {
        assert_eq!(parse_i64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64("9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64("9223372036854775808"), None);
        assert_eq!(parse_i64("00"), None);
        assert_eq!(parse_i64("1e3"), Some(1000));
        assert_eq!(parse_i64(""), None);
    }

    #[test]
    fn float_writing() {
        let w = |v: f64| {
            let mut s = String::new();
            write_f64(&mut s, v).then_some(s)
        };
        assert_eq!(w(63.0).as_deref(), Some("63"));
        assert_eq!(w(41.327953).as_deref(), Some("41.327953"));
        assert_eq!(w(1e-7).as_deref(), Some("0.0000001"));
        assert_eq!(w(f64::NAN), None);
        assert_eq!(w(f64::INFINITY), None);
        let r = |v: f64, d: u32| {
            let mut s = String::new();
            write_f64_rounded(&mut s, v, d).then_some(s)
        };
        assert_eq!(r(41.327953, 2).as_deref(), Some("41.33"));
        assert_eq!(r(41.3, 2).as_deref(), Some("41.3"));
        assert_eq!(r(-19.819025, 3).as_deref(), Some("-19.819"));
        assert_eq!(r(-0.004, 2).as_deref(), Some("0"));
        assert_eq!(r(0.05, 2).as_deref(), Some("0.05"));
        assert_eq!(r(-0.5, 0).as_deref(), Some("-1"));
        assert_eq!(r(12.0, 4).as_deref(), Some("12"));
        assert_eq!(r(f64::NAN, 2), None);
        assert_eq!(r(1e300, 2), None);
        assert_eq!(r(1.0, 10), None);
    }

    #[test]
    fn strings_escape_and_unescape() {
        let samples = ["", "plain", "q\"b\\s/", "\u{1}\u{1f}\n\t", "é😀"];
        for s in samples {
            let mut out = String::new();
            write_str(&mut out, s);
            assert!(is_valid(&out), "{out}");
            assert_eq!(unescape(&out[1..out.len() - 1]).as_deref(), Some(s));
        }
        assert_eq!(unescape(r"\x"), None);
        assert_eq!(unescape(r"\u12"), None);
        assert_eq!(unescape(r"\udc00"), None);
        assert_eq!(unescape(r"\/").as_deref(), Some("/"));
    }

    #[test]
    fn fast_skipping_matches_brackets_and_strings() {
        let skip = |s: &str| skip_value_fast(s.as_bytes(), 0).ok();
        assert_eq!(skip(r#"{"a":[1,{"b":"]}\""}],"c":{}} tail"#), Some(29));
        assert_eq!(skip("[[]]"), Some(4));
        assert_eq!(skip("12 "), Some(2));
        for bad in ["{", "{]", "[}", "{\"a\":\"}", "]", "[[[", "tru"] {
            assert_eq!(skip(bad), None, "{bad}");
        }
        // Any depth, as the host reads it; bracket kinds are checked for
        // the outer 64 levels.
        for depth in [31, 32, 33, 64, 500] {
            let ok = "[{\"a\":".repeat(depth) + "0" + &"}]".repeat(depth);
            assert_eq!(skip(&ok), Some(ok.len()), "{depth}");
            let bad = "[{\"a\":".repeat(depth) + "0" + &"}]".repeat(depth - 1) + "]}";
            assert_eq!(skip(&bad), None, "{depth}");
            assert_eq!(skip(&ok[..ok.len() - 1]), None, "{depth}");
        }
    }

    #[test]
    fn validation() {
        for ok in [
            "{}",
            "[]",
            "\"\"",
            "-0.0e+1",
            "[[],{}]",
            " {\"a\" : {\"b\":[null,true,false]}} ",
        ] {
            assert!(is_valid(ok), "{ok}");
        }
        for bad in [
            "",
            "{",
            "{\"a\"}",
            "{\"a\":}",
            "[1,]",
            "{\"a\":1,}",
            "tru",
            "\"\u{1}\"",
            "{a:1}",
            "\"\\q\"",
            "[1 2]",
            "{\"a\":1 \"b\":2}",
            "[}",
            "{]",
            "[,1]",
            "{,}",
            "{\"a\":[1}]}",
            "[1]]",
            "{} {}",
        ] {
            assert!(!is_valid(bad), "{bad}");
        }
        let deep = "[".repeat(MAX_DEPTH + 2) + &"]".repeat(MAX_DEPTH + 2);
        assert!(!is_valid(&deep));
    }

    /// What plugin-guide.md promises about configurations.
    #[test]
    fn config_numbers_and_nulls() {
        let cfg = Config::parse(
            r#"{"int": 41, "exp": 4.1e1, "neg": -2, "frac": 0.5, "null": null, "big": 1e400}"#,
        )
        .unwrap();
        // TOML's integers arrive as JSON integers; f64 takes them.
        assert_eq!(cfg.f64("int").unwrap(), Some(41.0));
        assert_eq!(cfg.f64("exp").unwrap(), Some(41.0));
        assert_eq!(cfg.f64("neg").unwrap(), Some(-2.0));
        assert_eq!(cfg.i64("exp").unwrap(), Some(41));
        assert!(cfg.i64("frac").is_err());
        assert!(cfg.f64("big").is_err());
        // null is absent for every getter, so defaults apply.
        assert_eq!(cfg.f64("null").unwrap(), None);
        assert_eq!(cfg.i64("null").unwrap(), None);
        assert_eq!(cfg.bool("null").unwrap(), None);
        assert_eq!(cfg.str("null").unwrap(), None);
        assert_eq!(cfg.str_list("null").unwrap(), None);
        assert_eq!(cfg.get_raw("null"), Some("null"));
    }

    #[test]
    fn value_and_config() {
        let v = parse(r#"{"a":"x\u00e9","n":18446744073709551615,"l":[1,"2"],"o":{}}"#).unwrap();
        assert_eq!(v.get("a").and_then(Value::as_str), Some("xé"));
        assert_eq!(
            v.get("n"),
            Some(&Value::Number("18446744073709551615".into()))
        );
        assert_eq!(
            v.to_json(),
            r#"{"a":"xé","n":18446744073709551615,"l":[1,"2"],"o":{}}"#
        );
        assert_eq!(
            String::from(parse("{\"a\" 1}").unwrap_err()),
            "invalid JSON at byte 5: expected ':'"
        );

        let cfg = Config::parse(
            r#"{"s":"x","n":1.5,"l":["a",1],"e":"a\nb","z":null,"\u0041":[" x ","\t"]}"#,
        )
        .unwrap();
        assert_eq!(cfg.str("s").unwrap(), Some("x"));
        assert_eq!(cfg.str("e").unwrap(), Some("a\nb"));
        assert_eq!(cfg.str("z").unwrap(), None);
        assert_eq!(
            cfg.str_list("A").unwrap(),
            Some(vec![" x ".to_string(), "\t".to_string()])
        );
        assert_eq!(
            cfg.keys().collect::<Vec<_>>(),
            ["s", "n", "l", "e", "z", "A"]
        );
        assert_eq!(
            cfg.value("l"),
            Some(Value::Array(vec![
                Value::String("a".into()),
                Value::Number("1".into())
            ]))
        );
        assert_eq!(cfg.str("n").unwrap_err(), "config key `n` must be a string");
        assert_eq!(cfg.str("missing").unwrap(), None);
        assert_eq!(cfg.f64("n").unwrap(), Some(1.5));
        assert_eq!(
            cfg.i64("n").unwrap_err(),
            "config key `n` must be an integer"
        );
        assert!(cfg.str_list("l").is_err());
        assert_eq!(
            cfg.deny_unknown(&["s", "n"]).unwrap_err(),
            "unknown config key `l` (expected one of: s, n)"
        );
        assert_eq!(Config::parse("{}").unwrap().str_list("x").unwrap(), None);
        assert_eq!(
            Config::parse(r#"{"x":[]}"#).unwrap().str_list("x").unwrap(),
            Some(vec![])
        );
        assert!(Config::parse(r#"{"x":["a",]}"#).is_err());
        assert!(Config::parse("{} x").is_err());
        assert!(Config::parse("").is_err());
        assert!(Config::parse("[]").is_err());
        assert!(Config::parse("null").unwrap().is_empty());
        assert!(expect_empty_config(" {} ").is_ok());
        assert!(expect_empty_config("{\"a\":1}").is_err());
    }
}
