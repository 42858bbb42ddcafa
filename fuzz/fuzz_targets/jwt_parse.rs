//! `gatehouse::jwt::parse`, the strict parser every presented access token goes through.
//!
//! The input is tried as a token twice: as UTF-8 text when it is valid UTF-8, and as its
//! lossy conversion (invalid sequences become U+FFFD). An input holding a 0xFF byte (never
//! part of UTF-8) is also read as `header JSON 0xFF claims JSON [0xFF signature bytes]`:
//! the harness base64url-encodes each part into a compact token, so that the fuzzer reaches
//! the JSON decoding of the header and claims without having to invent base64.
//!
//! Property: `parse` never panics. When it accepts a token, its `signing_input` is a prefix
//! of the token followed by `.` and the 86-character signature segment, and a token
//! rebuilt from the parsed header and claims with `encoded_header`, `signing_input` and
//! `finish` parses back to the same header and claims.

#![no_main]

use std::borrow::Cow;

use gatehouse::jwt::{self, ACCESS_TOKEN_TYP, Parsed};
use libfuzzer_sys::fuzz_target;

/// Ed25519 and ES256 signatures are both 64 bytes.
const SIGNATURE_BYTES: usize = 64;
/// 64 bytes in unpadded base64url.
const SIGNATURE_B64: usize = 86;
/// Separates the parts of a structured input; no UTF-8 text contains this byte.
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
        let signature = parts.next().unwrap_or(&[0u8; SIGNATURE_BYTES]);
        let b64 = data_encoding::BASE64URL_NOPAD;
        let token = format!(
            "{}.{}.{}",
            b64.encode(header),
            b64.encode(claims),
            b64.encode(signature)
        );
        check(&token);
    }
});

fn check(token: &str) {
    let Ok(parsed) = jwt::parse(token) else {
        return;
    };
    assert!(
        token.starts_with(parsed.signing_input),
        "signing input is not a prefix of the token"
    );
    assert_eq!(
        parsed.signature.len(),
        SIGNATURE_B64,
        "signature segment length"
    );
    assert_eq!(
        token.len(),
        parsed.signing_input.len() + 1 + parsed.signature.len(),
        "token is not signing input, '.', signature"
    );
    assert_eq!(token.as_bytes()[parsed.signing_input.len()], b'.');
    assert!(token.ends_with(parsed.signature));
    assert_eq!(parsed.signing_input.matches('.').count(), 1);
    rebuild(&parsed);
}

/// What gatehouse itself would write for the same header and claims parses back to them.
fn rebuild(parsed: &Parsed<'_>) {
    // `encoded_header` always writes our `typ`; a different one would change the header.
    if parsed.header.typ != ACCESS_TOKEN_TYP {
        return;
    }
    let header = jwt::encoded_header(&parsed.header.alg, &parsed.header.kid);
    let input = jwt::signing_input(&header, &parsed.claims);
    let token = jwt::finish(input, &[0u8; SIGNATURE_BYTES]);
    match jwt::parse(&token) {
        Ok(again) => {
            assert_eq!(again.header, parsed.header, "header changed on re-encoding");
            assert_eq!(again.claims, parsed.claims, "claims changed on re-encoding");
        }
        Err(err) => panic!("re-encoded token refused: {err}"),
    }
}
