//! Validation during training: every `trainer.eval_every` steps and at the last step, the
//! mean loss over `trainer.eval_iters` global batches of the validation split.

use super::Trainer;
use crate::config::TrainerConfig;
use crate::data::Dataset;
use crate::inference::{rank_val_loss_on_device, EvalModel};
use crate::metrics::EvalRecord;
use crate::Result;
use moe_comm::{host_read, lock};
use std::sync::Arc;

/// Decides when to validate, and does.
pub(super) struct Validator {
    dataset: Arc<Dataset>,
    /// `trainer.eval_every` (0: never).
    every: u64,
    max_steps: u64,
}

impl Validator {
    pub fn new(dataset: Arc<Dataset>, t: &TrainerConfig) -> Self {
        Self {
            dataset,
            every: t.eval_every,
            max_steps: t.max_steps,
        }
    }

    /// After step `done` (1-based): the validation result when one is due. Collective.
    pub fn maybe_run(&self, trainer: &Trainer, done: u64) -> Result<Option<EvalRecord>> {
        if !due(done, self.every, self.max_steps) {
            return Ok(None);
        }
        let val_loss = self.evaluate(trainer, done)?;
        Ok(Some(EvalRecord {
            step: done,
            val_loss,
            val_ppl: val_loss.exp(),
        }))
    }

    /// Each rank's mean ([`crate::inference::rank_val_loss`], shared with `moe eval`),
    /// averaged over ranks.
    fn evaluate(&self, tr: &Trainer, step: u64) -> Result<f64> {
        let m = EvalModel {
            model: &tr.model,
            device: tr.placement.device,
            compute_kind: tr.placement.compute_kind,
        };
        let world = tr.groups.world_size as i64;
        let rank = tr.groups.world_rank as i64;
        let local = rank_val_loss_on_device(&m, &self.dataset, tr.cfg, world, rank, step)?;
        let summed = lock(&tr.groups.world)?.all_reduce_sum(&local.f_reshape([1])?)?;
        Ok(host_read::<f64>(&summed)?[0] / tr.groups.world_size as f64)
    }
}

/// Whether step `done` (1-based) validates: every `every` steps and at the last step
/// `max_steps`; never when `every` is 0.
fn due(done: u64, every: u64, max_steps: u64) -> bool {
    every > 0 && (done.is_multiple_of(every) || done == max_steps)
}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn validates_every_n_steps_and_at_the_last_never_when_off() {
        let at = |every| -> Vec<u64> { (1..=10).filter(|&d| due(d, every, 10)).collect() };
        assert_eq!(at(4), [4, 8, 10]);
        assert_eq!(at(5), [5, 10]);
        assert!(at(0).is_empty());
    }
}
