//! Loading an experiment config: read the YAML file, apply `--set` overrides to the untyped
//! tree, type it into `ExperimentConfig` (unknown keys rejected), then check the cross-field
//! rules. Every failure is a `ConfigError` whose text is one paragraph naming the file, the
//! line and column (or the `--set` that wrote the value) and the dotted key.

use crate::overrides::{self, Override};
use crate::suggest;
use crate::tree_de::{self, DeError, DeErrorKind};
use crate::yaml_tree::{self, Node, Origin, ParseError};
use moe_trainer::config::ExperimentConfig;
use std::fmt;
use std::path::{Path, PathBuf};

/// A config the user must fix; the binary prints it as `error: <text>` and exits with 2.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    msg: String,
}

impl ConfigError {
    fn new(msg: impl Into<String>) -> Self {
        Self { msg: msg.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for ConfigError {}

/// A typed config with the tree it came from, so that validation errors can point at lines.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    /// The typed config, overrides applied, not yet validated.
    pub config: ExperimentConfig,
    /// The file it was read from.
    pub path: PathBuf,
    /// The overrides applied, in order, as given.
    pub overrides: Vec<String>,
    tree: Node,
}

/// Reads `path`, applies the `--set` overrides `sets` (each `KEY=VALUE`), and types the result.
pub fn load(path: &Path, sets: &[String]) -> Result<LoadedConfig, ConfigError> {
    let file = path.display().to_string();
    let bytes = std::fs::read(path)
        .map_err(|e| ConfigError::new(format!("cannot read the config file {file}: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        ConfigError::new(format!(
            "{file}: the config file is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    load_text(&text, path, sets)
}

/// [`load`] of config text read from `path` (a config file, or a checkpoint's manifest).
pub fn load_text(text: &str, path: &Path, sets: &[String]) -> Result<LoadedConfig, ConfigError> {
    let file = path.display().to_string();
    let parsed: Vec<Override> = sets
        .iter()
        .map(|raw| {
            overrides::parse_override(raw)
                .map_err(|m| ConfigError::new(format!("--set {raw}: {m}")))
        })
        .collect::<Result<_, _>>()?;
    let mut tree = yaml_tree::parse(text, None).map_err(|e| match e {
        ParseError::Empty => ConfigError::new(format!(
            "{file}: the config file is empty (it holds no YAML document); a config names \
             at least one section, e.g. `run:`; see configs/quickstart.yaml"
        )),
        ParseError::Syntax { line, column, msg } => ConfigError::new(format!(
            "{file}, line {line}, column {column}: invalid YAML: {msg}"
        )),
    })?;
    for ov in &parsed {
        overrides::apply(&mut tree, ov)
            .map_err(|m| ConfigError::new(format!("--set {}: {m}", ov.raw)))?;
    }
    let mut config: ExperimentConfig =
        tree_de::from_tree(&tree).map_err(|e| ConfigError::new(describe(&file, &e)))?;
    resolve_paths(&mut config, &tree, path);
    Ok(LoadedConfig {
        config,
        path: path.to_path_buf(),
        overrides: sets.to_vec(),
        tree,
    })
}

/// Paths that do not depend on where `moe` runs from. `run.out_dir`, when neither the file nor
/// an override sets it, is `runs/<run.name>`, so a new `run.name` is a new run directory. A
/// relative `data.path` (or `data.tokenizer`) written in the file is relative to the file's
/// directory (a config finds its data from any working directory); one given with `--set` is
/// relative to the working directory, like any path typed on the command line. Both are
/// stored absolute, so the config saved with a run (and `moe eval` of its checkpoints) finds
/// them too.
fn resolve_paths(cfg: &mut ExperimentConfig, tree: &Node, file: &Path) {
    if tree.lookup("run.out_dir").is_none() {
        cfg.run.out_dir = Path::new("runs").join(&cfg.run.name);
    }
    if let Some(p) = cfg.data.path.take() {
        cfg.data.path = Some(resolve(p, "data.path", tree, file));
    }
    if cfg.data.tokenizer_file().is_some() {
        let p = std::mem::take(&mut cfg.data.tokenizer);
        cfg.data.tokenizer = resolve(p, "data.tokenizer", tree, file);
    }
}

/// `p`, the value of `key`, made absolute by the rule of [`resolve_paths`].
fn resolve(p: PathBuf, key: &str, tree: &Node, file: &Path) -> PathBuf {
    if p.is_absolute() {
        return p;
    }
    let from_override = tree
        .lookup(key)
        .is_some_and(|(_, node)| matches!(node.origin, Origin::Override(_)));
    let base = if from_override {
        PathBuf::new()
    } else {
        file.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let joined = base.join(&p);
    std::fs::canonicalize(&joined)
        .or_else(|_| std::path::absolute(&joined))
        .unwrap_or(joined)
}

impl LoadedConfig {
    /// Checks every cross-field rule for a run of `world_size` ranks, plus the launcher's own
    /// findings `extra` (`world::launch_errors`); all violations are reported at once, each
    /// with where its first key was written.
    pub fn validate(&self, world_size: i64, extra: Vec<String>) -> Result<(), ConfigError> {
        let mut errs = self.config.validate(world_size);
        errs.extend(extra);
        if errs.is_empty() {
            return Ok(());
        }
        let file = self.path.display().to_string();
        let lines: Vec<String> = errs
            .iter()
            .map(|e| match self.origin_of_first_key(e) {
                Some(Origin::File { line, column }) => {
                    format!("  - {e} [line {line}, column {column}]")
                }
                Some(Origin::Override(raw)) => format!("  - {e} [--set {raw}]"),
                None => format!("  - {e}"),
            })
            .collect();
        let n = errs.len();
        let problems = if n == 1 { "problem" } else { "problems" };
        Err(ConfigError::new(format!(
            "{file}: invalid config for a world size of {world_size} ({n} {problems}):\n{}",
            lines.join("\n")
        )))
    }

    /// Where the first dotted key (`moe.top_k`) in `msg` that the file or an override set got
    /// its value: the override that wrote the value, else the key's place in the file; `None`
    /// when every key the message names kept its default.
    fn origin_of_first_key(&self, msg: &str) -> Option<&Origin> {
        let (key_origin, node) = msg
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
            .filter(|w| w.contains('.') && !w.starts_with('.') && !w.ends_with('.'))
            .find_map(|w| self.tree.lookup(w))?;
        match &node.origin {
            o @ Origin::Override(_) => Some(o),
            Origin::File { .. } => Some(key_origin),
        }
    }
}

/// The resolved config as YAML (what training writes to `<out_dir>/config.yaml`); loading it
/// back gives the same config.
pub fn to_yaml(cfg: &ExperimentConfig) -> anyhow::Result<String> {
    let mut text = serde_saphyr::to_string(cfg)
        .map_err(|e| anyhow::anyhow!("cannot write the config as YAML: {e}"))?;
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Ok(text)
}

fn where_(file: &str, origin: Option<&Origin>) -> String {
    match origin {
        Some(Origin::File { line, column }) => format!("{file}, line {line}, column {column}"),
        Some(Origin::Override(raw)) => format!("--set {raw} (applied to {file})"),
        None => file.to_owned(),
    }
}

/// One paragraph for a typing error.
fn describe(file: &str, e: &DeError) -> String {
    let path = e.path.clone().unwrap_or_default();
    let place = where_(file, e.origin.as_ref());
    let what = match &e.kind {
        DeErrorKind::UnknownKey { key, expected } => {
            let section = path.rsplit_once('.').map(|(s, _)| s);
            let full = |k: &str| match section {
                Some(s) => format!("{s}.{k}"),
                None => k.to_owned(),
            };
            let noun = if section.is_some() { "key" } else { "section" };
            let hint = match suggest::closest(key, expected) {
                Some(s) => format!("; did you mean `{}`?", full(s)),
                None => ".".to_owned(),
            };
            let valid = match section {
                Some(s) => format!("The keys of `{s}` are"),
                None => "The sections are".to_owned(),
            };
            format!("unknown {noun} `{path}`{hint} {valid}: {}.", expected.join(", "))
        }
        DeErrorKind::UnknownVariant { value, expected } => {
            let hint = match suggest::closest(value, expected) {
                Some(s) => format!("; did you mean `{s}`?"),
                None => ".".to_owned(),
            };
            format!(
                "`{path}` must be one of {}, but it is `{value}`{hint}",
                expected.join(", ")
            )
        }
        DeErrorKind::Mismatch { found, expected } if path.is_empty() => format!(
            "the config must be {expected} with sections like `run:` and `model:`, but it is {found}."
        ),
        DeErrorKind::Mismatch { found, expected } => {
            format!("`{path}` must be {expected}, but it is {found}.")
        }
        DeErrorKind::Other(msg) if path.is_empty() => format!("{msg}."),
        DeErrorKind::Other(msg) => format!("`{path}`: {msg}."),
    };
    format!("{place}: {what}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moe-config-load-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn resolved_yaml_round_trips() {
        let dir = tmpdir("roundtrip");
        let sets = [
            "moe.capacity_factor=1.25".to_owned(),
            "trainer.lr=1e-3".to_owned(),
            "data.path=some/file.txt".to_owned(),
            "model.head_dim=16".to_owned(),
        ];
        let src = write(&dir, "a.yaml", "run:\n  name: roundtrip\n");
        let cfg = load(&src, &sets).unwrap().config;
        assert_eq!(cfg.moe.capacity_factor, Some(1.25));
        assert_eq!(cfg.trainer.lr, 1e-3);
        let out = write(&dir, "b.yaml", &to_yaml(&cfg).unwrap());
        assert_eq!(load(&out, &[]).unwrap().config, cfg);
        // Defaults, including every None and every float, survive the trip too.
        let def = ExperimentConfig::default();
        let out = write(&dir, "c.yaml", &to_yaml(&def).unwrap());
        assert_eq!(load(&out, &[]).unwrap().config, def);
    }

    #[test]
    fn stored_json_config_loads_with_overrides() {
        // A checkpoint stores the resolved config as JSON; the same loader reads it back.
        let mut cfg = ExperimentConfig::default();
        cfg.run.name = "0042".into();
        let json = serde_json::to_string(&cfg).unwrap();
        let where_ = Path::new("/ckpt/manifest.json");
        assert_eq!(load_text(&json, where_, &[]).unwrap().config, cfg);
        let loaded = load_text(&json, where_, &["moe.top_k=1".to_owned()]).unwrap();
        assert_eq!(loaded.config.moe.top_k, 1);
        let e = load_text(&json, where_, &["moe.top_kk=1".to_owned()]).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "--set moe.top_kk=1 (applied to /ckpt/manifest.json): unknown key `moe.top_kk`; \
                 did you mean `moe.top_k`?"
            ),
            "{e}"
        );
    }

    #[test]
    fn validation_points_at_the_key_that_was_set() {
        let dir = tmpdir("validate");
        // num_kv_heads is in the file but its value comes from --set: the message names the
        // override, which is what the user has to change.
        let src = write(
            &dir,
            "v.yaml",
            "moe:\n  num_experts: 4\n  top_k: 8\nmodel:\n  num_kv_heads: 2\n",
        );
        let loaded = load(&src, &["model.num_kv_heads=3".to_owned()]).unwrap();
        let msg = loaded.validate(1, vec![]).unwrap_err().to_string();
        assert!(
            msg.contains("moe.top_k (8) must be <= moe.num_experts (4) [line 3, column 3]"),
            "{msg}"
        );
        assert!(msg.contains("[--set model.num_kv_heads=3]"), "{msg}");
        assert!(msg.contains("(2 problems)"), "{msg}");
    }
}
