// The client against a real gatehouse: pairing with the pin, the storage hook,
// single-flight refresh, unpairing, and bad inputs.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import {
  fetchTransport,
  GatehouseClient,
  GatehouseError,
  MemoryStore,
  PairingUriError,
  parsePairingUri,
} from '../dist/node.js';
import { GatehouseClient as BrowserClient } from '../dist/index.js';
import { startServer } from './server.mjs';

const DEVICE = { name: 'Test phone', platform: 'android', appVersion: '1.0.0' };

/** A store that records every call, on top of a MemoryStore. */
class RecordingStore extends MemoryStore {
  calls = [];
  load() {
    this.calls.push('load');
    return super.load();
  }
  async save(session) {
    this.calls.push('save');
    await new Promise((r) => setTimeout(r, 5)); // a store that takes its time
    super.save(session);
  }
  clear() {
    this.calls.push('clear');
    super.clear();
  }
  count(call) {
    return this.calls.filter((c) => c === call).length;
  }
}

/** A clock the test moves. */
function clock(start = Date.now()) {
  let now = start;
  const tick = () => now;
  tick.advance = (ms) => {
    now += ms;
  };
  return tick;
}

let server;
before(async () => {
  server = await startServer();
});
after(() => server?.stop());

describe('pair', () => {
  test('pairs through the pin, saves the session, and the token is the device\'s', async () => {
    const store = new RecordingStore();
    const client = new GatehouseClient({ store });
    const session = await client.pair(await server.pairingUri('ada'), DEVICE);
    assert.match(session.deviceId, /^dev_[0-9a-f]{32}$/);
    assert.equal(session.server, server.url);
    assert.equal(session.pin, server.pin);
    assert.deepEqual(store.load(), session);
    assert.equal(store.count('save'), 1);
    assert.equal(await client.deviceId(), session.deviceId);
    assert.equal(await client.accessToken(), session.accessToken);
    assert.equal(await server.active(session.accessToken), true);
    const devices = JSON.parse((await server.request('GET', `/v1/devices/${session.deviceId}`, { admin: true })).text);
    assert.equal(devices.name, DEVICE.name);
    assert.equal(devices.platform, DEVICE.platform);
  });

  test('refuses a server whose certificate does not match the pin, without sending the secret', async () => {
    const uri = await server.pairingUri('pinned');
    const wrongPin = 'sha256%2F' + encodeURIComponent(Buffer.alloc(32, 7).toString('base64'));
    const tampered = uri.replace(/pin=[^&]*/, `pin=${wrongPin}`);
    assert.notEqual(tampered, uri);
    const client = new GatehouseClient({ store: new MemoryStore() });
    await assert.rejects(client.pair(tampered, DEVICE), (error) => {
      assert.ok(error instanceof GatehouseError);
      assert.equal(error.code, 'pin_mismatch');
      assert.equal(error.status, 0);
      return true;
    });
    assert.equal(await client.deviceId(), null);
    // The session was never claimed: the secret did not leave the client.
    const session = await client.pair(uri, DEVICE);
    assert.match(session.deviceId, /^dev_/);
  });

  test('a URI without a pin is checked against the CAs, so a self-signed server is refused', async () => {
    const uri = (await server.pairingUri('nopin')).replace(/&pin=[^&]*/, '');
    assert.equal(parsePairingUri(uri).pin, undefined);
    const client = new GatehouseClient({ store: new MemoryStore() });
    await assert.rejects(client.pair(uri, DEVICE), { code: 'network_error' });
  });

  test('the fetch transport (browsers) refuses a pinned server instead of ignoring the pin', async () => {
    const client = new BrowserClient({ store: new MemoryStore() });
    await assert.rejects(client.pair(await server.pairingUri('browser'), DEVICE), { code: 'pin_unsupported' });
    const explicit = new GatehouseClient({ store: new MemoryStore(), transport: fetchTransport() });
    await assert.rejects(explicit.pair(await server.pairingUri('browser2'), DEVICE), { code: 'pin_unsupported' });
  });

  test('a used session is refused with pairing_failed (401)', async () => {
    const uri = await server.pairingUri('once');
    await new GatehouseClient({ store: new MemoryStore() }).pair(uri, DEVICE);
    const second = new GatehouseClient({ store: new MemoryStore() });
    await assert.rejects(second.pair(uri, DEVICE), (error) => {
      assert.equal(error.code, 'pairing_failed');
      assert.equal(error.status, 401);
      assert.match(error.requestId, /^[0-9a-f]+$/);
      return true;
    });
  });

  test('an expired URI is refused by the device clock before anything is sent', async () => {
    const uri = await server.pairingUri('late');
    const late = clock(parsePairingUri(uri).expiresAt * 1000);
    const client = new GatehouseClient({ store: new MemoryStore(), now: late });
    await assert.rejects(client.pair(uri, DEVICE), (error) => error instanceof PairingUriError && error.code === 'expired');
    // Still claimable: nothing reached the server.
    await new GatehouseClient({ store: new MemoryStore() }).pair(uri, DEVICE);
  });

  test('bad inputs are refused with clear errors', async () => {
    const client = new GatehouseClient({ store: new MemoryStore() });
    await assert.rejects(client.pair('https://example.com', DEVICE), { name: 'PairingUriError', code: 'not_a_pairing_uri' });
    const uri = await server.pairingUri('bad-device');
    for (const device of [
      { ...DEVICE, name: '' },
      { ...DEVICE, name: 'x'.repeat(65) },
      { ...DEVICE, platform: 'a\nb' },
      { ...DEVICE, appVersion: undefined },
    ]) {
      await assert.rejects(client.pair(uri, device), (error) => {
        assert.equal(error.code, 'invalid_request');
        assert.match(error.message, /device\./);
        return true;
      });
    }
    // The server's own checks stand behind the client's: 64 characters pass here.
    const session = await client.pair(uri, { ...DEVICE, name: 'é'.repeat(64) });
    assert.match(session.deviceId, /^dev_/);
    assert.throws(() => new GatehouseClient({}), TypeError);
    await assert.rejects(new GatehouseClient({ store: new MemoryStore() }).accessToken(), { code: 'unpaired' });
  });
});

