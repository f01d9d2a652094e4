//! One client's WebSocket, from the 101 to the close.
//!
//! A single task per connection (two would double the idle cost) that:
//! writes what its outbox holds, batching frames into one flush; reads client
//! frames and handles them in order (one subscribe in flight at a time, while
//! live positions keep flowing); pings, and drops a peer silent for two ping
//! intervals; closes a client whose socket stays blocked (1008), who sends
//! binary (1003) or oversized (1009) frames, and every client at shutdown
//! (1001).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use rustc_hash::FxHashSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::broadcast::Served;
use crate::deflate;
use crate::directus::{Authz, Credential, User};
use crate::ids::ConnId;
use crate::metrics::{Counted, inc};
use crate::outbox::{Flushed, Outbox};
use crate::protocol::{self, ErrorCode, ErrorReply, Request, RequestKind};
use crate::registry::Identity;
use crate::snapshot::EventSnapshot;
use crate::snapshots::{self, Source, Sources};
use crate::state::Shared;
use crate::ws::{Incoming, OutFrame, ReadError, WebSocket};

/// Client requests waiting behind the one in flight; past this the socket is
/// not read until the queue shrinks.
const MAX_QUEUED_REQUESTS: usize = 16;

/// Why the connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client closed, or its TCP connection went away.
    Client,
    /// No frame (not even a pong) for two ping intervals.
    Silent,
    /// Host shutdown: 1001.
    Shutdown,
    /// Binary frame: 1003.
    Binary,
    /// Frame over the size limit: 1009.
    TooLarge,
    /// Socket blocked past the slow-client timeout, or control backlog over
    /// its limit: 1008.
    Slow,
    /// Directus no longer accepts the connection's session (401 at
    /// subscribe): 1008, so the client reconnects with its fresh session.
    SessionExpired,
    /// A WebSocket protocol violation: 1002.
    Protocol,
    /// A text message that is not UTF-8: 1007.
    InvalidUtf8,
}

impl End {
    fn close(self) -> Option<(u16, &'static str)> {
        match self {
            End::Client | End::Silent => None,
            End::Shutdown => Some((1001, "server shutting down")),
            End::Binary => Some((1003, "binary frames are not supported")),
            End::TooLarge => Some((1009, "frame too large")),
            End::Slow => Some((1008, "client too slow")),
            End::SessionExpired => Some((1008, "session expired")),
            End::Protocol => Some((1002, "protocol error")),
            End::InvalidUtf8 => Some((1007, "text must be UTF-8")),
        }
    }

    fn label(self) -> &'static str {
        match self {
            End::Client => "client",
            End::Silent => "silent",
            End::Shutdown => "shutdown",
            End::Binary => "binary_frame",
            End::TooLarge => "frame_too_large",
            End::Slow => "slow_client",
            End::SessionExpired => "session_expired",
            End::Protocol => "protocol_error",
            End::InvalidUtf8 => "invalid_utf8",
        }
    }
}

/// What a finished request changed in the connection's subscriptions.
enum Done {
    Added(Uuid),
    Removed(Uuid),
    Unchanged,
    SessionExpired,
}

type InFlight = Pin<Box<dyn Future<Output = Done> + Send>>;

/// The client's requests, handled strictly in arrival order so replies come
/// in request order: one at a time in flight (a subscribe waits on Directus
/// and the database while positions keep flowing), the rest queued. Past
/// [`MAX_QUEUED_REQUESTS`] the socket is not read until the queue shrinks,
/// so a client cannot queue work without bound.
#[derive(Default)]
struct Requests {
    queue: VecDeque<Result<Request, ErrorReply>>,
    in_flight: Option<(Uuid, InFlight)>,
}

impl Requests {
    fn push(&mut self, request: Result<Request, ErrorReply>) {
        self.queue.push_back(request);
    }

    /// Whether the socket may be read: the queue has room.
    fn accepting(&self) -> bool {
        self.queue.len() < MAX_QUEUED_REQUESTS
    }

    /// The next request to handle, unless one is still in flight.
    fn next(&mut self) -> Option<Result<Request, ErrorReply>> {
        match self.in_flight {
            Some(_) => None,
            None => self.queue.pop_front(),
        }
    }

