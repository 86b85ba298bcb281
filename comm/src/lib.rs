//! moe-comm: the communication layer of the expert-parallel trainer.
//!
//! A [`Communicator`] moves tensors between the ranks of one group. Backends:
//! `local` (size 1), `threads` (in-process ranks over shared memory, for tests and
//! debug mode), `mpi` (rsmpi over OpenMPI, CPU tensors) and `nccl` (cudarc, CUDA tensors).
//! Communication is fallible: every collective returns a `Result`, never panics, because
//! one rank's panic leaves its peers hung inside a collective.

mod args;
pub mod autograd;
pub mod cuda;
mod error;
mod groups;
mod local;
pub mod mpi_backend;
pub mod nccl;
mod placement;
pub mod threads;
pub mod watchdog;

pub use error::{CommError, Result};
pub use groups::ProcessGroups;
pub use local::LocalComm;
pub use placement::{
    check_device, check_kind, host_read, host_reads, pin_memory, set_strict, strict, Placement,
};

use std::sync::{Arc, Mutex};
use tch::{Device, Tensor};

/// The message a C++ shim entry point wrote into its error buffer (NUL-terminated, by
/// build-support/include/moe_shim_guard.h's `guarded`), for every crate that calls a shim.
pub fn shim_message(buf: &[u8]) -> String {
    std::ffi::CStr::from_bytes_until_nul(buf)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown error".into())
}

/// A group of ranks that run collectives together. Every rank of the group must call the
/// same collectives in the same order (MPI semantics).
///
/// `Send` (a rank may hand its communicator to an autograd worker thread) but not `Sync`:
/// share it as a [`SharedComm`].
pub trait Communicator: Send {
    /// This rank's index in the group, `0..size`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// Backend name for logs: "local", "threads", "mpi", "nccl".
    fn backend(&self) -> &'static str;
    /// The device of the tensors this communicator moves: CPU for mpi, the rank's GPU for
    /// nccl, the rank's device for local and threads. Every backend rejects other devices
    /// (local and threads in [`strict`] mode, where they act as NCCL would).
    fn device(&self) -> Device;

    /// All-to-all with per-peer split sizes along dim 0.
    ///
    /// `input` rows are cut into consecutive blocks of `send_splits[p]` rows, block p going
    /// to peer p; the result is the concatenation over p of the `recv_splits[p]` rows received
    /// from peer p. Trailing dims and dtype are those of `input`; zero-row blocks are allowed.
    ///
    /// # Shapes
    /// input `[sum(send_splits), ...]` -> output `[sum(recv_splits), ...]`
    fn all_to_all(
        &mut self,
        input: &Tensor,
        send_splits: &[i64],
        recv_splits: &[i64],
    ) -> Result<Tensor>;

    /// Element-wise sum over all ranks; returns a new tensor, `input` is untouched.
    fn all_reduce_sum(&mut self, input: &Tensor) -> Result<Tensor>;

    /// Every rank's `input` (same shape on all ranks), stacked: `[size, ...input.shape]`.
    fn all_gather(&mut self, input: &Tensor) -> Result<Tensor>;

    /// `root`'s `input`, returned on every rank (other ranks pass a tensor of the same shape
    /// and dtype, whose values are ignored).
    fn broadcast(&mut self, input: &Tensor, root: usize) -> Result<Tensor>;

    /// Blocks until every rank of the group has entered it.
    fn barrier(&mut self) -> Result<()>;

    /// Collective over this group: ranks passing the same `color` form a new group, ordered
    /// by `key` (ties by rank). Like `MPI_Comm_split`.
    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>>;
}

/// A communicator shared between the model (dispatcher), autograd (the backward of the
/// differentiable all-to-all) and the trainer (gradient sync).
pub type SharedComm = Arc<Mutex<Box<dyn Communicator>>>;

/// Wraps a communicator for sharing.
pub fn shared(comm: Box<dyn Communicator>) -> SharedComm {
    Arc::new(Mutex::new(comm))
}

/// Locks a shared communicator, turning a poisoned lock into an error.
pub fn lock(comm: &SharedComm) -> Result<std::sync::MutexGuard<'_, Box<dyn Communicator>>> {
    comm.lock().map_err(|_| CommError::Poisoned)
}
