//! `moe config-reference`: the config reference (docs/config-reference.md), generated from
//! the schema's doc comments (read from the two config sources at compile time) and the
//! defaults of its `Default` impls. It refuses to render if a key lacks a doc comment or the
//! sources and the serialised defaults disagree on the keys, so the page cannot drift.

use anyhow::{anyhow, bail, Context};
use moe_trainer::config::ExperimentConfig;
use std::collections::HashMap;
use std::fmt::Write;

const SOURCES: [(&str, &str); 2] = [
    (
        "model/src/config.rs",
        include_str!("../../model/src/config.rs"),
    ),
    (
        "trainer/src/config.rs",
        include_str!("../../trainer/src/config.rs"),
    ),
];

/// A documented item: a struct field or an enum variant.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    name: String,
    ty: String,
    doc: String,
}

#[derive(Debug, Default)]
struct Schema {
    /// Struct name -> (doc, fields in source order).
    structs: HashMap<String, (String, Vec<Item>)>,
    /// Enum name -> variants (serde snake_case names) in source order.
    enums: HashMap<String, Vec<Item>>,
}

/// Reads `pub struct`/`pub enum` bodies and their `///` comments from Rust source.
fn parse_schema(sources: &[(&str, &str)]) -> Schema {
    let mut schema = Schema::default();
    for (_, src) in sources {
        let mut doc: Vec<String> = Vec::new();
        // (is_enum, name, doc, items) of the body being read.
        let mut open: Option<(bool, String, String, Vec<Item>)> = None;
        for line in src.lines() {
            let t = line.trim();
            if let Some(d) = t.strip_prefix("///") {
                doc.push(d.trim().to_owned());
                continue;
            }
            if t.starts_with("#[") {
                continue;
            }
            let text = doc.join(" ");
            doc.clear();
            if let Some((is_enum, name, sdoc, items)) = &mut open {
                if line.starts_with('}') {
                    let (is_enum, name, sdoc, items) =
                        (*is_enum, name.clone(), sdoc.clone(), std::mem::take(items));
                    if is_enum {
                        schema.enums.insert(name, items);
                    } else {
                        schema.structs.insert(name, (sdoc, items));
                    }
                    open = None;
                } else if *is_enum {
                    if let Some(v) = t.strip_suffix(',').filter(|v| is_ident(v)) {
                        items.push(Item {
                            name: snake_case(v),
                            ty: String::new(),
                            doc: text,
                        });
                    }
                } else if let Some((field, ty)) = t
                    .strip_prefix("pub ")
                    .and_then(|f| f.strip_suffix(','))
                    .and_then(|f| f.split_once(": "))
                {
                    items.push(Item {
                        name: field.to_owned(),
                        ty: ty.to_owned(),
                        doc: text,
                    });
                }
                continue;
            }
            for (prefix, is_enum) in [("pub struct ", false), ("pub enum ", true)] {
                if let Some(name) = t.strip_prefix(prefix).and_then(|r| r.strip_suffix(" {")) {
                    open = Some((is_enum, name.to_owned(), text.clone(), Vec::new()));
                }
            }
        }
    }
    schema
}

fn is_ident(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && s.chars().all(|c| c.is_ascii_alphanumeric())
}

