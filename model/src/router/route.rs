//! `route`: logits to routing weights, dispatch map and router losses for one MoE layer.

use super::capacity::apply_capacity;
use super::losses::{aux_scores, aux_stats, seq_aux_loss, z_loss, AuxStats};
use super::select::{indices_to_map, select};
use crate::config::{AuxLossKind, MoeConfig};
use crate::{ModelError, Result};
use tch::{Kind, Tensor};

/// What the router reads.
#[derive(Debug)]
pub struct RouterInput<'a> {
    /// Router logits `[N, E]`, f32 in the model (any floating kind works).
    pub logits_ne: &'a Tensor,
    /// `[E]` aux-loss-free balancing bias; changes selection only, never the weights.
    pub expert_bias_e: Option<&'a Tensor>,
    /// Tokens per sequence (`N % seq_len == 0`), for `seq_aux_loss`.
    pub seq_len: i64,
    /// Capacity is computed per group of `N / capacity_groups` consecutive tokens
    /// (`N % capacity_groups == 0`): 1 normally, P in the single-process EP reference, which
    /// then drops exactly what P ranks would.
    pub capacity_groups: i64,
}

/// The router's decisions and losses for N tokens.
#[derive(Debug)]
pub struct Routing {
    /// `[N, E]` routing weight (x `route_scale`) of each kept assignment, 0 elsewhere
    /// (dropped assignments are not renormalised); differentiable wrt the logits.
    pub probs_ne: Tensor,
    /// Bool `[N, E]`: rows the dispatcher sends: kept assignments, plus zero-weight padding
    /// rows when `pad_to_capacity`.
    pub routing_map_ne: Tensor,
    /// i64 `[E]` on the device: rows per expert, `routing_map_ne.sum(0)`. The dispatcher
    /// reads it (the layer's one host read); nothing else here waits on the device.
    pub tokens_per_expert_e: Tensor,
    /// i64 `[E]`: kept assignments per expert (`tokens_per_expert_e` less padding rows).
    pub kept_e: Tensor,
    /// i64 scalar: kept assignments; `num_kept + num_dropped == N * k` (padding is not
    /// counted).
    pub num_kept: Tensor,
    /// i64 scalar: assignments dropped by the capacity limit.
    pub num_dropped: Tensor,
    /// Local statistics of the global aux loss (see [`super::aux_loss`]).
    pub aux_stats: AuxStats,
    /// Scalar sequence-level balancing loss (x coeff) when `aux_loss: seq_aux_loss`.
    pub seq_aux_loss: Option<Tensor>,
    /// Scalar z-loss (x coeff); a constant 0 when the coefficient is 0.
    pub z_loss: Tensor,
    /// `[E]` assignments per expert before capacity dropping (with the bias, i.e. the actual
    /// selection), no grad: the load signal of aux-loss-free balancing and of statistics.
    pub topk_counts_e: Tensor,
    /// The k experts of every token and their weights, when the routing map holds exactly
    /// those (no capacity limit): the dispatcher permutes from these `[N, k]` tensors instead
    /// of scanning the `[N, E]` map.
    pub topk: Option<TopK>,
}

/// Each token's k selected experts, all kept.
#[derive(Debug)]
pub struct TopK {
    /// i64 `[N, k]`: the experts of each token (distinct within a row), by descending score.
    pub idx_nk: Tensor,
    /// `[N, k]`: their routing weights, `probs_ne` at `idx_nk` (differentiable wrt the
    /// logits).
    pub weights_nk: Tensor,
}

impl Routing {
    /// `(tokens_per_expert, num_kept, num_dropped)` read to the host: for tests and debug
    /// output, never on the training path (it waits for the device).
    pub fn host_counts(&self) -> Result<(Vec<i64>, i64, i64)> {
        // host: tests and debug output only.
        let v = moe_comm::host_read::<i64>(&Tensor::f_cat(
            &[
                &self.tokens_per_expert_e,
                &self.num_kept.f_reshape([1])?,
                &self.num_dropped.f_reshape([1])?,
            ],
            0,
        )?)?;
        let e = v.len() - 2;
        Ok((v[..e].to_vec(), v[e], v[e + 1]))
    }
}

fn invalid(msg: String) -> ModelError {
    ModelError::Invalid(msg)
}

