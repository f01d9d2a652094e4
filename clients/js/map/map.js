// The live map: one event's devices drawn on a canvas with the livecast
// client. A reference page for the TRM SPA and a spectator screen.
//
// Query parameters:
//   event     the event id (required)
//   ws        the WebSocket URL; default ws(s)://<this host>/ws-live, where
//             the TRM proxy serves it next to the page
//   directus  Directus base URL on this origin (the SPA's /api): a failed
//             connection then asks Directus whether the session is still good
//   tiles     a tile URL template, e.g. https://tile.example/{z}/{x}/{y}.png,
//             for a base map where tiles are reachable
//   trail     positions kept per device for its trail (default 30)
//
// Served by `livecast demo` at /map/, or by any static server that serves
// clients/js/ (the client is imported by relative path).

import { LivecastClient, defaultUrl, directusSessionCheck, eventTopic } from '../livecast.js';

const params = new URLSearchParams(location.search);
const eventId = params.get('event');
const trailLength = Math.max(2, Number(params.get('trail')) || 30);
const tileTemplate = params.get('tiles');

/** Fixes older than this are drawn grey: the device went quiet. */
const STALE_MS = 60000;
/** Window of the records-per-second figure. */
const RATE_WINDOW_MS = 5000;
const PADDING_PX = 48;
/** The smallest area the view shows, in degrees of latitude (about 550 m). */
const MIN_SPAN_DEG = 0.005;
const M_PER_DEG_LAT = 111320;

const canvas = document.getElementById('map');
const ctx = canvas.getContext('2d');
const tbody = document.querySelector('#devices tbody');
const connection = document.getElementById('connection');
const rateEl = document.getElementById('rate');
const reconnectButton = document.getElementById('reconnect');
const notice = document.getElementById('notice');

/** deviceId → { last: position, trail: [[lat, lon], …], color, row } */
const tracks = new Map();
/** Arrival times of live positions in the rate window. */
const arrivals = [];
/** When the page started counting: a window that began later is shorter. */
const countingSince = performance.now();
/** The view: centre and scale (CSS px per degree of latitude), eased toward the fit. */
let view = null;
let dirty = true;
let frames = 0;
/** What the last frame drew, for the test hook. */
let drawn = [];

function colorOf(deviceId) {
  let h = 0;
  for (const ch of deviceId) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return `hsl(${(h * 137.508) % 360} 70% 42%)`;
}

function say(text) {
  notice.textContent = text;
  notice.hidden = !text;
}

// ---- data ----------------------------------------------------------------

function track(p) {
  let t = tracks.get(p.deviceId);
  if (!t) {
    t = { last: p, trail: [], color: colorOf(p.deviceId), row: null };
    tracks.set(p.deviceId, t);
  }
  t.last = p;
  t.trail.push([p.lat, p.lon]);
  if (t.trail.length > trailLength) t.trail.splice(0, t.trail.length - trailLength);
  dirty = true;
}

function onSnapshot({ positions }) {
  for (const [id, t] of tracks) {
    if (!positions.has(id)) {
      t.row?.remove();
      tracks.delete(id);
    }
  }
  for (const p of positions.values()) {
    const t = tracks.get(p.deviceId);
    if (!t || t.last.ts !== p.ts) track(p);
  }
  say(positions.size === 0 ? 'No device of this event has a position yet.' : '');
  dirty = true;
}

function onPosition(p) {
  arrivals.push(performance.now());
  track(p);
  if (!notice.hidden && tracks.size > 0) say('');
}

function rate() {
  const now = performance.now();
  while (arrivals.length > 0 && arrivals[0] < now - RATE_WINDOW_MS) arrivals.shift();
  const window = Math.max(1000, Math.min(RATE_WINDOW_MS, now - countingSince));
  return arrivals.length / (window / 1000);
}

// ---- connection state ------------------------------------------------------

function showState(s) {
  connection.dataset.state = s.state;
  reconnectButton.hidden = !(s.state === 'unauthorized' || s.state === 'stopped');
  switch (s.state) {
    case 'connecting':
      connection.textContent = s.attempt > 1 ? `connecting (attempt ${s.attempt})` : 'connecting';
      break;
    case 'open':
      connection.textContent = 'live';
      break;
    case 'closed':
      connection.textContent = `closed ${s.code}, retry in ${Math.ceil(s.retryInMs / 1000)} s`;
      break;
    case 'unauthorized':
      connection.textContent = 'not signed in';
      say('The live feed refused this session. Sign in again, then reconnect.');
      break;
    default:
      connection.textContent = s.state;
  }
}

