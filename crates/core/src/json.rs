//! JSON that names each object member once.
//!
//! RFC 8259 §4 leaves a repeated member name's meaning to the implementation: one parser keeps
//! the first, another the last. Whatever Portcullis decides on is also read by someone else
//! (the MCP server or model endpoint behind it reads the body; the upstream a user token is
//! forwarded to, or an identity provider exchanging it, reads the token), so a body
//! `{"name":"search","name":"refund"}` could be authorized as one tool and run as the other,
//! and a token's claims could name one user to Portcullis and another downstream. Such JSON
//! is refused wherever it is read.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// Whether `bytes` is one JSON value in which no object, at any depth, names a member twice
/// (names compared with their escapes resolved). Keeps nothing but the names of the objects
/// still open; serde_json's recursion limit (128) bounds nesting, and the names of an object
/// are kept in a set, so thousands of them cannot make the check quadratic.
pub fn has_unique_names(bytes: &[u8]) -> bool {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_any(UniqueVisitor).is_ok() && de.end().is_ok()
}

struct Unique;

impl<'de> de::Deserialize<'de> for Unique {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor)
    }
}

struct UniqueVisitor;

impl<'de> Visitor<'de> for UniqueVisitor {
    type Value = Unique;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> Result<Unique, E> {
        Ok(Unique)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
        while seq.next_element::<Unique>()?.is_some() {}
        Ok(Unique)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
        let mut seen = HashSet::new();
        while let Some(Key(key)) = map.next_key()? {
            if !seen.insert(key) {
                return Err(de::Error::custom("duplicate object key"));
            }
            map.next_value::<Unique>()?;
        }
        Ok(Unique)
    }
}

/// An object key, borrowed from the input unless it holds escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::has_unique_names;

    #[test]
    fn a_name_given_twice_in_any_object_is_refused() {
        for refused in [
            r#"{"a":1,"a":1}"#,
            r#"{"a":1,"\u0061":2}"#,
            r#"[{"x":{"y":1,"y":2}}]"#,
            r#"{"a":{},"b":[],"a":null}"#,
            r#"{"a":1} {}"#,
            r#"{"a":1"#,
            "",
        ] {
            assert!(!has_unique_names(refused.as_bytes()), "{refused}");
        }
        for accepted in [
            r#"{"a":1,"A":1,"a ":1}"#,
            r#"{"a":{"a":{"a":1}},"b":{"a":1}}"#,
            r#"[{"x":1},{"x":2}]"#,
            r#" "text" "#,
            "7",
        ] {
            assert!(has_unique_names(accepted.as_bytes()), "{accepted}");
        }
    }
}
