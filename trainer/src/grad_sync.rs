//! Gradient synchronisation and global-norm clipping for expert + data parallelism
//! (the scheme of Megatron-Core's `DistributedDataParallel` with expert-data-parallel
//! groups, and of DeepSpeed-MoE).
//!
//! Each rank's loss is a mean over its own tokens, and the objective is the mean over the
//! W ranks. A dense parameter's gradient is therefore the world sum / W. A routed expert's
//! gradient on one rank already collects, through the all-to-all backward, the
//! contributions of every rank of its EP group, so summing it over the expert-data-parallel
//! group (the W/P ranks holding the same experts) covers all W ranks once: sum / W as well.
//!
//! Gradients travel flattened: one collective per bucket of consecutive parameters (one
//! bucket for any model under [`BUCKET_ELEMS`] elements per group), not one per tensor.

use crate::Result;
use moe_comm::{lock, ProcessGroups, SharedComm};
use moe_model::{Param, ParamKind};
use tch::{Device, Kind, Tensor};

/// Largest number of gradient elements flattened into one collective (128 MiB of f32):
/// bounds the transient copy while keeping collectives few.
pub const BUCKET_ELEMS: i64 = 1 << 25;

/// Averages gradients over the ranks that share each parameter (see the module docs):
/// dense `sum over world / W`, expert `sum over expert_dp / W`. In place; a no-op on one rank.
///
/// With several ranks an undefined gradient is materialised as zeros first, so every rank
/// flattens the same layout and the replicas receive the same update.
pub fn sync_gradients(params: &[Param], groups: &ProcessGroups) -> Result<()> {
    sync_gradients_bucketed(params, groups, BUCKET_ELEMS)
}

/// [`sync_gradients`] with buckets of at most `bucket_elems` elements (a parameter larger
/// than that travels alone).
pub fn sync_gradients_bucketed(
    params: &[Param],
    groups: &ProcessGroups,
    bucket_elems: i64,
) -> Result<()> {
    if groups.world_size <= 1 {
        return Ok(());
    }
    let scale = 1.0 / groups.world_size as f64;
    let mut dense = Vec::new();
    let mut expert = Vec::new();
    for p in params {
        let mut grad = p.tensor.f_grad()?;
        if !grad.defined() {
            tch::with_grad(|| p.tensor.f_mul_scalar(0.0)?.f_sum(Kind::Float)?.f_backward())?;
            grad = p.tensor.f_grad()?;
        }
        match p.kind {
            ParamKind::Dense => dense.push(grad),
            ParamKind::Expert { .. } => expert.push(grad),
        }
    }
    tch::no_grad(|| -> Result<()> {
        for bucket in buckets(&dense, bucket_elems) {
            reduce_bucket(bucket, &groups.world, scale)?;
        }
        let expert_dp_size = lock(&groups.expert_dp)?.size();
        for bucket in buckets(&expert, bucket_elems) {
            if expert_dp_size > 1 {
                reduce_bucket(bucket, &groups.expert_dp, scale)?;
            } else {
                for g in bucket {
                    let _ = g.shallow_clone().f_mul_scalar_(scale)?;
                }
            }
        }
        Ok(())
    })
}

/// Splits `grads` into runs of consecutive tensors with one kind and device and at most
/// `cap` elements in all (or a single larger tensor).
fn buckets(grads: &[Tensor], cap: i64) -> Vec<&[Tensor]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut elems = 0;
    for (i, g) in grads.iter().enumerate() {
        let n = g.numel() as i64;
        let compatible =
            i == start || (g.kind() == grads[start].kind() && g.device() == grads[start].device());
        if i > start && (!compatible || elems + n > cap) {
            out.push(&grads[start..i]);
            start = i;
            elems = 0;
        }
        elems += n;
    }
    if start < grads.len() {
        out.push(&grads[start..]);
    }
    out
}

