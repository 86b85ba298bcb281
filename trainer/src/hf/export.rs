//! `moe export`: a checkpoint (any EP size) to a folder `transformers` loads with
//! `AutoModelForCausalLM.from_pretrained`. Streams tensor by tensor from the
//! [`CheckpointReader`] through the architecture's name table into the shards.

use super::arch::{Arch, ArchSpec};
use super::config_map::{export_config, refusals};
use super::names::{map_name, mapped_shape, Side};
use super::outdir::Staging;
use super::shards::{write_model, ExportDtype, OutTensor};
use super::HfError;
use crate::checkpoint::{stored_tokenizer, CheckpointReader};
use crate::config::ExperimentConfig;
use crate::tokenizer::TextTokenizer;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Shard size above which the weights are split (`transformers`' default is 50 GB; ours is
/// smaller so that a shard stays well under the memory of a small machine).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Target architecture; `None` infers it (exactly one must fit).
    pub arch: Option<Arch>,
    pub dtype: ExportDtype,
    /// Largest shard in bytes.
    pub max_shard_bytes: u64,
    /// A `tokenizer.json` to ship with the weights (as `tokenizer.json` plus a
    /// `tokenizer_config.json` naming `PreTrainedTokenizerFast`), so `AutoTokenizer` loads it;
    /// `None` ships the one the checkpoint stores (its run's `data.tokenizer`), if any.
    pub tokenizer: Option<PathBuf>,
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub arch: Arch,
    pub out: PathBuf,
    /// Files in `out`.
    pub files: Vec<String>,
    pub tensors: usize,
    /// One-line notes for the user (e.g. capacity dropping is training-only).
    pub notes: Vec<String>,
}

/// The resolved config a checkpoint was saved with; its `data.tokenizer` is the copy the
/// checkpoint stores, if any (the original file may be gone).
pub fn checkpoint_config(reader: &CheckpointReader) -> Result<ExperimentConfig, HfError> {
    let mut cfg: ExperimentConfig =
        serde_json::from_str(&reader.manifest().config_yaml).map_err(|e| {
            HfError::Input(format!(
                "{}: the stored config does not parse: {e}",
                reader.path().join("manifest.json").display()
            ))
        })?;
    if let Some(tok) = stored_tokenizer(reader.path(), reader.manifest())
        .map_err(|e| HfError::Input(e.to_string()))?
    {
        cfg.data.tokenizer = tok;
    }
    Ok(cfg)
}