/// serde's `rename_all = "snake_case"` for variant names.
fn snake_case(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn type_words(ty: &str, schema: &Schema) -> String {
    if let Some(inner) = ty.strip_prefix("Option<").and_then(|t| t.strip_suffix('>')) {
        return format!("{} or null", type_words(inner, schema));
    }
    match ty {
        "i64" => "integer".to_owned(),
        "u64" | "usize" => "integer >= 0".to_owned(),
        "f64" => "number".to_owned(),
        "bool" => "bool".to_owned(),
        "String" => "string".to_owned(),
        "PathBuf" => "path".to_owned(),
        other => match schema.enums.get(other) {
            Some(vs) => vs
                .iter()
                .map(|v| format!("`{}`", v.name))
                .collect::<Vec<_>>()
                .join(" \\| "),
            None => other.to_owned(),
        },
    }
}

fn default_words(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "`null`".to_owned(),
        serde_json::Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The table rows of `fields` under the dotted `prefix`, with their defaults from `sdef`; a
/// field whose type is itself a documented struct (e.g. `model.attention`) is expanded into
/// one row per sub-key. Enum choices are appended to `choices`.
fn rows(
    out: &mut String,
    choices: &mut String,
    schema: &Schema,
    prefix: &str,
    fields: &[Item],
    sdef: &serde_json::Map<String, serde_json::Value>,
) -> anyhow::Result<()> {
    for f in fields {
        let key = format!("{prefix}.{}", f.name);
        if f.doc.is_empty() {
            bail!("{key} has no doc comment");
        }
        if let Some((_, sub)) = schema.structs.get(&f.ty) {
            let subdef = sdef
                .get(&f.name)
                .and_then(|v| v.as_object())
                .ok_or_else(|| anyhow!("{key} missing from the default config"))?;
            let mut want: Vec<&str> = sub.iter().map(|i| i.name.as_str()).collect();
            let mut have: Vec<&str> = subdef.keys().map(String::as_str).collect();
            want.sort_unstable();
            have.sort_unstable();
            if want != have {
                bail!("{key}: the source declares {want:?} but the default config has {have:?}");
            }
            rows(out, choices, schema, &key, sub, subdef)?;
            continue;
        }
        let default = sdef.get(&f.name).map(default_words).unwrap_or_default();
        // Unsigned fields whose doc says "at least 1" are validated as such.
        let mut ty = type_words(&f.ty, schema);
        if ty == "integer >= 0" && f.doc.to_lowercase().contains("at least 1") {
            ty = "integer >= 1".to_owned();
        }
        writeln!(
            out,
            "| `{key}` | {} | {} | {} |",
            ty,
            cell(&default),
            cell(&f.doc)
        )?;
        if let Some(variants) = schema.enums.get(&f.ty) {
            writeln!(choices, "\n`{key}`:")?;
            for v in variants {
                writeln!(choices, "- `{}`: {}", v.name, v.doc)?;
            }
        }
    }
    Ok(())
}

/// The Markdown page.
pub fn render() -> anyhow::Result<String> {
    let schema = parse_schema(&SOURCES);
    let defaults = serde_json::to_value(ExperimentConfig::default())
        .context("serialising the default config")?;
    let (_, sections) = schema
        .structs
        .get("ExperimentConfig")
        .ok_or_else(|| anyhow!("ExperimentConfig not found in the config sources"))?;
    let mut out = String::new();
    out.push_str(
        "# Config reference\n\n\
         <!-- Generated by `moe config-reference` from the doc comments in model/src/config.rs \
         and trainer/src/config.rs; launch/tests/shipped_configs.rs fails when it is stale. \
         Regenerate: cargo run --release -p moe-launch -- config-reference > docs/config-reference.md -->\n\n\
         An experiment is one YAML file with the sections below. Every key has a default, so a \
         config names only what it changes; unknown keys are errors. Any key can be overridden \
         on the command line, e.g. `--set trainer.max_steps=100` or \
         `--set moe.capacity_factor=null` (the value is read as YAML). \
         `moe check --config FILE` prints the resolved config.\n",
    );
    for section in sections {
        let (sdoc, fields) = schema
            .structs
            .get(&section.ty)
            .ok_or_else(|| anyhow!("struct {} not found in the config sources", section.ty))?;
        let sdef = defaults
            .get(&section.name)
            .and_then(|v| v.as_object())
            .ok_or_else(|| anyhow!("section {} missing from the default config", section.name))?;
        let schema_keys: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
        let serde_keys: Vec<&str> = sdef.keys().map(String::as_str).collect();
        let mut sorted = (schema_keys.clone(), serde_keys.clone());
        sorted.0.sort_unstable();
        sorted.1.sort_unstable();
        if sorted.0 != sorted.1 {
            bail!(
                "section {}: the source declares {schema_keys:?} but the default config has {serde_keys:?}",
                section.name
            );
        }
        write!(out, "\n## `{}`\n\n{}\n\n", section.name, sdoc)?;
        out.push_str("| key | type | default | meaning |\n|---|---|---|---|\n");
        let mut choices = String::new();
        rows(&mut out, &mut choices, &schema, &section.name, fields, sdef)?;
        out.push_str(&choices);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snake_case_matches_serde() {
        assert_eq!(snake_case("AuxLoss"), "aux_loss");
        assert_eq!(snake_case("SeqAuxLoss"), "seq_aux_loss");
        assert_eq!(snake_case("Fp32"), "fp32");
        assert_eq!(snake_case("Bf16"), "bf16");
    }

    #[test]
    fn parses_fields_docs_and_variants() {
        let src = "/// A section.\n#[derive(Debug)]\npub struct S {\n    /// First line\n    /// second line.\n    pub a: Option<i64>,\n    pub b: Mode,\n}\n\
                   pub enum Mode {\n    /// Go fast.\n    FastMode,\n    Slow,\n}\n";
        let schema = parse_schema(&[("x.rs", src)]);
        let (doc, fields) = &schema.structs["S"];
        assert_eq!(doc, "A section.");
        assert_eq!(
            fields[0],
            Item {
                name: "a".into(),
                ty: "Option<i64>".into(),
                doc: "First line second line.".into()
            }
        );
        assert_eq!(fields[1].doc, "");
        let modes: Vec<_> = schema.enums["Mode"]
            .iter()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(modes, ["fast_mode", "slow"]);
        assert_eq!(
            type_words("Option<Mode>", &schema),
            "`fast_mode` \\| `slow` or null"
        );
    }

    #[test]
    fn every_key_is_documented_and_enum_defaults_are_listed_values() {
        let page = render().unwrap();
        let defaults = serde_json::to_value(ExperimentConfig::default()).unwrap();
        for (section, keys) in defaults.as_object().unwrap() {
            for (key, v) in keys.as_object().unwrap() {
                // A nested struct (model.attention) has one row per sub-key.
                let subs: Vec<String> = match v.as_object() {
                    Some(m) => m.keys().map(|s| format!("{key}.{s}")).collect(),
                    None => vec![key.clone()],
                };
                for key in subs {
                    assert!(
                        page.contains(&format!("| `{section}.{key}` |")),
                        "{section}.{key}"
                    );
                }
            }
        }
        let schema = parse_schema(&SOURCES);
        assert_eq!(schema.enums["AuxLossKind"].len(), 3);
        let aux: Vec<_> = schema.enums["AuxLossKind"]
            .iter()
            .map(|v| v.name.clone())
            .collect();
        assert_eq!(aux, ["aux_loss", "seq_aux_loss", "none"]);
    }
}
