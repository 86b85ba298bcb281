//! `moe config-reference`: the config reference (docs/config-reference.md), generated from
//! the schema `schemars` derives from the config types (their doc comments and types) and the
//! defaults of their `Default` impls, in the order the fields are declared (the order serde
//! writes them). It refuses to render if a key lacks a doc comment or the schema and the
//! serialised defaults disagree on the keys, so the page cannot drift.

use crate::yaml_tree::{self, Node, Value as Yaml};
use anyhow::{anyhow, bail, Context};
use moe_trainer::config::ExperimentConfig;
use serde_json::{Map, Value};
use std::fmt::Write;

/// The schema's `$defs`, where every named config type lives.
struct Defs<'a>(&'a Map<String, Value>);

impl<'a> Defs<'a> {
    /// `schema`, or the definition its `$ref` names.
    fn resolve(&self, schema: &'a Value) -> &'a Value {
        schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .and_then(|name| self.0.get(name))
            .unwrap_or(schema)
    }

    /// The variants (name, doc) of an enum schema, in declaration order.
    fn variants(&self, schema: &'a Value) -> Option<Vec<(String, String)>> {
        let s = self.resolve(schema);
        if let Some(names) = s.get("enum").and_then(Value::as_array) {
            let names = names.iter().filter_map(Value::as_str);
            return Some(names.map(|n| (n.to_owned(), String::new())).collect());
        }
        let one_of = s.get("oneOf")?.as_array()?;
        one_of
            .iter()
            .map(|v| {
                let name = v.get("const").or_else(|| v.get("enum")?.get(0))?.as_str()?;
                Some((name.to_owned(), doc(v)))
            })
            .collect()
    }

    /// The table's type column: `integer >= 0`, `number or null`, `` `a` \| `b` ``, ...
    fn type_words(&self, schema: &'a Value) -> String {
        if let Some(any_of) = schema.get("anyOf").and_then(Value::as_array) {
            let (nulls, others): (Vec<&Value>, Vec<&Value>) = any_of
                .iter()
                .partition(|s| s.get("type").and_then(Value::as_str) == Some("null"));
            let words: Vec<String> = others.iter().map(|s| self.type_words(s)).collect();
            let null = if nulls.is_empty() { "" } else { " or null" };
            return format!("{}{null}", words.join(" or "));
        }
        if let Some(vs) = self.variants(schema) {
            let names: Vec<String> = vs.iter().map(|(n, _)| format!("`{n}`")).collect();
            return names.join(" \\| ");
        }
        if self.resolve(schema).get("type").and_then(Value::as_str) == Some("object") {
            // A nested section given as one value (e.g. `trainer.distill`).
            return "mapping".into();
        }
        let types: Vec<&str> = match schema.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let format = schema.get("format").and_then(Value::as_str).unwrap_or("");
        let words: Vec<&str> = types
            .iter()
            .filter(|t| **t != "null")
            .map(|t| match *t {
                "integer" if format.starts_with("uint") => "integer >= 0",
                "boolean" => "bool",
                "string" if format == "path" => "path",
                other => other,
            })
            .collect();
        let null = if types.contains(&"null") {
            " or null"
        } else {
            ""
        };
        format!("{}{null}", words.join(" or "))
    }
}

/// A doc comment as one line (schemars keeps the comment's line breaks).
fn doc(schema: &Value) -> String {
    let text = schema.get("description").and_then(Value::as_str);
    let lines: Vec<&str> = text.unwrap_or("").lines().map(str::trim).collect();
    lines.join(" ")
}

/// The keys of a mapping node, in the order they were written.
fn keys(node: &Node) -> Vec<&str> {
    match &node.value {
        Yaml::Map(entries) => entries.iter().map(|(k, _)| k.name.as_str()).collect(),
        _ => Vec::new(),
    }
}

fn default_words(v: &Value) -> String {
    match v {
        Value::Null => "`null`".to_owned(),
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

/// The table rows of the struct schema `def` under the dotted `prefix`, in the order of the
/// default config's node `order`, with defaults from `sdef`; a field whose type is itself a
/// struct (e.g. `model.attention`) is expanded into one row per sub-key. Enum choices are
/// appended to `choices`.
fn rows(
    out: &mut String,
    choices: &mut String,
    defs: &Defs,
    prefix: &str,
    def: &Value,
    order: &Node,
    sdef: &Map<String, Value>,
) -> anyhow::Result<()> {
    let props = def
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{prefix} is not a section in the schema"))?;
    let mut want: Vec<&str> = props.keys().map(String::as_str).collect();
    let mut have = keys(order);
    want.sort_unstable();
    have.sort_unstable();
    if want != have {
        bail!("{prefix}: the schema declares {want:?} but the default config has {have:?}");
    }
    for name in keys(order) {
        let key = format!("{prefix}.{name}");
        let prop = &props[name];
        let text = doc(prop);
        if text.is_empty() {
            bail!("{key} has no doc comment");
        }
        let resolved = defs.resolve(prop);
        if resolved.get("properties").is_some() {
            let sub = order.lookup(name).map(|(_, n)| n);
            let subdef = sdef.get(name).and_then(Value::as_object);
            let (Some(sub), Some(subdef)) = (sub, subdef) else {
                bail!("{key} missing from the default config");
            };
            rows(out, choices, defs, &key, resolved, sub, subdef)?;
            continue;
        }
        let default = sdef.get(name).map(default_words).unwrap_or_default();
        // Unsigned fields whose doc says "at least 1" are validated as such.
        let mut ty = defs.type_words(prop);
        if ty == "integer >= 0" && text.to_lowercase().contains("at least 1") {
            ty = "integer >= 1".to_owned();
        }
        writeln!(
            out,
            "| `{key}` | {ty} | {} | {} |",
            cell(&default),
            cell(&text)
        )?;
        if let Some(variants) = defs.variants(prop) {
            writeln!(choices, "\n`{key}`:")?;
            for (v, vdoc) in variants {
                writeln!(choices, "- `{v}`: {vdoc}")?;
            }
        }
    }
    Ok(())
}

/// The Markdown page.
pub fn render() -> anyhow::Result<String> {
    let schema = serde_json::to_value(schemars::schema_for!(ExperimentConfig))?;
    let empty = Map::new();
    let defs = Defs(
        schema
            .get("$defs")
            .and_then(Value::as_object)
            .unwrap_or(&empty),
    );
    let default = ExperimentConfig::default();
    let defaults = serde_json::to_value(&default).context("serialising the default config")?;
    // serde writes struct fields in declaration order; the YAML tree keeps that order.
    let order = yaml_tree::parse(&crate::config_load::to_yaml(&default)?, None)
        .map_err(|e| anyhow!("re-reading the default config: {e:?}"))?;
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
    let sections = schema
        .get("properties")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("the config schema has no sections"))?;
    for name in keys(&order) {
        let def = defs.resolve(
            sections
                .get(name)
                .ok_or_else(|| anyhow!("section {name} missing from the schema"))?,
        );
        let sdef = defaults
            .get(name)
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("section {name} missing from the default config"))?;
        let section = order.lookup(name).map(|(_, n)| n);
        let section = section.ok_or_else(|| anyhow!("section {name} missing from the tree"))?;
        write!(out, "\n## `{name}`\n\n{}\n\n", doc(def))?;
        out.push_str("| key | type | default | meaning |\n|---|---|---|---|\n");
        let mut choices = String::new();
        rows(&mut out, &mut choices, &defs, name, def, section, sdef)?;
        out.push_str(&choices);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Declaration order, an enum's choices in order, an Option, a path and a doc comment
        // of several lines joined into one cell.
        let run = page.find("| `run.name` |").unwrap();
        assert!(run < page.find("| `run.out_dir` | path |").unwrap());
        assert!(page.contains("\n`moe.aux_loss`:\n- `aux_loss`: "), "{page}");
        assert!(page.contains("| `model.head_dim` | integer or null | `null` |"));
        assert!(page.contains("| `trainer.precision` | `fp32` \\| `bf16` | `fp32` |"));
    }
}
