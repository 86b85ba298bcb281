//! Loading a checkpoint for one rank of any expert-parallel size: dense tensors as saved,
//! expert tensors re-stacked from their per-global-expert slices for the rank's range.

use super::format::{f32_view, parse, read_verified, verify_file, ELT_BYTES};
use super::manifest::{expert_tensor_name, ExpertEntry, Manifest, DENSE_FILE, OPTIM_PREFIX};
use super::verify::read_manifest;
use crate::error::{Result, TrainError};
use moe_model::param::{Param, ParamKind};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// One stacked expert parameter of this rank: the global experts it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpertSlot {
    /// Stacked parameter name, `layers.3.moe.experts.w_gate`.
    pub name: String,
    /// Global id of local expert 0.
    pub first_global: i64,
    /// Local experts (the stacked tensor's dim 0).
    pub num_local: i64,
    /// Global number of experts E in the model now (must equal the checkpoint's).
    pub num_experts: i64,
}

impl ExpertSlot {
    /// One slot per `ParamKind::Expert` parameter.
    pub fn from_params(params: &[Param], num_experts: i64) -> Vec<Self> {
        params
            .iter()
            .filter_map(|p| match p.kind {
                ParamKind::Expert {
                    first_global,
                    num_local,
                } => Some(ExpertSlot {
                    name: p.name.clone(),
                    first_global,
                    num_local,
                    num_experts,
                }),
                ParamKind::Dense => None,
            })
            .collect()
    }
}

/// What one rank reads back. All tensors are float32 on the CPU.
#[derive(Debug)]
pub struct Loaded {
    /// The checkpoint directory.
    pub path: PathBuf,
    /// Its manifest (world size, ep size and files of the run that wrote it).
    pub manifest: Manifest,
    /// Training step it was taken after.
    pub step: u64,
    /// Optimizer step count.
    pub optim_step: u64,
    /// RNG and data-cursor state as the trainer saved it.
    pub extra: serde_json::Value,
    /// The resolved config the run was saved with.
    pub config_yaml: String,
    /// Dense parameters and buffers.
    pub dense: HashMap<String, Tensor>,
    /// Stacked expert parameters for the requested slots, `[num_local, ...]`.
    pub experts: HashMap<String, Tensor>,
    /// Optimizer state by `<param>.<stat>`, dense as saved and experts re-stacked, ready for
    /// `AdamW::load_state`.
    pub optim: HashMap<String, Tensor>,
    /// File each tensor came from (the first one for re-stacked experts).
    sources: HashMap<String, PathBuf>,
}

fn ckpt_err(path: &Path, msg: String) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        msg,
    }
}

fn tensor_of(data: &[u8], shape: &[usize]) -> Result<Tensor> {
    let size: Vec<i64> = shape.iter().map(|&s| s as i64).collect();
    Ok(Tensor::f_from_data_size(data, &size, Kind::Float)?)
}

