/**
 * gatehouse-client for Node (20 or newer): the same API, with a transport over
 * node:https that checks a pairing URI's certificate pin.
 */
import { createHash, X509Certificate } from 'node:crypto';
import http from 'node:http';
import https from 'node:https';
import { isIP, type Socket } from 'node:net';
import tls from 'node:tls';
import { GatehouseClientBase, type GatehouseClientOptions } from './client.js';
import { GatehouseError } from './errors.js';
import { MAX_RESPONSE_BYTES, type TransportFactory } from './transport.js';

export * from './common.js';

/** `sha256/` and the base64 SHA-256 of a certificate's SubjectPublicKeyInfo (DER). */
export function spkiPin(certificate: Uint8Array | X509Certificate): string {
  const x509 = certificate instanceof X509Certificate ? certificate : new X509Certificate(certificate);
  const spki = x509.publicKey.export({ type: 'spki', format: 'der' });
  return `sha256/${createHash('sha256').update(spki).digest('base64')}`;
}

type ConnectOptions = { host?: string | null | undefined; hostname?: string | null | undefined; port?: number | string | null | undefined };
type OnCreate = (error: Error | null, socket: Socket) => void;

/**
 * A `createConnection` for node:https and the `ws` package that trusts exactly the
 * certificate whose public key has `pin`. The certificate's CA chain and names are not
 * checked (gatehouse's self-signed certificate has neither a CA nor the names a phone
 * may use); nothing is sent before the pin matched, and a mismatch fails the request
 * with `pin_mismatch`.
 */
export function pinnedConnection(pin: string, timeoutMs = 15_000): (options: ConnectOptions, oncreate: OnCreate) => undefined {
  return (options, oncreate) => {
    const host = (options.hostname ?? options.host ?? 'localhost').replace(/^\[(.*)\]$/, '$1');
    const socket = tls.connect({
      host,
      port: Number(options.port),
      ...(isIP(host) ? {} : { servername: host }),
      // The chain is not checked: the pin below is the whole trust decision.
      rejectUnauthorized: false,
      ALPNProtocols: ['http/1.1'],
      minVersion: 'TLSv1.2',
    });
    let done = false;
    const finish = (error: Error | null) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.removeListener('error', finish);
      if (error) {
        socket.destroy();
        oncreate(error, socket);
      } else {
        oncreate(null, socket);
      }
    };
    const timer = setTimeout(() => finish(new GatehouseError('network_error', `TLS connection to ${host} timed out`)), timeoutMs);
    socket.once('error', finish);
    socket.once('secureConnect', () => {
      const peer = socket.getPeerX509Certificate();
      const presented = peer ? spkiPin(peer) : '(no certificate)';
      if (presented !== pin) {
        finish(
          new GatehouseError(
            'pin_mismatch',
            `the server's certificate (${presented}) does not match the pin ${pin}: refusing to connect`,
          ),
        );
      } else {
        finish(null);
      }
    });
    return undefined;
  };
}

/**
 * A transport over node:https. With a pin (a pairing URI from a server with a
 * self-signed certificate): trusts exactly the certificate with that key, through
 * `pinnedConnection`, for HTTP and (with the `ws` package) the WebSocket. Without a
 * pin: validates the certificate against Node's CAs, or `ca` when given.
 */
export function nodeTransport(options: { ca?: string | Buffer; timeoutMs?: number } = {}): TransportFactory {
  const timeoutMs = options.timeoutMs ?? 15_000;
  return (trust) => {
    const connection = trust.pin === undefined ? undefined : pinnedConnection(trust.pin, timeoutMs);
    return {
      ...(connection === undefined ? {} : { webSocketOptions: { createConnection: connection, perMessageDeflate: false } }),
      request(request) {
        return new Promise((resolve, reject) => {
          const url = new URL(request.url);
          const secure = url.protocol === 'https:';
          const fail = (cause: unknown) =>
            reject(
              cause instanceof GatehouseError
                ? cause
                : new GatehouseError('network_error', `${request.method} ${request.url} failed: ${String(cause)}`, { cause }),
            );
          const settings = {
            method: request.method,
            headers: { ...request.headers, ...(request.body === undefined ? {} : { 'content-length': String(Buffer.byteLength(request.body)) }) },
            // node:https defaults the port to 80 when a createConnection is given.
            port: url.port || (secure ? 443 : 80),
            timeout: timeoutMs,
            ...(connection === undefined ? (options.ca === undefined ? {} : { ca: options.ca }) : { createConnection: connection }),
          };
          // Plain http:// only reaches a gatehouse with TLS off (loopback), and only when
          // the client allows it (allowInsecureHttp).
          const send = secure ? https.request : http.request;
          const req = send(url, settings, (response) => {
            const chunks: Buffer[] = [];
            let size = 0;
            response.on('data', (chunk: Buffer) => {
              size += chunk.length;
              if (size > MAX_RESPONSE_BYTES) {
                req.destroy(new GatehouseError('bad_response', `${request.url} answered more than ${MAX_RESPONSE_BYTES} bytes`));
              } else {
                chunks.push(chunk);
              }
            });
            response.on('error', fail);
            response.on('end', () => {
              const headers: Record<string, string> = {};
              for (const [name, value] of Object.entries(response.headers)) {
                if (value !== undefined) headers[name] = Array.isArray(value) ? value.join(', ') : value;
              }
              resolve({ status: response.statusCode ?? 0, headers, body: Buffer.concat(chunks).toString('utf8') });
            });
          });
          req.on('timeout', () => req.destroy(new GatehouseError('network_error', `${request.url} timed out`)));
          req.on('error', fail);
          req.end(request.body);
        });
      },
    };
  };
}

/** The gatehouse client for Node; its default transport is `nodeTransport()`. */
export class GatehouseClient extends GatehouseClientBase {
  constructor(options: GatehouseClientOptions) {
    super({ ...options, transport: options.transport ?? nodeTransport() });
  }
}
