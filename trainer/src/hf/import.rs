//! `moe import`: a Hugging Face model folder to a run directory (`config.yaml`, the folder's
//! `tokenizer.json` if it has one, as `data.tokenizer` and stored in the checkpoint, plus a
//! checkpoint under `checkpoints/`) that `moe train --resume auto`, `moe eval` and
//! `moe generate` accept at any `parallel.ep_size`. The folder's `config.json` is read
//! through the architecture's tables backwards, its tensors through the name table
//! backwards; everything is checked (each missing, unexpected or mis-shaped tensor named with
//! its file) before anything is written.

use super::arch::Arch;
use super::config_map::import_config;
use super::names::{map_name, mapped_shape, Side};
use super::outdir::Staging;
use super::HfError;
use crate::checkpoint::{
    expert_tensor_name, write_streamed, ExpertEntry, StFile, StreamedCheckpoint, TensorEntry,
    TOKENIZER_FILE,
};
use crate::config::ExperimentConfig;
use crate::tensor_bytes::write_le;
use crate::tokenizer::TextTokenizer;
use crate::TrainError;
use moe_model::config::ModelConfig;
use moe_model::init;
use moe_model::param::Param;
use moe_model::param::ParamKind;
use moe_model::transformer::TransformerLm;
use moe_model::ExpertParallel;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Device;
use tch::{Kind, Tensor};

/// File name of the single-file layout.
const SINGLE: &str = "model.safetensors";
/// File name of the sharded layout's index.
const INDEX: &str = "model.safetensors.index.json";

/// What an import wrote.
#[derive(Debug)]
pub struct ImportReport {
    pub arch: Arch,
    /// The run directory.
    pub run_dir: PathBuf,
    /// The checkpoint inside it.
    pub checkpoint: PathBuf,
    /// The config written to `config.yaml`.
    pub config: ExperimentConfig,
    /// Tensors read.
    pub tensors: usize,
}

fn input(path: &Path, msg: impl std::fmt::Display) -> HfError {
    HfError::Input(format!("{}: {msg}", path.display()))
}

fn read_json(path: &Path) -> Result<Value, HfError> {
    let text = std::fs::read_to_string(path).map_err(|e| input(path, e))?;
    serde_json::from_str(&text).map_err(|e| input(path, format!("not valid JSON: {e}")))
}

/// The architecture and our config of the folder's `config.json`.
pub fn read_hf_config(dir: &Path) -> Result<(Arch, ExperimentConfig), HfError> {
    let path = dir.join("config.json");
    let json = read_json(&path)?;
    let model_type = json
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| input(&path, "missing field `model_type`"))?;
    let arch = Arch::from_name(model_type).ok_or_else(|| {
        input(
            &path,
            format!(
                "model_type `{model_type}` is not supported (supported: {})",
                Arch::ALL
                    .iter()
                    .map(|a| a.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
    })?;
    let cfg = import_config(arch.spec(), &json)
        .map_err(|errs| input(&path, errs.join(&format!("\n{}: ", path.display()))))?;
    Ok((arch, cfg))
}

/// The folder's safetensors files and which holds each tensor.
fn open_weights(dir: &Path) -> Result<(Vec<StFile>, BTreeMap<String, usize>), HfError> {
    let index_path = dir.join(INDEX);
    let names: Vec<String> = if index_path.is_file() {
        let index = read_json(&index_path)?;
        let map = index
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| input(&index_path, "missing field `weight_map`"))?;
        let mut files = BTreeSet::new();
        for (t, f) in map {
            let f = f
                .as_str()
                .ok_or_else(|| input(&index_path, format!("weight_map[{t}] is not a file name")))?;
            files.insert(f.to_string());
        }
        files.into_iter().collect()
    } else if dir.join(SINGLE).is_file() {
        vec![SINGLE.to_string()]
    } else {
        return Err(input(dir, format!("holds neither {SINGLE} nor {INDEX}")));
    };
    let mut files = Vec::with_capacity(names.len());
    let mut holder = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        let st = StFile::open(&dir.join(name)).map_err(|e| HfError::Input(e.to_string()))?;
        for t in st.tensors().keys() {
            if let Some(j) = holder.insert(t.clone(), i) {
                return Err(input(
                    &dir.join(name),
                    format!("tensor {t} is also in {}", names[j]),
                ));
            }
        }
        files.push(st);
    }
    if index_path.is_file() {
        let index = read_json(&index_path)?;
        if let Some(map) = index.get("weight_map").and_then(Value::as_object) {
            for (t, f) in map {
                let actual = holder.get(t).map(|&i| names[i].as_str());
                if actual != f.as_str() {
                    return Err(input(
                        &index_path,
                        format!(
                            "weight_map puts {t} in {}, but {}",
                            f.as_str().unwrap_or("?"),
                            actual.map_or("no file holds it".to_string(), |a| format!(
                                "it is in {a}"
                            ))
                        ),
                    ));
                }
            }
        }
    }
    Ok((files, holder))
}

