// The WebSocket channel against a real gatehouse, with the ws package (Node 20 has no
// global WebSocket): authentication through the pin, reconnection after the server
// closes the socket, and the end of the session.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import WebSocket from 'ws';
import { GatehouseClient, MemoryStore } from '../dist/node.js';
import { startServer } from './server.mjs';

const DEVICE = { name: 'Socket phone', platform: 'linux', appVersion: '2.0' };

/** Records a socket's events; `next(kind)` waits for the next one of a kind. */
function recorder() {
  const events = [];
  const waiters = [];
  const push = (kind, value) => {
    events.push({ kind, value });
    for (const waiter of [...waiters]) {
      if (waiter.kind === kind && events.filter((e) => e.kind === kind).length > waiter.seen) {
        waiters.splice(waiters.indexOf(waiter), 1);
        clearTimeout(waiter.timer);
        waiter.resolve(value);
      }
    }
  };
  return {
    events,
    handlers: {
      onReady: (info) => push('ready', info),
      onClose: (info) => push('close', info),
      onError: (error) => push('error', error),
      onMessage: (message) => push('message', message),
    },
    count: (kind) => events.filter((e) => e.kind === kind).length,
    /** Resolves with the next event of `kind` after the `seen`-th. */
    next(kind, seen = events.filter((e) => e.kind === kind).length, timeoutMs = 15_000) {
      if (events.filter((e) => e.kind === kind).length > seen) {
        return Promise.resolve(events.filter((e) => e.kind === kind)[seen].value);
      }
      return new Promise((resolve, reject) => {
        const waiter = { kind, seen, resolve };
        waiter.timer = setTimeout(() => {
          waiters.splice(waiters.indexOf(waiter), 1);
          reject(new Error(`no ${kind} event within ${timeoutMs} ms; events: ${JSON.stringify(events.map((e) => e.kind))}`));
        }, timeoutMs);
        waiters.push(waiter);
      });
    },
  };
}

let server;
before(async () => {
  server = await startServer();
});
after(() => server?.stop());

