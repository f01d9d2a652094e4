//! [`Record`]: a lazily parsed, editable view of one record's JSON.

use core::cell::{Cell, UnsafeCell};
use core::fmt;

use crate::json::{self, Member, ObjCursor};

/// How many top-level members a record remembers once found. A record has ten;
/// members past this are still found, by rescanning from the last cached one.
const CACHE: usize = 12;

/// How far [`Record::scan_rest`] got.
enum Full {
    /// Every member is cached; the object ends at this offset.
    Cached(usize),
    /// More members than the cache holds.
    Uncached,
    /// Not a valid object.
    Broken,
}

/// Scan state of the top-level object.
#[derive(Clone, Copy)]
enum Scan {
    NotStarted,
    /// Resume here; every member before the cursor is cached.
    At(ObjCursor),
    /// Not an object, truncated, or otherwise invalid JSON.
    Broken,
}

#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
}

struct Edit {
    /// The key, unescaped, in `Record::edit_text`.
    key: Span,
    /// The new raw JSON value in `Record::edit_text`; `None` removes the key.
    value: Option<Span>,
    /// Set while serializing, so that a duplicated key is written only once.
    written: Cell<bool>,
}

/// Why an edit was refused. The record is left as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditError {
    /// NaN or infinity: JSON cannot represent it.
    NonFinite,
    /// The rounded value would not be exact (more than 15 significant
    /// digits), or more than 9 decimals were asked for.
    OutOfRange,
    /// [`Record::set_raw`] was given text that is not one JSON value.
    InvalidJson,
}

impl fmt::Display for EditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EditError::NonFinite => "value is NaN or infinite",
            EditError::OutOfRange => "value out of range",
            EditError::InvalidJson => "not a JSON value",
        })
    }
}

impl std::error::Error for EditError {}

/// One record: the JSON object of a telemetry stream entry's `payload`.
///
/// Reading is lazy: looking a key up scans the top-level object only as far
/// as that key and remembers every member it passed, so a filter that reads
/// `device_id` (the first key) pays for nothing else, and a second lookup
/// never rescans. Values are parsed only when asked for.
///
/// Edits (`set_*`, [`remove`](Self::remove),
/// [`retain_attributes`](Self::retain_attributes)) are recorded, not
/// applied: reads see them at once, and when the filter returns
/// [`Verdict::Pass`](crate::Verdict::Pass) the SDK writes a new object that
/// splices the edited values into the original text, copying every untouched
/// member byte for byte (attribute values such as `{"__bigint": "…"}`
/// included). New keys are appended at the end.
///
/// Top-level keys, separators and scalar values are checked strictly as
/// they are scanned; nested objects and arrays (the attributes) are skipped
/// by matching their brackets and strings only, since the host validated the
/// record and they are copied verbatim.
///
/// A malformed record never panics: accessors return `None`, and a modified
/// record that cannot be rewritten is dropped (see [`write_json`](Self::write_json)).
///
/// ```
/// use livecast_plugin_sdk::Record;
///
/// let mut r = Record::new(r#"{"device_id":"356307042441013","latitude":41.327953,"speed":63,
///                            "attributes":{"66":12841,"78":{"__bigint":"18446744073709551615"}}}"#);
/// assert_eq!(r.device_id(), Some("356307042441013"));
/// assert_eq!(r.speed(), Some(63.0));
/// r.set_i64("speed", 0);
/// r.retain_attributes(|id, _raw| id == "78");
/// assert_eq!(
///     r.to_json().as_deref(),
///     Some(r#"{"device_id":"356307042441013","latitude":41.327953,"speed":0,"attributes":{"78":{"__bigint":"18446744073709551615"}}}"#)
/// );
/// ```
pub struct Record<'a> {
    src: &'a [u8],
    lazy: LazySlot<'a>,
    edits: Vec<Edit>,
    edit_text: String,
}

/// What lookups learn about a record's bytes. Kept outside [`Record`] so
/// that a `&Record` has no interior mutability: the optimizer then knows a
/// read leaves the edits alone, and drops the rewrite path (about 3 KB of
/// wasm) from filters that never edit. It also lets the runtime reuse one
/// per batch, and share one between a record's audiences.
pub(crate) struct Lazy {
    scan: Cell<Scan>,
    cache: [Cell<Member>; CACHE],
    cached: Cell<u8>,
    /// Decoded strings handed out by `&self` accessors (only for strings that
    /// contain escapes). Raw pointers, not `Box`es: moving a `Box` would
    /// invalidate the references already handed out.
    decoded: UnsafeCell<Vec<*mut str>>,
}

impl Lazy {
    pub(crate) const fn new() -> Self {
        Lazy {
            scan: Cell::new(Scan::NotStarted),
            cache: [const {
                Cell::new(Member {
                    key_start: 0,
                    key_end: 0,
                    key_escaped: false,
                    value_start: 0,
                    value_end: 0,
                })
            }; CACHE],
            cached: Cell::new(0),
            decoded: UnsafeCell::new(Vec::new()),
        }
    }

