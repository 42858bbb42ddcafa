// The device authorization grant (RFC 8628) and DPoP (RFC 9449) driven by an independent,
// maintained OAuth client, oauth4webapi: discovery through the RFC 8414 metadata, the
// device authorization request, polling the token endpoint until an operator approves
// with `gatehouse pair approve`, the token response as the client validates it, a
// refresh, and the refusals: `authorization_pending`, `slow_down` (and its longer
// interval), `access_denied` after `gatehouse pair deny`, and `invalid_grant` for a device
// code used twice. Then a device with its own key (oauth4webapi's DPoP, ES256 and EdDSA):
// its tokens come bound (`token_type: DPoP`, `cnf.jkt`), its refresh needs a proof by the
// key, and the app behind the front door is reached with `Authorization: DPoP` and a
// proof, and not with the token alone; and against a server that wants nonces
// (`tokens.dpop_nonce`), the client's retry with the `DPoP-Nonce` it was given. And the
// token status list (draft-ietf-oauth-status-list) read by a second implementation of
// the format, @sd-jwt/jwt-status-list: each token's `status` claim found and its list
// decoded by it (signature checked by WebCrypto against the JWKS), 0 while the token
// stands, 1 within a second of its revocation. TLS is real: the client trusts only the
// server's self-signed certificate, read from the handshake.
//
// Run from the repository root after `cargo build`:
//   (cd tests/e2e && npm install) && node tests/e2e/device_grant.mjs
// Environment: GATEHOUSE_BIN (default target/debug/gatehouse).

import { spawnSync } from 'node:child_process';
import { createServer } from 'node:http';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect } from 'node:tls';
import assert from 'node:assert/strict';
import * as oauth from 'oauth4webapi';
import { getListFromStatusListJWT, getStatusListFromJWT } from '@sd-jwt/jwt-status-list';
import { Agent, fetch as undiciFetch } from 'undici';
import { bin, serverEnv, startServer } from './server.mjs';

/** The server's certificate as PEM, read from a TLS handshake with it. */
function certificateOf(url) {
  const { hostname, port } = new URL(url);
  return new Promise((done, fail) => {
    const socket = connect({ host: hostname, port: Number(port), rejectUnauthorized: false }, () => {
      const der = socket.getPeerCertificate().raw;
      socket.end();
      const b64 = der.toString('base64').match(/.{1,64}/g).join('\n');
      done(`-----BEGIN CERTIFICATE-----\n${b64}\n-----END CERTIFICATE-----\n`);
    });
    socket.on('error', fail);
  });
}

