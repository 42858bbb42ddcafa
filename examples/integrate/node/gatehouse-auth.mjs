// Express middleware that accepts gatehouse access tokens, verified with jose.
//
// Two ways to check a token, as two middlewares:
//
// - `requireDevice`: offline. The signature is checked against the server's JWKS
//   (createRemoteJWKSet: fetched once, kept as long as the server's Cache-Control says,
//   fetched again when a token names a key the cached set lacks), then jwtVerify checks
//   `typ`, `iss`, `aud` and the times. No call to gatehouse per request, but a
//   revocation is not seen before the token expires.
// - `requireLiveDevice`: the same, then gatehouse's introspection endpoint (RFC 7662),
//   which also knows about revoked tokens, families, devices and keys.
//
// Both answer 401 with `WWW-Authenticate: Bearer ...` when the token is missing or not
// valid, and 503 when gatehouse cannot be asked (they fail closed). On success
// `req.device` is `{ id, tokenId, family, expiresAt }`.
//
// Configuration (see gatehouseAuthFromEnv): AUTH_ISSUER, AUTH_AUDIENCE, AUTH_CA_FILE,
// AUTH_CLIENT_ID, AUTH_CLIENT_SECRET, AUTH_LEEWAY_SECONDS. Not GATEHOUSE_*: gatehouse
// itself refuses unknown variables with that prefix, and the two may share a shell.

import { readFileSync } from 'node:fs';
import https from 'node:https';
import { createRemoteJWKSet, customFetch, errors, jwtVerify } from 'jose';

// gatehouse signs with Ed25519 (EdDSA) or P-256 (ES256); nothing else is accepted, never
// "none" or HS256. jose also matches the algorithm against the JWK's own `alg`.
const ALGORITHMS = ['EdDSA', 'ES256'];
const MAX_TOKEN_BYTES = 8 * 1024;
const REQUIRED_CLAIMS = ['iss', 'aud', 'sub', 'exp', 'nbf', 'iat', 'jti', 'sid'];

/** Reads the settings from the environment. */
export function gatehouseAuthFromEnv(env = process.env) {
  const issuer = (env.AUTH_ISSUER ?? '').replace(/\/+$/, '');
  if (!issuer) throw new Error('AUTH_ISSUER is not set');
  return gatehouseAuth({
    issuer,
    audience: env.AUTH_AUDIENCE || issuer,
    ca: env.AUTH_CA_FILE ? readFileSync(env.AUTH_CA_FILE, 'utf8') : undefined,
    clientId: env.AUTH_CLIENT_ID,
    clientSecret: env.AUTH_CLIENT_SECRET,
    leewaySeconds: Number(env.AUTH_LEEWAY_SECONDS ?? 30),
  });
}

/**
 * A fetch for jose and introspection. With `ca` (a PEM certificate): node:https trusting
 * exactly that certificate (Node's global fetch cannot take a CA per request). Without:
 * the global fetch and the system's CAs.
 */
function fetchTrusting(ca) {
  if (!ca) return (url, init) => fetch(url, init);
  return (url, init = {}) =>
    new Promise((resolve, reject) => {
      const request = https.request(
        url,
        {
          method: init.method ?? 'GET',
          headers: Object.fromEntries(new Headers(init.headers)),
          ca,
          signal: init.signal,
          timeout: 5000,
        },
        (response) => {
          const chunks = [];
          response.on('data', (chunk) => chunks.push(chunk));
          response.on('error', reject);
          response.on('end', () => {
            const headers = new Headers();
            for (let i = 0; i < response.rawHeaders.length; i += 2) {
              headers.append(response.rawHeaders[i], response.rawHeaders[i + 1]);
            }
            resolve(new Response(Buffer.concat(chunks), { status: response.statusCode, headers }));
          });
        },
      );
      request.on('timeout', () => request.destroy(new Error('request timed out')));
      request.on('error', reject);
      request.end(init.body);
    });
}

function maxAgeMs(cacheControl) {
  const match = /(?:^|[,\s])max-age=(\d+)/.exec(cacheControl ?? '');
  return match ? Math.min(Math.max(Number(match[1]), 1), 86400) * 1000 : undefined;
}

class InvalidToken extends Error {
  constructor(reason, cause) {
    super(reason, { cause });
    this.reason = reason;
  }
}

class Unavailable extends Error {}

