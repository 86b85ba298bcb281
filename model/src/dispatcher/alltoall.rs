//! The expert-parallel exchange: all-to-all of permuted rows over the EP group.
//!
//! Follows Megatron-Core's `MoEAlltoAllTokenDispatcher`: exchange the per-(peer, local expert)
//! row counts first (one small all-to-all on the device; the dispatcher then reads what it
//! sends and receives in the layer's one host read), then all-to-all the rows with
//! the differentiable collective, whose backward is the reverse all-to-all of the gradient.
//! Received rows arrive grouped by source rank, then local expert; experts want them grouped
//! by local expert. The reordering is a gather whose index is built from the counts with
//! `repeat_interleave`, so no Rust loop touches a row.

use crate::{ModelError, Result};
use moe_comm::{autograd, lock, Placement, SharedComm};
use tch::{Kind, Tensor};

/// What [`exchange_back`] needs to return expert outputs to the ranks that sent the rows.
#[derive(Debug)]
pub(crate) struct Exchange {
    /// Rows sent to each peer (the forward all-to-all's send splits).
    send_splits_p: Vec<i64>,
    /// Rows received from each peer.
    recv_splits_p: Vec<i64>,
    /// i64 `[R]`: row of the local-expert-major tensor holding each received row.
    to_source_major_r: Tensor,
}

/// For blocks laid out in `from` order and re-laid out in `to` order (both lists of block
/// sizes and offsets indexed by block), the gather index `idx` with `dst[i] = src[idx[i]]`.
///
/// Row `j` of block b sits at `from_off[b] + j` in the source and `to_off[b] + j` in the
/// destination, so `idx = arange(R) + repeat_interleave(from_off - to_off, sizes)` taken
/// in destination block order.
fn block_gather_index(
    sizes_in_to_order: &[i64],
    shift_in_to_order: &[i64],
    total: i64,
    device: tch::Device,
) -> Result<Tensor> {
    let placement = Placement::new(device, Kind::Int64);
    let sizes = placement.upload(sizes_in_to_order)?;
    let shift = placement.upload(shift_in_to_order)?;
    let shift_r = shift.f_repeat_interleave_self_tensor(&sizes, 0, Some(total))?;
    Ok(Tensor::f_arange(total, (Kind::Int64, device))?.f_add(&shift_r)?)
}

/// Exclusive prefix sums.
fn offsets(sizes: &[i64]) -> Vec<i64> {
    sizes
        .iter()
        .scan(0i64, |acc, s| {
            let off = *acc;
            *acc += s;
            Some(off)
        })
        .collect()
}

/// Exchanges the per-expert row counts over the EP group, on the device: returns i64
/// `[P, L]`, row q = the rows peer q sends to each of this rank's L local experts.
///
/// `counts_e` (i64 `[E]`, expert-major) are the rows this rank sends per GLOBAL expert, so
/// the rows for peer p are the contiguous block of experts `p*L .. (p+1)*L`.
pub(crate) fn exchange_counts(ep: &SharedComm, ep_size: i64, counts_e: &Tensor) -> Result<Tensor> {
    let p_n = ep_size;
    let e_n = counts_e.size().first().copied().unwrap_or(0);
    if p_n <= 0 || e_n % p_n != 0 {
        return Err(ModelError::Invalid(format!(
            "num_experts ({e_n}) must be divisible by the EP size ({p_n})"
        )));
    }
    let send_counts_pl = counts_e.f_reshape([p_n, e_n / p_n])?;
    let ones_p = vec![1i64; p_n as usize];
    let mut comm = lock(ep)?;
    if comm.size() as i64 != p_n {
        return Err(ModelError::Invalid(format!(
            "EP communicator has {} ranks but the dispatcher was built for ep_size {p_n}",
            comm.size()
        )));
    }
    Ok(comm.all_to_all(&send_counts_pl, &ones_p, &ones_p)?)
}

