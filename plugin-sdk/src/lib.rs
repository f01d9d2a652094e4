//! Write livecast filter plugins in Rust.
//!
//! A plugin is a WebAssembly module that the livecast host runs on every
//! record (the *record stage*) and, optionally, once per record and audience
//! (the *delivery stage*). This crate implements the binary ABI
//! (`docs/plugin-abi.md`) so that a plugin is a type implementing [`Plugin`]
//! plus one [`export_plugin!`] line:
//!
//! ```
//! use livecast_plugin_sdk::prelude::*;
//!
//! /// Drops every record of one device. Config: `{"device_id": "<imei>"}`.
//! pub struct DropDevice {
//!     imei: String,
//! }
//!
//! impl Plugin for DropDevice {
//!     fn init(config: &str) -> Result<Self, String> {
//!         let cfg = Config::parse(config)?;
//!         let imei = cfg.str("device_id")?.ok_or("`device_id` is required")?;
//!         Ok(DropDevice { imei: imei.to_string() })
//!     }
//!
//!     fn filter(&mut self, record: &mut Record) -> Verdict {
//!         if record.device_id() == Some(self.imei.as_str()) { Verdict::Drop } else { Verdict::Pass }
//!     }
//! }
//!
//! export_plugin!(DropDevice);
//!
//! // The same crate unit-tests natively, through the real ABI code:
//! use livecast_plugin_sdk::testing::{Harness, Outcome, SampleRecord};
//! let mut h = Harness::<DropDevice>::new(r#"{"device_id": "42"}"#)?;
//! assert_eq!(h.filter(&SampleRecord::new().device("42").build()), Outcome::Dropped);
//! assert_eq!(h.filter(&SampleRecord::new().device("7").build()), Outcome::Passed);
//! # Ok::<(), String>(())
//! ```
//!
//! Build it as a `cdylib` for `wasm32-unknown-unknown`
//! (`cargo build --target wasm32-unknown-unknown --profile plugin`); the
//! exports exist only on that target, so the crate also builds and tests
//! natively.
//!
//! # What the SDK does for you
//!
//! - [`Record`] parses lazily: reading `device_id` scans one member; nothing
//!   is parsed that the filter does not read. A plugin that reads nothing
//!   costs a loop over the batch table.
//! - [`Verdict::Pass`] on an unmodified record is ABI verdict 0 (the host
//!   forwards the original bytes); on a modified record it becomes verdict 2
//!   with the rewritten JSON. [`Verdict::Drop`] is verdict 1.
//! - The input region, the output tables and the replacement bytes are
//!   guest-owned buffers reused across calls.
//! - A rejected configuration is logged at level 0 and `init` returns 1, so
//!   the operator sees your message.
//! - Nothing in the SDK panics on malformed input; a record the SDK cannot
//!   rewrite after the filter modified it is dropped (fail closed) with a
//!   warning.
//!
//! # Error messages without `format!`
//!
//! `format!` works, but pulls `core::fmt` into the module (several KB). An
//! `init` error is usually a few pieces of text and a number; `String`'s
//! own methods and [`json::write_i64`] / [`json::write_f64_rounded`] build
//! it without `core::fmt`:
//!
//! ```
//! use livecast_plugin_sdk::prelude::*;
//! use livecast_plugin_sdk::json;
//!
//! struct Geofence { radius_m: i64 }
//!
//! impl Plugin for Geofence {
//!     fn init(config: &str) -> Result<Self, String> {
//!         let cfg = Config::parse(config)?;
//!         let radius_m = cfg.i64("radius_m")?.unwrap_or(500);
//!         if !(1..=100_000).contains(&radius_m) {
//!             let mut msg = String::from("geofence: `radius_m` must be 1 to 100000, not ");
//!             json::write_i64(&mut msg, radius_m);
//!             return Err(msg);
//!         }
//!         Ok(Geofence { radius_m })
//!     }
//!
//!     fn filter(&mut self, _record: &mut Record) -> Verdict {
//!         Verdict::Pass
//!     }
//! }
//!
//! let err = livecast_plugin_sdk::testing::Harness::<Geofence>::new(r#"{"radius_m": 0}"#).err();
//! assert_eq!(err.as_deref(), Some("geofence: `radius_m` must be 1 to 100000, not 0"));
//!
//! // A float, to a fixed number of decimals; or several pieces at once.
//! let mut msg = String::from("speed ");
//! json::write_f64_rounded(&mut msg, 63.456, 1);
//! msg.push_str(" km/h is over the limit");
//! assert_eq!(msg, "speed 63.5 km/h is over the limit");
//! assert_eq!(["unknown mode `", "fast", "`"].concat(), "unknown mode `fast`");
//! ```
//!
//! # Size and speed
//!
//! The SDK has no dependencies, brings its own small allocator (feature
//! `allocator`) and keeps `core::fmt` and panicking code out of everything a
//! record passes through. In the `plugin` profile (`cargo build -p livecast`
//! builds the shipped plugins to `target/plugins/`) a filter that reads
//! nothing is about 17 KB of wasm (`passthrough`), a small configured filter
//! about 32 KB (`drop-device`), one that parses numbers and timestamps about
//! 57 KB (`plausibility`). [`Record::set_f64`] adds about 20 KB of float
//! formatting: prefer [`Record::set_f64_rounded`] where a fixed number of
//! decimals will do.
//!
//! Measured under wasmtime (Cranelift) on a small shared machine: a filter
//! that reads nothing costs about 30 to 40 ns per record, one that reads the
//! first field about 170 ns, and one that reads or rewrites the whole record
//! about 1 µs. [`testing::Harness::bench`] gives native numbers, which are
//! typically 2 to 3 times lower.

