import { GatehouseError } from './errors.js';
import { GatehouseSocket, type SocketEvents, type SocketHost, type SocketOptions, type WebSocketConstructor } from './socket.js';
import type { StoredSession, TokenStore } from './storage.js';
import type { HttpResponse, Transport, TransportFactory } from './transport.js';
import { checkPairingUri, parsePairingUri, type PairingUri } from './uri.js';

/** How the device describes itself when it pairs. */
export interface DeviceInfo {
  /** 1 to 64 characters, such as "Ada's phone". */
  name: string;
  /** 1 to 32 characters, such as "ios", "android", "linux". */
  platform: string;
  /** 1 to 32 characters, such as "1.4.2". */
  appVersion: string;
}

export interface GatehouseClientOptions {
  /** Where the session is kept (see `TokenStore`). */
  store: TokenStore;
  /** How to reach a server. Node's entry point defaults to a pinning transport, others to `fetch`. */
  transport?: TransportFactory;
  /**
   * The WebSocket constructor for `connect()`. Defaults to `globalThis.WebSocket` where
   * there is one. In Node, pass the `ws` package's (it also carries the pinned TLS
   * connection).
   */
  WebSocket?: WebSocketConstructor;
  /** The clock, in milliseconds since the epoch (default `Date.now`). */
  now?: () => number;
  /** Refresh when the access token has less than this many seconds left (default 30). */
  refreshMarginSeconds?: number;
  /** Accept an `http://` server (gatehouse with TLS off, loopback only). Default false. */
  allowInsecureHttp?: boolean;
  /**
   * Called once when the session ends for good: the refresh token was refused
   * (`invalid_grant`: spent, expired, or its family or device revoked). The store has
   * been cleared; the device must pair again.
   */
  onUnpaired?: (error: GatehouseError) => void;
}

const CONTROL = /\p{Cc}/u;

function checkField(name: string, value: unknown, max: number): void {
  if (typeof value !== 'string') {
    throw new GatehouseError('invalid_request', `device.${name} must be a string`);
  }
  const length = [...value].length;
  if (length < 1 || length > max || CONTROL.test(value)) {
    throw new GatehouseError('invalid_request', `device.${name} must be 1 to ${max} characters, with no control characters`);
  }
}

/** A gatehouse error answer (`{"error", "message", "request_id"}`) as an exception. */
export function errorFromResponse(response: HttpResponse, what: string): GatehouseError {
  let code = `http_${response.status}`;
  let message = `${what} answered ${response.status}`;
  let requestId = response.headers['x-request-id'];
  try {
    const body = JSON.parse(response.body) as { error?: unknown; message?: unknown; request_id?: unknown };
    if (typeof body.error === 'string') code = body.error;
    if (typeof body.message === 'string') message = `${what}: ${body.message}`;
    if (typeof body.request_id === 'string') requestId = body.request_id;
  } catch {
    // Not JSON: keep the status.
  }
  const retry = Number(response.headers['retry-after']);
  return new GatehouseError(code, message, {
    status: response.status,
    requestId,
    retryAfter: Number.isFinite(retry) && response.headers['retry-after'] !== undefined ? retry : undefined,
  });
}

interface TokenAnswer {
  device_id: string;
  access_token: string;
  refresh_token: string;
  token_type: string;
  expires_in: number;
}

function tokenAnswer(response: HttpResponse, what: string): TokenAnswer {
  let body: Partial<TokenAnswer>;
  try {
    body = JSON.parse(response.body) as Partial<TokenAnswer>;
  } catch (cause) {
    throw new GatehouseError('bad_response', `${what} answered something that is not JSON`, { status: response.status, cause });
  }
  if (
    typeof body.device_id !== 'string' ||
    typeof body.access_token !== 'string' ||
    typeof body.refresh_token !== 'string' ||
    body.token_type !== 'Bearer' ||
    typeof body.expires_in !== 'number' ||
    !(body.expires_in > 0)
  ) {
    throw new GatehouseError('bad_response', `${what} answered without a token pair`, { status: response.status });
  }
  return body as TokenAnswer;
}

/**
 * The client's engine, whatever the platform. Use `GatehouseClient` from the package's
 * entry point: it picks the transport (Node: pinning over node:https; elsewhere: fetch).
 */
export class GatehouseClientBase {
  readonly #store: TokenStore;
  readonly #transportFactory: TransportFactory;
  readonly #WebSocket: WebSocketConstructor | undefined;
  readonly #now: () => number;
  readonly #marginMs: number;
  readonly #allowInsecureHttp: boolean;
  readonly #onUnpaired: ((error: GatehouseError) => void) | undefined;

