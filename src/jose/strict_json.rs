//! A strict JSON object parser for token headers, payloads and caller claims.
//!
//! serde_json keeps the last of two members with the same name, so
//! `{"iss":"a","iss":"b"}` reads as `b` here while another JWT library may
//! read `a`: two parties disagreeing on what a signed token says. This parser
//! refuses a duplicated member name at any depth (compared after unescaping,
//! so `"iss"` and `"\u0069ss"` are the same name) and nesting deeper than
//! [`MAX_DEPTH`] (standard protobuf clients refuse messages nested about 100
//! deep, and a JSON level costs up to three protobuf levels in a
//! `google.protobuf.Struct`). Self-contained: depends on serde and serde_json
//! only.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The deepest nesting accepted: the top-level object is depth 1, each
/// object or array inside it one more.
pub(crate) const MAX_DEPTH: usize = 32;

/// Why bytes are not a strict JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StrictJsonError {
    /// Not JSON at all (syntax, encoding, trailing bytes); serde_json's message.
    NotJson(String),
    /// JSON, but the top level is not an object.
    NotObject,
    /// A member name appears twice in one object. `at` is the JSON Pointer
    /// (RFC 6901) of that object, empty for the top level.
    Duplicate {
        /// The repeated member name.
        name: String,
        /// Where the object holding it is.
        at: String,
    },
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

impl fmt::Display for StrictJsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotJson(e) => write!(f, "not JSON: {e}"),
            Self::NotObject => f.write_str("not a JSON object"),
            Self::Duplicate { name, at } if at.is_empty() => {
                write!(f, "duplicate member {name:?}")
            }
            Self::Duplicate { name, at } => write!(f, "duplicate member {name:?} in {at}"),
            Self::TooDeep => write!(f, "nested deeper than {MAX_DEPTH} levels"),
        }
    }
}

impl std::error::Error for StrictJsonError {}

/// Parses `bytes` as one JSON object, refusing duplicate member names at any
/// depth and nesting beyond [`MAX_DEPTH`].
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, StrictJsonError> {
    // The visitor records why it stopped here; serde_json's own error then
    // only carries position information we do not need.
    let why = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = ValueSeed {
        depth: 0,
        why: &why,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match parsed {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(StrictJsonError::NotObject),
        Err(e) => Err(why
            .take()
            .unwrap_or_else(|| StrictJsonError::NotJson(e.to_string()))),
    }
}

/// Deserializes one value at `depth` (of its parent), reporting a strictness
/// failure through `why`.
#[derive(Clone, Copy)]
struct ValueSeed<'a> {
    depth: usize,
    why: &'a Cell<Option<StrictJsonError>>,
}

