//! Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; DeepSeek-V3,
//! arXiv:2412.19437, section 2.1.1), as in the reference `MLA` module of DeepSeek-V3's
//! inference code in its "naive" (explicit key/value up-projection) form:
//!
//! - queries: `q = W_qb(RMSNorm(W_qa x))` with rank `q_lora_rank` (or `q = W_q x`), split per
//!   head into `q_nope` (`qk_nope_head_dim`) and `q_pe` (`qk_rope_head_dim`, rotated);
//! - keys/values: `[c_kv, k_pe] = W_kva x`; the latent `c_kv` (`kv_lora_rank`) is normalised
//!   and up-projected to `[k_nope, v]` per head; `k_pe` is rotated once and shared by all
//!   heads;
//! - `softmax(q k^T * scale + causal mask) v` with `q = [q_nope, q_pe]`, `k = [k_nope, k_pe]`
//!   and `scale = 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)` unless set.
//!
//! RoPE uses the project's rotate-half layout (HF checkpoints of DeepSeek-V3 store the
//! interleaved one; an importer permutes the `q_pe`/`k_pe` channels).

use crate::config::ModelConfig;
use crate::heads::batch_time;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::{ModelError, ParamBuilder, Result};
use tch::{Kind, Tensor};

/// The query path: compressed (`q_lora_rank` set) or one projection.
#[derive(Debug)]
enum QueryProj {
    /// `W_qa` `[d, r_q]`, its norm, `W_qb` `[r_q, heads * qk_head_dim]`.
    LowRank {
        wq_a: Tensor,
        q_norm: RmsNorm,
        wq_b: Tensor,
    },
    /// `W_q` `[d, heads * qk_head_dim]`.
    Full(Tensor),
}

/// MLA of one block. Weights are `[in, out]` so a projection is `x.matmul(w)`.
#[derive(Debug)]
pub struct Mla {
    q: QueryProj,
    /// `[d, kv_lora_rank + qk_rope_head_dim]`: the latent and the shared RoPE key.
    wkv_a: Tensor,
    kv_norm: RmsNorm,
    /// `[kv_lora_rank, heads * (qk_nope_head_dim + v_head_dim)]`.
    wkv_b: Tensor,
    /// `[heads * v_head_dim, d]`.
    wo: Tensor,
    heads: i64,
    nope: i64,
    rope_dim: i64,
    v_dim: i64,
    kv_rank: i64,
    scale: f64,
}

impl Mla {
    /// Parameters `<vb>.{wq_a, q_norm.weight, wq_b | wq, wkv_a, kv_norm.weight, wkv_b, wo}`:
    /// the projections decayed, the norms' scales not; the output projection's std is
    /// `init_std / sqrt(2 * num_layers)` as for [`crate::attention::Attention`].
    pub fn new(cfg: &ModelConfig, vb: &ParamBuilder) -> Result<Self> {
        let a = &cfg.attention;
        let (h, d) = (cfg.num_heads, cfg.d_model);
        if h <= 0
            || a.kv_lora_rank <= 0
            || a.qk_nope_head_dim <= 0
            || a.v_head_dim <= 0
            || a.qk_rope_head_dim <= 0
            || a.qk_rope_head_dim % 2 != 0
        {
            return Err(ModelError::Invalid(format!(
                "MLA needs positive heads and widths and an even qk_rope_head_dim, got {a:?} with {h} heads"
            )));
        }
        let std = cfg.init_std;
        let out_std = std / (2.0 * cfg.num_layers.max(1) as f64).sqrt();
        let w = |n: &str, shape: &[i64], s: f64| vb.normal(n, shape, s);
        let qk = a.qk_head_dim();
        let q = match a.q_lora_rank {
            Some(r) => QueryProj::LowRank {
                wq_a: w("wq_a", &[d, r], std)?,
                q_norm: RmsNorm::new(&vb.pp("q_norm"), r, cfg.norm_eps)?,
                wq_b: w("wq_b", &[r, h * qk], std)?,
            },
            None => QueryProj::Full(w("wq", &[d, h * qk], std)?),
        };
        Ok(Self {
            q,
            wkv_a: w("wkv_a", &[d, a.kv_lora_rank + a.qk_rope_head_dim], std)?,
            kv_norm: RmsNorm::new(&vb.pp("kv_norm"), a.kv_lora_rank, cfg.norm_eps)?,
            wkv_b: w(
                "wkv_b",
                &[a.kv_lora_rank, h * (a.qk_nope_head_dim + a.v_head_dim)],
                std,
            )?,
            wo: w("wo", &[h * a.v_head_dim, d], out_std)?,
            heads: h,
            nope: a.qk_nope_head_dim,
            rope_dim: a.qk_rope_head_dim,
            v_dim: a.v_head_dim,
            kv_rank: a.kv_lora_rank,
            scale: a.softmax_scale.unwrap_or(1.0 / (qk as f64).sqrt()),
        })
    }

