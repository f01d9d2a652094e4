// The client against a real livecast host, Redis and PostgreSQL (through
// the fixture binary), over Node's own WebSocket.
//
//   cargo build -p livecast-tests --bin livecast-fixture
//   node --experimental-websocket --test clients/js/test/

import assert from 'node:assert/strict';
import { test } from 'node:test';

import { DEFAULT_MAX_REFUSALS, createClient, createNodeClient } from '../node.js';
import { EVENTUALLY, SOON, TIRANA, fixture, observe, quiet, recordingWebSocket, until, withTimeout } from './harness.mjs';

const A = '356307042441013';
const B = '356307042441014';
const C = '356307042441015';
const [LAT, LON] = TIRANA;
// A test that hangs fails instead (a failing one takes well under this).
const LIMIT = { timeout: 60000 };
// Long enough for a retry at the backoff these tests use (50 ms) to show.
const QUIET_RETRY = 500;

/** A fixture with one event of `devices`, a user who may read it, and a running host. */
async function world(t, { devices = [A, B], start = {} } = {}) {
  const f = await fixture();
  t.after(() => f.close());
  const { event } = await f.cmd({ cmd: 'event', devices });
  const { cookie } = await f.cmd({ cmd: 'user', token: 'user', events: [event] });
  const { ws } = await f.cmd({ cmd: 'start', ...start });
  return { f, event, topic: `event:${event}`, cookie, ws };
}

/** A Node client that the test closes when it ends. */
function client(t, options) {
  const c = createNodeClient(options);
  t.after(() => c.close());
  return c;
}

/** A subscribed client that records its socket and what it reports. */
async function watching(t, { topic, cookie, ws }) {
  const { WebSocket, log } = recordingWebSocket();
  const c = client(t, { url: ws, cookie, WebSocket, backoff: { initialMs: 100 } });
  const seen = observe(c);
  await soon(c.subscribe(topic));
  return { c, log, seen };
}

/** Publishes each [device, ts] and waits until the client holds them all. */
async function holds(f, c, topic, fixes) {
  for (const [device, ts] of fixes) await publish(f, device, ts);
  await until(() => fixes.every(([device, ts]) => tsOf(c, topic, device) === ts), `${JSON.stringify(fixes)} held`);
}

/** Integer ms, a little in the past, so every test record is a valid fix. */
function base() {
  return Date.now() - 60000;
}

function publish(f, device, ts, extra = {}) {
  return f.cmd({ cmd: 'publish', device, ts, lat: LAT, lon: LON, ...extra });
}

/** `promise` within SOON. */
function soon(promise) {
  return withTimeout(promise, SOON, 'the subscription');
}

function tsOf(c, topic, device) {
  return c.positions(topic).get(device)?.ts;
}

test('merges the snapshot, then applies live positions per device', LIMIT, async (t) => {
  const { f, event, topic, cookie, ws } = await world(t);
  const t0 = base();
  await f.cmd({ cmd: 'row', device: A, ts: t0, lat: LAT, lon: LON });
  const c = client(t, { url: ws, cookie });
  const seen = observe(c);

  // The topic as the user wrote it; the client holds it in canonical form.
  const positions = await soon(c.subscribe(`event:${event.toUpperCase()}`));
  assert.deepEqual(c.topics(), [topic]);
  assert.equal(positions, c.positions(topic));
  assert.deepEqual([...positions.keys()], [A]);
  assert.equal(positions.get(A).ts, t0);
  assert.equal(seen.snapshots.length, 1);
  assert.equal(seen.snapshots[0].delta, false);

  await publish(f, B, t0 + 1000, { speed: 63, course: 271 });
  await publish(f, A, t0 + 2000);
  await until(() => tsOf(c, topic, A) === t0 + 2000, 'the live position of A');
  assert.equal(tsOf(c, topic, B), t0 + 1000);
  const b = c.positions(topic).get(B);
  assert.equal(b.speed, 63);
  assert.equal(b.course, 271);
  assert.equal(b.type, undefined, 'a held position is an entry: no type');
  assert.equal(b.attributes['78'].__bigint, '18446744073709551615');
  assert.deepEqual(
    seen.positions.map((p) => [p.deviceId, p.ts, p.topic]),
    [
      [B, t0 + 1000, topic],
      [A, t0 + 2000, topic],
    ],
  );
  assert.deepEqual(seen.errors, []);
});

