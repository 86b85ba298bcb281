//! Score function, deterministic top-k and the k routing weights of each token.

use super::topk_cpu;
use crate::config::{MoeConfig, ScoreFunction};
use crate::Result;
use tch::{Kind, Tensor};

/// Added to the sum of the k weights before renormalising, as Megatron-Core does, so that
/// sigmoid scores that all underflow give zeros instead of NaN.
const RENORM_EPS: f64 = 1e-20;

/// Bool `[N, E]`: the k largest entries of each row, ties to the lower column index.
///
/// On the CPU (f32, f64) [`topk_cpu`] scans each row once. Elsewhere, as tensor ops:
/// `torch.topk` leaves the order of ties unspecified (and CPU and CUDA differ), so only its
/// k-th value is used: every entry above it is selected, and of the entries equal to it the
/// lowest-indexed ones fill the remaining places. A full stable sort gives the same set but
/// costs 4x more at E=256 (measured with `moe bench layer`). No host synchronisation.
pub(crate) fn topk_mask(scores_ne: &Tensor, k: i64) -> Result<Tensor> {
    match topk_cpu::topk_indices(scores_ne, k)? {
        Some(idx_nk) => indices_to_map(&idx_nk, scores_ne.size()[1]),
        None => topk_mask_ops(scores_ne, k),
    }
}

/// [`topk_mask`] as tensor ops, on any device.
fn topk_mask_ops(scores_ne: &Tensor, k: i64) -> Result<Tensor> {
    let s_ne = scores_ne.f_detach()?;
    let (top_nk, _) = s_ne.f_topk(k, 1, true, false)?;
    topk_mask_at(&s_ne, &top_nk.f_amin([1].as_slice(), true)?, k)
}

/// [`topk_mask`] given each row's k-th largest value `kth_n1` `[N, 1]`.
pub(crate) fn topk_mask_at(scores_ne: &Tensor, kth_n1: &Tensor, k: i64) -> Result<Tensor> {
    let s_ne = scores_ne.f_detach()?;
    let above_ne = s_ne.f_gt_tensor(kth_n1)?;
    let tied_ne = s_ne.f_eq_tensor(kth_n1)?;
    let free_n1 = above_ne
        .f_sum_dim_intlist(1, true, Kind::Int64)?
        .f_neg()?
        .f_add_scalar(k)?;
    let tie_rank_ne = tied_ne.f_cumsum(1, Kind::Int64)?;
    Ok(above_ne.f_logical_or(&tied_ne.f_logical_and(&tie_rank_ne.f_le_tensor(&free_n1)?)?)?)
}

/// Indices `[N, k]` of the k largest entries of each row, in descending order, ties to the
/// lower column index (the set of [`topk_mask`], ordered by a stable sort of only k columns).
///
/// Rows holding NaN may select fewer than k entries; their indices are then meaningless (the
/// step's loss is NaN and the trainer skips it), but always in range.
pub(crate) fn topk_indices(scores_ne: &Tensor, k: i64) -> Result<Tensor> {
    match topk_cpu::topk_indices(scores_ne, k)? {
        Some(idx_nk) => Ok(idx_nk),
        None => topk_indices_ops(scores_ne, k),
    }
}

/// [`topk_indices`] as tensor ops, on any device (on the CPU, [`topk_cpu`] does it in one pass
/// per row; the tests hold the two equal).
pub(crate) fn topk_indices_ops(scores_ne: &Tensor, k: i64) -> Result<Tensor> {
    let s_ne = scores_ne.f_detach()?;
    let n = s_ne.size().first().copied().unwrap_or(0);
    // Row-major `nonzero` lists each row's k columns in ascending order; the static size keeps
    // it free of a host synchronisation on GPUs.
    let cols_nk = topk_mask_ops(&s_ne, k)?
        .f_nonzero_static(n * k, 0)?
        .f_select(1, 1)?
        .f_reshape([n, k])?;
    let (_, order_nk) = s_ne
        .f_gather(1, &cols_nk, false)?
        .f_sort_stable(true, 1, true)?;
    Ok(cols_nk.f_gather(1, &order_nk, false)?)
}

/// Bool `[N, E]` map with `true` at each selected `(n, idx_nk[n, j])`.
pub(crate) fn indices_to_map(idx_nk: &Tensor, num_experts: i64) -> Result<Tensor> {
    let n = idx_nk.size()[0];
    let zeros_ne = Tensor::f_zeros([n, num_experts], (Kind::Bool, idx_nk.device()))?;
    Ok(zeros_ne.f_scatter_value(1, idx_nk, 1)?)
}