/// The folder's `tokenizer.json`, if it has one, checked to fit `model.vocab_size`.
fn hf_tokenizer(dir: &Path, cfg: &ExperimentConfig) -> Result<Option<TextTokenizer>, HfError> {
    let path = dir.join(TOKENIZER_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let tok = TextTokenizer::load(&path).map_err(|e| HfError::Input(e.to_string()))?;
    if tok.vocab_size() as i64 > cfg.model.vocab_size {
        return Err(input(
            &path,
            format!(
                "the tokenizer has {} ids, more than the model's vocabulary (vocab_size {} in \
                 config.json)",
                tok.vocab_size(),
                cfg.model.vocab_size
            ),
        ));
    }
    Ok(Some(tok))
}

/// The checkpoint of an imported model: its parameters and buffers, a fresh AdamW state (zero
/// moments, step 0, so it resumes like a new run), step 0.
fn checkpoint_plan(
    cfg: &ExperimentConfig,
    hf_dir: &Path,
    params: &[Param],
    buffers: &[(String, Tensor)],
    tokenizer: Option<PathBuf>,
) -> Result<StreamedCheckpoint, HfError> {
    let shape = |t: &Tensor| -> Vec<usize> { t.size().iter().map(|&s| s as usize).collect() };
    let mut dense = Vec::new();
    let mut optim = Vec::new();
    let mut experts = Vec::new();
    for p in params {
        let size = shape(&p.tensor);
        match p.kind {
            ParamKind::Dense => {
                dense.push(TensorEntry {
                    name: p.name.clone(),
                    shape: size.clone(),
                });
                for stat in ADAM_STATS {
                    optim.push(TensorEntry {
                        name: format!("optim.{}.{stat}", p.name),
                        shape: size.clone(),
                    });
                }
            }
            ParamKind::Expert { num_local, .. } => {
                let stats = std::iter::once(None).chain(ADAM_STATS.map(Some));
                for stat in stats {
                    experts.push(ExpertEntry {
                        key: stat.map_or_else(|| p.name.clone(), |s| format!("{}.{s}", p.name)),
                        param: p.name.clone(),
                        stat: stat.map(str::to_string),
                        num_experts: num_local,
                        expert_shape: size[1..].to_vec(),
                    });
                }
            }
        }
    }
    dense.extend(buffers.iter().map(|(n, t)| TensorEntry {
        name: n.clone(),
        shape: shape(t),
    }));
    dense.extend(optim);
    Ok(StreamedCheckpoint {
        step: 0,
        optim_step: 0,
        extra: serde_json::json!({
            "data_step": 0,
            "seed": cfg.run.seed,
            "imported_from": hf_dir.display().to_string(),
        }),
        config_yaml: serde_json::to_string_pretty(cfg)
            .map_err(|e| HfError::Failed(format!("serialising the config: {e}")))?,
        dense,
        experts,
        tokenizer,
    })
}

/// The AdamW statistics a checkpoint stores per parameter.
const ADAM_STATS: [&str; 2] = ["exp_avg", "exp_avg_sq"];

/// One tensor the model needs: its name in our checkpoint files, whether the folder stores
/// it transposed, and its shape there.
struct Need {
    ours: String,
    transpose: bool,
    shape: Vec<usize>,
}

/// Imports the folder `hf_dir` into the new run directory `run_dir`. `render_yaml` writes
/// the config as the binary's config loader reads it back.
pub fn import(
    hf_dir: &Path,
    run_dir: &Path,
    render_yaml: &dyn Fn(&ExperimentConfig) -> Result<String, String>,
) -> Result<ImportReport, HfError> {
    let (arch, mut cfg) = read_hf_config(hf_dir)?;
    let spec = arch.spec();
    let run_dir = std::path::absolute(run_dir).map_err(|e| input(run_dir, e))?;
    cfg.run.out_dir = run_dir.clone();
    cfg.run.name = run_dir
        .file_name()
        .map_or_else(|| "imported".into(), |n| n.to_string_lossy().into_owned());
    cfg.data.seq_len = cfg.data.seq_len.min(cfg.model.max_seq_len);
    let errs = cfg.validate(1);
    if !errs.is_empty() {
        return Err(input(
            &hf_dir.join("config.json"),
            format!(
                "describes a model this build cannot run:\n  {}",
                errs.join("\n  ")
            ),
        ));
    }
    let tokenizer = hf_tokenizer(hf_dir, &cfg)?;
    if tokenizer.is_some() {
        cfg.data.tokenizer = run_dir.join(TOKENIZER_FILE);
    }
    let (files, holder) = open_weights(hf_dir)?;

    // Names, shapes and kinds only: every parameter is filled from the folder, so none is
    // initialised (and none takes resident memory; the import streams tensor by tensor).
    // `max_seq_len` sizes only the RoPE tables, which are no parameter: at a long context
    // (Mixtral's 131072 positions) they would outweigh the largest tensor.
    let shapes_model = ModelConfig {
        max_seq_len: 1,
        ..cfg.model.clone()
    };
    let model = init::without_values(|| {
        TransformerLm::new(
            &shapes_model,
            &cfg.moe,
            &ExpertParallel::single(),
            cfg.run.seed,
            Device::Cpu,
        )
    })
    .map_err(|e| HfError::Input(e.to_string()))?;
    let params = model.params();
    let mut needs: BTreeMap<String, Need> = BTreeMap::new();
    for p in &params {
        let size: Vec<usize> = p.tensor.size().iter().map(|&s| s as usize).collect();
        let per_name: Vec<(String, &[usize])> = match p.kind {
            ParamKind::Dense => vec![(p.name.clone(), &size[..])],
            ParamKind::Expert {
                first_global,
                num_local,
            } => (first_global..first_global + num_local)
                .map(|g| (expert_tensor_name(&p.name, g, None), &size[1..]))
                .collect(),
        };
        for (ours, shape) in per_name {
            let (hf, transpose) = map_name(spec.names, Side::Ours, &ours).ok_or_else(|| {
                HfError::Failed(format!(
                    "parameter {ours} has no {} name (a gap in the table)",
                    spec.model_type
                ))
            })?;
            needs.insert(
                hf,
                Need {
                    ours,
                    transpose,
                    shape: mapped_shape(shape, transpose),
                },
            );
        }
    }

    let mut problems = Vec::new();
    for (hf, need) in &needs {
        match holder.get(hf) {
            None => problems.push(format!(
                "missing tensor {hf}: no file in {} holds it",
                hf_dir.display()
            )),
            Some(&i) => {
                let info = &files[i].tensors()[hf];
                if info.shape != need.shape {
                    problems.push(format!(
                        "tensor {hf} in {}: shape {:?}, the config needs {:?}",
                        files[i].path().display(),
                        info.shape,
                        need.shape
                    ));
                }
            }
        }
    }
    for (hf, &i) in &holder {
        if !needs.contains_key(hf) {
            problems.push(format!(
                "unexpected tensor {hf} in {}: the {} model of this config.json has no such weight",
                files[i].path().display(),
                spec.model_type
            ));
        }
    }
    if !problems.is_empty() {
        return Err(HfError::Input(problems.join("\n")));
    }

    let staging = Staging::new(&run_dir)?;
    let yaml = render_yaml(&cfg).map_err(HfError::Failed)?;
    let yaml_path = staging.dir().join("config.yaml");
    std::fs::write(&yaml_path, yaml)
        .map_err(|e| HfError::Failed(format!("{}: {e}", yaml_path.display())))?;
    let staged_tok = staging.dir().join(TOKENIZER_FILE);
    if let Some(tok) = &tokenizer {
        std::fs::copy(tok.path(), &staged_tok)
            .map_err(|e| HfError::Failed(format!("{}: {e}", staged_tok.display())))?;
    }
    let staged_tok = tokenizer.is_some().then_some(staged_tok);
    let plan = checkpoint_plan(&cfg, hf_dir, &params, &model.buffers(), staged_tok)?;
    let source: BTreeMap<&str, (&str, bool)> = needs
        .iter()
        .map(|(hf, n)| (n.ours.as_str(), (hf.as_str(), n.transpose)))
        .collect();
    let buffers: BTreeMap<String, Tensor> = model.buffers().into_iter().collect();
    let mut numel: BTreeMap<String, usize> = plan
        .dense
        .iter()
        .map(|t| (t.name.clone(), t.shape.iter().product()))
        .collect();
    for e in &plan.experts {
        for g in 0..e.num_experts {
            let name = expert_tensor_name(&e.param, g, e.stat.as_deref());
            numel.insert(name, e.expert_shape.iter().product());
        }
    }
    let io = |path: &Path, e: std::io::Error| TrainError::io(path, e);
    let mut fill = |name: &str, out: &mut dyn Write| -> Result<(), TrainError> {
        if let Some((hf, transpose)) = source.get(name) {
            let file = &files[holder[*hf]];
            let v = file.read(hf)?;
            let v = if *transpose { v.f_tr()? } else { v };
            return write_le(&v, Kind::Float, out).map_err(|e| io(file.path(), e));
        }
        if let Some(b) = buffers.get(name) {
            return write_le(b, Kind::Float, out).map_err(|e| io(hf_dir, e));
        }
        // Optimizer state: zero moments, written without a tensor.
        let n = *numel.get(name).ok_or_else(|| {
            TrainError::Other(format!("import: no source for checkpoint tensor {name}"))
        })?;
        let zeros = vec![0u8; (n * 4).min(1 << 20)];
        let mut left = n * 4;
        while left > 0 {
            let k = left.min(zeros.len());
            out.write_all(&zeros[..k]).map_err(|e| io(hf_dir, e))?;
            left -= k;
        }
        Ok(())
    };
    let ckpt_root = staging.dir().join("checkpoints");
    let written = tch::no_grad(|| write_streamed(&ckpt_root, &plan, &mut fill))
        .map_err(|e| HfError::Failed(e.to_string()))?;
    let step_dir = written.file_name().map(PathBuf::from).unwrap_or_default();
    let run_dir = staging.commit()?;
    Ok(ImportReport {
        arch,
        checkpoint: run_dir.join("checkpoints").join(step_dir),
        run_dir,
        config: cfg,
        tensors: needs.len(),
    })
}
