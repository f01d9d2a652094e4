//! The plugins' global allocator on single-threaded wasm (feature
//! `allocator`, on by default): the shipped plugins are several KB smaller
//! with it than with the standard library's dlmalloc, a large share of a
//! small plugin.
//!
//! It stays, rather than a crate, on measurement (the commit that kept it
//! has the numbers): talc and lol_alloc made the shipped plugins a little
//! smaller, but executed a few percent more wasm instructions per record in
//! a plugin that rewrites every record, talc brings three crates, and the
//! chain benchmark could not tell them apart on a shared two-core machine.
//!
//! - Requests up to 64 KiB are rounded up to a power of two and served from
//!   one free list per size; blocks are aligned to their size, so a recycled
//!   block suits any layout of its class.
//! - Larger requests take whole 64 KiB pages from an address-ordered free
//!   list (first fit, split, coalesced on free), so the input region can grow
//!   to most of the memory cap without power-of-two waste.
//! - Fresh memory comes from `memory.grow`; it is never returned (wasm cannot
//!   shrink memory).
//!
//! A plugin's allocation pattern is simple (the SDK reuses its buffers; the
//! rest is small per-record scratch and per-device state), which is what
//! makes segregated power-of-two lists good enough.
//!
//! The logic is written against [`Memory`] so that it is unit-tested natively
//! on a fake linear memory, against a model with proptest, and under Miri,
//! which checks every access for undefined behaviour (the tests shrink under
//! `cfg(miri)`; nightly only, so a manual check, not a CI step):
//!
//! ```sh
//! rustup +nightly component add miri
//! MIRIFLAGS=-Zmiri-strict-provenance cargo +nightly miri test -p livecast-plugin-sdk --lib heap
//! ```

use core::ptr;

/// WebAssembly page size.
pub(crate) const PAGE: usize = 65_536;
const MIN_SHIFT: u32 = 3;
const MAX_SMALL_SHIFT: u32 = 16;

/// A linear memory that grows by pages.
pub(crate) trait Memory {
    /// Current size in pages.
    fn pages(&self) -> usize;
    /// Grows by `delta` pages; `false` when refused.
    fn grow(&mut self, delta: usize) -> bool;
    /// The pointer for address `addr`.
    fn ptr(&self, addr: usize) -> *mut u8;
    /// The address of `p`.
    fn addr(&self, p: *mut u8) -> usize;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    /// Block of `1 << shift` bytes.
    Small(u32),
    /// Block of this many bytes, a multiple of [`PAGE`].
    Large(usize),
}

fn class(size: usize, align: usize) -> Option<Class> {
    if align > PAGE {
        return None;
    }
    let n = size.max(align).max(1 << MIN_SHIFT);
    if n <= 1 << MAX_SMALL_SHIFT {
        Some(Class::Small(usize::BITS - (n - 1).leading_zeros()))
    } else {
        Some(Class::Large(n.checked_next_multiple_of(PAGE)?))
    }
}

/// The allocator state. Address 0 means "none" (no block lives there: the
/// module's data sits at the bottom of memory).
pub(crate) struct Heap<M> {
    mem: M,
    small: [usize; MAX_SMALL_SHIFT as usize + 1],
    /// Free large blocks, by address: each holds `[next, size]`.
    large: usize,
    bump: usize,
    end: usize,
}

impl<M: Memory> Heap<M> {
    pub const fn new(mem: M) -> Self {
        Heap {
            mem,
            small: [0; MAX_SMALL_SHIFT as usize + 1],
            large: 0,
            bump: 0,
            end: 0,
        }
    }

    // SAFETY (all three): `addr` is a free block this heap owns, at least
    // two words long and word-aligned.
    unsafe fn get(&self, addr: usize, word: usize) -> usize {
        unsafe {
            ptr::read(
                self.mem
                    .ptr(addr + word * size_of::<usize>())
                    .cast::<usize>(),
            )
        }
    }

    unsafe fn set(&mut self, addr: usize, word: usize, v: usize) {
        unsafe {
            ptr::write(
                self.mem
                    .ptr(addr + word * size_of::<usize>())
                    .cast::<usize>(),
                v,
            )
        }
    }