/// Group-limited routing (DeepSeek-V2/V3; Megatron-Core `group_limited_topk`): each group of
/// `E / groups` consecutive experts is scored by the sum of its `per_group` largest
/// selection scores, each row keeps its `group_topk` best groups (ties to the lower group)
/// and every expert outside them is set to `-inf`, so a later top-k stays inside them.
///
/// # Shapes
/// `sel_ne` `[N, E]` (detached) -> `[N, E]`.
pub(crate) fn limit_to_groups(
    sel_ne: &Tensor,
    groups: i64,
    group_topk: i64,
    per_group: i64,
) -> Result<Tensor> {
    let (n, e) = (sel_ne.size()[0], sel_ne.size()[1]);
    let sel_ngm = sel_ne.f_view([n, groups, e / groups])?;
    let (top_ngp, _) = sel_ngm.f_topk(per_group, 2, true, false)?;
    let group_score_ng = top_ngp.f_sum_dim_intlist(2, false, sel_ne.kind())?;
    let keep_ng1 = topk_mask(&group_score_ng, group_topk)?.f_unsqueeze(2)?;
    Ok(sel_ngm
        .f_masked_fill(&keep_ng1.f_logical_not()?, f64::NEG_INFINITY)?
        .f_view([n, e])?)
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
/// Group-limited routing ([`limit_to_groups`]) ranks the groups by these selection scores too.
/// The k weights are renormalised per [`MoeConfig::renormalises_topk`].
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
    let selection_ne = match cfg.group_limit() {
        Some((groups, group_topk)) => {
            limit_to_groups(&selection_ne, groups, group_topk, cfg.top_k / group_topk)?
        }
        None => selection_ne,
    };
    let idx_nk = topk_indices(&selection_ne, cfg.top_k)?;
    let picked_nk = scores_ne.f_gather(1, &idx_nk, false)?;
    let weights_nk = if post_softmax {
        picked_nk.f_softmax(1, kind)?
    } else if cfg.renormalises_topk() {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: a full stable descending sort (ties to the lower index).
    fn sorted_topk(s_ne: &Tensor, k: i64) -> Tensor {
        s_ne.sort_stable(true, 1, true).1.narrow(1, 0, k)
    }

    /// Deterministic `[n, e]` scores of `kind` (no global RNG: unit tests run in parallel):
    /// `levels` distinct values when given (ties at nearly every k-th value), else all
    /// distinct; with `neg_inf`, every third entry is -inf (as group limiting leaves them).
    fn scores(n: i64, e: i64, levels: Option<i64>, neg_inf: bool, kind: Kind) -> Tensor {
        let x = Tensor::arange(n * e, (Kind::Double, tch::Device::Cpu));
        let s = match levels {
            Some(l) => (x.sin() * 1000.0).floor().remainder(l as f64),
            None => (x * 0.7).sin() * 3.0,
        };
        let s = if neg_inf {
            let third = Tensor::arange(n * e, (Kind::Int64, tch::Device::Cpu))
                .remainder(3)
                .eq(0);
            s.masked_fill(&third, f64::NEG_INFINITY)
        } else {
            s
        };
        s.view([n, e]).to_kind(kind)
    }

    #[test]
    fn topk_matches_a_stable_sort_with_many_ties() {
        // Scores from {0, 1, 2, 3}: nearly every row has ties at the k-th value.
        for kind in [Kind::Float, Kind::Double] {
            let s_ne = scores(64, 16, Some(4), false, kind);
            for k in [1, 2, 5, 16] {
                let want = sorted_topk(&s_ne, k);
                assert!(topk_indices(&s_ne, k).unwrap().equal(&want), "k={k}");
                assert!(topk_indices_ops(&s_ne, k).unwrap().equal(&want), "k={k}");
                let map = indices_to_map(&want, 16).unwrap();
                assert!(topk_mask(&s_ne, k).unwrap().equal(&map), "k={k}");
                assert!(topk_mask_ops(&s_ne, k).unwrap().equal(&map), "k={k}");
            }
        }
    }

    #[test]
    fn cpu_kernel_equals_the_tensor_ops() {
        // The kernel is what the CPU runs; the ops are what a GPU runs: one selection.
        for kind in [Kind::Float, Kind::Double] {
            for (e, levels, neg_inf) in [
                (256, None, false),
                (256, Some(7), false),
                (64, Some(2), true),
                (8, None, true),
            ] {
                let s_ne = scores(97, e, levels, neg_inf, kind);
                for k in [1, 2, 8, e / 2] {
                    let fast = topk_cpu::topk_indices(&s_ne, k).unwrap().unwrap();
                    let ops = topk_indices_ops(&s_ne, k).unwrap();
                    assert!(
                        fast.equal(&ops),
                        "{kind:?} e={e} levels={levels:?} -inf={neg_inf} k={k}"
                    );
                }
            }
        }
    }

    #[test]
    fn mask_at_the_kth_value_of_a_monotone_image_is_its_topk() {
        // softmax is non-decreasing per row: the top-k of the logits locate the k-th
        // largest score even where softmax rounds distinct logits to equal scores.
        tch::manual_seed(4);
        let logits_ne = Tensor::randint(3, [32, 8], (Kind::Float, tch::Device::Cpu)) * 40.0;
        let s_ne = logits_ne.softmax(1, Kind::Float);
        let idx_nk = topk_indices(&logits_ne, 3).unwrap();
        let kth = s_ne.gather(1, &idx_nk, false).amin([1].as_slice(), true);
        let got = topk_mask_at(&s_ne, &kth, 3).unwrap();
        let want = indices_to_map(&sorted_topk(&s_ne, 3), 8).unwrap();
        assert!(got.equal(&want));
    }
}