  /** The session in memory once loaded: undefined = not loaded yet, null = none. */
  #session: StoredSession | null | undefined;
  #loading: Promise<StoredSession | null> | undefined;
  #refreshing: Promise<StoredSession> | undefined;
  #transports = new Map<string, Transport>();

  constructor(options: GatehouseClientOptions & { transport: TransportFactory }) {
    if (!options || typeof options.store?.load !== 'function') {
      throw new TypeError('GatehouseClient needs a store with load, save and clear');
    }
    this.#store = options.store;
    this.#transportFactory = options.transport;
    this.#WebSocket = options.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    this.#now = options.now ?? Date.now;
    this.#marginMs = (options.refreshMarginSeconds ?? 30) * 1000;
    this.#allowInsecureHttp = options.allowInsecureHttp ?? false;
    this.#onUnpaired = options.onUnpaired;
  }

  #transport(session: { server: string; pin?: string | undefined }): Transport {
    const key = `${session.server} ${session.pin ?? ''}`;
    let transport = this.#transports.get(key);
    if (!transport) {
      transport = this.#transportFactory({ server: session.server, pin: session.pin });
      this.#transports.set(key, transport);
    }
    return transport;
  }

  /** The stored session, loaded once (concurrent first callers share one load). */
  session(): Promise<StoredSession | null> {
    if (this.#session !== undefined) return Promise.resolve(this.#session);
    this.#loading ??= Promise.resolve()
      .then(() => this.#store.load())
      .then((loaded) => {
        if (this.#session === undefined) this.#session = loaded ?? null;
        return this.#session;
      })
      .finally(() => {
        this.#loading = undefined;
      });
    return this.#loading;
  }

  /** This device's id, or null when it is not paired. */
  async deviceId(): Promise<string | null> {
    return (await this.session())?.deviceId ?? null;
  }

  /**
   * Pairs this device with the server a pairing URI names: checks the URI (format,
   * expiry on this device's clock, `https://`), connects trusting exactly the pinned
   * certificate when the URI carries a pin, claims the session (`POST /v1/pair`) and
   * saves the first token pair. A session already held is replaced (not revoked).
   *
   * Throws `PairingUriError` for a bad or expired URI (nothing is sent), and
   * `GatehouseError` otherwise: `pairing_failed` (401: unknown, expired or used
   * session, or a wrong secret; ask for a new code), `invalid_request` (a bad device
   * field), `pin_mismatch`, `rate_limited`, `network_error`.
   */
  async pair(uri: string | PairingUri, device: DeviceInfo): Promise<StoredSession> {
    const parsed = typeof uri === 'string' ? parsePairingUri(uri) : uri;
    checkPairingUri(parsed, { now: this.#now(), allowInsecureHttp: this.#allowInsecureHttp });
    checkField('name', device?.name, 64);
    checkField('platform', device?.platform, 32);
    checkField('appVersion', device?.appVersion, 32);
    const transport = this.#transport(parsed);
    const started = this.#now();
    const response = await transport.request({
      method: 'POST',
      url: `${parsed.server}/v1/pair`,
      headers: { 'content-type': 'application/json', accept: 'application/json' },
      body: JSON.stringify({
        session_id: parsed.sessionId,
        secret: parsed.secret,
        device: { name: device.name, platform: device.platform, app_version: device.appVersion },
      }),
    });
    if (response.status !== 200) throw errorFromResponse(response, 'pairing');
    const answer = tokenAnswer(response, 'pairing');
    const session: StoredSession = {
      server: parsed.server,
      ...(parsed.pin === undefined ? {} : { pin: parsed.pin }),
      deviceId: answer.device_id,
      accessToken: answer.access_token,
      refreshToken: answer.refresh_token,
      accessExpiresAt: started + answer.expires_in * 1000,
    };
    this.#session = session;
    await this.#store.save(session);
    return session;
  }

  /**
   * A valid access token: the stored one while it has more than the refresh margin
   * left, else a new one from one refresh shared by every concurrent caller.
   * Throws `GatehouseError` (`unpaired` when there is no session, `invalid_grant` when
   * the session just ended, `network_error`, `rate_limited`, …).
   */
  async accessToken(): Promise<string> {
    await this.session();
    // Read after the await: a refresh may have finished meanwhile.
    const session = this.#session;
    if (!session) throw new GatehouseError('unpaired', 'this device is not paired');
    if (this.#refreshing === undefined && this.#now() < session.accessExpiresAt - this.#marginMs) {
      return session.accessToken;
    }
    return (await this.refresh()).accessToken;
  }

  /**
   * Refreshes now (`POST /v1/token`), whatever the access token's age. Single-flight:
   * while one refresh is under way, every caller gets its result, so a refresh token is
   * never presented twice (a second presentation would revoke the whole family).
   */
  refresh(): Promise<StoredSession> {
    this.#refreshing ??= this.#refresh().finally(() => {
      this.#refreshing = undefined;
    });
    return this.#refreshing;
  }

  async #refresh(): Promise<StoredSession> {
    const session = await this.session();
    if (!session) throw new GatehouseError('unpaired', 'this device is not paired');
    const started = this.#now();
    // A network failure here leaves the stored pair as it was. If the server did
    // rotate before the connection broke, the stored refresh token is spent and the
    // next refresh ends the session (invalid_grant): single-use tokens allow no retry.
    const response = await this.#transport(session).request({
      method: 'POST',
      url: `${session.server}/v1/token`,
      headers: { 'content-type': 'application/x-www-form-urlencoded', accept: 'application/json' },
      body: `grant_type=refresh_token&refresh_token=${encodeURIComponent(session.refreshToken)}`,
    });
    if (response.status !== 200) {
      const error = errorFromResponse(response, 'refresh');
      if (error.code === 'invalid_grant') await this.#end(session, error);
      throw error;
    }
    const answer = tokenAnswer(response, 'refresh');
    if (answer.device_id !== session.deviceId) {
      throw new GatehouseError('bad_response', 'refresh answered for another device');
    }
    const next: StoredSession = {
      ...session,
      accessToken: answer.access_token,
      refreshToken: answer.refresh_token,
      accessExpiresAt: started + answer.expires_in * 1000,
    };
    // Paired anew or unpaired meanwhile: this pair belongs to a session no longer held.
    if (this.#session !== session) return next;
    // In memory first: the old refresh token is spent, whatever the store does next.
    this.#session = next;
    await this.#store.save(next);
    return next;
  }

  async #end(session: StoredSession, error: GatehouseError): Promise<void> {
    if (this.#session !== session) return;
    this.#session = null;
    try {
      await this.#store.clear();
    } finally {
      this.#onUnpaired?.(error);
    }
  }

  /**
   * Ends this device's session: revokes its refresh-token family on the server (RFC
   * 7009, which also revokes every access token of the family) and clears the store.
   * The store is cleared even when the revocation fails; the error is thrown after.
   */
  async unpair(): Promise<void> {
    const session = await this.session();
    if (!session) return;
    await this.#refreshing?.catch(() => undefined);
    const current = this.#session ?? session;
    this.#session = null;
    let failure: GatehouseError | undefined;
    try {
      const response = await this.#transport(current).request({
        method: 'POST',
        url: `${current.server}/v1/revoke`,
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
        body: `token=${encodeURIComponent(current.refreshToken)}&token_type_hint=refresh_token`,
      });
      if (response.status !== 200) failure = errorFromResponse(response, 'revocation');
    } catch (error) {
      failure = error instanceof GatehouseError ? error : new GatehouseError('network_error', String(error), { cause: error });
    }
    await this.#store.clear();
    if (failure) throw failure;
  }

  /**
   * Opens the WebSocket channel (`/v1/ws`), authenticates it with the access token and
   * keeps it open: it renews the socket's token before it expires, and reconnects after
   * a close (at once with a new token after `token revoked` / `token expired`, with
   * backoff otherwise). It stops when `close()` is called or the session ends.
   */
  connect(events: SocketEvents = {}, options: SocketOptions = {}): GatehouseSocket {
    const host: SocketHost = {
      session: () => this.session(),
      accessToken: () => this.accessToken(),
      refresh: () => this.refresh(),
      marginMs: this.#marginMs,
      open: (session, url) => {
        const WebSocket = this.#WebSocket;
        if (!WebSocket) {
          throw new GatehouseError(
            'websocket_unavailable',
            'no WebSocket constructor: pass one as the WebSocket option (in Node, the ws package)',
          );
        }
        const extra = this.#transport(session).webSocketOptions;
        return extra === undefined ? new WebSocket(url) : new WebSocket(url, [], extra);
      },
    };
    return new GatehouseSocket(host, events, options);
  }
}
