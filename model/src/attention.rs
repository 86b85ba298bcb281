//! Causal multi-head self-attention with grouped key/value heads (Ainslie et al. 2023, "GQA",
//! arXiv:2305.13245) and rotary embeddings, laid out as Llama's `LlamaAttention`: bias-free
//! q/k/v/o projections, RoPE on q and k, `softmax(q k^T / sqrt(head_dim) + causal mask) v`.
//! Two options make it Qwen's: biases on q/k/v (`model.qkv_bias`, Qwen2) and a per-head
//! RMSNorm of q and k before RoPE (`model.qk_norm`, Qwen3's `q_norm`/`k_norm`).

use crate::config::ModelConfig;
use crate::heads::{batch_time, repeat_kv};
use crate::kv_cache::LayerKv;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::{ModelError, ParamBuilder, Result};
use tch::{Kind, Tensor};

/// Self-attention of one block. Weights are `[in, out]` so a projection is `x.matmul(w)`.
#[derive(Debug)]
pub struct Attention {
    /// Query projection `[d, num_heads * head_dim]`.
    pub wq_dq: Tensor,
    /// Key projection `[d, num_kv_heads * head_dim]`.
    pub wk_dk: Tensor,
    /// Value projection `[d, num_kv_heads * head_dim]`.
    pub wv_dk: Tensor,
    /// Output projection `[num_heads * head_dim, d]`.
    pub wo_qd: Tensor,
    /// Query, key and value biases `[num_heads * head_dim]`, `[num_kv_heads * head_dim]` x 2
    /// (`model.qkv_bias`).
    pub qkv_bias: Option<[Tensor; 3]>,
    /// Per-head RMSNorm of queries and of keys over `head_dim` (`model.qk_norm`).
    pub qk_norm: Option<[RmsNorm; 2]>,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
}

impl Attention {
    /// The four projections `<vb>.wq|wk|wv|wo` (decayed); then, when configured, the biases
    /// `<vb>.bq|bk|bv` and the norms `<vb>.q_norm|k_norm.weight` (not decayed). The output
    /// projection writes into the residual stream, so its std is
    /// `init_std / sqrt(2 * num_layers)` (GPT-2).
    pub fn new(cfg: &ModelConfig, vb: &ParamBuilder) -> Result<Self> {
        let (h, kv, hd, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim(), cfg.d_model);
        if h <= 0 || kv <= 0 || h % kv != 0 || hd <= 0 {
            return Err(ModelError::Invalid(format!(
                "attention needs num_kv_heads ({kv}) dividing num_heads ({h}) and head_dim ({hd}) > 0"
            )));
        }
        let std = cfg.init_std;
        let out_std = std / (2.0 * cfg.num_layers.max(1) as f64).sqrt();
        Ok(Self {
            wq_dq: vb.normal("wq", &[d, h * hd], std)?,
            wk_dk: vb.normal("wk", &[d, kv * hd], std)?,
            wv_dk: vb.normal("wv", &[d, kv * hd], std)?,
            wo_qd: vb.normal("wo", &[h * hd, d], out_std)?,
            qkv_bias: if cfg.qkv_bias {
                Some([
                    vb.zeros("bq", &[h * hd])?,
                    vb.zeros("bk", &[kv * hd])?,
                    vb.zeros("bv", &[kv * hd])?,
                ])
            } else {
                None
            },
            qk_norm: if cfg.qk_norm {
                Some([
                    RmsNorm::new(&vb.pp("q_norm"), hd, cfg.norm_eps)?,
                    RmsNorm::new(&vb.pp("k_norm"), hd, cfg.norm_eps)?,
                ])
            } else {
                None
            },
            num_heads: h,
            num_kv_heads: kv,
            head_dim: hd,
        })
    }

    /// Causal self-attention over each sequence. Inputs and weights are cast to
    /// `compute_kind` for the matmuls (softmax statistics are kept in float32 inside the
    /// fused kernel); the output has `compute_kind`.
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> `[b, t, d]`
    pub fn forward(&self, x_btd: &Tensor, rope: &Rope, compute_kind: Kind) -> Result<Tensor> {
        let (b, t) = batch_time(x_btd)?;
        let (q_bhtd, k_bktd, v_bktd) = self.qkv(x_btd, rope, 0, compute_kind)?;
        self.attend(&q_bhtd, &k_bktd, &v_bktd, b, t, 0, compute_kind)
    }

