//! Logging through the host's `livecast`/`log` import.
//!
//! The host truncates messages to 1 KiB, replaces invalid UTF-8 and
//! rate-limits them per plugin, so logging once per record is tolerated but
//! wasteful. A message logged at [`error`] during `init` is what the operator
//! sees as the reason a configuration was rejected.
//!
//! Natively (unit tests, the [`testing`](crate::testing) harness) messages go
//! to stderr and are kept per thread; see [`take`].
//!
//! ```
//! use livecast_plugin_sdk::log;
//! log::warn("dropping a record without a timestamp");
//! # #[cfg(not(target_arch = "wasm32"))]
//! assert_eq!(log::take(), [(log::Level::Warn, "dropping a record without a timestamp".to_string())]);
//! ```

/// Severity, as the host's import numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(i32)]
pub enum Level {
    /// 0
    Error = 0,
    /// 1
    Warn = 1,
    /// 2
    Info = 2,
    /// 3
    Debug = 3,
}

/// Logs `msg` at `level`.
pub fn log(level: Level, msg: &str) {
    imp::write(level, msg);
}

/// Logs at level 0.
pub fn error(msg: &str) {
    log(Level::Error, msg);
}

/// Logs at level 1.
pub fn warn(msg: &str) {
    log(Level::Warn, msg);
}

/// Logs at level 2.
pub fn info(msg: &str) {
    log(Level::Info, msg);
}

/// Logs at level 3.
pub fn debug(msg: &str) {
    log(Level::Debug, msg);
}

#[cfg(target_arch = "wasm32")]
mod imp {
    #[link(wasm_import_module = "livecast")]
    unsafe extern "C" {
        #[link_name = "log"]
        fn host_log(level: i32, ptr: *const u8, len: usize);
    }

    pub fn write(level: super::Level, msg: &str) {
        // SAFETY: the host only reads `len` bytes at `ptr`, which `msg` owns.
        unsafe { host_log(level as i32, msg.as_ptr(), msg.len()) }
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::RefCell;

    /// Bounded, so that a plugin logging per record in a benchmark cannot
    /// eat the test's memory.
    const KEEP: usize = 10_000;

    thread_local! {
        pub static LOGS: RefCell<Vec<(super::Level, String)>> = const { RefCell::new(Vec::new()) };
    }

    pub fn write(level: super::Level, msg: &str) {
        eprintln!("[plugin {level:?}] {msg}");
        LOGS.with(|l| {
            let mut l = l.borrow_mut();
            if l.len() < KEEP {
                l.push((level, msg.to_string()));
            }
        });
    }
}

/// Natively: takes the messages logged so far on this thread (each test runs
/// on its own thread, so tests do not see each other's messages).
#[cfg(not(target_arch = "wasm32"))]
pub fn take() -> Vec<(Level, String)> {
    imp::LOGS.with(|l| std::mem::take(&mut *l.borrow_mut()))
}