#![warn(missing_docs)]

pub mod abi;
// The allocator is for single-threaded wasm only, as talc gates its own:
// with the `atomics` target feature a wasm module may have threads, and a
// lock-free allocator shared between them would be undefined behaviour.
// Natively the system allocator serves; the heap is unit-tested there.
#[cfg(any(
    test,
    all(
        target_arch = "wasm32",
        not(target_feature = "atomics"),
        feature = "allocator"
    )
))]
mod heap;
pub mod json;
pub mod log;
mod record;
mod runtime;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;
pub mod time;

pub use json::Config;
pub use record::{Attributes, EditError, Record};

/// What [`export_plugin!`] expands to needs; not part of the API, and may
/// change in any release.
#[doc(hidden)]
pub mod __private {
    use core::cell::RefCell;

    pub use crate::runtime::Runtime;

    /// The static that holds a plugin instance's [`Runtime`]: a `RefCell`
    /// that may live in a `static` because nothing can share it.
    pub struct Slot<T>(RefCell<T>);

    // SAFETY: `Sync` promises that `&Slot` may be used from several threads
    // at once. WebAssembly without the `atomics` target feature has exactly
    // one thread (no shared memory, no way to start another), so no second
    // thread can exist to use it: the promise holds vacuously, for any `T`,
    // as for the standard library's thread locals on this target. Elsewhere
    // `Slot` is not `Sync`, and `export_plugin!` refuses to compile.
    #[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
    unsafe impl<T> Sync for Slot<T> {}

    impl<T> Slot<T> {
        pub const fn new(value: T) -> Self {
            Slot(RefCell::new(value))
        }

        /// Runs `f` on the value, or returns `None` when it is already in
        /// use: an export entered while another runs, which the host never
        /// does, fails instead of aliasing the state.
        #[inline(always)]
        pub fn with<R>(&self, f: impl FnOnce(&mut T) -> Option<R>) -> Option<R> {
            f(&mut *self.0.try_borrow_mut().ok()?)
        }
    }
}

/// Everything a plugin usually needs: `use livecast_plugin_sdk::prelude::*;`.
pub mod prelude {
    pub use crate::json::Config;
    pub use crate::{Audience, Plugin, Record, Verdict, export_plugin, filter, log};
}