    /// Continues a request (a subscribe for `event`) in the background.
    fn start(&mut self, event: Uuid, task: InFlight) {
        self.in_flight = Some((event, task));
    }

    fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// The outcome of the request in flight; never ready without one.
    fn done(&mut self) -> impl Future<Output = Done> + '_ {
        std::future::poll_fn(move |cx| {
            let Some((_, task)) = &mut self.in_flight else {
                return Poll::Pending;
            };
            let done = task.as_mut().poll(cx);
            if done.is_ready() {
                self.in_flight = None;
            }
            done
        })
    }

    /// Drops the request in flight; the event it was subscribing to, if any.
    fn abandon(&mut self) -> Option<Uuid> {
        self.in_flight.take().map(|(e, _)| e)
    }
}

struct Conn {
    shared: Arc<Shared>,
    id: ConnId,
    outbox: Arc<Outbox>,
    identity: Arc<Identity>,
    credential: Arc<Credential>,
    subscriptions: FxHashSet<Uuid>,
    requests: Requests,
}

/// Serves one upgraded connection until it ends.
pub async fn serve(
    shared: Arc<Shared>,
    mut ws: WebSocket,
    outbox: Arc<Outbox>,
    user: User,
    credential: Credential,
    id: ConnId,
) {
    let metrics = shared.metrics.clone();
    let _open = Counted::new(&metrics.connections);
    let _deflate = outbox
        .deflate()
        .then(|| Counted::new(&metrics.deflate_connections));
    tracing::debug!(conn = id, user = %user.id, "connected");
    if user.role.is_none() {
        // Directus leaves `role` out of /users/me unless the user's policy may
        // read it; delivery-stage plugins then see an empty role.
        tracing::debug!(conn = id, user = %user.id, "Directus gave no role for this user");
    }
    // Only what the delivery stage may depend on stays with the connection.
    let User {
        id: user_id, role, ..
    } = user;
    let identity = Arc::new(Identity {
        role: role.unwrap_or_default().into(),
        user_id: user_id.into(),
    });
    let mut conn = Conn {
        outbox,
        shared,
        id,
        identity,
        credential: Arc::new(credential),
        subscriptions: FxHashSet::default(),
        requests: Requests::default(),
    };
    let end = conn.run(&mut ws).await;
    conn.unregister();
    inc(&metrics.closes, "reason", end.label());
    if let Some((code, reason)) = end.close() {
        let grace = match end {
            End::Shutdown => conn.shared.config.drain_timeout(),
            _ => CLOSE_GRACE,
        };
        close(&mut ws, &conn.outbox, code, reason, grace).await;
    }
    tracing::debug!(conn = id, reason = end.label(), "disconnected");
}

/// How long a client has to answer a close the host starts (other than at
/// shutdown) before TCP is closed anyway. A client that answers is let go
/// the moment its close arrives.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Sends a close frame in place of whatever was still queued (a closing
/// client needs no more positions) and waits, up to `grace`, for the
/// client's; returning drops the socket, so TCP closes right after the
/// closing handshake (RFC 6455 §7.1.1).
async fn close(
    ws: &mut WebSocket,
    outbox: &Outbox,
    code: u16,
    reason: &'static str,
    grace: Duration,
) {
    outbox.replace_with_close(OutFrame::close(code, reason));
    // Skips the rest of a refused frame and anything else the client sends
    // until its close, so that the close is seen however it broke the
    // protocol.
    ws.closing();
    let _ = tokio::time::timeout(grace, async {
        loop {
            // A closing connection has no positions left: no tick to keep.
            match outbox.flush().0 {
                Flushed::Done => break,
                Flushed::Blocked => {
                    if ws.socket().writable().await.is_err() {
                        return;
                    }
                }
                Flushed::Overflow | Flushed::Gone => return,
            }
        }
        if ws.peer_closed() {
            // The close we answered was the client's (or came with the
            // frame we refused): the handshake is complete.
            return;
        }
        let mut got = Vec::new();
        while ws.read(&mut got).await.is_ok() {
            if got.iter().any(|m| matches!(m, Incoming::Close(_))) {
                return;
            }
            got.clear();
        }
    })
    .await;
}

