/** Why a pairing URI was refused (see `parsePairingUri`). */
export type PairingUriErrorCode =
  /** Not `gatehouse://pair?…`: another scheme or authority, a path or a fragment. */
  | 'not_a_pairing_uri'
  /** `v` names a version this client does not know: the app must be updated. */
  | 'unsupported_version'
  /** `v`, `server`, `session`, `secret` or `exp` is absent. */
  | 'missing_parameter'
  /** A parameter this client knows appears twice. */
  | 'repeated_parameter'
  /** A parameter's value is malformed (or not percent-decodable). */
  | 'invalid_parameter'
  /** The session's `exp` has passed: ask for a new code. */
  | 'expired'
  /** The server is `http://` and the client was not told to allow it. */
  | 'insecure_server';

/** A pairing URI that must not be used. `message` says why, for a person. */
export class PairingUriError extends Error {
  override readonly name = 'PairingUriError';
  readonly code: PairingUriErrorCode;
  /** The parameter at fault, when there is one. */
  readonly parameter: string | undefined;

  constructor(code: PairingUriErrorCode, message: string, parameter?: string) {
    super(message);
    this.code = code;
    this.parameter = parameter;
  }
}

/**
 * A refusal or failure talking to gatehouse.
 *
 * `status` is the HTTP status (0 when no answer came: a network failure, a refused
 * certificate). `code` is gatehouse's stable error code (`pairing_failed`,
 * `invalid_grant`, `rate_limited`, `invalid_request`, …) or one of this client's:
 * `network_error`, `pin_mismatch`, `pin_unsupported`, `unpaired`, `bad_response`.
 */
export class GatehouseError extends Error {
  override readonly name = 'GatehouseError';
  readonly status: number;
  readonly code: string;
  /** The server's request id (its `x-request-id`), to find the request in its log. */
  readonly requestId: string | undefined;
  /** Seconds to wait before trying again, from a 429's `Retry-After`. */
  readonly retryAfter: number | undefined;

  constructor(
    code: string,
    message: string,
    details: { status?: number; requestId?: string | undefined; retryAfter?: number | undefined; cause?: unknown } = {},
  ) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.code = code;
    this.status = details.status ?? 0;
    this.requestId = details.requestId;
    this.retryAfter = details.retryAfter;
  }

  /**
   * Whether the device must be paired again: its refresh token is spent, expired or
   * revoked (`invalid_grant`), or nothing is stored (`unpaired`).
   */
  get unpaired(): boolean {
    return this.code === 'invalid_grant' || this.code === 'unpaired';
  }
}
