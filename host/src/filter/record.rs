//! What flows through the chain: a record, and what a plugin decides about
//! it. A leaf of the filter modules, so the chain, the plugin and the
//! instance all speak it without depending on each other.

use bytes::Bytes;

use crate::record::Position;

/// A decoded stream entry on its way to subscribers.
#[derive(Debug, Clone)]
pub struct Record {
    /// The entry's `payload` JSON, as plugins see it.
    pub payload: Bytes,
    /// What the host uses of it, decoded from `payload`.
    pub position: Position,
}

/// A decision on one item, replacements validated and decoded. Boxed so
/// that the common case (a table of passes) stays two words per item.
#[derive(Debug, Clone)]
pub enum Decided {
    Pass,
    Drop,
    Replace(Box<Record>),
}