/** `gatehouse ARGS` against the running server (through its admin socket). */
function cli(dir, ...args) {
  const done = spawnSync(bin, ['--data', join(dir, 'gatehouse.redb'), ...args], {
    env: serverEnv(), encoding: 'utf8', timeout: 30000,
  });
  return done;
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

/** The error code a refused poll carried, as oauth4webapi reports it. */
async function pollError(as, client, options, deviceCode) {
  const response = await oauth.deviceCodeGrantRequest(as, client, oauth.None(), deviceCode, options);
  try {
    await oauth.processDeviceCodeResponse(as, client, response);
  } catch (err) {
    assert.ok(err instanceof oauth.ResponseBodyError, `not an OAuth error: ${err}`);
    assert.equal(err.status, 400);
    return err.error;
  }
  assert.fail('the poll was answered with tokens');
}

/**
 * The status of `accessToken` as an offline verifier sees it: @sd-jwt/jwt-status-list
 * reads the token's place and decodes its list; the list's signature is checked here
 * with WebCrypto against the published JWKS.
 */
async function statusOf(accessToken, fetchWith, jwksUri) {
  const { idx, uri } = getStatusListFromJWT(accessToken);
  const response = await fetchWith(uri, { method: 'GET' });
  assert.equal(response.status, 200);
  assert.equal(response.headers.get('content-type'), 'application/statuslist+jwt');
  assert.equal(response.headers.get('cache-control'), 'private, max-age=60');
  const jwt = await response.text();
  const [header64, payload64, signature64] = jwt.split('.');
  const header = JSON.parse(Buffer.from(header64, 'base64url').toString());
  assert.equal(header.typ, 'statuslist+jwt');
  assert.equal(header.alg, 'EdDSA');
  const jwks = await (await fetchWith(jwksUri, { method: 'GET' })).json();
  const { kty, crv, x } = jwks.keys.find((key) => key.kid === header.kid);
  const key = await crypto.subtle.importKey('jwk', { kty, crv, x }, { name: 'Ed25519' }, false, ['verify']);
  const signed = await crypto.subtle.verify(
    { name: 'Ed25519' }, key, Buffer.from(signature64, 'base64url'), Buffer.from(`${header64}.${payload64}`),
  );
  assert.ok(signed, 'the status list verifies with the published key');
  const payload = JSON.parse(Buffer.from(payload64, 'base64url').toString());
  assert.equal(payload.sub, uri);
  assert.equal(payload.ttl, 60);
  assert.ok(payload.exp > payload.iat);
  const list = getListFromStatusListJWT(jwt);
  assert.equal(list.getBitsPerStatus(), 1);
  return list.getStatus(idx);
}

/** Polls `statusOf` until it reads `status`; how long that took (at most a second). */
async function statusBecomes(status, accessToken, fetchWith, jwksUri) {
  const started = Date.now();
  while ((await statusOf(accessToken, fetchWith, jwksUri)) !== status) {
    assert.ok(Date.now() - started < 1000, `status ${status} not shown within a second`);
    await sleep(25);
  }
  return Date.now() - started;
}

/** The app behind the front door: every request is 200 with the device id it was sent for. */
function startApp() {
  const app = createServer((req, res) => {
    res.setHeader('content-type', 'text/plain');
    res.end(`hello ${req.headers['x-gatehouse-device-id'] || 'nobody'}`);
  });
  return new Promise((ready) => app.listen(0, '127.0.0.1', () => ready(app)));
}

/** The JWK thumbprint (RFC 7638) of a public key, computed here. */
async function thumbprint(publicKey) {
  const jwk = await crypto.subtle.exportKey('jwk', publicKey);
  const members = jwk.kty === 'EC'
    ? { crv: jwk.crv, kty: jwk.kty, x: jwk.x, y: jwk.y }
    : { crv: jwk.crv, kty: jwk.kty, x: jwk.x };
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(JSON.stringify(members)));
  return Buffer.from(digest).toString('base64url');
}

/** A device grant approved by the CLI and taken with `options` (a DPoP handle, say). */
async function approvedTokens(as, client, options, dir, name) {
  const asked = await oauth.processDeviceAuthorizationResponse(
    as, client,
    await oauth.deviceAuthorizationRequest(as, client, oauth.None(), {}, options),
  );
  const approved = cli(dir, 'pair', 'approve', asked.user_code, '--name', name);
  assert.equal(approved.status, 0, approved.stderr);
  return oauth.processDeviceCodeResponse(
    as, client,
    await oauth.deviceCodeGrantRequest(as, client, oauth.None(), asked.device_code, options),
  );
}