impl Conn {
    async fn run(&mut self, ws: &mut WebSocket) -> End {
        let interval = self.shared.config.ping_interval();
        let slow = self.shared.config.slow_client_timeout();
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        let mut last_seen = Instant::now();
        let mut incoming: Vec<Incoming> = Vec::new();
        let shutdown = self.shared.shutdown.clone();
        let socket = ws.socket();
        loop {
            match self.flush() {
                Flushed::Done | Flushed::Blocked => {}
                Flushed::Overflow => return End::Slow,
                Flushed::Gone => return End::Client,
            }
            while let Some(req) = self.requests.next() {
                self.start(req);
            }
            let blocked = self.outbox.stalled_since();
            let give_up =
                blocked.map_or_else(|| Instant::now() + slow, |t| Instant::from_std(t) + slow);

            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return End::Shutdown,
                // No progress for the slow-client timeout, even on a last try.
                _ = tokio::time::sleep_until(give_up), if blocked.is_some() => {
                    let _ = self.flush();
                    if self.outbox.stalled_since().is_some_and(|t| t.elapsed() >= slow) {
                        return End::Slow;
                    }
                }
                // The socket drains: write the rest (at the top of the loop).
                _ = socket.writable(), if blocked.is_some() => {}
                read = ws.read(&mut incoming), if self.requests.accepting() => {
                    last_seen = Instant::now();
                    match read {
                        Ok(()) => {}
                        Err(ReadError::TooLarge) => return End::TooLarge,
                        Err(ReadError::Protocol(why)) => {
                            tracing::debug!(conn = self.id, why, "WebSocket protocol violation");
                            return End::Protocol;
                        }
                        Err(ReadError::InvalidUtf8) => return End::InvalidUtf8,
                        Err(ReadError::Io(e)) => {
                            tracing::debug!(conn = self.id, error = %e, "socket read failed");
                            return End::Client;
                        }
                        Err(ReadError::Eof) => return End::Client,
                    }
                    for msg in incoming.drain(..) {
                        match msg {
                            Incoming::Text(t) => self.requests.push(protocol::parse(&t)),
                            Incoming::Binary => return End::Binary,
                            Incoming::Ping(payload) => {
                                self.outbox.push_frame(OutFrame::pong(payload));
                            }
                            Incoming::Pong => {}
                            Incoming::Close(code) => {
                                // Complete the closing handshake the client
                                // started (the decoder refused invalid codes).
                                let echo = code.unwrap_or(1000);
                                self.outbox.replace_with_close(OutFrame::close(echo, ""));
                                let _ = self.outbox.flush();
                                return End::Client;
                            }
                        }
                    }
                }
                done = self.requests.done(), if self.requests.busy() => {
                    match done {
                        Done::Added(e) => { self.subscriptions.insert(e); }
                        Done::Removed(e) => { self.subscriptions.remove(&e); }
                        Done::Unchanged => {}
                        Done::SessionExpired => return End::SessionExpired,
                    }
                }
                _ = ping.tick() => {
                    // While its requests pile up the socket is not read, so
                    // the client's pongs cannot count: not its silence.
                    let reading = self.requests.accepting();
                    if reading && last_seen.elapsed() >= interval * 2 {
                        return End::Silent;
                    }
                    self.outbox.push_frame(OutFrame::ping());
                }
                _ = self.outbox.wait() => {}
            }
        }
    }

    /// Writes what the outbox holds. Positions that went out (with a
    /// control message, or after the socket drained) arm the connection's
    /// tick, which its flusher shard keeps from here on.
    fn flush(&self) -> Flushed {
        let (flushed, tick) = self.outbox.flush();
        if let Some(at) = tick {
            self.shared.flusher.tick_at(&self.outbox, at);
        }
        flushed
    }

    fn reply_error(&self, e: ErrorReply) {
        inc(&self.shared.metrics.client_errors, "code", e.code.as_str());
        self.outbox.push_control(protocol::error(&e));
    }

    /// Handles a request; a subscribe continues in the background.
    fn start(&mut self, req: Result<Request, ErrorReply>) {
        let req = match req {
            Ok(r) => r,
            Err(e) => return self.reply_error(e),
        };
        let topic = req.topic();
        match req.kind {
            RequestKind::Unsubscribe => {
                self.subscriptions.remove(&req.event);
                if self.shared.registry.unsubscribe(req.event, self.id) {
                    self.shared.metrics.subscriptions.dec();
                }
                let reply = protocol::unsubscribed(&topic, req.id.as_deref());
                // A topic never subscribed has no index (and gets none: an
                // unsubscribe is not authorized, so it must not grow state).
                match self.shared.registry.existing_topic_idx(req.event) {
                    Some(idx) => self.outbox.remove_topic(idx, Some(reply)),
                    None => {
                        self.outbox.push_control(reply);
                    }
                }
            }
            RequestKind::Subscribe => {
                let max = self.shared.config.live_ws_max_subscriptions as usize;
                let held = self.subscriptions.contains(&req.event);
                if !held && self.subscriptions.len() >= max {
                    return self.reply_error(ErrorReply {
                        code: ErrorCode::TooManySubscriptions,
                        topic: Some(topic),
                        id: req.id,
                        message: "this connection holds the maximum number of subscriptions",
                    });
                }
                let event = req.event;
                let task = subscribe(
                    self.shared.clone(),
                    self.credential.clone(),
                    self.outbox.clone(),
                    self.identity.clone(),
                    self.id,
                    req,
                    held,
                );
                self.requests.start(event, Box::pin(task));
            }
        }
    }

    /// Removes every subscription of the connection, including one whose
    /// subscribe was still in flight, so the record path stops pushing.
    /// Runs again when the connection is dropped, however it ends (a task
    /// abandoned at the drain timeout too); it then finds nothing left.
    fn unregister(&mut self) {
        let pending = self.requests.abandon();
        for event in self.subscriptions.drain().chain(pending) {
            if self.shared.registry.unsubscribe(event, self.id) {
                self.shared.metrics.subscriptions.dec();
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.unregister();
        self.outbox.close();
    }
}

/// Authorize, register, snapshot, catch up, release: in this order, so that
/// no live position is lost between the snapshot and the stream, and none is
/// sent twice (see `outbox` and `snapshot`).
async fn subscribe(
    shared: Arc<Shared>,
    credential: Arc<Credential>,
    outbox: Arc<Outbox>,
    identity: Arc<Identity>,
    conn: ConnId,
    req: Request,
    held: bool,
) -> Done {
    let topic = req.topic();
    let m = &shared.metrics;
    let (authz, took) = shared
        .directus
        .authorize_event(&credential, req.event)
        .await;
    m.authz_latency_ms.observe(took.as_secs_f64() * 1000.0);
    inc(&m.authz, "result", authz.label());
    let refuse = |code, message| {
        inc(&m.client_errors, "code", ErrorCode::as_str(code));
        outbox.push_control(protocol::error(&ErrorReply {
            code,
            topic: Some(topic.clone()),
            id: req.id.clone(),
            message,
        }));
    };
    let revoked = match authz {
        Authz::Allowed => false,
        Authz::Error => {
            refuse(ErrorCode::Error, "authorization is unavailable; try again");
            return Done::Unchanged;
        }
        Authz::Forbidden => {
            refuse(ErrorCode::Forbidden, "you may not read this event");
            true
        }
        Authz::NotFound => {
            refuse(ErrorCode::NotFound, "no such event");
            true
        }
        Authz::SessionExpired => return Done::SessionExpired,
    };
    if revoked {
        // A user who lost access to a topic they hold loses the subscription.
        if held && shared.registry.unsubscribe(req.event, conn) {
            m.subscriptions.dec();
            if let Some(idx) = shared.registry.existing_topic_idx(req.event) {
                outbox.remove_topic(idx, None);
            }
            return Done::Removed(req.event);
        }
        return Done::Unchanged;
    }
    let idx = shared.registry.topic_idx(req.event);

    outbox.hold(idx);
    if shared
        .registry
        .subscribe(req.event, conn, &identity, &outbox)
    {
        m.subscriptions.inc();
    }
    // Registered first: whatever the snapshot lacks from here on is pushed
    // into the held topic, and `serve` adds what it lacks from before.
    if let Some(since) = req.since {
        // Past i64 is far in the future: the full snapshot.
        let since = i64::try_from(since).unwrap_or(i64::MAX);
        match snapshots::delta(req.event, since, &identity, outbox.deflate(), &shared.work).await {
            Ok(served) => {
                inc(&m.resumes, "result", "delta");
                m.snapshot_size.observe(served.view.len() as f64);
                let head = protocol::subscribed_head(&topic, req.id.as_deref(), true);
                let reply = subscribed_frame(head, &served, &outbox);
                let shed = outbox.release(idx, &served.view.covered, reply);
                m.conflated.inc_by(shed as u64);
                return Done::Added(req.event);
            }
            Err(full) => inc(&m.resumes, "result", full.label()),
        }
    }
    let sources = Sources {
        db: shared.db.clone(),
        timeout: shared.config.snapshot_timeout(),
        work: shared.work.clone(),
        metrics: shared.metrics.clone(),
    };
    let event = req.event;
    let build = move || snapshots::build(event, sources);
    let (snap, source) = shared
        .snapshots
        .get(req.event, &shared.connections, &shared.shutdown, build)
        .await
        // Stopped mid-build: the host is shutting down.
        .unwrap_or_else(|| (Arc::new(EventSnapshot::empty(req.event)), Source::Query));
    inc(&m.snapshots_served, "source", source.label());
    if snap.from_memory {
        m.snapshot_failures.inc();
    }
    let served = snapshots::serve(snap, idx, &identity, &outbox, &shared.work).await;
    m.snapshot_size.observe(served.view.len() as f64);
    m.snapshot_catch_up.inc_by(served.caught_up as u64);
    // The client's own head, then the body shared by its audience: one
    // frame, no copy.
    let head = protocol::subscribed_head(&topic, req.id.as_deref(), false);
    let reply = subscribed_frame(head, &served, &outbox);
    let shed = outbox.release(idx, &served.view.covered, reply);
    m.conflated.inc_by(shed as u64);
    Done::Added(req.event)
}

/// A `subscribed` reply: the client's own head, then the body shared by its
/// audience, as one frame of two pieces. Compressed, the head is a stored
/// block ahead of the body compressed once.
fn subscribed_frame(head: bytes::Bytes, served: &Served, outbox: &Outbox) -> OutFrame {
    match served.view.deflated().filter(|_| outbox.deflate()) {
        Some(body) => OutFrame::deflated_parts(deflate::stored(&head), body.clone()),
        None => OutFrame::text_parts(head, served.view.body.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(n: u128) -> Result<Request, ErrorReply> {
        Ok(Request {
            kind: RequestKind::Subscribe,
            event: Uuid::from_u128(n),
            id: None,
            since: None,
        })
    }

    fn event_of(r: Option<Result<Request, ErrorReply>>) -> Option<u128> {
        r.and_then(Result::ok).map(|r| r.event.as_u128())
    }

    #[test]
    fn one_request_in_flight_the_rest_wait_in_order() {
        let mut r = Requests::default();
        r.push(request(1));
        r.push(request(2));
        r.push(request(3));
        assert_eq!(event_of(r.next()), Some(1));
        r.start(Uuid::from_u128(1), Box::pin(std::future::pending()));
        assert!(r.busy());
        assert!(r.next().is_none(), "nothing starts while one is in flight");
        assert_eq!(r.abandon(), Some(Uuid::from_u128(1)));
        assert_eq!(event_of(r.next()), Some(2));
        assert_eq!(event_of(r.next()), Some(3));
        assert!(r.next().is_none());
    }

    #[test]
    fn a_full_queue_stops_reading_until_it_shrinks() {
        let mut r = Requests::default();
        r.start(Uuid::from_u128(0), Box::pin(std::future::pending()));
        for n in 0..MAX_QUEUED_REQUESTS {
            assert!(r.accepting(), "room for request {n}");
            r.push(request(n as u128));
        }
        assert!(!r.accepting());
        r.abandon();
        assert!(r.next().is_some());
        assert!(r.accepting());
    }

    #[tokio::test]
    async fn the_outcome_of_the_request_in_flight_frees_the_queue() {
        let mut r = Requests::default();
        let e = Uuid::from_u128(7);
        r.start(e, Box::pin(async move { Done::Added(e) }));
        r.push(request(8));
        assert!(matches!(r.done().await, Done::Added(got) if got == e));
        assert!(!r.busy());
        assert_eq!(event_of(r.next()), Some(8));
        // Without a request in flight, `done` never completes.
        let idle = tokio::time::timeout(Duration::from_millis(10), r.done()).await;
        assert!(idle.is_err());
    }
}
