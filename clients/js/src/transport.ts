import { GatehouseError } from './errors.js';

/** One HTTP request as the client makes it. */
export interface HttpRequest {
  method: 'GET' | 'POST';
  url: string;
  headers: Record<string, string>;
  body?: string;
}

/** An HTTP answer; header names are lowercase. */
export interface HttpResponse {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** How to reach one gatehouse server. */
export interface Transport {
  request(request: HttpRequest): Promise<HttpResponse>;
  /**
   * The third argument for the WebSocket constructor, when the platform needs one to
   * reach this server (in Node, with the `ws` package: a pinned TLS connection).
   */
  readonly webSocketOptions?: Record<string, unknown>;
}

/** What a transport must trust: the server, and its certificate pin when there is one. */
export interface ServerTrust {
  /** The server's base URL, such as `https://auth.example.com`. */
  server: string;
  /** `sha256/…` (see `PairingUri.pin`): trust exactly the certificate with this key. */
  pin?: string | undefined;
}

/** Makes the transport for a server. A factory must refuse a pin it cannot check. */
export type TransportFactory = (trust: ServerTrust) => Transport;

/** The parts of `fetch` the client uses. */
export type FetchLike = (
  url: string,
  init: {
    method: string;
    headers: Record<string, string>;
    body?: string;
    redirect: 'error';
    credentials: 'omit';
    cache: 'no-store';
    signal: AbortSignal;
  },
) => Promise<{
  status: number;
  headers: { forEach(callback: (value: string, name: string) => void): void };
  text(): Promise<string>;
}>;

/** Answers larger than this are refused (gatehouse's answers are a few hundred bytes). */
export const MAX_RESPONSE_BYTES = 1024 * 1024;

/**
 * A transport over `fetch`, for browsers and other platforms whose TLS the page cannot
 * configure. It validates certificates as the platform does (a trusted CA, the host
 * name) and cannot check a pin: a server reached through it needs a CA-issued
 * certificate (gatehouse with a domain and ACME). Given a pin, it refuses
 * (`pin_unsupported`) rather than connect without checking it.
 */
export function fetchTransport(options: { fetch?: FetchLike; timeoutMs?: number } = {}): TransportFactory {
  return (trust) => {
    if (trust.pin !== undefined) {
      throw new GatehouseError(
        'pin_unsupported',
        `${trust.server} is trusted by a certificate pin, which this platform cannot check (browsers cannot pin); ` +
          'give the server a certificate from a trusted CA (gatehouse with a domain), or use the Node transport',
      );
    }
    const fetchImpl = options.fetch ?? (globalThis as { fetch?: FetchLike }).fetch;
    if (!fetchImpl) {
      throw new GatehouseError('network_error', 'this platform has no fetch; pass a transport');
    }
    const timeoutMs = options.timeoutMs ?? 15_000;
    return {
      async request(request) {
        let response;
        let body: string;
        try {
          response = await fetchImpl(request.url, {
            method: request.method,
            headers: request.headers,
            ...(request.body === undefined ? {} : { body: request.body }),
            redirect: 'error',
            credentials: 'omit',
            cache: 'no-store',
            signal: AbortSignal.timeout(timeoutMs),
          });
          body = await response.text();
        } catch (cause) {
          throw new GatehouseError('network_error', `${request.method} ${request.url} failed: ${String(cause)}`, { cause });
        }
        if (body.length > MAX_RESPONSE_BYTES) {
          throw new GatehouseError('bad_response', `${request.url} answered more than ${MAX_RESPONSE_BYTES} bytes`);
        }
        const headers: Record<string, string> = {};
        response.headers.forEach((value, name) => {
          headers[name.toLowerCase()] = value;
        });
        return { status: response.status, headers, body };
      },
    };
  };
}
