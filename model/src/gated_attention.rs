//! Qwen3-Next's gated full attention (HF `Qwen3NextAttention`; Qiu et al. 2025, "Gated
//! Attention for Large Language Models", arXiv:2505.06708): grouped-query attention whose
//! queries and keys pass a per-head RMSNorm, whose RoPE rotates only the first `rotary_dim`
//! channels of each head (partial RoPE), and whose output is scaled by `sigmoid(x W_gate)`
//! per channel before the output projection.

use crate::config::ModelConfig;
use crate::heads::{batch_time, repeat_kv};
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::{ModelError, ParamBuilder, Result};
use tch::{Kind, Tensor};

/// Gated attention of one block. Weights are `[in, out]`.
#[derive(Debug)]
pub struct GatedAttention {
    /// `[d, H * hd]` each: queries and the output gate.
    wq: Tensor,
    wgate: Tensor,
    /// `[d, KV * hd]` each.
    wk: Tensor,
    wv: Tensor,
    /// `[H * hd, d]`.
    wo: Tensor,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl GatedAttention {
    /// Parameters `<vb>.{wq, wgate, wk, wv, wo}` (decayed) and
    /// `<vb>.{q_norm, k_norm}.weight` (not decayed).
    pub fn new(cfg: &ModelConfig, vb: &ParamBuilder) -> Result<Self> {
        let (h, kv, hd, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim(), cfg.d_model);
        if h <= 0 || kv <= 0 || h % kv != 0 || hd <= 0 {
            return Err(ModelError::Invalid(format!(
                "attention needs num_kv_heads ({kv}) dividing num_heads ({h}) and head_dim ({hd}) > 0"
            )));
        }
        let std = cfg.init_std;
        let out_std = std / (2.0 * cfg.num_layers.max(1) as f64).sqrt();
        let w = |n: &str, shape: &[i64], s: f64| vb.normal(n, shape, s);
        Ok(Self {
            wq: w("wq", &[d, h * hd], std)?,
            wgate: w("wgate", &[d, h * hd], std)?,
            wk: w("wk", &[d, kv * hd], std)?,
            wv: w("wv", &[d, kv * hd], std)?,
            wo: w("wo", &[h * hd, d], out_std)?,
            q_norm: RmsNorm::new(&vb.pp("q_norm"), hd, cfg.norm_eps)?,
            k_norm: RmsNorm::new(&vb.pp("k_norm"), hd, cfg.norm_eps)?,
            heads: h,
            kv_heads: kv,
            head_dim: hd,
        })
    }

    /// RoPE on the first `rope`-width channels of each head, the rest passed through.
    fn partial_rope(&self, x_bhtd: &Tensor, rope: &Rope, rotary: i64) -> Result<Tensor> {
        if rotary == self.head_dim {
            return rope.apply(x_bhtd);
        }
        let rot = rope.apply(&x_bhtd.f_narrow(3, 0, rotary)?)?;
        let pass = x_bhtd.f_narrow(3, rotary, self.head_dim - rotary)?;
        Ok(Tensor::f_cat(&[rot, pass], 3)?)
    }

    /// Causal gated attention; `rope` rotates `rotary` channels (`rotary <= head_dim`).
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> `[b, t, d]`
    pub fn forward(
        &self,
        x_btd: &Tensor,
        rope: &Rope,
        rotary: i64,
        compute_kind: Kind,
    ) -> Result<Tensor> {
        let (b, t) = batch_time(x_btd)?;
        let ck = compute_kind;
        let x = x_btd.f_to_kind(ck)?;
        let hd = self.head_dim;
        let proj = |w: &Tensor, n: i64| -> Result<Tensor> {
            Ok(x.f_matmul(&w.f_to_kind(ck)?)?.f_view([b, t, n, hd])?)
        };
        // Norms act per head on [b, t, n, hd], before the heads move to dim 1.
        let q = self
            .q_norm
            .forward(&proj(&self.wq, self.heads)?)?
            .f_transpose(1, 2)?;
        let k = self
            .k_norm
            .forward(&proj(&self.wk, self.kv_heads)?)?
            .f_transpose(1, 2)?;
        let v = proj(&self.wv, self.kv_heads)?.f_transpose(1, 2)?;
        let q = self.partial_rope(&q, rope, rotary)?;
        let k = self.partial_rope(&k, rope, rotary)?;
        let y_bhtd = Tensor::f_scaled_dot_product_attention::<Tensor>(
            &q,
            &repeat_kv(&k, self.heads)?,
            &repeat_kv(&v, self.heads)?,
            None,
            0.0,
            true,
            None,
            false,
        )?;
        let y_btq = y_bhtd
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.heads * hd])?;
        let gate = x.f_matmul(&self.wgate.f_to_kind(ck)?)?.f_sigmoid()?;
        Ok(y_btq.f_mul(&gate)?.f_matmul(&self.wo.f_to_kind(ck)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The module under the name `a`, and the builder holding its parameters.
    fn build(c: &ModelConfig, seed: u64) -> (GatedAttention, ParamBuilder) {
        let vb = ParamBuilder::new(seed, Device::Cpu);
        let m = GatedAttention::new(c, &vb.pp("a")).unwrap();
        (m, vb)
    }

    fn cfg() -> ModelConfig {
        ModelConfig {
            d_model: 16,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: Some(8),
            num_layers: 2,
            max_seq_len: 16,
            init_std: 0.3,
            ..ModelConfig::default()
        }
    }

    /// Head by head in float64: per-head RMSNorm written out, RoPE on the first 4 of 8
    /// channels only, explicit causal softmax, head j reading kv head j / 2, then the sigmoid
    /// gate. Agreement to 1e-10 checks the norm placement, the partial rotation, the GQA
    /// layout and the gate.
    #[test]
    fn matches_hand_computation_with_partial_rope() {
        let c = cfg();
        let (m, vb) = build(&c, 1);
        for p in vb.params() {
            let mut t = p.tensor;
            let d = t.detach().to_kind(Kind::Double);
            t.set_data(&d);
        }
        // Non-trivial norm scales, so a missing or misplaced norm shows.
        tch::no_grad(|| {
            m.q_norm
                .weight_d
                .shallow_clone()
                .copy_(&Tensor::from_slice(&[
                    0.5f64, 1.5, 1.0, 2.0, 0.7, 1.1, 0.9, 1.3,
                ]))
        });
        let rope = Rope::new(4, 16, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 6, 16], (Kind::Double, Device::Cpu));
        let got = m.forward(&x, &rope, 4, Kind::Double).unwrap();

        let (b, t) = (2, 6);
        let rms = |x: &Tensor, w: &Tensor| {
            x / (x.square().mean_dim(-1, true, Kind::Double) + c.norm_eps).sqrt() * w
        };
        let rot = |x: &Tensor| {
            // x [b, t, 8]: rotate channels 0..4 (rotate-half within them), keep 4..8.
            let r = rope
                .apply(&x.narrow(2, 0, 4).unsqueeze(1))
                .unwrap()
                .squeeze_dim(1);
            Tensor::cat(&[r, x.narrow(2, 4, 4)], 2)
        };
        let q = x.matmul(&m.wq).view([b, t, 4, 8]);
        let k = x.matmul(&m.wk).view([b, t, 2, 8]);
        let v = x.matmul(&m.wv).view([b, t, 2, 8]);
        let mask = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        let mut outs = Vec::new();
        for h in 0..4 {
            let qh = rot(&rms(&q.select(2, h), &m.q_norm.weight_d));
            let kh = rot(&rms(&k.select(2, h / 2), &m.k_norm.weight_d));
            let s = qh.matmul(&kh.transpose(1, 2)) / 8f64.sqrt();
            let p = s
                .masked_fill(&mask, f64::NEG_INFINITY)
                .softmax(-1, Kind::Double);
            outs.push(p.matmul(&v.select(2, h / 2)));
        }
        let y = Tensor::cat(&outs, 2) * x.matmul(&m.wgate).sigmoid();
        let want = y.matmul(&m.wo);
        let err = (got - want).abs().max().double_value(&[]);
        assert!(err < 1e-10, "{err}");
    }
}
