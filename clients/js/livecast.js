// livecast JavaScript client: one live connection to `/ws-live`, kept up
// across drops, with the current position of every device per topic.
//
// Dependency-free ES module for browsers and Node (see node.js for the
// Node-only parts: credential headers and seeing a refused upgrade's status).
// The wire protocol is docs/protocol.md; the API is docs/client.md.

/** Default reconnect schedule: 1, 2, 4, 8, 16, 30, 30 … s, each shortened
 * by up to `jitter` of itself so that clients dropped together do not come
 * back together. */
export const DEFAULT_BACKOFF = Object.freeze({ initialMs: 1000, maxMs: 30000, jitter: 0.2 });

/** How long an upgrade may take before the attempt counts as failed. */
export const DEFAULT_CONNECT_TIMEOUT_MS = 10000;

/** Consecutive refused upgrades (the host answers plain HTTP but refuses the
 * WebSocket) after which the default browser check gives up as unauthorized:
 * with the default backoff about 15 s, which rides out a Directus restart. */
export const DEFAULT_MAX_REFUSALS = 5;

/** Error codes the host sends (docs/protocol.md §4), and the client's own. */
export const ERROR_CODES = Object.freeze([
  'bad-request',
  'unknown-topic',
  'too-many-subscriptions',
  'forbidden',
  'not-found',
  'error',
  // The client's own: a subscription ended by unsubscribe() or close(), a
  // subscribe() pending when the session was found unauthorized, a message
  // from the host that is not the protocol's.
  'unsubscribed',
  'closed',
  'unauthorized',
  'invalid-message',
]);

/** A protocol error, or the client's reason for rejecting a subscribe(). */
export class LivecastError extends Error {
  constructor(code, message, { topic, id, retrying = false } = {}) {
    super(message);
    this.name = 'LivecastError';
    this.code = code;
    this.topic = topic;
    this.id = id;
    /** True when the client retries by itself (the transient `error`). */
    this.retrying = retrying;
  }
}

