//! Training data: corpora (generated, text file, or token files; bytes or a tokenizer's ids), the
//! stateless per-step sampler, and the background prefetcher.
//!
//! Sampling follows the nanoGPT recipe (random windows of `seq_len + 1` tokens), made
//! world-size invariant: see [`sampler`] for the layout of a step's global batch.

pub mod batch;
pub mod dataset;
pub mod prefetch;
pub mod prepare;
pub mod sampler;
pub mod sidecar;
pub mod synthetic;
pub mod text;
pub mod tokens;

pub use batch::Batch;
pub use dataset::{load_dataset, Dataset, Origin};
pub use prefetch::Prefetcher;
pub use sampler::{window_start, SamplerSpec, Split};
