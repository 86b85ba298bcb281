//! Permute and unpermute: the local half of token dispatch.
//!
//! Follows Megatron-Core's `moe_utils.permute` / `unpermute` (routing-map variant): kept
//! token-expert assignments are gathered into expert-major rows, and the expert outputs are
//! scattered back with `index_add`, weighted by the routing probabilities. Everything is a
//! tensor op, so autograd differentiates through both directions (wrt `x_nd` and `probs_ne`),
//! except the CPU's f32 combine, a C++ autograd function of its own ([`super::combine_cpu`]).
//! A routing that keeps every token's k experts is permuted from its `[N, k]` indices
//! ([`permute_topk`]) rather than from the `[N, E]` map.

use super::combine_cpu;
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

/// [`permute`] for a routing that keeps each token's k experts ([`crate::router::TopK`]): the
/// same rows in the same order (expert-major, by token within an expert) and the same
/// weights, found by a stable sort of the `N k` expert ids instead of a scan of the `[N, E]`
/// map (a token's k experts are distinct, so within an expert the flat order `n k + j` is the
/// token order).
///
/// # Shapes
/// `x_nd [N, d]`, `idx_nk i64 [N, k]`, `weights_nk [N, k]`, `counts_e [E]` (the column sums
/// of the map, on the host) -> `x_md [M, d]` with M = N k.
pub fn permute_topk(
    x_nd: &Tensor,
    idx_nk: &Tensor,
    weights_nk: &Tensor,
    counts_e: &[i64],
) -> Result<(Tensor, Permutation)> {
    let (n, k) = match (x_nd.size().as_slice(), idx_nk.size().as_slice(), weights_nk.size().as_slice()) {
        ([n, _], [ni, k], [nw, kw]) if n == ni && n == nw && k == kw => (*n, *k),
        (xs, is, ws) => {
            return Err(ModelError::Invalid(format!(
                "permute_topk: x_nd {xs:?}, idx_nk {is:?} and weights_nk {ws:?} must be [N, d], [N, k], [N, k]"
            )))
        }
    };
    if counts_e.iter().any(|c| *c < 0) || counts_e.iter().sum::<i64>() != n * k {
        return Err(ModelError::Invalid(format!(
            "permute_topk: counts_e {counts_e:?} must be non-negative and sum to N k = {}",
            n * k
        )));
    }
    let (_, order_m) = idx_nk.f_reshape([-1])?.f_sort_stable(true, 0, false)?;
    let token_idx_m = order_m.f_floor_divide_scalar(k)?;
    let x_md = x_nd.f_index_select(0, &token_idx_m)?;
    let probs_m = weights_nk
        .f_to_kind(Kind::Float)?
        .f_reshape([-1])?
        .f_index_select(0, &order_m)?;
    Ok((
        x_md,
        Permutation {
            token_idx_m,
            probs_m,
            counts_e: counts_e.to_vec(),
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
    let m = match y_md.size().as_slice() {
        [m, _] => *m,
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
    if combine_cpu::handles(y_md, &perm.probs_m) {
        let y_nd =
            combine_cpu::weighted_combine(y_md, &perm.probs_m, &perm.token_idx_m, perm.num_tokens)?;
        return Ok(y_nd.f_to_kind(out_kind)?);
    }
    unpermute_ops(y_md, perm, out_kind)
}

/// [`unpermute`] as tensor ops, on any device and dtype (on the CPU in f32, [`combine_cpu`]
/// does it in one pass each way; the tests hold the two equal).
fn unpermute_ops(y_md: &Tensor, perm: &Permutation, out_kind: Kind) -> Result<Tensor> {
    let d = y_md.size()[1];
    let weighted_md = y_md.f_mul(&perm.probs_m.f_to_kind(y_md.kind())?.f_unsqueeze(1)?)?;
    let zeros_nd = Tensor::f_zeros([perm.num_tokens, d], (y_md.kind(), y_md.device()))?;
    let y_nd = zeros_nd.f_index_add(0, &perm.token_idx_m, &weighted_md)?;
    Ok(y_nd.f_to_kind(out_kind)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Deterministic values in about [-1, 1] (no global RNG: unit tests run in parallel).
    fn wave(shape: &[i64], phase: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.37 + phase)
            .sin()
            .view(shape)
    }

    /// The CPU kernel against the tensor ops, on rows where some tokens get several rows,
    /// some none, in an unsorted order: the forward and the rows' gradient bit for bit, the
    /// weights' gradient to 1e-6 relative (a d-term f32 dot product that the kernel and the
    /// ops sum in different orders: the rounding of 64 terms stays below 64 * 6e-8 = 4e-6 of
    /// their magnitude, in practice far below).
    #[test]
    fn cpu_combine_equals_the_tensor_ops() {
        let (n, m, d) = (13i64, 40i64, 64i64);
        let tokens: Vec<i64> = (0..m).map(|i| (i * 7 + i / 3) % (n - 2)).collect();
        let token_idx_m = Tensor::from_slice(&tokens);
        let g_nd = wave(&[n, d], 2.0);
        let run = |kernel: bool| {
            let y_md = wave(&[m, d], 0.0).set_requires_grad(true);
            let p_m = (wave(&[m], 1.0) * 0.5 + 0.5).set_requires_grad(true);
            let perm = Permutation {
                token_idx_m: token_idx_m.shallow_clone(),
                probs_m: p_m.shallow_clone(),
                counts_e: vec![m],
                num_tokens: n,
            };
            let y_nd = if kernel {
                assert!(combine_cpu::handles(&y_md, &p_m));
                unpermute(&y_md, &perm, Kind::Float).unwrap()
            } else {
                unpermute_ops(&y_md, &perm, Kind::Float).unwrap()
            };
            (&y_nd * &g_nd).sum(Kind::Float).backward();
            (y_nd.detach(), y_md.grad(), p_m.grad())
        };
        let (ya, gya, gpa) = run(true);
        let (yb, gyb, gpb) = run(false);
        assert!(ya.equal(&yb), "forward differs");
        assert!(gya.equal(&gyb), "d_out is one product per element: exact");
        let rel = (&gpa - &gpb).abs().max().double_value(&[]) / gpb.abs().max().double_value(&[]);
        assert!(rel < 1e-6, "d_p differs by {rel:e}");
        // Tokens 11 and 12 have no rows: zero output.
        let empty = ya.narrow(0, 11, 2).abs().sum(Kind::Float).double_value(&[]);
        assert_eq!(empty, 0.0);
    }

    #[test]
    fn cpu_combine_rejects_bad_tokens() {
        let y_md = wave(&[2, 4], 0.0);
        let p_m = wave(&[2], 1.0);
        let bad = Tensor::from_slice(&[0i64, 5]);
        let err = combine_cpu::weighted_combine(&y_md, &p_m, &bad, 3).unwrap_err();
        assert!(err.to_string().contains("names token 5 of 3"), "{err}");
    }
}