test('after the host restarts it reconnects with growing backoff and re-subscribes every topic', LIMIT, async (t) => {
  const f = await fixture();
  t.after(() => f.close());
  const { event: e1 } = await f.cmd({ cmd: 'event', devices: [A] });
  const { event: e2 } = await f.cmd({ cmd: 'event', devices: [B] });
  const { cookie } = await f.cmd({ cmd: 'user', token: 'user', events: [e1, e2] });
  const { ws } = await f.cmd({ cmd: 'start' });
  const { WebSocket, log } = recordingWebSocket();
  const initialMs = 100;
  const c = client(t, { url: ws, cookie, WebSocket, backoff: { initialMs, maxMs: 2000 } });
  const seen = observe(c);
  await soon(c.subscribe(`event:${e1}`));
  await soon(c.subscribe(`event:${e2}`));
  const t0 = base();

  await f.cmd({ cmd: 'stop' });
  // The host closes with 1001; the client then fails to connect, again and
  // again, waiting longer each time.
  await until(() => seen.states.filter((s) => s.state === 'closed').length >= 5, 'five failed attempts', EVENTUALLY);
  const closed = seen.states.filter((s) => s.state === 'closed');
  assert.equal(closed[0].code, 1001);
  closed.forEach((s, n) => {
    const full = initialMs * 2 ** n;
    assert.ok(s.retryInMs <= full && s.retryInMs >= full * 0.8, `retry ${n}: ${s.retryInMs} ms, expected ${full} ms less jitter`);
    assert.equal(s.failures, n + 1);
  });
  assert.ok(!seen.states.some((s) => s.state === 'unauthorized'), 'a host that is down is not a refused session');

  const sentBefore = log.sent.length;
  await f.cmd({ cmd: 'start' });
  await until(() => seen.snapshots.length >= 4, 'both topics subscribed again', EVENTUALLY);
  const resent = log.sent.slice(sentBefore).filter((m) => m.type === 'subscribe');
  assert.deepEqual(resent.map((m) => m.topic).sort(), [`event:${e1}`, `event:${e2}`].sort());

  await publish(f, A, t0 + 1);
  await publish(f, B, t0 + 2);
  await until(() => tsOf(c, `event:${e1}`, A) === t0 + 1 && tsOf(c, `event:${e2}`, B) === t0 + 2, 'positions on both topics');

  // A subscribed reply reset the backoff: the next drop waits the first step again.
  const before = seen.states.length;
  await f.cmd({ cmd: 'stop' });
  await until(() => seen.states.slice(before).find((s) => s.state === 'closed'), 'the next drop');
  const next = seen.states.slice(before).find((s) => s.state === 'closed');
  assert.ok(next.retryInMs <= initialMs, `first retry after a good connection: ${next.retryInMs} ms`);
  assert.equal(next.failures, 1);
});

