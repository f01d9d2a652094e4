// Headless Chromium driven over the DevTools protocol on a pipe
// (--remote-debugging-pipe: the browser reads commands on fd 3 and writes
// replies and events on fd 4, one JSON message per NUL-terminated chunk).
// No npm package: the protocol is small enough for the few commands a
// page test needs.

import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

/** Debian's chromium, or $CHROMIUM. */
export function chromiumBinary() {
  const candidates = [process.env.CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].filter(Boolean);
  const found = candidates.find((c) => existsSync(c));
  if (!found) throw new Error('no chromium: install Debian\'s `chromium` (apt-get install chromium) or set CHROMIUM');
  return found;
}

/**
 * Starts a headless browser. `browser.send(method, params, sessionId)`
 * sends a command and resolves with its result; `browser.on(method, cb)`
 * listens to events; `browser.close()` ends it and removes its profile.
 */
export async function launch({ width = 1280, height = 800 } = {}) {
  const profile = mkdtempSync(path.join(tmpdir(), 'livecast-chromium-'));
  const child = spawn(
    chromiumBinary(),
    [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
      '--hide-scrollbars',
      '--mute-audio',
      `--window-size=${width},${height}`,
      `--user-data-dir=${profile}`,
      '--remote-debugging-pipe',
      'about:blank',
    ],
    { stdio: ['ignore', 'ignore', 'pipe', 'pipe', 'pipe'] },
  );
  let stderr = '';
  child.stderr.on('data', (d) => {
    stderr = (stderr + d).slice(-4000);
  });
  const toBrowser = child.stdio[3];
  const fromBrowser = child.stdio[4];
  const pending = new Map();
  const listeners = new Map();
  let nextId = 1;
  let buffer = '';
  fromBrowser.setEncoding('utf8');
  fromBrowser.on('data', (chunk) => {
    buffer += chunk;
    let end;
    while ((end = buffer.indexOf('\0')) >= 0) {
      const msg = JSON.parse(buffer.slice(0, end));
      buffer = buffer.slice(end + 1);
      if (msg.id !== undefined) {
        const p = pending.get(msg.id);
        pending.delete(msg.id);
        if (!p) continue;
        if (msg.error) p.reject(new Error(`${p.method}: ${msg.error.message}`));
        else p.resolve(msg.result);
      } else {
        for (const cb of listeners.get(msg.method) ?? []) cb(msg.params, msg.sessionId);
      }
    }
  });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  child.once('exit', (code) => {
    for (const p of pending.values()) p.reject(new Error(`chromium exited (${code}): ${stderr}`));
    pending.clear();
  });

  const browser = {
    send(method, params = {}, sessionId = undefined) {
      const id = nextId++;
      const msg = { id, method, params };
      if (sessionId) msg.sessionId = sessionId;
      return new Promise((resolve, reject) => {
        pending.set(id, { resolve, reject, method });
        toBrowser.write(`${JSON.stringify(msg)}\0`);
      });
    },
    on(method, cb) {
      if (!listeners.has(method)) listeners.set(method, []);
      listeners.get(method).push(cb);
    },
    async close() {
      try {
        await Promise.race([browser.send('Browser.close'), exited]);
      } catch {
        // Already gone.
      }
      const timer = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(timer);
      rmSync(profile, { recursive: true, force: true });
    },
  };
  await browser.send('Browser.getVersion');
  return browser;
}

/**
 * Opens `url` in a new tab (in a fresh browser context, with no cookies,
 * when `isolated`; refusing every cookie the server sets, when
 * `refuseCookies`). Returns the tab: `evaluate(expr)` (the value of a JSON-
 * serialisable expression), `screenshot()` (PNG bytes), `errors` (uncaught
 * exceptions and console errors of the page).
 */
export async function open(browser, url, { width = 1280, height = 800, isolated = false, refuseCookies = false } = {}) {
  const context = isolated ? (await browser.send('Target.createBrowserContext')).browserContextId : undefined;
  const { targetId } = await browser.send('Target.createTarget', { url: 'about:blank', browserContextId: context });
  const { sessionId } = await browser.send('Target.attachToTarget', { targetId, flatten: true });
  const errors = [];
  browser.on('Runtime.exceptionThrown', (p, s) => {
    if (s === sessionId) errors.push(p.exceptionDetails?.exception?.description ?? p.exceptionDetails?.text);
  });
  browser.on('Runtime.consoleAPICalled', (p, s) => {
    if (s === sessionId && p.type === 'error') errors.push(p.args.map((a) => a.value ?? a.description).join(' '));
  });
  if (refuseCookies) {
    // Every response passes through here, less its Set-Cookie headers.
    browser.on('Fetch.requestPaused', async (p, s) => {
      if (s !== sessionId) return;
      const { body, base64Encoded } = await browser.send('Fetch.getResponseBody', { requestId: p.requestId }, sessionId);
      await browser.send(
        'Fetch.fulfillRequest',
        {
          requestId: p.requestId,
          responseCode: p.responseStatusCode,
          responseHeaders: p.responseHeaders.filter((h) => h.name.toLowerCase() !== 'set-cookie'),
          body: base64Encoded ? body : Buffer.from(body).toString('base64'),
        },
        sessionId,
      );
    });
    await browser.send('Fetch.enable', { patterns: [{ urlPattern: '*', requestStage: 'Response' }] }, sessionId);
  }
  await browser.send('Runtime.enable', {}, sessionId);
  await browser.send('Page.enable', {}, sessionId);
  await browser.send('Emulation.setDeviceMetricsOverride', { width, height, deviceScaleFactor: 1, mobile: false }, sessionId);
  const loaded = new Promise((resolve) => {
    browser.on('Page.loadEventFired', (_p, s) => s === sessionId && resolve());
  });
  const nav = await browser.send('Page.navigate', { url }, sessionId);
  if (nav.errorText) throw new Error(`navigate ${url}: ${nav.errorText}`);
  await loaded;
  return {
    errors,
    async evaluate(expression) {
      const r = await browser.send('Runtime.evaluate', { expression, returnByValue: true, awaitPromise: true }, sessionId);
      if (r.exceptionDetails) throw new Error(`${expression}: ${r.exceptionDetails.exception?.description ?? r.exceptionDetails.text}`);
      return r.result.value;
    },
    async screenshot() {
      const { data } = await browser.send('Page.captureScreenshot', { format: 'png' }, sessionId);
      return Buffer.from(data, 'base64');
    },
  };
}
