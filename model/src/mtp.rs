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
use crate::rope::Rope;
use crate::transformer::{Block, LmForward, ParallelInfo};
use crate::{init, ModelError, Param, ParamKind, Result};
use tch::{Device, Tensor};

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
    /// Weights under `layers.{num_layers}`.
    pub(crate) fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        par: ParallelInfo,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let (d, l) = (model.d_model, model.num_layers);
        Ok(Self {
            enorm: RmsNorm::new(d, model.norm_eps, device)?,
            hnorm: RmsNorm::new(d, model.norm_eps, device)?,
            eh_proj: init::normal(
                seed,
                &format!("layers.{l}.eh_proj"),
                0,
                &[2 * d, d],
                model.init_std,
                device,
            )?,
            block: Block::new(model, moe, par, l, seed, device)?,
            norm: RmsNorm::new(d, model.norm_eps, device)?,
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

    /// `layers.{i}.{enorm,hnorm}.weight`, `layers.{i}.eh_proj`, the block's parameters and
    /// `layers.{i}.norm.weight`, with `i = num_layers`.
    pub(crate) fn params(&self, i: i64) -> Vec<Param> {
        let mut out = self.enorm.params(&format!("layers.{i}.enorm"));
        out.extend(self.hnorm.params(&format!("layers.{i}.hnorm")));
        out.push(Param {
            name: format!("layers.{i}.eh_proj"),
            tensor: self.eh_proj.shallow_clone(),
            kind: ParamKind::Dense,
            weight_decay: true,
        });
        out.extend(self.block.params(i));
        out.extend(self.norm.params(&format!("layers.{i}.norm")));
        out
    }
}
