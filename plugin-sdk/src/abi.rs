//! The binary ABI (`docs/plugin-abi.md`, version 1), in safe pieces.
//!
//! [`export_plugin!`](crate::export_plugin) wires these to the wasm exports
//! for you. They are public for plugins that must bypass the
//! [`Plugin`](crate::Plugin) trait, such as a test stub that deliberately
//! returns malformed output, and they compile natively so that the
//! [`testing`](crate::testing) harness runs a plugin through exactly the
//! code the host calls.
//!
//! Such a plugin writes its own exports and keeps its state where they can
//! reach it, in a `thread_local!` (a plain static on wasm, which has no
//! threads) behind a `RefCell`, as the SDK's own exports do:
//!
//! ```
//! use std::cell::RefCell;
//! use livecast_plugin_sdk::abi::Region;
//!
//! thread_local! {
//!     static REGION: RefCell<Region> = const { RefCell::new(Region::new()) };
//! }
//!
//! #[cfg_attr(target_arch = "wasm32", unsafe(no_mangle))]
//! extern "C" fn livecast_reserve(size: i32) -> i32 {
//!     // `try_borrow_mut` fails only if an export were re-entered; answer
//!     // 0 (failure) then rather than panic.
//!     REGION
//!         .with(|r| r.try_borrow_mut().ok()?.reserve(size as u32 as usize))
//!         .map_or(0, |p| p as i32)
//! }
//! # livecast_reserve(100);
//! ```

use crate::{Audience, Record, Verdict, log};

/// Verdict 0: the item goes on unchanged.
pub const PASS: u32 = 0;
/// Verdict 1: the item goes no further.
pub const DROP: u32 = 1;
/// Verdict 2: the item goes on as the replacement bytes.
pub const REPLACE: u32 = 2;

fn read_u32(input: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = input.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_le_bytes(b))
}

/// Entry `i` of a table of `width`-byte rows starting at `table`, bounds checked.
fn row(input: &[u8], table: usize, width: usize, i: usize) -> Option<&[u8]> {
    let at = table.checked_add(i.checked_mul(width)?)?;
    input.get(at..at.checked_add(width)?)
}

/// Word `k` of a row; rows come from `row`, so it is always in bounds.
fn word(row: &[u8], k: usize) -> u32 {
    read_u32(row, k * 4).unwrap_or(0)
}

/// `u32 n` then `n × {u32 off, u32 len}`, offsets relative to the input.
#[derive(Debug, Clone, Copy)]
pub struct RecordTable<'a> {
    input: &'a [u8],
    table: usize,
    len: usize,
}

impl<'a> RecordTable<'a> {
    /// Reads the table whose count is at `at`; also returns the offset just
    /// past it. `None` when the table does not fit in the input.
    pub fn parse(input: &'a [u8], at: usize) -> Option<(Self, usize)> {
        let len = read_u32(input, at)? as usize;
        let table = at + 4;
        let end = table.checked_add(len.checked_mul(8)?)?;
        (end <= input.len()).then_some((RecordTable { input, table, len }, end))
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes of record `i`; `None` when its offset or length points
    /// outside the input.
    pub fn get(&self, i: usize) -> Option<&'a [u8]> {
        if i >= self.len {
            return None;
        }
        let r = row(self.input, self.table, 8, i)?;
        let (off, len) = (word(r, 0) as usize, word(r, 1) as usize);
        self.input.get(off..off.checked_add(len)?)
    }
}

/// The `deliver_batch` input: records, audiences, and (record, audience) pairs.
#[derive(Debug, Clone, Copy)]
pub struct DeliverInput<'a> {
    input: &'a [u8],
    /// The records.
    pub records: RecordTable<'a>,
    audiences: usize,
    n_audiences: usize,
    pairs: usize,
    n_pairs: usize,
}

impl<'a> DeliverInput<'a> {
    /// Reads the three tables; `None` when one does not fit in the input.
    pub fn parse(input: &'a [u8]) -> Option<Self> {
        let (records, at) = RecordTable::parse(input, 0)?;
        let n_audiences = read_u32(input, at)? as usize;
        let audiences = at + 4;
        let at = audiences.checked_add(n_audiences.checked_mul(24)?)?;
        let n_pairs = read_u32(input, at)? as usize;
        let pairs = at + 4;
        if pairs.checked_add(n_pairs.checked_mul(8)?)? > input.len() {
            return None;
        }
        Some(DeliverInput {
            input,
            records,
            audiences,
            n_audiences,
            pairs,
            n_pairs,
        })
    }