/// What happens to a record (record stage) or to a record for one audience
/// (delivery stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    /// The record goes on as it now is: unchanged (ABI verdict 0) or, if the
    /// filter modified it, as the rewritten JSON (ABI verdict 2).
    Pass,
    /// The record goes no further (ABI verdict 1). In the delivery stage: it
    /// is withheld from that audience only.
    Drop,
}

/// Who a record is about to be delivered to: a topic plus the subscriber's
/// identity bound at connect. Subscribers with the same audience share one
/// evaluation.
///
/// ```
/// use livecast_plugin_sdk::Audience;
/// let a = Audience::new("event:0b6c", "", "9f1e");
/// assert_eq!(a.topic(), "event:0b6c");
/// assert!(!a.has_role());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Audience<'a> {
    topic: &'a str,
    role: &'a str,
    user_id: &'a str,
}

impl<'a> Audience<'a> {
    /// An audience (the SDK builds these from the host's input; tests build
    /// their own).
    pub const fn new(topic: &'a str, role: &'a str, user_id: &'a str) -> Self {
        Audience {
            topic,
            role,
            user_id,
        }
    }

    /// The topic, e.g. `event:<uuid>`.
    pub fn topic(&self) -> &'a str {
        self.topic
    }

    /// The Directus role id of the subscriber; empty when the user has none.
    pub fn role(&self) -> &'a str {
        self.role
    }

    /// Whether the subscriber has a role.
    pub fn has_role(&self) -> bool {
        !self.role.is_empty()
    }

    /// The Directus user id of the subscriber.
    pub fn user_id(&self) -> &'a str {
        self.user_id
    }
}

/// A filter plugin. One value lives per plugin instance; state kept in it
/// survives between batches, but not a failure (the host then makes a fresh
/// instance and calls [`init`](Self::init) again).
pub trait Plugin: Sized {
    /// Whether the plugin implements [`deliver`](Self::deliver). Set it to
    /// `true` when you do, and export with `export_plugin!(Type, deliver)`:
    /// the macro refuses to compile when the two disagree, because a delivery
    /// stage that is silently not exported could leak what it should hide.
    const DELIVERY: bool = false;

    /// Builds the plugin from its configuration: the JSON text of the chain
    /// entry's `config` (`{}` when absent). `Err` rejects the chain entry and
    /// its message is shown to the operator.
    fn init(config: &str) -> Result<Self, String>;

