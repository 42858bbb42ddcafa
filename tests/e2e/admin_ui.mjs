// The admin UI in a real browser (headless Chromium, through playwright-core): sign-in,
// every page, pairing a device from its QR page, revoking it, the audit tail, a key
// rotation and sign-out, with no script error and no Content-Security-Policy violation;
// then every page at a phone's width (390 px) and a laptop's (1280 px): no sideways
// scrolling, no text squeezed letter by letter, every button on screen when scrolled to,
// no message left over from another page, axe-core's WCAG 2.1 AA rules; and the first
// admin user made from the setup link (`/admin/#setup=<bootstrap token>`) at both widths,
// or with a pasted token. The server stands in front of a small app this script runs:
// a WebSocket relayed to it is listed on the front-door page and closed when its device
// is revoked from there.
//
// Run from the repository root after `cargo build`:
//   (cd tests/e2e && npm install) && node tests/e2e/admin_ui.mjs
// Environment: GATEHOUSE_BIN (default target/debug/gatehouse), CHROMIUM (default
// /usr/bin/chromium), SCREENSHOTS (a folder to save screenshots of the main run, and one per
// page per width, `390-devices.png`; none if unset).

import { request as httpsRequest } from 'node:https';
import { createServer } from 'node:http';
import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';
import { startServer } from './server.mjs';

const axeScript = createRequire(import.meta.url).resolve('axe-core/axe.min.js');

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = process.env.SCREENSHOTS ? resolve(process.env.SCREENSHOTS) : null;
const TIMEOUT = 15000;

const WS_GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';

/** The `Sec-WebSocket-Accept` answering a `Sec-WebSocket-Key` (RFC 6455 section 4.2.2). */
function wsAccept(key) {
  return createHash('sha1').update(key + WS_GUID).digest('base64');
}

/**
 * The app behind the front door, on a loopback port: every request is answered 200, and
 * a WebSocket upgrade is accepted and kept open, sending nothing; a close frame from the
 * other side is answered with one and the socket ended. Resolves to the listening server,
 * whose `upgrades` lists the sockets it accepted: their path and `X-Gatehouse-Device-Id`.
 */
function startUpstream() {
  const app = createServer((req, res) => {
    res.setHeader('content-type', 'text/plain');
    res.end(`hello ${req.headers['x-gatehouse-device-id'] || 'nobody'}\n`);
  });
  app.upgrades = [];
  app.on('upgrade', (req, socket) => {
    const key = req.headers['sec-websocket-key'];
    if (!key || String(req.headers.upgrade).toLowerCase() !== 'websocket') {
      socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
      return;
    }
    app.upgrades.push({ path: req.url, device: req.headers['x-gatehouse-device-id'] });
    socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n'
      + `Sec-WebSocket-Accept: ${wsAccept(key)}\r\n\r\n`);
    socket.on('data', (chunk) => {
      if ((chunk[0] & 0x0f) === 0x8) socket.end(Buffer.from([0x88, 0x00]));
    });
    socket.on('error', () => {});
  });
  return new Promise((ready) => app.listen(0, '127.0.0.1', () => ready(app)));
}

/**
 * A WebSocket opened through the front door as a native client opens one (the device's
 * access token in `Authorization`), on the raw connection: resolves once gatehouse has
 * answered 101 to `{ socket, state, closed }`. `closed` resolves when the server closes
 * the socket: `{ frame, code, reason }` after its close frame (answered with one), or
 * `{ frame: false, how }` if the connection ends without one; `state.closed` is set then.
 */
function openRelayedSocket(url, token, path = '/live') {
  const key = randomBytes(16).toString('base64');
  return new Promise((done, fail) => {
    const req = httpsRequest(`${url}${path}`, {
      agent: false,
      rejectUnauthorized: false,
      headers: {
        Connection: 'Upgrade',
        Upgrade: 'websocket',
        'Sec-WebSocket-Version': '13',
        'Sec-WebSocket-Key': key,
        Authorization: `Bearer ${token}`,
      },
    });
    req.on('response', (res) => {
      let body = '';
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => fail(new Error(`the WebSocket was not opened: ${res.statusCode} ${body}`)));
    });
    req.on('upgrade', (res, socket, head) => {
      if (res.headers['sec-websocket-accept'] !== wsAccept(key)) {
        socket.destroy();
        fail(new Error(`a wrong Sec-WebSocket-Accept: ${res.headers['sec-websocket-accept']}`));
        return;
      }
      const state = { closed: null };
      const closed = new Promise((ended) => {
        let received = Buffer.from(head);
        const end = (result) => {
          if (state.closed) return;
          state.closed = result;
          ended(result);
        };
        const read = () => {
          // The app sends nothing, so the first frame from the server is its close frame:
          // 0x88, an unmasked length under 126, the code and the reason.
          if (received.length < 2) return;
          if (received[0] !== 0x88) {
            end({ frame: false, how: `an unexpected frame 0x${received[0].toString(16)}` });
            socket.destroy();
            return;
          }
          const length = received[1] & 0x7f;
          if (received.length < 2 + length) return;
          end({
            frame: true,
            code: length >= 2 ? received.readUInt16BE(2) : null,
            reason: received.subarray(4, 2 + length).toString('utf8'),
          });
          // The client's answer: a masked close frame with no payload (mask key zero).
          socket.end(Buffer.from([0x88, 0x80, 0, 0, 0, 0]));
        };
        read();
        socket.on('data', (chunk) => { received = Buffer.concat([received, chunk]); read(); });
        socket.on('end', () => end({ frame: false, how: 'end' }));
        socket.on('close', () => end({ frame: false, how: 'close' }));
        socket.on('error', (err) => end({ frame: false, how: `error ${err.code || err.message}` }));
      });
      done({ socket, state, closed });
    });
    req.on('error', fail);
    req.end();
  });
}

