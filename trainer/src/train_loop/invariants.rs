//! Debug mode's per-step invariants (DESIGN.md, Modes).

use crate::config::ExperimentConfig;
use crate::{Result, TrainError};
use moe_model::moe_layer::MoeStats;
use tch::Tensor;

/// The invariants of optimizer step `step` (0-based) on this rank: the main blocks route
/// `batch_size * seq_len * grad_accum` tokens; the multi-token prediction block (block
/// `num_layers`, last in the list) one token fewer per sequence.
pub(super) fn check_step(
    cfg: &ExperimentConfig,
    step: u64,
    layers: &[(i64, MoeStats)],
    loss_finite: bool,
) -> Result<()> {
    let t = &cfg.trainer;
    let n = t.batch_size * cfg.data.seq_len * t.grad_accum;
    let main_layers = layers
        .iter()
        .take_while(|(l, _)| *l < cfg.model.num_layers)
        .count();
    let (main, mtp) = layers.split_at(main_layers);
    check_invariants(step, n, cfg.moe.top_k, main, loss_finite)?;
    let n_mtp = t.batch_size * (cfg.data.seq_len - 1) * t.grad_accum;
    check_invariants(step, n_mtp, cfg.moe.top_k, mtp, loss_finite)
}

/// Debug mode's per-step invariants (DESIGN.md, Modes): in every MoE layer each of the
/// rank's `num_tokens` tokens (over all micro-batches) has `top_k` assignments, each kept or
/// counted dropped; routing weights are finite and sum as configured; the loss is finite.
pub fn check_invariants(
    step: u64,
    num_tokens: i64,
    top_k: i64,
    layers: &[(i64, MoeStats)],
    loss_finite: bool,
) -> Result<()> {
    let invariant = |layer: i64, msg: String| {
        TrainError::Model(moe_model::ModelError::Invariant { layer, msg })
    };
    for (layer, s) in layers {
        let expected = num_tokens * top_k;
        // host: debug-mode invariant checks only.
        let counts =
            moe_comm::host_read::<i64>(&Tensor::f_stack(&[&s.num_kept, &s.num_dropped], 0)?)?;
        let (num_kept, num_dropped) = (counts[0], counts[1]);
        if num_kept + num_dropped != expected {
            return Err(invariant(
                *layer,
                format!(
                    "step {}: kept ({}) + dropped ({}) assignments != N*k ({num_tokens}*{top_k} = {expected})",
                    step + 1,
                    num_kept,
                    num_dropped,
                ),
            ));
        }
        if !s.probs_sum_ok()? {
            return Err(invariant(
                *layer,
                format!(
                    "step {}: routing weights not finite or not normalised as configured",
                    step + 1
                ),
            ));
        }
    }
    if !loss_finite {
        return Err(TrainError::Diverged(format!(
            "step {}: loss is not finite (debug mode stops at the first non-finite step)",
            step + 1
        )));
    }
    Ok(())
}
