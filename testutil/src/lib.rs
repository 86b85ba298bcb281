//! moe-testutil: the one closeness check every crate's tests use, so a tolerance means the
//! same thing everywhere and a failure message always names what differed and by how much;
//! and [`only_checkpoint`], which the binary's and the workspace's run-directory tests share.
//!
//! Dev-dependency only; it depends on tch alone, so any crate of the workspace can use it
//! without a dependency cycle.

use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The one intact checkpoint (`step-N/` with a manifest) under `run/checkpoints`; panics
/// naming what it found when there is not exactly one.
pub fn only_checkpoint(run: &Path) -> PathBuf {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap_or_else(|e| panic!("{}: {e}", run.join("checkpoints").display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    assert_eq!(steps.len(), 1, "{steps:?}");
    steps.pop().unwrap()
}

/// How close is close enough. Tests state the value and why in a comment at the call site.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Tol {
    /// Every element: `|got - want| <= tol` (hand-computed values of known magnitude).
    Abs(f64),
    /// `max |got - want| <= rel * scale`, with `scale` the largest magnitude in either side
    /// (at least 1e-12): relative to the values' scale, so elements near zero do not fail on
    /// rounding noise (paths that sum the same products in different orders).
    Rel(f64),
}

/// Something with numbers to compare: a scalar, a list, or a tensor (any kind or device).
pub trait Values {
    /// The shape when it is a tensor (compared when both sides have one), and the values
    /// flattened in row-major order as f64.
    fn values(&self) -> (Option<Vec<i64>>, Vec<f64>);
}

impl Values for f64 {
    fn values(&self) -> (Option<Vec<i64>>, Vec<f64>) {
        (None, vec![*self])
    }
}

impl Values for [f64] {
    fn values(&self) -> (Option<Vec<i64>>, Vec<f64>) {
        (None, self.to_vec())
    }
}

impl<const N: usize> Values for [f64; N] {
    fn values(&self) -> (Option<Vec<i64>>, Vec<f64>) {
        (None, self.to_vec())
    }
}

impl Values for Vec<f64> {
    fn values(&self) -> (Option<Vec<i64>>, Vec<f64>) {
        (None, self.clone())
    }
}

impl Values for Tensor {
    fn values(&self) -> (Option<Vec<i64>>, Vec<f64>) {
        let flat = self
            .detach()
            .to_device(Device::Cpu)
            .to_kind(Kind::Double)
            .reshape([-1]);
        let values = Vec::<f64>::try_from(&flat).expect("tensor values as f64");
        (Some(self.size()), values)
    }
}

impl<T: Values + ?Sized> Values for &T {
    fn values(&self) -> (Option<Vec<i64>>, Vec<f64>) {
        (**self).values()
    }
}

/// Asserts that `got` is within `tol` of `want`: same shape (tensors) or length, then the
/// tolerance (see [`Tol`]). NaN is never close to anything. The message names `what`, the
/// worst element, both values and the tolerance.
pub fn assert_close<G, W>(what: &str, got: &G, want: &W, tol: Tol)
where
    G: Values + ?Sized,
    W: Values + ?Sized,
{
    let (got_shape, got) = got.values();
    let (want_shape, want) = want.values();
    if let (Some(g), Some(w)) = (&got_shape, &want_shape) {
        assert_eq!(g, w, "{what}: shapes differ");
    }
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let Some((worst, diff)) = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))
    else {
        return;
    };
    // `total_cmp` orders NaN above every number, so a NaN anywhere is the worst element.
    let (g, w) = (got[worst], want[worst]);
    match tol {
        Tol::Abs(tol) => assert!(
            diff <= tol,
            "{what}[{worst}]: got {g}, want {w} (difference {diff:.3e} > tolerance {tol:.0e})"
        ),
        Tol::Rel(rel) => {
            let scale = got
                .iter()
                .chain(&want)
                .fold(1e-12f64, |m, v| m.max(v.abs()));
            assert!(
                diff <= rel * scale,
                "{what}[{worst}]: got {g}, want {w} (difference {diff:.3e} > {rel:.0e} x scale \
                 {scale:.3e})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_within_and_rejects_beyond_the_tolerance() {
        assert_close("scalar", &1.0, &(1.0 + 1e-7), Tol::Rel(1e-6));
        assert_close("list", &[1.0, 0.0][..], &[1.0, 1e-7], Tol::Abs(1e-6));
        let t = Tensor::from_slice(&[1.0f32, 2.0, -4.0]).reshape([3, 1]);
        assert_close("tensor", &t, &(&t + 1e-6), Tol::Rel(1e-6));
        assert_close(
            "empty",
            &Tensor::zeros([0, 3], (Kind::Float, Device::Cpu)),
            &Tensor::zeros([0, 3], (Kind::Float, Device::Cpu)),
            Tol::Abs(0.0),
        );
        for (got, want, tol) in [
            (1.0, 1.0 + 1e-5, Tol::Rel(1e-6)),
            (0.0, 2e-6, Tol::Abs(1e-6)),
            (f64::NAN, f64::NAN, Tol::Abs(1.0)),
        ] {
            let r = std::panic::catch_unwind(|| assert_close("x", &got, &want, tol));
            assert!(r.is_err(), "{got} vs {want} at {tol:?} must fail");
        }
        // Relative to the largest magnitude of either side: 1e-5 off at scale 4 passes 1e-5.
        assert_close("scale", &[4.0, 1e-5][..], &[4.0, 0.0], Tol::Rel(1e-5));
        let shapes = std::panic::catch_unwind(|| {
            assert_close(
                "shape",
                &Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
                &Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
                Tol::Abs(1.0),
            )
        });
        assert!(shapes.is_err(), "shapes must be compared");
    }
}