    /// Carves fresh memory. Returns 0 when memory cannot grow.
    fn bump(&mut self, size: usize, align: usize) -> usize {
        let top = self.mem.pages().checked_mul(PAGE);
        if self.end == 0 || top != Some(self.end) {
            // First use, or memory grew behind our back: start at its end.
            let Some(top) = top else { return 0 };
            self.bump = top;
            self.end = top;
        }
        let Some(start) = self.bump.checked_next_multiple_of(align) else {
            return 0;
        };
        let Some(stop) = start.checked_add(size) else {
            return 0;
        };
        if stop > self.end {
            let pages = (stop - self.end).div_ceil(PAGE);
            if !self.mem.grow(pages) {
                return 0;
            }
            self.end += pages * PAGE;
        }
        self.bump = stop;
        start
    }

    /// Moves the top of the heap up to `stop`, growing memory as needed.
    fn extend_top(&mut self, stop: usize) -> bool {
        if self.mem.pages().checked_mul(PAGE) != Some(self.end) {
            return false;
        }
        if stop > self.end {
            let pages = (stop - self.end).div_ceil(PAGE);
            if !self.mem.grow(pages) {
                return false;
            }
            self.end += pages * PAGE;
        }
        self.bump = stop;
        true
    }

    pub fn alloc(&mut self, size: usize, align: usize) -> *mut u8 {
        let addr = match class(size, align) {
            None => 0,
            Some(Class::Small(shift)) => {
                let head = self.small.get(shift as usize).copied().unwrap_or(0);
                if head != 0 {
                    // SAFETY: `head` is a free small block.
                    let next = unsafe { self.get(head, 0) };
                    if let Some(slot) = self.small.get_mut(shift as usize) {
                        *slot = next;
                    }
                    head
                } else {
                    self.bump(1 << shift, 1 << shift)
                }
            }
            Some(Class::Large(bytes)) => match self.take_large(bytes) {
                0 => self.bump(bytes, PAGE),
                a => a,
            },
        };
        if addr == 0 {
            ptr::null_mut()
        } else {
            self.mem.ptr(addr)
        }
    }

    /// First fit from the large free list, splitting off what is not needed.
    fn take_large(&mut self, bytes: usize) -> usize {
        let (mut prev, mut cur) = (0, self.large);
        while cur != 0 {
            // SAFETY: list nodes are free large blocks.
            let (next, size) = unsafe { (self.get(cur, 0), self.get(cur, 1)) };
            if size >= bytes {
                let replacement = if size > bytes {
                    let rest = cur + bytes;
                    // SAFETY: the tail is part of the same free block and at
                    // least a page long.
                    unsafe {
                        self.set(rest, 0, next);
                        self.set(rest, 1, size - bytes);
                    }
                    rest
                } else {
                    next
                };
                if prev == 0 {
                    self.large = replacement;
                } else {
                    // SAFETY: `prev` is a list node.
                    unsafe { self.set(prev, 0, replacement) };
                }
                return cur;
            }
            (prev, cur) = (cur, next);
        }
        0
    }

    /// # Safety
    /// `p` came from `alloc`/`realloc` of this heap with this size and align.
    pub unsafe fn dealloc(&mut self, p: *mut u8, size: usize, align: usize) {
        let addr = self.mem.addr(p);
        match class(size, align) {
            None => {}
            Some(Class::Small(shift)) => {
                // `get_mut` rather than indexing: no panic path in the module.
                if let Some(&head) = self.small.get(shift as usize) {
                    // SAFETY: the caller gave the block back; it is ours to link.
                    unsafe { self.set(addr, 0, head) };
                    if let Some(slot) = self.small.get_mut(shift as usize) {
                        *slot = addr;
                    }
                }
            }
            // SAFETY: as above.
            Some(Class::Large(bytes)) => unsafe { self.free_large(addr, bytes) },
        }
    }

    /// Inserts a block into the address-ordered list, merging neighbours.
    unsafe fn free_large(&mut self, addr: usize, bytes: usize) {
        let (mut prev, mut cur) = (0, self.large);
        while cur != 0 && cur < addr {
            // SAFETY: list node.
            (prev, cur) = (cur, unsafe { self.get(cur, 0) });
        }
        let (mut node, mut size, mut next) = (addr, bytes, cur);
        // SAFETY (block): every address touched is a list node or the block
        // being freed.
        unsafe {
            if next != 0 && addr + bytes == next {
                size += self.get(next, 1);
                next = self.get(next, 0);
            }
            if prev != 0 && prev + self.get(prev, 1) == addr {
                node = prev;
                size += self.get(prev, 1);
            }
            self.set(node, 0, next);
            self.set(node, 1, size);
            if node != prev {
                if prev == 0 {
                    self.large = node;
                } else {
                    self.set(prev, 0, node);
                }
            }
        }
    }

