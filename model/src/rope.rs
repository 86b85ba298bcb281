//! Rotary position embeddings (Su et al. 2021, "RoFormer", arXiv:2104.09864) in the
//! rotate-half layout of Llama / Hugging Face `apply_rotary_pos_emb`: channel `i` of the first
//! half pairs with channel `i + d/2`, both rotated by angle `pos * theta^(-2i/d)`.

use crate::{ModelError, Result};
use tch::{Device, Tensor};

/// Precomputed `cos`/`sin` tables for positions `0..max_seq_len`.
#[derive(Debug)]
pub struct Rope {
    /// `cos(pos * inv_freq)` duplicated over both halves, float32 `[max_seq_len, head_dim]`.
    cos_td: Tensor,
    /// `sin(pos * inv_freq)` duplicated over both halves, float32 `[max_seq_len, head_dim]`.
    sin_td: Tensor,
    head_dim: i64,
    max_seq_len: i64,
}

impl Rope {
    /// Tables for `head_dim` (even) channels and positions `0..max_seq_len`, base `theta`.
    /// Angles are computed in f64 on the host so long positions keep their precision.
    pub fn new(head_dim: i64, max_seq_len: i64, theta: f64, device: Device) -> Result<Self> {
        if head_dim <= 0 || head_dim % 2 != 0 || max_seq_len <= 0 {
            return Err(ModelError::Invalid(format!(
                "RoPE needs a positive even head_dim ({head_dim}) and positive max_seq_len ({max_seq_len})"
            )));
        }
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity((max_seq_len * head_dim) as usize);
        let mut sin = Vec::with_capacity((max_seq_len * head_dim) as usize);
        for pos in 0..max_seq_len {
            for c in 0..head_dim {
                let i = c % half;
                let angle = pos as f64 * theta.powf(-2.0 * i as f64 / head_dim as f64);
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        let table = |v: &[f32]| -> Result<Tensor> {
            // host: the tables are built once, at model construction.
            Ok(Tensor::f_from_slice(v)?
                .f_reshape([max_seq_len, head_dim])?
                .f_to_device(device)?)
        };
        Ok(Self {
            cos_td: table(&cos)?,
            sin_td: table(&sin)?,
            head_dim,
            max_seq_len,
        })
    }

    /// Rotates each position `t` of `x` by its angles; positions start at 0. The tables are
    /// cast to `x`'s kind.
    ///
    /// # Shapes
    /// `x_bhtd [b, heads, t, head_dim]` -> same
    pub fn apply(&self, x_bhtd: &Tensor) -> Result<Tensor> {
        self.apply_from(x_bhtd, 0)
    }

    /// [`Rope::apply`] with positions starting at `start` (the tokens after a KV cache of
    /// `start` positions); `start + t <= max_seq_len`.
    ///
    /// # Shapes
    /// `x_bhtd [b, heads, t, head_dim]` -> same
    pub fn apply_from(&self, x_bhtd: &Tensor, start: i64) -> Result<Tensor> {
        let size = x_bhtd.size();
        let (t, d) = match size.as_slice() {
            [_, _, t, d] => (*t, *d),
            _ => {
                return Err(ModelError::Invalid(format!(
                    "RoPE input must be [b, h, t, d], got {size:?}"
                )))
            }
        };
        if d != self.head_dim || start < 0 || start + t > self.max_seq_len {
            return Err(ModelError::Invalid(format!(
                "RoPE input {size:?} from position {start}: head_dim must be {} and \
                 start + t <= max_seq_len ({})",
                self.head_dim, self.max_seq_len
            )));
        }
        let kind = x_bhtd.kind();
        let cos = self.cos_td.f_narrow(0, start, t)?.f_to_kind(kind)?;
        let sin = self.sin_td.f_narrow(0, start, t)?.f_to_kind(kind)?;
        let halves = x_bhtd.f_chunk(2, -1)?;
        let rotated = Tensor::f_cat(&[halves[1].f_neg()?, halves[0].shallow_clone()], -1)?;
        Ok(x_bhtd.f_mul(&cos)?.f_add(&rotated.f_mul(&sin)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn rope() -> Rope {
        Rope::new(8, 64, 10_000.0, Device::Cpu).unwrap()
    }

    /// A rotation keeps each position's vector norm (float32 rounding: 1e-5 relative).
    #[test]
    fn preserves_norms() {
        let x = Tensor::randn([2, 3, 64, 8], (Kind::Float, Device::Cpu));
        let y = rope().apply(&x).unwrap();
        let nx = x.square().sum_dim_intlist(-1, false, Kind::Float).sqrt();
        let ny = y.square().sum_dim_intlist(-1, false, Kind::Float).sqrt();
        let err = (&nx - &ny).abs().max().double_value(&[]);
        assert!(
            err <= 1e-5 * nx.max().double_value(&[]),
            "norm changed by {err}"
        );
    }

    /// Position 0 is the identity (cos 0 = 1, sin 0 = 0), exactly.
    #[test]
    fn position_zero_is_identity() {
        let x = Tensor::randn([1, 1, 4, 8], (Kind::Float, Device::Cpu));
        let y = rope().apply(&x).unwrap();
        assert!(y.get(0).get(0).get(0).equal(&x.get(0).get(0).get(0)));
        assert!(!y
            .get(0)
            .get(0)
            .get(1)
            .allclose(&x.get(0).get(0).get(1), 1e-6, 1e-6, false));
    }

    /// `<R_m q, R_n k>` depends only on `m - n`: the same q and k placed at every position,
    /// every pair with the same offset gives the same score. Scores are O(10) and angles up
    /// to 63 rad are rounded to float32 in the tables, so 1e-4 absolute.
    #[test]
    fn scores_depend_only_on_relative_position() {
        let q = Tensor::randn([8], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([8], (Kind::Float, Device::Cpu));
        let t = 64;
        let qs = rope()
            .apply(&q.view([1, 1, 1, 8]).expand([1, 1, t, 8], false))
            .unwrap();
        let ks = rope()
            .apply(&k.view([1, 1, 1, 8]).expand([1, 1, t, 8], false))
            .unwrap();
        let scores = qs.view([t, 8]).matmul(&ks.view([t, 8]).tr()); // [m, n]
        let s = |m: i64, n: i64| scores.double_value(&[m, n]);
        for (m, n) in [(5, 2), (40, 37), (63, 60), (3, 0)] {
            assert!(
                (s(m, n) - s(m - n, 0)).abs() < 1e-4,
                "offset 3 at ({m},{n})"
            );
        }
        for (m, n) in [(2, 9), (30, 37), (56, 63)] {
            assert!((s(m, n) - s(0, 7)).abs() < 1e-4, "offset -7 at ({m},{n})");
        }
        // And it does depend on the offset (the test can fail).
        assert!((s(3, 0) - s(0, 7)).abs() > 1e-3);
    }

    /// Against the Hugging Face Llama formula evaluated by hand for one channel pair:
    /// head_dim 4, position 3, pair (0, 2) rotates by 3 rad, pair (1, 3) by 3 / 100 rad
    /// (theta 10^4, 10^4^(-2/4) = 1/100). float32: 1e-6.
    #[test]
    fn matches_hand_rotation() {
        let r = Rope::new(4, 8, 10_000.0, Device::Cpu).unwrap();
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0])
            .view([1, 1, 1, 4])
            .expand([1, 1, 4, 4], false);
        let y = r.apply(&x).unwrap();
        let got: Vec<f32> = Vec::try_from(y.get(0).get(0).get(3)).unwrap();
        let (a0, a1) = (3.0f64, 0.03f64);
        let want = [
            1.0 * a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            3.0 * a0.cos() + 1.0 * a0.sin(),
            4.0 * a1.cos() + 2.0 * a1.sin(),
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((f64::from(*g) - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// Rotating the last 3 of 10 positions from position 7 equals the same rows of a rotation
    /// of all 10 from position 0, bit for bit (the same table rows and ops).
    #[test]
    fn offset_positions_match_the_full_rotation() {
        let x = Tensor::randn([1, 2, 10, 8], (Kind::Float, Device::Cpu));
        let full = rope().apply(&x).unwrap();
        let tail = rope().apply_from(&x.narrow(2, 7, 3), 7).unwrap();
        assert!(tail.equal(&full.narrow(2, 7, 3)));
        assert!(!tail.equal(&rope().apply(&x.narrow(2, 7, 3)).unwrap()));
        assert!(rope().apply_from(&x.narrow(2, 7, 3), 62).is_err());
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(Rope::new(7, 8, 1e4, Device::Cpu).is_err());
        let r = rope();
        assert!(r
            .apply(&Tensor::zeros([1, 1, 65, 8], (Kind::Float, Device::Cpu)))
            .is_err());
        assert!(r
            .apply(&Tensor::zeros([1, 65, 8], (Kind::Float, Device::Cpu)))
            .is_err());
    }
}
