//! The router's top-k on the CPU: one pass over each row, in place of torch's `topk` and the
//! tie-breaking tensor ops around it.
//!
//! [`super::select::topk_indices`] defines the selection: the k largest entries of each row in
//! descending order, ties to the lower column index. As tensor ops (any device) that is a
//! `topk` for the k-th value, about ten elementwise passes over `[N, E]` to break ties, a
//! `nonzero` and a stable sort; on the CPU at E=256, k=8 those cost several times the
//! router's own GEMM. Here each row is scanned once, keeping its k best entries in a small
//! sorted buffer. Scanning in column order makes the tie rule free: an entry replaces a kept
//! one only when strictly larger, so of equal values the earlier (lower-indexed) one stays.
//! Comparisons are IEEE (`-0.0 == 0.0`, a tie, as in torch's `eq`).
//!
//! Rows holding NaN get k in-range indices whose choice is unspecified, as on the tensor path
//! (the step's loss is NaN and the trainer skips it).

use crate::Result;
use std::cmp::Ordering;
use tch::{Device, Kind, Tensor};

/// `topk_indices` of `scores_ne` computed here, or `None` when this kernel does not apply
/// (not on the CPU, or not f32 / f64): the caller then runs the tensor ops.
///
/// # Shapes
/// `scores_ne` `[N, E]`, `1 <= k <= E` -> i64 `[N, k]`.
pub(crate) fn topk_indices(scores_ne: &Tensor, k: i64) -> Result<Option<Tensor>> {
    if !handles(scores_ne) {
        return Ok(None);
    }
    let kind = scores_ne.kind();
    let size = scores_ne.size();
    let [n, e] = size[..] else {
        return Ok(None);
    };
    if k < 1 || k > e {
        return Ok(None);
    }
    if n == 0 {
        return Ok(Some(Tensor::f_zeros(
            [0, k],
            (Kind::Int64, scores_ne.device()),
        )?));
    }
    let s_ne = scores_ne.f_detach()?.f_contiguous()?;
    let out_nk = Tensor::f_empty([n, k], (Kind::Int64, scores_ne.device()))?;
    let (rows, width, k) = (n as usize, e as usize, k as usize);
    // SAFETY: `out_nk` is a fresh contiguous i64 tensor of `rows * k` elements that nothing
    // else references while the slice lives.
    let out = unsafe { std::slice::from_raw_parts_mut(out_nk.data_ptr().cast::<i64>(), rows * k) };
    match kind {
        Kind::Float => {
            // SAFETY: `s_ne` is a contiguous CPU f32 tensor of `rows * width` elements, kept
            // alive (and unmodified) for the slice's lifetime.
            let s =
                unsafe { std::slice::from_raw_parts(s_ne.data_ptr().cast::<f32>(), rows * width) };
            topk_rows(s, width, k, out);
        }
        _ => {
            // SAFETY: as above, f64.
            let s =
                unsafe { std::slice::from_raw_parts(s_ne.data_ptr().cast::<f64>(), rows * width) };
            topk_rows(s, width, k, out);
        }
    }
    Ok(Some(out_nk))
}

/// Whether [`topk_indices`] runs here for tensors like `t` (CPU, f32 or f64).
pub(crate) fn handles(t: &Tensor) -> bool {
    // host: the kernel reads the scores where they are; it runs only for host tensors.
    t.device() == Device::Cpu && matches!(t.kind(), Kind::Float | Kind::Double)
}

/// For each row of the row-major `[rows, width]` buffer `s`, writes the column indices of its
/// k largest entries to the matching `k` slots of `out`, descending, ties to the lower index.
fn topk_rows<T: Copy + PartialOrd + Default>(s: &[T], width: usize, k: usize, out: &mut [i64]) {
    let mut vals = vec![T::default(); k];
    for (row, idx) in s.chunks_exact(width).zip(out.chunks_exact_mut(k)) {
        let mut len = 0;
        for (col, &v) in row.iter().enumerate() {
            if len == k {
                // Strictly larger than the smallest kept entry, which has a lower index.
                if v.partial_cmp(&vals[k - 1]) != Some(Ordering::Greater) {
                    continue;
                }
                len -= 1;
            }
            // Insert after every kept entry >= v: those all have lower indices.
            let mut j = len;
            while j > 0 && vals[j - 1] < v {
                vals[j] = vals[j - 1];
                idx[j] = idx[j - 1];
                j -= 1;
            }
            vals[j] = v;
            idx[j] = col as i64;
            len += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &[f32], width: usize, k: usize) -> Vec<i64> {
        let mut out = vec![-1; s.len() / width * k];
        topk_rows(s, width, k, &mut out);
        out
    }

    #[test]
    fn hand_computed_rows() {
        // Distinct values: plain descending order.
        assert_eq!(run(&[0.1, 0.9, -2.0, 0.5], 4, 2), [1, 3]);
        // Ties at the k-th value go to the lower index, ties inside the top too.
        assert_eq!(run(&[1.0, 2.0, 1.0, 2.0, 1.0], 5, 3), [1, 3, 0]);
        // -0.0 and 0.0 tie; -inf is a value like any other.
        assert_eq!(run(&[-0.0, 0.0, -f32::INFINITY], 3, 2), [0, 1]);
        assert_eq!(
            run(&[-f32::INFINITY, -f32::INFINITY, -f32::INFINITY], 3, 2),
            [0, 1]
        );
        // k == width is a stable descending sort.
        assert_eq!(run(&[3.0, 1.0, 3.0, 2.0], 4, 4), [0, 2, 3, 1]);
        // Two rows.
        assert_eq!(run(&[1.0, 2.0, 4.0, 3.0], 2, 1), [1, 0]);
    }

    #[test]
    fn nan_rows_stay_in_range() {
        let out = run(&[f32::NAN, 1.0, f32::NAN, 2.0, 0.5], 5, 3);
        assert!(out.iter().all(|i| (0..5).contains(i)), "{out:?}");
    }

    #[test]
    fn declines_what_it_does_not_handle() {
        let half = Tensor::zeros([2, 4], (Kind::Half, Device::Cpu));
        assert!(topk_indices(&half, 2).unwrap().is_none());
        let one_d = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        assert!(topk_indices(&one_d, 2).unwrap().is_none());
        let f = Tensor::from_slice(&[0.5f32, 2.0, 1.0]).view([1, 3]);
        let got = topk_indices(&f, 2).unwrap().unwrap();
        assert_eq!(Vec::<i64>::try_from(&got.view([-1])).unwrap(), [1, 2]);
    }
}