/// All-reduces one bucket as a single flat tensor, scales it, and copies it back.
fn reduce_bucket(bucket: &[Tensor], comm: &SharedComm, scale: f64) -> Result<()> {
    let flat_parts = bucket
        .iter()
        .map(|g| g.f_reshape([-1]))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let flat = Tensor::f_cat(&flat_parts, 0)?;
    let summed = lock(comm)?.all_reduce_sum(&flat)?;
    let sizes: Vec<i64> = bucket.iter().map(|g| g.numel() as i64).collect();
    for (g, chunk) in bucket.iter().zip(summed.f_split_with_sizes(&sizes, 0)?) {
        g.shallow_clone()
            .f_copy_(&chunk.f_mul_scalar(scale)?.f_view(g.size().as_slice())?)?;
    }
    Ok(())
}

/// The global L2 norm of all gradients, dense counted once and expert gradients summed
/// over the EP group (which holds every expert once); call after [`sync_gradients`], when
/// replicas agree. One foreach norm kernel per kind of parameter, as
/// `clip_grad_norm_(foreach=True)`, and the step's second host read (clipping and the
/// skip decision need the value).
pub fn global_grad_norm(params: &[Param], groups: &ProcessGroups) -> Result<f64> {
    // host: no parameters at all, nothing lives on a device.
    let device = params.first().map_or(Device::Cpu, |p| p.tensor.device());
    let grads: Vec<(Tensor, bool)> = params
        .iter()
        .map(|p| {
            Ok((
                p.tensor.f_grad()?,
                matches!(p.kind, ParamKind::Expert { .. }),
            ))
        })
        .collect::<Result<_>>()?;
    tch::no_grad(|| -> Result<f64> {
        let sum_sq = |expert: bool| -> Result<Tensor> {
            let gs: Vec<&Tensor> = grads
                .iter()
                .filter(|(g, e)| *e == expert && g.defined())
                .map(|(g, _)| g)
                .collect();
            if gs.is_empty() {
                return Ok(Tensor::f_zeros([1], (Kind::Double, device))?);
            }
            Ok(crate::fused::foreach_sq_norm(&gs)?.f_reshape([1])?)
        };
        let dense_sq = sum_sq(false)?;
        let mut expert_sq = sum_sq(true)?;
        if groups.ep_size > 1 {
            expert_sq = lock(&groups.ep)?.all_reduce_sum(&expert_sq)?;
        }
        let total_sq = dense_sq.f_add(&expert_sq)?;
        Ok(moe_comm::host_read::<f64>(&total_sq)?[0].sqrt())
    })
}

/// The factor gradients are scaled by when their global norm is `norm`: `max_norm / (norm +
/// 1e-6)` (the coefficient of `torch.nn.utils.clip_grad_norm_`) when `max_norm > 0` and the
/// norm is finite and above it, else `None` (no clipping).
pub fn clip_coef(norm: f64, max_norm: f64) -> Option<f64> {
    (max_norm > 0.0 && norm.is_finite() && norm > max_norm).then(|| max_norm / (norm + 1e-6))
}

