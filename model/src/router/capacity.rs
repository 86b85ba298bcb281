//! Expert capacity and the drop policies (Megatron-Core `get_capacity` and the
//! `drop_and_pad` branch of `topk_softmax_with_capacity`).

use crate::config::{DropPolicy, MoeConfig};
use crate::Result;
use tch::{Kind, Tensor};

/// Assignments one expert may keep out of `num_tokens` tokens:
/// `ceil((num_tokens * top_k / num_experts) * factor)`.
///
/// Computed in f64 in exactly this order, as Megatron-Core does, so that configs round the
/// same way in both frameworks: `capacity(100, 1, 1, 1.1)` is 111, because
/// `(100 / 1) * 1.1 == 110.00000000000001`. A result >= `num_tokens` drops nothing.
pub fn capacity(num_tokens: i64, top_k: i64, num_experts: i64, factor: f64) -> i64 {
    ((num_tokens * top_k) as f64 / num_experts as f64 * factor).ceil() as i64
}

/// What survives the capacity limit.
pub(crate) struct Capped {
    /// Bool `[N, E]`: selected assignments that are kept.
    pub kept_ne: Tensor,
    /// Bool `[N, E]`: rows the dispatcher sends: `kept_ne`, plus zero-weight padding rows
    /// when `pad_to_capacity`.
    pub map_ne: Tensor,
}

/// Applies the capacity limit of `cfg` per group of `N / groups` consecutive tokens
/// (`route` has checked that `groups` divides N).
///
/// Each expert keeps, within each group, at most `C = capacity(N / groups, k, E, factor)` of
/// its assignments: those among the C highest entries of its weight column, unselected tokens
/// counting as weight 0 (`probs`, as Megatron-Core's `topk` over the column; ties to the
/// lower token index, so an assignment of weight exactly 0.0 can lose to an unselected
/// earlier token and be dropped) or
/// the earliest tokens (`position`). With `pad_to_capacity` every expert's column is then
/// filled, earliest free tokens first, to exactly `min(C, N / groups)` rows per group: a
/// group cannot hold more rows for one expert than it has tokens.
///
/// # Shapes
/// `selected_ne` bool `[N, E]`, `weights_ne` `[N, E]` (only read, for `probs`) ->
/// `kept_ne`, `map_ne` bool `[N, E]`.
pub(crate) fn apply_capacity(
    cfg: &MoeConfig,
    selected_ne: &Tensor,
    weights_ne: &Tensor,
    groups: i64,
) -> Result<Capped> {
    let Some(factor) = cfg.capacity_factor else {
        return Ok(Capped {
            kept_ne: selected_ne.shallow_clone(),
            map_ne: selected_ne.shallow_clone(),
        });
    };
    let (n, e) = (selected_ne.size()[0], selected_ne.size()[1]);
    let n_g = n / groups;
    let cap = capacity(n_g, cfg.top_k, e, factor);
    let selected_gte = selected_ne.f_view([groups, n_g, e])?;
    let kept_gte = if cap >= n_g {
        selected_gte.shallow_clone()
    } else {
        match cfg.drop_policy {
            DropPolicy::Position => {
                let rank_gte = selected_gte.f_cumsum(1, Kind::Int64)?;
                selected_gte.f_logical_and(&rank_gte.f_le(cap)?)?
            }
            DropPolicy::Probs => {
                // Megatron-Core's top-C of the whole weight column, where unselected tokens
                // weigh 0: the stable sort breaks ties by token index, so a selected
                // assignment whose weight saturated to exactly 0.0 ties with the unselected
                // tokens and loses its place to earlier ones (it is dropped, as there).
                let key_gte = weights_ne
                    .f_detach()?
                    .f_view([groups, n_g, e])?
                    .f_where_scalarother(&selected_gte, 0.0)?;
                let (_, order_gte) = key_gte.f_sort_stable(true, 1, true)?;
                let best_gce = order_gte.f_narrow(1, 0, cap)?;
                let chosen_gte = selected_gte
                    .f_zeros_like()?
                    .f_scatter_value(1, &best_gce, 1)?;
                chosen_gte.f_logical_and(&selected_gte)?
            }
        }
    };
    let map_gte = if cfg.pad_to_capacity {
        let rows = cap.min(n_g);
        let free_gte = kept_gte.f_logical_not()?;
        let free_rank_gte = free_gte.f_cumsum(1, Kind::Int64)?;
        let missing_g1e = kept_gte
            .f_sum_dim_intlist(1, true, Kind::Int64)?
            .f_neg()?
            .f_add_scalar(rows)?;
        let pad_gte = free_gte.f_logical_and(&free_rank_gte.f_le_tensor(&missing_g1e)?)?;
        kept_gte.f_logical_or(&pad_gte)?
    } else {
        kept_gte.shallow_clone()
    };
    Ok(Capped {
        kept_ne: kept_gte.f_view([n, e])?,
        map_ne: map_gte.f_view([n, e])?,
    })
}
