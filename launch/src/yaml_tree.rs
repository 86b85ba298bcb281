//! Hand-written: serde-saphyr has spans (`Spanned`) but no YAML tree to merge `--set` into.
//!
//! An untyped YAML tree that remembers where every key and value came from: a line and
//! column of the config file, or a `--set` override. Overrides are applied to this tree
//! before it is typed (see `tree_de`), so a typing error can point at either source.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};
use std::fmt;

/// Where a key or value was written.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// 1-based line and column in the config file.
    File { line: u64, column: u64 },
    /// The text of the `--set KEY=VALUE` override that wrote it.
    Override(String),
}

/// A mapping key and where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub origin: Origin,
}

/// One YAML node with its origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub value: Value,
    pub origin: Origin,
}

/// The YAML value of a node, with scalars already resolved by the YAML 1.2 core schema.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A boolean, integer or float, with the text it was written as (`1e-3`, `007`), so that
    /// a string-typed key given a number keeps exactly what the user wrote.
    Bool(bool, String),
    I64(i64, String),
    U64(u64, String),
    F64(f64, String),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

impl Node {
    /// A node whose origin is the override `raw` (and every node below it).
    fn with_origin(mut self, origin: &Origin) -> Node {
        self.origin = origin.clone();
        match &mut self.value {
            Value::Seq(items) => {
                *items = std::mem::take(items)
                    .into_iter()
                    .map(|n| n.with_origin(origin))
                    .collect();
            }
            Value::Map(entries) => {
                *entries = std::mem::take(entries)
                    .into_iter()
                    .map(|(k, n)| {
                        (
                            Key {
                                name: k.name,
                                origin: origin.clone(),
                            },
                            n.with_origin(origin),
                        )
                    })
                    .collect();
            }
            _ => {}
        }
        self
    }

    /// The node at a dotted path (`moe.top_k`), if the tree has it, with its key's origin.
    pub fn lookup(&self, dotted: &str) -> Option<(&Origin, &Node)> {
        let mut node = self;
        let mut origin = None;
        for seg in dotted.split('.') {
            let Value::Map(entries) = &node.value else {
                return None;
            };
            let (k, child) = entries.iter().find(|(k, _)| k.name == seg)?;
            origin = Some(&k.origin);
            node = child;
        }
        origin.map(|o| (o, node))
    }
}

/// Why a YAML text could not become a tree.
#[derive(Debug)]
pub enum ParseError {
    /// The text holds no YAML document (empty, or only comments).
    Empty,
    /// Malformed YAML; line and column are 1-based, 0 when the parser gave none.
    Syntax { line: u64, column: u64, msg: String },
}

/// Parses one YAML document into a tree; `origin_override` marks every node as written by
/// that `--set` (and then the file positions inside the value text are meaningless).
pub fn parse(text: &str, origin_override: Option<&Origin>) -> Result<Node, ParseError> {
    let opts = serde_saphyr::Options::default();
    let raw: Option<Spanned<Raw>> =
        serde_saphyr::from_str_with_options(text, opts).map_err(|e| syntax_error(&e))?;
    let raw = raw.ok_or(ParseError::Empty)?;
    let node = convert(raw, text);
    Ok(match origin_override {
        Some(o) => node.with_origin(o),
        None => node,
    })
}

fn syntax_error(e: &serde_saphyr::Error) -> ParseError {
    use serde_saphyr::MessageFormatter;
    let inner = e.without_snippet();
    let mut msg = serde_saphyr::DefaultMessageFormatter
        .format_message(inner)
        .into_owned();
    // The parser's hint is addressed to programmers using the library, not to config authors.
    if let Some(i) = msg.find(", set DuplicateKeyPolicy") {
        msg.truncate(i);
    }
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    ParseError::Syntax { line, column, msg }
}

fn origin_of(loc: &Location) -> Origin {
    Origin::File {
        line: loc.line(),
        column: loc.column(),
    }
}

/// The source text of a scalar, when the parser recorded its byte range.
fn source_text(loc: &Location, text: &str) -> Option<String> {
    let span = loc.span();
    let start = usize::try_from(span.byte_offset()?).ok()?;
    let len = usize::try_from(span.byte_len()?).ok()?;
    text.get(start..start.checked_add(len)?).map(str::to_owned)
}

fn convert(raw: Spanned<Raw>, text: &str) -> Node {
    let origin = origin_of(&raw.referenced);
    let src = |fallback: String| source_text(&raw.referenced, text).unwrap_or(fallback);
    let value = match raw.value {
        Raw::Null => Value::Null,
        Raw::Bool(b) => Value::Bool(b, src(b.to_string())),
        Raw::I64(v) => Value::I64(v, src(v.to_string())),
        Raw::U64(v) => Value::U64(v, src(v.to_string())),
        Raw::F64(v) => Value::F64(v, src(v.to_string())),
        Raw::Str(s) => Value::Str(s),
        Raw::Seq(items) => Value::Seq(items.into_iter().map(|n| convert(n, text)).collect()),
        Raw::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    (
                        Key {
                            origin: origin_of(&k.referenced),
                            name: k.value,
                        },
                        convert(v, text),
                    )
                })
                .collect(),
        ),
    };
    Node { value, origin }
}

/// What serde-saphyr gives us: a self-describing value with spans on every node and key.
enum Raw {
    Null,
    Bool(bool),
    I64(i64),
    U64(u64),
    F64(f64),
    Str(String),
    Seq(Vec<Spanned<Raw>>),
    Map(Vec<(Spanned<String>, Spanned<Raw>)>),
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_none<E>(self) -> Result<Raw, E> {
        Ok(Raw::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
        Raw::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Raw, E> {
        Ok(Raw::I64(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::U64(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::F64(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
        let mut items = Vec::new();
        while let Some(x) = a.next_element()? {
            items.push(x);
        }
        Ok(Raw::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Raw, A::Error> {
        let mut entries = Vec::new();
        while let Some(e) = a.next_entry()? {
            entries.push(e);
        }
        Ok(Raw::Map(entries))
    }
}
