//! `manifest.json`: what a checkpoint holds and how to check it. Written last, so its
//! presence in a committed `step-N/` directory means every file it lists was complete.

use serde::{Deserialize, Serialize};

/// Value of [`Manifest::format`].
pub const FORMAT_NAME: &str = "moe-checkpoint";
/// Bumped on any incompatible layout change; readers refuse other versions.
pub const FORMAT_VERSION: u32 = 1;
/// File name of the manifest inside a checkpoint directory.
pub(crate) const MANIFEST: &str = "manifest.json";
/// File name of the tokenizer copy inside a checkpoint directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// File written by world rank 0 with every dense tensor.
pub(crate) const DENSE_FILE: &str = "dense.safetensors";

/// File written by expert-parallel rank `ep_rank`.
pub(crate) fn experts_file(ep_rank: i64) -> String {
    format!("experts-r{ep_rank}.safetensors")
}

/// Marker a rank writes next to its expert file once that file is durable.
pub(crate) fn part_marker(ep_rank: i64) -> String {
    format!("experts-r{ep_rank}.part.json")
}

/// The whole manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`] of the writer.
    pub version: u32,
    /// Training step the checkpoint was taken after.
    pub step: u64,
    /// Optimizer step count (differs from `step` when non-finite steps were skipped).
    pub optim_step: u64,
    /// World size of the run that wrote it.
    pub world_size: i64,
    /// Expert-parallel size of the run that wrote it.
    pub ep_size: i64,
    /// Every stacked expert tensor (parameters and their optimizer statistics).
    pub experts: Vec<ExpertEntry>,
    /// The resolved experiment config, as the run printed it.
    pub config_yaml: String,
    /// RNG and data-cursor state, opaque to the checkpoint code.
    pub extra: serde_json::Value,
    /// Every file with its size, sha256 and tensors.
    pub files: Vec<FileEntry>,
    /// The run's tokenizer (`data.tokenizer`), copied into the checkpoint as
    /// [`TOKENIZER_FILE`]; absent for byte-level runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<FileEntry>,
}

/// One stacked expert tensor, stored as one file tensor per global expert id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertEntry {
    /// Name of the stacked tensor as the model or optimizer knows it:
    /// `layers.3.moe.experts.w_gate` or `layers.3.moe.experts.w_gate.exp_avg`.
    pub key: String,
    /// The expert parameter it belongs to (`key` itself for a parameter).
    pub param: String,
    /// Optimizer statistic (`exp_avg`, `exp_avg_sq`), or None for the parameter itself.
    pub stat: Option<String>,
    /// Global number of experts E.
    pub num_experts: i64,
    /// Shape of one expert's slice (the stacked shape without its leading dim).
    pub expert_shape: Vec<usize>,
}

/// One file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// File name relative to the checkpoint directory.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex sha256 of the whole file.
    pub sha256: String,
    /// Tensors in the file.
    pub tensors: Vec<TensorEntry>,
}

/// One tensor of a file (all float32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Slice of one stacked expert tensor held by one rank, as its part marker reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartExpert {
    pub key: String,
    pub param: String,
    pub stat: Option<String>,
    pub first_global: i64,
    pub num_local: i64,
    pub expert_shape: Vec<usize>,
}

/// What an expert-writing rank tells rank 0 once its file is durable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PartMarker {
    pub step: u64,
    pub ep_rank: i64,
    pub file: FileEntry,
    pub experts: Vec<PartExpert>,
}

/// The file-tensor name of global expert `global` of `param` (statistic `stat`):
/// the id goes before the last name component, `layers.3.moe.experts.w_gate` ->
/// `layers.3.moe.experts.17.w_gate`, and optimizer state is prefixed with `optim.`.
pub fn expert_tensor_name(param: &str, global: i64, stat: Option<&str>) -> String {
    let base = match param.rsplit_once('.') {
        Some((head, last)) => format!("{head}.{global}.{last}"),
        None => format!("{global}.{param}"),
    };
    match stat {
        Some(s) => format!("optim.{base}.{s}"),
        None => base,
    }
}

/// Prefix of optimizer-state tensors in the files.
pub(crate) const OPTIM_PREFIX: &str = "optim.";