/** `promise`, or an error saying `what` did not happen within `ms`. */
function within(promise, ms, what) {
  let timer;
  const late = new Promise((_, fail) => { timer = setTimeout(() => fail(new Error(`${what}: not within ${ms} ms`)), ms); });
  return Promise.race([promise, late]).finally(() => clearTimeout(timer));
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

/** The text of every cell of `table`'s body, row by row. */
function tableCells(page, table) {
  return page.locator(`${table} tbody tr`).evaluateAll((trs) => trs.map((tr) => [...tr.cells]
    .map((td) => td.textContent.replace(/\s+/g, ' ').trim())));
}

/** Polls `probe` until `ok` holds of what it returns; an error with the last value otherwise. */
async function until(what, probe, ok) {
  const end = Date.now() + TIMEOUT;
  for (;;) {
    const seen = await probe();
    if (ok(seen)) return seen;
    if (Date.now() > end) throw new Error(`${what}; last seen: ${JSON.stringify(seen)}`);
    await sleep(200);
  }
}

/** A new device paired through a pairing session opened with `page`'s admin session: the pairing answer. */
async function pairDevice(page, label, device) {
  const paired = await page.evaluate(async ({ label, device }) => {
    const s = await fetch('/v1/session').then((r) => r.json());
    const opened = await fetch('/v1/pairing/sessions', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf_token },
      body: JSON.stringify({ name: label }),
    }).then((r) => r.json());
    const r = await fetch('/v1/pair', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ session_id: opened.session_id, secret: opened.secret, device }),
    });
    return { status: r.status, body: await r.json() };
  }, { label, device });
  assert.equal(paired.status, 200, JSON.stringify(paired.body));
  assert.ok(paired.body.device_id && paired.body.access_token, JSON.stringify(paired.body));
  return paired.body;
}

let step = 0;
async function shot(page, name) {
  if (!shots) return;
  step += 1;
  await page.screenshot({ path: join(shots, `${String(step).padStart(2, '0')}-${name}.png`), fullPage: true });
}

async function statusSays(page, text) {
  await page.locator('#status').filter({ hasText: text }).waitFor({ timeout: TIMEOUT });
}

const WIDTHS = [390, 1280];
const PASSWORD = 'correct horse battery staple';
const A11Y_TAGS = ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'];

/**
 * Records what must not happen on `page`: a script error, a console error (a CSP
 * violation is one), an error answer. A 401 is expected (a refused sign-in), and so is
 * any status listed in `expected` for a URL ending as its key.
 */
function watch(page, problems, expected = {}) {
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    const text = msg.text();
    if (msg.type() !== 'error' || /status of 401/.test(text)) return;
    if (Object.values(expected).some((status) => text.includes(`status of ${status}`))) return;
    problems.push(`console: ${text}`);
  });
  page.on('response', (r) => {
    if (r.status() < 400 || r.status() === 401) return;
    const allowed = Object.entries(expected).some(([end, status]) => r.url().endsWith(end) && r.status() === status);
    if (!allowed) problems.push(`${r.status()} for ${r.url()}`);
  });
  page.setDefaultTimeout(TIMEOUT);
}

/** An introspection with wrong client credentials, sent from another loopback address. */
function wrongClientFrom(url, localAddress) {
  return new Promise((done, fail) => {
    const req = httpsRequest(`${url}/v1/introspect`, {
      method: 'POST',
      localAddress,
      rejectUnauthorized: false,
      headers: {
        Authorization: `Basic ${Buffer.from('cli_00000000000000000000000000000000:wrong').toString('base64')}`,
        'Content-Type': 'application/x-www-form-urlencoded',
      },
    }, (res) => {
      let body = '';
      res.on('data', (chunk) => { body += chunk; });
      res.on('end', () => done(body));
    });
    req.on('error', fail);
    req.end('token=x');
  });
}

