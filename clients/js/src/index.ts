/**
 * gatehouse-client for browsers and other platforms with `fetch` (the entry point
 * outside Node). Certificates are validated by the platform; a pairing URI with a pin
 * is refused (`pin_unsupported`), since a page cannot pin.
 */
import { GatehouseClientBase, type GatehouseClientOptions } from './client.js';
import { fetchTransport } from './transport.js';

export * from './common.js';

/** The gatehouse client; its default transport is `fetchTransport()`. */
export class GatehouseClient extends GatehouseClientBase {
  constructor(options: GatehouseClientOptions) {
    super({ ...options, transport: options.transport ?? fetchTransport() });
  }
}