// ---- projection ----------------------------------------------------------
// Equirectangular around the view's centre: x grows with longitude scaled
// by cos(latitude), y with latitude. Over the few kilometres of an event it
// is as true as any map projection.

function fit(width, height) {
  let minLat = Infinity;
  let maxLat = -Infinity;
  let minLon = Infinity;
  let maxLon = -Infinity;
  for (const t of tracks.values()) {
    for (const [lat, lon] of t.trail) {
      minLat = Math.min(minLat, lat);
      maxLat = Math.max(maxLat, lat);
      minLon = Math.min(minLon, lon);
      maxLon = Math.max(maxLon, lon);
    }
  }
  if (minLat === Infinity) return null;
  const lat = (minLat + maxLat) / 2;
  const lon = (minLon + maxLon) / 2;
  const cos = Math.cos((lat * Math.PI) / 180);
  const spanLat = Math.max(maxLat - minLat, MIN_SPAN_DEG);
  const spanLon = Math.max((maxLon - minLon) * cos, MIN_SPAN_DEG);
  const k = Math.min((width - 2 * PADDING_PX) / spanLon, (height - 2 * PADDING_PX) / spanLat);
  return { lat, lon, k: Math.max(k, 1) };
}

function ease(target) {
  if (!view) return { ...target };
  const a = 0.15;
  const next = {
    lat: view.lat + (target.lat - view.lat) * a,
    lon: view.lon + (target.lon - view.lon) * a,
    k: view.k * (target.k / view.k) ** a,
  };
  const settled =
    Math.abs(next.lat - target.lat) * next.k < 0.3 &&
    Math.abs(next.lon - target.lon) * next.k < 0.3 &&
    Math.abs(next.k / target.k - 1) < 0.002;
  return settled ? { ...target } : next;
}

function projector(v, width, height) {
  const cos = Math.cos((v.lat * Math.PI) / 180);
  return {
    x: (lon) => width / 2 + (lon - v.lon) * cos * v.k,
    y: (lat) => height / 2 - (lat - v.lat) * v.k,
    lon: (x) => v.lon + (x - width / 2) / (cos * v.k),
    lat: (y) => v.lat - (y - height / 2) / v.k,
  };
}

// ---- drawing ---------------------------------------------------------------

/** The smallest of 1, 2, 5 × 10^n at or above `raw`. */
function niceStep(raw) {
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5]) if (m * p >= raw) return m * p;
  return 10 * p;
}

/** The largest of 1, 2, 5 × 10^n at or below `raw`. */
function niceBelow(raw) {
  const p = 10 ** Math.floor(Math.log10(raw));
  for (const m of [5, 2]) if (m * p <= raw) return m * p;
  return p;
}

function drawGraticule(P, width, height, v) {
  const step = niceStep(80 / v.k);
  ctx.strokeStyle = '#e3e7ec';
  ctx.lineWidth = 1;
  ctx.beginPath();
  for (let lat = Math.ceil(P.lat(height) / step) * step; lat <= P.lat(0); lat += step) {
    const y = Math.round(P.y(lat)) + 0.5;
    ctx.moveTo(0, y);
    ctx.lineTo(width, y);
  }
  for (let lon = Math.ceil(P.lon(0) / step) * step; lon <= P.lon(width); lon += step) {
    const x = Math.round(P.x(lon)) + 0.5;
    ctx.moveTo(x, 0);
    ctx.lineTo(x, height);
  }
  ctx.stroke();
}

const tileCache = new Map();

function tile(url) {
  let img = tileCache.get(url);
  if (!img) {
    img = new Image();
    img.onload = () => {
      dirty = true;
    };
    img.src = url;
    tileCache.set(url, img);
    if (tileCache.size > 512) tileCache.delete(tileCache.keys().next().value);
  }
  return img.complete && img.naturalWidth > 0 ? img : null;
}