    /// # Safety
    /// As [`dealloc`](Self::dealloc) for `p`, `size` and `align`.
    pub unsafe fn realloc(
        &mut self,
        p: *mut u8,
        size: usize,
        align: usize,
        new_size: usize,
    ) -> *mut u8 {
        let (old, new) = (class(size, align), class(new_size, align));
        if old == new {
            return p;
        }
        if let (Some(Class::Large(a)), Some(Class::Large(b))) = (old, new) {
            let addr = self.mem.addr(p);
            if b < a {
                // SAFETY: the tail beyond `b` is part of the block being shrunk.
                unsafe { self.free_large(addr + b, a - b) };
                return p;
            }
            // A growing buffer is usually the last block carved: extend it in
            // place. Copying instead would strand the old block, too small for
            // the next doubling, and need twice the memory.
            if addr + a == self.bump && self.extend_top(addr + b) {
                return p;
            }
        }
        let q = self.alloc(new_size, align);
        if !q.is_null() {
            // SAFETY: both blocks are live and at least `min` bytes long.
            unsafe {
                ptr::copy_nonoverlapping(p, q, size.min(new_size));
                self.dealloc(p, size, align);
            }
        }
        q
    }
}

#[cfg(all(
    target_arch = "wasm32",
    not(target_feature = "atomics"),
    feature = "allocator"
))]
mod global {
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;

    use super::{Heap, Memory};

    struct WasmMemory;

    impl Memory for WasmMemory {
        fn pages(&self) -> usize {
            core::arch::wasm32::memory_size(0)
        }

        fn grow(&mut self, delta: usize) -> bool {
            core::arch::wasm32::memory_grow(0, delta) != usize::MAX
        }

        fn ptr(&self, addr: usize) -> *mut u8 {
            core::ptr::with_exposed_provenance_mut(addr)
        }

        fn addr(&self, p: *mut u8) -> usize {
            p.expose_provenance()
        }
    }

    struct SmallAlloc(UnsafeCell<Heap<WasmMemory>>);

    // SAFETY: `Sync` lets several threads use `&SmallAlloc` at once; this
    // module only exists for wasm32 without the `atomics` target feature,
    // which has exactly one thread (no shared memory, no way to start
    // another), so that cannot happen. With `atomics` the module is left
    // out and the standard library's thread-safe allocator serves.
    unsafe impl Sync for SmallAlloc {}

