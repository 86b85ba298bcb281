use thiserror::Error;

/// Errors of the communication layer.
#[derive(Debug, Error)]
pub enum CommError {
    #[error("tensor operation failed in a collective: {0}")]
    Tch(#[from] tch::TchError),
    #[error("invalid arguments to {op}: {msg}")]
    InvalidArgument { op: &'static str, msg: String },
    #[error("peer rank {rank} is gone ({cause}); aborting the collective")]
    PeerGone { rank: usize, cause: String },
    #[error("collective {op} timed out after {secs} s waiting for rank {rank}")]
    Timeout {
        op: &'static str,
        rank: usize,
        secs: u64,
    },
    #[error("backend {backend} is not available: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("MPI error: {0}")]
    Mpi(String),
    #[error("NCCL error: {0}")]
    Nccl(String),
    #[error(
        "{op}: {msg} (a tensor on the wrong device or of the wrong kind: on a GPU this \
             fails inside NCCL)"
    )]
    Device { op: &'static str, msg: String },
    #[error("a communicator lock was poisoned by a panic on another thread")]
    Poisoned,
    /// A collective's watchdog gave up: a timeout or an asynchronous error; the
    /// communicator was aborted.
    #[error("{0}")]
    Watchdog(crate::watchdog::Failure),
}

pub type Result<T> = std::result::Result<T, CommError>;