/// Checks the shapes and divisibility rules `route` relies on.
fn validate(cfg: &MoeConfig, input: &RouterInput) -> Result<(i64, i64)> {
    let size = input.logits_ne.size();
    let [n, e] = size[..] else {
        return Err(invalid(format!(
            "router logits must be [N, E], got {size:?}"
        )));
    };
    if !input.logits_ne.is_floating_point() {
        return Err(invalid(format!(
            "router logits must be floating point, got {:?}",
            input.logits_ne.kind()
        )));
    }
    if e != cfg.num_experts {
        return Err(invalid(format!(
            "router logits have {e} experts, moe.num_experts is {}",
            cfg.num_experts
        )));
    }
    if cfg.top_k < 1 || cfg.top_k > e {
        return Err(invalid(format!(
            "moe.top_k ({}) must be in 1..=moe.num_experts ({e})",
            cfg.top_k
        )));
    }
    if let Some(msg) = MoeConfig::validate_groups(cfg).into_iter().next() {
        return Err(invalid(msg));
    }
    if let Some(b) = input.expert_bias_e {
        if b.size() != [e] {
            return Err(invalid(format!(
                "expert bias must be [{e}], got {:?}",
                b.size()
            )));
        }
    }
    if input.capacity_groups < 1 || n % input.capacity_groups != 0 {
        return Err(invalid(format!(
            "capacity_groups ({}) must be positive and divide the number of tokens ({n})",
            input.capacity_groups
        )));
    }
    if cfg.aux_loss == AuxLossKind::SeqAuxLoss && (input.seq_len < 1 || n % input.seq_len != 0) {
        return Err(invalid(format!(
            "seq_len ({}) must be positive and divide the number of tokens ({n}) for seq_aux_loss",
            input.seq_len
        )));
    }
    Ok((n, e))
}

/// Routes N tokens: selects k experts per token, applies the capacity limit and computes the
/// router losses, with Megatron-Core semantics (see the module docs and `shared/DESIGN.md`).
///
/// No host synchronisation: counts stay on the device (see [`Routing::host_counts`]).
///
/// # Shapes
/// `logits_ne` `[N, E]` -> `probs_ne` `[N, E]`, `routing_map_ne` bool `[N, E]`,
/// `topk_counts_e` `[E]`, losses scalars.
pub fn route(cfg: &MoeConfig, input: &RouterInput) -> Result<Routing> {
    let (n, e) = validate(cfg, input)?;
    let logits_ne = input.logits_ne;
    let kind = logits_ne.kind();

    let selection = select(cfg, logits_ne, input.expert_bias_e)?;
    let selected_ne = indices_to_map(&selection.idx_nk, e)?;
    let weights_ne =
        logits_ne
            .f_zeros_like()?
            .f_scatter(1, &selection.idx_nk, &selection.weights_nk)?;
    // Assignments per expert before dropping, counted from the `[N, k]` indices: a scatter-add
    // of N k int64 ones, exact and deterministic on every device (no `[N, E]` pass).
    let flat_idx = selection.idx_nk.f_reshape([-1])?;
    let ones = Tensor::f_ones([n * cfg.top_k], (Kind::Int64, logits_ne.device()))?;
    let topk_counts_e = Tensor::f_zeros([e], (Kind::Int64, logits_ne.device()))?
        .f_scatter_add(0, &flat_idx, &ones)?;

    let capped = apply_capacity(cfg, &selected_ne, &weights_ne, input.capacity_groups)?;
    let no_limit = cfg.capacity_factor.is_none();
    let (probs_ne, tokens_per_expert_e, kept_e) = if no_limit {
        // Everything is kept and nothing padded: the map is the selection, and `weights_ne`
        // is already zero off it.
        (
            weights_ne,
            topk_counts_e.shallow_clone(),
            topk_counts_e.shallow_clone(),
        )
    } else {
        // `where`, not a multiply by the mask, so a non-finite dropped weight cannot leak a
        // NaN.
        (
            weights_ne.f_where_scalarother(&capped.kept_ne, 0.0)?,
            capped.map_ne.f_sum_dim_intlist(0, false, Kind::Int64)?,
            capped.kept_ne.f_sum_dim_intlist(0, false, Kind::Int64)?,
        )
    };
    let num_kept = kept_e.f_sum(Kind::Int64)?;

    // Without a bias the router selects on the logits, softmax(logits) or sigmoid(logits),
    // all of which the balancing scores are non-decreasing in: their top-k indices are the
    // router's own (see `aux_scores`), unless group limiting changed them.
    let on_monotone_scores = input.expert_bias_e.is_none() && cfg.group_limit().is_none();
    let (s_ne, aux_map_ne) = aux_scores(
        cfg.score_function,
        logits_ne,
        cfg.top_k,
        on_monotone_scores.then_some(&selection.idx_nk),
    )?;
    let seq_aux = match cfg.aux_loss {
        AuxLossKind::SeqAuxLoss => Some(seq_aux_loss(cfg, &s_ne, &aux_map_ne, input.seq_len)?),
        AuxLossKind::AuxLoss | AuxLossKind::None => None,
    };
    Ok(Routing {
        probs_ne,
        routing_map_ne: capped.map_ne,
        tokens_per_expert_e,
        kept_e,
        num_dropped: num_kept.f_neg()?.f_add_scalar(n * cfg.top_k)?,
        num_kept,
        aux_stats: aux_stats(&s_ne, &aux_map_ne)?,
        seq_aux_loss: seq_aux,
        z_loss: z_loss(cfg.z_loss_coeff, logits_ne)?,
        topk_counts_e: topk_counts_e.f_to_kind(kind)?,
        topk: no_limit.then(|| TopK {
            idx_nk: selection.idx_nk,
            weights_nk: selection.weights_nk,
        }),
    })
}
