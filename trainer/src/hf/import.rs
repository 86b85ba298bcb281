//! `moe import`: a Hugging Face model folder to a run directory (`config.yaml` plus a
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
use crate::checkpoint::{expert_tensor_name, Checkpointer, Snapshot, StFile};
use crate::config::ExperimentConfig;
use moe_model::param::ParamKind;
use moe_model::transformer::TransformerLm;
use moe_model::ExpertParallel;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::Device;

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

/// One tensor the model needs: parameter index, expert id, transpose.
struct Need {
    param: usize,
    expert: Option<i64>,
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
    let (files, holder) = open_weights(hf_dir)?;

    let model = TransformerLm::new(
        &cfg.model,
        &cfg.moe,
        &ExpertParallel::single(),
        cfg.run.seed,
        Device::Cpu,
    )
    .map_err(|e| HfError::Input(e.to_string()))?;
    let params = model.params();
    let mut needs: BTreeMap<String, Need> = BTreeMap::new();
    for (pi, p) in params.iter().enumerate() {
        let size: Vec<usize> = p.tensor.size().iter().map(|&s| s as usize).collect();
        let per_name: Vec<(String, Option<i64>, &[usize])> = match p.kind {
            ParamKind::Dense => vec![(p.name.clone(), None, &size[..])],
            ParamKind::Expert {
                first_global,
                num_local,
            } => (first_global..first_global + num_local)
                .map(|g| (expert_tensor_name(&p.name, g, None), Some(g), &size[1..]))
                .collect(),
        };
        for (ours, expert, shape) in per_name {
            let (hf, transpose) = map_name(spec.names, Side::Ours, &ours).ok_or_else(|| {
                HfError::Failed(format!(
                    "parameter {ours} has no {} name (a gap in the table)",
                    spec.model_type
                ))
            })?;
            needs.insert(
                hf,
                Need {
                    param: pi,
                    expert,
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

    let failed = |e: tch::TchError| HfError::Failed(e.to_string());
    tch::no_grad(|| -> Result<(), HfError> {
        for (hf, need) in &needs {
            let file = &files[holder[hf]];
            let v = file.read(hf).map_err(|e| HfError::Input(e.to_string()))?;
            let v = if need.transpose {
                v.f_tr().map_err(failed)?
            } else {
                v
            };
            let dst = &params[need.param].tensor;
            let mut dst = match need.expert {
                Some(g) => dst.f_select(0, g).map_err(failed)?,
                None => dst.shallow_clone(),
            };
            dst.f_copy_(&v).map_err(failed)?;
        }
        Ok(())
    })?;

    // A fresh AdamW state (zero moments, step 0), so the checkpoint resumes like a new run.
    let mut optim = Vec::with_capacity(2 * params.len());
    for p in &params {
        for stat in ["exp_avg", "exp_avg_sq"] {
            let zeros = p.tensor.f_zeros_like().map_err(failed)?;
            optim.push((format!("{}.{stat}", p.name), zeros));
        }
    }
    let snapshot = Snapshot {
        step: 0,
        optim_step: 0,
        extra: serde_json::json!({
            "data_step": 0,
            "seed": cfg.run.seed,
            "imported_from": hf_dir.display().to_string(),
        }),
        config_yaml: serde_json::to_string_pretty(&cfg)
            .map_err(|e| HfError::Failed(format!("serialising the config: {e}")))?,
        ..Snapshot::from_params(&params, &model.buffers(), optim)
            .map_err(|e| HfError::Failed(e.to_string()))?
    };

    let staging = Staging::new(&run_dir)?;
    let yaml = render_yaml(&cfg).map_err(HfError::Failed)?;
    let yaml_path = staging.dir().join("config.yaml");
    std::fs::write(&yaml_path, yaml)
        .map_err(|e| HfError::Failed(format!("{}: {e}", yaml_path.display())))?;
    let ckpt_root = staging.dir().join("checkpoints");
    let mut ckpt =
        Checkpointer::new(&ckpt_root, 1, 0, 0, 1, 1).map_err(|e| HfError::Failed(e.to_string()))?;
    let written = ckpt
        .save(snapshot)
        .map_err(|e| HfError::Failed(e.to_string()))?;
    ckpt.wait().map_err(|e| HfError::Failed(e.to_string()))?;
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
