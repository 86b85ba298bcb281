//! Hand-written: serde-saphyr's typing errors lack the found value and it rejects `moe:` (empty).
//!
//! A serde `Deserializer` over the untyped YAML tree. It types the tree into the config
//! structs (whose `deny_unknown_fields` and enums do the checking) and attaches to every
//! error the dotted key path and the origin (file position or `--set`) of the node at fault.

use crate::yaml_tree::{Key, Node, Origin, Value};
use serde::de::{
    self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Unexpected,
    Visitor,
};
use std::fmt;

/// What went wrong while typing, before it is placed.
#[derive(Debug, Clone, PartialEq)]
pub enum DeErrorKind {
    /// A key the schema does not have; `expected` lists the keys of that section.
    UnknownKey {
        key: String,
        expected: &'static [&'static str],
    },
    /// A value outside an enum; `expected` lists the valid ones.
    UnknownVariant {
        value: String,
        expected: &'static [&'static str],
    },
    /// A value of the wrong type or out of range: `must be {expected}, but it is {found}`.
    Mismatch { found: String, expected: String },
    /// Anything else serde reports.
    Other(String),
}

/// A typing error with the path and origin of the node it concerns.
#[derive(Debug, Clone, PartialEq)]
pub struct DeError {
    pub kind: DeErrorKind,
    /// Dotted key path (`moe.top_k`); empty for the top level.
    pub path: Option<String>,
    pub origin: Option<Origin>,
}

impl DeError {
    fn new(kind: DeErrorKind) -> Self {
        Self {
            kind,
            path: None,
            origin: None,
        }
    }

    /// Places the error at `origin`/`path` unless a deeper node already placed it.
    fn at(mut self, origin: &Origin, path: &str) -> Self {
        if self.origin.is_none() {
            self.origin = Some(origin.clone());
            self.path = Some(path.to_owned());
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self::new(DeErrorKind::Other(msg.to_string()))
    }
    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::new(DeErrorKind::Mismatch {
            found: describe_unexpected(&unexp),
            expected: describe_expected(&exp.to_string()),
        })
    }
    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Self::invalid_type(unexp, exp)
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Self::new(DeErrorKind::UnknownKey {
            key: field.to_owned(),
            expected,
        })
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Self::new(DeErrorKind::UnknownVariant {
            value: variant.to_owned(),
            expected,
        })
    }
}

fn describe_unexpected(u: &Unexpected<'_>) -> String {
    match u {
        Unexpected::Unit | Unexpected::Option => "null".to_owned(),
        Unexpected::Bool(b) => format!("the boolean {b}"),
        Unexpected::Signed(v) => format!("the integer {v}"),
        Unexpected::Unsigned(v) => format!("the integer {v}"),
        Unexpected::Float(v) => format!("the number {v}"),
        Unexpected::Str(s) => format!("the string {s:?}"),
        Unexpected::Seq => "a list".to_owned(),
        Unexpected::Map => "a mapping of keys".to_owned(),
        other => other.to_string(),
    }
}

/// Turns serde's type names into words a config author reads.
fn describe_expected(exp: &str) -> String {
    match exp {
        "u8" | "u16" | "u32" | "u64" | "usize" => "a whole number >= 0".to_owned(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".to_owned(),
        "f32" | "f64" => "a number".to_owned(),
        "a boolean" => "true or false".to_owned(),
        "path string" => "a path".to_owned(),
        s if s.starts_with("struct ") => "a section (a mapping of keys)".to_owned(),
        s => s.to_owned(),
    }
}

fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b, _) => Unexpected::Bool(*b),
        Value::I64(v, _) => Unexpected::Signed(*v),
        Value::U64(v, _) => Unexpected::Unsigned(*v),
        Value::F64(v, _) => Unexpected::Float(*v),
        Value::Str(s) => Unexpected::Str(s),
        Value::Seq(_) => Unexpected::Seq,
        Value::Map(_) => Unexpected::Map,
    }
}

/// Deserializes `T` from the tree rooted at `root`.
pub fn from_tree<'de, T: de::Deserialize<'de>>(root: &Node) -> Result<T, DeError> {
    T::deserialize(NodeDe {
        node: root,
        path: String::new(),
    })
}

/// Deserializer for one node at a dotted path.
struct NodeDe<'a> {
    node: &'a Node,
    path: String,
}

impl<'a> NodeDe<'a> {
    fn place<T>(&self, r: Result<T, DeError>) -> Result<T, DeError> {
        r.map_err(|e| e.at(&self.node.origin, &self.path))
    }

    fn any<'de, V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, DeError> {
        match &self.node.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b, _) => visitor.visit_bool(*b),
            Value::I64(v, _) => visitor.visit_i64(*v),
            Value::U64(v, _) => visitor.visit_u64(*v),
            Value::F64(v, _) => visitor.visit_f64(*v),
            Value::Str(s) => visitor.visit_str(s),
            Value::Seq(items) => visitor.visit_seq(SeqDe {
                items: items.iter(),
                path: &self.path,
                index: 0,
            }),
            Value::Map(entries) => visitor.visit_map(MapDe {
                entries: entries.iter(),
                path: &self.path,
                pending: None,
            }),
        }
    }
}

