//! The loop's side of checkpoints: where a run starts (`--resume`, `--init-from`), when it
//! saves (every `checkpoint.every` steps, at the last step, on a stop signal, when it
//! diverges), and what a snapshot holds. Writing is the background [`Checkpointer`]'s.

use super::Trainer;
use crate::checkpoint::{load_for_rank, Checkpointer, ExpertSlot, Snapshot};
use crate::config::ExperimentConfig;
use crate::{Result, TrainError};
use moe_comm::ProcessGroups;
use std::path::{Path, PathBuf};

/// Saves checkpoints when they are due.
pub(super) struct TrainCheckpointer {
    writer: Checkpointer,
    /// `checkpoint.every` (0: only at the end).
    every: u64,
    /// `trainer.max_steps`: the last step always saves.
    max_steps: u64,
}

impl TrainCheckpointer {
    /// This rank's checkpointer over `checkpoint.dir` (default `<out_dir>/checkpoints`).
    pub fn new(cfg: &ExperimentConfig, g: &ProcessGroups) -> Result<Self> {
        let dir = cfg
            .checkpoint
            .dir
            .clone()
            .unwrap_or_else(|| cfg.run.out_dir.join("checkpoints"));
        let writer = Checkpointer::new(
            &dir,
            cfg.checkpoint.keep,
            g.world_rank as i64,
            g.ep_rank as i64,
            g.ep_size as i64,
            g.world_size as i64,
        )?
        .with_tokenizer(cfg.data.tokenizer_file())?;
        Ok(Self {
            writer,
            every: cfg.checkpoint.every,
            max_steps: cfg.trainer.max_steps,
        })
    }

    /// After step `done` (1-based): saves the state `snapshot` gives when a periodic
    /// checkpoint is due, at the last step, or when `stopping`; returns where.
    pub fn save(
        &mut self,
        done: u64,
        stopping: bool,
        snapshot: impl FnOnce() -> Result<Snapshot>,
    ) -> Result<Option<PathBuf>> {
        if due(done, self.every, self.max_steps, stopping) {
            return self.save_now(snapshot()?).map(Some);
        }
        Ok(None)
    }

    /// Hands `snapshot` to the background writer now; returns the checkpoint's directory.
    pub fn save_now(&mut self, snapshot: Snapshot) -> Result<PathBuf> {
        self.writer.save(snapshot)
    }

    /// Waits for the write in flight, if any.
    pub fn wait(&mut self) -> Result<()> {
        self.writer.wait()
    }
}

impl Trainer<'_> {
    /// Copies the state after `step` optimizer steps to host memory, ready for the writer.
    pub(super) fn snapshot(&self, step: u64) -> Result<Snapshot> {
        Ok(Snapshot {
            step,
            optim_step: self.optimizer.step_count(),
            // The data order is a pure function of (seed, step): the step is the data cursor.
            extra: serde_json::json!({ "data_step": step, "seed": self.cfg.run.seed }),
            config_yaml: serde_json::to_string_pretty(self.cfg)
                .map_err(|e| TrainError::Other(format!("serialising the config: {e}")))?,
            ..Snapshot::from_params(&self.params, &self.model.buffers(), self.optimizer.state())?
        })
    }

    /// Loads `--resume` (weights, buffers, optimizer state) or `--init-from` (weights and
    /// buffers only: step 0, a new optimizer); returns the step to start at.
    pub(super) fn load_start_state(&mut self) -> Result<u64> {
        let opts = self.opts;
        let mut start_step = 0u64;
        if let Some(path) = &opts.resume {
            start_step = self.restore(path)?;
            self.say(&format!(
                "resumed from {} at step {start_step}",
                path.display()
            ));
        }
        if let (Some(path), None) = (&opts.init_from, &opts.resume) {
            self.load_weights(path)?;
            self.say(&format!(
                "initialised the weights from {} (step 0, a new optimizer)",
                path.display()
            ));
        }
        Ok(start_step)
    }

    /// Loads weights, buffers and optimizer state for this rank; returns the step to resume at.
    fn restore(&mut self, path: &Path) -> Result<u64> {
        let slots = ExpertSlot::from_params(&self.params, self.cfg.moe.num_experts);
        let loaded = load_for_rank(path, &slots)?;
        loaded.copy_into(&self.params, &self.model.buffers())?;
        self.optimizer
            .load_state(&loaded.optim, loaded.optim_step)?;
        Ok(loaded.step)
    }

    /// Weights and buffers only (`--init-from`): the optimizer state is not read.
    fn load_weights(&mut self, path: &Path) -> Result<()> {
        let slots = ExpertSlot::from_params(&self.params, self.cfg.moe.num_experts);
        let mut loaded = load_for_rank(path, &slots)?;
        loaded.optim.clear();
        loaded.copy_into(&self.params, &self.model.buffers())
    }

    /// A line from world rank 0, unless quiet.
    fn say(&self, line: &str) {
        if self.printing {
            crate::progress::print_line(line);
        }
    }
}

/// Whether step `done` (1-based) saves: every `every` steps (0: never periodically), at the
/// last step `max_steps`, and when `stopping`.
fn due(done: u64, every: u64, max_steps: u64, stopping: bool) -> bool {
    (every > 0 && done.is_multiple_of(every)) || done == max_steps || stopping
}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn saves_periodically_at_the_last_step_and_when_stopping() {
        let saved = |every, stopping| -> Vec<u64> {
            (1..=10).filter(|&d| due(d, every, 10, stopping)).collect()
        };
        assert_eq!(saved(4, false), [4, 8, 10]);
        assert_eq!(saved(0, false), [10]);
        assert_eq!(saved(0, true).len(), 10);
    }
}
