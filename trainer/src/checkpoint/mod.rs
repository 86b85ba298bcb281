//! Checkpoints: weights and optimizer state in safetensors files plus a JSON manifest.
//!
//! Layout (one directory per step, in the spirit of Megatron-Core's distributed checkpoints,
//! which store sharded tensors under their global index so any parallel layout can read them):
//!
//! ```text
//! <dir>/step-00000100/
//!     dense.safetensors        world rank 0: dense params, buffers, `optim.<name>.<stat>`
//!     experts-r<k>.safetensors ep rank k of the first expert-data-parallel replica: one
//!                              tensor per GLOBAL expert, `layers.3.moe.experts.17.w_gate`
//!                              and `optim.layers.3.moe.experts.17.w_gate.exp_avg`
//!     tokenizer.json           world rank 0, when the run has a `data.tokenizer`: a copy
//!     manifest.json            written last: step, sizes, sha256 and tensor list per file
//! ```
//!
//! Files are in the safetensors format (<https://github.com/huggingface/safetensors>),
//! float32, readable by the Python `safetensors` package. A checkpoint is built in
//! `step-N.tmp/` and renamed to `step-N/` only once its manifest is durable, so a process
//! killed at any moment leaves the previous complete checkpoint or the new one.

mod format;
mod fsutil;
mod load;
mod manifest;
mod snapshot;
mod stfile;
mod stream;
mod streamed;
mod verify;
mod writer;

pub use load::{config_mismatch, load_for_rank, ExpertSlot, Loaded};
pub use manifest::{
    expert_tensor_name, ExpertEntry, FileEntry, Manifest, TensorEntry, FORMAT_NAME, FORMAT_VERSION,
    TOKENIZER_FILE,
};
pub use snapshot::{ExpertTensor, Snapshot};
pub use stfile::{StDtype, StFile, StTensor};
pub use stream::{split_expert_name, CheckpointReader};
pub use streamed::{write_streamed, StreamedCheckpoint};
pub use verify::{find_latest_intact, list_checkpoints, read_manifest, stored_tokenizer, verify};
pub use writer::{Checkpointer, WriteHook};
