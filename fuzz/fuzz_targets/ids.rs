//! Typed identifiers and secret shapes from `gatehouse::ids`, on arbitrary text.
//!
//! Every id type's `parse` runs on the input (as UTF-8 when it is, and lossily converted).
//! Property: nothing panics; an accepted text is exactly what `to_string` writes back,
//! `FromStr` agrees with `parse`, and the id survives `from_bytes(as_bytes())` and a JSON
//! round trip. The raw bytes are also read as JSON for each id type. `Secret::well_formed`
//! runs against fixed prefixes and against a prefix cut from the input itself; when it says
//! yes, the text is the prefix and 43 base64url characters.

#![no_main]

use std::fmt::{Debug, Display};
use std::str::FromStr;

use gatehouse::ids::{ClientId, DeviceId, FamilyId, Secret, SessionId, TokenId};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The length of a secret's base64url part.
const SECRET_B64: usize = 43;

/// What the target needs of an id type; every gatehouse id has all of it.
trait Id: Copy + Eq + Debug + Display + FromStr + Serialize + DeserializeOwned {
    const PREFIX: &'static str;
    fn parse(text: &str) -> Option<Self>;
    fn from_bytes(bytes: [u8; 16]) -> Self;
    fn as_bytes(&self) -> &[u8; 16];
}

macro_rules! impl_id {
    ($($ty:ty),*) => {$(
        impl Id for $ty {
            const PREFIX: &'static str = <$ty>::PREFIX;
            fn parse(text: &str) -> Option<Self> {
                <$ty>::parse(text)
            }
            fn from_bytes(bytes: [u8; 16]) -> Self {
                <$ty>::from_bytes(bytes)
            }
            fn as_bytes(&self) -> &[u8; 16] {
                <$ty>::as_bytes(self)
            }
        }
    )*};
}

impl_id!(DeviceId, FamilyId, SessionId, TokenId, ClientId);

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        texts(text);
    }
    texts(&String::from_utf8_lossy(data));
    json::<DeviceId>(data);
    json::<FamilyId>(data);
    json::<SessionId>(data);
    json::<TokenId>(data);
    json::<ClientId>(data);
});

fn texts(text: &str) {
    id::<DeviceId>(text);
    id::<FamilyId>(text);
    id::<SessionId>(text);
    id::<TokenId>(text);
    id::<ClientId>(text);

    // No prefix (pairing secrets), the admin, refresh and client prefixes, and one that is
    // not ASCII.
    for prefix in ["", "gha_", "ghr_", "ghc_", "\u{e9}_"] {
        secret(text, prefix);
    }
    // A prefix taken from the input itself: up to its first char boundary at or after the
    // length named by the first byte.
    if let Some(&first) = text.as_bytes().first() {
        let mut cut = usize::from(first % 16).min(text.len());
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        let (prefix, rest) = text.split_at(cut);
        secret(rest, prefix);
        secret(text, prefix);
    }
}

fn id<T: Id>(text: &str) {
    let parsed = T::parse(text);
    let from_str = text.parse::<T>().ok();
    assert_eq!(parsed, from_str, "parse and FromStr disagree on {text:?}");
    let Some(id) = parsed else {
        return;
    };
    assert_eq!(
        id.to_string(),
        text,
        "to_string does not give back the parsed text"
    );
    assert!(text.starts_with(T::PREFIX));
    assert_eq!(text.len(), T::PREFIX.len() + 32);
    assert_eq!(T::from_bytes(*id.as_bytes()), id);
    let json = serde_json::to_string(&id).unwrap_or_else(|err| panic!("serialise {id:?}: {err}"));
    assert_eq!(json, format!("\"{text}\""));
    let back: T = serde_json::from_str(&json).unwrap_or_else(|err| panic!("{json}: {err}"));
    assert_eq!(back, id);
}

fn json<T: Id>(data: &[u8]) {
    let Ok(id) = serde_json::from_slice::<T>(data) else {
        return;
    };
    let text = id.to_string();
    assert_eq!(
        T::parse(&text),
        Some(id),
        "an id read from JSON does not parse from its text"
    );
}

fn secret(presented: &str, prefix: &str) {
    if Secret::well_formed(presented, prefix) {
        let rest = presented
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("{presented:?} accepted without prefix {prefix:?}"));
        assert_eq!(rest.len(), SECRET_B64, "{presented:?}");
        assert!(
            rest.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{presented:?} accepted with a character outside base64url"
        );
    }
}
