use std::path::PathBuf;
use thiserror::Error;

/// Errors of the trainer crate. Every file-related variant names the file.
#[derive(Debug, Error)]
pub enum TrainError {
    #[error("tensor operation failed: {0}")]
    Tch(#[from] tch::TchError),
    #[error(transparent)]
    Model(#[from] moe_model::ModelError),
    #[error(transparent)]
    Comm(#[from] moe_comm::CommError),
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("data error: {0}")]
    Data(String),
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("invalid config:\n  {}", .0.join("\n  "))]
    Config(Vec<String>),
    #[error("training diverged: {0}")]
    Diverged(String),
    #[error("{0}")]
    Other(String),
}

impl TrainError {
    /// An I/O error on `path`, with the path in the message.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Self {
        TrainError::File {
            path: path.into(),
            msg: err.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, TrainError>;
