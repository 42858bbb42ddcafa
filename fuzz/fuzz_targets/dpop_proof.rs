//! `gatehouse::dpop::signed_by`, the strict parser and signature check every `DPoP`
//! header (and WebSocket `dpop` field) goes through.
//!
//! The input is tried as a proof as UTF-8 text (when it is) and as its lossy conversion.
//! An input holding a 0xFF byte (never part of UTF-8) is also read as
//! `header JSON 0xFF claims JSON [0xFF signature bytes]`: the harness base64url-encodes
//! each part into a compact JWS, so that the fuzzer reaches the JSON decoding of the
//! header, its key and the claims without having to invent base64.
//!
//! Property: `signed_by` never panics, and what it accepts has a thumbprint of 43
//! base64url characters (a signature the fuzzer made up is refused, so acceptance needs
//! a seed's real one).

#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;

const SEPARATOR: u8 = 0xFF;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        check(text);
    }
    let lossy: Cow<'_, str> = String::from_utf8_lossy(data);
    check(&lossy);

    if data.contains(&SEPARATOR) {
        let mut parts = data.split(|&b| b == SEPARATOR);
        let header = parts.next().unwrap_or_default();
        let claims = parts.next().unwrap_or_default();
        let signature = parts.next().unwrap_or(&[0u8; 64]);
        let b64 = data_encoding::BASE64URL_NOPAD;
        let proof = format!(
            "{}.{}.{}",
            b64.encode(header),
            b64.encode(claims),
            b64.encode(signature)
        );
        check(&proof);
    }
});

fn check(proof: &str) {
    if let Ok(jkt) = gatehouse::dpop::signed_by(proof) {
        assert_eq!(jkt.as_str().len(), 43);
    }
}
