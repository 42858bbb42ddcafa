//! JSON as the API reads it: an object, with no member named twice at any depth.
//!
//! serde_json keeps the last of two members with the same name, so
//! `{"now": false, "now": true}` would act on `true` while a log or a proxy that reads the
//! first one sees `false`. Every JSON body and WebSocket message is read through
//! `StrictObject` first, which refuses that, then turned into its type.
//!
//! A number written with a fraction or an exponent that is exactly an integer (`300.0`,
//! `3e2`) is read as that integer, as JSON Schema counts it: an integer member accepts it
//! like `300`. Only integers up to 2^53 in magnitude, which a double holds exactly, are
//! read so; a larger one stays a float and an integer member refuses it.

use std::collections::HashSet;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A JSON object with no duplicate member anywhere inside it.
#[derive(Debug)]
pub(crate) struct StrictObject(pub(crate) Map<String, Value>);

impl StrictObject {
    /// Reads `bytes` as one strict object.
    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The object as `T` (whose own checks, such as unknown fields, then apply).
    pub(crate) fn into_type<T: DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        serde_json::from_value(Value::Object(self.0))
    }
}

impl<'de> Deserialize<'de> for StrictObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_any(StrictVisitor)? {
            Value::Object(map) => Ok(Self(map)),
            _ => Err(de::Error::custom("expected a JSON object")),
        }
    }
}

/// A JSON value; objects refuse a member named twice.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Self)
    }
}

struct StrictVisitor;

/// The integer `v` is exactly, when it is one and a double holds every integer up to it.
fn exact_integer(v: f64) -> Option<i64> {
    /// 2^53: every integer up to this magnitude is a double exactly.
    const EXACT: f64 = 9_007_199_254_740_992.0;
    // `as` is exact here: `v` is integral and within ±2^53.
    #[allow(clippy::cast_possible_truncation)]
    (v.fract() == 0.0 && v.abs() <= EXACT).then_some(v as i64)
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(exact_integer(v).map_or_else(|| Value::from(v), Value::from))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut seen = HashSet::new();
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!(
                    "the member \"{key}\" appears twice"
                )));
            }
            let StrictValue(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_member_named_twice_is_refused_at_any_depth() {
        let ok = StrictObject::parse(br#"{"a": 1, "b": {"c": [1, {"d": true}]}}"#).unwrap();
        assert_eq!(ok.0["b"]["c"][1]["d"], true);
        for bad in [
            r#"{"now": false, "now": true}"#,
            r#"{"device": {"name": "a", "name": "b"}}"#,
            r#"{"list": [{"x": 1, "x": 2}]}"#,
        ] {
            let err = StrictObject::parse(bad.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("appears twice"), "{bad}: {err}");
        }
        assert!(StrictObject::parse(b"[1, 2]").is_err());
        assert!(StrictObject::parse(b"\"text\"").is_err());
    }

    #[test]
    fn numbers_keep_their_kind() {
        let object =
            StrictObject::parse(br#"{"i": -3, "u": 18446744073709551615, "f": 1.5}"#).unwrap();
        assert_eq!(object.0["i"], -3);
        assert_eq!(object.0["u"], u64::MAX);
        assert_eq!(object.0["f"], 1.5);
    }

    #[test]
    fn an_integral_number_is_an_integer() {
        let object = StrictObject::parse(
            br#"{"a": 300.0, "b": 3e2, "c": -0.0, "d": -7.0, "e": 9007199254740992.0,
                "f": 9007199254740994.0, "g": 1e300, "h": 300.5}"#,
        )
        .unwrap();
        assert_eq!(object.0["a"], 300);
        assert!(object.0["a"].is_u64());
        assert_eq!(object.0["b"], 300);
        assert_eq!(object.0["c"], 0);
        assert_eq!(object.0["d"], -7);
        assert_eq!(object.0["e"], 9_007_199_254_740_992_u64);
        assert!(object.0["f"].is_f64());
        assert!(object.0["g"].is_f64());
        assert_eq!(object.0["h"], 300.5);
    }
}
