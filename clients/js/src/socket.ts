import { GatehouseError } from './errors.js';
import type { StoredSession } from './storage.js';

/**
 * The parts of a WebSocket the client uses: the browser's `WebSocket`, or in Node the
 * `ws` package's (Node 20 has no global WebSocket).
 */
export interface WebSocketLike {
  readonly readyState: number;
  // Handlers take `any`: the browser's and ws's event types both fit.
  onopen: ((event: any) => void) | null;
  onmessage: ((event: any) => void) | null;
  onclose: ((event: any) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor; the third argument is passed only where the transport needs one. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[], options?: any) => WebSocketLike;

export interface SocketEvents {
  /**
   * The socket is connected and authenticated, and speaks for `deviceId`; its token has
   * `expiresIn` seconds left. Once per connection (not for the renewals of its token).
   */
  onReady?: (info: { deviceId: string; expiresIn: number }) => void;
  /**
   * The socket closed. `reconnectInMs` is when the client tries again, or null when it
   * stops (closed by the app, or the session ended).
   */
  onClose?: (info: { code: number; reason: string; reconnectInMs: number | null }) => void;
  /** An `error` message from the server, or a failure while connecting or refreshing. */
  onError?: (error: GatehouseError) => void;
  /** Any other message from the server. */
  onMessage?: (message: Record<string, unknown>) => void;
}

export interface SocketOptions {
  /** The first reconnection delay, doubled after each failed attempt (default 500 ms). */
  initialDelayMs?: number;
  /** The longest reconnection delay (default 30 s). */
  maxDelayMs?: number;
}

/** What the socket needs from the client. */
export interface SocketHost {
  session(): Promise<StoredSession | null>;
  accessToken(): Promise<string>;
  refresh(): Promise<StoredSession>;
  open(session: StoredSession, url: string): WebSocketLike;
  readonly marginMs: number;
}

export type SocketState = 'connecting' | 'authenticating' | 'ready' | 'waiting' | 'closed';

/** The WebSocket URL of a server: `https://host` → `wss://host/v1/ws`. */
export function webSocketUrl(server: string): string {
  return `${server.replace(/^http/, 'ws')}/v1/ws`;
}

function unpairedError(error: unknown): GatehouseError | undefined {
  return error instanceof GatehouseError && error.unpaired ? error : undefined;
}

function asGatehouseError(error: unknown): GatehouseError {
  return error instanceof GatehouseError ? error : new GatehouseError('network_error', String(error), { cause: error });
}

/** One authenticated WebSocket channel that reconnects by itself (see `GatehouseClient.connect`). */
export class GatehouseSocket {
  readonly #host: SocketHost;
  readonly #events: SocketEvents;
  readonly #initialDelayMs: number;
  readonly #maxDelayMs: number;
  #ws: WebSocketLike | undefined;
  #state: SocketState = 'connecting';
  #stopped = false;
  #attempt = 0;
  #retryTimer: ReturnType<typeof setTimeout> | undefined;
  #renewTimer: ReturnType<typeof setTimeout> | undefined;
  /** The token the server holds for this socket. */
  #socketToken: string | undefined;
  /** Whether this connection already answered an invalid_token with a refresh. */
  #refreshedOnRefusal = false;
  /** The close this client asked for on the current connection, reported as is. */
  #ownClose: { code: number; reason: string } | undefined;

  constructor(host: SocketHost, events: SocketEvents, options: SocketOptions) {
    this.#host = host;
    this.#events = events;
    this.#initialDelayMs = options.initialDelayMs ?? 500;
    this.#maxDelayMs = options.maxDelayMs ?? 30_000;
    void this.#open();
  }

  /** Where the channel stands. */
  get state(): SocketState {
    return this.#state;
  }

