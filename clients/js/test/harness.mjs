// Test harness of the JavaScript client: a real host (the Rust fixture
// binary, built on the e2e harness: own schema, own stream, Directus
// stand-in), real Redis and PostgreSQL, Node's own WebSocket.
//
// The same conventions as the Rust e2e tests: wait for what must arrive,
// up to a generous cap (SOON, EVENTUALLY); listen briefly (QUIET) for what
// must not. No fixed sleeps as bets on timing.

import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

/** Something that should happen "at once": only a failing test waits this long. */
export const SOON = 5000;
/** How long a test listens for something that must not happen. */
export const QUIET = 300;
/** Something that should happen eventually (a restart, a backoff). */
export const EVENTUALLY = 10000;

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../..');

/** The fixture binary: $LIVECAST_FIXTURE, else the workspace's debug build. */
export function fixtureBinary() {
  const bin =
    process.env.LIVECAST_FIXTURE ??
    path.join(process.env.CARGO_TARGET_DIR ?? path.join(ROOT, 'target'), 'debug', 'livecast-fixture');
  if (!existsSync(bin)) {
    throw new Error(
      `${bin} is missing: build it with \`cargo build -p livecast-tests --bin livecast-fixture\` (or set LIVECAST_FIXTURE)`,
    );
  }
  return bin;
}

/**
 * Starts a fixture: one test's world and, after `start`, a real host.
 * `await f.cmd({cmd: ...})` sends a command and resolves with its answer
 * (rejects on `ok: false`). `await f.close()` stops the host and removes
 * the world. Use `await using`-style cleanup: `t.after(() => f.close())`.
 */
export async function fixture() {
  const child = spawn(fixtureBinary(), [], {
    env: {
      ...process.env,
      REDIS_URL: process.env.REDIS_URL ?? 'redis://127.0.0.1:6379',
      POSTGRES_URL: process.env.POSTGRES_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres',
    },
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  const lines = createInterface({ input: child.stdout });
  const waiting = new Map();
  let nextId = 1;
  let ready;
  const readyP = new Promise((resolve, reject) => {
    ready = resolve;
    child.once('exit', (code) => reject(new Error(`the fixture exited with ${code} before it was ready`)));
  });
  lines.on('line', (line) => {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      return;
    }
    if (msg.ready) {
      ready();
      return;
    }
    const w = waiting.get(msg.id);
    if (!w) return;
    waiting.delete(msg.id);
    if (msg.ok) w.resolve(msg);
    else w.reject(new Error(`fixture: ${msg.error}`));
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.once('exit', (code) => {
    for (const w of waiting.values()) w.reject(new Error(`the fixture exited with ${code}`));
    waiting.clear();
  });
  await withTimeout(readyP, EVENTUALLY, 'the fixture to be ready');
  return {
    /** Sends a command; resolves with its answer. */
    cmd(command) {
      const id = nextId++;
      const p = new Promise((resolve, reject) => waiting.set(id, { resolve, reject }));
      child.stdin.write(`${JSON.stringify({ ...command, id })}\n`);
      // A restart waits for the host to be ready (it reads the stream and
      // has loaded the device map): EVENTUALLY, not SOON.
      return withTimeout(p, EVENTUALLY * 2, `fixture command ${command.cmd}`);
    },
    /** Stops the host, removes the schema and the stream, and waits for the process. */
    async close() {
      child.stdin.end();
      const timer = setTimeout(() => child.kill('SIGKILL'), EVENTUALLY);
      await exited;
      clearTimeout(timer);
    },
  };
}

/** Rejects with "timed out waiting for <what>" after `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}

/**
 * Resolves once `cond()` is true, checking at every turn of the event loop
 * and every few ms; rejects after `ms` (default SOON) naming `what`.
 */
export async function until(cond, what, ms = SOON) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = cond();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Lets QUIET pass: the window in which something that must not happen would show. */
export function quiet(ms = QUIET) {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * A WebSocket class that records what goes over it: `log.sent` (frames as
 * parsed JSON), `log.received` (messages as parsed JSON), `log.opened`
 * (sockets constructed). The client under test gets it as `WebSocket`.
 */
export function recordingWebSocket(Base = globalThis.WebSocket) {
  const log = { sent: [], received: [], opened: 0 };
  class Recording extends Base {
    constructor(...args) {
      super(...args);
      log.opened += 1;
      this.addEventListener('message', (ev) => {
        try {
          log.received.push(JSON.parse(ev.data));
        } catch {
          log.received.push(ev.data);
        }
      });
    }
    send(data) {
      log.sent.push(JSON.parse(data));
      super.send(data);
    }
  }
  return { WebSocket: Recording, log };
}

/** Records a client's state changes, positions, snapshots and errors. */
export function observe(client) {
  const seen = { states: [], positions: [], snapshots: [], errors: [] };
  client.onState((s) => seen.states.push(s));
  client.onPosition((p, topic) => seen.positions.push({ ...p, topic }));
  client.onSnapshot((s) => seen.snapshots.push({ ...s, positions: new Map(s.positions) }));
  client.onError((e) => seen.errors.push(e));
  return seen;
}

/** A position (lat, lon) for test records; the value does not matter. */
export const TIRANA = [41.3275, 19.8187];