test('on reconnect it resumes from the newest ts it holds (since), keeping devices a delta leaves out', LIMIT, async (t) => {
  // Through a proxy, so the connection drops while the host keeps reading
  // the stream: the case resume is for.
  const w = await world(t, { start: { proxy: true } });
  const { f, topic } = w;
  const { c, log, seen } = await watching(t, w);
  // Fix times near the host's clock: it answers a delta only for a since
  // its memory covers (it has read the stream since then, less
  // LIVE_RESUME_SLACK_MS, 300 ms in the fixture).
  const t0 = Date.now() - 1500;
  await holds(f, c, topic, [
    [A, t0 + 1000],
    [B, t0 + 2000],
  ]);

  await f.cmd({ cmd: 'proxy-down' });
  await until(() => c.state.state === 'closed', 'the drop');
  await publish(f, A, t0 + 3000); // reaches the host while the client is away
  // A since ahead of the host's clock would get the full snapshot.
  await until(() => Date.now() > t0 + 2100, 'the clock past since');
  const sentBefore = log.sent.length;
  const snapshotsBefore = seen.snapshots.length;
  await f.cmd({ cmd: 'proxy-up' });
  await until(() => seen.snapshots.length > snapshotsBefore, 'the re-subscribe', EVENTUALLY);

  const resubscribe = log.sent.slice(sentBefore).find((m) => m.type === 'subscribe');
  assert.equal(resubscribe.since, t0 + 2000, 'since is the newest ts held for the topic');
  assert.equal(resubscribe.topic, topic);
  const reply = log.received.find((m) => m.id === resubscribe.id);
  const snapshot = seen.snapshots.at(-1);
  assert.equal(reply.type, 'subscribed');
  assert.equal(reply.delta, true, 'the host saw the stream all along: a delta');
  assert.equal(snapshot.delta, true);
  const entries = snapshot.entries.map((e) => `${e.deviceId}@${e.ts}`);
  assert.ok(entries.includes(`${A}@${t0 + 3000}`), `A moved while away: ${entries}`);
  // B is not newer than since; docs/protocol.md lets the host list it all
  // the same if it reached the host after since − slack (by its clock).
  assert.deepEqual(
    entries.filter((e) => e !== `${A}@${t0 + 3000}` && e !== `${B}@${t0 + 2000}`),
    [],
    'nothing else in the delta',
  );
  // Either way: A moved on, B is kept as it was.
  assert.equal(tsOf(c, topic, A), t0 + 3000);
  assert.equal(tsOf(c, topic, B), t0 + 2000);
  assert.deepEqual(
    seen.errors.map((e) => e.code),
    [],
    'falling back from since is not an error the application sees',
  );
});

test('a live position older than the one held is ignored, even when the host sends it after a restart', LIMIT, async (t) => {
  const w = await world(t);
  const { f, topic } = w;
  const { c, log, seen } = await watching(t, w);
  const t0 = base();
  await holds(f, c, topic, [
    [A, t0 + 3000],
    [B, t0 + 3000],
  ]);

  // The restarted host has an empty memory and a database behind the
  // stream: its snapshot has A at t1 and no B at all.
  await f.cmd({ cmd: 'stop' });
  await f.cmd({ cmd: 'row', device: A, ts: t0 + 1000, lat: LAT, lon: LON });
  const snapshots = seen.snapshots.length;
  await f.cmd({ cmd: 'start' });
  await until(() => seen.snapshots.length > snapshots, 'the snapshot after the restart', EVENTUALLY);
  const full = seen.snapshots.at(-1);
  assert.equal(full.delta, false);
  assert.deepEqual(full.entries.map((e) => [e.deviceId, e.ts]), [[A, t0 + 1000]]);
  // A full snapshot replaces the devices (B is gone) but never moves one back.
  assert.deepEqual([...c.positions(topic).keys()], [A]);
  assert.equal(tsOf(c, topic, A), t0 + 3000);

  // The host has not seen A at t3, so it sends t2; the client keeps t3.
  const before = seen.positions.length;
  await publish(f, A, t0 + 2000);
  await publish(f, A, t0 + 4000);
  await until(() => tsOf(c, topic, A) === t0 + 4000, 'A at t4');
  await quiet();
  assert.ok(
    log.received.some((m) => m.type === 'position' && m.deviceId === A && m.ts === t0 + 2000),
    'the host did send the older position: the client is what dropped it',
  );
  assert.deepEqual(
    seen.positions.slice(before).map((p) => p.ts),
    [t0 + 4000],
  );
});