/** Failed checks from 127.0.0.2 until that address is banned: a ban to show and lift. */
async function banAnotherAddress(url) {
  for (let i = 0; i < 30; i += 1) {
    if ((await wrongClientFrom(url, '127.0.0.2')).includes('"banned"')) return;
  }
  throw new Error('127.0.0.2 was never banned');
}

/** axe-core's WCAG 2.1 A and AA findings on `page` (whose context bypasses the CSP). */
async function axeViolations(page) {
  await page.addScriptTag({ path: axeScript });
  return page.evaluate(async (tags) => {
    const result = await window.axe.run(document, { runOnly: { type: 'tag', values: tags } });
    return result.violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.length} node(s), e.g. ${v.nodes[0].target}`);
  }, A11Y_TAGS);
}

/**
 * What is wrong with the layout of the page on screen, as sentences: the document
 * scrolls sideways; a cell's text is squeezed into a column a few letters wide; a button
 * or navigation link, once scrolled to, is not wholly inside the viewport or is covered.
 */
async function layoutProblems(page, label) {
  const found = [];
  const size = await page.evaluate(() => ({
    scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth,
  }));
  if (size.scroll > size.client) {
    found.push(`${label}: the page scrolls sideways (${size.scroll} px of content in ${size.client} px)`);
  }
  // A cell's own text, measured as laid out (the cell may be taller than its text: the
  // row takes the height of its tallest cell) against the cell's width in letters.
  const squeezed = await page.evaluate(() => {
    const out = [];
    for (const box of document.querySelectorAll('main td, main dd')) {
      if (!box.checkVisibility()) continue;
      const text = box.textContent.replace(/\s+/g, ' ').trim();
      if (text.length < 24) continue;
      const range = document.createRange();
      range.selectNodeContents(box);
      const style = getComputedStyle(box);
      const line = parseFloat(style.lineHeight) || 1.5 * parseFloat(style.fontSize);
      const lines = Math.max(1, Math.round(range.getBoundingClientRect().height / line));
      const inner = box.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
      // Narrower than six letters or so, over several lines: broken letter by letter.
      if (inner < 6 * parseFloat(style.fontSize) && lines >= 3) {
        out.push(`"${text.slice(0, 24)}…" in ${Math.round(inner)} px, ${lines} lines`);
      }
    }
    return out;
  });
  if (squeezed.length > 0) {
    found.push(`${label}: text squeezed into a narrow column in ${squeezed.length} cell(s), e.g. ${squeezed[0]}`);
  }
  const controls = page.locator('button:visible, nav a:visible');
  for (let i = 0; i < await controls.count(); i += 1) {
    const control = controls.nth(i);
    await control.scrollIntoViewIfNeeded();
    const seen = await control.evaluate((el) => {
      const r = el.getBoundingClientRect();
      const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
      return {
        name: el.getAttribute('aria-label') || el.textContent.trim(),
        inside: r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0
          && r.right <= document.documentElement.clientWidth && r.bottom <= window.innerHeight,
        onTop: Boolean(hit) && (hit === el || el.contains(hit)),
        rect: [r.left, r.top, r.right, r.bottom].map(Math.round).join(','),
      };
    });
    if (!seen.inside) found.push(`${label}: "${seen.name}" is not inside the viewport when scrolled to (${seen.rect})`);
    else if (!seen.onTop) found.push(`${label}: "${seen.name}" is covered by another element`);
  }
  return found;
}

/** Waits until the page named by the navigation shows its data. */
async function pageReady(page, name) {
  const ready = {
    overview: '#ov-jobs tbody tr',
    pairing: '#pairing-form',
    device: '#device-form',
    devices: '#devices-table tbody tr button',
    audit: '#audit-table tbody tr',
    bans: '#bans-table tbody tr button',
    keys: '#keys-table tbody tr',
    front: '#front-routes tbody tr',
  }[name];
  await page.locator(`#page-${name} h1`).waitFor();
  await page.locator(ready).first().waitFor();
  await page.waitForLoadState('networkidle');
}

/**
 * Every page at `width`: the signed-in ones in a context holding `cookies`, then the
 * sign-in and setup pages signed out. The checker is injected, so these contexts bypass
 * the UI's CSP; the main run keeps it. Returns every problem found, as sentences.
 */
async function sweep(browser, server, width, cookies, problems) {
  const found = [];
  const viewport = { width, height: width < 600 ? 844 : 800 };
  const context = await browser.newContext({ ignoreHTTPSErrors: true, bypassCSP: true, viewport });
  await context.addCookies(cookies);
  const page = await context.newPage();
  watch(page, problems);
  const check = async (name) => {
    found.push(...await layoutProblems(page, `${width} px, ${name}`));
    const violations = await axeViolations(page);
    for (const v of violations) found.push(`${width} px, ${name}: accessibility: ${v}`);
    if (shots) await page.screenshot({ path: join(shots, `${width}-${name}.png`), fullPage: true });
  };

  // The pairing page with a session open.
  const openSession = async () => {
    await page.getByRole('button', { name: 'Open a pairing session' }).click();
    await statusSays(page, 'Pairing session opened');
  };
  await page.goto(`${server.url}/admin/#pairing`);
  await pageReady(page, 'pairing');
  await openSession();
  await page.waitForFunction(() => {
    const img = document.getElementById('pairing-qr');
    return img.complete && img.naturalWidth >= 256;
  });
  await check('pairing');
  // Every other page, reached just after a pairing session was opened: the pairing
  // page's message stays there.
  for (const name of ['overview', 'device', 'devices', 'audit', 'front', 'bans', 'keys']) {
    await page.locator('nav a[data-page="pairing"]').click();
    await pageReady(page, 'pairing');
    await openSession();
    await page.locator(`nav a[data-page="${name}"]`).click();
    await page.locator(`#page-${name} h1`).waitFor();
    const status = (await page.locator('#status').textContent()).trim();
    if (/pairing session/i.test(status)) found.push(`${width} px, ${name}: the pairing page's message is shown here: "${status}"`);
    await pageReady(page, name);
    await check(name);
  }
  await context.close();

  const anonymous = await browser.newContext({ ignoreHTTPSErrors: true, bypassCSP: true, viewport });
  const signedOut = await anonymous.newPage();
  watch(signedOut, problems);
  await signedOut.goto(`${server.url}/admin/`);
  await signedOut.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();
  found.push(...await layoutProblems(signedOut, `${width} px, sign-in`));
  for (const v of await axeViolations(signedOut)) found.push(`${width} px, sign-in: accessibility: ${v}`);
  if (shots) await signedOut.screenshot({ path: join(shots, `${width}-sign-in.png`), fullPage: true });
  // The setup page as its link opens it (the bootstrap token is still valid here).
  await signedOut.goto(`${server.url}/admin/#setup=${server.token}`);
  const opened = await signedOut.getByRole('heading', { name: 'Create the first admin user', level: 1 })
    .waitFor().then(() => true, () => false);
  if (opened) {
    await signedOut.waitForLoadState('networkidle');
    found.push(...await layoutProblems(signedOut, `${width} px, setup`));
    for (const v of await axeViolations(signedOut)) found.push(`${width} px, setup: accessibility: ${v}`);
    if (shots) await signedOut.screenshot({ path: join(shots, `${width}-setup.png`), fullPage: true });
  } else {
    found.push(`${width} px, setup: the setup link shows no setup page`);
  }
  await anonymous.close();
  return found;
}

/**
 * The setup link at `width`: the page takes the token out of the address bar at once,
 * shows the rules, refuses two different passwords and shows the server's refusal of a
 * bad name, then creates `username`, signs in with it and shows the overview. Returns
 * the signed-in context. `existing` are users made before, which the page names.
 */
async function setupByLink(browser, server, width, username, existing, problems) {
  const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width, height: 844 } });
  const page = await context.newPage();
  watch(page, problems, { '/v1/admin-users': 400 });
  page.on('request', (r) => {
    if (r.url().includes(server.token)) problems.push(`the setup token was sent in a URL: ${r.url()}`);
  });
  await page.goto(`${server.url}/admin/#setup=${server.token}`);
  await page.getByRole('heading', { name: 'Create the first admin user', level: 1 }).waitFor();
  assert.ok(!page.url().includes(server.token), `the token left the address bar: ${page.url()}`);
  assert.ok(!(await page.evaluate(() => location.href)).includes('gha_'));
  assert.equal(await page.locator('#setup-token').isVisible(), false, 'the link brought the token');
  await page.locator('#setup-password-help', { hasText: 'at least 12 characters' }).waitFor();
  if (existing.length > 0) {
    await page.locator('#setup-existing', { hasText: existing.join(', ') }).waitFor();
  }
  const submit = page.getByRole('button', { name: 'Create the user and sign in' });
  await page.locator('#setup-username').fill(username);
  await page.locator('#setup-password').fill(PASSWORD);
  await page.locator('#setup-password2').fill(`${PASSWORD}!`);
  await submit.click();
  await statusSays(page, 'The two passwords differ');
  await page.locator('#setup-username').fill('Not A Name');
  await page.locator('#setup-password2').fill(PASSWORD);
  await submit.click();
  await statusSays(page, 'a user name is 1 to 64 characters');
  await shot(page, `setup-refused-${width}`);
  await page.locator('#setup-username').fill(username);
  await submit.click();
  await page.getByRole('heading', { name: 'Overview', level: 1 }).waitFor();
  await page.locator('#who-name', { hasText: `Signed in as ${username}` }).waitFor();
  await statusSays(page, `Admin user ${username} created`);
  assert.equal(new URL(page.url()).hash, '', 'the address is the plain page again');
  await shot(page, `setup-done-${width}`);
  return context;
}

