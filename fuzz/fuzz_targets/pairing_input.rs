//! What an app sends when it pairs (`gatehouse::pairing::DeviceInfo`, JSON), and the pairing
//! URI built from text that nobody checked.
//!
//! The input is read as `DeviceInfo` JSON. Property: that never panics, and for every
//! value it accepts, `pairing_uri` (with the device name as the server URL, the platform as
//! the pin, the app version as the secret, a session id and expiry derived from the input,
//! and also the extreme expiries 0 and `u64::MAX`) never panics and writes only ASCII with no
//! space. Beyond that, the URI has the form of `schema/pairing-uri.md`: `gatehouse://pair?`
//! then `&`-joined pairs whose values are unreserved characters and `%XX` escapes only, and
//! percent-decoding each value gives back exactly the text that went in.

#![no_main]

use gatehouse::ids::SessionId;
use gatehouse::pairing::{DeviceInfo, ServerIdentity, pairing_uri};
use libfuzzer_sys::fuzz_target;

const START: &str = "gatehouse://pair?";

fuzz_target!(|data: &[u8]| {
    let Ok(info) = serde_json::from_slice::<DeviceInfo>(data) else {
        return;
    };
    let seed = fold(data);
    let session = SessionId::from_bytes(seed.to_le_bytes());
    let server = ServerIdentity {
        url: info.name.clone(),
        // Half the servers serve a self-signed certificate and put a pin in the URI.
        pin: (seed & 1 == 1).then(|| info.platform.clone()),
    };
    for expires_at_ms in [0, seed as u64, u64::MAX] {
        let uri = pairing_uri(&server, &session, &info.app_version, expires_at_ms);
        check(&uri, &server, &session, &info.app_version, expires_at_ms);
    }
});

/// A 128-bit digest of the input (FNV-1a), to vary the session id, expiry and pin.
fn fold(data: &[u8]) -> u128 {
    let mut hash: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for &b in data {
        hash ^= u128::from(b);
        hash = hash.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    hash
}

fn check(uri: &str, server: &ServerIdentity, session: &SessionId, secret: &str, exp_ms: u64) {
    assert!(uri.is_ascii(), "not ASCII: {uri:?}");
    assert!(!uri.contains(' '), "has a space: {uri:?}");
    assert!(!uri.contains('#'), "has a fragment: {uri:?}");
    let query = uri
        .strip_prefix(START)
        .unwrap_or_else(|| panic!("does not start with {START}: {uri:?}"));

    let mut pairs = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair
            .split_once('=')
            .unwrap_or_else(|| panic!("a pair without '=' in {uri:?}"));
        assert!(
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase()),
            "bad parameter name {name:?} in {uri:?}"
        );
        pairs.push((name, decode(value, uri)));
    }

    let session = session.to_string();
    let exp = (exp_ms / 1000).to_string();
    let mut expected: Vec<(&str, &str)> = vec![
        ("v", "1"),
        ("server", &server.url),
        ("session", &session),
        ("secret", secret),
        ("exp", &exp),
    ];
    if let Some(pin) = &server.pin {
        expected.push(("pin", pin));
    }
    let got: Vec<(&str, &str)> = pairs.iter().map(|(n, v)| (*n, v.as_str())).collect();
    assert_eq!(got, expected, "the URI does not carry its inputs: {uri:?}");
}

/// Percent-decodes one query value, insisting on the encoding gatehouse promises:
/// unreserved characters as they are, everything else as `%` and two uppercase hex digits.
fn decode(value: &str, uri: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b);
            i += 1;
        } else if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .filter(|h| {
                    h.iter()
                        .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
                })
                .unwrap_or_else(|| panic!("a bad escape in {uri:?}"));
            let hex = std::str::from_utf8(hex).unwrap_or_default();
            out.push(u8::from_str_radix(hex, 16).unwrap_or_default());
            i += 3;
        } else {
            panic!("{:?} written unescaped in {uri:?}", char::from(b));
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| panic!("a value is not UTF-8 once decoded: {uri:?}"))
}
