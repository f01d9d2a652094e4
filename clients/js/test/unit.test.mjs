// The client's own rules, message by message, with a scripted socket: the
// merge rules (including every shape of delta), the request shapes, the
// fallback for hosts without `since`, the backoff schedule. The same rules
// against a real host are in client.test.mjs.

import assert from 'node:assert/strict';
import { test } from 'node:test';

import {
  DEFAULT_BACKOFF,
  LivecastClient,
  canonicalTopic,
  decodeAttribute,
  decodeAttributes,
  eventTopic,
  refusalCheck,
} from '../livecast.js';

const EVENT = '0b6c7c1e-3a3b-4b8e-9d1a-2f6f5c4e8a10';
const TOPIC = `event:${EVENT}`;

/** A WebSocket the test plays the host of. */
function scripted() {
  const sockets = [];
  class Scripted extends EventTarget {
    constructor(url, init) {
      super();
      this.url = url;
      this.init = init;
      this.sent = [];
      this.closedWith = null;
      sockets.push(this);
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close(code, reason) {
      this.closedWith = [code, reason];
    }
    // The host's side:
    open() {
      this.dispatchEvent(new Event('open'));
    }
    receive(msg) {
      const ev = new Event('message');
      ev.data = typeof msg === 'string' ? msg : JSON.stringify(msg);
      this.dispatchEvent(ev);
    }
    drop(code = 1006, reason = '') {
      const ev = new Event('close');
      ev.code = code;
      ev.reason = reason;
      this.dispatchEvent(ev);
    }
    fail() {
      this.dispatchEvent(new Event('error'));
    }
    lastSubscribe() {
      return this.sent.filter((m) => m.type === 'subscribe').at(-1);
    }
  }
  return { WebSocket: Scripted, sockets };
}

function p(deviceId, ts, extra = {}) {
  return { deviceId, lat: 41.3, lon: 19.8, ts, ...extra };
}

function position(deviceId, ts) {
  return { type: 'position', topic: TOPIC, ...p(deviceId, ts) };
}

function tsMap(client) {
  return Object.fromEntries([...client.positions(TOPIC)].map(([k, v]) => [k, v.ts]));
}

/** A client on a scripted socket, subscribed to TOPIC with `snapshot`. */
function subscribed(t, snapshot, options = {}) {
  const { WebSocket, sockets } = scripted();
  const client = new LivecastClient({ url: 'ws://host.test/ws-live', WebSocket, checkAuth: false, ...options });
  t.after(() => client.close());
  const seen = { positions: [], snapshots: [], errors: [], states: [] };
  client.onPosition((pos) => seen.positions.push([pos.deviceId, pos.ts]));
  client.onSnapshot((s) => seen.snapshots.push(s));
  client.onError((e) => seen.errors.push(e));
  client.onState((s) => seen.states.push(s));
  const done = client.subscribe(TOPIC);
  const ws = sockets[0];
  ws.open();
  const sub = ws.lastSubscribe();
  ws.receive({ type: 'subscribed', topic: TOPIC, id: sub.id, snapshot });
  return { client, sockets, ws, seen, done };
}

/** Drops the connection and lets the retry timer (0 ms backoff) open the next one. */
async function reconnect(sockets) {
  sockets.at(-1).drop(1006);
  const count = sockets.length;
  for (let i = 0; i < 50 && sockets.length === count; i++) await new Promise((r) => setTimeout(r, 1));
  const ws = sockets.at(-1);
  assert.notEqual(sockets.length, count, 'a new connection');
  ws.open();
  return ws;
}

const INSTANT = { backoff: { initialMs: 0, maxMs: 0, jitter: 0 } };

test('canonical topics, attribute markers', () => {
  assert.equal(canonicalTopic(`event:${EVENT.toUpperCase()}`), TOPIC);
  assert.equal(canonicalTopic(`event:${EVENT.replaceAll('-', '')}`), TOPIC);
  assert.equal(canonicalTopic(`event:{${EVENT}}`), TOPIC);
  assert.equal(canonicalTopic(`event:urn:uuid:${EVENT}`), TOPIC);
  assert.equal(canonicalTopic(`event:{${EVENT}`), `event:{${EVENT}`, 'unbalanced brace: as written');
  assert.equal(canonicalTopic(`EVENT:${EVENT}`), `EVENT:${EVENT}`, 'the prefix is case-sensitive');
  assert.equal(canonicalTopic('device:1'), 'device:1');
  assert.equal(eventTopic(EVENT.toUpperCase()), TOPIC);

  assert.equal(decodeAttribute({ __bigint: '18446744073709551615' }), 18446744073709551615n);
  assert.deepEqual(decodeAttribute({ __buffer_b64: 'AQID' }), new Uint8Array([1, 2, 3]));
  assert.deepEqual(decodeAttribute({ __bigint: 'x' }), { __bigint: 'x' });
  assert.deepEqual(decodeAttribute({ __bigint: '1', other: 2 }), { __bigint: '1', other: 2 });
  assert.deepEqual(decodeAttributes({ 239: 1, 78: { __bigint: '7' } }), { 239: 1, 78: 7n });
});

test('snapshot, then live positions only when newer per device', async (t) => {
  const { client, ws, seen, done } = subscribed(t, [p('A', 100), p('B', 200)]);
  assert.equal(await done, client.positions(TOPIC));
  assert.deepEqual(tsMap(client), { A: 100, B: 200 });
  ws.receive(position('A', 150));
  ws.receive(position('A', 120)); // older than held
  ws.receive(position('A', 150)); // same ts again
  ws.receive(position('B', 250));
  ws.receive({ ...position('C', 10), topic: 'event:11111111-1111-4111-8111-111111111111' }); // not held
  ws.receive({ type: 'position', topic: TOPIC, deviceId: 'D', ts: 'soon' }); // malformed
  assert.deepEqual(seen.positions, [
    ['A', 150],
    ['B', 250],
  ]);
  assert.deepEqual(tsMap(client), { A: 150, B: 250 });
});

test('on reconnect: since is the newest ts held; a delta merges, a full snapshot replaces without regressing', async (t) => {
  const { client, sockets, seen } = subscribed(t, [p('A', 100), p('B', 200), p('C', 300)], INSTANT);
  sockets[0].receive(position('C', 350));

  let ws = await reconnect(sockets);
  let sub = ws.lastSubscribe();
  assert.deepEqual(sub, { type: 'subscribe', topic: TOPIC, id: sub.id, since: 350 });
  ws.receive({ type: 'subscribed', topic: TOPIC, id: sub.id, delta: true, snapshot: [p('A', 400), p('B', 150), p('D', 50)] });
  assert.deepEqual(tsMap(client), { A: 400, B: 200, C: 350, D: 50 }, 'delta: B not newer, C not listed: both kept');
  assert.equal(seen.snapshots.at(-1).delta, true);

  ws = await reconnect(sockets);
  sub = ws.lastSubscribe();
  assert.equal(sub.since, 400);
  ws.receive({ type: 'subscribed', topic: TOPIC, id: sub.id, snapshot: [p('A', 300), p('B', 500)] });
  assert.deepEqual(tsMap(client), { A: 400, B: 500 }, 'full: C and D gone, A not moved back');
  assert.equal(seen.snapshots.at(-1).delta, false);

  // Live positions after a full snapshot still may not regress.
  ws.receive(position('A', 350));
  ws.receive(position('A', 450));
  assert.deepEqual(seen.positions.slice(-1), [['A', 450]]);
});

test('a host without since: bad-request, then the same subscribe without it on that connection', async (t) => {
  const { client, sockets, seen } = subscribed(t, [p('A', 100)], INSTANT);
  const other = 'event:22222222-2222-4222-8222-222222222222';
  client.subscribe(other);
  const ws0 = sockets[0];
  ws0.receive({ type: 'subscribed', topic: other, id: ws0.lastSubscribe().id, snapshot: [p('Z', 7)] });

  const ws = await reconnect(sockets);
  const [first, second] = ws.sent;
  assert.equal(first.since, 100);
  assert.equal(second.since, 7);
  ws.receive({ type: 'error', code: 'bad-request', topic: TOPIC, id: first.id, message: 'no since' });
  ws.receive({ type: 'error', code: 'bad-request', topic: other, id: second.id, message: 'no since' });
  const again = ws.sent.slice(2);
  assert.deepEqual(
    again.map((m) => [m.topic, m.since]),
    [
      [TOPIC, undefined],
      [other, undefined],
    ],
  );
  assert.deepEqual(seen.errors, [], 'not an error for the application');
  ws.receive({ type: 'subscribed', topic: TOPIC, id: again[0].id, snapshot: [p('A', 100)] });
  assert.deepEqual(tsMap(client), { A: 100 });

  // A bad-request to a subscribe without since is the host's last word.
  const ws2 = await reconnect(sockets);
  assert.equal(ws2.sent[0].since, 100, 'each connection tries since again');
});

test('resume: false never sends since', async (t) => {
  const { sockets } = subscribed(t, [p('A', 100)], { ...INSTANT, resume: false });
  const ws = await reconnect(sockets);
  assert.equal(ws.lastSubscribe().since, undefined);
});

test('replies are matched by id: a late reply to a topic let go is ignored', (t) => {
  const { client, ws } = subscribed(t, [p('A', 100)]);
  const other = 'event:33333333-3333-4333-8333-333333333333';
  const first = client.subscribe(other);
  const firstId = ws.lastSubscribe().id;
  client.unsubscribe(other);
  const second = client.subscribe(other);
  const secondId = ws.lastSubscribe().id;
  assert.deepEqual(
    ws.sent.slice(-3).map((m) => m.type),
    ['subscribe', 'unsubscribe', 'subscribe'],
  );
  ws.receive({ type: 'subscribed', topic: other, id: firstId, snapshot: [p('OLD', 1)] });
  ws.receive({ type: 'unsubscribed', topic: other, id: ws.sent.at(-2).id });
  assert.equal(client.positions(other).size, 0, 'the reply to the first subscribe is stale');
  ws.receive({ type: 'subscribed', topic: other, id: secondId, snapshot: [p('NEW', 2)] });
  assert.deepEqual([...client.positions(other).keys()], ['NEW']);
  return Promise.all([assert.rejects(first, { code: 'unsubscribed' }), second]);
});

test('refused topics are dropped and reported; a transient error is retried', async (t) => {
  const { client, ws, seen } = subscribed(t, [], { backoff: { initialMs: 1, maxMs: 1, jitter: 0 } });
  const other = 'event:44444444-4444-4444-8444-444444444444';
  const refused = client.subscribe(other);
  ws.receive({ type: 'error', code: 'forbidden', topic: other, id: ws.lastSubscribe().id, message: 'you may not read this event' });
  await assert.rejects(refused, { code: 'forbidden', topic: other, message: 'you may not read this event' });
  assert.deepEqual(client.topics(), [TOPIC]);

  const later = client.subscribe(other);
  const id = ws.lastSubscribe().id;
  ws.receive({ type: 'error', code: 'error', topic: other, id, message: 'authorization is unavailable; try again' });
  assert.equal(seen.errors.at(-1).retrying, true);
  assert.ok(client.topics().includes(other), 'kept while retrying');
  for (let i = 0; i < 50 && ws.lastSubscribe().id === id; i++) await new Promise((r) => setTimeout(r, 1));
  const retry = ws.lastSubscribe();
  assert.notEqual(retry.id, id);
  ws.receive({ type: 'subscribed', topic: other, id: retry.id, snapshot: [] });
  await later;
  assert.deepEqual(
    seen.errors.map((e) => e.code),
    ['forbidden', 'error'],
  );
});

test('the default backoff: 1, 2, 4, 8, 16, 30, 30 s, shortened by up to a fifth', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  for (const [random, factor] of [
    [0, 1],
    [1, 1 - DEFAULT_BACKOFF.jitter],
  ]) {
    const { WebSocket, sockets } = scripted();
    const client = new LivecastClient({ url: 'ws://host.test/ws-live', WebSocket, checkAuth: false, random: () => random });
    const delays = [];
    client.onState((s) => s.state === 'closed' && delays.push(s.retryInMs));
    for (let n = 0; n < 7; n++) {
      sockets.at(-1).fail();
      await new Promise((r) => setImmediate(r));
      t.mock.timers.tick(delays.at(-1));
    }
    assert.deepEqual(
      delays,
      [1000, 2000, 4000, 8000, 16000, 30000, 30000].map((d) => Math.round(d * factor)),
    );
    assert.equal(sockets.length, 8);
    client.close();
  }
});

