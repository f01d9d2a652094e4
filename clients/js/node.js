// livecast JavaScript client, Node entry point: everything livecast.js
// exports, plus what only Node can do. A Node process has no cookie jar,
// so it passes the credential as a header; and unlike a browser it can see
// the HTTP status of a refused upgrade, so it knows a 401 for what it is.

import { randomBytes } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';

import { LivecastClient } from './livecast.js';

export * from './livecast.js';

const UPGRADE_PROBE_TIMEOUT_MS = 10000;

/**
 * The HTTP status the host gives an upgrade request to `url` with
 * `headers`: 101 when it would open the WebSocket (the probe then closes it
 * at once), 401, 403, 503 …; null when no answer came (host down,
 * timeout).
 */
export function upgradeStatus(url, headers = {}, { timeoutMs = UPGRADE_PROBE_TIMEOUT_MS } = {}) {
  const u = new URL(url);
  const secure = u.protocol === 'wss:' || u.protocol === 'https:';
  return new Promise((resolve) => {
    let settled = false;
    const done = (status) => {
      if (!settled) {
        settled = true;
        resolve(status);
      }
    };
    const req = (secure ? https : http).request({
      hostname: u.hostname.replace(/^\[|\]$/g, ''),
      port: u.port || (secure ? 443 : 80),
      path: `${u.pathname}${u.search}`,
      method: 'GET',
      agent: false,
      timeout: timeoutMs,
      headers: {
        ...headers,
        connection: 'Upgrade',
        upgrade: 'websocket',
        'sec-websocket-version': '13',
        'sec-websocket-key': randomBytes(16).toString('base64'),
      },
    });
    req.on('upgrade', (_res, socket) => {
      socket.destroy();
      done(101);
    });
    req.on('response', (res) => {
      res.resume();
      res.on('end', () => req.destroy());
      done(res.statusCode ?? null);
    });
    req.on('timeout', () => {
      req.destroy();
      done(null);
    });
    req.on('error', () => done(null));
    req.end();
  });
}

/**
 * A `checkAuth` that repeats the failed upgrade as a plain HTTP request and
 * reads its status: 401 (and 403, a refused origin) is `unauthorized`, so
 * the client stops at once instead of retrying; anything else (503, no
 * answer) is an outage the client rides out.
 */
export function upgradeProbe(url, headers = {}, options = {}) {
  return async () => {
    const status = await upgradeStatus(url, headers, options);
    if (status === 401 || status === 403) return 'unauthorized';
    return status === 101 ? 'ok' : 'unknown';
  };
}

/**
 * A LivecastClient for Node: `url` is required, the credential is a
 * `cookie` (the raw Cookie header, e.g. `directus_session_token=…`) or a
 * `bearer` token, and a refused upgrade is probed for its status. Node 20
 * needs `--experimental-websocket` for its WebSocket (Node 22 has it on),
 * or pass `WebSocket`.
 */
export function createNodeClient(options = {}) {
  if (!options.url) throw new TypeError('livecast: `url` is required in Node (ws://host:port/ws-live)');
  const headers = { ...(options.headers ?? {}) };
  if (options.cookie) headers.cookie = options.cookie;
  if (options.bearer) headers.authorization = `Bearer ${options.bearer}`;
  return new LivecastClient({
    ...options,
    cookie: undefined,
    bearer: undefined,
    headers,
    checkAuth: options.checkAuth ?? upgradeProbe(options.url, headers),
  });
}
