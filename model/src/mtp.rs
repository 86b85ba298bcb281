//! Multi-token prediction of depth 1 (DeepSeek-V3, arXiv:2412.19437, section 2.2): one extra
//! transformer block that predicts the token after next.
//!
//! For position i of the main model's last hidden state `h_i` (before the final norm) and the
//! embedding of the next token `t_{i+1}` (the shared embedding):
//! `h'_i = W_eh [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)]`, then the block, a final RMSNorm and the
//! shared LM head give logits for `t_{i+2}`. The concatenation puts the embedding first, as
//! the released checkpoint's `eh_proj` expects (the paper writes the other order). The block
//! is `layers.{num_layers}` and follows the main model's rule for MoE blocks, so in
//! DeepSeek-V3 it is an MoE block.

use crate::config::{ModelConfig, MoeConfig};
use crate::moe_layer::MoeStats;
use crate::norm::{accum_kind, RmsNorm};
use crate::parallel::ExpertParallel;
use crate::rope::Rope;
use crate::transformer::{Block, LmForward};
use crate::{ModelError, ParamBuilder, Result};
use tch::Tensor;

/// The prediction module.
#[derive(Debug)]
pub(crate) struct Mtp {
    enorm: RmsNorm,
    hnorm: RmsNorm,
    /// `[2d, d]`: the projection of the concatenated normalised embedding and hidden state.
    eh_proj: Tensor,
    pub(crate) block: Block,
    norm: RmsNorm,
    /// Its block index, `num_layers`.
    index: i64,
}

impl Mtp {
    /// Parameters under `vb` = `layers.{num_layers}`: `{enorm,hnorm}.weight`, `eh_proj`, the
    /// block's parameters and `norm.weight`.
    pub(crate) fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        par: &ExpertParallel,
        vb: &ParamBuilder,
    ) -> Result<Self> {
        let (d, l) = (model.d_model, model.num_layers);
        Ok(Self {
            enorm: RmsNorm::new(&vb.pp("enorm"), d, model.norm_eps)?,
            hnorm: RmsNorm::new(&vb.pp("hnorm"), d, model.norm_eps)?,
            eh_proj: vb.normal("eh_proj", &[2 * d, d], model.init_std)?,
            block: Block::new(model, moe, par, l, vb)?,
            norm: RmsNorm::new(&vb.pp("norm"), d, model.norm_eps)?,
            index: l,
        })
    }

    /// Logits `[b, t-1, v]` for the tokens after next, and the block's MoE statistics.
    ///
    /// # Shapes
    /// `h_btd [b, t, d]` (the residual stream after the last block), `tokens_bt [b, t]` with
    /// `t > 1`, `embed_vd`, `head_vd [v, d]` -> `[b, t-1, v]`
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        h_btd: &Tensor,
        tokens_bt: &Tensor,
        embed_vd: &Tensor,
        head_vd: &Tensor,
        rope: &Rope,
        ctx: &LmForward,
        seed: u64,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        let t = tokens_bt.size().get(1).copied().unwrap_or(0);
        if t < 2 {
            return Err(ModelError::Invalid(format!(
                "multi-token prediction needs sequences of at least 2 tokens, got {t}"
            )));
        }
        let ck = ctx.compute_kind;
        let res_kind = accum_kind(ck);
        let next_bt = tokens_bt.f_narrow(1, 1, t - 1)?;
        let e_btd =
            Tensor::f_embedding(embed_vd, &next_bt, -1, false, false)?.f_to_kind(res_kind)?;
        let h_btd = h_btd.f_narrow(1, 0, t - 1)?;
        let cat_btd = Tensor::f_cat(
            &[self.enorm.forward(&e_btd)?, self.hnorm.forward(&h_btd)?],
            2,
        )?;
        let x_btd = cat_btd
            .f_to_kind(ck)?
            .f_matmul(&self.eh_proj.f_to_kind(ck)?)?
            .f_to_kind(res_kind)?;
        let (y_btd, stats) = self.block.forward(&x_btd, rope, ctx, self.index, seed)?;
        let logits_btv = self
            .norm
            .forward(&y_btd)?
            .f_to_kind(ck)?
            .f_matmul(&head_vd.f_to_kind(ck)?.f_tr()?)?
            .f_to_kind(res_kind)?;
        Ok((logits_btv, stats))
    }
}
