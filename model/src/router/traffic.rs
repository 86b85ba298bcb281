//! All-to-all traffic of one routing decision: what group-limited (device- or node-limited)
//! routing saves (DeepSeek-V2 section 2.2.2, DeepSeek-V3 section 2.1.2).
//!
//! Expert parallelism puts experts `r*E/P .. (r+1)*E/P` on rank r. The dispatcher sends one
//! row per kept (token, expert) assignment, so its volume is `N * k` rows whatever the
//! grouping; a dispatcher that sends each token once per destination rank and fans it out
//! there (DeepSeek-V3's node-limited dispatch, DeepEP) sends one row per distinct
//! (token, rank) pair, which group limiting bounds by the ranks its `group_topk` groups span.

use crate::Result;
use tch::{Kind, Tensor};

/// Rows one rank sends in the dispatch all-to-all (the combine sends as many back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchTraffic {
    /// Rows to other ranks with one row per assignment (this project's dispatcher).
    pub remote_rows: i64,
    /// Rows to other ranks with one row per distinct (token, destination rank) pair.
    pub remote_token_ranks: i64,
    /// The most ranks (this one included) any single token's rows reach.
    pub max_ranks_per_token: i64,
}

impl DispatchTraffic {
    /// Bytes of the dispatch for hidden width `d` at `elem_bytes` per element:
    /// `(per assignment, per distinct token and rank)`.
    pub fn bytes(&self, d: i64, elem_bytes: i64) -> (i64, i64) {
        (
            self.remote_rows * d * elem_bytes,
            self.remote_token_ranks * d * elem_bytes,
        )
    }
}

/// Counts the dispatch rows of `routing_map_ne` sent from rank `source` of `ep_size` ranks.
/// Reads three integers to the host: a statistic, never on the training path.
///
/// # Shapes
/// `routing_map_ne` bool `[N, E]` with `E % ep_size == 0`.
pub fn dispatch_traffic(
    routing_map_ne: &Tensor,
    ep_size: i64,
    source: i64,
) -> Result<DispatchTraffic> {
    let size = routing_map_ne.size();
    let [n, e] = size[..] else {
        return Err(crate::ModelError::Invalid(format!(
            "routing map must be [N, E], got {size:?}"
        )));
    };
    if ep_size < 1 || e % ep_size != 0 || !(0..ep_size).contains(&source) {
        return Err(crate::ModelError::Invalid(format!(
            "dispatch_traffic: {e} experts over {ep_size} ranks from rank {source}"
        )));
    }
    let rows_npl = routing_map_ne
        .f_to_kind(Kind::Int64)?
        .f_view([n, ep_size, e / ep_size])?
        .f_sum_dim_intlist(2, false, Kind::Int64)?;
    let reached_np = rows_npl.f_gt(0)?.f_to_kind(Kind::Int64)?;
    let local_rows = rows_npl.f_select(1, source)?.f_sum(Kind::Int64)?;
    let local_pairs = reached_np.f_select(1, source)?.f_sum(Kind::Int64)?;
    let per_token_n = reached_np.f_sum_dim_intlist(1, false, Kind::Int64)?;
    let max_ranks = if n == 0 {
        Tensor::f_zeros([], (Kind::Int64, routing_map_ne.device()))?
    } else {
        per_token_n.f_max()?
    };
    // host: a statistic for benches and tests, never called on the training path.
    let v = Vec::<i64>::try_from(&Tensor::f_stack(
        &[
            rows_npl.f_sum(Kind::Int64)?.f_sub(&local_rows)?,
            reached_np.f_sum(Kind::Int64)?.f_sub(&local_pairs)?,
            max_ranks,
        ],
        0,
    )?)?;
    let [remote_rows, remote_token_ranks, max_ranks_per_token] = v[..] else {
        return Err(crate::ModelError::Invalid(format!(
            "dispatch_traffic: expected 3 counts, got {}",
            v.len()
        )));
    };
    Ok(DispatchTraffic {
        remote_rows,
        remote_token_ranks,
        max_ranks_per_token,
    })
}
