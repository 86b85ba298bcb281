//! Checkpoint surgery: checkpoint-to-checkpoint operations beside training
//! (`shared/DESIGN.md`, "Checkpoint tools"). Each reads a checkpoint of any EP size through
//! [`crate::checkpoint::CheckpointReader`], transforms tensors with pure functions tested on
//! tiny models against hand-computed results, and writes a run directory (`config.yaml` plus
//! a fresh-optimizer checkpoint through [`crate::checkpoint::Checkpointer`]) that `moe train
//! --resume auto`, `moe eval` and `moe generate` accept at any `parallel.ep_size`.
//!
//! Errors reuse the checkpoint tools' [`crate::hf::HfError`]: `Input` (exit 2) or `Failed`.

pub mod calib;
pub mod depth;
pub mod merge;
pub mod report;
pub mod run_out;
pub mod slim;
pub mod upcycle;
pub mod width;

pub use calib::Share;
pub use report::{ModelSize, SlimDetails, SurgeryReport};
pub use slim::{slim, slim_shared, ExpertCriterion, SlimOptions};
pub use upcycle::{upcycle, UpcycleOptions};
