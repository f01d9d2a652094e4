// Type declarations of livecast.js (the browser and Node entry point).
// The wire protocol is docs/protocol.md; the API, with an example, is
// docs/client.md.

/** A device's position: a snapshot entry, or a `position` message less `type` and `topic`. */
export interface Position {
  /** The tracker's IMEI. */
  deviceId: string;
  /** Degrees. */
  lat: number;
  /** Degrees. */
  lon: number;
  /** Fix time, epoch milliseconds. */
  ts: number;
  /** km/h; absent when 0. */
  speed?: number;
  /** Degrees clockwise from north; absent when 0. */
  course?: number;
  accuracy?: number;
  /** Teltonika IO elements by IO id; `__bigint` / `__buffer_b64` markers undecoded (see decodeAttributes). */
  attributes?: Record<string, unknown>;
  /** Fields a newer host may add. */
  [field: string]: unknown;
}

export type ConnectionState =
  /** An attempt to open the WebSocket is under way (`attempt` counts them all). */
  | { state: 'connecting'; attempt: number; failures: number }
  /** The WebSocket is open; held topics are being (re-)subscribed. */
  | { state: 'open'; attempt: number; failures: number }
  /**
   * The connection ended or could not be opened; the client tries again in
   * `retryInMs`. `code` is the close code (1006 when there was none, as
   * after a refused upgrade), `failures` the attempts since the last
   * successful subscribe.
   */
  | { state: 'closed'; code: number; reason: string; retryInMs: number; failures: number }
  /** The host refused the session: the client stopped; reconnect() once the user is signed in again. */
  | { state: 'unauthorized'; code: number; reason: string; failures: number }
  /** close() was called. */
  | { state: 'stopped'; failures: number };

/** The host's error codes (docs/protocol.md §4) and the client's own. */
export type ErrorCode =
  | 'bad-request'
  | 'unknown-topic'
  | 'too-many-subscriptions'
  | 'forbidden'
  | 'not-found'
  | 'error'
  | 'unsubscribed'
  | 'closed'
  | 'unauthorized'
  | 'invalid-message'
  | (string & {});

export class LivecastError extends Error {
  readonly code: ErrorCode;
  readonly topic?: string;
  /** The id of the request the host answered. */
  readonly id?: string;
  /** True for the transient `error`: the client retries the subscribe itself. */
  readonly retrying: boolean;
  constructor(code: ErrorCode, message: string, options?: { topic?: string; id?: string; retrying?: boolean });
}

export interface SnapshotEvent {
  topic: string;
  /** True when the host sent a delta (a resume with `since`); else the snapshot was full. */
  delta: boolean;
  /** The entries as the host sent them. */
  entries: Position[];
  /** The topic's positions after the merge (the same map positions(topic) returns). */
  positions: ReadonlyMap<string, Position>;
}

/** What checkAuth answers after a failed upgrade. */
export type AuthVerdict = 'ok' | 'unauthorized' | 'unknown';

/** Decides, after an upgrade failed, whether the session was refused. Must not throw. */
export type CheckAuth = ((attempt: { url: string; attempt: number; failures: number }) =>
  | AuthVerdict
  | Promise<AuthVerdict>) & { reset?: () => void };

/** A WebSocket constructor: the platform's, or any with the same interface. */
export interface WebSocketConstructor {
  new (url: string, protocolsOrInit?: string | string[] | { headers?: Record<string, string> }): WebSocket;
}

export interface BackoffOptions {
  /** First delay, ms (default 1000). */
  initialMs?: number;
  /** Longest delay, ms (default 30000). */
  maxMs?: number;
  /** Each delay is shortened by up to this fraction of itself, at random (default 0.2). */
  jitter?: number;
}

export interface ClientOptions {
  /** `ws(s)://…/ws-live`. Default in a browser: `/ws-live` on the page's own origin. */
  url?: string;
  /** Topics to subscribe at once. */
  topics?: string[];
  /** The WebSocket implementation. Default: `globalThis.WebSocket`. */
  WebSocket?: WebSocketConstructor;
  /** Node only: headers of the upgrade request (a browser sends its cookies itself). */
  headers?: Record<string, string>;
  /** Node only: the Cookie header, e.g. `directus_session_token=…`. */
  cookie?: string;
  /** Node only: a bearer token, sent as `Authorization: Bearer …`. */
  bearer?: string;
  backoff?: BackoffOptions;
  /** How long an upgrade may take, ms (default 10000). */
  connectTimeoutMs?: number;
  /**
   * Decides whether a failed upgrade was a refused session. Default: the
   * browser's refusalCheck (createNodeClient: upgradeProbe, exact). `false`:
   * never stop, retry for ever.
   */
  checkAuth?: CheckAuth | false;
  /** Refused upgrades in a row before the default check says unauthorized (default 5). */
  maxRefusals?: number;
  /** Resume with `since` on reconnect (default true). */
  resume?: boolean;
  /** The jitter's random source, in [0, 1) (default Math.random). */
  random?: () => number;
  onState?: (state: ConnectionState) => void;
  onPosition?: (position: Position, topic: string) => void;
  onSnapshot?: (snapshot: SnapshotEvent) => void;
  onError?: (error: LivecastError) => void;
}

export class LivecastClient {
  constructor(options?: ClientOptions);
  readonly url: string;
  /** The connection's state now (a copy). */
  readonly state: ConnectionState;
  /** Each of these returns a function that removes the listener. */
  onState(cb: (state: ConnectionState) => void): () => void;
  /** A live position that was applied (newer than the one held for its device). */
  onPosition(cb: (position: Position, topic: string) => void): () => void;
  onSnapshot(cb: (snapshot: SnapshotEvent) => void): () => void;
  onError(cb: (error: LivecastError) => void): () => void;
  /** The newest position of every device of the topic, by device id. Read-only; updated in place. */
  positions(topic: string): ReadonlyMap<string, Position>;
  /** The topics held, in canonical form. */
  topics(): string[];
  /** Holds the topic across reconnects; resolves with its positions once its first snapshot is in. */
  subscribe(topic: string): Promise<ReadonlyMap<string, Position>>;
  unsubscribe(topic: string): void;
  /** Connects now (after `unauthorized`, after close(), or to cut a backoff short). */
  reconnect(): void;
  close(): void;
}

export function createClient(options?: ClientOptions): LivecastClient;

/** `event:` and the lowercase hyphenated UUID; other strings unchanged. */
export function canonicalTopic(topic: string): string;
export function eventTopic(eventId: string): string;
/** `ws(s)://<host>/ws-live` of a page location. */
export function defaultUrl(location?: { protocol: string; host: string }): string;
/** `{"__bigint": "…"}` → bigint, `{"__buffer_b64": "…"}` → Uint8Array, anything else as is. */
export function decodeAttribute(value: unknown): unknown;
export function decodeAttributes(attributes: Record<string, unknown> | undefined): Record<string, unknown>;
/** checkAuth for pages on Directus's origin: asks `${baseUrl}/users/me` whether the session is good. */
export function directusSessionCheck(baseUrl: string, options?: { fetch?: typeof fetch }): CheckAuth;
/** The default checkAuth: a host that answers plain HTTP (426) but refused the upgrade `maxRefusals` times in a row. */
export function refusalCheck(options?: { maxRefusals?: number; fetch?: typeof fetch }): CheckAuth;

export const DEFAULT_BACKOFF: Readonly<Required<BackoffOptions>>;
export const DEFAULT_CONNECT_TIMEOUT_MS: number;
export const DEFAULT_MAX_REFUSALS: number;
export const ERROR_CODES: readonly ErrorCode[];
