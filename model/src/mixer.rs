//! The attention of a block, by `model.attention.kind`: standard multi-head attention
//! ([`Attention`]) or multi-head latent attention ([`Mla`]).

use crate::attention::Attention;
use crate::config::{AttentionKind, ModelConfig};
use crate::mla::Mla;
use crate::rope::Rope;
use crate::{Param, Result};
use tch::{Device, Kind, Tensor};

/// One block's attention.
#[derive(Debug)]
pub enum TokenMixer {
    /// Multi-head (grouped-query) attention.
    Mha(Attention),
    /// Multi-head latent attention.
    Mla(Mla),
}

impl TokenMixer {
    /// The kind `cfg.attention.kind` names, weights under `prefix`.
    pub fn new(cfg: &ModelConfig, prefix: &str, seed: u64, device: Device) -> Result<Self> {
        Ok(match cfg.attention.kind {
            AttentionKind::Mha => Self::Mha(Attention::new(cfg, prefix, seed, device)?),
            AttentionKind::Mla => Self::Mla(Mla::new(cfg, prefix, seed, device)?),
        })
    }

    /// Causal self-attention; `rope` rotates [`ModelConfig::rope_dim`] channels.
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> `[b, t, d]`
    pub fn forward(&self, x_btd: &Tensor, rope: &Rope, compute_kind: Kind) -> Result<Tensor> {
        match self {
            Self::Mha(a) => a.forward(x_btd, rope, compute_kind),
            Self::Mla(a) => a.forward(x_btd, rope, compute_kind),
        }
    }

    /// The weights, named under `prefix`.
    pub fn params(&self, prefix: &str) -> Vec<Param> {
        match self {
            Self::Mha(a) => a.params(prefix),
            Self::Mla(a) => a.params(prefix),
        }
    }
}