/// Sends each expert's rows to the rank holding it and regroups what arrives by local expert.
///
/// `counts_e` are the rows of `x_md` per GLOBAL expert (expert-major, so the rows for peer p
/// are the contiguous block of experts `p*L .. (p+1)*L`), and `recv_pl` the `[P, L]` counts
/// [`exchange_counts`] returned, row-major, both already on the host.
///
/// # Shapes
/// `x_md [M, d]` -> `x_rd [R, d]` (R = rows this rank's experts serve, local-expert-major),
/// and the rows per local expert `[L]`.
pub(crate) fn exchange(
    ep: &SharedComm,
    ep_size: i64,
    x_md: &Tensor,
    counts_e: &[i64],
    recv_pl: &[i64],
) -> Result<(Tensor, Vec<i64>, Exchange)> {
    let p_n = ep_size;
    let e_n = counts_e.len() as i64;
    if p_n <= 0 || e_n % p_n != 0 || recv_pl.len() != counts_e.len() {
        return Err(ModelError::Invalid(format!(
            "num_experts ({e_n}) must be divisible by the EP size ({p_n}), with {e_n} received \
             counts (got {})",
            recv_pl.len()
        )));
    }
    let l_n = e_n / p_n;
    let device = x_md.device();

    let l_us = l_n as usize;
    let send_splits_p: Vec<i64> = counts_e.chunks(l_us).map(|c| c.iter().sum()).collect();
    let recv_splits_p: Vec<i64> = recv_pl.chunks(l_us).map(|c| c.iter().sum()).collect();
    let rows_l: Vec<i64> = (0..l_us)
        .map(|l| recv_pl.iter().skip(l).step_by(l_us).sum())
        .collect();
    let total: i64 = recv_splits_p.iter().sum();

    // Block (p, l) lives at src_off[p*L + l] in the received (source-major) tensor and at
    // dst_off[l*P + p] in the local-expert-major one.
    let src_off_pl = offsets(recv_pl);
    let lp_order: Vec<usize> = (0..l_us)
        .flat_map(|l| (0..p_n as usize).map(move |p| p * l_us + l))
        .collect();
    let sizes_lp: Vec<i64> = lp_order.iter().map(|&b| recv_pl[b]).collect();
    let dst_off_lp = offsets(&sizes_lp);
    let mut dst_off_pl = vec![0i64; recv_pl.len()];
    for (i, &b) in lp_order.iter().enumerate() {
        dst_off_pl[b] = dst_off_lp[i];
    }
    let to_local_major = block_gather_index(
        &sizes_lp,
        &lp_order
            .iter()
            .zip(&dst_off_lp)
            .map(|(&b, d)| src_off_pl[b] - d)
            .collect::<Vec<_>>(),
        total,
        device,
    )?;
    let to_source_major_r = block_gather_index(
        recv_pl,
        &dst_off_pl
            .iter()
            .zip(&src_off_pl)
            .map(|(d, s)| d - s)
            .collect::<Vec<_>>(),
        total,
        device,
    )?;

    let x_recv_rd = autograd::all_to_all(ep, x_md, send_splits_p.clone(), recv_splits_p.clone())?;
    let x_rd = x_recv_rd.f_index_select(0, &to_local_major)?;
    Ok((
        x_rd,
        rows_l,
        Exchange {
            send_splits_p,
            recv_splits_p,
            to_source_major_r,
        },
    ))
}

/// Inverse of [`exchange`]: returns expert outputs to the ranks that sent the rows, in the
/// order those ranks sent them.
///
/// # Shapes
/// `y_rd [R, d]` (local-expert-major) -> `y_md [M, d]` (the sender's permuted order)
pub(crate) fn exchange_back(ep: &SharedComm, y_rd: &Tensor, ex: Exchange) -> Result<Tensor> {
    let y_recv_rd = y_rd.f_index_select(0, &ex.to_source_major_r)?;
    Ok(autograd::all_to_all(
        ep,
        &y_recv_rd,
        ex.recv_splits_p,
        ex.send_splits_p,
    )?)
}
