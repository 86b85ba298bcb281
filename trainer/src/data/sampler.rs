//! Which windows of the corpus a step trains on: a pure function of (seed, split, index).
//!
//! # Layout of a step's global batch
//!
//! Step `s` draws a *global batch* of `G = batch_size * world_size * grad_accum` windows of
//! `seq_len + 1` tokens. Window `g` (`0 <= g < G`) starts at
//! `hash(seed, split, s, g) mod (len - seq_len)` (see [`window_start`]), so it does not
//! depend on the world size, the rank, or any earlier step. The global batch is laid out
//! micro-step major, then rank, then sequence:
//!
//! ```text
//! micro-step a, rank r  ->  windows [(a * world + r) * B, (a * world + r + 1) * B)
//! ```
//!
//! Concatenating the ranks' slices of micro-step `a` in rank order gives windows
//! `[a * world * B, (a + 1) * world * B)`: exactly micro-step `a` of a single process with
//! `batch_size = world * B` and the same `grad_accum`. Each micro-step of an EP=P run
//! therefore sees the same tokens as the single-process reference, which is what the
//! EP-equivalence tests compare.
//!
//! # Resume
//!
//! There is no sampler state: the data cursor of a checkpoint is just the next step, and
//! resuming at step `s` draws the same windows as the uninterrupted run did.
//!
//! # Eval
//!
//! Validation batches use the same rule on the validation split with an eval index in place
//! of the step (the trainer uses `0..eval_iters`, so every eval sees the same windows and the
//! val-loss curve is not noisy from resampling).

use crate::{Result, TrainError};
use std::ops::Range;

/// Which part of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The first 90% (or `train.bin`).
    Train,
    /// The last 10% (or `val.bin`).
    Val,
}

impl Split {
    /// `"training"` / `"validation"`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "training",
            Split::Val => "validation",
        }
    }

    /// Distinct per split, so that train step 0 and eval index 0 draw unrelated windows.
    fn tag(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e00_0001,
            Split::Val => 0x7661_6c00_0000_0002,
        }
    }
}

/// How a step's global batch is cut into per-rank micro-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerSpec {
    /// `run.seed`: together with the split and step it fixes every window.
    pub seed: u64,
    /// Tokens per sequence T; windows are T+1 tokens (inputs and shifted targets).
    pub seq_len: i64,
    /// Sequences per rank per micro-batch (B).
    pub batch_size: i64,
    /// Number of data-parallel ranks (all ranks of the world).
    pub world_size: i64,
    /// This rank, in `0..world_size`.
    pub rank: i64,
    /// Micro-batches per optimizer step.
    pub grad_accum: i64,
}

impl SamplerSpec {
    /// Sequences in a step's global batch: `batch_size * world_size * grad_accum`.
    pub fn global_batch(&self) -> i64 {
        self.batch_size * self.world_size * self.grad_accum
    }

    /// Indices into the global batch of this rank's micro-batch `micro` (see the module docs).
    pub fn micro_range(&self, micro: i64) -> Range<i64> {
        let first = (micro * self.world_size + self.rank) * self.batch_size;
        first..first + self.batch_size
    }

    /// Checks the fields are usable; the error names the offending field and value.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(TrainError::Data(format!("invalid sampler: {what}")));
        if self.seq_len <= 0 {
            return bad(format!("seq_len ({}) must be positive", self.seq_len));
        }
        if self.batch_size <= 0 {
            return bad(format!("batch_size ({}) must be positive", self.batch_size));
        }
        if self.world_size <= 0 {
            return bad(format!("world_size ({}) must be positive", self.world_size));
        }
        if !(0..self.world_size).contains(&self.rank) {
            return bad(format!(
                "rank ({}) must be in 0..{}",
                self.rank, self.world_size
            ));
        }
        if self.grad_accum <= 0 {
            return bad(format!("grad_accum ({}) must be positive", self.grad_accum));
        }
        Ok(())
    }
}

/// One round of SplitMix64 (Steele, Lea & Flood 2014): a bijective 64-bit mixer, written out
/// here rather than taken from `rand` so the data order never changes with a crate upgrade.
pub(crate) fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Start of window `g` of the global batch `index` of `split`, uniform in `0..num_starts`.
///
/// The range reduction is Lemire's multiply-shift; its bias is at most `num_starts / 2^64`.
pub fn window_start(seed: u64, split: Split, index: u64, g: u64, num_starts: u64) -> u64 {
    let mut h = splitmix64(seed ^ 0x6D6F_652D_6461_7461);
    h = splitmix64(h ^ split.tag());
    h = splitmix64(h ^ index);
    h = splitmix64(h ^ g);
    ((u128::from(h) * u128::from(num_starts)) >> 64) as u64
}
