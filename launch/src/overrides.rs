//! Hand-written: no crate merges a dotted `KEY=VALUE` into a YAML tree that keeps origins.
//!
//! `--set a.b=v` overrides: parsed into a key path and a YAML value, and applied to the
//! untyped tree before typing, so the override obeys exactly the rules of the file
//! (`--set moe.capacity_factor=null`, `--set trainer.lr=1e-3`, `--set run.name=x`).

use crate::yaml_tree::{self, Key, Node, Origin, ParseError, Value};

/// One parsed `--set KEY=VALUE`.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as given, quoted in every error about it.
    pub raw: String,
    /// `moe.top_k` -> `["moe", "top_k"]`.
    pub path: Vec<String>,
    /// The value, parsed as a YAML scalar (or flow collection); empty text is null.
    pub value: Node,
}

/// Parses `KEY=VALUE`; the error is a sentence without the `--set` prefix.
pub fn parse_override(raw: &str) -> Result<Override, String> {
    let Some((key, text)) = raw.split_once('=') else {
        return Err(
            "expected KEY=VALUE with a dotted key, e.g. --set trainer.max_steps=100".to_owned(),
        );
    };
    let key = key.trim();
    let path: Vec<String> = key.split('.').map(str::to_owned).collect();
    let valid_segment =
        |s: &String| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if key.is_empty() || !path.iter().all(valid_segment) {
        return Err(format!(
            "the key `{key}` is not a dotted key path like `trainer.max_steps`"
        ));
    }
    let origin = Origin::Override(raw.to_owned());
    let value = match yaml_tree::parse(text, Some(&origin)) {
        Ok(node) => node,
        Err(ParseError::Empty) => Node {
            value: Value::Null,
            origin,
        },
        Err(ParseError::Syntax { msg, .. }) => {
            return Err(format!("the value `{text}` is not valid YAML: {msg}"));
        }
    };
    Ok(Override {
        raw: raw.to_owned(),
        path,
        value,
    })
}

/// Writes the override into the tree, creating missing sections. Whether the key exists in
/// the schema is decided later, by typing, which reports unknown keys with this override's
/// text as their origin.
pub fn apply(tree: &mut Node, ov: &Override) -> Result<(), String> {
    let origin = Origin::Override(ov.raw.clone());
    let mut node = tree;
    for (i, seg) in ov.path.iter().enumerate() {
        if node.value == Value::Null {
            node.value = Value::Map(Vec::new());
        }
        let Value::Map(entries) = &mut node.value else {
            return Err(format!(
                "`{}` is a value, not a section, so it has no key `{seg}`",
                ov.path[..i].join(".")
            ));
        };
        let idx = match entries.iter().position(|(k, _)| &k.name == seg) {
            Some(idx) => idx,
            None => {
                entries.push((
                    Key {
                        name: seg.clone(),
                        origin: origin.clone(),
                    },
                    Node {
                        value: Value::Null,
                        origin: origin.clone(),
                    },
                ));
                entries.len() - 1
            }
        };
        node = &mut entries[idx].1;
    }
    *node = ov.value.clone();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(raw: &str) -> Value {
        parse_override(raw).unwrap().value.value
    }

    #[test]
    fn values_are_yaml_scalars() {
        assert_eq!(value_of("moe.capacity_factor=null"), Value::Null);
        assert_eq!(value_of("moe.capacity_factor=~"), Value::Null);
        assert_eq!(value_of("moe.capacity_factor="), Value::Null);
        assert_eq!(value_of("trainer.lr=1e-3"), Value::F64(1e-3, "1e-3".into()));
        assert_eq!(
            value_of("trainer.max_steps=100"),
            Value::U64(100, "100".into())
        );
        assert_eq!(value_of("run.name=x"), Value::Str("x".into()));
        assert_eq!(
            value_of("model.tie_embeddings=true"),
            Value::Bool(true, "true".into())
        );
        // Quoting keeps a number a string, as in the file.
        assert_eq!(value_of("run.name=\"42\""), Value::Str("42".into()));
        // Only the first '=' separates key and value.
        assert_eq!(value_of("run.name=a=b"), Value::Str("a=b".into()));
    }

    #[test]
    fn key_path_and_origin() {
        let ov = parse_override("moe.top_k=4").unwrap();
        assert_eq!(ov.path, vec!["moe", "top_k"]);
        assert_eq!(ov.value.origin, Origin::Override("moe.top_k=4".into()));
        assert_eq!(
            parse_override(" run.seed =7").unwrap().path,
            vec!["run", "seed"]
        );
    }

    #[test]
    fn malformed_overrides_are_rejected() {
        assert!(parse_override("trainer.max_steps")
            .unwrap_err()
            .contains("KEY=VALUE"));
        for bad in ["=3", "moe..top_k=3", ".moe=3", "moe.top k=3", "moe.=1"] {
            let e = parse_override(bad).unwrap_err();
            assert!(e.contains("not a dotted key path"), "{bad}: {e}");
        }
        assert!(parse_override("run.name=[1,")
            .unwrap_err()
            .contains("not valid YAML"));
    }

    #[test]
    fn apply_replaces_inserts_and_creates_sections() {
        let mut tree = yaml_tree::parse("moe:\n  top_k: 2\nrun:\n", None).unwrap();
        for raw in [
            "moe.top_k=4",
            "trainer.max_steps=9",
            "run.name=x",
            "moe.top_k=5",
        ] {
            apply(&mut tree, &parse_override(raw).unwrap()).unwrap();
        }
        let (key_origin, node) = tree.lookup("moe.top_k").unwrap();
        // The key was in the file; the value came from the last override.
        assert_eq!(*key_origin, Origin::File { line: 2, column: 3 });
        assert_eq!(node.value, Value::U64(5, "5".into()));
        assert_eq!(node.origin, Origin::Override("moe.top_k=5".into()));
        let (key_origin, _) = tree.lookup("trainer.max_steps").unwrap();
        assert_eq!(*key_origin, Origin::Override("trainer.max_steps=9".into()));
        assert_eq!(
            tree.lookup("run.name").unwrap().1.value,
            Value::Str("x".into())
        );
    }

    #[test]
    fn apply_below_a_value_is_an_error() {
        let mut tree = yaml_tree::parse("run:\n  name: a\n", None).unwrap();
        let e = apply(&mut tree, &parse_override("run.name.x=1").unwrap()).unwrap_err();
        assert!(e.contains("`run.name` is a value, not a section"), "{e}");
    }
}
