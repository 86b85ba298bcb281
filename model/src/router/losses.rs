//! Router losses: the global load-balancing loss (Switch/GShard as Megatron-Core computes it),
//! its per-sequence variant (DeepSeek-V2 `seq_aux_loss`) and the z-loss (ST-MoE, eq. 5).

use super::select::{topk_mask, topk_mask_at};
use super::topk_cpu;
use crate::config::{AuxLossKind, MoeConfig, ScoreFunction};
use crate::Result;
use tch::Tensor;

/// One rank's statistics for the global load-balancing loss, before the all-reduce.
///
/// Both come from the balancing scores `s` over all E experts (see [`aux_scores`]) and from the
/// top-k of `s` taken before capacity dropping (Megatron-Core).
#[derive(Debug)]
pub struct AuxStats {
    /// `[E]` number of tokens whose top-k of `s` holds expert e; no grad.
    pub counts_e: Tensor,
    /// `[E]` `sum_n s[n, e]`; carries the gradient of the loss.
    pub probsum_e: Tensor,
    /// Tokens N these were computed from.
    pub num_tokens: i64,
}

/// A scalar zero of `like`'s kind and device.
fn zero_like(like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::f_zeros([], (like.kind(), like.device()))?)
}

/// Added to the sum of the sigmoid scores before normalising, as Megatron-Core does.
const NORM_EPS: f64 = 1e-20;

/// The balancing scores `s` and their top-k map, the inputs of both balancing losses, as
/// Megatron-Core's `compute_routing_scores_for_aux_loss` computes them: `s = softmax(logits)`
/// for softmax routing (pre- or post-softmax alike) and, for sigmoid routing,
/// `s = sigmoid(logits) / (sum_e sigmoid(logits) + 1e-20)`, so that each row sums to 1 in
/// both cases. Neither the selection bias nor group limiting enter.
///
/// `topk_nk`, when given, holds the indices of the top-k entries of each row of a score that
/// `s` is a non-decreasing function of (the logits, or the unbiased sigmoid scores: the
/// router's own selection when it selects on them). The k-th largest `s` is then the
/// smallest `s` at those indices, and the map follows without a second top-k (which, as
/// tensor ops, costs as much as the rest of the router at E=256). Where the one-pass CPU top-k
/// applies, it is cheaper than that trick and runs instead (same map).
///
/// # Shapes
/// `logits_ne` `[N, E]`, `topk_nk` i64 `[N, k]` -> `s_ne` `[N, E]`, `map_ne` bool `[N, E]`.
pub(crate) fn aux_scores(
    score_function: ScoreFunction,
    logits_ne: &Tensor,
    top_k: i64,
    logits_topk_nk: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let s_ne = match score_function {
        ScoreFunction::Softmax => logits_ne.f_softmax(1, logits_ne.kind())?,
        ScoreFunction::Sigmoid => {
            let sig_ne = logits_ne.f_sigmoid()?;
            let sum_n1 = sig_ne
                .f_sum_dim_intlist(1, true, logits_ne.kind())?
                .f_add_scalar(NORM_EPS)?;
            sig_ne.f_div(&sum_n1)?
        }
    };
    let map_ne = match logits_topk_nk {
        // The CPU's top-k is one pass: cheaper than the k-th value trick's elementwise passes.
        Some(idx_nk) if !topk_cpu::handles(&s_ne) => {
            let kth_n1 = s_ne
                .f_detach()?
                .f_gather(1, idx_nk, false)?
                .f_amin([1].as_slice(), true)?;
            topk_mask_at(&s_ne, &kth_n1, top_k)?
        }
        _ => topk_mask(&s_ne, top_k)?,
    };
    Ok((s_ne, map_ne))
}

/// This rank's [`AuxStats`] from the outputs of [`aux_scores`].
pub(crate) fn aux_stats(s_ne: &Tensor, map_ne: &Tensor) -> Result<AuxStats> {
    Ok(AuxStats {
        counts_e: map_ne.f_sum_dim_intlist(0, false, s_ne.kind())?,
        probsum_e: s_ne.f_sum_dim_intlist(0, false, s_ne.kind())?,
        num_tokens: s_ne.size()[0],
    })
}

