//! Who is subscribed to what: topic → subscribers.
//!
//! Written on subscribe, unsubscribe and close; read once per batch by the
//! record path. Subscribers are grouped by *audience* (topic + role + user id)
//! so that a delivery-stage filter runs once per audience, never once per
//! subscriber; without a delivery stage the groups are simply walked in turn.
//!
//! Copy on write: the record path takes the current [`View`] (an `Arc`,
//! under a lock held for a reference count) and fans a whole batch out from
//! it without holding any lock; a subscribe builds the next view beside it
//! and swaps it in. Neither ever waits for the other: a fan-out to thousands
//! of subscribers cannot stall a runtime worker that is subscribing, nor the
//! other way round. A write copies one topic's member list and the map of
//! topics (pointers), never the other topics' members.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

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
#[derive(Clone)]
pub struct Audience {
    pub identity: Arc<Identity>,
    pub members: Vec<(ConnId, Arc<Outbox>)>,
}

/// One subscribed topic, as of one view.
#[derive(Clone)]
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

/// Every subscribed topic at one moment; never changes once published.
#[derive(Default)]
pub struct View {
    topics: FxHashMap<Uuid, Arc<Topic>>,
}

impl View {
    pub fn topic(&self, event: &Uuid) -> Option<&Topic> {
        self.topics.get(event).map(|t| &**t)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.topics.is_empty()
    }
}

#[derive(Default)]
pub struct Registry {
    current: RwLock<Arc<View>>,
    /// Serializes writers: each builds on the view the previous one left.
    writer: Mutex<()>,
    indexes: Mutex<FxHashMap<Uuid, TopicIdx>>,
    subscriptions: AtomicUsize,
}

impl Registry {
    /// The current view, for one batch of the record path.
    pub fn view(&self) -> Arc<View> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Publishes the next view: `change` edits a copy of the topic of
    /// `event` (`None` when it has no subscriber) and says whether it changed
    /// anything.
    fn update(&self, event: Uuid, change: impl FnOnce(&mut Option<Topic>) -> bool) -> bool {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let view = self.view();
        let mut topic = view.topics.get(&event).map(|t| (**t).clone());
        if !change(&mut topic) {
            return false;
        }
        let mut topics = view.topics.clone();
        match topic {
            Some(t) if !t.audiences.is_empty() => {
                topics.insert(event, Arc::new(t));
            }
            _ => {
                topics.remove(&event);
            }
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(View { topics });
        true
    }

    /// The index of an event's topic, created on first use.
    pub fn topic_idx(&self, event: Uuid) -> TopicIdx {
        let mut indexes = self.indexes.lock().unwrap_or_else(|e| e.into_inner());
        let next = indexes.len() as TopicIdx;
        *indexes.entry(event).or_insert(next)
    }

    /// The index of an event's topic, if it was ever subscribed.
    pub fn existing_topic_idx(&self, event: Uuid) -> Option<TopicIdx> {
        self.indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
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
        let added = self.update(event, |topic| {
            let topic = topic.get_or_insert_with(|| Topic {
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
            true
        });
        if added {
            self.subscriptions.fetch_add(1, Ordering::Relaxed);
        }
        added
    }

    /// Removes a subscriber; false when it was not subscribed.
    pub fn unsubscribe(&self, event: Uuid, conn: ConnId) -> bool {
        let removed = self.update(event, |topic| {
            let Some(topic) = topic else {
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
            removed
        });
        if removed {
            self.subscriptions.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// The largest number of positions any subscriber has waiting.
    #[cfg(feature = "test-util")]
    pub fn max_pending_positions(&self) -> usize {
        let view = self.view();
        view.topics
            .values()
            .flat_map(|t| t.subscribers())
            .map(|o| o.pending_positions())
            .max()
            .unwrap_or(0)
    }

    /// Active subscriptions, all connections together.
    #[cfg(any(test, feature = "test-util"))]
    pub fn subscriptions(&self) -> usize {
        self.subscriptions.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_by_identity_and_cleans_up() {
        let r = Registry::default();
        let e = Uuid::new_v4();
        let o = Arc::new(Outbox::for_tests(64, std::time::Duration::ZERO));
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

    #[test]
    fn a_view_stays_as_it_was_while_others_change_the_registry() {
        let r = Registry::default();
        let e = Uuid::new_v4();
        let o = Arc::new(Outbox::for_tests(64, std::time::Duration::ZERO));
        let id = Arc::new(Identity::default());
        r.subscribe(e, 1, &id, &o);
        let batch = r.view();
        // A subscribe and an unsubscribe while a batch fans out from its view.
        assert!(r.subscribe(e, 2, &id, &o));
        assert!(r.unsubscribe(e, 1));
        assert_eq!(batch.topic(&e).map(|t| t.subscribers().count()), Some(1));
        let now = r.view();
        let members: Vec<ConnId> = now
            .topic(&e)
            .into_iter()
            .flat_map(|t| {
                t.audiences
                    .iter()
                    .flat_map(|a| a.members.iter().map(|m| m.0))
            })
            .collect();
        assert_eq!(members, [2]);
    }
}