/// The architecture to export `cfg` to: `want`, if `cfg` fits it, else the only one it fits.
pub fn choose_arch(cfg: &ExperimentConfig, want: Option<Arch>) -> Result<Arch, HfError> {
    if let Some(a) = want {
        let errs = refusals(a.spec(), cfg);
        return if errs.is_empty() {
            Ok(a)
        } else {
            Err(HfError::Input(errs.join("\n")))
        };
    }
    let fits: Vec<Arch> = Arch::ALL
        .iter()
        .copied()
        .filter(|a| refusals(a.spec(), cfg).is_empty())
        .collect();
    match fits.as_slice() {
        [one] => Ok(*one),
        [] => Err(HfError::Input(
            Arch::ALL
                .iter()
                .flat_map(|a| refusals(a.spec(), cfg))
                .collect::<Vec<_>>()
                .join("\n"),
        )),
        many => Err(HfError::Input(format!(
            "the model fits several architectures ({}): pass --arch",
            many.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

/// Notes on what the target does differently in training only.
fn notes(cfg: &ExperimentConfig, arch: Arch) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(cf) = cfg.moe.capacity_factor {
        out.push(format!(
            "note: moe.capacity_factor ({cf}) drops tokens over capacity; transformers' {} is \
             dropless, so it may differ from this model where training would drop tokens",
            arch.name()
        ));
    }
    out
}

/// Where one exported tensor comes from.
struct Source {
    /// Our name.
    ours: String,
    transpose: bool,
    /// Its shape in the export.
    shape: Vec<usize>,
}

/// Our model tensors mapped to `spec`'s names, sorted by HF name.
fn plan_names(
    reader: &CheckpointReader,
    spec: &ArchSpec,
) -> Result<BTreeMap<String, Source>, HfError> {
    let mut out = BTreeMap::new();
    for ours in reader.model_names() {
        let (hf, transpose) = map_name(spec.names, Side::Ours, ours).ok_or_else(|| {
            HfError::Input(format!(
                "{}: tensor {ours} has no counterpart in {}",
                reader.path().display(),
                spec.model_type
            ))
        })?;
        let shape = reader.shape(ours).unwrap_or(&[]);
        let shape = mapped_shape(shape, transpose);
        out.insert(
            hf,
            Source {
                ours: ours.to_string(),
                transpose,
                shape,
            },
        );
    }
    Ok(out)
}

/// Exports the checkpoint at `ckpt` into the new directory `out`.
pub fn export(ckpt: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportReport, HfError> {
    let reader = CheckpointReader::open(ckpt).map_err(|e| HfError::Input(e.to_string()))?;
    let cfg = checkpoint_config(&reader)?;
    let arch = choose_arch(&cfg, opts.arch)?;
    let spec = arch.spec();
    let names = plan_names(&reader, spec)?;
    let stored = stored_tokenizer(reader.path(), reader.manifest())
        .map_err(|e| HfError::Input(e.to_string()))?;
    let tokenizer = match opts.tokenizer.as_ref().or(stored.as_ref()) {
        Some(p) => Some(checked_tokenizer(p, &cfg)?),
        None => None,
    };
    let staging = Staging::new(out)?;
    let dir = staging.dir().to_path_buf();

    let config = export_config(spec, &cfg, opts.dtype.config_name());
    write_json(&dir.join("config.json"), &config)?;
    let generation = serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
    });
    write_json(&dir.join("generation_config.json"), &generation)?;

    let tensors: Vec<OutTensor> = names
        .iter()
        .map(|(hf, src)| OutTensor {
            name: hf.clone(),
            shape: src.shape.clone(),
        })
        .collect();
    let mut read = |t: &OutTensor| {
        let src = &names[&t.name];
        let v = reader
            .read(&src.ours)
            .map_err(|e| HfError::Input(e.to_string()))?;
        if src.transpose {
            v.f_tr().map_err(|e| HfError::Failed(e.to_string()))
        } else {
            Ok(v)
        }
    };
    let mut files = vec![
        "config.json".to_string(),
        "generation_config.json".to_string(),
    ];
    if let Some(tok) = &tokenizer {
        let path = dir.join("tokenizer.json");
        std::fs::copy(tok.path(), &path)
            .map_err(|e| HfError::Failed(format!("{}: {e}", path.display())))?;
        let tok_cfg = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": cfg.model.max_seq_len,
            "clean_up_tokenization_spaces": false,
        });
        write_json(&dir.join("tokenizer_config.json"), &tok_cfg)?;
        files.push("tokenizer.json".into());
        files.push("tokenizer_config.json".into());
    }
    files.extend(write_model(
        &dir,
        &tensors,
        opts.dtype,
        opts.max_shard_bytes,
        &mut read,
    )?);
    let out = staging.commit()?;
    Ok(ExportReport {
        arch,
        out,
        files,
        tensors: tensors.len(),
        notes: notes(&cfg, arch),
    })
}

/// The tokenizer at `path`, if its ids fit the model's vocabulary.
fn checked_tokenizer(path: &Path, cfg: &ExperimentConfig) -> Result<TextTokenizer, HfError> {
    let tok = TextTokenizer::load(path).map_err(|e| HfError::Input(e.to_string()))?;
    if tok.vocab_size() as i64 > cfg.model.vocab_size {
        return Err(HfError::Input(format!(
            "{}: the tokenizer has {} ids, more than the model's vocabulary \
             (model.vocab_size {})",
            path.display(),
            tok.vocab_size(),
            cfg.model.vocab_size
        )));
    }
    Ok(tok)
}

pub(crate) fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), HfError> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| HfError::Failed(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text + "\n")
        .map_err(|e| HfError::Failed(format!("{}: {e}", path.display())))
}
