//! The filter chain: every record passes through it between decode and
//! routing.
//!
//! This is the seam where the WebAssembly plugins run; for now the chain
//! passes every record unchanged.

use prometheus_client::registry::Registry;

use crate::record::Position;

/// A decoded stream entry on its way to subscribers.
#[derive(Debug)]
pub struct Record {
    /// The entry's `payload` JSON, as plugins see it.
    pub payload: Vec<u8>,
    /// What the host uses of it, decoded from `payload`.
    pub position: Position,
}

/// The ordered chain of filters.
#[derive(Default)]
pub struct Chain {}

impl Chain {
    /// Runs the record stage over a batch; records it drops are removed.
    pub fn filter(&mut self, _records: &mut Vec<Record>) {}
}

/// Per-plugin metrics.
#[derive(Default)]
pub struct FilterMetrics {}

impl FilterMetrics {
    pub fn register(&self, _registry: &mut Registry) {}
}
