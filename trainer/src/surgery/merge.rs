//! `moe slim --merge`: fold each dropped expert into its most similar kept one, weighted by
//! routing frequency (M-SMoE, Li et al. 2024, "Merge, Then Compress"; HC-SMoE groups experts
//! the same way by output similarity).
//!
//! Similarity is the cosine of the experts' router columns `W_r[:, e]`: two experts whose
//! columns point the same way receive the same tokens with similar logits, so the kept
//! expert is the one the dropped expert's tokens would most plausibly have chosen. It needs
//! no extra pass. The merged weights are the frequency-weighted mean of the group's
//! `w_gate`, `w_up` and `w_down`, hidden unit by hidden unit (no permutation alignment of
//! hidden units, which M-SMoE adds); the kept expert's router column is kept unchanged.

use super::run_out::failed;
use crate::hf::HfError;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// For every expert not in `keep` (sorted), the kept expert with the highest cosine
/// similarity of router columns (ties to the lower id). `w_router_de` is `[d, E]`.
pub fn merge_targets(w_router_de: &Tensor, keep: &[i64]) -> Result<BTreeMap<i64, i64>, HfError> {
    let cols_ed = w_router_de
        .f_to_kind(Kind::Double)
        .and_then(|w| w.f_tr())
        .map_err(failed)?;
    let e = cols_ed.size()[0];
    let norm_e1 = cols_ed
        .f_norm_scalaropt_dim(2.0, [1], true)
        .and_then(|n| n.f_clamp_min(1e-30))
        .map_err(failed)?;
    let unit_ed = cols_ed.f_div(&norm_e1).map_err(failed)?;
    let sim_ee = unit_ed
        .f_matmul(&unit_ed.f_tr().map_err(failed)?)
        .map_err(failed)?;
    let sim = Vec::<f64>::try_from(&sim_ee.f_reshape([-1]).map_err(failed)?).map_err(failed)?;
    let mut out = BTreeMap::new();
    for j in (0..e).filter(|j| !keep.contains(j)) {
        let mut best: Option<(i64, f64)> = None;
        for &i in keep {
            let s = sim[(j * e + i) as usize];
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
        if let Some((i, _)) = best {
            out.insert(j, i);
        }
    }
    Ok(out)
}

/// The experts merged into each kept expert, itself first: `kept -> [kept, dropped...]`.
pub fn merge_groups(keep: &[i64], targets: &BTreeMap<i64, i64>) -> BTreeMap<i64, Vec<i64>> {
    let mut groups: BTreeMap<i64, Vec<i64>> = keep.iter().map(|&k| (k, vec![k])).collect();
    for (&dropped, &into) in targets {
        groups.entry(into).or_default().push(dropped);
    }
    groups
}

/// `sum_i f_i W_i / sum_i f_i` over `(W_i, f_i)`; equal weights when every `f_i` is 0.
pub fn weighted_mean(parts: &[(Tensor, f64)]) -> Result<Tensor, HfError> {
    let total: f64 = parts.iter().map(|(_, f)| f.max(0.0)).sum();
    let n = parts.len().max(1) as f64;
    let mut acc: Option<Tensor> = None;
    for (w, f) in parts {
        let c = if total > 0.0 {
            f.max(0.0) / total
        } else {
            1.0 / n
        };
        let term = w.f_mul_scalar(c).map_err(failed)?;
        acc = Some(match acc {
            Some(a) => a.f_add(&term).map_err(failed)?,
            None => term,
        });
    }
    acc.ok_or_else(|| failed("merging an empty group of experts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Router columns (d = 2): e0 (1, 0), e1 (0, 1), e2 (1, 0.1), e3 (-1, 0), e4 (0.1, 1).
    /// Keeping [0, 1]: by hand cos(e2, e0) = 0.995 > cos(e2, e1) = 0.0995 -> 0; e3 has
    /// cos -1 with e0 and 0 with e1 -> 1; e4 is nearest e1.
    #[test]
    fn targets_by_router_cosine() {
        let w = Tensor::from_slice(&[1f32, 0., 1., -1., 0.1, 0., 1., 0.1, 0., 1.]).reshape([2, 5]);
        let t = merge_targets(&w, &[0, 1]).unwrap();
        assert_eq!(t, BTreeMap::from([(2, 0), (3, 1), (4, 1)]));
        let g = merge_groups(&[0, 1], &t);
        assert_eq!(g[&0], [0, 2]);
        assert_eq!(g[&1], [1, 3, 4]);
    }

    /// (3 * [1, 2] + 1 * [5, 6]) / 4 = [2, 3] exactly; all-zero frequencies give the plain
    /// mean [3, 4].
    #[test]
    fn frequency_weighted_mean_by_hand() {
        let a = Tensor::from_slice(&[1f32, 2.]);
        let b = Tensor::from_slice(&[5f32, 6.]);
        let m = weighted_mean(&[(a.shallow_clone(), 3.0), (b.shallow_clone(), 1.0)]).unwrap();
        assert_eq!(Vec::<f32>::try_from(m).unwrap(), [2., 3.]);
        let m = weighted_mean(&[(a, 0.0), (b, 0.0)]).unwrap();
        assert_eq!(Vec::<f32>::try_from(m).unwrap(), [3., 4.]);
    }
}
