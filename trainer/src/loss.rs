//! The language-model losses of a forward pass: token cross-entropy, the multi-token
//! prediction term (DeepSeek-V3, §2.2), and the training loss that adds the router's aux and
//! z losses. Shared by the training loop, evaluation and `moe bench`.

use crate::Result;
use moe_model::transformer::LmOutput;
use tch::{Kind, Tensor};

/// Mean token cross-entropy in float32.
///
/// # Shapes
/// logits `[b, t, v]`, targets `[b, t]` -> scalar
pub fn lm_loss(logits_btv: &Tensor, targets_bt: &Tensor) -> Result<Tensor> {
    let v = logits_btv.size().last().copied().unwrap_or(0);
    Ok(logits_btv
        .f_to_kind(Kind::Float)?
        .f_reshape([-1, v])?
        .f_cross_entropy_loss::<Tensor>(
            &targets_bt.f_reshape([-1])?,
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )?)
}

/// Multi-token prediction loss: the cross-entropy of `mtp_logits_btv` (position i predicts
/// the token after next) against `targets_bt[:, 1:]`.
///
/// # Shapes
/// `mtp_logits_btv [b, t-1, v]`, `targets_bt [b, t]` -> scalar
pub fn mtp_loss(mtp_logits_btv: &Tensor, targets_bt: &Tensor) -> Result<Tensor> {
    let t = targets_bt.size().get(1).copied().unwrap_or(0);
    lm_loss(mtp_logits_btv, &targets_bt.f_narrow(1, 1, t - 1)?)
}

/// The loss a training step differentiates, and its LM term (logged on its own):
/// `lm + aux + z (+ mtp_weight * mtp)`, added in that order.
///
/// # Shapes
/// `out.logits_btv [b, t, v]`, `targets_bt [b, t]` -> (scalar, scalar)
pub fn train_loss(
    out: &LmOutput,
    targets_bt: &Tensor,
    mtp_weight: f64,
) -> Result<(Tensor, Tensor)> {
    let lm = lm_loss(&out.logits_btv, targets_bt)?;
    let mut loss = lm.f_add(&out.aux_loss)?.f_add(&out.z_loss)?;
    if let Some(mtp_logits) = &out.mtp_logits_btv {
        loss = loss.f_add(&mtp_loss(mtp_logits, targets_bt)?.f_mul_scalar(mtp_weight)?)?;
    }
    Ok((loss, lm))
}
