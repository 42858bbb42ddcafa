// The admin UI in a real browser (headless Chromium, through playwright-core): sign-in,
// every page, pairing a device from its QR page, revoking it, the audit tail, a key
// rotation and sign-out, with no script error and no Content-Security-Policy violation.
//
// Run from the repository root after `cargo build`:
//   (cd tests/e2e && npm install) && node tests/e2e/admin_ui.mjs
// Environment: GATEHOUSE_BIN (default target/debug/gatehouse), CHROMIUM (default
// /usr/bin/chromium), SCREENSHOTS (a folder to save one screenshot per page; none if unset).

import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { chromium } from 'playwright-core';

const axeScript = createRequire(import.meta.url).resolve('axe-core/axe.min.js');

const bin = resolve(process.env.GATEHOUSE_BIN || 'target/debug/gatehouse');
const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const shots = process.env.SCREENSHOTS ? resolve(process.env.SCREENSHOTS) : null;
const TIMEOUT = 15000;

/** Starts `gatehouse serve` on a fresh data file: its URL and bootstrap token. */
function startServer(dir) {
  const child = spawn(bin, [
    'serve', '--data', join(dir, 'gatehouse.redb'), '--listen', '127.0.0.1:0', '--tls', 'self-signed',
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, GATEHOUSE_LOG: 'warn' } });
  let out = '';
  return new Promise((done, fail) => {
    const timer = setTimeout(() => fail(new Error(`the server did not start:\n${out}`)), 30000);
    const read = (chunk) => {
      out += chunk;
      const url = out.match(/gatehouse listening on (https:\/\/\S+)/);
      const token = out.match(/\b(gha_[A-Za-z0-9_-]+)/);
      if (url && token) {
        clearTimeout(timer);
        done({ child, url: url[1], token: token[1] });
      }
    };
    child.stdout.on('data', read);
    child.stderr.on('data', read);
    child.on('exit', (code) => fail(new Error(`the server exited (${code}):\n${out}`)));
  });
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

async function main() {
  if (shots) mkdirSync(shots, { recursive: true });
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-e2e-'));
  const server = await startServer(dir);
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
    page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
    page.on('console', (msg) => {
      // A refused sign-in or an expected 401 logs a failed resource load; those are fine.
      if (msg.type() === 'error' && !/status of 401/.test(msg.text())) problems.push(`console: ${msg.text()}`);
    });
    page.on('response', (r) => {
      if (r.status() >= 400 && r.status() !== 401) problems.push(`${r.status()} for ${r.url()}`);
    });
    page.setDefaultTimeout(TIMEOUT);

    // /admin redirects to the page, which asks to sign in.
    await page.goto(`${server.url}/admin`);
    assert.equal(new URL(page.url()).pathname, '/admin/');
    await page.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();
    assert.equal(await page.locator('nav').isVisible(), false, 'no navigation before sign-in');
    await shot(page, 'sign-in');

    // A wrong token is refused with a message.
    await page.getByLabel('Admin token').fill('gha_0000000000000000_wrong');
    await page.getByRole('button', { name: 'Sign in with token' }).click();
    await statusSays(page, 'Sign-in refused');

    // The bootstrap token signs in; the overview shows the server's state.
    await page.getByLabel('Admin token').fill(server.token);
    await page.getByLabel('Admin token').press('Enter');
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

    // Accessibility: axe-core's WCAG 2.1 A and AA rules (labels, names, contrast, roles,
    // landmarks) on every page, in a second context of the same browser that may inject
    // the checker (the UI's own CSP forbids it, rightly, in the main run).
    {
      const cookies = await context.cookies();
      const audit = await browser.newContext({ ignoreHTTPSErrors: true, bypassCSP: true });
      await audit.addCookies(cookies);
      const a11y = await audit.newPage();
      const pages = ['overview', 'pairing', 'devices', 'audit', 'bans', 'keys'];
      for (const name of pages) {
        await a11y.goto(`${server.url}/admin/#${name}`);
        await a11y.locator('main h1:visible', { hasNotText: 'Loading' }).first().waitFor();
        await a11y.waitForLoadState('networkidle');
        await a11y.addScriptTag({ path: axeScript });
        const violations = await a11y.evaluate(async () => {
          const result = await window.axe.run(document, {
            runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] },
          });
          return result.violations.map((v) => `${v.id} (${v.impact}): ${v.nodes.length} node(s), e.g. ${v.nodes[0].target}`);
        });
        assert.deepEqual(violations, [], `accessibility of the ${name} page`);
      }
      // And the sign-in page, signed out.
      const anonymous = await browser.newContext({ ignoreHTTPSErrors: true, bypassCSP: true });
      const signIn = await anonymous.newPage();
      await signIn.goto(`${server.url}/admin/`);
      await signIn.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();
      await signIn.addScriptTag({ path: axeScript });
      const violations = await signIn.evaluate(async () => (await window.axe.run(document, {
        runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] },
      })).violations.map((v) => `${v.id} (${v.impact}): ${v.nodes[0].target}`));
      assert.deepEqual(violations, [], 'accessibility of the sign-in page');
      await audit.close();
      await anonymous.close();
    }

    // Reloading keeps the session; signing out shows the sign-in form again.
    await page.reload();
    await page.getByRole('heading', { name: 'Signing keys', level: 1 }).waitFor();
    await page.getByRole('button', { name: 'Sign out' }).click();
    await page.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();
    await page.reload();
    await page.getByRole('heading', { name: 'Sign in', level: 1 }).waitFor();

    assert.deepEqual(problems, [], 'no script error or CSP violation');
    console.log('admin UI e2e: 1 passed, 0 failed');
  } finally {
    await browser.close();
    server.child.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  console.log('admin UI e2e: 0 passed, 1 failed');
  process.exit(1);
});