    /// The record stage: judges one record, once, for every subscriber.
    fn filter(&mut self, record: &mut Record<'_>) -> Verdict;

    /// The delivery stage: judges one record for one audience. Edits here
    /// affect only what this audience receives.
    fn deliver(&mut self, record: &mut Record<'_>, audience: &Audience<'_>) -> Verdict {
        let _ = (record, audience);
        Verdict::Pass
    }
}

/// Exports a [`Plugin`] type as the module's ABI:
/// `export_plugin!(MyPlugin)` for the record stage only, or
/// `export_plugin!(MyPlugin, deliver)` to also export `deliver_batch`.
///
/// A plugin without a delivery stage must not export `deliver_batch`: the
/// host skips the stage at no cost when it is absent. The exports are only
/// generated for `target_arch = "wasm32"`; natively the macro only checks
/// that [`Plugin::DELIVERY`] matches. Use it once per crate.
///
/// ```
/// use livecast_plugin_sdk::prelude::*;
///
/// struct HideFromPublic;
/// impl Plugin for HideFromPublic {
///     const DELIVERY: bool = true;
///     fn init(_config: &str) -> Result<Self, String> { Ok(HideFromPublic) }
///     fn filter(&mut self, _r: &mut Record) -> Verdict { Verdict::Pass }
///     fn deliver(&mut self, _r: &mut Record, a: &Audience) -> Verdict {
///         if a.has_role() { Verdict::Pass } else { Verdict::Drop }
///     }
/// }
/// export_plugin!(HideFromPublic, deliver);
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        $crate::__export_plugin!($plugin, false, {});
    };
    ($plugin:ty, deliver) => {
        $crate::__export_plugin!($plugin, true, {
            #[unsafe(no_mangle)]
            extern "C" fn deliver_batch(ptr: i32, len: i32) -> i32 {
                with_runtime(|rt| rt.deliver_batch(ptr as u32 as usize, len as u32 as usize))
                    .map_or(0, |p| p as i32)
            }
        });
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin {
    ($plugin:ty, $delivers:literal, { $($extra:tt)* }) => {
        const _: () = ::core::assert!(
            <$plugin as $crate::Plugin>::DELIVERY == $delivers,
            "Plugin::DELIVERY must match export_plugin!: use export_plugin!(Type, deliver) exactly when the plugin implements deliver and sets DELIVERY = true"
        );

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            #[cfg(target_feature = "atomics")]
            ::core::compile_error!(
                "livecast plugins are single-threaded: build without the `atomics` target feature"
            );

            static RUNTIME: $crate::__private::Slot<$crate::__private::Runtime<$plugin>> =
                $crate::__private::Slot::new($crate::__private::Runtime::new());

            fn with_runtime<R>(
                f: impl FnOnce(&mut $crate::__private::Runtime<$plugin>) -> ::core::option::Option<R>,
            ) -> ::core::option::Option<R> {
                RUNTIME.with(f)
            }

            #[unsafe(no_mangle)]
            extern "C" fn livecast_abi_v1() {}

            #[unsafe(no_mangle)]
            extern "C" fn livecast_reserve(size: i32) -> i32 {
                with_runtime(|rt| rt.reserve(size as u32 as usize)).map_or(0, |p| p as i32)
            }

            #[unsafe(no_mangle)]
            extern "C" fn init(ptr: i32, len: i32) -> i32 {
                match with_runtime(|rt| rt.init(ptr as u32 as usize, len as u32 as usize).ok()) {
                    Some(()) => 0,
                    None => 1,
                }
            }

            #[unsafe(no_mangle)]
            extern "C" fn filter_batch(ptr: i32, len: i32) -> i32 {
                with_runtime(|rt| rt.filter_batch(ptr as u32 as usize, len as u32 as usize))
                    .map_or(0, |p| p as i32)
            }

            $($extra)*
        };
    };
}

/// Exports a stateless record filter, `fn(&mut Record) -> Verdict`, as a
/// plugin that takes no configuration (it rejects anything but `{}`).
///
/// It defines a unit struct implementing [`Plugin`], named `Filter` unless
/// given a name (`filter!(my_fn as MyName)`), so tests can use
/// `Harness::<Filter>`.
///
/// ```
/// use livecast_plugin_sdk::prelude::*;
///
/// fn only_with_fix(record: &mut Record) -> Verdict {
///     match record.satellites() {
///         Some(n) if n >= 4 => Verdict::Pass,
///         _ => Verdict::Drop,
///     }
/// }
/// filter!(only_with_fix);
///
/// use livecast_plugin_sdk::testing::{Harness, Outcome};
/// let mut h = Harness::<Filter>::new("{}")?;
/// assert_eq!(h.filter(r#"{"satellites": 2}"#), Outcome::Dropped);
/// assert!(Harness::<Filter>::new(r#"{"min": 4}"#).is_err());
/// # Ok::<(), String>(())
/// ```
#[macro_export]
macro_rules! filter {
    ($f:path as $name:ident) => {
        /// The plugin generated by `filter!`: a stateless record filter
        /// without configuration.
        pub struct $name;

        impl $crate::Plugin for $name {
            fn init(config: &str) -> ::core::result::Result<Self, ::std::string::String> {
                $crate::json::expect_empty_config(config).map(|()| $name)
            }

            fn filter(&mut self, record: &mut $crate::Record<'_>) -> $crate::Verdict {
                $f(record)
            }
        }

        $crate::export_plugin!($name);
    };
    ($f:path) => {
        $crate::filter!($f as Filter);
    };
}
