// Pairing URIs: the example of schema/pairing-uri.md, URIs from a real server, and every
// way a URI can be wrong.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { checkPairingUri, PairingUriError, parsePairingUri } from '../dist/node.js';
import { startServer } from './server.mjs';

const EXAMPLE =
  'gatehouse://pair?v=1&server=https%3A%2F%2F127.0.0.1%3A8443' +
  '&session=ps_4e23451b523bcf1bd0dfb04b4f852abc' +
  '&secret=Fox1AZCCzTauydfluosDK4EY0yHejbWJDZz63cZk_DY' +
  '&exp=1795428009' +
  '&pin=sha256%2Fbmb%2B1qYlnRPg%2FKxCyB5UJcrdrQqT%2F%2BIzihPcXBWL3qM%3D';

function refused(uri, code, parameter) {
  assert.throws(
    () => parsePairingUri(uri),
    (error) => {
      assert.ok(error instanceof PairingUriError, `not a PairingUriError: ${error}`);
      assert.equal(error.code, code, `${uri}: ${error.message}`);
      if (parameter !== undefined) assert.equal(error.parameter, parameter);
      assert.ok(error.message.length > 10, 'the message says why');
      return true;
    },
  );
}

describe('parsePairingUri', () => {
  test('decodes the documented example', () => {
    assert.deepEqual(parsePairingUri(EXAMPLE), {
      version: 1,
      server: 'https://127.0.0.1:8443',
      sessionId: 'ps_4e23451b523bcf1bd0dfb04b4f852abc',
      secret: 'Fox1AZCCzTauydfluosDK4EY0yHejbWJDZz63cZk_DY',
      expiresAt: 1795428009,
      pin: 'sha256/bmb+1qYlnRPg/KxCyB5UJcrdrQqT/+IzihPcXBWL3qM=',
    });
  });

  test('does not depend on the order, ignores unknown parameters, and allows no pin', () => {
    const uri =
      'gatehouse://pair?exp=1795428009&future=x%20y&secret=Fox1AZCCzTauydfluosDK4EY0yHejbWJDZz63cZk_DY' +
      '&session=ps_4e23451b523bcf1bd0dfb04b4f852abc&server=https%3A%2F%2Fauth.example.com&v=1&flag';
    const parsed = parsePairingUri(uri);
    assert.equal(parsed.server, 'https://auth.example.com');
    assert.equal(parsed.pin, undefined);
    assert.equal('pin' in parsed, false);
  });

  test('refuses what is not a pairing URI', () => {
    refused('https://127.0.0.1:8443/v1/pair', 'not_a_pairing_uri');
    refused('gatehouse://login?v=1', 'not_a_pairing_uri');
    refused('gatehouse://pairing?v=1', 'not_a_pairing_uri');
    refused('gatehouse://pair/x?v=1', 'not_a_pairing_uri');
    refused(`${EXAMPLE}#fragment`, 'not_a_pairing_uri');
    refused('', 'not_a_pairing_uri');
    refused(42, 'not_a_pairing_uri');
  });

  test('refuses a missing or unknown version', () => {
    refused(EXAMPLE.replace('v=1&', ''), 'missing_parameter', 'v');
    refused(EXAMPLE.replace('v=1&', 'v=2&'), 'unsupported_version', 'v');
    refused(EXAMPLE.replace('v=1&', 'v=&'), 'unsupported_version', 'v');
  });

  test('refuses a missing or repeated parameter', () => {
    for (const name of ['server', 'session', 'secret', 'exp']) {
      const without = EXAMPLE.replace(new RegExp(`&${name}=[^&]*`), '');
      assert.notEqual(without, EXAMPLE);
      refused(without, 'missing_parameter', name);
    }
    refused(`${EXAMPLE}&secret=Fox1AZCCzTauydfluosDK4EY0yHejbWJDZz63cZk_DY`, 'repeated_parameter', 'secret');
    refused(`${EXAMPLE}&v=1`, 'repeated_parameter', 'v');
    refused(`${EXAMPLE}&pin=sha256%2Fbmb%2B1qYlnRPg%2FKxCyB5UJcrdrQqT%2F%2BIzihPcXBWL3qM%3D`, 'repeated_parameter', 'pin');
  });

  test('refuses malformed values', () => {
    const bad = {
      server: ['https%3A%2F%2F127.0.0.1%3A8443%2F', 'ftp%3A%2F%2Fexample.com', '127.0.0.1%3A8443', 'https%3A%2F%2Fu%3Ap%40example.com', 'https%3A%2F%2Fexample.com%3Fq'],
      session: ['ps_4E23451B523BCF1BD0DFB04B4F852ABC', 'ps_123', 'dev_4e23451b523bcf1bd0dfb04b4f852abc'],
      secret: ['short', 'Fox1AZCCzTauydfluosDK4EY0yHejbWJDZz63cZk_D%2B', 'Fox1AZCCzTauydfluosDK4EY0yHejbWJDZz63cZk_DYx'],
      exp: ['-1', '1.5', 'soon', ''],
      pin: ['sha1%2Fbmb%2B1qYlnRPg%2FKxCyB5UJcrdrQqT%2F%2BIzihPcXBWL3qM%3D', 'sha256%2Fbmb', 'sha256/bmb+1qYlnRPg/KxCyB5UJcrdrQqT/+IzihPcXBWL3qM%3D%3D'],
    };
    for (const [name, values] of Object.entries(bad)) {
      for (const value of values) {
        const uri = EXAMPLE.replace(new RegExp(`([?&])${name}=[^&]*`), `$1${name}=${value}`);
        assert.notEqual(uri, EXAMPLE);
        refused(uri, 'invalid_parameter', name);
      }
    }
    refused(EXAMPLE.replace('secret=Fox1', 'secret=%E0%A4%A'), 'invalid_parameter', 'secret');
  });
});

describe('checkPairingUri', () => {
  const parsed = parsePairingUri(EXAMPLE);
  test('refuses an expired session by the device clock, before anything is sent', () => {
    checkPairingUri(parsed, { now: parsed.expiresAt * 1000 - 1 });
    assert.throws(() => checkPairingUri(parsed, { now: parsed.expiresAt * 1000 }), { code: 'expired' });
  });
  test('refuses an http:// server unless allowed', () => {
    const plain = { ...parsed, server: 'http://127.0.0.1:8080' };
    assert.throws(() => checkPairingUri(plain, { now: 0 }), { code: 'insecure_server' });
    checkPairingUri(plain, { now: 0, allowInsecureHttp: true });
  });
});

describe('URIs from a real server', () => {
  let server;
  before(async () => {
    server = await startServer();
  });
  after(() => server?.stop());

  test('gatehouse pair new and POST /v1/pairing/sessions make URIs this client reads', async () => {
    const fromCli = parsePairingUri(await server.pairingUri('cli'));
    assert.equal(fromCli.server, server.url);
    assert.equal(fromCli.pin, server.pin);
    assert.ok(fromCli.expiresAt * 1000 > Date.now());

    const res = await server.request('POST', '/v1/pairing/sessions', {
      admin: true,
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ name: 'api', ttl_seconds: 60 }),
    });
    assert.equal(res.status, 201, res.text);
    const answer = JSON.parse(res.text);
    const fromApi = parsePairingUri(answer.pairing_uri);
    assert.equal(fromApi.sessionId, answer.session_id);
    assert.equal(fromApi.secret, answer.secret);
    assert.equal(fromApi.expiresAt, Math.floor(Date.parse(answer.expires_at) / 1000));
    assert.equal(fromApi.pin, server.pin);
  });
});
