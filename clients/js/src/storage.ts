/** Everything a paired device keeps. Store it in the platform's secure storage. */
export interface StoredSession {
  /** The server's base URL (the pairing URI's `server`, the tokens' `iss`). */
  readonly server: string;
  /** The server certificate's pin, when it was paired through one. */
  readonly pin?: string;
  /** This device's id (`dev_…`), the `sub` of its access tokens. */
  readonly deviceId: string;
  readonly accessToken: string;
  /** Single-use: every refresh returns a new one, and the old one is spent. */
  readonly refreshToken: string;
  /** When the access token expires, in milliseconds on this client's clock. */
  readonly accessExpiresAt: number;
}

/**
 * Where the client keeps its session: a hook for the platform's secure storage
 * (Keychain, Keystore, an encrypted file). Each method may return a promise.
 *
 * `save` is called after every pairing and every refresh, before the new tokens are
 * handed out. It must be durable when it returns: after a refresh the old refresh token
 * is spent, and presenting it again (say, after a restart that loaded a stale copy)
 * revokes the whole family, so the device would have to be paired again.
 */
export interface TokenStore {
  load(): StoredSession | null | undefined | Promise<StoredSession | null | undefined>;
  save(session: StoredSession): void | Promise<void>;
  clear(): void | Promise<void>;
}

/** A store that forgets everything when the process ends: for tests and short scripts. */
export class MemoryStore implements TokenStore {
  #session: StoredSession | null;

  constructor(session: StoredSession | null = null) {
    this.#session = session;
  }

  load(): StoredSession | null {
    return this.#session;
  }

  save(session: StoredSession): void {
    this.#session = session;
  }

  clear(): void {
    this.#session = null;
  }
}
