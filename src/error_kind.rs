//! What kind of failure an error is, decided once beside each domain error enum.
//!
//! Every domain error (`PairingError`, `KeyError`, …) implements [`Classify`] with one
//! exhaustive `match` next to its declaration, so a new variant does not compile until
//! someone decides whose fault it is. The HTTP layer (status and code), the WebSocket
//! channel (code) and the CLI (the code a management command fails with) all map from
//! that one answer, so one mistake has one code everywhere. This module names no other
//! part of gatehouse but the store's error.

/// Whose fault a failure is and what the caller can do about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorKind {
    /// The request itself is malformed or out of range; repeating it will not help.
    Invalid,
    /// A secret was not accepted. One answer for every reason, so nothing leaks.
    Unauthenticated,
    /// What the request names does not exist.
    NotFound,
    /// It exists, but its state does not allow this now (already revoked, running, too
    /// soon).
    Conflict,
    /// It existed and can no longer be used (a spent or expired session).
    Gone,
    /// The caller's address is locked out after repeated failed secret checks.
    Banned,
    /// The caller spent its allowance of a rate-limit policy.
    RateLimited,
    /// The app behind the front door could not be reached, or answered nonsense.
    Upstream,
    /// The app behind the front door did not answer in time.
    UpstreamTimeout,
    /// The store cannot be reached now (a database that is down or failing over); the
    /// request was not completed and may be tried again. Details go to the log.
    Unavailable,
    /// Something the caller cannot influence failed; details go to the log, not to the
    /// caller.
    Internal,
}

impl ErrorKind {
    /// The code a client or script sees when the error names no more precise one.
    pub(crate) fn code(self) -> &'static str {
        match self {
            Self::Invalid => "invalid_request",
            Self::Unauthenticated => "unauthorized",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::Gone => "gone",
            Self::Banned => "banned",
            Self::RateLimited => "rate_limited",
            Self::Upstream => "bad_gateway",
            Self::UpstreamTimeout => "gateway_timeout",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal_error",
        }
    }
}

/// A domain error that knows its kind.
pub(crate) trait Classify: std::error::Error {
    /// The kind, from one exhaustive match beside the error enum.
    fn kind(&self) -> ErrorKind;

    /// The stable code clients and scripts match on. Override only where a protocol
    /// fixes the code (OAuth's `invalid_grant`) or a refusal has its own documented one.
    fn code(&self) -> &'static str {
        self.kind().code()
    }
}

/// A store failure is never the caller's fault: the caller sees "unavailable" while the
/// database cannot be reached (try again), else "internal". (The store is a crate of
/// its own that knows nothing of HTTP or the CLI, so its error is classified here.)
impl Classify for gatehouse_store::StoreError {
    fn kind(&self) -> ErrorKind {
        use gatehouse_store::StoreError as E;
        match self {
            E::Unreachable { .. } | E::Conflict => ErrorKind::Unavailable,
            E::OtherNodes { .. } => ErrorKind::Conflict,
            E::Io { .. }
            | E::Locked { .. }
            | E::NotADataFile { .. }
            | E::Corrupt { .. }
            | E::NewerFormat { .. }
            | E::WrongMasterKey { .. }
            | E::ReadOnly { .. }
            | E::NoMigration { .. }
            | E::Decode { .. }
            | E::SealedValue { .. }
            | E::Database(_)
            | E::WriterStopped
            | E::JobPanicked
            | E::WriteFailed(_)
            | E::BadStorageUrl { .. }
            | E::NotEmpty { .. }
            | E::EmptyDatabase { .. } => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorKind;

    #[test]
    fn every_kind_has_its_own_code() {
        let kinds = [
            ErrorKind::Invalid,
            ErrorKind::Unauthenticated,
            ErrorKind::NotFound,
            ErrorKind::Conflict,
            ErrorKind::Gone,
            ErrorKind::Banned,
            ErrorKind::RateLimited,
            ErrorKind::Upstream,
            ErrorKind::UpstreamTimeout,
            ErrorKind::Internal,
        ];
        let mut codes: Vec<_> = kinds.iter().map(|k| k.code()).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), kinds.len());
    }
}
