//! JSON that names each object member once.
//!
//! RFC 8259 §4 leaves a repeated member name's meaning to the implementation: one parser keeps
//! the first, another the last. Whatever Portcullis decides on is also read by someone else
//! (the MCP server or model endpoint behind it reads the body; the upstream a user token is
//! forwarded to, or an identity provider exchanging it, reads the token), so a body
//! `{"name":"search","name":"refund"}` could be authorized as one tool and run as the other,
//! and a token's claims could name one user to Portcullis and another downstream. Such JSON
//! is refused wherever it is read.
//!
//! Some parsers also match names regardless of case: Go's `encoding/json` (the MCP servers and
//! model gateways written in Go) fills a struct field from any member whose name equals it
//! under Unicode case folding, the last one winning, so `{"method":"ping","Method":"tools/call"}`
//! is a ping to a case-sensitive reader and a tool call to Go. What a caller sends is therefore
//! checked with names folded ([`has_unique_folded_names`]).

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
    de.deserialize_any(UniqueVisitor::<false>).is_ok() && de.end().is_ok()
}

/// [`has_unique_names`] with names compared as a case-insensitive parser compares them: two
/// names are the same when they are equal after case folding (`Method` and `method`, `ſ` and
/// `s`, the Kelvin sign and `k`). Folding maps each character to its uppercase and that to
/// its lowercase, which puts every character Go's `strings.EqualFold` equates in one class;
/// it equates a few more (`ß` and `ss`), refusing what no reader could need.
pub fn has_unique_folded_names(bytes: &[u8]) -> bool {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.deserialize_any(UniqueVisitor::<true>).is_ok() && de.end().is_ok()
}

/// The name a case-insensitive parser matches: borrowed when folding leaves it as it is (ASCII
/// without capitals, the common case).
fn folded(name: Cow<'_, str>) -> Cow<'_, str> {
    if name
        .bytes()
        .all(|b| b.is_ascii() && !b.is_ascii_uppercase())
    {
        return name;
    }
    Cow::Owned(
        name.chars()
            .flat_map(char::to_uppercase)
            .flat_map(char::to_lowercase)
            .collect(),
    )
}

struct Unique<const FOLD: bool>;

impl<'de, const FOLD: bool> de::Deserialize<'de> for Unique<FOLD> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor::<FOLD>)
    }
}

struct UniqueVisitor<const FOLD: bool>;

impl<'de, const FOLD: bool> Visitor<'de> for UniqueVisitor<FOLD> {
    type Value = Unique<FOLD>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Unique)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Unique)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Unique)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Unique)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Unique)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Unique)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Unique<FOLD>>()?.is_some() {}
        Ok(Unique)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut seen = HashSet::new();
        while let Some(Key(key)) = map.next_key()? {
            let key = if FOLD { folded(key) } else { key };
            if !seen.insert(key) {
                return Err(de::Error::custom("duplicate object key"));
            }
            map.next_value::<Unique<FOLD>>()?;
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
    use super::{has_unique_folded_names, has_unique_names};

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

    #[test]
    fn names_equal_under_case_folding_are_refused_where_folding_is_asked_for() {
        for refused in [
            r#"{"method":"ping","Method":"tools/call"}"#,
            r#"{"params":{"name":"search","NAME":"refund"}}"#,
            r#"{"arguments":{"amount":5},"Arguments":{"amount":5000}}"#,
            // U+017F LATIN SMALL LETTER LONG S folds to `s`, U+212A KELVIN SIGN to `k`.
            "{\"params\":1,\"param\u{17f}\":2}",
            "{\"max_tokens\":1,\"max_to\u{212a}ens\":2}",
            r#"{"m\u0065thod":1,"M\u0045THOD":2}"#,
            r#"[{"x":{"Y":1,"y":2}}]"#,
        ] {
            assert!(!has_unique_folded_names(refused.as_bytes()), "{refused}");
            // Exact comparison (user tokens) still tells them apart.
            assert!(has_unique_names(refused.as_bytes()), "{refused}");
        }
        for accepted in [
            r#"{"a":1,"b":1,"a ":1,"a_":1}"#,
            r#"{"Name":{"name":1}}"#,
            r#"{"\u00e9":1,"e":2}"#,
        ] {
            assert!(has_unique_folded_names(accepted.as_bytes()), "{accepted}");
        }
        assert!(!has_unique_folded_names(br#"{"a":1,"a":2}"#));
    }
}
