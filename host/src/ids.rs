//! The small integers the record path keys on instead of strings, so that a
//! per-connection queue is indexed without hashing an IMEI or a topic per
//! subscriber. A leaf module: the registry, the latest positions and the
//! outboxes all speak these.

/// A topic's index, stable for the life of the process (a handful of bytes
/// per event ever subscribed).
pub type TopicIdx = u32;

/// A device's index, stable for the life of the process.
pub type DeviceIdx = u32;

/// A connection's id.
pub type ConnId = u64;