  /** Sends `{"type":"ping"}` (answered with a pong); false when not connected. */
  ping(): boolean {
    if (this.#ws === undefined || this.#ws.readyState !== 1) return false;
    this.#ws.send(JSON.stringify({ type: 'ping' }));
    return true;
  }

  /** Closes the channel for good (close code 1000). */
  close(): void {
    if (this.#stopped) return;
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#renewTimer);
    const ws = this.#ws;
    if (ws) {
      this.#closeSocket(ws, 'closed by the app');
    } else {
      this.#state = 'closed';
      this.#events.onClose?.({ code: 1000, reason: 'closed by the app', reconnectInMs: null });
    }
  }

  /** Closes a connection from this side (1000), remembering why. */
  #closeSocket(ws: WebSocketLike, reason: string): void {
    this.#ownClose = { code: 1000, reason };
    ws.close(1000, reason);
  }

  #stop(code: number, reason: string): void {
    this.#stopped = true;
    this.#state = 'closed';
    clearTimeout(this.#retryTimer);
    clearTimeout(this.#renewTimer);
    this.#events.onClose?.({ code, reason, reconnectInMs: null });
  }

  async #open(): Promise<void> {
    if (this.#stopped) return;
    this.#state = 'connecting';
    this.#refreshedOnRefusal = false;
    this.#ownClose = undefined;
    let ws: WebSocketLike;
    try {
      const session = await this.#host.session();
      if (!session) throw new GatehouseError('unpaired', 'this device is not paired');
      if (this.#stopped) return;
      ws = this.#host.open(session, webSocketUrl(session.server));
    } catch (error) {
      const unpaired = unpairedError(error);
      if (unpaired) return this.#stop(1000, unpaired.message);
      this.#events.onError?.(asGatehouseError(error));
      return this.#retry(1006, 'could not open the socket', this.#backoff());
    }
    this.#ws = ws;
    ws.onopen = () => void this.#authenticate(ws);
    ws.onmessage = (event: { data?: unknown }) => this.#message(ws, event.data);
    // A close event follows, with its code. ws's error events carry the cause (a pin
    // mismatch, a refused connection); a browser's carry nothing.
    ws.onerror = (event: { error?: unknown }) => {
      if (event?.error !== undefined) this.#events.onError?.(asGatehouseError(event.error));
    };
    ws.onclose = (event: { code?: number; reason?: string }) =>
      void this.#closed(ws, event.code ?? 1006, event.reason ?? '');
  }

  async #authenticate(ws: WebSocketLike, token?: string): Promise<void> {
    if (this.#ws !== ws) return;
    if (this.#state !== 'ready') this.#state = 'authenticating';
    try {
      const accessToken = token ?? (await this.#host.accessToken());
      if (this.#ws !== ws) return;
      this.#socketToken = accessToken;
      ws.send(JSON.stringify({ type: 'auth', access_token: accessToken }));
    } catch (error) {
      if (this.#ws !== ws) return;
      const unpaired = unpairedError(error);
      if (unpaired) {
        this.#stopped = true;
        this.#closeSocket(ws, 'unpaired');
        return;
      }
      this.#events.onError?.(asGatehouseError(error));
      this.#closeSocket(ws, 'no access token');
    }
  }

  #message(ws: WebSocketLike, data: unknown): void {
    if (this.#ws !== ws || typeof data !== 'string') return;
    let message: Record<string, unknown>;
    try {
      const parsed: unknown = JSON.parse(data);
      if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) return;
      message = parsed as Record<string, unknown>;
    } catch {
      return;
    }
    switch (message['type']) {
      case 'auth_success': {
        const expiresIn = typeof message['expires_in'] === 'number' ? message['expires_in'] : 0;
        const renewed = this.#state === 'ready';
        this.#state = 'ready';
        this.#attempt = 0;
        this.#scheduleRenewal(ws, expiresIn);
        // A renewal of the token on an open socket is not a new connection.
        if (!renewed) this.#events.onReady?.({ deviceId: String(message['device_id']), expiresIn });
        return;
      }
      case 'pong':
        return;
      case 'error': {
        const code = typeof message['code'] === 'string' ? message['code'] : 'error';
        const text = typeof message['message'] === 'string' ? message['message'] : code;
        this.#events.onError?.(new GatehouseError(code, `WebSocket: ${text}`));
        if (code === 'invalid_token') void this.#refusedToken(ws);
        return;
      }
      default:
        this.#events.onMessage?.(message);
    }
  }

  /** The server refused our token: one refresh and a new `auth`, then give up on this connection. */
  async #refusedToken(ws: WebSocketLike): Promise<void> {
    if (this.#refreshedOnRefusal) {
      this.#closeSocket(ws, 'token refused');
      return;
    }
    this.#refreshedOnRefusal = true;
    try {
      const session = await this.#host.refresh();
      await this.#authenticate(ws, session.accessToken);
    } catch (error) {
      if (unpairedError(error)) this.#stopped = true;
      if (this.#ws === ws) this.#closeSocket(ws, 'token refused');
    }
  }

  /** Renews the socket's token before the server closes it for expiry. */
  #scheduleRenewal(ws: WebSocketLike, expiresIn: number): void {
    clearTimeout(this.#renewTimer);
    const delay = Math.max(1000, expiresIn * 1000 - this.#host.marginMs);
    this.#renewTimer = setTimeout(() => void this.#renew(ws), delay);
  }

  async #renew(ws: WebSocketLike): Promise<void> {
    if (this.#ws !== ws || this.#stopped) return;
    try {
      let token = await this.#host.accessToken();
      if (token === this.#socketToken) token = (await this.#host.refresh()).accessToken;
      await this.#authenticate(ws, token);
    } catch (error) {
      if (unpairedError(error)) {
        this.#stopped = true;
        if (this.#ws === ws) this.#closeSocket(ws, 'unpaired');
        return;
      }
      this.#events.onError?.(asGatehouseError(error));
      // Try again shortly; the server closes the socket if the token expires meanwhile.
      this.#renewTimer = setTimeout(() => void this.#renew(ws), 5000);
    }
  }

  async #closed(ws: WebSocketLike, closedCode: number, closedReason: string): Promise<void> {
    if (this.#ws !== ws) return;
    // A close this side asked for is reported as asked, whatever the peer answered.
    const { code, reason } = this.#ownClose ?? { code: closedCode, reason: closedReason };
    this.#ws = undefined;
    this.#socketToken = undefined;
    clearTimeout(this.#renewTimer);
    if (this.#stopped) return this.#stop(code, reason);
    if (code === 1008 && (reason === 'token revoked' || reason === 'token expired')) {
      // This socket's token no longer verifies: a new one, then reconnect. A refused
      // refresh means the family or device is revoked: the session is over.
      this.#state = 'waiting';
      try {
        await this.#host.refresh();
      } catch (error) {
        if (unpairedError(error)) return this.#stop(code, reason);
        this.#events.onError?.(asGatehouseError(error));
        return this.#retry(code, reason, this.#backoff());
      }
      // At once the first time; with backoff if it keeps happening.
      const delay = this.#attempt === 0 ? 0 : this.#backoff();
      this.#attempt = Math.max(this.#attempt, 1);
      return this.#retry(code, reason, delay);
    }
    return this.#retry(code, reason, this.#backoff());
  }

  #backoff(): number {
    const delay = Math.min(this.#maxDelayMs, this.#initialDelayMs * 2 ** this.#attempt);
    this.#attempt += 1;
    // Full jitter over the upper half, so that many devices do not return in step.
    return Math.round(delay / 2 + Math.random() * (delay / 2));
  }

  #retry(code: number, reason: string, delay: number): void {
    if (this.#stopped) return this.#stop(code, reason);
    this.#state = 'waiting';
    this.#events.onClose?.({ code, reason, reconnectInMs: delay });
    clearTimeout(this.#retryTimer);
    this.#retryTimer = setTimeout(() => void this.#open(), delay);
  }
}