test('an error before open ends the attempt once, whether or not close follows', async (t) => {
  const { WebSocket, sockets } = scripted();
  const client = new LivecastClient({ url: 'ws://host.test/ws-live', WebSocket, checkAuth: false, backoff: { initialMs: 60000 } });
  t.after(() => client.close());
  const states = [];
  client.onState((s) => states.push(s.state));
  sockets[0].fail(); // Node: error only
  sockets[0].drop(1006); // a browser: error, then close
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(states, ['closed']);
});

test('a session expired close reconnects at once, but only once in a row', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { WebSocket, sockets } = scripted();
  const client = new LivecastClient({ url: 'ws://host.test/ws-live', WebSocket, checkAuth: false, random: () => 0 });
  t.after(() => client.close());
  client.subscribe(TOPIC);
  const delays = [];
  client.onState((s) => s.state === 'closed' && delays.push(s.retryInMs));
  sockets[0].open();
  sockets[0].drop(1008, 'session expired');
  await new Promise((r) => setImmediate(r));
  t.mock.timers.tick(0);
  // The host answers the re-subscribe by closing again: now it backs off.
  sockets[1].open();
  sockets[1].drop(1008, 'session expired');
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(delays, [0, 2000]);
});

test('the browser check: only a host that answers 426 counts as refusing, up to maxRefusals in a row', async () => {
  const answers = [426, 426, 502, 426, 426, 'network', 426, 426, 426];
  const fetch = async () => {
    const a = answers.shift();
    if (a === 'network') throw new TypeError('failed to fetch');
    return { status: a };
  };
  const check = refusalCheck({ maxRefusals: 3, fetch });
  const verdicts = [];
  for (let i = 0; i < 9; i++) verdicts.push(await check({ url: 'wss://trm.test/ws-live' }));
  assert.deepEqual(verdicts, ['unknown', 'unknown', 'unknown', 'unknown', 'unknown', 'unknown', 'unknown', 'unknown', 'unauthorized']);
});

