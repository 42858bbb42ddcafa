import { PairingUriError } from './errors.js';

/** A pairing URI, decoded and checked (format: gatehouse's `schema/pairing-uri.md`). */
export interface PairingUri {
  /** The format version; always 1 (others are refused). */
  readonly version: 1;
  /** The server's base URL and token issuer, such as `https://auth.example.com`. */
  readonly server: string;
  /** The pairing session id (`ps_` and 32 lowercase hex characters). */
  readonly sessionId: string;
  /** The session's one-time secret (43 base64url characters). */
  readonly secret: string;
  /** When the session stops being claimable, in seconds since the Unix epoch. */
  readonly expiresAt: number;
  /**
   * `sha256/` and the base64 SHA-256 of the server certificate's SubjectPublicKeyInfo,
   * when the server uses its self-signed certificate. Absent: validate the certificate
   * as usual (a trusted CA and the host name).
   */
  readonly pin?: string;
}

/** The format versions this client understands. */
export const SUPPORTED_PAIRING_URI_VERSIONS: readonly string[] = ['1'];

const KNOWN = ['v', 'server', 'session', 'secret', 'exp', 'pin'] as const;
type Known = (typeof KNOWN)[number];
const REQUIRED: readonly Known[] = ['server', 'session', 'secret', 'exp'];

const PREFIX = /^gatehouse:\/\/pair(?=[?#/]|$)/i;
const SESSION = /^ps_[0-9a-f]{32}$/;
const SECRET = /^[A-Za-z0-9_-]{43}$/;
const EXP = /^[0-9]{1,15}$/;
const PIN = /^sha256\/[A-Za-z0-9+/]{43}=$/;

function decode(name: string, raw: string): string {
  try {
    return decodeURIComponent(raw);
  } catch {
    throw new PairingUriError('invalid_parameter', `the value of "${name}" is not correctly percent-encoded`, name);
  }
}

function checkServer(value: string): string {
  let url: URL;
  try {
    url = new URL(value);
  } catch {
    throw new PairingUriError('invalid_parameter', `"server" is not an absolute URL: ${value}`, 'server');
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new PairingUriError('invalid_parameter', `"server" must be an https:// URL: ${value}`, 'server');
  }
  if (url.username || url.password || url.search || url.hash || value.includes('?') || value.includes('#')) {
    throw new PairingUriError('invalid_parameter', `"server" must not carry credentials, a query or a fragment: ${value}`, 'server');
  }
  if (value.endsWith('/')) {
    throw new PairingUriError('invalid_parameter', `"server" must not end with "/": ${value}`, 'server');
  }
  return value;
}

/**
 * Reads a pairing URI as gatehouse writes it, and refuses anything else with a
 * `PairingUriError` whose `code` and `message` say why:
 *
 * - the scheme must be `gatehouse` and the authority `pair`, with no path or fragment;
 * - `v` must be present and known (`1`); unknown parameters are ignored;
 * - `server`, `session`, `secret` and `exp` must be present, and no known parameter may
 *   appear twice;
 * - every value must be well-formed (`server` an `https://` or `http://` URL with no
 *   trailing `/`, `session` `ps_…`, `secret` 43 base64url characters, `exp` a decimal
 *   integer, `pin` `sha256/` and 44 base64 characters).
 *
 * It does not look at the clock or decide about `http://`: `GatehouseClient.pair` does
 * (or call `checkPairingUri`).
 */
export function parsePairingUri(text: string): PairingUri {
  if (typeof text !== 'string') {
    throw new PairingUriError('not_a_pairing_uri', 'a pairing URI must be a string');
  }
  const uri = text.trim();
  const prefix = PREFIX.exec(uri);
  if (!prefix) {
    throw new PairingUriError('not_a_pairing_uri', 'not a gatehouse pairing URI (it must start with gatehouse://pair?)');
  }
  const rest = uri.slice(prefix[0].length);
  if (rest.includes('#')) {
    throw new PairingUriError('not_a_pairing_uri', 'a pairing URI has no fragment (#…)');
  }
  if (rest !== '' && !rest.startsWith('?')) {
    throw new PairingUriError('not_a_pairing_uri', 'a pairing URI has no path after gatehouse://pair');
  }
  const values = new Map<Known, string>();
  for (const pair of rest.slice(1).split('&')) {
    if (pair === '') continue;
    const equals = pair.indexOf('=');
    const name = equals < 0 ? pair : pair.slice(0, equals);
    if (!(KNOWN as readonly string[]).includes(name)) continue; // unknown: ignored
    const known = name as Known;
    if (values.has(known)) {
      throw new PairingUriError('repeated_parameter', `the parameter "${known}" appears more than once`, known);
    }
    values.set(known, equals < 0 ? '' : decode(known, pair.slice(equals + 1)));
  }

  const version = values.get('v');
  if (version === undefined) {
    throw new PairingUriError('missing_parameter', 'the pairing URI has no version (v); update the app or ask for a new code', 'v');
  }
  if (!SUPPORTED_PAIRING_URI_VERSIONS.includes(version)) {
    throw new PairingUriError(
      'unsupported_version',
      `this app does not know pairing URI version ${JSON.stringify(version)}: update the app`,
      'v',
    );
  }
  for (const name of REQUIRED) {
    if (!values.has(name)) {
      throw new PairingUriError('missing_parameter', `the pairing URI has no "${name}"`, name);
    }
  }
  const server = checkServer(values.get('server') as string);
  const sessionId = values.get('session') as string;
  if (!SESSION.test(sessionId)) {
    throw new PairingUriError('invalid_parameter', '"session" is not a pairing session id (ps_ and 32 hex characters)', 'session');
  }
  const secret = values.get('secret') as string;
  if (!SECRET.test(secret)) {
    throw new PairingUriError('invalid_parameter', '"secret" is not 43 base64url characters', 'secret');
  }
  const exp = values.get('exp') as string;
  if (!EXP.test(exp)) {
    throw new PairingUriError('invalid_parameter', '"exp" is not a time in seconds since the Unix epoch', 'exp');
  }
  const pin = values.get('pin');
  if (pin !== undefined && !PIN.test(pin)) {
    throw new PairingUriError('invalid_parameter', '"pin" is not sha256/ and 44 base64 characters', 'pin');
  }
  const parsed: PairingUri = { version: 1, server, sessionId, secret, expiresAt: Number(exp) };
  return pin === undefined ? parsed : { ...parsed, pin };
}

/** What `checkPairingUri` may be told. */
export interface CheckOptions {
  /** The current time in milliseconds since the epoch (default `Date.now()`). */
  now?: number;
  /** Accept an `http://` server (a gatehouse with TLS off, loopback only). Default false. */
  allowInsecureHttp?: boolean;
}

/**
 * The checks to run before a pairing URI's secret is sent anywhere: the session has
 * not expired by this device's clock, and the server is `https://` (unless told
 * otherwise). Throws a `PairingUriError` (`expired`, `insecure_server`).
 */
export function checkPairingUri(uri: PairingUri, options: CheckOptions = {}): void {
  const now = options.now ?? Date.now();
  if (now >= uri.expiresAt * 1000) {
    throw new PairingUriError('expired', 'this pairing code has expired: ask for a new one', 'exp');
  }
  if (uri.server.startsWith('http://') && !options.allowInsecureHttp) {
    throw new PairingUriError(
      'insecure_server',
      `the server ${uri.server} does not use TLS; only a test server may, and this app refuses it`,
      'server',
    );
  }
}
