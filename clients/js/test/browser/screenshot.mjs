// Saves a screenshot of the live map, e.g. the README's:
//
//   cargo run -p livecast -- demo            # prints the map's URL
//   node clients/js/test/browser/screenshot.mjs '<that URL>' docs/img/demo-map.png
//
// It waits until the page is live, every device it holds is drawn, and
// the trails have had `--settle` seconds (default 20) to grow.

import { writeFileSync } from 'node:fs';

import { launch, open } from './chromium.mjs';

const [url, out = 'livecast-map.png', ...rest] = process.argv.slice(2);
if (!url) {
  console.error('usage: screenshot.mjs <map URL> [out.png] [--settle seconds]');
  process.exit(2);
}
const at = rest.indexOf('--settle');
const settle = (at >= 0 ? Number(rest[at + 1]) : 20) * 1000;
const browser = await launch();
try {
  const tab = await open(browser, url);
  const deadline = Date.now() + 30000;
  while ((await tab.evaluate('__livecastMap.state().state')) !== 'open' || (await tab.evaluate('__livecastMap.markers().length')) === 0) {
    if (Date.now() > deadline) throw new Error('the page did not go live within 30 s');
    await new Promise((r) => setTimeout(r, 100));
  }
  await new Promise((r) => setTimeout(r, settle));
  writeFileSync(out, await tab.screenshot());
  console.log(`${out}: ${await tab.evaluate('__livecastMap.markers().length')} devices`);
} finally {
  await browser.close();
}