describe('WebSocket channel', () => {
  test('authenticates, reconnects after a revoked token and after a restart, and stops when the device is revoked', async () => {
    const store = new MemoryStore();
    const unpaired = [];
    const client = new GatehouseClient({ store, WebSocket, onUnpaired: (e) => unpaired.push(e.code) });
    const paired = await client.pair(await server.pairingUri('socket'), DEVICE);
    const events = recorder();
    const socket = client.connect(events.handlers, { initialDelayMs: 100, maxDelayMs: 500 });
    try {
      const ready = await events.next('ready', 0);
      assert.equal(ready.deviceId, paired.deviceId);
      assert.ok(ready.expiresIn > 800 && ready.expiresIn <= 900, `expires_in ${ready.expiresIn}`);
      assert.equal(socket.state, 'ready');
      assert.equal(socket.ping(), true);

      // 1. The socket's access token is revoked (RFC 7009): the server closes with 1008
      //    "token revoked"; the client refreshes (the family is fine) and comes back.
      const revoke = await server.request('POST', '/v1/revoke', {
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ token: paired.accessToken }).toString(),
      });
      assert.equal(revoke.status, 200);
      const closed = await events.next('close', 0);
      assert.equal(closed.code, 1008);
      assert.equal(closed.reason, 'token revoked');
      assert.equal(closed.reconnectInMs, 0);
      await events.next('ready', 1);
      const renewed = await client.session();
      assert.notEqual(renewed.accessToken, paired.accessToken);
      assert.equal(await server.active(renewed.accessToken), true);

      // 2. The server restarts: 1001 "server shutting down", then reconnection with
      //    backoff until it is back.
      await server.restart();
      const shutdown = await events.next('close', 1);
      assert.equal(shutdown.code, 1001);
      assert.equal(shutdown.reason, 'server shutting down');
      assert.ok(shutdown.reconnectInMs > 0);
      await events.next('ready', 2);
      assert.equal(socket.state, 'ready');
      assert.equal((await client.session()).accessToken, renewed.accessToken, 'a restart needs no new token');

      // 3. The device is revoked: the socket closes, the refresh is refused, the session
      //    ends, and the client does not reconnect.
      const closes = events.count('close');
      await server.cli('devices', 'revoke', paired.deviceId);
      const last = await events.next('close', closes);
      assert.equal(last.code, 1008);
      assert.equal(last.reason, 'token revoked');
      assert.equal(last.reconnectInMs, null);
      assert.equal(socket.state, 'closed');
      assert.deepEqual(unpaired, ['invalid_grant']);
      assert.equal(store.load(), null);
      await new Promise((r) => setTimeout(r, 700));
      assert.equal(events.count('ready'), 3, 'no reconnection after the session ended');
    } finally {
      socket.close();
    }
  });

  test('close() stops the channel for good', async () => {
    const client = new GatehouseClient({ store: new MemoryStore(), WebSocket });
    await client.pair(await server.pairingUri('closing'), DEVICE);
    const events = recorder();
    const socket = client.connect(events.handlers, { initialDelayMs: 100 });
    await events.next('ready', 0);
    socket.close();
    const closed = await events.next('close', 0);
    assert.equal(closed.code, 1000);
    assert.equal(closed.reconnectInMs, null);
    assert.equal(socket.state, 'closed');
    await new Promise((r) => setTimeout(r, 400));
    assert.equal(events.count('ready'), 1);
  });

  test('the pin applies to the socket too', async () => {
    const store = new MemoryStore();
    const client = new GatehouseClient({ store, WebSocket });
    const paired = await client.pair(await server.pairingUri('socket-pin'), DEVICE);
    const wrongPin = `sha256/${Buffer.alloc(32, 9).toString('base64')}`;
    const other = new GatehouseClient({ store: new MemoryStore({ ...paired, pin: wrongPin }), WebSocket });
    const events = recorder();
    const socket = other.connect(events.handlers, { initialDelayMs: 100, maxDelayMs: 200 });
    try {
      const error = await events.next('error', 0);
      assert.equal(error.code, 'pin_mismatch');
      const closed = await events.next('close', 0);
      assert.ok(closed.reconnectInMs > 0);
      await events.next('close', 2);
      assert.equal(events.count('ready'), 0, 'never authenticated past a wrong pin');
    } finally {
      socket.close();
    }
  });

  test('without a WebSocket constructor, connect reports it', async () => {
    const client = new GatehouseClient({ store: new MemoryStore() });
    await client.pair(await server.pairingUri('no-ws'), DEVICE);
    if (globalThis.WebSocket) return; // Node 22 and newer have one
    const events = recorder();
    const socket = client.connect(events.handlers, { initialDelayMs: 100 });
    const error = await events.next('error', 0);
    assert.equal(error.code, 'websocket_unavailable');
    socket.close();
  });
});

describe('WebSocket token renewal', () => {
  let short;
  before(async () => {
    // One-minute tokens; with a 55-second margin the client renews 5 s after connecting.
    short = await startServer({ GATEHOUSE_ACCESS_TTL: '1m' });
  });
  after(() => short?.stop());

  test('renews the socket\'s token on the open socket before it expires', async () => {
    const client = new GatehouseClient({ store: new MemoryStore(), WebSocket, refreshMarginSeconds: 55 });
    const paired = await client.pair(await short.pairingUri('renewal'), DEVICE);
    const events = recorder();
    const socket = client.connect(events.handlers, { initialDelayMs: 100 });
    try {
      const ready = await events.next('ready', 0);
      assert.ok(ready.expiresIn <= 60);
      const deadline = Date.now() + 15_000;
      while ((await short.audit('token.refreshed', paired.deviceId)).length === 0) {
        assert.ok(Date.now() < deadline, 'no refresh within 15 s');
        await new Promise((r) => setTimeout(r, 250));
      }
      const renewed = await client.session();
      assert.notEqual(renewed.accessToken, paired.accessToken);
      // The server holds the new token for this socket: revoking the old one leaves it open.
      await new Promise((r) => setTimeout(r, 500));
      await short.request('POST', '/v1/revoke', {
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ token: paired.accessToken }).toString(),
      });
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(events.count('close'), 0, `closed: ${JSON.stringify(events.events)}`);
      assert.equal(events.count('ready'), 1, 'a renewal is not a new connection');
      assert.equal(socket.state, 'ready');
      // Revoking the token the socket holds now closes it.
      await short.request('POST', '/v1/revoke', {
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: new URLSearchParams({ token: renewed.accessToken }).toString(),
      });
      const closed = await events.next('close', 0);
      assert.equal(closed.reason, 'token revoked');
    } finally {
      socket.close();
    }
  });
});
