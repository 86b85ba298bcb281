//! What a surgery command reports (issue 12, item 7): total and active parameters and
//! per-rank memory before and after, and the validation loss before and after; printed by
//! the command and written as `surgery.json` beside the checkpoint.

use crate::config::ExperimentConfig;
use crate::hf::HfError;
use moe_model::count::count_params;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Size of a model at an expert-parallel size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelSize {
    /// All parameters (`moe inspect`'s count).
    pub total_params: u64,
    /// Parameters one token uses (Mixtral/DeepSeek convention, see `moe_model::count`).
    pub active_params: u64,
    /// The EP size the per-rank figures are for.
    pub ep_size: i64,
    /// Float32 weights one rank holds: the replicated parameters plus its 1/ep_size share of
    /// the routed experts.
    pub weight_bytes_per_rank: u64,
    /// Training state one rank holds: weights, gradients and AdamW's two moments, all float32
    /// (4 x the weights; activations not included).
    pub train_state_bytes_per_rank: u64,
}

impl ModelSize {
    /// The size of `cfg`'s model at `ep_size` (1 when not positive).
    pub fn of(cfg: &ExperimentConfig, ep_size: i64) -> Result<Self, HfError> {
        let c = count_params(&cfg.model, &cfg.moe).map_err(|e| HfError::Input(e.to_string()))?;
        let ep = ep_size.max(1);
        let weights = 4 * (c.replicated() + c.expert_per_rank(ep as u64));
        Ok(Self {
            total_params: c.total(),
            active_params: c.active(),
            ep_size: ep,
            weight_bytes_per_rank: weights,
            train_state_bytes_per_rank: 4 * weights,
        })
    }
}

/// One surgery's before/after.
#[derive(Debug, Clone, Serialize)]
pub struct SurgeryReport {
    /// The operation and its arguments.
    pub command: String,
    /// The checkpoint read.
    pub source: PathBuf,
    /// The run directory written.
    pub run_dir: PathBuf,
    /// The checkpoint written inside it.
    pub checkpoint: PathBuf,
    pub before: ModelSize,
    pub after: ModelSize,
    /// Validation loss of the source checkpoint (`moe eval`'s number), if the data loaded.
    pub val_loss_before: Option<f64>,
    /// Validation loss of the written model on the same batches.
    pub val_loss_after: Option<f64>,
    /// Settings changed and other remarks, one line each.
    pub notes: Vec<String>,
    /// What `moe slim` chose (empty for `moe upcycle`).
    #[serde(flatten)]
    pub slim: SlimDetails,
}

/// `moe slim`'s choices, keyed by the new model's layer prefix (`layers.3.moe`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlimDetails {
    /// The old global ids of the experts kept, per MoE layer, in their new order.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub kept_experts: BTreeMap<String, Vec<i64>>,
    /// `--merge`: each dropped expert's old id and the old id of the kept expert it was
    /// folded into, per MoE layer.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub merged_into: BTreeMap<String, BTreeMap<i64, i64>>,
    /// The old indices of the blocks removed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped_layers: Vec<i64>,
    /// The calibration statistics the choices were made from, by the source's layer prefix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibSummary>,
}

/// The calibration pass, summarised.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CalibSummary {
    /// Training batches read per source rank (`--calib-batches`).
    pub batches: u64,
    /// Tokens seen.
    pub tokens: u64,
    /// Block Influence `1 - mean cos(x_in, x_out)` per block (`layers.3`).
    pub block_influence: BTreeMap<String, f64>,
    /// Routing statistics per MoE layer of the source (`layers.3.moe`).
    pub routing: BTreeMap<String, LayerRouting>,
}

/// One MoE layer's routing on the calibration tokens.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerRouting {
    /// Top-k assignments per expert.
    pub frequency: Vec<f64>,
    /// Summed routing weights per expert.
    pub weighted_frequency: Vec<f64>,
    /// Mean routing weight of each expert's assignments.
    pub mean_weight: Vec<f64>,
}

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1024.0 * 1024.0))
}

fn loss(v: Option<f64>) -> String {
    v.map_or("not measured".into(), |l| format!("{l:.6}"))
}

impl SurgeryReport {
    /// Human-readable lines, as the command prints them.
    pub fn lines(&self) -> Vec<String> {
        let (b, a) = (&self.before, &self.after);
        let mut out: Vec<String> = self.notes.iter().map(|n| format!("note: {n}")).collect();
        let d = &self.slim;
        if let Some(c) = &d.calibration {
            out.push(format!(
                "calibration: {} batches per source rank, {} tokens",
                c.batches, c.tokens
            ));
            if !d.dropped_layers.is_empty() {
                let bi: Vec<String> = c
                    .block_influence
                    .iter()
                    .map(|(l, b)| format!("{l} {b:.4}"))
                    .collect();
                out.push(format!("block influence: {}", bi.join(", ")));
            }
        }
        if !d.dropped_layers.is_empty() {
            out.push(format!("dropped blocks {:?}", d.dropped_layers));
        }
        for (layer, keep) in &d.kept_experts {
            out.push(format!("{layer}: kept experts {keep:?}"));
        }
        for (layer, m) in &d.merged_into {
            let pairs: Vec<String> = m.iter().map(|(a, b)| format!("{a}->{b}")).collect();
            out.push(format!("{layer}: merged {}", pairs.join(" ")));
        }
        out.push(format!(
            "params total {} -> {}, active per token {} -> {}",
            b.total_params, a.total_params, b.active_params, a.active_params
        ));
        out.push(format!(
            "per-rank weights {} (ep_size {}) -> {} (ep_size {}); with gradients and AdamW \
             state {} -> {}",
            mib(b.weight_bytes_per_rank),
            b.ep_size,
            mib(a.weight_bytes_per_rank),
            a.ep_size,
            mib(b.train_state_bytes_per_rank),
            mib(a.train_state_bytes_per_rank)
        ));
        out.push(format!(
            "val_loss {} -> {}",
            loss(self.val_loss_before),
            loss(self.val_loss_after)
        ));
        out
    }
}
