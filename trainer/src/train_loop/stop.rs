//! When a run ends early: too many non-finite steps in a row (`trainer.max_bad_steps`), or a
//! stop signal (SIGINT/SIGTERM), which the step statistics carry to every rank at once.

use crate::TrainError;
use std::path::Path;

/// Counts skipped steps and decides when the run has diverged.
pub(super) struct StopPolicy {
    max_bad_steps: u64,
    bad_in_a_row: u64,
}

impl StopPolicy {
    pub fn new(max_bad_steps: u64) -> Self {
        Self {
            max_bad_steps,
            bad_in_a_row: 0,
        }
    }

    /// A step was skipped; returns how many in a row now.
    pub fn bad_step(&mut self) -> u64 {
        self.bad_in_a_row += 1;
        self.bad_in_a_row
    }

    /// A step was applied: the count of bad steps in a row starts again.
    pub fn good_step(&mut self) {
        self.bad_in_a_row = 0;
    }

    /// Whether the run must end as diverged (after checkpointing where it stands).
    pub fn diverged(&self) -> bool {
        self.bad_in_a_row >= self.max_bad_steps
    }

    /// The error a diverged run ends with, naming the checkpoint it left.
    pub fn diverged_error(&self, checkpoint: &Path) -> TrainError {
        TrainError::Diverged(format!(
            "{} steps in a row had non-finite values (trainer.max_bad_steps = {}); last checkpoint: {}",
            self.bad_in_a_row,
            self.max_bad_steps,
            checkpoint.display()
        ))
    }
}

/// What world rank 0 says when a stop signal ended the run after step `done` (1-based).
pub(super) fn signal_message(done: u64, max_steps: u64, checkpoint: Option<&Path>) -> String {
    format!(
        "stopped by signal after step {done} of {max_steps}; checkpoint: {} (continue with --resume auto)",
        checkpoint
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "none".into())
    )
}

#[cfg(test)]
mod tests {
    use super::StopPolicy;

    #[test]
    fn diverges_after_max_bad_steps_in_a_row_only() {
        let mut p = StopPolicy::new(3);
        assert_eq!((p.bad_step(), p.bad_step()), (1, 2));
        assert!(!p.diverged());
        p.good_step();
        assert_eq!((p.bad_step(), p.bad_step(), p.bad_step()), (1, 2, 3));
        assert!(p.diverged());
        let msg = p
            .diverged_error(std::path::Path::new("ckpt/step_9"))
            .to_string();
        assert!(
            msg.contains("3 steps in a row") && msg.contains("ckpt/step_9"),
            "{msg}"
        );
    }
}
