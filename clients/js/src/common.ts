// Everything but the client class, shared by both entry points.
export { GatehouseError, PairingUriError, type PairingUriErrorCode } from './errors.js';
export { parsePairingUri, checkPairingUri, SUPPORTED_PAIRING_URI_VERSIONS, type PairingUri, type CheckOptions } from './uri.js';
export { MemoryStore, type StoredSession, type TokenStore } from './storage.js';
export {
  fetchTransport,
  MAX_RESPONSE_BYTES,
  type FetchLike,
  type HttpRequest,
  type HttpResponse,
  type ServerTrust,
  type Transport,
  type TransportFactory,
} from './transport.js';
export {
  GatehouseSocket,
  webSocketUrl,
  type SocketEvents,
  type SocketOptions,
  type SocketState,
  type WebSocketConstructor,
  type WebSocketLike,
} from './socket.js';
export { GatehouseClientBase, errorFromResponse, type DeviceInfo, type GatehouseClientOptions } from './client.js';
