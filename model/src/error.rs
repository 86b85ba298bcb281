use thiserror::Error;

/// Errors of the model crate.
#[derive(Debug, Error)]
pub enum ModelError {
    #[error("tensor operation failed: {0}")]
    Tch(#[from] tch::TchError),
    #[error(transparent)]
    Comm(#[from] moe_comm::CommError),
    #[error("invalid model input: {0}")]
    Invalid(String),
    #[error("routing invariant violated in layer {layer}: {msg}")]
    Invariant { layer: i64, msg: String },
}

pub type Result<T> = std::result::Result<T, ModelError>;