    /// [`Attention::forward`] for `t` new positions after the `p` positions held in `kv`:
    /// the new keys and values (RoPE at positions `p..p + t`) are appended to `kv`, and each
    /// new query attends to every cached position and to the new ones up to its own. Equal
    /// to the matching rows of `forward` over all `p + t` positions, up to float rounding of
    /// the attention's reduction order.
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> `[b, t, d]`; `kv` holds `[b, num_kv_heads, p, head_dim]`
    pub fn forward_cached(
        &self,
        x_btd: &Tensor,
        rope: &Rope,
        compute_kind: Kind,
        kv: &mut LayerKv,
    ) -> Result<Tensor> {
        let (b, t) = batch_time(x_btd)?;
        let p = kv.len();
        let (q_bhtd, k_bktd, v_bktd) = self.qkv(x_btd, rope, p, compute_kind)?;
        let (k_bksd, v_bksd) = kv.append(k_bktd, v_bktd)?;
        self.attend(&q_bhtd, &k_bksd, &v_bksd, b, t, p, compute_kind)
    }

    /// Queries `[b, h, t, hd]`, keys and values `[b, kv, t, hd]` of `x`, RoPE from position
    /// `start`.
    fn qkv(
        &self,
        x_btd: &Tensor,
        rope: &Rope,
        start: i64,
        compute_kind: Kind,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = batch_time(x_btd)?;
        let x = x_btd.f_to_kind(compute_kind)?;
        // Projection `i` (q, k, v) as [b, n, t, hd], with its bias and, for q and k, its norm.
        let heads = |i: usize, w: &Tensor, n: i64| -> Result<Tensor> {
            let mut y = x.f_matmul(&w.f_to_kind(compute_kind)?)?;
            if let Some(bias) = &self.qkv_bias {
                y = y.f_add(&bias[i].f_to_kind(compute_kind)?)?;
            }
            let mut y = y.f_view([b, t, n, self.head_dim])?;
            if let (Some(norms), true) = (&self.qk_norm, i < 2) {
                y = norms[i].forward(&y)?;
            }
            Ok(y.f_transpose(1, 2)?)
        };
        let q_bhtd = rope.apply_from(&heads(0, &self.wq_dq, self.num_heads)?, start)?;
        let k_bktd = rope.apply_from(&heads(1, &self.wk_dk, self.num_kv_heads)?, start)?;
        let v_bktd = heads(2, &self.wv_dk, self.num_kv_heads)?;
        Ok((q_bhtd, k_bktd, v_bktd))
    }

