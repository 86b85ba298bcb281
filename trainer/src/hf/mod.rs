//! Into and out of the Hugging Face ecosystem: exact export to and import from the
//! `transformers` MoE architectures, table-driven (one [`arch::ArchSpec`] per architecture,
//! read forwards for export and backwards for import) over the checkpoint stream
//! ([`crate::checkpoint::CheckpointReader`]).

pub mod arch;
pub mod config_map;
pub mod export;
pub mod import;
pub mod names;
pub mod outdir;
pub mod shards;

pub use arch::Arch;
pub use export::{export, ExportOptions, ExportReport, DEFAULT_MAX_SHARD_BYTES};
pub use import::{import, ImportReport};
pub use shards::ExportDtype;

use thiserror::Error;

/// Errors of export and import.
#[derive(Debug, Error)]
pub enum HfError {
    /// Input the user must fix: a config the target does not compute, a damaged or
    /// mismatched file, an output directory in the way. Each message names the file or key.
    #[error("{0}")]
    Input(String),
    /// Writing failed (disk full, permissions) or a tensor operation failed.
    #[error("{0}")]
    Failed(String),
}
