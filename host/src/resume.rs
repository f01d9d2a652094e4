//! Resume: a client that reconnects after a short drop subscribes with
//! `since`, the newest `ts` it holds for the topic, and is sent only the
//! devices it may lack (a *delta*), from the host's memory, with no database
//! query. The host answers with the full snapshot instead whenever its
//! memory cannot vouch for the delta (docs/protocol.md, "Resume").
//!
//! The rules, in one place:
//!
//! - **Listed**: a device of the event whose latest position in memory is
//!   newer than `since`, or reached the host at or after `since − slack`
//!   by the host's clock (a late fix, older than `since`, that the client
//!   may not have seen). The slack (`LIVE_RESUME_SLACK_MS`) is there because
//!   a client's newest `ts` is a fix time, not when it received it, and
//!   frames queued for it when it dropped were sent after that.
//! - **Full instead** when `since` is in the future, when the host has not
//!   read the stream without a break since `since − slack` (it started
//!   later, or lost its consumer group), when the event's devices changed
//!   since then (a device that left would linger on the client's map), or
//!   when the filter chain was reloaded since then (the client holds what
//!   the old rules let through).
//!
//! `since` shapes only the reply: live positions are never held against it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix ms, by the host's clock.
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Since when the host has read the stream without a break (Unix ms):
/// set by the consumer when its group is in place, moved to the present
/// when the group had to be created again.
#[derive(Debug)]
pub struct Coverage {
    from_ms: AtomicI64,
}

impl Default for Coverage {
    fn default() -> Self {
        Self {
            from_ms: AtomicI64::new(i64::MAX),
        }
    }
}

impl Coverage {
    /// The group is in place: reading covers the stream from `now_ms` on.
    pub fn begin(&self, now_ms: i64) {
        self.from_ms.store(now_ms, Ordering::Release);
    }

    pub fn began_ms(&self) -> i64 {
        self.from_ms.load(Ordering::Acquire)
    }
}

/// Why a resume gets the full snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Future,
    NotCovered,
    DevicesChanged,
    ChainReloaded,
}

impl Full {
    pub fn label(self) -> &'static str {
        match self {
            Full::Future => "future",
            Full::NotCovered => "not_covered",
            Full::DevicesChanged => "devices_changed",
            Full::ChainReloaded => "chain_reloaded",
        }
    }
}

/// What the host knew when a resume asked.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    pub now_ms: i64,
    /// See [`Coverage`].
    pub covered_from_ms: i64,
    /// Since when the event's devices are as they are now.
    pub devices_since_ms: i64,
    /// When the filter chain in use was swapped in (0: at start).
    pub chain_since_ms: i64,
    /// `LIVE_RESUME_SLACK_MS`.
    pub slack_ms: i64,
}

/// Whether a delta from memory can answer `since`.
pub fn delta_allowed(since: i64, k: Known) -> Result<(), Full> {
    if since > k.now_ms {
        return Err(Full::Future);
    }
    let from = since.saturating_sub(k.slack_ms);
    if k.covered_from_ms > from {
        return Err(Full::NotCovered);
    }
    if k.devices_since_ms > from {
        return Err(Full::DevicesChanged);
    }
    if k.chain_since_ms > from {
        return Err(Full::ChainReloaded);
    }
    Ok(())
}

/// Whether a delta for `since` lists a device whose latest position has
/// fix time `ts_ms` and reached the host at `arrived_ms`.
pub fn listed(since: i64, slack_ms: i64, ts_ms: i64, arrived_ms: i64) -> bool {
    ts_ms > since || arrived_ms >= since.saturating_sub(slack_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_777_716_930_000;
    const SLACK_MS: i64 = 5_000;

    fn known() -> Known {
        Known {
            now_ms: NOW,
            covered_from_ms: NOW - 600_000,
            devices_since_ms: NOW - 600_000,
            chain_since_ms: 0,
            slack_ms: SLACK_MS,
        }
    }

    #[test]
    fn a_delta_when_memory_covers_since() {
        assert_eq!(delta_allowed(NOW - 10_000, known()), Ok(()));
        assert_eq!(delta_allowed(NOW, known()), Ok(()), "since = now");
        // Exactly SLACK_MS after coverage began.
        let k = Known {
            covered_from_ms: NOW - 10_000 - SLACK_MS,
            ..known()
        };
        assert_eq!(delta_allowed(NOW - 10_000, k), Ok(()));
    }

    #[test]
    fn the_full_snapshot_otherwise() {
        assert_eq!(delta_allowed(NOW + 1, known()), Err(Full::Future));
        assert_eq!(delta_allowed(i64::MAX, known()), Err(Full::Future));
        // The host started (or lost its group) after since − slack.
        let k = Known {
            covered_from_ms: NOW - 10_000 - SLACK_MS + 1,
            ..known()
        };
        assert_eq!(delta_allowed(NOW - 10_000, k), Err(Full::NotCovered));
        let never = Known {
            covered_from_ms: i64::MAX,
            ..known()
        };
        assert_eq!(delta_allowed(0, never), Err(Full::NotCovered));
        let moved = Known {
            devices_since_ms: NOW - 7_000,
            ..known()
        };
        assert_eq!(
            delta_allowed(NOW - 10_000, moved),
            Err(Full::DevicesChanged)
        );
        assert_eq!(
            delta_allowed(NOW - 1_000, moved),
            Ok(()),
            "a change before since"
        );
        let reloaded = Known {
            chain_since_ms: NOW - 7_000,
            ..known()
        };
        assert_eq!(
            delta_allowed(NOW - 10_000, reloaded),
            Err(Full::ChainReloaded)
        );
        assert_eq!(delta_allowed(0, known()), Err(Full::NotCovered), "since 0");
    }

    #[test]
    fn lists_what_is_newer_or_arrived_late() {
        let at = |ts_ms: i64, arrived_ms: i64| (ts_ms, arrived_ms);
        let listed_at = |since, (ts, arrived)| listed(since, SLACK_MS, ts, arrived);
        let since = NOW - 60_000;
        assert!(listed_at(since, at(since + 1, since - 600_000)), "newer");
        assert!(!listed_at(since, at(since, since - SLACK_MS - 1)), "held");
        assert!(
            !listed_at(since, at(since - 10, since - 30_000)),
            "old and seen"
        );
        assert!(
            listed_at(since, at(since - 10, since - SLACK_MS)),
            "late fix"
        );
        assert!(listed_at(since, at(since - 10, since + 20_000)), "late fix");
    }
}