    /// Causal MLA over each sequence; `rope` must rotate `qk_rope_head_dim` channels. Matmuls
    /// run in `compute_kind`, the norms accumulate in at least float32; the output has
    /// `compute_kind`.
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> `[b, t, d]`
    pub fn forward(&self, x_btd: &Tensor, rope: &Rope, compute_kind: Kind) -> Result<Tensor> {
        let (b, t) = batch_time(x_btd)?;
        let ck = compute_kind;
        let x = x_btd.f_to_kind(ck)?;
        let mm = |a: &Tensor, w: &Tensor| -> Result<Tensor> { Ok(a.f_matmul(&w.f_to_kind(ck)?)?) };
        let (h, qk) = (self.heads, self.nope + self.rope_dim);
        let q_btq = match &self.q {
            QueryProj::LowRank { wq_a, q_norm, wq_b } => {
                mm(&q_norm.forward(&mm(&x, wq_a)?)?, wq_b)?
            }
            QueryProj::Full(wq) => mm(&x, wq)?,
        };
        // [b, t, h*qk] -> [b, h, t, qk]
        let q_bhtq = q_btq.f_view([b, t, h, qk])?.f_transpose(1, 2)?;
        let q_nope = q_bhtq.f_narrow(3, 0, self.nope)?;
        let q_pe = rope.apply(&q_bhtq.f_narrow(3, self.nope, self.rope_dim)?)?;

        let kv_a = mm(&x, &self.wkv_a)?;
        let c_kv_btc = self.kv_norm.forward(&kv_a.f_narrow(2, 0, self.kv_rank)?)?;
        // The shared RoPE key: one "head", broadcast to all h.
        let k_pe_b1tr = rope.apply(
            &kv_a
                .f_narrow(2, self.kv_rank, self.rope_dim)?
                .f_unsqueeze(1)?,
        )?;
        let kv_bhtx = mm(&c_kv_btc, &self.wkv_b)?
            .f_view([b, t, h, self.nope + self.v_dim])?
            .f_transpose(1, 2)?;
        let k_nope = kv_bhtx.f_narrow(3, 0, self.nope)?;
        let v_bhtv = kv_bhtx.f_narrow(3, self.nope, self.v_dim)?;
        let q_full = Tensor::f_cat(&[q_nope, q_pe], 3)?;
        let k_full = Tensor::f_cat(
            &[k_nope, k_pe_b1tr.f_expand([b, h, t, self.rope_dim], false)?],
            3,
        )?;
        let y_bhtv = Tensor::f_scaled_dot_product_attention::<Tensor>(
            &q_full,
            &k_full,
            &v_bhtv.f_contiguous()?,
            None,
            0.0,
            true,
            Some(self.scale),
            false,
        )?;
        let y_btv = y_bhtv
            .f_transpose(1, 2)?
            .f_reshape([b, t, h * self.v_dim])?;
        mm(&y_btv, &self.wo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The module under the name `a`, and the builder holding its parameters.
    fn build(c: &ModelConfig, seed: u64) -> (Mla, ParamBuilder) {
        let vb = ParamBuilder::new(seed, Device::Cpu);
        let m = Mla::new(c, &vb.pp("a")).unwrap();
        (m, vb)
    }
    use crate::config::{AttentionConfig, AttentionKind};

    fn cfg(q_lora_rank: Option<i64>) -> ModelConfig {
        ModelConfig {
            d_model: 16,
            num_heads: 3,
            num_kv_heads: 3,
            num_layers: 2,
            max_seq_len: 16,
            init_std: 0.3,
            attention: AttentionConfig {
                kind: AttentionKind::Mla,
                q_lora_rank,
                kv_lora_rank: 6,
                qk_nope_head_dim: 5,
                qk_rope_head_dim: 4,
                v_head_dim: 7,
                softmax_scale: None,
                ..AttentionConfig::default()
            },
            ..ModelConfig::default()
        }
    }

    /// Casts every weight to float64 in place (for float64 references and finite differences).
    fn to_f64(vb: &ParamBuilder) {
        for p in vb.params() {
            let mut t = p.tensor;
            let d = t.detach().to_kind(Kind::Double);
            t.set_data(&d);
        }
    }

    /// RMSNorm written out: `x / sqrt(mean(x^2) + eps) * w`.
    fn rms(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        x / (x.square().mean_dim(-1, true, Kind::Double) + eps).sqrt() * w
    }

    /// MLA in DeepSeek's "absorb" form, head by head, in float64: the key and value
    /// up-projections are never applied to the latent; head i scores
    /// `(q_nope_i W_kb_i^T) c^T + q_pe_i k_pe^T` and outputs `(P_i c) W_vb_i`. Agreement with
    /// the explicit up-projection in [`Mla::forward`] checks the split of `W_kvb`, the
    /// shared RoPE key, the masking and the scale.
    fn absorbed_reference(m: &Mla, rope: &Rope, x: &Tensor, eps: f64) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let (h, nope, r, v) = (m.heads, m.nope, m.rope_dim, m.v_dim);
        let q = match &m.q {
            QueryProj::LowRank { wq_a, q_norm, wq_b } => {
                rms(&x.matmul(wq_a), &q_norm.weight_d, eps).matmul(wq_b)
            }
            QueryProj::Full(wq) => x.matmul(wq),
        }
        .view([b, t, h, nope + r]);
        let kv_a = x.matmul(&m.wkv_a);
        let c = rms(&kv_a.narrow(2, 0, m.kv_rank), &m.kv_norm.weight_d, eps);
        let k_pe = rope
            .apply(&kv_a.narrow(2, m.kv_rank, r).unsqueeze(1))
            .unwrap()
            .squeeze_dim(1);
        let w_kvb = m.wkv_b.view([m.kv_rank, h, nope + v]);
        let mask = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        let mut outs = Vec::new();
        for i in 0..h {
            let q_i = q.select(2, i);
            let q_nope = q_i.narrow(2, 0, nope);
            let q_pe = rope
                .apply(&q_i.narrow(2, nope, r).unsqueeze(1))
                .unwrap()
                .squeeze_dim(1);
            let w_kb = w_kvb.select(1, i).narrow(1, 0, nope); // [r_kv, nope]
            let w_vb = w_kvb.select(1, i).narrow(1, nope, v); // [r_kv, v]
            let s = (q_nope.matmul(&w_kb.tr()).matmul(&c.transpose(1, 2))
                + q_pe.matmul(&k_pe.transpose(1, 2)))
                * m.scale;
            let p = s
                .masked_fill(&mask, f64::NEG_INFINITY)
                .softmax(-1, Kind::Double);
            outs.push(p.matmul(&c).matmul(&w_vb));
        }
        Tensor::cat(&outs, 2).matmul(&m.wo)
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Both query paths against the absorbed reference. float64: the two orders of the same
    /// sums differ by rounding only, 1e-10. The default scale is 1/sqrt(5 + 4).
    #[test]
    fn matches_the_absorbed_form() {
        for q_lora_rank in [Some(8), None] {
            let c = cfg(q_lora_rank);
            let (m, vb) = build(&c, 1);
            to_f64(&vb);
            assert!((m.scale - 1.0 / 3.0).abs() < 1e-15);
            let rope = Rope::new(c.rope_dim(), 16, c.rope_theta, Device::Cpu).unwrap();
            let x = Tensor::randn([2, 7, 16], (Kind::Double, Device::Cpu));
            let got = m.forward(&x, &rope, Kind::Double).unwrap();
            assert_eq!(got.size(), vec![2, 7, 16]);
            let want = absorbed_reference(&m, &rope, &x, c.norm_eps);
            let err = max_abs(&got, &want);
            assert!(err < 1e-10, "q_lora_rank {q_lora_rank:?}: {err}");
        }
    }

    /// float32 forward against the float64 reference: 1e-5 absolute covers float32 rounding
    /// of O(1) activations through five matmuls and a softmax.
    #[test]
    fn float32_matches_the_reference_to_1e5() {
        let c = cfg(Some(8));
        let (m, vb) = build(&c, 2);
        let rope = Rope::new(c.rope_dim(), 16, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 9, 16], (Kind::Float, Device::Cpu));
        let got = m.forward(&x, &rope, Kind::Float).unwrap();
        to_f64(&vb);
        let want = absorbed_reference(&m, &rope, &x.to_kind(Kind::Double), c.norm_eps);
        let err = max_abs(&got.to_kind(Kind::Double), &want);
        assert!(err < 1e-5, "{err}");
    }

    /// An explicit softmax_scale is used as given (a wrong scale moves the output by far more
    /// than 1e-10).
    #[test]
    fn explicit_scale_is_used() {
        let mut c = cfg(None);
        c.attention.softmax_scale = Some(0.9);
        let (m, vb) = build(&c, 3);
        to_f64(&vb);
        let rope = Rope::new(c.rope_dim(), 16, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([1, 5, 16], (Kind::Double, Device::Cpu));
        let got = m.forward(&x, &rope, Kind::Double).unwrap();
        assert!(max_abs(&got, &absorbed_reference(&m, &rope, &x, c.norm_eps)) < 1e-10);
    }

    /// Changing inputs after position t leaves outputs up to t unchanged.
    #[test]
    fn causal() {
        let c = cfg(Some(8));
        let (m, _) = build(&c, 4);
        let rope = Rope::new(c.rope_dim(), 16, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([1, 8, 16], (Kind::Float, Device::Cpu));
        let x2 = x.copy();
        x2.narrow(1, 5, 3)
            .copy_(&Tensor::randn([1, 3, 16], (Kind::Float, Device::Cpu)));
        let y = m.forward(&x, &rope, Kind::Float).unwrap();
        let y2 = m.forward(&x2, &rope, Kind::Float).unwrap();
        assert!(max_abs(&y.narrow(1, 0, 5), &y2.narrow(1, 0, 5)) < 1e-6);
        assert!(max_abs(&y.narrow(1, 5, 3), &y2.narrow(1, 5, 3)) > 1e-4);
    }

    /// Every weight gets a gradient equal to central finite differences (float64, step 1e-6:
    /// truncation O(1e-12), rounding O(1e-10); 1e-6 relative leaves margin).
    #[test]
    fn gradients_match_finite_differences() {
        let c = cfg(Some(8));
        let (m, vb) = build(&c, 5);
        to_f64(&vb);
        let names: Vec<String> = vb.params().iter().map(|p| p.name.clone()).collect();
        assert_eq!(
            names,
            [
                "a.wq_a",
                "a.q_norm.weight",
                "a.wq_b",
                "a.wkv_a",
                "a.kv_norm.weight",
                "a.wkv_b",
                "a.wo"
            ]
        );
        let rope = Rope::new(c.rope_dim(), 16, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 4, 16], (Kind::Double, Device::Cpu));
        let r = Tensor::randn([2, 4, 16], (Kind::Double, Device::Cpu));
        let loss = || (m.forward(&x, &rope, Kind::Double).unwrap() * &r).sum(Kind::Double);
        let params: Vec<Tensor> = vb
            .params()
            .into_iter()
            .map(|p| p.tensor.set_requires_grad(true))
            .collect();
        loss().backward();
        let eps = 1e-6;
        for t in &params {
            let grad = t.grad().reshape([-1]);
            let n = t.numel() as i64;
            for idx in [0, n / 2, n - 1] {
                let flat = t.detach().reshape([-1]);
                let orig = flat.double_value(&[idx]);
                let eval = |v: f64| {
                    tch::no_grad(|| {
                        let _ = flat.get(idx).fill_(v);
                        loss().double_value(&[])
                    })
                };
                let fd = (eval(orig + eps) - eval(orig - eps)) / (2.0 * eps);
                let _ = tch::no_grad(|| flat.get(idx).fill_(orig));
                let an = grad.double_value(&[idx]);
                assert!(
                    (fd - an).abs() <= 1e-6 * an.abs().max(1.0),
                    "idx {idx}: fd {fd} vs autograd {an}"
                );
            }
        }
    }
}