/** Web Mercator tiles placed by their corners: within one tile the two
 * projections differ by far less than a pixel at the zooms an event needs. */
function drawTiles(P, width, height, v) {
  const cos = Math.cos((v.lat * Math.PI) / 180);
  const z = Math.max(0, Math.min(19, Math.round(Math.log2((v.k * cos * 360) / 256))));
  const n = 2 ** z;
  const tx = (lon) => ((lon + 180) / 360) * n;
  const ty = (lat) => {
    const r = (Math.max(-85, Math.min(85, lat)) * Math.PI) / 180;
    return ((1 - Math.log(Math.tan(r) + 1 / Math.cos(r)) / Math.PI) / 2) * n;
  };
  const lonOf = (x) => (x / n) * 360 - 180;
  const latOf = (y) => (Math.atan(Math.sinh(Math.PI * (1 - (2 * y) / n))) * 180) / Math.PI;
  const [x0, x1] = [Math.floor(tx(P.lon(0))), Math.floor(tx(P.lon(width)))];
  const [y0, y1] = [Math.floor(ty(P.lat(0))), Math.floor(ty(P.lat(height)))];
  if ((x1 - x0 + 1) * (y1 - y0 + 1) > 100) return;
  for (let x = x0; x <= x1; x++) {
    for (let y = y0; y <= y1; y++) {
      const img = tile(
        tileTemplate
          .replace('{z}', z)
          .replace('{x}', ((x % n) + n) % n)
          .replace('{y}', y),
      );
      if (!img) continue;
      const left = P.x(lonOf(x));
      const top = P.y(latOf(y));
      ctx.drawImage(img, left, top, P.x(lonOf(x + 1)) - left, P.y(latOf(y + 1)) - top);
    }
  }
}

function drawScaleBar(v, height) {
  const mPerPx = M_PER_DEG_LAT / v.k;
  const meters = niceBelow(mPerPx * 140);
  const px = meters / mPerPx;
  const x = 16;
  const y = height - 18;
  ctx.fillStyle = 'rgba(255,255,255,0.85)';
  ctx.fillRect(x - 6, y - 22, px + 12, 30);
  ctx.strokeStyle = '#1d2733';
  ctx.lineWidth = 2;
  ctx.beginPath();
  ctx.moveTo(x, y - 6);
  ctx.lineTo(x, y);
  ctx.lineTo(x + px, y);
  ctx.lineTo(x + px, y - 6);
  ctx.stroke();
  ctx.fillStyle = '#1d2733';
  ctx.font = '12px system-ui, sans-serif';
  ctx.textAlign = 'left';
  ctx.textBaseline = 'alphabetic';
  ctx.fillText(meters >= 1000 ? `${meters / 1000} km` : `${meters} m`, x, y - 9);
}

function drawMarker(x, y, p, color, stale) {
  ctx.save();
  ctx.translate(x, y);
  ctx.fillStyle = stale ? '#9aa3ad' : color;
  ctx.strokeStyle = '#fff';
  ctx.lineWidth = 2;
  ctx.beginPath();
  if (p.speed > 0) {
    // The course is a bearing, clockwise from north: so is a canvas
    // rotation with y pointing down.
    ctx.rotate((((p.course ?? 0) % 360) * Math.PI) / 180);
    ctx.moveTo(0, -11);
    ctx.lineTo(7, 8);
    ctx.lineTo(0, 4);
    ctx.lineTo(-7, 8);
    ctx.closePath();
  } else {
    ctx.arc(0, 0, 6, 0, 2 * Math.PI);
  }
  ctx.fill();
  ctx.stroke();
  ctx.restore();
}

