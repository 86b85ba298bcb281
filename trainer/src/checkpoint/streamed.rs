//! A checkpoint written tensor by tensor, for tools that make one from files rather than from
//! a model in memory (`moe import`): the same layout as a one-process [`super::Checkpointer`]
//! save (`dense.safetensors`, `experts-r0.safetensors`, the tokenizer, the manifest last, the
//! directory renamed into place once durable), but each tensor's bytes are asked for when its
//! turn comes, so the writer holds none of them.

use super::format::write_safetensors_with;
use super::fsutil::{fsync_dir, step_dir_name, tmp_dir_name, write_atomic};
use super::manifest::{
    expert_tensor_name, experts_file, ExpertEntry, FileEntry, Manifest, TensorEntry, DENSE_FILE,
    FORMAT_NAME, FORMAT_VERSION, MANIFEST, TOKENIZER_FILE,
};
use crate::error::{Result, TrainError};
use crate::tokenizer::sha256_hex;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a streamed checkpoint holds (all float32), apart from the tensors' values.
#[derive(Debug, Clone)]
pub struct StreamedCheckpoint {
    /// Training step (names the directory `step-<8 digits>`).
    pub step: u64,
    /// Optimizer step count.
    pub optim_step: u64,
    /// RNG and data-cursor state, stored verbatim in the manifest.
    pub extra: serde_json::Value,
    /// The resolved config, stored verbatim in the manifest.
    pub config_yaml: String,
    /// Dense tensors by file name: parameters, buffers, then `optim.<param>.<stat>`.
    pub dense: Vec<TensorEntry>,
    /// Stacked expert tensors (parameters and their optimizer statistics), every expert.
    pub experts: Vec<ExpertEntry>,
    /// A `tokenizer.json` to store with it.
    pub tokenizer: Option<PathBuf>,
}

/// The file tensors of `e`, one per global expert.
fn expert_tensors(e: &ExpertEntry) -> Vec<TensorEntry> {
    (0..e.num_experts)
        .map(|g| TensorEntry {
            name: expert_tensor_name(&e.param, g, e.stat.as_deref()),
            shape: e.expert_shape.clone(),
        })
        .collect()
}

/// Writes `ckpt` as `root/step-N/` (world size 1, EP size 1), asking `fill(name, out)` to
/// write the little-endian float32 bytes of each file tensor (`layers.0.attn.wq`,
/// `layers.3.moe.experts.17.w_gate`, `optim.<...>.exp_avg`) in turn. Returns the directory.
pub fn write_streamed(
    root: &Path,
    ckpt: &StreamedCheckpoint,
    fill: &mut dyn FnMut(&str, &mut dyn Write) -> Result<()>,
) -> Result<PathBuf> {
    let tmp = root.join(tmp_dir_name(ckpt.step));
    let done = root.join(step_dir_name(ckpt.step));
    if done.exists() {
        return Err(TrainError::Checkpoint {
            path: done,
            msg: "exists; a streamed checkpoint never replaces one".into(),
        });
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    // The caller's error, kept whole: the safetensors writer only passes io errors through.
    let mut failure: Option<TrainError> = None;
    let mut write_file = |name: &str, tensors: &[TensorEntry]| -> Result<FileEntry> {
        let written = write_atomic(&tmp, name, |w| {
            write_safetensors_with(w, name, tensors, &mut |i, out| {
                fill(&tensors[i].name, out).map_err(|e| {
                    let msg = e.to_string();
                    failure = Some(e);
                    std::io::Error::other(msg)
                })
            })
        });
        match (written, failure.take()) {
            (Ok(f), _) => Ok(f),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(e),
        }
    };
    let dense = write_file(DENSE_FILE, &ckpt.dense)?;
    let mut experts = ckpt.experts.clone();
    experts.sort_by(|a, b| a.key.cmp(&b.key));
    // Parameters before optimizer state, as a training rank writes its file.
    let mut order: Vec<&ExpertEntry> = ckpt.experts.iter().filter(|e| e.stat.is_none()).collect();
    order.extend(ckpt.experts.iter().filter(|e| e.stat.is_some()));
    let expert_file: Vec<TensorEntry> = order.into_iter().flat_map(expert_tensors).collect();
    let experts_entry = write_file(&experts_file(0), &expert_file)?;
    let tokenizer = match &ckpt.tokenizer {
        None => None,
        Some(p) => {
            let bytes = std::fs::read(p).map_err(|e| TrainError::io(p, e))?;
            write_atomic(&tmp, TOKENIZER_FILE, |w| w.write_all(&bytes))?;
            Some(FileEntry {
                name: TOKENIZER_FILE.into(),
                size: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
                tensors: Vec::new(),
            })
        }
    };
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        step: ckpt.step,
        optim_step: ckpt.optim_step,
        world_size: 1,
        ep_size: 1,
        experts,
        config_yaml: ckpt.config_yaml.clone(),
        extra: ckpt.extra.clone(),
        files: vec![dense, experts_entry],
        tokenizer,
    };
    write_atomic(&tmp, MANIFEST, |w| {
        serde_json::to_writer_pretty(w, &manifest).map_err(std::io::Error::from)
    })?;
    fsync_dir(&tmp)?;
    std::fs::rename(&tmp, &done).map_err(|e| TrainError::io(&done, e))?;
    fsync_dir(root)?;
    Ok(done)
}
