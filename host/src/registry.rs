//! Who is subscribed to what: topic → subscribers.
//!
//! Written on subscribe, unsubscribe and close; read once per batch by the
//! record path. Subscribers are grouped by *audience* (topic + role + user id)
//! so that a delivery-stage filter runs once per audience, never once per
//! subscriber; without a delivery stage the groups are simply walked in turn.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use bytes::Bytes;
use rustc_hash::FxHashMap;
use uuid::Uuid;

use crate::ids::{ConnId, TopicIdx};
use crate::outbox::Outbox;
use crate::protocol;

/// The identity a delivery-stage filter may depend on, besides the topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Identity {
    pub role: Box<str>,
    pub user_id: Box<str>,
}

/// Subscribers of one topic with the same identity.
pub struct Audience {
    pub identity: Arc<Identity>,
    pub members: Vec<(ConnId, Arc<Outbox>)>,
}

/// One subscribed topic.
pub struct Topic {
    pub idx: TopicIdx,
    pub event: Uuid,
    /// `event:<id>`
    pub name: String,
    /// `{"type":"position","topic":"event:<id>",`
    pub prefix: Bytes,
    pub audiences: Vec<Audience>,
}

impl Topic {
    pub fn subscribers(&self) -> impl Iterator<Item = &Arc<Outbox>> {
        self.audiences
            .iter()
            .flat_map(|a| a.members.iter().map(|(_, o)| o))
    }
}

#[derive(Default)]
struct Inner {
    topics: FxHashMap<Uuid, Topic>,
    indexes: FxHashMap<Uuid, TopicIdx>,
    subscriptions: usize,
}

#[derive(Default)]
pub struct Registry {
    inner: RwLock<Inner>,
}

/// A read view for the record path, held for one batch.
pub struct View<'a>(RwLockReadGuard<'a, Inner>);

impl View<'_> {
    pub fn topic(&self, event: &Uuid) -> Option<&Topic> {
        self.0.topics.get(event)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.0.topics.is_empty()
    }
}

impl Registry {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn view(&self) -> View<'_> {
        View(self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// The index of an event's topic, created on first use.
    pub fn topic_idx(&self, event: Uuid) -> TopicIdx {
        if let Some(&i) = self
            .inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .indexes
            .get(&event)
        {
            return i;
        }
        let mut inner = self.write();
        let next = inner.indexes.len() as TopicIdx;
        *inner.indexes.entry(event).or_insert(next)
    }

    /// The index of an event's topic, if it was ever subscribed.
    pub fn existing_topic_idx(&self, event: Uuid) -> Option<TopicIdx> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .indexes
            .get(&event)
            .copied()
    }

    /// Adds a subscriber; false when it was already subscribed.
    pub fn subscribe(
        &self,
        event: Uuid,
        conn: ConnId,
        identity: &Arc<Identity>,
        outbox: &Arc<Outbox>,
    ) -> bool {
        let idx = self.topic_idx(event);
        let mut inner = self.write();
        let topic = inner.topics.entry(event).or_insert_with(|| Topic {
            idx,
            event,
            name: protocol::topic_of(event),
            prefix: protocol::position_prefix(event),
            audiences: Vec::new(),
        });
        if topic
            .audiences
            .iter()
            .any(|a| a.members.iter().any(|(c, _)| *c == conn))
        {
            return false;
        }
        match topic.audiences.iter_mut().find(|a| a.identity == *identity) {
            Some(a) => a.members.push((conn, outbox.clone())),
            None => topic.audiences.push(Audience {
                identity: identity.clone(),
                members: vec![(conn, outbox.clone())],
            }),
        }
        inner.subscriptions += 1;
        true
    }

    /// Removes a subscriber; false when it was not subscribed.
    pub fn unsubscribe(&self, event: Uuid, conn: ConnId) -> bool {
        let mut inner = self.write();
        let Some(topic) = inner.topics.get_mut(&event) else {
            return false;
        };
        let mut removed = false;
        for a in &mut topic.audiences {
            if let Some(i) = a.members.iter().position(|(c, _)| *c == conn) {
                a.members.swap_remove(i);
                removed = true;
                break;
            }
        }
        topic.audiences.retain(|a| !a.members.is_empty());
        if topic.audiences.is_empty() {
            inner.topics.remove(&event);
        }
        if removed {
            inner.subscriptions -= 1;
        }
        removed
    }

    /// The largest number of positions any subscriber has waiting.
    #[cfg(feature = "test-util")]
    pub fn max_pending_positions(&self) -> usize {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .topics
            .values()
            .flat_map(|t| t.subscribers())
            .map(|o| o.pending_positions())
            .max()
            .unwrap_or(0)
    }

    /// Active subscriptions, all connections together.
    #[cfg(any(test, feature = "test-util"))]
    pub fn subscriptions(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .subscriptions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_identity_and_cleans_up() {
        let r = Registry::default();
        let e = Uuid::new_v4();
        let o = Arc::new(Outbox::new(
            crate::outbox::Limits {
                control_bytes: 1024,
                positions: 64,
            },
            None,
        ));
        let viewer = Arc::new(Identity {
            role: "viewer".into(),
            user_id: "u1".into(),
        });
        let control = Arc::new(Identity {
            role: "control".into(),
            user_id: "u2".into(),
        });
        assert!(r.subscribe(e, 1, &viewer, &o));
        assert!(!r.subscribe(e, 1, &viewer, &o), "idempotent");
        assert!(r.subscribe(e, 2, &viewer, &o));
        assert!(r.subscribe(e, 3, &control, &o));
        {
            let v = r.view();
            let t = v.topic(&e).unwrap();
            assert_eq!(t.audiences.len(), 2);
            assert_eq!(t.subscribers().count(), 3);
        }
        assert_eq!(r.subscriptions(), 3);
        assert!(r.unsubscribe(e, 1));
        assert!(!r.unsubscribe(e, 1));
        assert!(r.unsubscribe(e, 2));
        assert!(r.unsubscribe(e, 3));
        assert!(r.view().is_empty());
        assert_eq!(r.subscriptions(), 0);
        assert_eq!(r.topic_idx(e), 0, "indexes outlive their subscribers");
    }
}