    /// Attention of `t` queries over `p + t` keys/values, query `i` seeing keys `0..=p + i`,
    /// then the output projection.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        q_bhtd: &Tensor,
        k_bksd: &Tensor,
        v_bksd: &Tensor,
        b: i64,
        t: i64,
        p: i64,
        compute_kind: Kind,
    ) -> Result<Tensor> {
        let k_bhsd = repeat_kv(k_bksd, self.num_heads)?;
        let v_bhsd = repeat_kv(v_bksd, self.num_heads)?;
        // SDPA's `is_causal` aligns the mask top-left (query i sees keys 0..=i), right only
        // without a cache; one new query sees everything; otherwise an explicit mask.
        let (mask, causal) = match (p, t) {
            (0, _) => (None, true),
            (_, 1) => (None, false),
            _ => (
                Some(Tensor::f_ones([t, p + t], (Kind::Bool, q_bhtd.device()))?.f_tril(p)?),
                false,
            ),
        };
        let y_bhtd = Tensor::f_scaled_dot_product_attention(
            q_bhtd,
            &k_bhsd,
            &v_bhsd,
            mask.as_ref(),
            0.0,
            causal,
            None,
            false,
        )?;
        let y_btq = y_bhtd
            .f_transpose(1, 2)?
            .f_reshape([b, t, self.num_heads * self.head_dim])?;
        Ok(y_btq.f_matmul(&self.wo_qd.f_to_kind(compute_kind)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The module under the name `a`, and the builder holding its parameters.
    fn build(c: &ModelConfig, seed: u64) -> (Attention, ParamBuilder) {
        let vb = ParamBuilder::new(seed, Device::Cpu);
        let m = Attention::new(c, &vb.pp("a")).unwrap();
        (m, vb)
    }

    fn cfg(heads: i64, kv: i64) -> ModelConfig {
        ModelConfig {
            d_model: 16,
            num_heads: heads,
            num_kv_heads: kv,
            num_layers: 2,
            max_seq_len: 16,
            init_std: 0.3,
            ..ModelConfig::default()
        }
    }

    /// Plain multi-head attention written out: scores, explicit -inf mask above the
    /// diagonal, softmax, weighted sum, per head, all in float64; with the Qwen options, the
    /// bias added to each projection and `y / sqrt(mean(y^2) + eps) * g` over each q/k head.
    fn reference(att: &Attention, rope: &Rope, x: &Tensor, heads: i64, kv: i64) -> Tensor {
        let (b, t, _) = x.size3().unwrap();
        let hd = att.head_dim;
        let group = heads / kv;
        let proj = |i: usize, w: &Tensor, n| {
            let mut y = x.matmul(&w.to_kind(Kind::Double));
            if let Some(bias) = &att.qkv_bias {
                y += bias[i].to_kind(Kind::Double);
            }
            let mut y = y.view([b, t, n, hd]);
            if let (Some(norms), true) = (&att.qk_norm, i < 2) {
                let ms = y.square().mean_dim(-1, true, Kind::Double);
                y = &y / (ms + 1e-5).sqrt() * norms[i].weight_d.to_kind(Kind::Double);
            }
            y.transpose(1, 2)
        };
        let q = rope.apply(&proj(0, &att.wq_dq, heads)).unwrap();
        let k = rope.apply(&proj(1, &att.wk_dk, kv)).unwrap();
        let v = proj(2, &att.wv_dk, kv);
        let mask = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).triu(1);
        let mut outs = Vec::new();
        for h in 0..heads {
            let (qh, kh, vh) = (
                q.select(1, h),
                k.select(1, h / group),
                v.select(1, h / group),
            );
            let s = qh.matmul(&kh.transpose(1, 2)) / (hd as f64).sqrt();
            let p = s
                .masked_fill(&mask, f64::NEG_INFINITY)
                .softmax(-1, Kind::Double);
            outs.push(p.matmul(&vh));
        }
        Tensor::stack(&outs, 2)
            .reshape([b, t, heads * hd])
            .matmul(&att.wo_qd.to_kind(Kind::Double))
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// num_kv_heads = num_heads is plain MHA: SDPA with is_causal equals the hand-written
    /// masked softmax. float64 throughout, so 1e-10.
    #[test]
    fn mha_matches_hand_computation() {
        let c = cfg(4, 4);
        let (att, _) = build(&c, 1);
        let rope = Rope::new(c.head_dim(), c.max_seq_len, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 7, 16], (Kind::Double, Device::Cpu));
        let got = att.forward(&x, &rope, Kind::Double).unwrap();
        let want = reference(&att, &rope, &x, 4, 4);
        assert_eq!(got.size(), vec![2, 7, 16]);
        assert!(max_abs(&got, &want) < 1e-10, "{}", max_abs(&got, &want));
    }

    /// GQA (4 query heads sharing 2 kv heads) against the reference with head j reading kv
    /// head j / 2; a wrong repeat order (j % 2) fails this. float64: 1e-10.
    #[test]
    fn gqa_matches_hand_computation() {
        let c = cfg(4, 2);
        let (att, _) = build(&c, 2);
        assert_eq!(att.wk_dk.size(), vec![16, 8]);
        let rope = Rope::new(c.head_dim(), c.max_seq_len, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 5, 16], (Kind::Double, Device::Cpu));
        let got = att.forward(&x, &rope, Kind::Double).unwrap();
        let want = reference(&att, &rope, &x, 4, 2);
        assert!(max_abs(&got, &want) < 1e-10, "{}", max_abs(&got, &want));
    }

    /// Qwen's options (q/k/v biases, per-head q/k RMSNorm) against the hand computation, with
    /// non-trivial biases and norm scales. float64: 1e-10. Without the biases or the norms
    /// (zeroed / unit) the output changes, so the test sees them.
    #[test]
    fn qkv_bias_and_qk_norm_match_hand_computation() {
        let c = ModelConfig {
            qkv_bias: true,
            qk_norm: true,
            ..cfg(4, 2)
        };
        let (att, vb) = build(&c, 5);
        let names: Vec<String> = vb.params().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "a.wq",
                "a.wk",
                "a.wv",
                "a.wo",
                "a.bq",
                "a.bk",
                "a.bv",
                "a.q_norm.weight",
                "a.k_norm.weight"
            ]
        );
        for p in vb.params().into_iter().skip(4) {
            let mut t = p.tensor;
            let d = (Tensor::randn_like(&t) * 0.5 + 1.0).to_kind(Kind::Double);
            t.set_data(&d);
        }
        let rope = Rope::new(c.head_dim(), c.max_seq_len, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 5, 16], (Kind::Double, Device::Cpu));
        let got = att.forward(&x, &rope, Kind::Double).unwrap();
        let want = reference(&att, &rope, &x, 4, 2);
        assert!(max_abs(&got, &want) < 1e-10, "{}", max_abs(&got, &want));
        let plain = Attention {
            qkv_bias: None,
            qk_norm: None,
            ..build(&cfg(4, 2), 5).0
        };
        assert!(max_abs(&got, &plain.forward(&x, &rope, Kind::Double).unwrap()) > 1e-3);
    }

    /// Changing inputs after position t leaves outputs up to t bit-identical and changes
    /// the later ones.
    #[test]
    fn causal() {
        let c = cfg(4, 2);
        let (att, _) = build(&c, 3);
        let rope = Rope::new(c.head_dim(), c.max_seq_len, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([1, 8, 16], (Kind::Float, Device::Cpu));
        let x2 = x.copy();
        x2.narrow(1, 5, 3)
            .copy_(&Tensor::randn([1, 3, 16], (Kind::Float, Device::Cpu)));
        let y = att.forward(&x, &rope, Kind::Float).unwrap();
        let y2 = att.forward(&x2, &rope, Kind::Float).unwrap();
        assert!(max_abs(&y.narrow(1, 0, 5), &y2.narrow(1, 0, 5)) < 1e-6);
        assert!(max_abs(&y.narrow(1, 5, 3), &y2.narrow(1, 5, 3)) > 1e-4);
    }

    /// Central finite differences in float64 of `sum(y * r)` wrt a few entries of every
    /// weight and of the input. Step 1e-6 gives truncation error O(1e-12) and rounding error
    /// O(1e-10); 1e-6 relative leaves margin.
    #[test]
    fn gradients_match_finite_differences() {
        let c = cfg(4, 2);
        let (att, vb) = build(&c, 4);
        for p in vb.params() {
            let mut t = p.tensor;
            let d = t.detach().to_kind(Kind::Double);
            t.set_data(&d);
        }
        let rope = Rope::new(c.head_dim(), c.max_seq_len, c.rope_theta, Device::Cpu).unwrap();
        let x = Tensor::randn([2, 4, 16], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        let r = Tensor::randn([2, 4, 16], (Kind::Double, Device::Cpu));
        let loss =
            |x: &Tensor| (att.forward(x, &rope, Kind::Double).unwrap() * &r).sum(Kind::Double);
        loss(&x).backward();
        let mut targets: Vec<Tensor> = vb.params().into_iter().map(|p| p.tensor).collect();
        targets.push(x.shallow_clone());
        let eps = 1e-6;
        for t in &targets {
            let grad = t.grad().reshape([-1]);
            let n = t.numel() as i64;
            for idx in [0, n / 3, n - 1] {
                let flat = t.detach().reshape([-1]);
                let orig = flat.double_value(&[idx]);
                let eval = |v: f64| {
                    tch::no_grad(|| {
                        let _ = flat.get(idx).fill_(v);
                        loss(&x).double_value(&[])
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