describe('tokens', () => {
  test('a stored session is loaded once and used without pairing again', async () => {
    const store = new RecordingStore();
    const first = new GatehouseClient({ store });
    const session = await first.pair(await server.pairingUri('reload'), DEVICE);
    const second = new GatehouseClient({ store });
    store.calls.length = 0;
    const tokens = await Promise.all([second.accessToken(), second.accessToken(), second.deviceId()]);
    assert.deepEqual(tokens, [session.accessToken, session.accessToken, session.deviceId]);
    assert.equal(store.count('load'), 1);
  });

  test('10 concurrent callers after expiry share exactly one refresh, and the family stays active', async () => {
    const store = new RecordingStore();
    const now = clock();
    const client = new GatehouseClient({ store, now });
    const paired = await client.pair(await server.pairingUri('single-flight'), DEVICE);
    const before = await server.audit('token.refreshed', paired.deviceId);
    assert.equal(before.length, 0);
    now.advance(16 * 60 * 1000); // past the 15-minute access token
    store.calls.length = 0;

    const tokens = await Promise.all(Array.from({ length: 10 }, () => client.accessToken()));

    assert.equal(new Set(tokens).size, 1, 'every caller got the same token');
    assert.notEqual(tokens[0], paired.accessToken);
    assert.equal((await server.audit('token.refreshed', paired.deviceId)).length, 1, 'one refresh on the server');
    assert.equal((await server.audit('token.reused', paired.deviceId)).length, 0, 'no refresh token presented twice');
    assert.equal(store.count('save'), 1);
    const stored = store.load();
    assert.equal(stored.accessToken, tokens[0]);
    assert.notEqual(stored.refreshToken, paired.refreshToken);
    assert.equal(await server.active(stored.refreshToken), true, 'the family is still active');
    assert.equal(await server.active(tokens[0]), true);
    assert.equal(await server.active(paired.refreshToken), false, 'the old refresh token is spent');

    // Valid again: no more refreshes.
    await Promise.all(Array.from({ length: 5 }, () => client.accessToken()));
    assert.equal((await server.audit('token.refreshed', paired.deviceId)).length, 1);
  });

  test('concurrent forced refreshes also share one', async () => {
    const client = new GatehouseClient({ store: new MemoryStore() });
    const paired = await client.pair(await server.pairingUri('forced'), DEVICE);
    const sessions = await Promise.all(Array.from({ length: 5 }, () => client.refresh()));
    assert.equal(new Set(sessions.map((s) => s.refreshToken)).size, 1);
    assert.equal((await server.audit('token.refreshed', paired.deviceId)).length, 1);
    // One after the other: two more.
    await client.refresh();
    await client.refresh();
    assert.equal((await server.audit('token.refreshed', paired.deviceId)).length, 3);
    assert.equal((await server.audit('token.reused', paired.deviceId)).length, 0);
    assert.equal(await server.active((await client.session()).refreshToken), true);
  });

  test('a revoked device ends the session: invalid_grant, the store cleared, onUnpaired called', async () => {
    const store = new RecordingStore();
    const ended = [];
    const client = new GatehouseClient({ store, onUnpaired: (error) => ended.push(error.code) });
    const paired = await client.pair(await server.pairingUri('revoked'), DEVICE);
    await server.cli('devices', 'revoke', paired.deviceId);
    await assert.rejects(client.refresh(), (error) => {
      assert.equal(error.code, 'invalid_grant');
      assert.equal(error.status, 400);
      assert.equal(error.unpaired, true);
      return true;
    });
    assert.deepEqual(ended, ['invalid_grant']);
    assert.equal(store.load(), null);
    assert.equal(store.count('clear'), 1);
    await assert.rejects(client.accessToken(), { code: 'unpaired' });
  });

  test('a store that loads a spent refresh token: reuse is detected and the family revoked', async () => {
    // What happens when save() was not durable: the stale copy's refresh token is spent.
    const client = new GatehouseClient({ store: new MemoryStore() });
    const paired = await client.pair(await server.pairingUri('stale'), DEVICE);
    await client.refresh();
    const current = await client.session();
    const stale = new GatehouseClient({ store: new MemoryStore(paired) });
    await assert.rejects(stale.refresh(), { code: 'invalid_grant' });
    assert.equal((await server.audit('token.reused', paired.deviceId)).length, 1);
    assert.equal(await server.active(current.refreshToken), false, 'the whole family is revoked');
  });

  test('unpair revokes the family and clears the store', async () => {
    const store = new RecordingStore();
    const client = new GatehouseClient({ store });
    const paired = await client.pair(await server.pairingUri('bye'), DEVICE);
    await client.unpair();
    assert.equal(store.load(), null);
    assert.equal(await server.active(paired.refreshToken), false);
    assert.equal(await server.active(paired.accessToken), false);
    assert.equal(await client.deviceId(), null);
    await client.unpair(); // nothing to do
  });
});
