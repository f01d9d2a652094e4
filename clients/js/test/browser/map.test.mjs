// The live map page in a real browser: headless Chromium opens the page as
// `livecast demo` serves it (the fixture's host, with the demo's page and
// moving trackers), sees the markers appear and move (over
// permessage-deflate, which Chromium negotiates), and saves a screenshot.
// A second tab without the session cookie must end up "unauthorized", not
// retrying for ever.
//
//   cargo build -p livecast-tests --bin livecast-fixture
//   node --test clients/js/test/browser/
//
// The screenshot goes to $LIVECAST_SCREENSHOT, default target/livecast-map.png.

import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';

import { EVENTUALLY, SOON, fixture, until } from '../harness.mjs';
import { launch, open } from './chromium.mjs';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../../..');
const DEVICES = 12;

/** Polls an expression in the page until `cond` holds for its value. */
async function pageUntil(tab, expression, cond, what, ms = SOON) {
  let last;
  const deadline = Date.now() + ms;
  for (;;) {
    last = await tab.evaluate(expression);
    if (cond(last)) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}; last: ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

test('the demo map shows every device, moving, in a real browser', { timeout: 120000 }, async (t) => {
  const f = await fixture();
  t.after(() => f.close());
  const { event } = await f.cmd({ cmd: 'demo-event', devices: DEVICES });
  await f.cmd({ cmd: 'user', token: 'demo-session', events: [event] });
  const { page } = await f.cmd({ cmd: 'start', pages: 'demo-session' });
  await f.cmd({ cmd: 'drive', devices: DEVICES, interval_ms: 250 });

  const browser = await launch();
  t.after(() => browser.close());
  const url = `${page}?event=${event}`;
  // Without the page's cookie (a fresh context that refuses it): the
  // upgrade is refused with 401, which a browser cannot read; the client
  // must stop anyway.
  const stranger = await open(browser, url, { isolated: true, refuseCookies: true });
  const tab = await open(browser, url);

  const first = await pageUntil(
    tab,
    '({state: __livecastMap.state().state, markers: __livecastMap.markers()})',
    (v) => v.state === 'open' && v.markers.length === DEVICES,
    'every device drawn',
    EVENTUALLY,
  );
  const moved = await pageUntil(
    tab,
    '__livecastMap.markers()',
    (markers) =>
      markers.length === DEVICES &&
      markers.every((m) => {
        const was = first.markers.find((o) => o.deviceId === m.deviceId);
        return m.ts > was.ts && (m.lat !== was.lat || m.lon !== was.lon);
      }),
    'every marker to move',
  );
  const width = await tab.evaluate('document.getElementById("map").clientWidth');
  const height = await tab.evaluate('document.getElementById("map").clientHeight');
  for (const m of moved) {
    assert.ok(m.x >= 0 && m.x <= width && m.y >= 0 && m.y <= height, `${m.deviceId} inside the canvas: ${m.x},${m.y}`);
  }

  const page1 = await pageUntil(
    tab,
    `({
      rows: [...document.querySelectorAll('#devices tbody tr')].map((r) => [...r.cells].map((c) => c.textContent)),
      connection: document.getElementById('connection').textContent,
      rate: __livecastMap.rate(),
    })`,
    (v) => v.rows.length === DEVICES && v.rate > 0,
    'the device list and the record rate',
  );
  assert.equal(page1.connection, 'live');
  // Chromium offers permessage-deflate on every connection: the map's
  // connection negotiated it (the refused tab never got a 101), and the
  // snapshot and positions it drew came compressed.
  const stats = await f.cmd({ cmd: 'stats' });
  assert.equal(stats.deflate_connections, 1, JSON.stringify(stats));
  assert.ok(stats.deflate_out_bytes > 0, JSON.stringify(stats));
  for (const [device, speed, age] of page1.rows) {
    assert.match(device, /^35630704244\d{4}$/);
    assert.match(speed, /^\d+$/);
    assert.match(age, /^\d+ s$/);
  }

  const out = process.env.LIVECAST_SCREENSHOT ?? path.join(ROOT, 'target', 'livecast-map.png');
  mkdirSync(path.dirname(out), { recursive: true });
  writeFileSync(out, await tab.screenshot());
  t.diagnostic(`screenshot: ${out}`);

  // Five refused upgrades at 1, 2, 4, 8 s: about 15 s after the page opened.
  await pageUntil(stranger, '__livecastMap.state().state', (s) => s === 'unauthorized', 'the refused page to stop', 30000);
  const attempts = await stranger.evaluate('__livecastMap.state().failures');
  assert.equal(await stranger.evaluate('document.getElementById("connection").textContent'), 'not signed in');
  assert.equal(await stranger.evaluate('document.getElementById("reconnect").hidden'), false);
  assert.equal(attempts, 5);

  assert.deepEqual(tab.errors, []);
  assert.deepEqual(
    stranger.errors.filter((e) => !/WebSocket|ws-live/.test(e)),
    [],
    'no page errors besides the refused connections',
  );
});