function draw() {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    dirty = true;
  }
  const target = fit(width, height);
  if (!target) {
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = '#f6f7f9';
    ctx.fillRect(0, 0, width, height);
    drawn = [];
    return;
  }
  const next = ease(target);
  const moving = !view || next.lat !== view.lat || next.lon !== view.lon || next.k !== view.k;
  if (!dirty && !moving) return;
  view = next;
  dirty = false;
  frames += 1;

  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = '#f6f7f9';
  ctx.fillRect(0, 0, width, height);
  const P = projector(view, width, height);
  if (tileTemplate) drawTiles(P, width, height, view);
  else drawGraticule(P, width, height, view);

  const now = Date.now();
  ctx.lineCap = 'round';
  ctx.lineJoin = 'round';
  for (const t of tracks.values()) {
    const n = t.trail.length;
    ctx.strokeStyle = t.color;
    for (let i = 1; i < n; i++) {
      ctx.globalAlpha = 0.08 + (0.5 * i) / n;
      ctx.lineWidth = 1 + (2 * i) / n;
      ctx.beginPath();
      ctx.moveTo(P.x(t.trail[i - 1][1]), P.y(t.trail[i - 1][0]));
      ctx.lineTo(P.x(t.trail[i][1]), P.y(t.trail[i][0]));
      ctx.stroke();
    }
  }
  ctx.globalAlpha = 1;

  const out = [];
  ctx.font = '11px ui-monospace, monospace';
  ctx.textAlign = 'left';
  ctx.textBaseline = 'middle';
  for (const [id, t] of tracks) {
    const p = t.last;
    const x = P.x(p.lon);
    const y = P.y(p.lat);
    const stale = now - p.ts > STALE_MS;
    drawMarker(x, y, p, t.color, stale);
    ctx.fillStyle = stale ? '#9aa3ad' : '#1d2733';
    ctx.fillText(id.slice(-4), x + 10, y - 9);
    out.push({ deviceId: id, ts: p.ts, lat: p.lat, lon: p.lon, course: p.course ?? 0, x, y });
  }
  drawn = out;
  drawScaleBar(view, height);
  if (tileTemplate) {
    ctx.fillStyle = 'rgba(255,255,255,0.8)';
    ctx.fillRect(width - 150, height - 16, 150, 16);
    ctx.fillStyle = '#6b7785';
    ctx.font = '10px system-ui, sans-serif';
    ctx.textAlign = 'right';
    ctx.fillText(`tiles: ${new URL(tileTemplate, location.href).host}`, width - 6, height - 7);
  }
}

function loop() {
  draw();
  requestAnimationFrame(loop);
}

// ---- device list -----------------------------------------------------------

function age(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}

function refreshList() {
  const now = Date.now();
  const ids = [...tracks.keys()].sort();
  ids.forEach((id, i) => {
    const t = tracks.get(id);
    if (!t.row) {
      t.row = document.createElement('tr');
      t.row.dataset.device = id;
      const device = t.row.insertCell();
      device.className = 'device';
      const swatch = document.createElement('span');
      swatch.className = 'swatch';
      swatch.style.background = t.color;
      device.append(swatch, id);
      t.row.insertCell().className = 'num';
      t.row.insertCell().className = 'num';
    }
    const [, speed, last] = t.row.cells;
    speed.textContent = String(Math.round(t.last.speed ?? 0));
    last.textContent = age(now - t.last.ts);
    t.row.classList.toggle('stale', now - t.last.ts > STALE_MS);
    if (tbody.children[i] !== t.row) tbody.insertBefore(t.row, tbody.children[i] ?? null);
  });
  rateEl.textContent = `${rate().toFixed(1)} records/s`;
}

// ---- start ---------------------------------------------------------------

function start() {
  if (!eventId) {
    say('Add ?event=<event id> to the address to watch an event.');
    connection.textContent = 'no event';
    return;
  }
  const topic = eventTopic(eventId);
  document.getElementById('topic').textContent = topic;
  document.title = `livecast · ${topic}`;
  const directus = params.get('directus');
  const client = new LivecastClient({
    url: params.get('ws') ?? defaultUrl(location),
    checkAuth: directus ? directusSessionCheck(new URL(directus, location.href).href) : undefined,
    onState: showState,
  });
  client.onSnapshot(onSnapshot);
  client.onPosition(onPosition);
  client.onError((e) => {
    if (!e.retrying) say(`${e.code}: ${e.message}`);
  });
  client.subscribe(topic);
  reconnectButton.addEventListener('click', () => {
    say('');
    client.reconnect();
  });
  // For tests and curious developers: what the page holds and drew.
  window.__livecastMap = {
    client,
    state: () => client.state,
    markers: () => drawn,
    devices: () => tracks.size,
    frames: () => frames,
    rate,
  };
  showState(client.state);
  setInterval(refreshList, 500);
  requestAnimationFrame(loop);
}

start();