async function main() {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-device-grant-'));
  const app = await startApp();
  // A short interval keeps the run short; slow_down still adds its 5 seconds.
  const server = await startServer(dir, ['--upstream', `http://127.0.0.1:${app.address().port}`],
    { GATEHOUSE_PAIRING_DEVICE_POLL_INTERVAL: '1s' });
  try {
    const ca = await certificateOf(server.url);
    const dispatcher = new Agent({ connect: { ca } });
    const options = { [oauth.customFetch]: (url, init) => undiciFetch(url, { ...init, dispatcher }) };
    const issuer = new URL(server.url);

    const as = await oauth.processDiscoveryResponse(
      issuer,
      await oauth.discoveryRequest(issuer, { ...options, algorithm: 'oauth2' }),
    );
    assert.equal(as.device_authorization_endpoint, `${server.url}/v1/device_authorization`);
    assert.ok(as.grant_types_supported.includes('urn:ietf:params:oauth:grant-type:device_code'));
    const client = { client_id: 'e2e-tv' };

    // Ask, poll once (pending), have the operator approve, poll after the interval.
    const asked = await oauth.processDeviceAuthorizationResponse(
      as, client,
      await oauth.deviceAuthorizationRequest(as, client, oauth.None(), {}, options),
    );
    assert.match(asked.user_code, /^[BCDFGHJKLMNPQRSTVWXZ]{4}-[BCDFGHJKLMNPQRSTVWXZ]{4}$/);
    assert.equal(asked.verification_uri, `${server.url}/admin/device`);
    assert.equal(asked.verification_uri_complete, `${server.url}/admin/device?user_code=${asked.user_code}`);
    assert.equal(asked.interval, 1);
    assert.equal(asked.expires_in, 600);
    assert.equal(await pollError(as, client, options, asked.device_code), 'authorization_pending');

    const approved = cli(dir, 'pair', 'approve', asked.user_code.toLowerCase(), '--name', 'Living-room TV');
    assert.equal(approved.status, 0, approved.stderr);
    assert.match(approved.stdout, /^approved: device dev_[0-9a-f]{32} \(Living-room TV\)/);
    const device = approved.stdout.match(/dev_[0-9a-f]{32}/)[0];

    await sleep(1100);
    const tokens = await oauth.processDeviceCodeResponse(
      as, client,
      await oauth.deviceCodeGrantRequest(as, client, oauth.None(), asked.device_code, options),
    );
    assert.equal(tokens.token_type, 'bearer');
    assert.equal(typeof tokens.access_token, 'string');
    assert.equal(typeof tokens.refresh_token, 'string');
    assert.equal(tokens.device_id, device);
    const [, payload] = tokens.access_token.split('.');
    const claims = JSON.parse(Buffer.from(payload, 'base64url').toString());
    assert.equal(claims.sub, device);
    assert.equal(claims.iss, server.url);

    // The refresh grant through the same client.
    const refreshed = await oauth.processRefreshTokenResponse(
      as, client,
      await oauth.refreshTokenGrantRequest(as, client, oauth.None(), tokens.refresh_token, options),
    );
    assert.notEqual(refreshed.refresh_token, tokens.refresh_token);

    // Both access tokens stand in the status list, at two places of one list.
    const fetchWith = options[oauth.customFetch];
    const places = [tokens, refreshed].map((t) => getStatusListFromJWT(t.access_token));
    assert.equal(places[0].uri, `${server.url}/v1/statuslists/0`);
    assert.equal(places[1].uri, places[0].uri);
    assert.notEqual(places[1].idx, places[0].idx);
    for (const t of [tokens, refreshed]) {
      assert.equal(await statusOf(t.access_token, fetchWith, as.jwks_uri), 0);
    }

    // The device code again: spent, and what it issued is revoked, in the list too.
    await sleep(1100);
    assert.equal(await pollError(as, client, options, asked.device_code), 'invalid_grant');
    for (const t of [tokens, refreshed]) {
      const took = await statusBecomes(1, t.access_token, fetchWith, as.jwks_uri);
      console.log(`status list: revoked token shown after ${took} ms`);
    }
    const revoked = await oauth.refreshTokenGrantRequest(as, client, oauth.None(), refreshed.refresh_token, options);
    await assert.rejects(oauth.processRefreshTokenResponse(as, client, revoked), (err) => err.error === 'invalid_grant');

    // Polling too fast, then a denial.
    const second = await oauth.processDeviceAuthorizationResponse(
      as, client,
      await oauth.deviceAuthorizationRequest(as, client, oauth.None(), { scope: 'ignored' }, options),
    );
    assert.equal(await pollError(as, client, options, second.device_code), 'authorization_pending');
    assert.equal(await pollError(as, client, options, second.device_code), 'slow_down');
    const denied = cli(dir, 'pair', 'deny', second.user_code);
    assert.equal(denied.status, 0, denied.stderr);
    // slow_down made the interval 6 seconds.
    await sleep(6100);
    assert.equal(await pollError(as, client, options, second.device_code), 'access_denied');
    const again = cli(dir, 'pair', 'deny', second.user_code);
    assert.notEqual(again.status, 0, 'a user code is used once');

    // A device code that was never issued.
    const forged = `${second.device_code.split('.')[0]}.${'A'.repeat(43)}`;
    assert.equal(await pollError(as, client, options, forged), 'invalid_grant');
    console.log('device grant through oauth4webapi: ok');

    // DPoP: the metadata names the algorithms; a device with its own key gets bound
    // tokens, refreshes with proofs, and reaches the app only with proofs.
    assert.deepEqual(as.dpop_signing_alg_values_supported, ['EdDSA', 'ES256']);
    for (const alg of ['ES256', 'EdDSA']) {
      const keyPair = await oauth.generateKeyPair(alg);
      const jkt = await thumbprint(keyPair.publicKey);
      const DPoP = oauth.DPoP(client, keyPair);
      const bound = await approvedTokens(as, client, { ...options, DPoP }, dir, `bound ${alg}`);
      assert.equal(bound.token_type, 'dpop');
      const claims = JSON.parse(Buffer.from(bound.access_token.split('.')[1], 'base64url').toString());
      assert.deepEqual(claims.cnf, { jkt });

      const rotated = await oauth.processRefreshTokenResponse(
        as, client,
        await oauth.refreshTokenGrantRequest(as, client, oauth.None(), bound.refresh_token, { ...options, DPoP }),
      );
      assert.equal(rotated.token_type, 'dpop');
      // Without the key, the refresh token is refused, and nothing was spent.
      const keyless = await oauth.refreshTokenGrantRequest(as, client, oauth.None(), rotated.refresh_token, options);
      await assert.rejects(oauth.processRefreshTokenResponse(as, client, keyless),
        (err) => err.error === 'invalid_dpop_proof');

      const notes = new URL(`${server.url}/notes`);
      const withProof = await oauth.protectedResourceRequest(
        rotated.access_token, 'GET', notes, new Headers(), null, { ...options, DPoP },
      );
      assert.equal(withProof.status, 200);
      assert.match(await withProof.text(), /^hello dev_[0-9a-f]{32}$/);
      const bearerOnly = await undiciFetch(notes, {
        dispatcher, headers: { authorization: `Bearer ${rotated.access_token}` },
      });
      assert.equal(bearerOnly.status, 401, 'a bound token alone is refused');
      assert.match(bearerOnly.headers.get('www-authenticate'), /^DPoP .*error="invalid_dpop_proof"/);
      await bearerOnly.body?.cancel();
    }
    console.log('DPoP through oauth4webapi: ok');
  } finally {
    app.close();
    server.child.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
  await withNonces();
}

/**
 * A server that wants a nonce in every proof (`tokens.dpop_nonce`): the client's first
 * proof has none, the answer says `use_dpop_nonce` with a `DPoP-Nonce`, and oauth4webapi
 * retries with it, as RFC 9449 section 8 describes.
 */
async function withNonces() {
  const dir = mkdtempSync(join(tmpdir(), 'gatehouse-dpop-nonce-'));
  const server = await startServer(dir, [], {
    GATEHOUSE_PAIRING_DEVICE_POLL_INTERVAL: '1s', GATEHOUSE_DPOP_NONCE: 'true',
  });
  try {
    const ca = await certificateOf(server.url);
    const dispatcher = new Agent({ connect: { ca } });
    const options = { [oauth.customFetch]: (url, init) => undiciFetch(url, { ...init, dispatcher }) };
    const issuer = new URL(server.url);
    const as = await oauth.processDiscoveryResponse(
      issuer,
      await oauth.discoveryRequest(issuer, { ...options, algorithm: 'oauth2' }),
    );
    const client = { client_id: 'e2e-nonce' };
    const DPoP = oauth.DPoP(client, await oauth.generateKeyPair('ES256'));
    const asked = await oauth.processDeviceAuthorizationResponse(
      as, client,
      await oauth.deviceAuthorizationRequest(as, client, oauth.None(), {}, options),
    );
    const approved = cli(dir, 'pair', 'approve', asked.user_code);
    assert.equal(approved.status, 0, approved.stderr);
    const poll = () => oauth.deviceCodeGrantRequest(as, client, oauth.None(), asked.device_code, { ...options, DPoP });
    let nonceAsked = false;
    let tokens;
    try {
      tokens = await oauth.processDeviceCodeResponse(as, client, await poll());
    } catch (err) {
      assert.ok(oauth.isDPoPNonceError(err), `expected use_dpop_nonce: ${err}`);
      nonceAsked = true;
      tokens = await oauth.processDeviceCodeResponse(as, client, await poll());
    }
    assert.ok(nonceAsked, 'the first proof, without a nonce, was refused');
    assert.equal(tokens.token_type, 'dpop');
    console.log('DPoP nonces through oauth4webapi: ok');
  } finally {
    server.child.kill('SIGTERM');
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