impl<'de, 'a> Deserializer<'de> for NodeDe<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = self.any(visitor);
        self.place(r)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match self.node.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(NodeDe {
                node: self.node,
                path: self.path.clone(),
            }),
        };
        self.place(r)
    }

    /// A YAML scalar is text to a string-typed key: `name: 007` is the name "007".
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Bool(_, t) | Value::I64(_, t) | Value::U64(_, t) | Value::F64(_, t) => {
                visitor.visit_str(t)
            }
            _ => self.any(visitor),
        };
        self.place(r)
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_map(visitor)
    }

    /// An empty section (`moe:` with nothing under it) is null in YAML; it means "all defaults".
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Null => visitor.visit_map(MapDe {
                entries: [].iter(),
                path: &self.path,
                pending: None,
            }),
            Value::Map(_) => self.any(visitor),
            other => Err(de::Error::invalid_type(unexpected(other), &visitor)),
        };
        self.place(r)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let r = match &self.node.value {
            Value::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            other => Err(DeError::new(DeErrorKind::Mismatch {
                found: describe_unexpected(&unexpected(other)),
                expected: format!("one of: {}", variants.join(", ")),
            })),
        };
        self.place(r)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, DeError> {
        let path = self.path.clone();
        let r = visitor.visit_newtype_struct(NodeDe {
            node: self.node,
            path,
        });
        self.place(r)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor.visit_unit()
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char bytes byte_buf unit
        unit_struct seq tuple tuple_struct identifier
    }
}

/// Deserializer for a mapping key: only ever asked for an identifier (a field name).
struct KeyDe<'a> {
    key: &'a Key,
    path: String,
}

impl<'de, 'a> Deserializer<'de> for KeyDe<'a> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, DeError> {
        visitor
            .visit_str(&self.key.name)
            .map_err(|e: DeError| e.at(&self.key.origin, &self.path))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct MapDe<'a> {
    entries: std::slice::Iter<'a, (Key, Node)>,
    path: &'a str,
    pending: Option<(&'a Node, String)>,
}

impl<'de, 'a> MapAccess<'de> for MapDe<'a> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((key, node)) = self.entries.next() else {
            return Ok(None);
        };
        let path = child_path(self.path, &key.name);
        self.pending = Some((node, path.clone()));
        seed.deserialize(KeyDe { key, path }).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        match self.pending.take() {
            Some((node, path)) => seed.deserialize(NodeDe { node, path }),
            None => Err(de::Error::custom("a mapping value was read before its key")),
        }
    }
}

struct SeqDe<'a> {
    items: std::slice::Iter<'a, Node>,
    path: &'a str,
    index: usize,
}

impl<'de, 'a> SeqAccess<'de> for SeqDe<'a> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        let Some(node) = self.items.next() else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.index);
        self.index += 1;
        seed.deserialize(NodeDe { node, path }).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml_tree::parse;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        count: u64,
        rate: f64,
        name: String,
        limit: Option<f64>,
        mode: Mode,
    }

    impl Default for Inner {
        fn default() -> Self {
            Self {
                count: 1,
                rate: 0.5,
                name: "n".into(),
                limit: Some(1.0),
                mode: Mode::Fast,
            }
        }
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "snake_case")]
    enum Mode {
        Fast,
        Slow,
    }

    #[derive(Debug, Deserialize, PartialEq, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Root {
        inner: Inner,
    }

    fn load(text: &str) -> Result<Root, DeError> {
        from_tree(&parse(text, None).unwrap())
    }

    #[test]
    fn types_values_and_keeps_defaults() {
        let r = load("inner:\n  count: 3\n  rate: 2\n  name: 007\n  limit: null\n  mode: slow\n")
            .unwrap();
        assert_eq!(
            r.inner,
            Inner {
                count: 3,
                rate: 2.0,
                name: "007".into(),
                limit: None,
                mode: Mode::Slow
            }
        );
        assert_eq!(load("inner:\n").unwrap(), Root::default());
    }

    #[test]
    fn unknown_key_is_placed_at_the_key() {
        let e = load("inner:\n  count: 3\n  cuont: 4\n").unwrap_err();
        assert_eq!(e.path.as_deref(), Some("inner.cuont"));
        assert_eq!(e.origin, Some(Origin::File { line: 3, column: 3 }));
        assert!(
            matches!(e.kind, DeErrorKind::UnknownKey { ref key, expected }
            if key == "cuont" && expected.contains(&"count"))
        );
    }

    #[test]
    fn wrong_type_and_bad_enum_are_placed_at_the_value() {
        let e = load("inner:\n  count: ten\n").unwrap_err();
        assert_eq!(e.path.as_deref(), Some("inner.count"));
        assert_eq!(
            e.origin,
            Some(Origin::File {
                line: 2,
                column: 10
            })
        );
        assert_eq!(
            e.kind,
            DeErrorKind::Mismatch {
                found: "the string \"ten\"".into(),
                expected: "a whole number >= 0".into()
            }
        );
        let e = load("inner:\n  count: -2\n").unwrap_err();
        assert!(
            matches!(e.kind, DeErrorKind::Mismatch { ref found, .. } if found == "the integer -2")
        );
        let e = load("inner:\n  mode: medium\n").unwrap_err();
        assert_eq!(e.path.as_deref(), Some("inner.mode"));
        assert_eq!(
            e.kind,
            DeErrorKind::UnknownVariant {
                value: "medium".into(),
                expected: &["fast", "slow"]
            }
        );
        let e = load("inner: 3\n").unwrap_err();
        assert_eq!(e.path.as_deref(), Some("inner"));
        assert!(
            matches!(e.kind, DeErrorKind::Mismatch { ref expected, .. } if expected.contains("section"))
        );
    }
}
