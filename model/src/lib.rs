//! moe-model: router, token dispatcher, experts, MoE layer, attention and the transformer LM.
//!
//! Shape suffixes (torchtitan's legend): `b` batch, `t` sequence, `n` tokens (b*t), `d` model
//! width, `h` hidden width, `e` experts (global), `l` local experts, `k` top-k, `m` permuted
//! rows (kept token-expert assignments), `v` vocabulary, `p` peers (EP ranks).
//!
//! The model knows nothing of files, the CLI or logging; it communicates only through the
//! dispatcher's exchange step.

pub mod attention;
pub mod builder;
pub mod config;
pub mod count;
pub mod deltanet;
pub mod dispatcher;
pub mod error;
pub mod experts;
pub mod gated_attention;
pub(crate) mod heads;
pub mod init;
pub mod kv_cache;
pub mod mixer;
pub mod mla;
pub mod mlp;
pub mod moe_layer;
pub mod mtp;
pub mod norm;
pub mod observe;
pub mod parallel;
pub mod param;
pub mod rope;
pub mod router;
pub mod transformer;

pub use builder::ParamBuilder;
pub use error::{ModelError, Result};
pub use parallel::ExpertParallel;
pub use param::{Param, ParamKind};