async function main() {
  if (shots) mkdirSync(shots, { recursive: true });
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-e2e-'));
  const upstream = await startUpstream();
  // A 1 s device-grant interval keeps the device-code step short.
  const server = await startServer(dir, ['--upstream', `http://127.0.0.1:${upstream.address().port}`],
    { GATEHOUSE_PAIRING_DEVICE_POLL_INTERVAL: '1s' });
  const sockets = [];
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
  const problems = [];
  try {
    const context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 900 } });
    const page = await context.newPage();
    // The one expected failure: a refresh token presented twice (a device made to need
    // pairing), refused with 400.
    watch(page, problems, { '/v1/token': 400, '/v1/device_grants/lookup': 404 });

    // /admin redirects to the page, which asks to sign in.
    await page.goto(`${server.url}/admin`);
    assert.equal(new URL(page.url()).pathname, '/admin/');
    await page.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();
    assert.equal(await page.locator('nav').isVisible(), false, 'no navigation before sign-in');
    await shot(page, 'sign-in');

    // A wrong token is refused with a message.
    await page.getByLabel('Admin token', { exact: true }).fill('gha_0000000000000000_wrong');
    await page.getByRole('button', { name: 'Sign in with token' }).click();
    await statusSays(page, 'Sign-in refused');

    // The bootstrap token signs in; the overview shows the server's state.
    await page.getByLabel('Admin token', { exact: true }).fill(server.token);
    await page.getByLabel('Admin token', { exact: true }).press('Enter');
    await page.getByRole('heading', { name: 'Overview', level: 1 }).waitFor();
    await page.locator('#ov-tls dd').getByText('self-signed', { exact: true }).waitFor();
    await page.locator('#ov-keys tbody tr', { hasText: 'active' }).first().waitFor();
    await page.locator('#ov-jobs tbody tr').first().waitFor();
    // This test server keeps its key beside the data file and its bootstrap token: the
    // overview says both.
    await page.locator('#overview-warning-list li', { hasText: 'sits beside the data file' }).waitFor();
    await page.locator('#overview-warning-list li', { hasText: 'bootstrap admin token' }).waitFor();
    await shot(page, 'overview');

    // Pairing: a QR code, the URI and a countdown; a claim shows who claimed it.
    await page.getByRole('link', { name: 'Pairing' }).click();
    await page.getByLabel('Name for the device-to-be').fill('<b>Ada</b> phone');
    await page.getByRole('button', { name: 'Open a pairing session' }).click();
    const uriInput = page.getByLabel('Pairing URI');
    await page.waitForFunction(() => document.getElementById('pairing-uri').value.startsWith('gatehouse://pair?'));
    const uri = new URL((await uriInput.inputValue()).replace('gatehouse://', 'https://gatehouse/'));
    await page.waitForFunction(() => {
      const img = document.getElementById('pairing-qr');
      return img.complete && img.naturalWidth >= 256;
    });
    await page.locator('#pairing-countdown', { hasText: 'Expires in' }).waitFor();
    await shot(page, 'pairing-open');
    const paired = await page.evaluate(async ({ session, secret }) => {
      const r = await fetch('/v1/pair', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ session_id: session, secret, device: { name: '<img src=x onerror=alert(1)>', platform: 'android', app_version: '1.0.0' } }),
      });
      return { status: r.status, body: await r.json() };
    }, { session: uri.searchParams.get('session'), secret: uri.searchParams.get('secret') });
    assert.equal(paired.status, 200, JSON.stringify(paired.body));
    await page.locator('#pairing-result', { hasText: 'Claimed by' }).waitFor();
    // Data is text: the device's name shows as typed, no element is made from it.
    assert.match(await page.locator('#pairing-result').textContent(), /<img src=x onerror=alert\(1\)> \(android\)/);
    assert.equal(await page.locator('#pairing-result img').count(), 0);
    await shot(page, 'pairing-claimed');

    // Devices: the search filters, revoking asks first.
    await page.getByRole('link', { name: 'Devices' }).click();
    const rows = page.locator('#devices-table tbody tr');
    await rows.filter({ hasText: 'android' }).waitFor();
    assert.equal(await rows.count(), 1);
    await page.getByLabel('Search').fill('no such device');
    await rows.filter({ hasText: 'No device matches.' }).waitFor();
    await page.getByLabel('Search').fill('ANDROID');
    await rows.filter({ hasText: 'android' }).waitFor();
    await shot(page, 'devices');
    page.once('dialog', (dialog) => dialog.dismiss());
    await page.getByRole('button', { name: /^Revoke / }).click();
    assert.equal(await rows.filter({ hasText: 'active' }).count(), 1, 'dismissed: still active');
    page.once('dialog', (dialog) => dialog.accept());
    await page.getByRole('button', { name: /^Revoke / }).click();
    await statusSays(page, 'revoked');
    await rows.filter({ hasText: 'revoked' }).waitFor();

    // A device whose refresh token was used twice needs pairing: it says why, and is
    // paired again as itself from its row.
    const stranded = await page.evaluate(async () => {
      const s = await fetch('/v1/session').then((r) => r.json());
      const opened = await fetch('/v1/pairing/sessions', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf_token },
        body: JSON.stringify({ name: 'stranded' }),
      }).then((r) => r.json());
      const pair = await fetch('/v1/pair', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ session_id: opened.session_id, secret: opened.secret, device: { name: 'Grace phone', platform: 'ios', app_version: '1.0.0' } }),
      }).then((r) => r.json());
      const refresh = () => fetch('/v1/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
        body: `grant_type=refresh_token&refresh_token=${encodeURIComponent(pair.refresh_token)}`,
      }).then((r) => r.status);
      return { id: pair.device_id, first: await refresh(), second: await refresh() };
    });
    assert.deepEqual([stranded.first, stranded.second], [200, 400], 'the second refresh is a reuse');
    await page.getByLabel('Search').fill('');
    await page.getByRole('link', { name: 'Overview' }).click();
    await page.getByRole('link', { name: 'Devices' }).click();
    const strandedRow = rows.filter({ hasText: stranded.id });
    await strandedRow.filter({ hasText: 'needs pairing' }).waitFor();
    await strandedRow.filter({ hasText: 'its refresh token was used twice' }).waitFor();
    const devicesBefore = await rows.count();
    await page.getByRole('button', { name: 'Pair Grace phone again' }).click();
    await page.locator('#pairing-again', { hasText: 'again' }).waitFor();
    assert.equal(await page.locator('#pairing-again-id').textContent(), stranded.id);
    const earlierUri = await uriInput.inputValue();
    await page.getByRole('button', { name: 'Open a pairing session' }).click();
    await page.waitForFunction((earlier) => {
      const value = document.getElementById('pairing-uri').value;
      return value.startsWith('gatehouse://pair?') && value !== earlier;
    }, earlierUri);
    const again = new URL((await uriInput.inputValue()).replace('gatehouse://', 'https://gatehouse/'));
    const reclaimed = await page.evaluate(async ({ session, secret }) => {
      const r = await fetch('/v1/pair', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify({ session_id: session, secret, device: { name: 'Grace phone', platform: 'ios', app_version: '1.1.0' } }),
      });
      return r.json();
    }, { session: again.searchParams.get('session'), secret: again.searchParams.get('secret') });
    assert.equal(reclaimed.device_id, stranded.id, `the same device, not a new one: ${JSON.stringify(reclaimed)}`);
    await page.locator('#pairing-result', { hasText: 'Claimed by' }).waitFor();
    await page.getByRole('link', { name: 'Devices' }).click();
    await strandedRow.filter({ hasText: 'active' }).waitFor();
    assert.equal(await rows.count(), devicesBefore, 'no duplicate device');

    // Front door: a WebSocket a device opened to the app through gatehouse is counted on
    // its route and listed with its device; revoking the device there, once confirmed,
    // closes the socket at once (1008) and the list is empty again.
    const holder = await pairDevice(page, 'socket holder', { name: 'Socket phone', platform: 'android', app_version: '1.0.0' });
    const relayed = await openRelayedSocket(server.url, holder.access_token);
    sockets.push(relayed);
    assert.deepEqual(upstream.upgrades, [{ path: '/live', device: holder.device_id }], 'the app got the socket, for the device');
    await page.getByRole('link', { name: 'Front door' }).click();
    await page.getByRole('heading', { name: 'Front door', level: 1 }).waitFor();
    assert.equal(await page.locator('#front-off').isVisible(), false, 'a front door is set');
    const rootRoute = (cells) => cells.find((row) => row[0] === '/');
    const [, who, app, health, , open] = rootRoute(await until('the / route is reachable with 1 socket',
      () => tableCells(page, '#front-routes'),
      (cells) => rootRoute(cells)?.[3] === 'reachable' && rootRoute(cells)?.[5] === '1'));
    assert.match(who, /^device/);
    assert.equal(app, `http://127.0.0.1:${upstream.address().port}`);
    assert.deepEqual([health, open], ['reachable', '1']);
    await until('the sockets table lists the device with 1 open', () => tableCells(page, '#front-sockets'),
      (cells) => cells.length === 1 && cells[0][0] === holder.device_id && cells[0][1] === '1');
    await shot(page, 'front');
    const revokeHolder = page.getByRole('button', { name: `Revoke device ${holder.device_id}` });
    page.once('dialog', (dialog) => dialog.dismiss());
    await revokeHolder.click();
    await sleep(500);
    assert.equal(relayed.state.closed, null, 'dismissed: the socket stays open');
    assert.equal(await revokeHolder.count(), 1, 'dismissed: the device stays listed');
    let asked = '';
    page.once('dialog', (dialog) => { asked = dialog.message(); dialog.accept(); });
    await revokeHolder.click();
    await statusSays(page, `Device ${holder.device_id} revoked; its sockets are closed.`);
    assert.ok(asked.startsWith(`Revoke device ${holder.device_id}?`), `the question asked: ${asked}`);
    const closedBy = await within(relayed.closed, 5000, 'the server closes the relayed socket of the revoked device');
    assert.equal(closedBy.frame, true, `a close frame before the connection ends: ${JSON.stringify(closedBy)}`);
    assert.equal(closedBy.code, 1008, `closed as a policy violation: ${JSON.stringify(closedBy)}`);
    await page.locator('#front-sockets tbody tr', { hasText: 'No relayed sockets.' }).waitFor();
    assert.equal(await page.locator('#front-sockets tbody tr').count(), 1);
    await until('the / route counts no socket', () => tableCells(page, '#front-routes'),
      (cells) => rootRoute(cells)?.[5] === '0');
    await shot(page, 'front-revoked');

    // Audit: recent events, then the live tail shows a new one.
    await page.getByRole('link', { name: 'Audit' }).click();
    const events = page.locator('#audit-table tbody tr');
    await events.filter({ hasText: 'device.revoked' }).first().waitFor();
    await page.evaluate(async () => {
      const s = await fetch('/v1/session').then((r) => r.json());
      await fetch('/v1/pairing/sessions', {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': s.csrf_token },
        body: JSON.stringify({ name: 'tail check' }),
      });
    });
    await events.filter({ hasText: 'tail check' }).first().waitFor();
    await page.getByLabel('Event type').fill('login.*');
    await page.getByRole('button', { name: 'Filter' }).click();
    await events.filter({ hasText: 'login.failed' }).first().waitFor();
    assert.equal(await events.filter({ hasText: 'pairing.created' }).count(), 0, 'the filter applies');
    await shot(page, 'audit');

    // Bans: none yet.
    await page.getByRole('link', { name: 'Bans' }).click();
    await page.locator('#bans-table tbody tr', { hasText: 'No bans.' }).waitFor();
    await shot(page, 'bans');

    // Device codes: a device without a camera asks (RFC 8628); the operator arrives
    // through verification_uri_complete, which fills the code in and approves nothing,
    // sees who asks, names the device and approves; the device's next poll gets tokens.
    const grant = await page.evaluate(async () => {
      const r = await fetch('/v1/device_authorization', {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
        body: 'client_id=hall-display',
      });
      return r.json();
    });
    const poll = () => page.evaluate(async (code) => {
      const r = await fetch('/v1/token', {
        method: 'POST',
        headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
        body: `grant_type=${encodeURIComponent('urn:ietf:params:oauth:grant-type:device_code')}&device_code=${encodeURIComponent(code)}`,
      });
      return { status: r.status, body: await r.json() };
    }, grant.device_code);
    assert.equal((await poll()).body.error, 'authorization_pending');
    await page.goto(grant.verification_uri_complete);
    await page.locator('#device-grant', { hasText: 'hall-display' }).waitFor();
    assert.equal(new URL(page.url()).search, '', 'the code left the address bar');
    assert.equal(new URL(page.url()).hash, '#device');
    assert.equal(await page.getByLabel('Code the device shows').inputValue(), grant.user_code);
    assert.equal((await poll()).body.error, 'slow_down', 'opening the page approved nothing');
    await page.getByLabel('Name for the device', { exact: true }).fill('Hall display');
    await shot(page, 'device-code');
    await page.getByRole('button', { name: 'Approve' }).click();
    await statusSays(page, 'Approved: Hall display is a device now');
    assert.equal(await page.locator('#device-decide').isVisible(), false, 'decided: no more buttons');
    await sleep(6500); // the 1 s interval, 5 s longer after slow_down
    const polled = await poll();
    assert.equal(polled.status, 200, JSON.stringify(polled.body));
    // A wrong code says so, and keeps the form.
    await page.getByLabel('Code the device shows').fill('BBBB-BBBB');
    await page.getByRole('button', { name: 'Look up' }).click();
    await statusSays(page, 'no device is waiting with this user code');
    assert.equal(await page.locator('#device-grant').isVisible(), false);

    // Keys: an emergency rotation after a confirmation.
    await page.getByRole('link', { name: 'Keys' }).click();
    await page.locator('#keys-table tbody tr', { hasText: 'next' }).waitFor();
    page.once('dialog', (dialog) => dialog.accept());
    await page.getByRole('button', { name: 'Rotate now' }).click();
    await statusSays(page, 'Rotated');
    await page.locator('#keys-table tbody tr', { hasText: 'retiring' }).waitFor();
    await shot(page, 'keys');

    // A page from another origin, opened in the same browser while signed in, posts to
    // the API (a form, the classic CSRF): refused (no cookie across sites, or 403 for a
    // same-site page without the CSRF token), and nothing changes.
    const keysBefore = await page.evaluate(() => fetch('/v1/keys').then((r) => r.json()));
    const evil = createServer((req, res) => {
      res.setHeader('content-type', 'text/html');
      res.end(`<!doctype html><form id="f" method="post" enctype="text/plain"
        action="${server.url}/v1/keys/rotate"><input name='{"now": true, "x": "' value='"}'>
        </form><script>document.getElementById('f').submit()</script>`);
    });
    await new Promise((ready) => evil.listen(0, '127.0.0.1', ready));
    const attacker = await context.newPage();
    const posted = attacker.waitForResponse((r) => r.url().endsWith('/v1/keys/rotate'));
    await attacker.goto(`http://127.0.0.1:${evil.address().port}/`);
    const refused = await posted;
    assert.ok([401, 403].includes(refused.status()), `a cross-origin post is refused (${refused.status()})`);
    await attacker.close();
    evil.close();
    const keysAfter = await page.evaluate(() => fetch('/v1/keys').then((r) => r.json()));
    assert.deepEqual(keysAfter, keysBefore, 'the cross-origin post changed no key');

    // Keyboard: the navigation is reachable with Tab and shows its focus.
    await page.keyboard.press('Tab');
    const focused = await page.evaluate(() => document.activeElement && document.activeElement.tagName);
    assert.ok(focused, 'something takes focus');

    // Every page at both widths, with something to act on in each: an active device with
    // a long name holding a relayed socket, and a ban (of another loopback address) to lift.
    const spare = await pairDevice(page, 'spare',
      { name: 'Ada Lovelace’s spare tablet for the kitchen', platform: 'ios', app_version: '2.10.3-beta.1' });
    sockets.push(await openRelayedSocket(server.url, spare.access_token));
    await banAnotherAddress(server.url);
    {
      const cookies = await context.cookies();
      const found = [];
      for (const width of WIDTHS) found.push(...await sweep(browser, server, width, cookies, problems));
      if (found.length > 0) console.error(found.join('\n'));
      assert.deepEqual(found, [], 'every page at 390 and 1280 px');
    }

    // Reloading keeps the session; signing out shows the sign-in form again.
    await page.reload();
    await page.getByRole('heading', { name: 'Signing keys', level: 1 }).waitFor();
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();
    await page.reload();
    await page.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();

    // The first admin user from the setup link, at both widths (the second finds the
    // first made already), then from a token pasted on the sign-in page; a link with a
    // wrong token says so.
    const made = [];
    let wide = null;
    for (const [width, username] of [[390, 'ada'], [1280, 'grace']]) {
      const signedIn = await setupByLink(browser, server, width, username, made, problems);
      made.push(username);
      if (width === 1280) wide = signedIn;
      else await signedIn.close();
    }
    {
      const pasted = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 390, height: 844 } });
      const p = await pasted.newPage();
      watch(p, problems);
      await p.goto(`${server.url}/admin/#setup=gha_0000000000000000_wrong`);
      await p.getByRole('heading', { name: 'Create the first admin user', level: 1 }).waitFor();
      await statusSays(p, 'token is not accepted');
      await p.getByLabel('Bootstrap admin token').waitFor();
      await p.getByRole('button', { name: 'Back to sign-in' }).click();
      await p.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();
      await p.getByRole('button', { name: 'Set up with a bootstrap token' }).click();
      await p.getByLabel('Bootstrap admin token').fill(server.token);
      await p.locator('#setup-username').fill('linus');
      await p.locator('#setup-password').fill(PASSWORD);
      await p.locator('#setup-password2').fill(PASSWORD);
      await p.getByRole('button', { name: 'Create the user and sign in' }).click();
      await p.locator('#who-name', { hasText: 'Signed in as linus' }).waitFor();
      await p.getByRole('heading', { name: 'Overview', level: 1 }).waitFor();
      await pasted.close();
    }
    // A user made there lifts the ban from the bans page.
    {
      const p = wide.pages()[0];
      await p.locator('nav a[data-page="bans"]').click();
      await p.getByRole('button', { name: 'Unban ip:127.0.0.2' }).click();
      await statusSays(p, 'Ban on ip:127.0.0.2 lifted');
      await p.locator('#bans-table tbody tr', { hasText: 'ip:127.0.0.2' }).filter({ hasNotText: 'Unban' }).waitFor();
      await wide.close();
    }

    assert.deepEqual(problems, [], 'no script error or CSP violation');
    console.log('admin UI e2e: 1 passed, 0 failed');
  } finally {
    for (const relayed of sockets) relayed.socket.destroy();
    await browser.close();
    server.child.kill('SIGTERM');
    upstream.closeAllConnections();
    upstream.close();
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  console.log('admin UI e2e: 0 passed, 1 failed');
  process.exit(1);
});