function reasonOf(err) {
  if (err instanceof InvalidToken) return err;
  if (err instanceof errors.JWTExpired) return new InvalidToken('expired', err);
  if (err instanceof errors.JWTClaimValidationFailed) {
    const reason = { aud: 'wrong_audience', iss: 'wrong_issuer', nbf: 'not_yet_valid', typ: 'wrong_typ' }[err.claim];
    return new InvalidToken(reason ?? 'malformed', err);
  }
  if (err instanceof errors.JOSEAlgNotAllowed) return new InvalidToken('algorithm', err);
  if (err instanceof errors.JWKSNoMatchingKey) return new InvalidToken('unknown_key', err);
  if (err instanceof errors.JWSSignatureVerificationFailed) return new InvalidToken('bad_signature', err);
  if (err instanceof errors.JWKSTimeout) return new Unavailable('fetching the JWKS timed out', { cause: err });
  if (err instanceof errors.JOSEError) {
    // The JWKS could not be fetched or read: not the token's fault.
    if (err.code === 'ERR_JOSE_GENERIC' || err.code === 'ERR_JWKS_INVALID') {
      return new Unavailable(err.message, { cause: err });
    }
    return new InvalidToken('malformed', err);
  }
  // Anything else (a network error from the JWKS fetch) is not the token's fault either.
  return new Unavailable(String(err?.message ?? err), { cause: err });
}

export function gatehouseAuth({ issuer, audience = issuer, ca, clientId, clientSecret, leewaySeconds = 30, log = console }) {
  const fetchImpl = fetchTrusting(ca);
  let jwksExpiresAt = 0;
  let jwksMaxAge = 300_000;
  // jose refetches on an unknown `kid` (at most once per cooldownDuration); the set's
  // lifetime comes from the server's Cache-Control, read in the fetch below.
  const remote = createRemoteJWKSet(new URL(`${issuer}/.well-known/jwks.json`), {
    cacheMaxAge: Infinity,
    cooldownDuration: 10_000,
    timeoutDuration: 5000,
    [customFetch]: async (url, init) => {
      const response = await fetchImpl(url, init);
      jwksMaxAge = maxAgeMs(response.headers.get('cache-control')) ?? jwksMaxAge;
      jwksExpiresAt = Date.now() + jwksMaxAge;
      return response;
    },
  });
  const keys = async (header, token) => {
    if (jwksExpiresAt !== 0 && Date.now() >= jwksExpiresAt) await remote.reload();
    return remote(header, token);
  };

  async function verify(token) {
    if (token.length > MAX_TOKEN_BYTES) throw new InvalidToken('malformed');
    const { payload } = await jwtVerify(token, keys, {
      algorithms: ALGORITHMS,
      typ: 'at+jwt',
      issuer,
      audience,
      clockTolerance: leewaySeconds,
      requiredClaims: REQUIRED_CLAIMS,
    });
    if (typeof payload.aud !== 'string') throw new InvalidToken('wrong_audience');
    return { id: payload.sub, tokenId: payload.jti, family: payload.sid, expiresAt: payload.exp };
  }

  async function introspect(token) {
    if (!clientId || !clientSecret) throw new Unavailable('AUTH_CLIENT_ID and AUTH_CLIENT_SECRET are not set');
    let response;
    try {
      response = await fetchImpl(`${issuer}/v1/introspect`, {
        method: 'POST',
        headers: {
          authorization: `Basic ${Buffer.from(`${clientId}:${clientSecret}`).toString('base64')}`,
          'content-type': 'application/x-www-form-urlencoded',
          accept: 'application/json',
        },
        body: new URLSearchParams({ token }).toString(),
        signal: AbortSignal.timeout(5000),
      });
    } catch (err) {
      throw new Unavailable(`introspection failed: ${err.message}`, { cause: err });
    }
    // 401: this app's client credentials are wrong or revoked; 429: its budget is
    // spent. Neither says anything about the token.
    if (response.status !== 200) throw new Unavailable(`introspection answered ${response.status}`);
    return response.json();
  }

  function middleware(live) {
    return async (req, res, next) => {
      const [scheme, token] = (req.get('authorization') ?? '').split(' ');
      if (!/^bearer$/i.test(scheme ?? '') || !token) {
        // No token at all (RFC 6750 section 3.1: no error code).
        res.set('WWW-Authenticate', 'Bearer realm="api"');
        return res.status(401).json({ error: 'an access token is required' });
      }
      try {
        const device = await verify(token);
        if (live) {
          const answer = await introspect(token);
          if (answer.active !== true || answer.sub !== device.id) throw new InvalidToken('inactive');
        }
        req.device = device;
        return next();
      } catch (caught) {
        const err = reasonOf(caught);
        if (err instanceof InvalidToken) {
          log.info(`gatehouse token refused: reason=${err.reason}`);
          res.set('WWW-Authenticate', 'Bearer realm="api", error="invalid_token"');
          return res.status(401).json({ error: 'the access token is invalid, expired or revoked' });
        }
        log.error(`gatehouse unavailable: ${err.message}`);
        res.set('Retry-After', '5');
        return res.status(503).json({ error: 'the token cannot be checked now' });
      }
    };
  }

  return { requireDevice: middleware(false), requireLiveDevice: middleware(true), verify };
}