    /// Forgets everything, for the next record's bytes.
    #[inline]
    pub(crate) fn reset(&mut self) {
        self.scan.set(Scan::NotStarted);
        self.cached.set(0);
        self.free_decoded();
    }

    fn free_decoded(&mut self) {
        for ptr in self.decoded.get_mut().drain(..) {
            // SAFETY: each pointer came from `Box::into_raw` in
            // `Record::keep` and is freed exactly once, here; `&mut self`
            // proves no record (and so no string it handed out) still
            // borrows this state.
            drop(unsafe { Box::from_raw(ptr) });
        }
    }
}

impl Drop for Lazy {
    fn drop(&mut self) {
        self.free_decoded();
    }
}

enum LazySlot<'a> {
    Shared(&'a Lazy),
    Owned(Box<Lazy>),
}

impl<'a> Record<'a> {
    /// A record over JSON text.
    pub fn new(json: &'a str) -> Self {
        Self::from_bytes(json.as_bytes())
    }

    /// A record over bytes that should be UTF-8 JSON (what the host passes).
    /// Nothing is checked until a value is read.
    pub fn from_bytes(bytes: &'a [u8]) -> Self {
        Self::build(bytes, LazySlot::Owned(Box::new(Lazy::new())))
    }

    /// A record whose lookups go to `lazy`, which must be fresh or describe
    /// these same bytes (the runtime reuses one across records and pairs).
    // Always inlined (plain `#[inline]` is not enough at opt-level "s") so
    // that the optimizer sees the record starts without edits.
    #[inline(always)]
    pub(crate) fn with_lazy(bytes: &'a [u8], lazy: &'a Lazy) -> Self {
        Self::build(bytes, LazySlot::Shared(lazy))
    }

    #[inline(always)]
    fn build(src: &'a [u8], lazy: LazySlot<'a>) -> Self {
        let record = Record {
            src,
            lazy,
            edits: Vec::new(),
            edit_text: String::new(),
        };
        // Spans are u32: a larger input cannot be described, so it is broken.
        if u32::try_from(src.len()).is_err() {
            record.lazy().scan.set(Scan::Broken);
        }
        record
    }

    #[inline(always)]
    fn lazy(&self) -> &Lazy {
        match &self.lazy {
            LazySlot::Shared(l) => l,
            LazySlot::Owned(l) => l,
        }
    }

