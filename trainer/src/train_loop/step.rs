//! One optimizer step of one rank ([`Trainer::train_step`]): forward and backward over the
//! micro-batches, the step's one all-reduce of statistics, then either the update (gradient
//! sync, clipping, AdamW, the aux-loss-free bias update) or, when any rank saw a non-finite
//! value, a skip that every rank takes together.

use super::stats::{LocalStats, StepStats};
use super::Trainer;
use crate::data::Batch;
use crate::grad_sync::{clip_coef, global_grad_norm, sync_gradients};
use crate::loss::train_loss;
use crate::optim::release_grads;
use crate::Result;
use moe_comm::host_read;
use moe_model::moe_layer::MoeStats;
use moe_model::transformer::LmForward;
use std::sync::atomic::Ordering;
use tch::{Kind, Tensor};

/// What one call of [`Trainer::train_step`] did.
pub(super) enum StepOutcome {
    /// The optimizer stepped.
    Applied(AppliedStep),
    /// A non-finite loss or gradient norm on some rank: the gradients were dropped and the
    /// weights left as they were, on every rank.
    Skipped {
        /// `"loss"` or `"gradient norm"`.
        what: &'static str,
        /// Where world rank 0 saw non-finite values (empty on other ranks, or when quiet).
        diagnostic: String,
    },
}

/// The global statistics of a step the optimizer took.
pub(super) struct AppliedStep {
    /// The all-reduced losses, counts and flags.
    pub stats: StepStats,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Per MoE layer (block index), the router statistics summed over the micro-batches.
    pub layers: Vec<(i64, MoeStats)>,
    /// `trainer.distill`'s term, mean over ranks and micro-batches.
    pub distill_loss: Option<f64>,
}

/// The router-jitter counter of micro-batch `micro` of optimizer step `step` (0-based): one
/// value per micro-batch (up to 1024 per step), so each draws its own reproducible noise.
fn jitter_counter(step: u64, micro: usize) -> u64 {
    step * 1024 + micro as u64
}