    // SAFETY (all methods): the `&mut Heap` made from the cell is the only
    // reference to it while it lives. There is one thread (above), and
    // nothing re-enters the allocator during a call: the heap code does not
    // allocate, and wasm32-unknown-unknown has no signals or interrupts.
    // `Heap` returns blocks that satisfy the layout (size classes are
    // aligned to their size, large blocks to the page) or null, and takes
    // back only what the caller promises it handed out with that layout.
    unsafe impl GlobalAlloc for SmallAlloc {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            unsafe { (*self.0.get()).alloc(l.size(), l.align()) }
        }

        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { (*self.0.get()).dealloc(p, l.size(), l.align()) }
        }

        unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
            unsafe { (*self.0.get()).realloc(p, l.size(), l.align(), new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: SmallAlloc = SmallAlloc(UnsafeCell::new(Heap::new(WasmMemory)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake linear memory: a page-aligned buffer, address = offset. Page 0
    /// stands for the module's data, as on wasm.
    struct Fake {
        buf: *mut u8,
        pages: usize,
        cap: usize,
    }

    impl Fake {
        fn new(cap: usize) -> Self {
            let layout = std::alloc::Layout::from_size_align(cap * PAGE, PAGE).unwrap();
            // SAFETY: non-zero size.
            let buf = unsafe { std::alloc::alloc_zeroed(layout) };
            Fake { buf, pages: 1, cap }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let layout = std::alloc::Layout::from_size_align(self.cap * PAGE, PAGE).unwrap();
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(self.buf, layout) }
        }
    }

    impl Memory for Fake {
        fn pages(&self) -> usize {
            self.pages
        }
        fn grow(&mut self, delta: usize) -> bool {
            if self.pages + delta > self.cap {
                return false;
            }
            self.pages += delta;
            true
        }
        fn ptr(&self, addr: usize) -> *mut u8 {
            self.buf.wrapping_add(addr)
        }
        fn addr(&self, p: *mut u8) -> usize {
            p as usize - self.buf as usize
        }
    }

    #[test]
    fn classes() {
        assert_eq!(class(0, 1), Some(Class::Small(3)));
        assert_eq!(class(9, 8), Some(Class::Small(4)));
        assert_eq!(class(1, 64), Some(Class::Small(6)));
        assert_eq!(class(65_536, 8), Some(Class::Small(16)));
        assert_eq!(class(65_537, 8), Some(Class::Large(2 * PAGE)));
        assert_eq!(class(8, 2 * PAGE), None);
        assert_eq!(class(usize::MAX, 1), None);
    }

    /// One step of a workload: sizes and indexes are taken modulo what
    /// is live, so that any sequence is meaningful.
    #[derive(Debug, Clone)]
    enum Op {
        Alloc { size: usize, align_shift: u32 },
        Free { pick: usize },
        Realloc { pick: usize, size: usize },
    }

    /// Runs `ops` on a heap of at most `pages` pages against a model (the
    /// live blocks and the byte each was filled with), checking after every
    /// step that live blocks are aligned, never overlap, and keep their
    /// contents through reallocation; and at the end, that memory stayed
    /// within a small factor of the peak live size. An allocation may fail
    /// only when memory cannot grow.
    fn run_workload(pages: usize, ops: &[Op]) {
        let mut heap = Heap::new(Fake::new(pages));
        let mut live: Vec<(*mut u8, usize, usize, u8)> = Vec::new();
        let fill = |p: *mut u8, n: usize, v: u8| unsafe { ptr::write_bytes(p, v, n) };
        let check = |p: *mut u8, n: usize, v: u8| {
            (0..n)
                .step_by(97)
                .chain(n.checked_sub(1))
                .all(|i| unsafe { *p.add(i) } == v)
        };
        // Growing memory for `size` bytes takes at most this many pages (one
        // more for alignment); a refusal is only allowed when they are not
        // left under the cap.
        let full =
            |heap: &Heap<Fake>, size: usize| heap.mem.pages + size.div_ceil(PAGE) + 1 > pages;
        let mut peak = 0;
        for (step, op) in ops.iter().enumerate() {
            let tag = (step % 251) as u8;
            match *op {
                Op::Alloc { size, align_shift } => {
                    let align = 1usize << align_shift;
                    let p = heap.alloc(size, align);
                    if align > PAGE {
                        assert!(p.is_null(), "step {step}: alignment {align} granted");
                        continue;
                    }
                    if p.is_null() {
                        assert!(full(&heap, size), "step {step}: refused with room left");
                        continue;
                    }
                    assert_eq!(p as usize % align, 0, "step {step}");
                    fill(p, size, tag);
                    live.push((p, size, align, tag));
                }
                Op::Free { pick } => {
                    if live.is_empty() {
                        continue;
                    }
                    let (p, size, align, tag) = live.swap_remove(pick % live.len());
                    assert!(check(p, size, tag), "step {step}: block corrupted");
                    unsafe { heap.dealloc(p, size, align) };
                }
                Op::Realloc { pick, size } => {
                    if live.is_empty() {
                        continue;
                    }
                    let i = pick % live.len();
                    let (p, old, align, tag) = live[i];
                    // GlobalAlloc never asks for a zero-size reallocation.
                    let size = size.max(1);
                    let q = unsafe { heap.realloc(p, old, align, size) };
                    if q.is_null() {
                        assert!(full(&heap, size), "step {step}: refused with room left");
                        assert!(check(p, old, tag), "step {step}: refusal touched the block");
                        continue;
                    }
                    assert_eq!(q as usize % align, 0, "step {step}");
                    assert!(
                        check(q, old.min(size), tag),
                        "step {step}: realloc lost data"
                    );
                    fill(q, size, tag);
                    live[i] = (q, size, align, tag);
                }
            }
            let live_bytes: usize = live.iter().map(|l| l.1).sum();
            peak = peak.max(live_bytes);
            let mut spans: Vec<(usize, usize)> = live
                .iter()
                .map(|&(p, s, _, _)| (p as usize, p as usize + s))
                .collect();
            spans.sort();
            assert!(
                spans.windows(2).all(|w| w[0].1 <= w[1].0),
                "step {step}: overlap"
            );
        }
        // Power-of-two classes and unmerged small blocks cost memory; keep
        // the overhead within a small factor of the peak live size.
        assert!(
            heap.mem.pages * PAGE < 4 * peak + 64 * PAGE,
            "{} pages for a {peak} byte peak",
            heap.mem.pages
        );
        for (p, size, align, tag) in live.drain(..) {
            assert!(check(p, size, tag));
            unsafe { heap.dealloc(p, size, align) };
        }
    }

    /// A long deterministic mix of allocations, frees and reallocs, small
    /// and large. Under Miri (`cargo +nightly miri test`), a short one.
    #[test]
    fn random_workload_keeps_blocks_disjoint_and_intact() {
        let (pages, steps, big) = if cfg!(miri) {
            (64, 300, 150_000)
        } else {
            (1024, 20_000, 300_000)
        };
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut rand = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let ops: Vec<Op> = (0..steps)
            .map(|_| match rand(10) {
                0..4 => Op::Alloc {
                    size: if rand(4) == 0 { rand(big) } else { rand(2_000) },
                    align_shift: rand(7) as u32,
                },
                4..8 => Op::Free {
                    pick: rand(1 << 20),
                },
                _ => Op::Realloc {
                    pick: rand(1 << 20),
                    size: rand(big * 2 / 3),
                },
            })
            .collect();
        run_workload(pages, &ops);
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let size = prop_oneof![4 => 0usize..512, 2 => 0usize..70_000, 1 => 0usize..600_000];
        prop_oneof![
            4 => (size.clone(), 0u32..18).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
            3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
            2 => (any::<usize>(), size).prop_map(|(pick, size)| Op::Realloc { pick, size }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: if cfg!(miri) { 2 } else { 64 },
            failure_persistence: None,
            ..Default::default()
        })]

        /// Any sequence of operations, including alignments past a page
        /// (refused) and memory running out (a null, never a corrupt
        /// block), keeps the model's invariants.
        #[test]
        fn any_workload_keeps_the_model(ops in proptest::collection::vec(op(), 1..if cfg!(miri) { 40 } else { 300 })) {
            run_workload(if cfg!(miri) { 32 } else { 256 }, &ops);
        }
    }

    #[test]
    fn large_blocks_coalesce_and_split() {
        let mut heap = Heap::new(Fake::new(64));
        let a = heap.alloc(3 * PAGE, 8);
        let b = heap.alloc(2 * PAGE, 8);
        let _c = heap.alloc(2 * PAGE, 8);
        let grown = heap.mem.pages;
        unsafe {
            heap.dealloc(b, 2 * PAGE, 8);
            heap.dealloc(a, 3 * PAGE, 8);
        }
        // a and b merged into 5 pages at a: split 3 + 2.
        assert_eq!(heap.alloc(3 * PAGE, 8), a);
        assert_eq!(heap.alloc(2 * PAGE, 8), a.wrapping_add(3 * PAGE));
        assert_eq!(heap.mem.pages, grown);
        // The top block grows in place.
        let top = heap.alloc(2 * PAGE, 8);
        let grown = unsafe { heap.realloc(top, 2 * PAGE, 8, 6 * PAGE) };
        assert_eq!(grown, top);
        assert_eq!(heap.bump, heap.mem.addr(top) + 6 * PAGE);
        // Shrinking in place frees the tail.
        let d = heap.alloc(4 * PAGE, 8);
        let d2 = unsafe { heap.realloc(d, 4 * PAGE, 8, 2 * PAGE) };
        assert_eq!(d, d2);
        assert_eq!(heap.alloc(2 * PAGE, 8), d.wrapping_add(2 * PAGE));
    }

    #[test]
    fn refused_growth_is_null_not_a_crash() {
        let mut heap = Heap::new(Fake::new(4));
        assert!(heap.alloc(8 * PAGE, 8).is_null());
        let mut last = heap.alloc(4096, 8);
        assert!(!last.is_null());
        loop {
            let p = heap.alloc(4096, 8);
            if p.is_null() {
                break;
            }
            last = p;
        }
        unsafe { heap.dealloc(last, 4096, 8) };
        assert_eq!(heap.alloc(4096, 8), last);
    }
}
