//! Root-mean-square layer normalisation (Zhang & Sennrich 2019, "Root Mean Square Layer
//! Normalization"), as Llama uses it: `y = x / sqrt(mean(x^2) + eps) * weight`, no mean
//! subtraction, no bias.

use crate::{ParamBuilder, Result};
use tch::{Kind, Tensor};

/// The kind a reduction over `kind` accumulates in: at least float32, so bfloat16
/// activations do not lose the statistics (float64 stays float64 for gradient checks).
pub fn accum_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// RMSNorm over the last dimension with a learned per-channel scale.
#[derive(Debug)]
pub struct RmsNorm {
    /// Per-channel scale `[d]`, initialised to ones.
    pub weight_d: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// A norm over a last dimension of width `dim`, with `eps` inside the square root; its
    /// scale is the parameter `<vb>.weight`, not decayed.
    pub fn new(vb: &ParamBuilder, dim: i64, eps: f64) -> Result<Self> {
        Ok(Self {
            weight_d: vb.ones("weight", &[dim])?,
            eps,
        })
    }

    /// Normalises `x` over its last dimension. Statistics and the scaling are computed in at
    /// least float32 ([`accum_kind`]); the result has `x`'s kind.
    ///
    /// # Shapes
    /// `x_nd [..., d]` -> `[..., d]`
    pub fn forward(&self, x_nd: &Tensor) -> Result<Tensor> {
        let kind = x_nd.kind();
        let acc = accum_kind(kind);
        let x = x_nd.f_to_kind(acc)?;
        let inv_rms = x
            .f_square()?
            .f_mean_dim(-1, true, acc)?
            .f_add_scalar(self.eps)?
            .f_rsqrt()?;
        let y = x.f_mul(&inv_rms)?.f_mul(&self.weight_d.f_to_kind(acc)?)?;
        Ok(y.f_to_kind(kind)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn vb() -> ParamBuilder {
        ParamBuilder::new(0, Device::Cpu)
    }

    /// Against the formula evaluated by hand in f64 on the host; 1e-6 relative is float32
    /// rounding of a handful of operations.
    #[test]
    fn matches_hand_formula() {
        let vals = [1.0f32, -2.0, 3.0, 0.5, 0.0, 4.0, -1.5, 2.5];
        let x = Tensor::from_slice(&vals).reshape([2, 4]);
        let norm = RmsNorm::new(&vb(), 4, 1e-5).unwrap();
        let scale = [0.5f32, 1.0, 2.0, -1.0];
        tch::no_grad(|| {
            norm.weight_d
                .shallow_clone()
                .copy_(&Tensor::from_slice(&scale))
        });
        let y = Vec::<f32>::try_from(norm.forward(&x).unwrap().reshape([-1])).unwrap();
        for r in 0..2 {
            let row = &vals[r * 4..r * 4 + 4];
            let ms = row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 4.0;
            for c in 0..4 {
                let want = f64::from(row[c]) / (ms + 1e-5).sqrt() * f64::from(scale[c]);
                let got = f64::from(y[r * 4 + c]);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{r},{c}: {got} vs {want}"
                );
            }
        }
    }

    /// bfloat16 input gives a bfloat16 output equal to the float32 computation rounded once
    /// (statistics are not accumulated in bfloat16): bf16 has 8 mantissa bits, 2^-8 relative.
    #[test]
    fn bf16_input_accumulates_in_f32() {
        let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu))
            .f_mul_scalar(30.0)
            .unwrap();
        let x_bf = x.to_kind(Kind::BFloat16);
        let norm = RmsNorm::new(&vb(), 64, 1e-5).unwrap();
        let y_bf = norm.forward(&x_bf).unwrap();
        assert_eq!(y_bf.kind(), Kind::BFloat16);
        let y_ref = norm.forward(&x_bf.to_kind(Kind::Float)).unwrap();
        let err = (y_bf.to_kind(Kind::Float) - &y_ref)
            .abs()
            .max()
            .double_value(&[]);
        let scale = y_ref.abs().max().double_value(&[]);
        assert!(err <= scale * 2f64.powi(-8), "err {err} scale {scale}");
    }

    #[test]
    fn params_are_named_and_not_decayed() {
        let vb = vb();
        let norm = RmsNorm::new(&vb.pp("layers.0.attn_norm"), 8, 1e-5).unwrap();
        let p = vb.params();
        assert!(p[0].tensor.equal(&norm.weight_d));
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].name, "layers.0.attn_norm.weight");
        assert!(!p[0].weight_decay);
        assert_eq!(p[0].tensor.size(), vec![8]);
    }
}