test('a refused session (401) stops the client instead of retrying for ever', LIMIT, async (t) => {
  const { f, topic, ws } = await world(t);
  const { WebSocket, log } = recordingWebSocket();
  const c = client(t, { url: ws, cookie: 'directus_session_token=expired', WebSocket, backoff: { initialMs: 50 } });
  const seen = observe(c);
  const subscribed = c.subscribe(topic);
  await assert.rejects(soon(subscribed), { code: 'unauthorized' });
  assert.equal(c.state.state, 'unauthorized');
  assert.equal(log.opened, 1, 'Node sees the 401 of the first attempt');
  const calls = (await f.cmd({ cmd: 'stats' })).users_me_calls;
  await quiet(QUIET_RETRY);
  assert.equal(log.opened, 1, 'no further attempt');
  assert.equal((await f.cmd({ cmd: 'stats' })).users_me_calls, calls, 'no further Directus call');
  assert.deepEqual(
    seen.states.map((s) => s.state),
    ['unauthorized'],
  );
  assert.deepEqual(c.topics(), [topic], 'the topic is kept for when the session is back');

  // Signed in again: reconnect() picks up where it stopped.
  await f.cmd({ cmd: 'user', token: 'expired', events: [topic.slice(6)] });
  c.reconnect();
  await until(() => seen.snapshots.length === 1, 'the subscription after reconnect()');
  assert.equal(c.state.state, 'open');
});

test('without the Node probe (as in a browser) refused upgrades stop the client after a few tries', LIMIT, async (t) => {
  const { ws } = await world(t);
  const { WebSocket, log } = recordingWebSocket();
  // createClient is the browser's entry point: it cannot read the status of
  // a refused upgrade, only that the host answers plain HTTP (426).
  const c = createClient({ url: ws, headers: { cookie: 'directus_session_token=nope' }, WebSocket, backoff: { initialMs: 50 } });
  t.after(() => c.close());
  await until(() => c.state.state === 'unauthorized', 'unauthorized', EVENTUALLY);
  assert.equal(log.opened, DEFAULT_MAX_REFUSALS);
  await quiet(QUIET_RETRY);
  assert.equal(log.opened, DEFAULT_MAX_REFUSALS, 'no further attempt');
});

test('an outage is not a refused session: a host or a Directus that is down is retried', LIMIT, async (t) => {
  const { f, topic, cookie, ws } = await world(t);
  const backoff = { initialMs: 50, maxMs: 200 };
  // Node reads the 503 of each refused upgrade.
  await f.cmd({ cmd: 'directus-down' });
  const node = client(t, { url: ws, cookie, backoff });
  const nodeSeen = observe(node);
  const nodeSubscribed = node.subscribe(topic);
  await until(() => nodeSeen.states.filter((s) => s.state === 'closed').length >= 6, 'six failed attempts', EVENTUALLY);
  await f.cmd({ cmd: 'directus-up' });
  await withTimeout(nodeSubscribed, EVENTUALLY, 'the subscription');
  assert.ok(!nodeSeen.states.some((s) => s.state === 'unauthorized'), 'Directus down (503) is not unauthorized');

  // The browser's check sees a host that does not answer at all.
  await f.cmd({ cmd: 'stop' });
  const browser = createClient({ url: ws, headers: { cookie }, backoff });
  t.after(() => browser.close());
  const browserSeen = observe(browser);
  const browserSubscribed = browser.subscribe(topic);
  await until(() => browserSeen.states.filter((s) => s.state === 'closed').length >= 6, 'six failed attempts', EVENTUALLY);
  await f.cmd({ cmd: 'start' });
  await withTimeout(browserSubscribed, EVENTUALLY, 'the subscription');
  assert.ok(!browserSeen.states.some((s) => s.state === 'unauthorized'), 'a host that is down is not unauthorized');
});