/// Verifies the checkpoint at `path` (every file's size and sha256) and returns its dense
/// tensors plus, for each slot, the experts `[first_global, first_global + num_local)`
/// re-stacked from whichever expert files hold them, so a checkpoint written at any
/// `ep_size` loads at any other. Errors name the file and what differs: a missing tensor,
/// a different number of experts, a damaged file.
pub fn load_for_rank(path: &Path, slots: &[ExpertSlot]) -> Result<Loaded> {
    let manifest = read_manifest(path)?;
    let manifest_path = path.join(super::manifest::MANIFEST);
    let mut holder: HashMap<&str, &str> = HashMap::new();
    for f in &manifest.files {
        for t in &f.tensors {
            holder.insert(&t.name, &f.name);
        }
    }
    if !manifest.files.iter().any(|f| f.name == DENSE_FILE) {
        return Err(ckpt_err(&manifest_path, format!("lists no {DENSE_FILE}")));
    }

    let mut needs: Vec<(&ExpertEntry, &ExpertSlot)> = Vec::new();
    let mut needed_files: BTreeSet<&str> = BTreeSet::from([DENSE_FILE]);
    for slot in slots {
        let entries: Vec<&ExpertEntry> = manifest
            .experts
            .iter()
            .filter(|e| e.param == slot.name)
            .collect();
        if !entries.iter().any(|e| e.stat.is_none()) {
            return Err(ckpt_err(
                &manifest_path,
                format!(
                    "missing tensor {}: the model has this expert parameter",
                    slot.name
                ),
            ));
        }
        for e in entries {
            if e.num_experts != slot.num_experts {
                return Err(ckpt_err(
                    &manifest_path,
                    format!(
                        "{}: num_experts differs: checkpoint {}, model {}",
                        e.key, e.num_experts, slot.num_experts
                    ),
                ));
            }
            if slot.first_global < 0
                || slot.num_local < 0
                || slot.first_global + slot.num_local > e.num_experts
            {
                return Err(ckpt_err(
                    &manifest_path,
                    format!(
                        "{}: experts {}..{} requested, the checkpoint has 0..{}",
                        e.key,
                        slot.first_global,
                        slot.first_global + slot.num_local,
                        e.num_experts
                    ),
                ));
            }
            for g in slot.first_global..slot.first_global + slot.num_local {
                let name = expert_tensor_name(&e.param, g, e.stat.as_deref());
                let file = holder.get(name.as_str()).ok_or_else(|| {
                    ckpt_err(
                        &manifest_path,
                        format!("missing tensor {name}: no file lists it"),
                    )
                })?;
                needed_files.insert(file);
            }
            needs.push((e, slot));
        }
    }

    // Files this rank reads are verified on the very bytes it parses; the rest are streamed
    // through sha256 so a damaged checkpoint is never half-loaded.
    let mut blobs: HashMap<&str, Vec<u8>> = HashMap::new();
    for f in &manifest.files {
        let file_path = path.join(&f.name);
        if needed_files.contains(f.name.as_str()) {
            blobs.insert(&f.name, read_verified(&file_path, f)?);
        } else {
            verify_file(&file_path, f)?;
        }
    }
    let mut parsed: HashMap<&str, SafeTensors<'_>> = HashMap::new();
    for (name, bytes) in &blobs {
        parsed.insert(name, parse(&path.join(name), bytes)?);
    }

    let mut loaded = Loaded {
        path: path.to_path_buf(),
        step: manifest.step,
        optim_step: manifest.optim_step,
        extra: manifest.extra.clone(),
        config_yaml: manifest.config_yaml.clone(),
        dense: HashMap::new(),
        experts: HashMap::new(),
        optim: HashMap::new(),
        sources: HashMap::new(),
        manifest: manifest.clone(),
    };

    let dense_path = path.join(DENSE_FILE);
    if let (Some(entry), Some(st)) = (
        manifest.files.iter().find(|f| f.name == DENSE_FILE),
        parsed.get(DENSE_FILE),
    ) {
        for t in &entry.tensors {
            let (shape, data) = f32_view(&dense_path, st, &t.name)?;
            let tensor = tensor_of(data, &shape)?;
            match t.name.strip_prefix(OPTIM_PREFIX) {
                Some(key) => loaded.optim.insert(key.to_string(), tensor),
                None => loaded.dense.insert(t.name.clone(), tensor),
            };
            let key = t.name.strip_prefix(OPTIM_PREFIX).unwrap_or(&t.name);
            loaded.sources.insert(key.to_string(), dense_path.clone());
        }
    }

    for (e, slot) in needs {
        let per = e.expert_shape.iter().product::<usize>() * ELT_BYTES;
        let mut stacked = Vec::with_capacity(per * slot.num_local.max(0) as usize);
        let mut first_file = None;
        for g in slot.first_global..slot.first_global + slot.num_local {
            let name = expert_tensor_name(&e.param, g, e.stat.as_deref());
            let file = holder.get(name.as_str()).copied().unwrap_or(DENSE_FILE);
            let file_path = path.join(file);
            let st = parsed
                .get(file)
                .ok_or_else(|| ckpt_err(&file_path, format!("{file} was not read")))?;
            let (shape, data) = f32_view(&file_path, st, &name)?;
            if shape != e.expert_shape {
                return Err(ckpt_err(
                    &file_path,
                    format!(
                        "{name}: shape {shape:?}, the manifest says {:?}",
                        e.expert_shape
                    ),
                ));
            }
            stacked.extend_from_slice(data);
            first_file.get_or_insert(file_path);
        }
        let mut shape = vec![slot.num_local.max(0) as usize];
        shape.extend_from_slice(&e.expert_shape);
        let tensor = tensor_of(&stacked, &shape)?;
        match e.stat {
            None => loaded.experts.insert(e.key.clone(), tensor),
            Some(_) => loaded.optim.insert(e.key.clone(), tensor),
        };
        loaded.sources.insert(
            e.key.clone(),
            first_file.unwrap_or_else(|| manifest_path.clone()),
        );
    }
    Ok(loaded)
}