impl Trainer<'_> {
    /// Optimizer step `step` (0-based) at learning rate `lr` on this rank's micro-batches.
    /// Collective: every rank calls it for the same step and gets the same kind of outcome.
    pub(super) fn train_step(
        &mut self,
        step: u64,
        micro: &[Batch],
        lr: f64,
        inject_nan: bool,
    ) -> Result<StepOutcome> {
        let (local, layers) = self.forward_backward(micro, step, inject_nan)?;
        let stop = self.opts.stop.load(Ordering::SeqCst);
        let stats = local.reduce(&self.groups, &self.placement, stop, &layers)?;
        if self.opts.debug {
            // Before the skip-bad-step path, which would otherwise swallow a non-finite
            // loss; the loss flag is global so every rank stops at the same step.
            super::invariants::check_step(self.cfg, step, &layers, stats.non_finite == 0.0)?;
        }

        // One collective decision for every rank: a non-finite value anywhere skips the step.
        let mut grad_norm = f64::NAN;
        let bad = stats.non_finite > 0.0;
        if !bad {
            sync_gradients(&self.params, &self.groups)?;
            grad_norm = global_grad_norm(&self.params, &self.groups)?;
        }
        if bad || !grad_norm.is_finite() {
            let diagnostic = if self.printing {
                self.non_finite_diagnostic(&local, &layers)
            } else {
                String::new()
            };
            release_grads(&self.params)?;
            let what = if bad { "loss" } else { "gradient norm" };
            return Ok(StepOutcome::Skipped { what, diagnostic });
        }
        // Clipping happens inside the fused update (no pass of its own over the gradients).
        let clip = clip_coef(grad_norm, self.cfg.trainer.grad_clip);
        self.optimizer.step_clipped(&self.params, lr, clip)?;
        release_grads(&self.params)?;
        self.update_biases(&layers)?;
        let distill_loss = match &self.distill {
            Some(d) => Some(d.global_step_term(&self.groups)?),
            None => None,
        };
        Ok(StepOutcome::Applied(AppliedStep {
            stats,
            grad_norm,
            layers,
            distill_loss,
        }))
    }

    /// Forward and backward over the step's micro-batches. Returns this rank's statistics
    /// (losses averaged over micro-batches) and the per-layer router statistics summed over
    /// micro-batches.
    fn forward_backward(
        &mut self,
        micro: &[Batch],
        step: u64,
        inject_nan: bool,
    ) -> Result<(LocalStats, Vec<(i64, MoeStats)>)> {
        let n_micro = micro.len() as f64;
        let mut stats = LocalStats::new(&self.placement)?;
        let mut layers: Vec<(i64, MoeStats)> = Vec::new();
        for (i, batch) in micro.iter().enumerate() {
            let inputs = self.placement.to_device(&batch.inputs_bt)?;
            let targets = self.placement.to_device(&batch.targets_bt)?;
            let ctx = LmForward {
                train: true,
                compute_kind: self.placement.compute_kind,
                step: jitter_counter(step, i),
            };
            let out = self.model.forward(&inputs, &ctx)?;
            let (mut loss, mut lm_loss) =
                train_loss(&out, &targets, self.cfg.trainer.mtp_loss_weight)?;
            if let Some(d) = self.distill.as_mut() {
                loss = loss.f_add(&d.term(i, n_micro, &inputs, &out.logits_btv)?)?;
            }
            if inject_nan {
                lm_loss = lm_loss.f_mul_scalar(f64::NAN)?;
                loss = loss.f_mul_scalar(f64::NAN)?;
            }
            let losses_3 = Tensor::f_stack(&[&lm_loss, &out.aux_loss, &out.z_loss], 0)?
                .f_detach()?
                .f_to_kind(Kind::Double)?;
            stats.losses_3 = stats.losses_3.f_add(&losses_3.f_div_scalar(n_micro)?)?;
            // Averaging over micro-batches: each contributes 1/n of the step's gradient.
            loss.f_div_scalar(n_micro)?.f_backward()?;
            for (layer, s) in out.moe {
                let counts_2 = Tensor::f_stack(&[&s.num_kept, &s.num_dropped], 0)?;
                stats.counts_2 = stats.counts_2.f_add(&counts_2.f_to_kind(Kind::Double)?)?;
                match layers.iter_mut().find(|(l, _)| *l == layer) {
                    Some((_, acc)) => acc.accumulate(&s)?,
                    None => layers.push((layer, s)),
                }
            }
        }
        Ok((stats, layers))
    }

    /// Aux-loss-free balancing: each MoE layer's bias moves towards the mean load, from the
    /// global (all-reduced) pre-drop assignment counts, identically on every rank.
    fn update_biases(&self, layer_stats: &[(i64, MoeStats)]) -> Result<()> {
        if self.cfg.moe.bias_update_rate <= 0.0 {
            return Ok(());
        }
        for (layer, moe) in self.model.moe_layers() {
            if let Some((_, s)) = layer_stats.iter().find(|(l, _)| *l == layer) {
                moe.update_expert_bias(s)?;
            }
        }
        Ok(())
    }

    /// Where this rank saw non-finite values: which loss terms (per MoE layer for aux and z),
    /// and which gradients. The first bad parameter in model order is usually the embedding
    /// (a NaN loss poisons every gradient), so the first bad MoE parameter is named too: a
    /// router or expert blow-up shows there first.
    fn non_finite_diagnostic(&self, local: &LocalStats, layers: &[(i64, MoeStats)]) -> String {
        let mut parts = Vec::new();
        // host: only on the rare path of a skipped step.
        let lm = host_read::<f64>(&local.losses_3).map_or(f64::NAN, |v| v[0]);
        if !lm.is_finite() {
            parts.push(format!("lm_loss {lm}"));
        }
        for (layer, s) in layers {
            for (what, t) in [("aux_loss", &s.aux_loss), ("z_loss", &s.z_loss)] {
                if let Ok(v) = host_read::<f64>(t).map(|v| v[0]) {
                    if !v.is_finite() {
                        parts.push(format!("layer {layer} {what} {v}"));
                    }
                }
            }
        }
        let bad: Vec<&str> = self
            .params
            .iter()
            .filter(|p| {
                let finite = p.tensor.f_grad().and_then(|g| {
                    if !g.defined() {
                        return Ok(1);
                    }
                    // host: only on the rare path of a skipped step.
                    g.f_isfinite()?.f_all()?.f_int64_value(&[])
                });
                !matches!(finite, Ok(1))
            })
            .map(|p| p.name.as_str())
            .collect();
        if let Some(first) = bad.first() {
            let moe = bad.iter().find(|n| n.contains(".moe."));
            parts.push(format!(
                "non-finite gradients in {} of {} parameters, first: {first}{}",
                bad.len(),
                self.params.len(),
                moe.filter(|m| *m != first)
                    .map(|m| format!(", first MoE: {m}"))
                    .unwrap_or_default()
            ));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" on rank {}: {}", self.groups.world_rank, parts.join("; "))
        }
    }
}