    /// Number of audiences.
    pub fn audience_count(&self) -> usize {
        self.n_audiences
    }

    /// Audience `i`; `None` when a field is out of bounds or not UTF-8.
    pub fn audience(&self, i: usize) -> Option<Audience<'a>> {
        if i >= self.n_audiences {
            return None;
        }
        let r = row(self.input, self.audiences, 24, i)?;
        let field = |k: usize| -> Option<&'a str> {
            let (off, len) = (word(r, 2 * k) as usize, word(r, 2 * k + 1) as usize);
            core::str::from_utf8(self.input.get(off..off.checked_add(len)?)?).ok()
        };
        Some(Audience::new(field(0)?, field(1)?, field(2)?))
    }

    /// Number of pairs (and of output entries).
    pub fn pair_count(&self) -> usize {
        self.n_pairs
    }

    /// Pair `i` as (record index, audience index), unchecked against the tables.
    pub fn pair(&self, i: usize) -> Option<(usize, usize)> {
        if i >= self.n_pairs {
            return None;
        }
        let r = row(self.input, self.pairs, 8, i)?;
        Some((word(r, 0) as usize, word(r, 1) as usize))
    }
}

/// The guest-owned input region handed out by `livecast_reserve`.
#[derive(Debug, Default)]
pub struct Region {
    buf: Vec<u8>,
}

impl Region {
    /// An empty region.
    pub const fn new() -> Self {
        Region { buf: Vec::new() }
    }

    /// Makes the region at least `size` bytes and returns its address, or
    /// `None` when memory runs out. The address stays the same until a larger
    /// size is asked for, as the ABI requires.
    pub fn reserve(&mut self, size: usize) -> Option<usize> {
        if size > self.buf.len() || self.buf.is_empty() {
            // Round small sizes up so that a slowly growing batch does not
            // cost a reserve call each time; large ones stay exact so that
            // they fit under the memory cap.
            let want = if size <= 1 << 20 {
                size.max(1024).next_power_of_two()
            } else {
                size
            };
            // Free first: the old contents are dead, and the peak matters
            // under a 16 MiB cap.
            self.buf = Vec::new();
            self.buf.try_reserve_exact(want).ok()?;
            self.buf.resize(want, 0);
        }
        Some(self.buf.as_ptr() as usize)
    }

    /// The bytes at `ptr .. ptr + len`, if they lie inside the region.
    pub fn slice(&self, ptr: usize, len: usize) -> Option<&[u8]> {
        let off = ptr.checked_sub(self.buf.as_ptr() as usize)?;
        self.buf.get(off..off.checked_add(len)?)
    }

    /// The whole region, for writing a batch into it (the harness does).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

/// An output table plus the replacement bytes it points to. Both buffers are
/// reused from call to call, so a steady stream of batches allocates nothing.
#[derive(Debug, Default)]
pub struct Output {
    table: Vec<u32>,
    repl: Vec<u8>,
    finished: bool,
}

impl Output {
    /// An empty output.
    pub const fn new() -> Self {
        Output {
            table: Vec::new(),
            repl: Vec::new(),
            finished: false,
        }
    }

    /// Starts an output of `n` entries (invalidating the previous one).
    pub fn begin(&mut self, n: usize) {
        self.table.clear();
        self.repl.clear();
        self.finished = false;
        self.table.reserve(1 + 3 * n);
        self.table.push(n as u32);
    }

    /// Appends a raw entry. For [`REPLACE`], `ptr` is an offset into the
    /// replacement buffer until [`finish`](Self::finish).
    pub fn push(&mut self, verdict: u32, ptr: u32, len: u32) {
        self.table.extend_from_slice(&[verdict, ptr, len]);
    }

    /// Appends a replacement produced by `write`, or nothing (returning
    /// `false`) when `write` returns `false`.
    pub fn push_replacement(&mut self, write: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        let start = self.repl.len();
        if !write(&mut self.repl) {
            self.repl.truncate(start);
            return false;
        }
        self.push(REPLACE, start as u32, (self.repl.len() - start) as u32);
        true
    }

