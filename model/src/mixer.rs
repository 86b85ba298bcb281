//! The attention of a block, by `model.attention.kind`: standard multi-head attention
//! ([`Attention`]), multi-head latent attention ([`Mla`]), or Qwen3-Next's hybrid of gated
//! DeltaNet ([`GatedDeltaNet`]) and gated full attention ([`GatedAttention`]).

use crate::attention::Attention;
use crate::config::{AttentionKind, ModelConfig};
use crate::deltanet::GatedDeltaNet;
use crate::gated_attention::GatedAttention;
use crate::kv_cache::LayerKv;
use crate::mla::Mla;
use crate::rope::Rope;
use crate::{ModelError, ParamBuilder, Result};
use tch::{Kind, Tensor};

/// One block's attention.
#[derive(Debug)]
pub enum TokenMixer {
    /// Multi-head (grouped-query) attention.
    Mha(Attention),
    /// Multi-head latent attention.
    Mla(Mla),
    /// Gated DeltaNet linear attention.
    DeltaNet(GatedDeltaNet),
    /// Gated full attention that rotates the first `rotary` channels of each head.
    Gated {
        /// The attention.
        attn: GatedAttention,
        /// RoPE width.
        rotary: i64,
    },
}

impl TokenMixer {
    /// The kind `cfg.attention.kind` names for block `layer`, parameters under `vb`.
    pub fn new(cfg: &ModelConfig, layer: i64, vb: &ParamBuilder) -> Result<Self> {
        Ok(match cfg.attention.kind {
            AttentionKind::Mha => Self::Mha(Attention::new(cfg, vb)?),
            AttentionKind::Mla => Self::Mla(Mla::new(cfg, vb)?),
            AttentionKind::GatedDeltanet if cfg.attention.is_full_attention(layer) => Self::Gated {
                attn: GatedAttention::new(cfg, vb)?,
                rotary: cfg.rope_dim(),
            },
            AttentionKind::GatedDeltanet => Self::DeltaNet(GatedDeltaNet::new(cfg, vb)?),
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
            Self::DeltaNet(a) => a.forward(x_btd, compute_kind),
            Self::Gated { attn, rotary } => attn.forward(x_btd, rope, *rotary, compute_kind),
        }
    }

    /// [`TokenMixer::forward`] for new positions after those cached in `kv`. Only standard
    /// attention caches (see [`TokenMixer::supports_kv_cache`]); the other kinds are an error.
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> `[b, t, d]`
    pub fn forward_cached(
        &self,
        x_btd: &Tensor,
        rope: &Rope,
        compute_kind: Kind,
        kv: &mut LayerKv,
    ) -> Result<Tensor> {
        match self {
            Self::Mha(a) => a.forward_cached(x_btd, rope, compute_kind, kv),
            _ => Err(ModelError::Invalid(format!(
                "{} attention has no KV cache: decode it with the uncached forward",
                self.kind_name()
            ))),
        }
    }

    /// Whether [`TokenMixer::forward_cached`] works: standard attention only. MLA (whose
    /// cache would hold the compressed latent) and gated DeltaNet (a recurrent state) take
    /// the uncached path.
    pub fn supports_kv_cache(&self) -> bool {
        matches!(self, Self::Mha(_))
    }

    /// The `model.attention.kind` name of this mixer.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::Mha(_) => "mha",
            Self::Mla(_) => "mla",
            Self::DeltaNet(_) | Self::Gated { .. } => "gated_deltanet",
        }
    }
}