test('a session that expires while connected: 1008, reconnect at once, then unauthorized', LIMIT, async (t) => {
  const f = await fixture();
  t.after(() => f.close());
  const { event: e1 } = await f.cmd({ cmd: 'event', devices: [A] });
  const { event: e2 } = await f.cmd({ cmd: 'event', devices: [B] });
  const { cookie } = await f.cmd({ cmd: 'user', token: 'user', events: [e1, e2] });
  const { ws } = await f.cmd({ cmd: 'start' });
  const c = client(t, { url: ws, cookie });
  const seen = observe(c);
  await soon(c.subscribe(`event:${e1}`));
  await f.cmd({ cmd: 'end-session', token: 'user' });
  // Held subscriptions keep streaming; the next subscribe finds the session gone.
  await assert.rejects(soon(c.subscribe(`event:${e2}`)), { code: 'unauthorized' });
  assert.deepEqual(
    seen.states.map((s) => s.state),
    ['open', 'closed', 'connecting', 'unauthorized'],
  );
  const closed = seen.states.find((s) => s.state === 'closed');
  assert.equal(closed.code, 1008);
  assert.equal(closed.reason, 'session expired');
  assert.equal(closed.retryInMs, 0);
});

test('error replies: forbidden and not-found end that topic only, a transient error is retried', LIMIT, async (t) => {
  const { f, topic, cookie, ws } = await world(t);
  const { event: other } = await f.cmd({ cmd: 'event', devices: [C] }); // the user may not read it
  const c = client(t, { url: ws, cookie, backoff: { initialMs: 50 } });
  const seen = observe(c);
  await soon(c.subscribe(topic));

  await assert.rejects(soon(c.subscribe(`event:${other}`)), { code: 'forbidden', topic: `event:${other}` });
  await assert.rejects(soon(c.subscribe('event:00000000-0000-4000-8000-000000000000')), { code: 'not-found' });
  await assert.rejects(soon(c.subscribe('device:356307042441013')), { code: 'unknown-topic' });
  assert.deepEqual(c.topics(), [topic]);
  assert.deepEqual(
    seen.errors.map((e) => e.code),
    ['forbidden', 'not-found', 'unknown-topic'],
  );

  // Directus unavailable at subscribe: `error`, retried until it answers.
  const { event: third } = await f.cmd({ cmd: 'event', devices: [C] });
  await f.cmd({ cmd: 'user', token: 'user', events: [topic.slice(6), third] });
  await f.cmd({ cmd: 'directus-down' });
  const later = c.subscribe(`event:${third}`);
  await until(() => seen.errors.length === 4, 'the transient error');
  assert.equal(seen.errors[3].code, 'error');
  assert.equal(seen.errors[3].retrying, true);
  await f.cmd({ cmd: 'directus-up' });
  await soon(later);
  assert.deepEqual(c.topics().sort(), [topic, `event:${third}`].sort());
  assert.equal(c.state.state, 'open', 'on the same connection');
  assert.equal(seen.states.filter((s) => s.state === 'open').length, 1);
});

test('unsubscribe: no more positions, nothing held', LIMIT, async (t) => {
  const w = await world(t);
  const { f, topic } = w;
  const { c, log, seen } = await watching(t, w);
  const t0 = base();
  await holds(f, c, topic, [[A, t0]]);
  c.unsubscribe(topic);
  assert.deepEqual(c.topics(), []);
  assert.equal(c.positions(topic).size, 0);
  await until(() => log.received.some((m) => m.type === 'unsubscribed'), 'unsubscribed');
  await publish(f, A, t0 + 1000);
  await quiet();
  assert.equal(seen.positions.length, 1);
  assert.equal(c.positions(topic).size, 0);
  assert.equal((await f.cmd({ cmd: 'stats' })).subscriptions, 0);
});

test('close() ends the connection for good and rejects pending subscribes', LIMIT, async (t) => {
  const { topic, cookie, ws } = await world(t);
  const c = createNodeClient({ url: ws, cookie });
  const seen = observe(c);
  const pending = c.subscribe(topic);
  c.close();
  await assert.rejects(soon(pending), { code: 'closed' });
  assert.equal(c.state.state, 'stopped');
  await quiet();
  assert.deepEqual(
    seen.states.map((s) => s.state),
    ['stopped'],
  );
});