    /// The original bytes, as received (edits not applied).
    pub fn original(&self) -> &'a [u8] {
        self.src
    }

    // -- lookup ------------------------------------------------------------

    /// Where scanning resumes; `None` once the record is known to be broken.
    fn cursor(&self) -> Option<ObjCursor> {
        match self.lazy().scan.get() {
            Scan::Broken => None,
            Scan::At(c) => Some(c),
            Scan::NotStarted => match ObjCursor::open_fast(self.src, json::skip_ws(self.src, 0)) {
                Ok(c) => Some(c),
                Err(_) => {
                    self.lazy().scan.set(Scan::Broken);
                    None
                }
            },
        }
    }

    /// Caches `m`, found by `cur`, if there is room; returns whether it did.
    fn cache_member(&self, m: Member, cur: ObjCursor) -> bool {
        let k = self.lazy().cached.get() as usize;
        match self.lazy().cache.get(k) {
            Some(slot) => {
                slot.set(m);
                self.lazy().cached.set(k as u8 + 1);
                self.lazy().scan.set(Scan::At(cur));
                true
            }
            None => false,
        }
    }

    /// Finds `key` in the original object, scanning only as far as needed.
    fn find(&self, key: &str) -> Option<Member> {
        let b = self.src;
        let n = self.lazy().cached.get() as usize;
        if let Some(m) = self
            .lazy()
            .cache
            .get(..n)
            .unwrap_or_default()
            .iter()
            .map(Cell::get)
            .find(|m| m.key_is(b, key))
        {
            return Some(m);
        }
        let mut cur = self.cursor()?;
        // Past the cache's capacity members are scanned but not remembered,
        // and the persisted cursor stays after the last cached one.
        let mut caching = n < CACHE;
        loop {
            match cur.next_member(b, 1) {
                Ok(Some(m)) => {
                    if caching {
                        caching = self.cache_member(m, cur);
                    }
                    if m.key_is(b, key) {
                        return Some(m);
                    }
                }
                Ok(None) => {
                    if caching {
                        self.lazy().scan.set(Scan::At(cur));
                    }
                    return None;
                }
                Err(_) => {
                    self.lazy().scan.set(Scan::Broken);
                    return None;
                }
            }
        }
    }

    /// Scans the rest of the object into the cache.
    fn scan_rest(&self) -> Full {
        let Some(mut cur) = self.cursor() else {
            return Full::Broken;
        };
        loop {
            if cur.done {
                return Full::Cached(cur.pos);
            }
            match cur.next_member(self.src, 1) {
                Ok(Some(m)) => {
                    if !self.cache_member(m, cur) {
                        return Full::Uncached;
                    }
                }
                Ok(None) => {
                    self.lazy().scan.set(Scan::At(cur));
                    return Full::Cached(cur.pos);
                }
                Err(_) => {
                    self.lazy().scan.set(Scan::Broken);
                    return Full::Broken;
                }
            }
        }
    }

    fn edit(&self, key: &str) -> Option<&Edit> {
        self.edits.iter().find(|e| self.text(e.key) == key)
    }

    fn text(&self, s: Span) -> &str {
        self.edit_text
            .get(s.start as usize..s.end as usize)
            .unwrap_or_default()
    }

    /// Hands out a decoded string for the lifetime of `&self`.
    fn keep(&self, s: String) -> &str {
        let ptr = Box::into_raw(s.into_boxed_str());
        // SAFETY: `decoded` is only touched here and when the `Lazy` is reset
        // or dropped (both need `&mut`, so no record borrows it then); this
        // push cannot overlap another borrow of the Vec (no reentrancy,
        // `Lazy` is not `Sync`). The boxed str is never moved, and freed only
        // after every `&self` it was handed out under has ended.
        unsafe {
            (*self.lazy().decoded.get()).push(ptr);
            &*ptr
        }
    }

    /// The raw JSON text of a top-level value, edits applied: `"356307…"`
    /// with its quotes, `41.327953`, `{"66":12841}`. `None` when the key is
    /// absent (or removed), or the record is malformed before reaching it.
    ///
    /// ```
    /// let r = livecast_plugin_sdk::Record::new(r#"{"a": {"b" : 1}, "c": "x"}"#);
    /// assert_eq!(r.get_raw("a"), Some(r#"{"b" : 1}"#));
    /// assert_eq!(r.get_raw("c"), Some(r#""x""#));
    /// assert_eq!(r.get_raw("d"), None);
    /// ```
    pub fn get_raw(&self, key: &str) -> Option<&str> {
        if let Some(e) = self.edit(key) {
            return e.value.map(|v| self.text(v));
        }
        let m = self.find(key)?;
        core::str::from_utf8(m.value_raw(self.src)).ok()
    }

    /// Whether `key` is present (edits applied).
    pub fn contains_key(&self, key: &str) -> bool {
        self.get_raw(key).is_some()
    }

    /// A string value, decoded. `None` when absent or not a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        let raw = self.get_raw(key)?;
        let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
        if inner.contains('\\') {
            Some(self.keep(json::unescape(inner)?))
        } else {
            Some(inner)
        }
    }

    /// A number. `None` when absent, not a number, or not finite.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        json::parse_f64(self.get_raw(key)?)
    }

    /// An integral number (`11`, also `11.0`). `None` when absent, not a
    /// number, fractional, or out of range.
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        json::parse_i64(self.get_raw(key)?)
    }

    /// A boolean. `None` when absent or not `true`/`false`.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.get_raw(key)? {
            "true" => Some(true),
            "false" => Some(false),
            _ => None,
        }
    }

    /// `device_id`: the tracker's IMEI.
    pub fn device_id(&self) -> Option<&str> {
        self.get_str("device_id")
    }

    /// `timestamp`, as written (RFC 3339, e.g. `2026-05-02T10:15:30.123Z`).
    pub fn timestamp(&self) -> Option<&str> {
        self.get_str("timestamp")
    }

    /// `timestamp` as milliseconds since the Unix epoch, offsets such as
    /// `+02:00` applied: exactly the `ts` the host sends to clients, and
    /// `None` exactly when the host would reject the timestamp (the rules
    /// are at [`parse_rfc3339_ms`](crate::time::parse_rfc3339_ms)).
    ///
    /// ```
    /// let r = livecast_plugin_sdk::Record::new(r#"{"timestamp":"2026-05-02T12:15:30.123+02:00"}"#);
    /// assert_eq!(r.timestamp_ms(), Some(1_777_716_930_123));
    /// ```
    pub fn timestamp_ms(&self) -> Option<i64> {
        crate::time::parse_rfc3339_ms(self.timestamp()?)
    }

    /// `latitude`, degrees: any JSON number (`41.327953`, `41`,
    /// `4.1327953e1`), read exactly as the host reads it, to the same double
    /// (see [`parse_f64`](crate::json::parse_f64)). `None` when absent, not a
    /// number, or too large for a double.
    ///
    /// ```
    /// let r = livecast_plugin_sdk::Record::new(r#"{"latitude": 4.1327953e1}"#);
    /// assert_eq!(r.latitude(), Some(41.327953));
    /// ```
    pub fn latitude(&self) -> Option<f64> {
        self.get_f64("latitude")
    }

    /// `longitude`, degrees; read as [`latitude`](Self::latitude).
    pub fn longitude(&self) -> Option<f64> {
        self.get_f64("longitude")
    }

    /// `altitude`, metres.
    pub fn altitude(&self) -> Option<f64> {
        self.get_f64("altitude")
    }

    /// `angle`: heading in degrees.
    pub fn angle(&self) -> Option<f64> {
        self.get_f64("angle")
    }

    /// `speed`, km/h.
    pub fn speed(&self) -> Option<f64> {
        self.get_f64("speed")
    }

    /// `satellites` in view.
    pub fn satellites(&self) -> Option<i64> {
        self.get_i64("satellites")
    }

    /// `priority` of the record (Teltonika: 0 low, 1 high, 2 panic).
    pub fn priority(&self) -> Option<i64> {
        self.get_i64("priority")
    }

    /// The IO elements in `attributes` (edits applied), as
    /// `(io_id, raw_json_value)` pairs in document order. Values are numbers
    /// or objects such as `{"__bigint":"…"}`; pass them on untouched. Empty
    /// when there are no attributes; stops early if they are malformed.
    ///
    /// ```
    /// let r = livecast_plugin_sdk::Record::new(r#"{"attributes":{"239":1,"385":{"__buffer_b64":"AQID"}}}"#);
    /// let all: Vec<_> = r.attributes().collect();
    /// assert_eq!(all, [("239", "1"), ("385", r#"{"__buffer_b64":"AQID"}"#)]);
    /// ```
    pub fn attributes(&self) -> Attributes<'_> {
        let text = self.get_raw("attributes").unwrap_or_default();
        let b = text.as_bytes();
        let cursor = ObjCursor::open_fast(b, 0).ok();
        Attributes {
            record: self,
            text,
            cursor,
        }
    }

    /// The raw value of one IO element, e.g. `attribute("66")`.
    pub fn attribute(&self, id: &str) -> Option<&str> {
        self.attributes().find(|(k, _)| *k == id).map(|(_, v)| v)
    }

    // -- edits -------------------------------------------------------------

    /// Whether any edit was made. An unmodified record passes as verdict 0
    /// (the host forwards the original bytes); a modified one is rewritten.
    // Always inlined, with `from_bytes`: see there.
    #[inline(always)]
    pub fn is_modified(&self) -> bool {
        !self.edits.is_empty()
    }

    fn put(&mut self, key: &str, value: impl FnOnce(&mut String) -> bool) -> bool {
        let start = self.edit_text.len();
        if !value(&mut self.edit_text) {
            self.edit_text.truncate(start);
            return false;
        }
        let span = Span {
            start: start as u32,
            end: self.edit_text.len() as u32,
        };
        let text = &self.edit_text;
        if let Some(e) = self
            .edits
            .iter_mut()
            .find(|e| text.get(e.key.start as usize..e.key.end as usize) == Some(key))
        {
            e.value = Some(span);
        } else {
            let k = self.edit_text.len() as u32;
            self.edit_text.push_str(key);
            let key = Span {
                start: k,
                end: self.edit_text.len() as u32,
            };
            self.edits.push(Edit {
                key,
                value: Some(span),
                written: Cell::new(false),
            });
        }
        true
    }

    /// Sets `key` to a number, written with Rust's shortest round-trip
    /// formatting. NaN and infinity are refused.
    ///
    /// This links `core::fmt`'s float formatting (about 20 KB of wasm);
    /// [`set_f64_rounded`](Self::set_f64_rounded) and the integer setters do not.
    pub fn set_f64(&mut self, key: &str, v: f64) -> Result<(), EditError> {
        if self.put(key, |out| json::write_f64(out, v)) {
            Ok(())
        } else {
            Err(EditError::NonFinite)
        }
    }

    /// Sets `key` to `v` rounded half away from zero to `decimals` (0 to 9)
    /// decimal places, written exactly (`41.33`).
    ///
    /// ```
    /// let mut r = livecast_plugin_sdk::Record::new(r#"{"latitude":41.327953}"#);
    /// r.set_f64_rounded("latitude", 41.327953, 2)?;
    /// assert_eq!(r.get_raw("latitude"), Some("41.33"));
    /// # Ok::<(), livecast_plugin_sdk::EditError>(())
    /// ```
    pub fn set_f64_rounded(&mut self, key: &str, v: f64, decimals: u32) -> Result<(), EditError> {
        if !v.is_finite() {
            return Err(EditError::NonFinite);
        }
        if self.put(key, |out| json::write_f64_rounded(out, v, decimals)) {
            Ok(())
        } else {
            Err(EditError::OutOfRange)
        }
    }

    /// Sets `key` to an integer.
    pub fn set_i64(&mut self, key: &str, v: i64) {
        self.put(key, |out| {
            json::write_i64(out, v);
            true
        });
    }

    /// Sets `key` to a string (escaped as JSON requires).
    pub fn set_str(&mut self, key: &str, v: &str) {
        self.put(key, |out| {
            json::write_str(out, v);
            true
        });
    }

    /// Sets `key` to a boolean.
    pub fn set_bool(&mut self, key: &str, v: bool) {
        self.put(key, |out| {
            out.push_str(if v { "true" } else { "false" });
            true
        });
    }

    /// Sets `key` to raw JSON text, validated: `set_raw("attributes", "{}")`.
    /// Surrounding whitespace is trimmed.
    ///
    /// ```
    /// use livecast_plugin_sdk::{EditError, Record};
    /// let mut r = Record::new(r#"{"a":1}"#);
    /// assert_eq!(r.set_raw("a", "[1, 2"), Err(EditError::InvalidJson));
    /// r.set_raw("b", r#" {"x": null} "#)?;
    /// assert_eq!(r.to_json().as_deref(), Some(r#"{"a":1,"b":{"x": null}}"#));
    /// # Ok::<(), EditError>(())
    /// ```
    pub fn set_raw(&mut self, key: &str, raw: &str) -> Result<(), EditError> {
        let raw = raw.trim_matches([' ', '\t', '\n', '\r']);
        if !json::is_valid(raw) {
            return Err(EditError::InvalidJson);
        }
        self.put(key, |out| {
            out.push_str(raw);
            true
        });
        Ok(())
    }

    /// Sets `latitude`.
    pub fn set_latitude(&mut self, v: f64) -> Result<(), EditError> {
        self.set_f64("latitude", v)
    }

    /// Sets `longitude`.
    pub fn set_longitude(&mut self, v: f64) -> Result<(), EditError> {
        self.set_f64("longitude", v)
    }

    /// Removes `key`. Returns whether it was present (a no-op otherwise, so
    /// the record stays unmodified).
    pub fn remove(&mut self, key: &str) -> bool {
        let in_original = self.find(key).is_some();
        let text = &self.edit_text;
        let found = self
            .edits
            .iter()
            .position(|e| text.get(e.key.start as usize..e.key.end as usize) == Some(key));
        match found {
            Some(i) => {
                let was_present = self.edits.get(i).is_some_and(|e| e.value.is_some());
                if in_original {
                    if let Some(e) = self.edits.get_mut(i) {
                        e.value = None;
                    }
                } else {
                    // `retain`, not `remove(i)`: no panic path (and its
                    // formatting code) in the wasm module.
                    let mut at = 0;
                    self.edits.retain(|_| {
                        at += 1;
                        at - 1 != i
                    });
                }
                was_present
            }
            None if in_original => {
                let k = self.edit_text.len() as u32;
                self.edit_text.push_str(key);
                let key = Span {
                    start: k,
                    end: self.edit_text.len() as u32,
                };
                self.edits.push(Edit {
                    key,
                    value: None,
                    written: Cell::new(false),
                });
                true
            }
            None => false,
        }
    }

    /// Keeps only the IO elements for which `keep(io_id, raw_value)` is true,
    /// copying the kept ones verbatim. Returns how many were removed; when
    /// none were, the record is not modified.
    ///
    /// ```
    /// let mut r = livecast_plugin_sdk::Record::new(r#"{"attributes":{"239":1,"66":12841,"9":0}}"#);
    /// assert_eq!(r.retain_attributes(|id, _| id != "9"), 1);
    /// assert_eq!(r.get_raw("attributes"), Some(r#"{"239":1,"66":12841}"#));
    /// ```
    pub fn retain_attributes(&mut self, mut keep: impl FnMut(&str, &str) -> bool) -> usize {
        let Some(text) = self.get_raw("attributes") else {
            return 0;
        };
        let b = text.as_bytes();
        let Ok(mut cur) = ObjCursor::open_fast(b, json::skip_ws(b, 0)) else {
            return 0;
        };
        // Built lazily: until the first removal, the kept members are one
        // contiguous run of the original text.
        let mut out: Option<String> = None;
        let mut first_start: Option<usize> = None;
        let mut last_end = 0;
        let mut removed = 0;
        loop {
            let m = match cur.next_member(b, 1) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(_) => return 0,
            };
            let raw_key = core::str::from_utf8(m.key_raw(b)).unwrap_or_default();
            let key = if m.key_escaped {
                json::unescape(raw_key)
            } else {
                None
            };
            let value = core::str::from_utf8(m.value_raw(b)).unwrap_or_default();
            let (start, end) = m.span();
            if keep(key.as_deref().unwrap_or(raw_key), value) {
                match &mut out {
                    Some(o) => {
                        if o.len() > 1 {
                            o.push(',');
                        }
                        o.push_str(text.get(start..end).unwrap_or_default());
                    }
                    None => {
                        first_start.get_or_insert(start);
                        last_end = end;
                    }
                }
            } else {
                removed += 1;
                if out.is_none() {
                    let mut o = String::with_capacity(text.len());
                    o.push('{');
                    if let Some(s) = first_start {
                        o.push_str(text.get(s..last_end).unwrap_or_default());
                    }
                    out = Some(o);
                }
            }
        }
        if let Some(mut o) = out {
            o.push('}');
            self.put("attributes", |t| {
                t.push_str(&o);
                true
            });
        }
        removed
    }

    // -- output ------------------------------------------------------------

    /// Appends the record as it now is: the original bytes when unmodified,
    /// otherwise a new object with the edits spliced in. Returns `false`
    /// (appending nothing) when a modified record cannot be rewritten because
    /// the original is not a valid JSON object.
    pub fn write_json(&self, out: &mut Vec<u8>) -> bool {
        if !self.is_modified() {
            out.extend_from_slice(self.src);
            return true;
        }
        let start = out.len();
        if self.splice(out).is_none() {
            out.truncate(start);
            return false;
        }
        true
    }

    fn splice(&self, out: &mut Vec<u8>) -> Option<()> {
        let b = self.src;
        let end = match self.scan_rest() {
            Full::Broken => return None,
            // The usual case: every member is already known from the lookups
            // the filter made, so the original is not scanned again.
            Full::Cached(end) => {
                let members = self.lazy().cache.get(..self.lazy().cached.get() as usize)?;
                self.splice_members(members.iter().map(|m| Ok(m.get())), out)?;
                end
            }
            Full::Uncached => {
                let mut cur = ObjCursor::open_fast(b, json::skip_ws(b, 0)).ok()?;
                self.splice_members(
                    core::iter::from_fn(|| cur.next_member(b, 1).transpose()),
                    out,
                )?;
                cur.pos
            }
        };
        (json::skip_ws(b, end) == b.len()).then_some(())
    }

    fn splice_members(
        &self,
        members: impl Iterator<Item = Result<Member, json::Error>>,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let b = self.src;
        for e in &self.edits {
            e.written.set(false);
        }
        out.push(b'{');
        let mut first = true;
        let mut sep = |out: &mut Vec<u8>| {
            if !first {
                out.push(b',');
            }
            first = false;
        };
        for m in members {
            let m = m.ok()?;
            let edit = self.edits.iter().find(|e| m.key_is(b, self.text(e.key)));
            match edit {
                None => {
                    sep(out);
                    let (s, e) = m.span();
                    out.extend_from_slice(b.get(s..e)?);
                }
                Some(e) if e.written.get() => {}
                Some(e) => {
                    e.written.set(true);
                    if let Some(v) = e.value {
                        sep(out);
                        out.push(b'"');
                        out.extend_from_slice(m.key_raw(b));
                        out.extend_from_slice(b"\":");
                        out.extend_from_slice(self.text(v).as_bytes());
                    }
                }
            }
        }
        let mut key = String::new();
        for e in self.edits.iter().filter(|e| !e.written.get()) {
            if let Some(v) = e.value {
                sep(out);
                key.clear();
                json::write_str(&mut key, self.text(e.key));
                out.extend_from_slice(key.as_bytes());
                out.push(b':');
                out.extend_from_slice(self.text(v).as_bytes());
            }
        }
        out.push(b'}');
        Some(())
    }

    /// The record as it now is, as a `String`. `None` when it is modified but
    /// the original is not a valid JSON object, or not UTF-8.
    pub fn to_json(&self) -> Option<String> {
        let mut out = Vec::new();
        if !self.write_json(&mut out) {
            return None;
        }
        String::from_utf8(out).ok()
    }
}