/// [`global_grad_norm`], then every gradient scaled in place by [`clip_coef`] (one foreach
/// kernel). Returns the norm before clipping; a non-finite norm is returned unclipped, for
/// the caller to skip the step. The tests' reference for clipping over ranks: the trainer
/// hands the coefficient to [`crate::optim::AdamW::step_clipped`] instead, which applies it
/// inside the update.
#[cfg(test)]
pub fn clip_grad_norm(params: &[Param], groups: &ProcessGroups, max_norm: f64) -> Result<f64> {
    let total = global_grad_norm(params, groups)?;
    if let Some(coef) = clip_coef(total, max_norm) {
        let grads = params
            .iter()
            .map(|p| Ok(p.tensor.f_grad()?))
            .collect::<Result<Vec<_>>>()?;
        let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
        tch::no_grad(|| crate::fused::foreach_mul_(&defined, coef))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Deterministic gradient values of parameter `which` on world rank `rank`.
    fn grad_vals(rank: usize, which: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((rank * 7 + i * 3 + which * 5) % 11) as f32 * 0.25 - 1.0)
            .collect()
    }

    /// Two dense parameters (sizes 5 and 3) and one expert tensor `[1, 4]` (one local expert
    /// per rank, global id = ep rank), with rank-specific gradients.
    fn make_params(rank: usize, ep_rank: usize) -> Vec<Param> {
        let specs = [("d0", 5, ParamKind::Dense), ("d1", 3, ParamKind::Dense)];
        let mut ps: Vec<Param> = specs
            .iter()
            .map(|(n, len, kind)| Param {
                name: (*n).into(),
                tensor: Tensor::zeros([*len], (Kind::Float, Device::Cpu)).set_requires_grad(true),
                kind: *kind,
                weight_decay: true,
            })
            .collect();
        ps.push(Param {
            name: "e".into(),
            tensor: Tensor::zeros([1, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true),
            kind: ParamKind::Expert {
                first_global: ep_rank as i64,
                num_local: 1,
            },
            weight_decay: true,
        });
        for (which, p) in ps.iter().enumerate() {
            let g = Tensor::from_slice(&grad_vals(rank, which, p.tensor.numel()))
                .view(p.tensor.size().as_slice());
            (&p.tensor * g).sum(Kind::Float).backward();
        }
        ps
    }

    fn grad(p: &Param) -> Vec<f64> {
        Vec::<f64>::try_from(p.tensor.grad().reshape([-1]).to_kind(Kind::Double)).unwrap()
    }

    /// Runs `f(rank, groups)` on `world` in-process ranks with EP groups of `ep`.
    fn run_ranks<T: Send + 'static>(
        world: usize,
        ep: usize,
        f: impl Fn(usize, ProcessGroups) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        tch::set_num_threads(1);
        let comms = moe_comm::threads::threads_world(world, Duration::from_secs(20));
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                std::thread::spawn(move || {
                    let groups = ProcessGroups::new(comm, ep).unwrap();
                    f(rank, groups)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Expected gradients after sync, from the module's rule evaluated on the host.
    fn expected(rank: usize, world: usize, ep: usize, which: usize, len: usize) -> Vec<f64> {
        let peers: Vec<usize> = if which < 2 {
            (0..world).collect()
        } else {
            (0..world).filter(|r| r % ep == rank % ep).collect()
        };
        (0..len)
            .map(|i| {
                peers
                    .iter()
                    .map(|r| f64::from(grad_vals(*r, which, len)[i]))
                    .sum::<f64>()
                    / world as f64
            })
            .collect()
    }

    /// Dense gradients become the world mean, expert gradients the expert-DP sum / W, for
    /// world sizes 2 and 4 with EP 1 and 2, and with one-tensor buckets (the multi-bucket
    /// path). Values are multiples of 1/4 summed over <= 4 ranks: float32 exact to 1e-6.
    #[test]
    fn sync_averages_dense_and_expert_gradients() {
        for (world, ep, cap) in [
            (2, 2, BUCKET_ELEMS),
            (4, 2, BUCKET_ELEMS),
            (2, 1, BUCKET_ELEMS),
            (4, 2, 4),
        ] {
            let results = run_ranks(world, ep, move |rank, groups| {
                let ps = make_params(rank, groups.ep_rank);
                sync_gradients_bucketed(&ps, &groups, cap).unwrap();
                ps.iter().map(grad).collect::<Vec<_>>()
            });
            for (rank, grads) in results.iter().enumerate() {
                for (which, g) in grads.iter().enumerate() {
                    let want = expected(rank, world, ep, which, g.len());
                    for (a, b) in g.iter().zip(&want) {
                        assert!(
                            (a - b).abs() < 1e-6,
                            "W={world} P={ep} rank {rank} param {which}: {g:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn buckets_respect_cap_and_kind() {
        let t = |n: i64, k: Kind| Tensor::zeros([n], (k, Device::Cpu));
        let gs = [
            t(3, Kind::Float),
            t(3, Kind::Float),
            t(10, Kind::Float),
            t(1, Kind::Double),
            t(1, Kind::Double),
        ];
        let lens: Vec<usize> = buckets(&gs, 6).iter().map(|b| b.len()).collect();
        assert_eq!(lens, vec![2, 1, 2]);
        assert_eq!(buckets(&gs[..3], BUCKET_ELEMS).len(), 1);
        assert!(buckets(&[], 6).is_empty());
    }

    /// Global norm at W=4, EP=2 against the norm computed on the host from every rank's
    /// synced gradients: dense from one rank, expert summed over one EP group. Then clipping
    /// to half of it scales every gradient by max / (norm + 1e-6), after which the norm is
    /// max_norm. float32 gradients, f64 accumulation: 1e-5 relative.
    #[test]
    fn clip_uses_true_global_norm() {
        let (world, ep) = (4, 2);
        let results = run_ranks(world, ep, move |rank, groups| {
            let ps = make_params(rank, groups.ep_rank);
            sync_gradients(&ps, &groups).unwrap();
            let synced: Vec<Vec<f64>> = ps.iter().map(grad).collect();
            let norm = clip_grad_norm(&ps, &groups, 0.0).unwrap();
            assert_eq!(
                ps.iter().map(grad).collect::<Vec<_>>(),
                synced,
                "max_norm 0 must not clip"
            );
            let big = clip_grad_norm(&ps, &groups, norm * 2.0).unwrap();
            assert_eq!(
                ps.iter().map(grad).collect::<Vec<_>>(),
                synced,
                "norm below max must not clip"
            );
            let before = clip_grad_norm(&ps, &groups, norm / 2.0).unwrap();
            let after = clip_grad_norm(&ps, &groups, 0.0).unwrap();
            let clipped: Vec<Vec<f64>> = ps.iter().map(grad).collect();
            (norm, big, before, after, synced, clipped)
        });
        let sq = |v: &Vec<f64>| v.iter().map(|x| x * x).sum::<f64>();
        let dense: f64 = results[0].4[..2].iter().map(sq).sum();
        let expert: f64 = (0..ep).map(|r| sq(&results[r].4[2])).sum();
        let want = (dense + expert).sqrt();
        // Expert grads differ between EP ranks, so counting one rank's experts would fail.
        assert!((sq(&results[0].4[2]) - sq(&results[1].4[2])).abs() > 1e-3);
        for (rank, (norm, big, before, after, synced, clipped)) in results.iter().enumerate() {
            assert!(
                (norm - want).abs() <= 1e-5 * want,
                "rank {rank}: {norm} vs {want}"
            );
            assert_eq!(norm, big);
            assert_eq!(norm, before);
            let coef = (want / 2.0) / (want + 1e-6);
            for (g, c) in synced.iter().zip(clipped) {
                for (a, b) in g.iter().zip(c) {
                    assert!(
                        (a * coef - b).abs() <= 1e-6,
                        "rank {rank}: {a} * {coef} vs {b}"
                    );
                }
            }
            assert!(
                (after - want / 2.0).abs() <= 1e-5 * want,
                "rank {rank}: after {after}"
            );
        }
    }

    /// One rank: sync is a no-op and the norm is the plain L2 norm of all gradients.
    #[test]
    fn single_rank() {
        let groups = ProcessGroups::single(tch::Device::Cpu);
        let ps = make_params(0, 0);
        let before: Vec<Vec<f64>> = ps.iter().map(grad).collect();
        sync_gradients(&ps, &groups).unwrap();
        assert_eq!(ps.iter().map(grad).collect::<Vec<_>>(), before);
        let want = before.iter().flatten().map(|x| x * x).sum::<f64>().sqrt();
        let norm = clip_grad_norm(&ps, &groups, 0.0).unwrap();
        assert!((norm - want).abs() <= 1e-6 * want);
    }
}
