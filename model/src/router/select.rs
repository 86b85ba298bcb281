//! Score function, deterministic top-k and the k routing weights of each token.

use crate::config::{MoeConfig, ScoreFunction};
use crate::Result;
use tch::{Kind, Tensor};

/// Added to the sum of the k weights before renormalising, as Megatron-Core does, so that
/// sigmoid scores that all underflow give zeros instead of NaN.
const RENORM_EPS: f64 = 1e-20;

/// Indices `[N, k]` of the k largest entries of each row, ties to the lower column index.
///
/// `torch.topk` leaves the order of ties unspecified (and CPU and CUDA differ); a stable
/// descending sort keeps equal entries in index order, so routing is reproducible everywhere.
pub(crate) fn topk_indices(scores_ne: &Tensor, k: i64) -> Result<Tensor> {
    let (_, order_ne) = scores_ne.f_detach()?.f_sort_stable(true, 1, true)?;
    Ok(order_ne.f_narrow(1, 0, k)?)
}

/// Bool `[N, E]` map with `true` at each selected `(n, idx_nk[n, j])`.
pub(crate) fn indices_to_map(idx_nk: &Tensor, num_experts: i64) -> Result<Tensor> {
    let n = idx_nk.size()[0];
    let zeros_ne = Tensor::f_zeros([n, num_experts], (Kind::Bool, idx_nk.device()))?;
    Ok(zeros_ne.f_scatter_value(1, idx_nk, 1)?)
}

/// The selected experts of every token and their routing weights.
pub(crate) struct Selection {
    /// i64 `[N, k]` expert ids, in descending order of the selection score.
    pub idx_nk: Tensor,
    /// `[N, k]` routing weights (x `route_scale`), differentiable wrt the logits.
    pub weights_nk: Tensor,
}

/// Scores the logits, picks k experts per token and computes their weights.
///
/// `bias_e` (aux-loss-free balancing) is added to the selection scores only, that is to the
/// logits for post-softmax routing, to `softmax(logits)` for pre-softmax routing and to
/// `sigmoid(logits)` for sigmoid routing; the weights always come from the unbiased scores.
///
/// # Shapes
/// `logits_ne` `[N, E]`, `bias_e` `[E]` -> `idx_nk`, `weights_nk` `[N, k]`.
pub(crate) fn select(
    cfg: &MoeConfig,
    logits_ne: &Tensor,
    bias_e: Option<&Tensor>,
) -> Result<Selection> {
    let kind = logits_ne.kind();
    // Post-softmax selects on the raw logits and normalises over the k afterwards.
    let post_softmax = cfg.score_function == ScoreFunction::Softmax && !cfg.pre_softmax;
    let scores_ne = match cfg.score_function {
        ScoreFunction::Softmax if !cfg.pre_softmax => logits_ne.shallow_clone(),
        ScoreFunction::Softmax => logits_ne.f_softmax(1, kind)?,
        ScoreFunction::Sigmoid => logits_ne.f_sigmoid()?,
    };
    let selection_ne = match bias_e {
        Some(b) => scores_ne
            .f_detach()?
            .f_add(&b.f_to_device(logits_ne.device())?.f_to_kind(kind)?)?,
        None => scores_ne.f_detach()?,
    };
    let idx_nk = topk_indices(&selection_ne, cfg.top_k)?;
    let picked_nk = scores_ne.f_gather(1, &idx_nk, false)?;
    let weights_nk = if post_softmax {
        picked_nk.f_softmax(1, kind)?
    } else if cfg.norm_topk_prob {
        let sum_n1 = picked_nk
            .f_sum_dim_intlist(1, true, kind)?
            .f_add_scalar(RENORM_EPS)?;
        picked_nk.f_div(&sum_n1)?
    } else {
        picked_nk
    };
    Ok(Selection {
        idx_nk,
        weights_nk: weights_nk.f_mul_scalar(cfg.route_scale)?,
    })
}
