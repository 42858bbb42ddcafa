//! The versioned records of the data file (`gatehouse::store::records`), decoded from
//! arbitrary bytes as if a damaged or hostile data file held them.
//!
//! Every input is decoded as each of the public record enums (every `pub enum ...Record`
//! of `store::records`; `fuzz/smoke.sh` fails when one is missing here). Property: `decode`
//! never panics, and whatever it accepts encodes to bytes that decode again and encode to
//! the very same bytes (postcard may accept more than one spelling of a value, so the input
//! itself need not come back). An admin token of any version, upgraded with
//! `into_current`, survives a round trip as the current version.

#![no_main]

use gatehouse::store::records::{
    self, AcmeAccountRecord, AcmeCertificateRecord, AcmeChallengeRecord, AcmeOrderLeaseRecord,
    AdminToken, AdminTokenRecord, AdminUserRecord,
    AuditCheckpointRecord, AuditEntryRecord, BanRecord, ChainHeadRecord, ClientRecord, DeviceGrantRecord, DeviceRecord,
    FamilyBindingRecord, FamilyRevocationRecord, JobStateRecord, PairingSessionRecord, RateWindowRecord,
    RefreshTokenRecord, RevokedTokenRecord, SelfSignedCertRecord, SigningKeyPrivateRecord,
    SigningKeyRecord, StatusAllocationRecord, StatusRevokedRecord, TokenFamilyRecord,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    // Admin tokens and sealed secrets.
    if let Some(token) = round_trip::<AdminTokenRecord>(data) {
        upgrade(token);
    }
    round_trip::<SelfSignedCertRecord>(data);
    round_trip::<AdminUserRecord>(data);
    round_trip::<AcmeAccountRecord>(data);
    round_trip::<AcmeCertificateRecord>(data);
    round_trip::<AcmeOrderLeaseRecord>(data);
    round_trip::<AcmeChallengeRecord>(data);
    round_trip::<SigningKeyRecord>(data);
    round_trip::<SigningKeyPrivateRecord>(data);
    // Pairing, devices, tokens and clients.
    round_trip::<PairingSessionRecord>(data);
    round_trip::<DeviceRecord>(data);
    round_trip::<DeviceGrantRecord>(data);
    round_trip::<FamilyBindingRecord>(data);
    round_trip::<TokenFamilyRecord>(data);
    round_trip::<RefreshTokenRecord>(data);
    round_trip::<FamilyRevocationRecord>(data);
    round_trip::<RevokedTokenRecord>(data);
    round_trip::<StatusRevokedRecord>(data);
    round_trip::<StatusAllocationRecord>(data);
    round_trip::<ClientRecord>(data);
    // Rate limits, the audit log, bans and scheduled jobs.
    round_trip::<RateWindowRecord>(data);
    round_trip::<AuditEntryRecord>(data);
    round_trip::<AuditCheckpointRecord>(data);
    round_trip::<ChainHeadRecord>(data);
    round_trip::<BanRecord>(data);
    round_trip::<JobStateRecord>(data);
});

/// Decodes `data` as `T`; when that works, checks that its encoding is stable.
fn round_trip<T: Serialize + DeserializeOwned + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let value: T = records::decode(data).ok()?;
    let encoded = records::encode(&value);
    let again: T = records::decode(&encoded).unwrap_or_else(|err| {
        panic!(
            "{}: the encoding of a decoded record does not decode: {err}; value {value:?}",
            std::any::type_name::<T>()
        )
    });
    assert_eq!(
        records::encode(&again),
        encoded,
        "{}: encoding changed after a second decode",
        std::any::type_name::<T>()
    );
    Some(value)
}

/// Any stored version, upgraded, round-trips as the current version.
fn upgrade(record: AdminTokenRecord) {
    let current: AdminToken = record.into_current();
    let encoded = records::encode(&AdminTokenRecord::V2(current.clone()));
    match records::decode::<AdminTokenRecord>(&encoded) {
        Ok(AdminTokenRecord::V2(back)) => assert_eq!(back, current),
        Ok(other) => panic!("a V2 admin token decoded as {other:?}"),
        Err(err) => panic!("a V2 admin token does not decode: {err}"),
    }
}