const UUID_RE =
  /^(?:urn:uuid:)?\{?([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{12})\}?$/i;

/**
 * The canonical form of an `event:<uuid>` topic (`event:` and the lowercase
 * hyphenated UUID), as the host writes it in replies and positions. Any
 * other string is returned unchanged: the host decides what it means.
 */
export function canonicalTopic(topic) {
  if (typeof topic !== 'string' || !topic.startsWith('event:')) return topic;
  const m = UUID_RE.exec(topic.slice(6));
  if (!m) return topic;
  const braced = topic.includes('{');
  if (braced !== topic.endsWith('}')) return topic;
  return `event:${m.slice(1).join('-').toLowerCase()}`;
}

/** The topic of an event id. */
export function eventTopic(eventId) {
  return canonicalTopic(`event:${eventId}`);
}

/** `ws(s)://<host>/ws-live` of a page's location: where the endpoint is
 * behind the TRM proxy, on the page's own origin. */
export function defaultUrl(location = globalThis.location) {
  if (!location || !location.host) {
    throw new TypeError('livecast: no `url` given and no page location to derive it from');
  }
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/ws-live`;
}

/**
 * Decodes the protocol's attribute markers: `{"__bigint": "<decimal>"}`
 * becomes a BigInt, `{"__buffer_b64": "<base64>"}` a Uint8Array. Other
 * values are returned as they are.
 */
export function decodeAttribute(value) {
  if (value && typeof value === 'object' && !Array.isArray(value)) {
    const keys = Object.keys(value);
    if (keys.length === 1 && typeof value.__bigint === 'string') {
      try {
        return BigInt(value.__bigint);
      } catch {
        return value;
      }
    }
    if (keys.length === 1 && typeof value.__buffer_b64 === 'string') {
      try {
        const bin = atob(value.__buffer_b64);
        const out = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
        return out;
      } catch {
        return value;
      }
    }
  }
  return value;
}

/** A position's `attributes` with every marker decoded (a new object). */
export function decodeAttributes(attributes) {
  const out = {};
  for (const [k, v] of Object.entries(attributes ?? {})) out[k] = decodeAttribute(v);
  return out;
}

/**
 * A `checkAuth` for pages on the same origin as Directus (the TRM SPA:
 * `/api`): asks Directus whether the session cookie is still good. A
 * refused session means `unauthorized`; a good one means the upgrade failed
 * for another reason (an outage), and the client keeps trying.
 */
export function directusSessionCheck(baseUrl, { fetch = globalThis.fetch } = {}) {
  const url = `${String(baseUrl).replace(/\/+$/, '')}/users/me?fields=id`;
  return async () => {
    let response;
    try {
      response = await fetch(url, { credentials: 'include', cache: 'no-store' });
    } catch {
      return 'unknown';
    }
    if (response.status === 401 || response.status === 403) return 'unauthorized';
    if (!response.ok) return 'unknown';
    try {
      const body = await response.json();
      return body && body.data && body.data.id ? 'ok' : 'unauthorized';
    } catch {
      return 'unknown';
    }
  };
}

/**
 * The default `checkAuth` where the status of a refused upgrade cannot be
 * seen (a browser). A plain GET of the endpoint that the host answers with
 * 426 means the host is up and reachable, so the failed upgrade was refused:
 * 401 (no session), 403 (origin) or, rarely, 503 (Directus down). After
 * `maxRefusals` such failures in a row the client stops as unauthorized
 * instead of retrying for ever. A host that is down or restarting does not
 * answer 426 and never counts.
 */
export function refusalCheck({ maxRefusals = DEFAULT_MAX_REFUSALS, fetch = globalThis.fetch } = {}) {
  let refusals = 0;
  const check = async ({ url }) => {
    if (typeof fetch !== 'function') return 'unknown';
    let status = 0;
    try {
      const response = await fetch(url.replace(/^ws/i, 'http'), {
        cache: 'no-store',
        credentials: 'omit',
        redirect: 'manual',
      });
      status = response.status;
    } catch {
      status = 0;
    }
    if (status !== 426) {
      refusals = 0;
      return 'unknown';
    }
    refusals += 1;
    return refusals >= maxRefusals ? 'unauthorized' : 'unknown';
  };
  check.reset = () => {
    refusals = 0;
  };
  return check;
}

function isPosition(p) {
  return (
    p !== null &&
    typeof p === 'object' &&
    typeof p.deviceId === 'string' &&
    typeof p.ts === 'number' &&
    Number.isFinite(p.ts) &&
    typeof p.lat === 'number' &&
    typeof p.lon === 'number'
  );
}

/** A snapshot entry from a `position` message: the same object less
 * `type` and `topic`. */
function entryOf(msg) {
  const { type: _type, topic: _topic, ...entry } = msg;
  return entry;
}

const EMPTY = new Map();

/**
 * One live connection, shared by every topic it holds.
 *
 * It connects at once, reconnects after every drop with exponential backoff
 * and jitter, re-subscribes every topic it holds (resuming from the newest
 * `ts` it holds where the host supports `since`), and keeps per topic the
 * newest position of every device: a snapshot entry or a live position is
 * applied only when its `ts` is newer than the one held for its device.
 */
export class LivecastClient {
  #url;
  #WebSocket;
  #headers;
  #backoff;
  #connectTimeoutMs;
  #checkAuth;
  #resume;
  #random;

  /** @type {Map<string, {positions: Map<string, object>, reqId: string|null, subscribed: boolean, retries: number, retryTimer: any, waiters: Array<[Function, Function]>}>} */
  #topics = new Map();
  #conn = null;
  #state = { state: 'connecting', attempt: 0, failures: 0 };
  #failures = 0;
  #attempt = 0;
  #retryTimer = null;
  #nextId = 1;
  #stopped = false;
  /** Bumped by close() and reconnect(): late results of older attempts are ignored. */
  #generation = 0;
  #listeners = { state: new Set(), position: new Set(), snapshot: new Set(), error: new Set() };
  #onOnline = null;

  /**
   * @param {object} [options] see livecast.d.ts (`ClientOptions`).
   */
  constructor(options = {}) {
    this.#url = options.url ?? defaultUrl();
    this.#WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this.#WebSocket !== 'function') {
      throw new TypeError(
        'livecast: no WebSocket implementation (Node 20: run with --experimental-websocket, or pass `WebSocket`)',
      );
    }
    const headers = { ...(options.headers ?? {}) };
    if (options.cookie) headers.cookie = options.cookie;
    if (options.bearer) headers.authorization = `Bearer ${options.bearer}`;
    if (Object.keys(headers).length > 0 && typeof document !== 'undefined') {
      throw new TypeError('livecast: a browser sends its cookies itself; `headers`, `cookie` and `bearer` are for Node');
    }
    this.#headers = Object.keys(headers).length > 0 ? headers : null;
    this.#backoff = { ...DEFAULT_BACKOFF, ...(options.backoff ?? {}) };
    this.#connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    this.#checkAuth =
      options.checkAuth === false
        ? async () => 'unknown'
        : (options.checkAuth ?? refusalCheck({ maxRefusals: options.maxRefusals }));
    this.#resume = options.resume ?? true;
    this.#random = options.random ?? Math.random;
    this.#listenOnline();
    for (const [event, cb] of [
      ['state', options.onState],
      ['position', options.onPosition],
      ['snapshot', options.onSnapshot],
      ['error', options.onError],
    ]) {
      if (cb) this.#listeners[event].add(cb);
    }
    for (const topic of options.topics ?? []) this.subscribe(topic);
    this.#connect();
  }

  /** The WebSocket URL this client connects to. */
  get url() {
    return this.#url;
  }

  /** The connection's state (a copy). */
  get state() {
    return { ...this.#state };
  }

  /** Calls `cb(state)` on every change of the connection's state. Returns a function that removes it. */
  onState(cb) {
    return this.#on('state', cb);
  }

  /** Calls `cb(position, topic)` for every live position applied (newer than the one held for its device). */
  onPosition(cb) {
    return this.#on('position', cb);
  }

  /** Calls `cb({topic, delta, entries, positions})` when a snapshot has been merged. */
  onSnapshot(cb) {
    return this.#on('snapshot', cb);
  }

  /** Calls `cb(error)` with every error reply of the host (a LivecastError with its `code`). */
  onError(cb) {
    return this.#on('error', cb);
  }

  /** The current position of every device of `topic`, by device id (read-only; updated in place). */
  positions(topic) {
    return this.#topics.get(canonicalTopic(topic))?.positions ?? EMPTY;
  }

  /** The topics this client holds (subscribed or being subscribed). */
  topics() {
    return [...this.#topics.keys()];
  }

  /**
   * Holds `topic` (`event:<eventId>`) until unsubscribe(), across
   * reconnects. Resolves with its positions once its first snapshot is in;
   * rejects with a LivecastError if the host refuses it for good
   * (`forbidden`, `not-found`, …), if it is unsubscribed first, or if the
   * session is found unauthorized. A transient `error` reply is retried by
   * the client and does not reject. A rejection is also reported to
   * onError, so the promise may be ignored.
   */
  subscribe(topic) {
    const key = canonicalTopic(topic);
    if (typeof key !== 'string' || key.length === 0) {
      return Promise.reject(new LivecastError('unknown-topic', 'a topic is a string: event:<event uuid>'));
    }
    let t = this.#topics.get(key);
    if (!t) {
      t = { positions: new Map(), reqId: null, subscribed: false, retries: 0, retryTimer: null, waiters: [] };
      this.#topics.set(key, t);
      this.#sendSubscribe(key);
    }
    if (t.subscribed) return Promise.resolve(t.positions);
    let p;
    if (this.#state.state === 'unauthorized' || this.#state.state === 'stopped') {
      // Held for reconnect(), but nothing will answer before it.
      const code = this.#state.state === 'stopped' ? 'closed' : 'unauthorized';
      p = Promise.reject(new LivecastError(code, `the client is ${this.#state.state}`, { topic: key }));
    } else {
      p = new Promise((resolve, reject) => t.waiters.push([resolve, reject]));
    }
    // Marked handled: the rejection also goes to onError, and a caller that
    // does not await the promise must not get an unhandled rejection.
    p.catch(() => {});
    return p;
  }

  /** Lets go of `topic`: no more positions, its positions are forgotten. */
  unsubscribe(topic) {
    const key = canonicalTopic(topic);
    const t = this.#topics.get(key);
    if (!t) return;
    this.#dropTopic(key, t, new LivecastError('unsubscribed', 'unsubscribed', { topic: key }));
    if (this.#conn?.opened) this.#send(this.#conn, { type: 'unsubscribe', topic: key, id: this.#id() });
  }

  /** Connects now: after `unauthorized` (e.g. once the user signed in again), after close(), or to cut a backoff short. */
  reconnect() {
    this.#stopped = false;
    this.#listenOnline();
    this.#generation += 1;
    this.#failures = 0;
    this.#checkAuth.reset?.();
    if (this.#conn) {
      const conn = this.#conn;
      this.#conn = null;
      conn.done = true;
      this.#closeSocket(conn, 1000, 'reconnecting');
      this.#lost();
    }
    this.#connectNow();
  }

  /** Closes the connection for good (code 1000); pending subscribe() calls reject with `closed`. */
  close() {
    this.#stopped = true;
    this.#generation += 1;
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    if (this.#onOnline) globalThis.removeEventListener('online', this.#onOnline);
    this.#onOnline = null;
    for (const t of this.#topics.values()) {
      clearTimeout(t.retryTimer);
      t.retryTimer = null;
    }
    const conn = this.#conn;
    this.#conn = null;
    if (conn) {
      conn.done = true;
      this.#closeSocket(conn, 1000, 'client closed');
    }
    this.#rejectWaiters(new LivecastError('closed', 'the client was closed'));
    this.#setState({ state: 'stopped', failures: this.#failures });
  }

  // ---- connection ----------------------------------------------------

  #listenOnline() {
    if (this.#onOnline || typeof globalThis.addEventListener !== 'function' || typeof document === 'undefined') return;
    // Back online after a drop: try now instead of at the end of a long backoff.
    this.#onOnline = () => {
      if (this.#retryTimer !== null) this.#connectNow();
    };
    globalThis.addEventListener('online', this.#onOnline);
  }

  #connectNow() {
    clearTimeout(this.#retryTimer);
    this.#retryTimer = null;
    this.#connect();
  }

  #connect() {
    if (this.#stopped || this.#conn) return;
    this.#attempt += 1;
    const conn = {
      ws: null,
      opened: false,
      done: false,
      requests: new Map(),
      sinceRefused: false,
      timer: null,
      errorTimer: null,
    };
    this.#conn = conn;
    this.#setState({ state: 'connecting', attempt: this.#attempt, failures: this.#failures });
    try {
      conn.ws = this.#headers
        ? new this.#WebSocket(this.#url, { headers: this.#headers })
        : new this.#WebSocket(this.#url);
    } catch (e) {
      // A malformed URL or a blocked port: retried like any failed attempt.
      queueMicrotask(() => this.#ended(conn, 1006, String(e?.message ?? e)));
      return;
    }
    const ws = conn.ws;
    conn.timer = setTimeout(() => {
      if (!conn.opened) {
        this.#closeSocket(conn, 1000, 'connect timeout');
        this.#ended(conn, 1006, 'connect timeout');
      }
    }, this.#connectTimeoutMs);
    ws.addEventListener('open', () => this.#opened(conn));
    ws.addEventListener('message', (ev) => this.#message(conn, ev.data));
    ws.addEventListener('close', (ev) => this.#ended(conn, ev.code ?? 1006, ev.reason ?? ''));
    ws.addEventListener('error', () => {
      if (!conn.opened) {
        // Node's WebSocket (undici) fires `error` and never `close` when the
        // upgrade fails; a browser fires both. Either way the attempt is over.
        this.#ended(conn, 1006, '');
      } else if (conn.errorTimer === null) {
        // The close event follows with the real code; this only guards
        // against an implementation that never sends it.
        conn.errorTimer = setTimeout(() => this.#ended(conn, 1006, ''), 2000);
      }
    });
  }

  #opened(conn) {
    if (conn.done || conn !== this.#conn) return;
    conn.opened = true;
    clearTimeout(conn.timer);
    this.#checkAuth.reset?.();
    if (this.#topics.size === 0) this.#failures = 0;
    this.#setState({ state: 'open', attempt: this.#attempt, failures: this.#failures });
    for (const key of this.#topics.keys()) this.#sendSubscribe(key);
  }

  #closeSocket(conn, code, reason) {
    try {
      conn.ws?.close(code, reason);
    } catch {
      // Already closed, or closing in a state that does not allow it.
    }
  }

  async #ended(conn, code, reason) {
    if (conn.done) return;
    conn.done = true;
    clearTimeout(conn.timer);
    clearTimeout(conn.errorTimer);
    if (conn !== this.#conn) return;
    this.#conn = null;
    this.#lost();
    if (this.#stopped) return;
    const generation = this.#generation;
    let delay;
    if (!conn.opened) {
      let verdict = 'unknown';
      try {
        verdict = await this.#checkAuth({ url: this.#url, attempt: this.#attempt, failures: this.#failures });
      } catch {
        verdict = 'unknown';
      }
      if (generation !== this.#generation || this.#stopped) return;
      if (verdict === 'unauthorized') {
        this.#rejectWaiters(new LivecastError('unauthorized', 'the host refused the session'));
        this.#setState({ state: 'unauthorized', code, reason, failures: this.#failures + 1 });
        return;
      }
      delay = this.#delay(this.#failures);
      this.#failures += 1;
    } else if (code === 1008 && reason === 'session expired' && this.#failures === 0) {
      // The host asks for a reconnect with the current session (the
      // browser's cookie may have been refreshed meanwhile): at once. It
      // counts as a failure, so a host that keeps answering so backs off.
      delay = 0;
      this.#failures += 1;
    } else {
      delay = this.#delay(this.#failures);
      this.#failures += 1;
    }
    this.#setState({ state: 'closed', code, reason, retryInMs: delay, failures: this.#failures });
    this.#retryTimer = setTimeout(() => {
      this.#retryTimer = null;
      if (generation === this.#generation) this.#connect();
    }, delay);
  }

  /** The connection is gone: every topic waits for its re-subscribe. */
  #lost() {
    for (const t of this.#topics.values()) {
      t.reqId = null;
      clearTimeout(t.retryTimer);
      t.retryTimer = null;
    }
  }

  #delay(n) {
    const { initialMs, maxMs, jitter } = this.#backoff;
    const base = Math.min(maxMs, initialMs * 2 ** Math.min(n, 30));
    return Math.round(base * (1 - jitter * this.#random()));
  }

  // ---- requests --------------------------------------------------------

  #id() {
    return `lc${this.#nextId++}`;
  }

  #send(conn, frame) {
    try {
      conn.ws.send(JSON.stringify(frame));
    } catch {
      // The socket is closing: its close event re-subscribes everything.
    }
  }

  #sendSubscribe(key) {
    const conn = this.#conn;
    const t = this.#topics.get(key);
    if (!conn || !conn.opened || !t) return;
    const id = this.#id();
    const frame = { type: 'subscribe', topic: key, id };
    if (this.#resume && !conn.sinceRefused && t.positions.size > 0) {
      let since = 0;
      for (const p of t.positions.values()) if (p.ts > since) since = p.ts;
      since = Math.floor(since);
      if (Number.isSafeInteger(since) && since >= 0) frame.since = since;
    }
    t.reqId = id;
    conn.requests.set(id, { kind: 'subscribe', topic: key, since: frame.since });
    this.#send(conn, frame);
  }

  // ---- messages --------------------------------------------------------

  #message(conn, data) {
    if (conn.done || conn !== this.#conn) return;
    if (typeof data !== 'string') {
      this.#emitError(new LivecastError('invalid-message', 'the host sent a binary message'));
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this.#emitError(new LivecastError('invalid-message', 'the host sent a message that is not JSON'));
      return;
    }
    if (msg === null || typeof msg !== 'object') return;
    switch (msg.type) {
      case 'position':
        this.#position(msg);
        break;
      case 'subscribed':
        this.#subscribed(conn, msg);
        break;
      case 'error':
        this.#errorReply(conn, msg);
        break;
      case 'unsubscribed':
        conn.requests.delete(msg.id);
        break;
      default:
      // A message type from a newer host: ignored, as fields are.
    }
  }

  #position(msg) {
    const t = this.#topics.get(msg.topic);
    if (!t || !isPosition(msg)) return;
    const held = t.positions.get(msg.deviceId);
    if (held && !(msg.ts > held.ts)) return;
    const entry = entryOf(msg);
    t.positions.set(entry.deviceId, entry);
    this.#emit('position', entry, msg.topic);
  }

  #subscribed(conn, msg) {
    const req = conn.requests.get(msg.id);
    if (!req) return;
    conn.requests.delete(msg.id);
    const t = this.#topics.get(req.topic);
    // A reply to an older request of a topic let go (or asked again) since.
    if (!t || t.reqId !== msg.id) return;
    const entries = Array.isArray(msg.snapshot) ? msg.snapshot.filter(isPosition) : [];
    const delta = msg.delta === true;
    if (delta) {
      for (const e of entries) {
        const held = t.positions.get(e.deviceId);
        if (!held || e.ts > held.ts) t.positions.set(e.deviceId, e);
      }
    } else {
      // A full snapshot replaces the topic's devices, but never moves a
      // device back in time: a position held that is newer stays.
      const next = new Map();
      for (const e of entries) {
        const held = next.get(e.deviceId) ?? t.positions.get(e.deviceId);
        next.set(e.deviceId, held && held.ts >= e.ts ? held : e);
      }
      t.positions.clear();
      for (const [k, v] of next) t.positions.set(k, v);
    }
    t.subscribed = true;
    t.retries = 0;
    this.#failures = 0;
    const waiters = t.waiters;
    t.waiters = [];
    for (const [resolve] of waiters) resolve(t.positions);
    this.#emit('snapshot', { topic: req.topic, delta, entries, positions: t.positions });
  }

  #errorReply(conn, msg) {
    const code = typeof msg.code === 'string' ? msg.code : 'error';
    const message = typeof msg.message === 'string' ? msg.message : code;
    const req = msg.id === undefined ? undefined : conn.requests.get(msg.id);
    if (!req) {
      this.#emitError(new LivecastError(code, message, { topic: msg.topic, id: msg.id }));
      return;
    }
    conn.requests.delete(msg.id);
    const t = this.#topics.get(req.topic);
    if (req.kind !== 'subscribe' || !t || t.reqId !== msg.id) return;
    if (code === 'bad-request' && req.since !== undefined) {
      // A host without `since` (an older version): subscribe as before on
      // this connection, with a full snapshot.
      conn.sinceRefused = true;
      this.#sendSubscribe(req.topic);
      return;
    }
    if (code === 'error') {
      // Transient (Directus unavailable): the subscription is retried, and
      // a held one keeps streaming meanwhile.
      const delay = this.#delay(t.retries);
      t.retries += 1;
      t.reqId = null;
      clearTimeout(t.retryTimer);
      t.retryTimer = setTimeout(() => {
        t.retryTimer = null;
        if (this.#topics.get(req.topic) === t && t.reqId === null) this.#sendSubscribe(req.topic);
      }, delay);
      this.#emitError(new LivecastError(code, message, { topic: req.topic, id: msg.id, retrying: true }));
      return;
    }
    const error = new LivecastError(code, message, { topic: req.topic, id: msg.id });
    this.#dropTopic(req.topic, t, error);
    this.#emitError(error);
  }

  #dropTopic(key, t, error) {
    clearTimeout(t.retryTimer);
    this.#topics.delete(key);
    const waiters = t.waiters;
    t.waiters = [];
    for (const [, reject] of waiters) reject(error);
  }

  #rejectWaiters(error) {
    for (const [key, t] of this.#topics) {
      const waiters = t.waiters;
      t.waiters = [];
      for (const [, reject] of waiters) {
        reject(new LivecastError(error.code, error.message, { topic: key }));
      }
    }
  }

  // ---- events ----------------------------------------------------------

  #on(event, cb) {
    if (typeof cb !== 'function') throw new TypeError('livecast: a listener is a function');
    this.#listeners[event].add(cb);
    return () => this.#listeners[event].delete(cb);
  }

  #setState(state) {
    this.#state = state;
    this.#emit('state', { ...state });
  }

  #emitError(error) {
    this.#emit('error', error);
  }

  #emit(event, ...args) {
    for (const cb of this.#listeners[event]) {
      try {
        cb(...args);
      } catch (e) {
        // A listener's bug must not stop the client: report it where the
        // platform reports uncaught errors, after this message is handled.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

/** A LivecastClient (see its constructor). */
export function createClient(options) {
  return new LivecastClient(options);
}
