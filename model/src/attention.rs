//! Causal multi-head self-attention with grouped key/value heads (Ainslie et al. 2023, "GQA",
//! arXiv:2305.13245) and rotary embeddings, laid out as Llama's `LlamaAttention`: bias-free
//! q/k/v/o projections, RoPE on q and k, `softmax(q k^T / sqrt(head_dim) + causal mask) v`.
//! Two options make it Qwen's: biases on q/k/v (`model.qkv_bias`, Qwen2) and a per-head
//! RMSNorm of q and k before RoPE (`model.qk_norm`, Qwen3's `q_norm`/`k_norm`).

use crate::config::ModelConfig;
use crate::kv_cache::LayerKv;
use crate::norm::RmsNorm;
use crate::rope::Rope;
use crate::{init, ModelError, Param, ParamKind, Result};
use tch::{Device, Kind, Tensor};

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
    /// Weights named `<prefix>.wq|wk|wv|wo`, drawn from (seed, name). The output projection
    /// writes into the residual stream, so its std is `init_std / sqrt(2 * num_layers)` (GPT-2).
    pub fn new(cfg: &ModelConfig, prefix: &str, seed: u64, device: Device) -> Result<Self> {
        let (h, kv, hd, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim(), cfg.d_model);
        if h <= 0 || kv <= 0 || h % kv != 0 || hd <= 0 {
            return Err(ModelError::Invalid(format!(
                "attention needs num_kv_heads ({kv}) dividing num_heads ({h}) and head_dim ({hd}) > 0"
            )));
        }
        let std = cfg.init_std;
        let out_std = std / (2.0 * cfg.num_layers.max(1) as f64).sqrt();
        let w = |n: &str, shape: &[i64], s: f64| {
            init::normal(seed, &format!("{prefix}.{n}"), 0, shape, s, device)
        };
        Ok(Self {
            wq_dq: w("wq", &[d, h * hd], std)?,
            wk_dk: w("wk", &[d, kv * hd], std)?,
            wv_dk: w("wv", &[d, kv * hd], std)?,
            wo_qd: w("wo", &[h * hd, d], out_std)?,
            qkv_bias: if cfg.qkv_bias {
                Some([
                    init::zeros(&[h * hd], device)?,
                    init::zeros(&[kv * hd], device)?,
                    init::zeros(&[kv * hd], device)?,
                ])
            } else {
                None
            },
            qk_norm: if cfg.qk_norm {
                Some([
                    RmsNorm::new(hd, cfg.norm_eps, device)?,
                    RmsNorm::new(hd, cfg.norm_eps, device)?,
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
        let (b, t) = Self::bt(x_btd)?;
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
        let (b, t) = Self::bt(x_btd)?;
        let p = kv.len();
        let (q_bhtd, k_bktd, v_bktd) = self.qkv(x_btd, rope, p, compute_kind)?;
        let (k_bksd, v_bksd) = kv.append(k_bktd, v_bktd)?;
        self.attend(&q_bhtd, &k_bksd, &v_bksd, b, t, p, compute_kind)
    }

    fn bt(x_btd: &Tensor) -> Result<(i64, i64)> {
        match x_btd.size().as_slice() {
            [b, t, _] => Ok((*b, *t)),
            size => Err(ModelError::Invalid(format!(
                "attention input must be [b, t, d], got {size:?}"
            ))),
        }
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
        let (b, t) = Self::bt(x_btd)?;
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
        // Query head j reads kv head j / group (the layout of `enable_gqa` and HF's
        // `repeat_kv`). Expanding instead of `enable_gqa` keeps every SDPA backend eligible
        // (memory-efficient attention rejects enable_gqa, e.g. float32 on CUDA).
        let k_bhsd = self.repeat_kv(k_bksd, b, p + t)?;
        let v_bhsd = self.repeat_kv(v_bksd, b, p + t)?;
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

    /// `[b, kv, t, hd]` -> `[b, kv * group, t, hd]`, each kv head repeated `group` times in
    /// place (head `j` of the result is kv head `j / group`).
    fn repeat_kv(&self, x_bktd: &Tensor, b: i64, t: i64) -> Result<Tensor> {
        let group = self.num_heads / self.num_kv_heads;
        if group == 1 {
            return Ok(x_bktd.shallow_clone());
        }
        Ok(x_bktd
            .f_unsqueeze(2)?
            .f_expand([b, self.num_kv_heads, group, t, self.head_dim], false)?
            .f_reshape([b, self.num_heads, t, self.head_dim])?)
    }

    /// The four projections, decayed, named `<prefix>.wq|wk|wv|wo`; then, when configured,
    /// the biases `<prefix>.bq|bk|bv` and the norms `<prefix>.q_norm|k_norm.weight` (not
    /// decayed).
    pub fn params(&self, prefix: &str) -> Vec<Param> {
        let mut out: Vec<Param> = [
            ("wq", &self.wq_dq),
            ("wk", &self.wk_dk),
            ("wv", &self.wv_dk),
            ("wo", &self.wo_qd),
        ]
        .into_iter()
        .map(|(n, t)| Param {
            name: format!("{prefix}.{n}"),
            tensor: t.shallow_clone(),
            kind: ParamKind::Dense,
            weight_decay: true,
        })
        .collect();
        if let Some(biases) = &self.qkv_bias {
            for (n, t) in ["bq", "bk", "bv"].into_iter().zip(biases) {
                out.push(Param {
                    name: format!("{prefix}.{n}"),
                    tensor: t.shallow_clone(),
                    kind: ParamKind::Dense,
                    weight_decay: false,
                });
            }
        }
        if let Some([q, k]) = &self.qk_norm {
            out.extend(q.params(&format!("{prefix}.q_norm")));
            out.extend(k.params(&format!("{prefix}.k_norm")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let att = Attention::new(&c, "a", 1, Device::Cpu).unwrap();
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
        let att = Attention::new(&c, "a", 2, Device::Cpu).unwrap();
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
        let att = Attention::new(&c, "a", 5, Device::Cpu).unwrap();
        let names: Vec<String> = att.params("a").into_iter().map(|p| p.name).collect();
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
        for p in att.params("a").into_iter().skip(4) {
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
            ..Attention::new(&cfg(4, 2), "a", 5, Device::Cpu).unwrap()
        };
        assert!(max_abs(&got, &plain.forward(&x, &rope, Kind::Double).unwrap()) > 1e-3);
    }

    /// Changing inputs after position t leaves outputs up to t bit-identical and changes
    /// the later ones.
    #[test]
    fn causal() {
        let c = cfg(4, 2);
        let att = Attention::new(&c, "a", 3, Device::Cpu).unwrap();
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
        let att = Attention::new(&c, "a", 4, Device::Cpu).unwrap();
        for p in att.params("a") {
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
        let mut targets: Vec<Tensor> = att.params("a").into_iter().map(|p| p.tensor).collect();
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