impl fmt::Debug for Record<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("json", &String::from_utf8_lossy(self.src))
            .field("modified", &self.is_modified())
            .finish()
    }
}

/// Iterator over a record's IO elements; see [`Record::attributes`].
pub struct Attributes<'r> {
    record: &'r Record<'r>,
    text: &'r str,
    cursor: Option<ObjCursor>,
}

impl<'r> Iterator for Attributes<'r> {
    type Item = (&'r str, &'r str);

    fn next(&mut self) -> Option<Self::Item> {
        let cur = self.cursor.as_mut()?;
        let b = self.text.as_bytes();
        let m = match cur.next_member(b, 1) {
            Ok(Some(m)) => m,
            _ => {
                self.cursor = None;
                return None;
            }
        };
        let raw_key = self.text.get(m.key_start as usize..m.key_end as usize)?;
        let key = if m.key_escaped {
            self.record.keep(json::unescape(raw_key)?)
        } else {
            raw_key
        };
        let value = self
            .text
            .get(m.value_start as usize..m.value_end as usize)?;
        Some((key, value))
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
    fn reads_every_field() {
        let r = Record::new(SAMPLE);
        assert_eq!(r.device_id(), Some("356307042441013"));
        assert_eq!(r.timestamp(), Some("2026-05-02T10:15:30.123Z"));
        assert_eq!(r.timestamp_ms(), Some(1_777_716_930_123));
        assert_eq!(r.latitude(), Some(41.327953));
        assert_eq!(r.longitude(), Some(19.819025));
        assert_eq!(r.altitude(), Some(112.0));
        assert_eq!(r.angle(), Some(271.0));
        assert_eq!(r.speed(), Some(63.0));
        assert_eq!(r.satellites(), Some(11));
        assert_eq!(r.priority(), Some(0));
        assert_eq!(
            r.attribute("78"),
            Some(r#"{"__bigint": "18446744073709551615"}"#)
        );
        assert_eq!(r.attributes().count(), 4);
        assert!(!r.is_modified());
        assert_eq!(r.to_json().as_deref(), Some(SAMPLE));
    }

    /// Coordinates in any JSON number syntax read as the same double.
    #[test]
    fn coordinates_read_exponents_and_integers() {
        for text in [
            "41.327953",
            "4.1327953e1",
            "4.1327953E+1",
            "413279.53e-4",
            "41327953e-6",
        ] {
            let r =
                Record::new(&format!(r#"{{"latitude": {text}, "longitude": {text}}}"#)).latitude();
            assert_eq!(r, Some(41.327953), "{text}");
        }
        let r = Record::new(r#"{"latitude": 41, "longitude": -0}"#);
        assert_eq!(r.latitude(), Some(41.0));
        assert_eq!(r.longitude().map(f64::to_bits), Some((-0.0f64).to_bits()));
        let r = Record::new(r#"{"latitude": "41.3", "longitude": 1e400}"#);
        assert_eq!((r.latitude(), r.longitude()), (None, None));
    }

    #[test]
    fn lookups_are_lazy_and_cached() {
        // Everything after `device_id` is garbage: reading the first key must
        // not look at it.
        let r = Record::new(r#"{"device_id":"1", "latitude": oops"#);
        assert_eq!(r.device_id(), Some("1"));
        assert_eq!(r.lazy().cached.get(), 1);
        assert_eq!(r.latitude(), None);
        assert_eq!(r.device_id(), Some("1"));

        let r = Record::new(SAMPLE);
        assert_eq!(r.speed(), Some(63.0));
        assert_eq!(r.lazy().cached.get(), 7);
        assert_eq!(r.device_id(), Some("356307042441013"));
        assert_eq!(r.lazy().cached.get(), 7);
    }

    #[test]
    fn more_members_than_the_cache() {
        let mut json = String::from("{");
        for i in 0..40 {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&format!("\"k{i}\":{i}"));
        }
        json.push('}');
        let r = Record::new(&json);
        assert_eq!(r.get_i64("k30"), Some(30));
        assert_eq!(r.get_i64("k20"), Some(20));
        assert_eq!(r.get_i64("k39"), Some(39));
        assert_eq!(r.get_i64("k3"), Some(3));
        assert_eq!(r.get_i64("k40"), None);
        assert_eq!(r.get_i64("k25"), Some(25));
    }

    #[test]
    fn escaped_keys_and_strings() {
        let r = Record::new(r#"{"device\u005fid":"a\"b\u00e9","attributes":{"\u0036\u0036":5}}"#);
        assert_eq!(r.device_id(), Some("a\"bé"));
        assert_eq!(r.attribute("66"), Some("5"));
        let mut r = Record::new(r#"{"device\u005fid":"x","n":1}"#);
        r.set_str("device_id", "new\n");
        assert_eq!(
            r.to_json().as_deref(),
            Some(r#"{"device\u005fid":"new\n","n":1}"#)
        );
    }

    #[test]
    fn malformed_records_never_panic() {
        for bad in [
            "",
            "[]",
            "{",
            "{\"a\":1",
            "{\"a\" 1}",
            "nul",
            "{\"a\":1} x",
            "\u{0}",
        ] {
            let mut r = Record::new(bad);
            let _ = (
                r.device_id(),
                r.latitude(),
                r.get_str("a"),
                r.attributes().count(),
                r.timestamp_ms(),
            );
            assert_eq!(
                r.to_json().as_deref(),
                Some(bad),
                "unmodified passes through"
            );
            r.set_i64("speed", 1);
            let _ = r.retain_attributes(|_, _| false);
            assert_eq!(r.to_json(), None, "{bad}");
        }
        let r = Record::from_bytes(b"{\"device_id\":\"\xff\"}");
        assert_eq!(r.device_id(), None);
        // A lone surrogate is valid JSON syntax but not a string Rust can hold.
        let r = Record::new(r#"{"device_id":"\ud800"}"#);
        assert_eq!(r.device_id(), None);
        assert!(r.get_raw("device_id").is_some());
    }

    #[test]
    fn edits_splice_into_the_original() {
        let mut r = Record::new(SAMPLE);
        r.set_latitude(41.5).unwrap();
        r.set_i64("speed", 99);
        r.set_str("note", "hi");
        assert!(r.remove("priority"));
        assert!(!r.remove("missing"));
        assert_eq!(r.latitude(), Some(41.5));
        assert_eq!(r.priority(), None);
        assert_eq!(r.get_str("note"), Some("hi"));
        let out = r.to_json().unwrap();
        assert!(json::is_valid(&out), "{out}");
        assert_eq!(
            out,
            r#"{"device_id": "356307042441013","timestamp": "2026-05-02T10:15:30.123Z","latitude":41.5,"longitude": 19.819025,"altitude": 112,"angle": 271,"speed":99,"satellites": 11,"attributes": {"239": 1, "66": 12841,
                "78": {"__bigint": "18446744073709551615"},
                "385": {"__buffer_b64": "AQID"}},"note":"hi"}"#
        );
    }

    #[test]
    fn edits_overwrite_and_remove() {
        let mut r = Record::new(r#"{"a":1,"b":2}"#);
        r.set_i64("a", 5);
        r.set_i64("a", 6);
        assert_eq!(r.get_i64("a"), Some(6));
        r.set_i64("c", 3);
        assert!(r.remove("c"));
        assert!(!r.remove("c"));
        assert!(r.remove("b"));
        assert_eq!(r.to_json().as_deref(), Some(r#"{"a":6}"#));
        r.set_i64("b", 7);
        assert_eq!(r.to_json().as_deref(), Some(r#"{"a":6,"b":7}"#));
        assert_eq!(r.set_f64("a", f64::NAN), Err(EditError::NonFinite));
        assert_eq!(
            r.set_f64_rounded("a", f64::INFINITY, 2),
            Err(EditError::NonFinite)
        );
        assert_eq!(r.get_i64("a"), Some(6));

        let mut r = Record::new(r#"{"a":1}"#);
        r.set_i64("c", 3);
        assert!(r.remove("c"));
        assert!(!r.is_modified());
    }

    #[test]
    fn a_shared_lazy_state_serves_later_records_over_the_same_bytes() {
        let mut lazy = Lazy::new();
        {
            let mut r = Record::with_lazy(SAMPLE.as_bytes(), &lazy);
            assert_eq!(r.speed(), Some(63.0));
            r.set_i64("speed", 1);
        }
        let r = Record::with_lazy(SAMPLE.as_bytes(), &lazy);
        assert_eq!(r.lazy().cached.get(), 7);
        assert!(!r.is_modified());
        assert_eq!(r.speed(), Some(63.0));
        assert_eq!(r.to_json().as_deref(), Some(SAMPLE));
        drop(r);
        lazy.reset();
        let other = r#"{"speed":5,"device\u005fid":"a\"b"}"#;
        let r = Record::with_lazy(other.as_bytes(), &lazy);
        assert_eq!(r.speed(), Some(5.0));
        assert_eq!(r.device_id(), Some("a\"b"));
    }

    #[test]
    fn duplicate_keys_are_written_once() {
        let mut r = Record::new(r#"{"a":1,"a":2,"b":3}"#);
        assert_eq!(r.get_i64("a"), Some(1));
        r.set_i64("a", 9);
        assert_eq!(r.to_json().as_deref(), Some(r#"{"a":9,"b":3}"#));
    }

    #[test]
    fn retain_attributes_copies_verbatim() {
        let mut r = Record::new(SAMPLE);
        assert_eq!(r.retain_attributes(|_, _| true), 0);
        assert!(!r.is_modified());
        assert_eq!(r.retain_attributes(|k, _| k == "66" || k == "385"), 2);
        assert_eq!(
            r.get_raw("attributes"),
            Some(r#"{"66": 12841,"385": {"__buffer_b64": "AQID"}}"#)
        );
        assert_eq!(r.retain_attributes(|k, _| k != "66"), 1);
        assert_eq!(
            r.get_raw("attributes"),
            Some(r#"{"385": {"__buffer_b64": "AQID"}}"#)
        );
        assert_eq!(r.retain_attributes(|_, _| false), 1);
        assert_eq!(r.get_raw("attributes"), Some("{}"));
        assert!(json::is_valid(&r.to_json().unwrap()));

        let mut r = Record::new(r#"{"attributes":{"1":1,"2":2,"3":3}}"#);
        assert_eq!(r.retain_attributes(|k, _| k != "1"), 1);
        assert_eq!(r.get_raw("attributes"), Some(r#"{"2":2,"3":3}"#));
        let mut r = Record::new(r#"{"attributes":{}}"#);
        assert_eq!(r.retain_attributes(|_, _| false), 0);
        let mut r = Record::new(r#"{"attributes":5}"#);
        assert_eq!(r.retain_attributes(|_, _| false), 0);
    }
}