impl ValueSeed<'_> {
    /// Enters a container: the seed for its elements, or `TooDeep`.
    fn enter<E: de::Error>(self) -> Result<Self, E> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(self.fail(StrictJsonError::TooDeep));
        }
        Ok(Self { depth, ..self })
    }

    fn fail<E: de::Error>(self, why: StrictJsonError) -> E {
        let msg = why.to_string();
        self.why.set(Some(why));
        E::custom(msg)
    }

    /// Prefixes the pointer of a duplicate found below with `segment`, on the
    /// way out of the failing container (no cost while parsing succeeds).
    fn locate(self, segment: &str) {
        let why = match self.why.take() {
            Some(StrictJsonError::Duplicate { name, at }) => {
                let escaped = segment.replace('~', "~0").replace('/', "~1");
                Some(StrictJsonError::Duplicate {
                    name,
                    at: format!("/{escaped}{at}"),
                })
            }
            other => other,
        };
        self.why.set(why);
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
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
        // JSON text cannot spell a non-finite number, so this is never Null.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
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

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut out = Vec::new();
        loop {
            match seq.next_element_seed(inner) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => return Ok(Value::Array(out)),
                Err(e) => {
                    self.locate(&out.len().to_string());
                    return Err(e);
                }
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let inner = self.enter()?;
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if map.contains_key(&name) {
                return Err(self.fail(StrictJsonError::Duplicate {
                    name,
                    at: String::new(),
                }));
            }
            match access.next_value_seed(inner) {
                Ok(v) => {
                    map.insert(name, v);
                }
                Err(e) => {
                    self.locate(&name);
                    return Err(e);
                }
            }
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> StrictJsonError {
        parse_object(text.as_bytes()).expect_err(text)
    }

    fn dup(name: &str, at: &str) -> StrictJsonError {
        StrictJsonError::Duplicate {
            name: name.into(),
            at: at.into(),
        }
    }

    /// Ordinary objects parse exactly as serde_json reads them.
    #[test]
    fn accepts_what_serde_json_accepts() {
        for text in [
            r#"{}"#,
            r#"{"iss":"a","aud":["x","y"],"n":-1,"u":18446744073709551615,"f":1.5,"t":true,"z":null}"#,
            r#"{"a":{"a":{"a":1}},"b":[{"a":1},{"a":2}]}"#,
            " {\"ws\" : \"\\u00e9\\n\"} \n",
        ] {
            let strict = parse_object(text.as_bytes()).expect(text);
            let loose: Value = serde_json::from_str(text).expect(text);
            assert_eq!(Value::Object(strict), loose, "{text}");
        }
    }

    /// The same name twice is refused wherever it is, naming it and where.
    #[test]
    fn duplicate_members_refused_at_any_depth() {
        assert_eq!(err(r#"{"iss":"a","iss":"b"}"#), dup("iss", ""));
        assert_eq!(
            err(r#"{"role":"teller","role":"admin"}"#).to_string(),
            "duplicate member \"role\""
        );
        // Compared after unescaping.
        assert_eq!(err(r#"{"iss":"a","\u0069ss":"b"}"#), dup("iss", ""));
        let nested = err(r#"{"ctx":{"ok":1,"x":[0,{"role":"a","role":"b"}]}}"#);
        assert_eq!(nested, dup("role", "/ctx/x/1"));
        assert_eq!(nested.to_string(), "duplicate member \"role\" in /ctx/x/1");
        // Pointer segments are escaped as RFC 6901 says.
        assert_eq!(err(r#"{"a/b~":{"k":1,"k":2}}"#), dup("k", "/a~1b~0"));
        // The same name in sibling objects is not a duplicate.
        parse_object(br#"{"a":{"k":1},"b":{"k":2},"k":3}"#).expect("siblings");
    }

    /// Depth 32 parses; 33 is refused, through objects or arrays, and far
    /// deeper input is refused the same way (not as serde_json's recursion limit).
    #[test]
    fn nesting_capped_at_max_depth() {
        let objects = |depth: usize| format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth));
        let arrays = |depth: usize| {
            format!(
                "{{\"a\":{}1{}}}",
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        assert_eq!(MAX_DEPTH, 32);
        parse_object(objects(32).as_bytes()).expect("32 deep");
        parse_object(arrays(32).as_bytes()).expect("32 deep");
        assert_eq!(err(&objects(33)), StrictJsonError::TooDeep);
        assert_eq!(err(&arrays(33)), StrictJsonError::TooDeep);
        assert_eq!(err(&objects(500)), StrictJsonError::TooDeep);
        assert_eq!(
            StrictJsonError::TooDeep.to_string(),
            "nested deeper than 32 levels"
        );
    }

    /// Not JSON and not an object are told apart from strictness failures.
    #[test]
    fn not_json_and_not_object() {
        for text in ["", "{", "{\"a\":1} x", "{'a':1}", "\u{0}"] {
            assert!(
                matches!(err(text), StrictJsonError::NotJson(_)),
                "{text:?}: {:?}",
                err(text)
            );
        }
        assert!(err("{\"a\":1,}").to_string().starts_with("not JSON: "));
        assert!(matches!(
            parse_object(b"\xff\xfe"),
            Err(StrictJsonError::NotJson(_))
        ));
        for text in ["[]", "1", "\"s\"", "null", "[{\"a\":1,\"a\":2}]"] {
            let e = err(text);
            // A duplicate inside a non-object top level is still a duplicate.
            if text.starts_with("[{") {
                assert_eq!(e, dup("a", "/0"));
            } else {
                assert_eq!(e, StrictJsonError::NotObject, "{text}");
                assert_eq!(e.to_string(), "not a JSON object");
            }
        }
    }
}