/// Megatron-Core's global aux loss, this rank's share:
/// `coeff * E / (k * N_g * n_local) * sum_e c_e^g * P_e^local`.
///
/// `global_counts_e` and `global_tokens` are [`AuxStats::counts_e`] and `num_tokens` summed
/// over all data-parallel ranks. With one rank (`n_local = N_g`) this is
/// `coeff * E / (k N^2) * sum_e c_e P_e`; with W ranks of equal size `n_local = N_g / W`, so
/// the MEAN over ranks of their values is `coeff * E / (k N_g^2) * sum_e c_e^g P_e^g`, the
/// single-process loss on the concatenated batch: the trainer's average of per-rank losses
/// stays independent of the world size. A balanced router gives `coeff`, a collapsed top-1
/// router `E * coeff`.
///
/// Returns a zero scalar when `cfg.aux_loss` is not `aux_loss` (the sequence-level loss comes
/// from [`super::route`]) or when there are no tokens.
pub fn aux_loss(
    cfg: &MoeConfig,
    local: &AuxStats,
    global_counts_e: &Tensor,
    global_tokens: i64,
) -> Result<Tensor> {
    if cfg.aux_loss != AuxLossKind::AuxLoss || local.num_tokens <= 0 || global_tokens <= 0 {
        return zero_like(&local.probsum_e);
    }
    let scale = cfg.aux_loss_coeff * cfg.num_experts as f64
        / (cfg.top_k as f64 * global_tokens as f64 * local.num_tokens as f64);
    let counts_e = global_counts_e
        .f_detach()?
        .f_to_device(local.probsum_e.device())?
        .f_to_kind(local.probsum_e.kind())?;
    Ok(local
        .probsum_e
        .f_mul(&counts_e)?
        .f_sum(local.probsum_e.kind())?
        .f_mul_scalar(scale)?)
}

/// DeepSeek-V2's sequence-level balancing loss: the aux loss of each sequence of `seq_len`
/// consecutive tokens, averaged over sequences, times `coeff`.
///
/// # Shapes
/// `s_ne` `[N, E]`, `map_ne` bool `[N, E]` with `N % seq_len == 0` -> scalar.
pub(crate) fn seq_aux_loss(
    cfg: &MoeConfig,
    s_ne: &Tensor,
    map_ne: &Tensor,
    seq_len: i64,
) -> Result<Tensor> {
    let (n, e) = (s_ne.size()[0], s_ne.size()[1]);
    if n == 0 {
        return zero_like(s_ne);
    }
    let kind = s_ne.kind();
    let seqs = n / seq_len;
    let counts_se = map_ne
        .f_view([seqs, seq_len, e])?
        .f_sum_dim_intlist(1, false, kind)?;
    let probsum_se = s_ne
        .f_view([seqs, seq_len, e])?
        .f_sum_dim_intlist(1, false, kind)?;
    let scale = cfg.aux_loss_coeff * e as f64 / (cfg.top_k as f64 * (seq_len * seq_len) as f64);
    Ok(counts_se
        .f_mul(&probsum_se)?
        .f_sum_dim_intlist(1, false, kind)?
        .f_mean(kind)?
        .f_mul_scalar(scale)?)
}

/// ST-MoE z-loss `coeff * mean_n(logsumexp_e(logits)^2)`; a constant zero when `coeff` is 0
/// or there are no tokens.
///
/// # Shapes
/// `logits_ne` `[N, E]` -> scalar.
pub(crate) fn z_loss(coeff: f64, logits_ne: &Tensor) -> Result<Tensor> {
    if coeff == 0.0 || logits_ne.size()[0] == 0 {
        return zero_like(logits_ne);
    }
    let lse_n = logits_ne.f_logsumexp(1, false)?;
    Ok(lse_n
        .f_square()?
        .f_mean(logits_ne.kind())?
        .f_mul_scalar(coeff)?)
}
