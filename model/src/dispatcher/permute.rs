//! Permute and unpermute: the local half of token dispatch.
//!
//! Follows Megatron-Core's `moe_utils.permute` / `unpermute` (routing-map variant): kept
//! token-expert assignments are gathered into expert-major rows, and the expert outputs are
//! scattered back with `index_add`, weighted by the routing probabilities. Everything is a
//! tensor op, so autograd differentiates through both directions (wrt `x_nd` and `probs_ne`).

use crate::{ModelError, Result};
use tch::{Kind, Tensor};

/// Kept assignments sorted by expert (stable: within an expert, by token index).
#[derive(Debug)]
pub struct Permutation {
    /// i64 `[M]`: the token of each permuted row.
    pub token_idx_m: Tensor,
    /// f32 `[M]`: the routing weight of each permuted row (differentiable wrt `probs_ne`).
    pub probs_m: Tensor,
    /// Rows per expert `[E]`, summing to M.
    pub counts_e: Vec<i64>,
    /// Tokens N of the input.
    pub num_tokens: i64,
}

/// Gathers the rows of `x_nd` that `routing_map_ne` sends, expert-major.
///
/// `counts_e` are the map's column sums, already on the host (the dispatcher's one read):
/// they give M, so the gather needs no synchronisation of its own (`nonzero` with a static
/// size instead of `nonzero`, which waits for the device to learn its output size).
///
/// # Shapes
/// `x_nd [N, d]`, `probs_ne f32 [N, E]`, `routing_map_ne bool [N, E]`, `counts_e [E]` ->
/// `x_md [M, d]` with M = `sum(counts_e)`, the number of true entries of the map.
pub fn permute(
    x_nd: &Tensor,
    probs_ne: &Tensor,
    routing_map_ne: &Tensor,
    counts_e: &[i64],
) -> Result<(Tensor, Permutation)> {
    let (n, e) = match (x_nd.size().as_slice(), routing_map_ne.size().as_slice(), probs_ne.size().as_slice()) {
        ([n, _], [nm, e], [np, ep]) if n == nm && n == np && e == ep => (*n, *e),
        (xs, ms, ps) => {
            return Err(ModelError::Invalid(format!(
                "permute: x_nd {xs:?}, routing_map_ne {ms:?} and probs_ne {ps:?} must be [N, d], [N, E], [N, E]"
            )))
        }
    };
    if counts_e.len() as i64 != e || counts_e.iter().any(|c| *c < 0) {
        return Err(ModelError::Invalid(format!(
            "permute: counts_e {counts_e:?} must hold {e} non-negative row counts"
        )));
    }
    let m: i64 = counts_e.iter().sum();
    // nonzero on the transposed map enumerates (expert, token) pairs in row-major order, which
    // is exactly "by expert, then by token": a stable sort for free.
    let pairs_m2 = routing_map_ne
        .f_to_kind(Kind::Bool)?
        .f_transpose(0, 1)?
        .f_nonzero_static(m, 0)?;
    let expert_idx_m = pairs_m2.f_select(1, 0)?;
    let token_idx_m = pairs_m2.f_select(1, 1)?.f_contiguous()?;
    let counts_e = counts_e.to_vec();
    let x_md = x_nd.f_index_select(0, &token_idx_m)?;
    let flat_m = token_idx_m.f_mul_scalar(e)?.f_add(&expert_idx_m)?;
    let probs_m = probs_ne
        .f_to_kind(Kind::Float)?
        .f_reshape([-1])?
        .f_index_select(0, &flat_m)?;
    Ok((
        x_md,
        Permutation {
            token_idx_m,
            probs_m,
            counts_e,
            num_tokens: n,
        },
    ))
}

/// Weights each expert output by its routing probability and sums the rows of each token:
/// `y_n = sum_{(n,e) kept} probs_{n,e} * out_{n,e}`. Tokens with no kept assignment get 0.
///
/// The weighted sum runs in the dtype of `y_md` (the compute dtype); the result is cast to
/// `out_kind` (the dtype of the layer input).
///
/// # Shapes
/// `y_md [M, d]` -> `y_nd [N, d]`
pub fn unpermute(y_md: &Tensor, perm: &Permutation, out_kind: Kind) -> Result<Tensor> {
    let (m, d) = match y_md.size().as_slice() {
        [m, d] => (*m, *d),
        s => {
            return Err(ModelError::Invalid(format!(
                "unpermute: y_md {s:?} must be [M, d]"
            )))
        }
    };
    let m_expected = perm.token_idx_m.size().first().copied().unwrap_or(0);
    if m != m_expected {
        return Err(ModelError::Invalid(format!(
            "unpermute: y_md has {m} rows but {m_expected} assignments were dispatched"
        )));
    }
    let weighted_md = y_md.f_mul(&perm.probs_m.f_to_kind(y_md.kind())?.f_unsqueeze(1)?)?;
    let zeros_nd = Tensor::f_zeros([perm.num_tokens, d], (y_md.kind(), y_md.device()))?;
    let y_nd = zeros_nd.f_index_add(0, &perm.token_idx_m, &weighted_md)?;
    Ok(y_nd.f_to_kind(out_kind)?)
}