test('after close(), subscribe() rejects at once and keeps the topic for reconnect()', async (t) => {
  const { WebSocket, sockets } = scripted();
  const client = new LivecastClient({ url: 'ws://host.test/ws-live', WebSocket, checkAuth: false });
  t.after(() => client.close());
  client.close();
  await assert.rejects(client.subscribe(TOPIC), { code: 'closed', topic: TOPIC });
  assert.deepEqual(client.topics(), [TOPIC]);
  client.reconnect();
  sockets.at(-1).open();
  assert.equal(sockets.at(-1).lastSubscribe().topic, TOPIC);
});

test('headers are for Node only; a missing WebSocket says how to get one', () => {
  const saved = Object.getOwnPropertyDescriptor(globalThis, 'WebSocket');
  Object.defineProperty(globalThis, 'WebSocket', { value: undefined, configurable: true, writable: true });
  try {
    assert.throws(() => new LivecastClient({ url: 'ws://h/ws-live' }), /experimental-websocket/);
  } finally {
    if (saved) Object.defineProperty(globalThis, 'WebSocket', saved);
    else delete globalThis.WebSocket;
  }
  globalThis.document = {};
  try {
    assert.throws(
      () => new LivecastClient({ url: 'ws://h/ws-live', WebSocket: scripted().WebSocket, cookie: 'a=b' }),
      /browser sends its cookies/,
    );
  } finally {
    delete globalThis.document;
  }
});
