//! What a plugin's store holds besides the guest: its memory cap (the
//! resource limiter), its rate-limited log, and the only import a plugin may
//! call, `livecast::log`. Below the engine, which links the import, and the
//! instance, which reads the flags after a call.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Caller, Linker, ResourceLimiter};

use crate::ratelimit::LogLimiter;

/// The host state of a store: limits and logging.
pub struct Sandbox {
    plugin: Arc<str>,
    memory_limit: usize,
    /// Set when a memory grow was refused: a failure that follows is then
    /// `memory`, not a trap.
    pub(super) memory_denied: bool,
    log_limit: LogLimiter,
    /// The last error the plugin logged: the reason `init` gives for a refusal.
    pub(super) last_error: Option<String>,
}

impl Sandbox {
    pub fn new(plugin: Arc<str>, memory_limit: usize) -> Self {
        Self {
            plugin,
            memory_limit,
            memory_denied: false,
            log_limit: LogLimiter::new(Duration::from_secs(1)),
            last_error: None,
        }
    }
}

impl ResourceLimiter for Sandbox {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            self.memory_denied = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 10_000)
    }
}

const MAX_LOG_LINE: usize = 1024;

/// The only import: `livecast::log(level, ptr, len)`.
pub fn link_log(linker: &mut Linker<Sandbox>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "livecast",
        "log",
        |mut caller: Caller<'_, Sandbox>, level: i32, ptr: i32, len: i32| {
            let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
                return;
            };
            let (data, sandbox) = memory.data_and_store_mut(&mut caller);
            let (ptr, len) = (ptr as u32 as usize, (len as u32 as usize).min(MAX_LOG_LINE));
            let Some(bytes) = ptr.checked_add(len).and_then(|end| data.get(ptr..end)) else {
                return;
            };
            let message = String::from_utf8_lossy(bytes).into_owned();
            if level == 0 {
                sandbox.last_error = Some(message.clone());
            }
            let Some(held_back) = sandbox.log_limit.allow() else {
                return;
            };
            let plugin = &*sandbox.plugin;
            match level {
                0 => tracing::error!(plugin, held_back, "{message}"),
                1 => tracing::warn!(plugin, held_back, "{message}"),
                2 => tracing::info!(plugin, held_back, "{message}"),
                _ => tracing::debug!(plugin, held_back, "{message}"),
            }
        },
    )?;
    Ok(())
}