impl Loaded {
    /// The file a tensor (or optimizer-state key) was read from.
    pub fn source(&self, name: &str) -> Option<&Path> {
        self.sources.get(name).map(PathBuf::as_path)
    }

    fn source_str(&self, name: &str) -> String {
        self.source(name).map_or_else(
            || self.path.display().to_string(),
            |p| p.display().to_string(),
        )
    }

    /// Copies the loaded weights into the model's parameters and buffers (on any device),
    /// after checking everything first so a mismatch leaves the model untouched: every
    /// parameter and buffer present with its shape, no checkpoint tensor left over, and
    /// every optimizer-state tensor shaped like its parameter. The error lists each
    /// mismatch with both shapes and the file, e.g.
    /// `layers.0.attn.wq: checkpoint [128, 128], model [64, 64] in .../dense.safetensors`.
    pub fn copy_into(&self, params: &[Param], buffers: &[(String, Tensor)]) -> Result<()> {
        let mut errors = Vec::new();
        let mut pairs: Vec<(Tensor, &Tensor)> = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut shapes: HashMap<&str, Vec<i64>> = HashMap::new();
        let targets = params
            .iter()
            .map(|p| (p.name.as_str(), &p.tensor, p.kind != ParamKind::Dense))
            .chain(buffers.iter().map(|(n, t)| (n.as_str(), t, false)));
        for (name, dst, is_expert) in targets {
            seen.insert(name);
            shapes.insert(name, dst.size());
            let src = if is_expert {
                self.experts.get(name)
            } else {
                self.dense.get(name)
            };
            match src {
                None if is_expert => errors.push(format!(
                    "missing tensor {name}: no expert slot for it was passed to load_for_rank \
                     (checkpoint {})",
                    self.path.display()
                )),
                None => errors.push(format!(
                    "missing tensor {name}: the model has it, {} does not",
                    self.path.join(DENSE_FILE).display()
                )),
                Some(src) if src.size() != dst.size() => errors.push(format!(
                    "{name}: checkpoint {:?}, model {:?} in {}",
                    src.size(),
                    dst.size(),
                    self.source_str(name)
                )),
                Some(src) => pairs.push((dst.shallow_clone(), src)),
            }
        }
        let mut extra: Vec<&String> = self
            .dense
            .keys()
            .filter(|k| !seen.contains(k.as_str()))
            .collect();
        extra.sort();
        for name in extra {
            errors.push(format!(
                "unexpected tensor {name} in {}: the model has no such parameter or buffer",
                self.source_str(name)
            ));
        }
        let mut optim: Vec<(&String, &Tensor)> = self.optim.iter().collect();
        optim.sort_by_key(|(k, _)| k.as_str());
        for (key, t) in optim {
            let owner = key.rsplit_once('.').map(|(o, _)| o).unwrap_or(key);
            match shapes.get(owner) {
                None => errors.push(format!(
                    "optimizer state {key} in {} belongs to no model parameter",
                    self.source_str(key)
                )),
                Some(shape) if *shape != t.size() => errors.push(format!(
                    "{key}: checkpoint {:?}, model {:?} in {}",
                    t.size(),
                    shape,
                    self.source_str(key)
                )),
                Some(_) => {}
            }
        }
        if !errors.is_empty() {
            return Err(ckpt_err(
                &self.path,
                format!("does not fit the model:\n  {}", errors.join("\n  ")),
            ));
        }
        tch::no_grad(|| {
            for (mut dst, src) in pairs {
                dst.f_copy_(src)?;
            }
            Ok(())
        })
    }
}

/// Lines where two resolved configs differ (`line N: checkpoint `a`, now `b``); empty when
/// equal. Both come from the same serializer, so a line-wise comparison finds changed keys.
pub fn config_mismatch(saved: &str, current: &str) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (saved.lines().collect(), current.lines().collect());
    (0..a.len().max(b.len()))
        .filter_map(|i| {
            let (x, y) = (
                a.get(i).copied().unwrap_or(""),
                b.get(i).copied().unwrap_or(""),
            );
            (x != y).then(|| format!("line {}: checkpoint `{x}`, now `{y}`", i + 1))
        })
        .collect()
}