    /// Appends the entry for a record the plugin judged.
    // Inlined so that, for a filter that provably never edits (passthrough),
    // the rewrite path folds away.
    #[inline(always)]
    pub fn push_verdict(&mut self, verdict: Verdict, record: &Record<'_>) {
        match verdict {
            Verdict::Drop => self.push(DROP, 0, 0),
            Verdict::Pass if !record.is_modified() => self.push(PASS, 0, 0),
            Verdict::Pass => {
                if !self.push_replacement(|buf| record.write_json(buf)) {
                    // The filter wanted this record changed; forwarding the
                    // original would contradict it (it may have been hiding
                    // something), so fail closed.
                    log::warn("modified record is not a valid JSON object; dropped");
                    self.push(DROP, 0, 0);
                }
            }
        }
    }

    /// Turns replacement offsets into absolute pointers (on wasm; natively
    /// they stay offsets) and returns the table's address.
    pub fn finish(&mut self) -> usize {
        if !self.finished {
            let base = Self::base(&self.repl);
            for e in self
                .table
                .get_mut(1..)
                .unwrap_or_default()
                .chunks_exact_mut(3)
            {
                if let [REPLACE, ptr, _] = e {
                    *ptr = ptr.wrapping_add(base);
                }
            }
            self.finished = true;
        }
        self.table.as_ptr() as usize
    }

    fn base(repl: &[u8]) -> u32 {
        if cfg!(target_arch = "wasm32") {
            repl.as_ptr() as usize as u32
        } else {
            0
        }
    }

    /// The raw table: `n`, then `verdict, ptr, len` per entry.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// Entry `i` as (verdict, replacement bytes); the bytes are empty unless
    /// the verdict is [`REPLACE`].
    pub fn entry(&self, i: usize) -> Option<(u32, &[u8])> {
        let &[verdict, ptr, len] = self.table.get(1 + 3 * i..4 + 3 * i)? else {
            return None;
        };
        if verdict != REPLACE {
            return Some((verdict, &[]));
        }
        let base = if self.finished {
            Self::base(&self.repl)
        } else {
            0
        };
        let off = ptr.wrapping_sub(base) as usize;
        Some((verdict, self.repl.get(off..off.checked_add(len as usize)?)?))
    }
}

/// Builds a `filter_batch` input (the harness and tests use it).
pub fn encode_filter_batch(records: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    let data = 4 + 8 * records.len();
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    let mut off = data;
    for r in records {
        out.extend_from_slice(&(off as u32).to_le_bytes());
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        off += r.len();
    }
    for r in records {
        out.extend_from_slice(r);
    }
    out
}

/// Builds a `deliver_batch` input (the harness and tests use it).
pub fn encode_deliver_batch(
    records: &[&[u8]],
    audiences: &[Audience<'_>],
    pairs: &[(u32, u32)],
) -> Vec<u8> {
    let head = 4 + 8 * records.len() + 4 + 24 * audiences.len() + 4 + 8 * pairs.len();
    let mut data: Vec<u8> = Vec::new();
    let mut put = |bytes: &[u8]| -> [u32; 2] {
        let off = (head + data.len()) as u32;
        data.extend_from_slice(bytes);
        [off, bytes.len() as u32]
    };
    let mut words: Vec<u32> = vec![records.len() as u32];
    for r in records {
        words.extend(put(r));
    }
    words.push(audiences.len() as u32);
    for a in audiences {
        words.extend(put(a.topic().as_bytes()));
        words.extend(put(a.role().as_bytes()));
        words.extend(put(a.user_id().as_bytes()));
    }
    words.push(pairs.len() as u32);
    for &(r, a) in pairs {
        words.extend([r, a]);
    }
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_keeps_its_address_until_it_grows() {
        let mut r = Region::new();
        let a = r.reserve(10).unwrap();
        assert_eq!(r.reserve(1000), Some(a));
        let b = r.reserve(5000).unwrap();
        assert!(r.slice(b, 5000).is_some());
        assert!(r.slice(b, 10_000).is_none());
        // Miri stops at an allocation this large instead of refusing it.
        if !cfg!(miri) {
            assert!(r.reserve(usize::MAX / 2).is_none());
        }
    }
}
