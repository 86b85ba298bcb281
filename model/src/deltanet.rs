//! Gated DeltaNet linear attention (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks:
//! Improving Mamba2 with Delta Rule", arXiv:2412.06464) as Qwen3-Next uses it (HF
//! `Qwen3NextGatedDeltaNet`).
//!
//! Per token: q, k, v projections pass a short causal depthwise convolution and SiLU; q and k
//! are L2-normalised per head and q scaled by `1/sqrt(d_k)`; `beta = sigmoid(x W_b)` and the
//! log-decay `g = -exp(A_log) * softplus(x W_a + dt_bias)`. Each value head keeps a state
//! `S [d_k, d_v]` updated by the gated delta rule
//!
//! ```text
//! S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T,   o_t = S_t^T q_t
//! ```
//!
//! and the output passes a per-head RMSNorm gated by `silu(x W_z)`, then `W_o`. Key heads are
//! shared by `num_value_heads / num_key_heads` consecutive value heads.
//!
//! [`chunked_gated_delta_rule`] computes the recurrence chunk by chunk with the WY/UT
//! transform (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
//! Sequence Length", arXiv:2406.06484): a loop over chunks of tensor ops, never over tokens.

use crate::config::ModelConfig;
use crate::heads::batch_time;
use crate::norm::accum_kind;
use crate::{init, ModelError, ParamBuilder, Result};
use tch::{Kind, Tensor};

/// `x / sqrt(sum(x^2) + 1e-6)` over the last dimension (the FLA library's l2norm).
fn l2norm(x: &Tensor) -> Result<Tensor> {
    let inv = x
        .f_square()?
        .f_sum_dim_intlist(-1, true, x.kind())?
        .f_add_scalar(1e-6)?
        .f_rsqrt()?;
    Ok(x.f_mul(&inv)?)
}

/// The gated delta rule over whole sequences, chunk by chunk.
///
/// `q` and `k` must already be normalised and `q` scaled. Computes in `q`'s kind (the layer
/// passes float32 or float64). The result does not depend on `chunk` beyond rounding.
///
/// # Shapes
/// `q_bhtk`, `k_bhtk` `[b, h, t, d_k]`, `v_bhtv` `[b, h, t, d_v]`, `g_bht`, `beta_bht`
/// `[b, h, t]` -> `[b, h, t, d_v]`
pub fn chunked_gated_delta_rule(
    q_bhtk: &Tensor,
    k_bhtk: &Tensor,
    v_bhtv: &Tensor,
    g_bht: &Tensor,
    beta_bht: &Tensor,
    chunk: i64,
) -> Result<Tensor> {
    let size = k_bhtk.size();
    let [b, h, t, dk] = size[..] else {
        return Err(ModelError::Invalid(format!(
            "delta rule keys must be [b, h, t, d_k], got {size:?}"
        )));
    };
    let dv = v_bhtv.size().last().copied().unwrap_or(0);
    if chunk <= 0 {
        return Err(ModelError::Invalid(format!(
            "delta rule chunk ({chunk}) must be positive"
        )));
    }
    let kind = q_bhtk.kind();
    let dev = q_bhtk.device();
    let pad = (chunk - t % chunk) % chunk;
    let n = (t + pad) / chunk;
    // Zero padding at the end: padded tokens have beta 0 and g 0, so they change nothing
    // before them and their outputs are dropped.
    let pad4 = |x: &Tensor| -> Result<Tensor> { Ok(x.f_constant_pad_nd([0, 0, 0, pad])?) };
    let pad3 = |x: &Tensor| -> Result<Tensor> { Ok(x.f_constant_pad_nd([0, pad])?) };
    let chunks4 = |x: Tensor, w: i64| -> Result<Tensor> { Ok(x.f_reshape([b, h, n, chunk, w])?) };
    let q = chunks4(pad4(q_bhtk)?, dk)?;
    let k = chunks4(pad4(k_bhtk)?, dk)?;
    let v = chunks4(pad4(v_bhtv)?, dv)?;
    let beta = pad3(beta_bht)?.f_reshape([b, h, n, chunk])?;
    let g = pad3(g_bht)?.f_reshape([b, h, n, chunk])?;

    let k_beta = k.f_mul(&beta.f_unsqueeze(-1)?)?;
    let v_beta = v.f_mul(&beta.f_unsqueeze(-1)?)?;
    // Cumulative log-decay inside each chunk; decay_ij = exp(G_i - G_j) for j <= i, else 0.
    let gcum = g.f_cumsum(-1, kind)?;
    let upper = Tensor::f_ones([chunk, chunk], (Kind::Bool, dev))?.f_triu(1)?;
    let decay = gcum
        .f_unsqueeze(-1)?
        .f_sub(&gcum.f_unsqueeze(-2)?)?
        .f_masked_fill(&upper, f64::NEG_INFINITY)?
        .f_exp()?;
    let k_t = k.f_transpose(-1, -2)?;
    // (I + strictly lower part of (beta K K^T) * decay) is the UT system of the chunk.
    let strict_upper_or_diag = Tensor::f_ones([chunk, chunk], (Kind::Bool, dev))?.f_triu(0)?;
    let a = k_beta
        .f_matmul(&k_t)?
        .f_mul(&decay)?
        .f_masked_fill(&strict_upper_or_diag, 0.0)?;
    let eye = Tensor::f_eye(chunk, (kind, dev))?;
    let system = a.f_add(&eye)?;
    let u = system.f_linalg_solve_triangular(&v_beta, false, true, true)?;
    let w = system.f_linalg_solve_triangular(
        &k_beta.f_mul(&gcum.f_exp()?.f_unsqueeze(-1)?)?,
        false,
        true,
        true,
    )?;
    let attn = q.f_matmul(&k_t)?.f_mul(&decay)?;
    let q_decayed = q.f_mul(&gcum.f_exp()?.f_unsqueeze(-1)?)?;
    let last = gcum.f_narrow(-1, chunk - 1, 1)?;
    let k_to_end = k.f_mul(&last.f_sub(&gcum)?.f_exp()?.f_unsqueeze(-1)?)?;
    let chunk_decay = last.f_exp()?.f_unsqueeze(-1)?;

    let mut state = Tensor::f_zeros([b, h, dk, dv], (kind, dev))?;
    let mut outs = Vec::with_capacity(n as usize);
    for i in 0..n {
        let pick = |x: &Tensor| -> Result<Tensor> { Ok(x.f_select(2, i)?) };
        let v_new = pick(&u)?.f_sub(&pick(&w)?.f_matmul(&state)?)?;
        let out = pick(&q_decayed)?
            .f_matmul(&state)?
            .f_add(&pick(&attn)?.f_matmul(&v_new)?)?;
        outs.push(out);
        state = state
            .f_mul(&pick(&chunk_decay)?)?
            .f_add(&pick(&k_to_end)?.f_transpose(-1, -2)?.f_matmul(&v_new)?)?;
    }
    Ok(Tensor::f_cat(&outs, 2)?.f_narrow(2, 0, t)?)
}

/// One gated DeltaNet block. Weights are `[in, out]`.
#[derive(Debug)]
pub struct GatedDeltaNet {
    /// `[d, Hk * dk]` each.
    wq: Tensor,
    wk: Tensor,
    /// `[d, Hv * dv]` each: values and the output gate.
    wv: Tensor,
    wz: Tensor,
    /// `[d, Hv]` each: the update strength and the decay input.
    wb: Tensor,
    wa: Tensor,
    /// Depthwise causal convolution over `[q, k, v]` channels, `[2 Hk dk + Hv dv, 1, K]`.
    conv: Tensor,
    /// `[Hv]`.
    dt_bias: Tensor,
    /// `[Hv]`, `log(A)` with `A` in `[1, 16]` at init (Mamba-2).
    a_log: Tensor,
    /// Per-head output norm scale `[dv]`.
    norm_w: Tensor,
    /// `[Hv * dv, d]`.
    wo: Tensor,
    hk: i64,
    hv: i64,
    dk: i64,
    dv: i64,
    kernel: i64,
    chunk: i64,
    eps: f64,
}

impl GatedDeltaNet {
    /// Parameters `<vb>.{wq, wk, wv, wz, wb, wa, conv, dt_bias, a_log, norm.weight, wo}`; the
    /// norm scale, `dt_bias` and `a_log` are not decayed.
    pub fn new(cfg: &ModelConfig, vb: &ParamBuilder) -> Result<Self> {
        let a = &cfg.attention;
        let (hk, hv, dk, dv) = (
            a.linear_num_key_heads,
            a.linear_num_value_heads,
            a.linear_key_head_dim,
            a.linear_value_head_dim,
        );
        if hk <= 0 || hv <= 0 || hv % hk != 0 || dk <= 0 || dv <= 0 || a.linear_conv_kernel <= 0 {
            return Err(ModelError::Invalid(format!(
                "gated DeltaNet needs positive sizes and key heads dividing value heads, got {a:?}"
            )));
        }
        let d = cfg.d_model;
        let std = cfg.init_std;
        let out_std = std / (2.0 * cfg.num_layers.max(1) as f64).sqrt();
        let w = |n: &str, shape: &[i64], s: f64| vb.normal(n, shape, s);
        let conv_dim = 2 * hk * dk + hv * dv;
        let kernel = a.linear_conv_kernel;
        // A uniform in [1, 16] and dt_bias = 1 from the same (seed, name) stream: a
        // deterministic stand-in for HF's uniform(0.01, 16) / inverse-softplus init.
        let a_log = |vb: &ParamBuilder| -> Result<Tensor> {
            let u = init::normal(vb.seed(), &vb.name("a_log"), 0, &[hv], 1.0, vb.device())?;
            let a_log = u
                .f_detach()?
                .f_sigmoid()?
                .f_mul_scalar(15.0)?
                .f_add_scalar(1.0)?
                .f_log()?
                .f_set_requires_grad(true)?;
            vb.add("a_log", a_log, false)
        };
        Ok(Self {
            wq: w("wq", &[d, hk * dk], std)?,
            wk: w("wk", &[d, hk * dk], std)?,
            wv: w("wv", &[d, hv * dv], std)?,
            wz: w("wz", &[d, hv * dv], std)?,
            wb: w("wb", &[d, hv], std)?,
            wa: w("wa", &[d, hv], std)?,
            conv: w("conv", &[conv_dim, 1, kernel], 1.0 / (kernel as f64).sqrt())?,
            dt_bias: vb.ones("dt_bias", &[hv])?,
            a_log: a_log(vb)?,
            norm_w: vb.pp("norm").ones("weight", &[dv])?,
            wo: w("wo", &[hv * dv, d], out_std)?,
            hk,
            hv,
            dk,
            dv,
            kernel,
            chunk: a.linear_chunk_size,
            eps: cfg.norm_eps,
        })
    }

    /// The inputs of the delta rule: normalised and scaled q, k (repeated to the value
    /// heads), v, the log-decay g, beta, and the output gate z, in `accum_kind(compute_kind)`.
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> q, k `[b, Hv, t, dk]`, v `[b, Hv, t, dv]`, g, beta `[b, Hv, t]`,
    /// z `[b, t, Hv, dv]`
    #[allow(clippy::type_complexity)]
    pub fn rule_inputs(
        &self,
        x_btd: &Tensor,
        compute_kind: Kind,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)> {
        let (b, t) = batch_time(x_btd)?;
        let ck = compute_kind;
        let acc = accum_kind(ck);
        let x = x_btd.f_to_kind(ck)?;
        let mm = |w: &Tensor| -> Result<Tensor> { Ok(x.f_matmul(&w.f_to_kind(ck)?)?) };
        let qkv_btc = Tensor::f_cat(&[mm(&self.wq)?, mm(&self.wk)?, mm(&self.wv)?], 2)?;
        let channels = qkv_btc.size()[2];
        // Depthwise causal convolution: pad K-1 on the left (both sides, then keep the first
        // t outputs), then SiLU.
        let conv_bct = qkv_btc.f_transpose(1, 2)?.f_conv1d(
            &self.conv.f_to_kind(ck)?,
            None::<&Tensor>,
            [1],
            [self.kernel - 1],
            [1],
            channels,
        )?;
        let qkv_btc = conv_bct
            .f_narrow(2, 0, t)?
            .f_silu()?
            .f_transpose(1, 2)?
            .f_to_kind(acc)?;
        let (kd, vd) = (self.hk * self.dk, self.hv * self.dv);
        let rep = self.hv / self.hk;
        let heads = |x: Tensor, h: i64, w: i64| -> Result<Tensor> {
            Ok(x.f_reshape([b, t, h, w])?.f_transpose(1, 2)?)
        };
        let q = heads(qkv_btc.f_narrow(2, 0, kd)?, self.hk, self.dk)?;
        let k = heads(qkv_btc.f_narrow(2, kd, kd)?, self.hk, self.dk)?;
        let v = heads(qkv_btc.f_narrow(2, 2 * kd, vd)?, self.hv, self.dv)?;
        // Key head j serves value heads j*rep .. (j+1)*rep.
        let q = l2norm(&q.f_repeat_interleave_self_int(rep, 1, None)?)?
            .f_mul_scalar(1.0 / (self.dk as f64).sqrt())?;
        let k = l2norm(&k.f_repeat_interleave_self_int(rep, 1, None)?)?;
        let beta = mm(&self.wb)?
            .f_to_kind(acc)?
            .f_sigmoid()?
            .f_transpose(1, 2)?;
        let g = mm(&self.wa)?
            .f_to_kind(acc)?
            .f_add(&self.dt_bias.f_to_kind(acc)?)?
            .f_softplus()?
            .f_mul(&self.a_log.f_to_kind(acc)?.f_exp()?.f_neg()?)?
            .f_transpose(1, 2)?;
        let z = mm(&self.wz)?.f_reshape([b, t, self.hv, self.dv])?;
        Ok((q, k, v, g, beta, z))
    }

    /// Per-head RMSNorm of the rule's output gated by `silu(z)`, then the output projection.
    ///
    /// # Shapes
    /// `o_bhtv [b, Hv, t, dv]`, `z_bthv [b, t, Hv, dv]` -> `[b, t, d]`
    pub fn output(&self, o_bhtv: &Tensor, z_bthv: &Tensor, compute_kind: Kind) -> Result<Tensor> {
        let acc = accum_kind(compute_kind);
        let o = o_bhtv.f_transpose(1, 2)?.f_to_kind(acc)?;
        let inv = o
            .f_square()?
            .f_mean_dim(-1, true, acc)?
            .f_add_scalar(self.eps)?
            .f_rsqrt()?;
        let gated = o
            .f_mul(&inv)?
            .f_mul(&self.norm_w.f_to_kind(acc)?)?
            .f_mul(&z_bthv.f_to_kind(acc)?.f_silu()?)?;
        let size = gated.size();
        let y = gated
            .f_reshape([size[0], size[1], self.hv * self.dv])?
            .f_to_kind(compute_kind)?;
        Ok(y.f_matmul(&self.wo.f_to_kind(compute_kind)?)?)
    }

    /// Gated DeltaNet over each sequence; the delta rule runs in at least float32.
    ///
    /// # Shapes
    /// `x_btd [b, t, d]` -> `[b, t, d]`
    pub fn forward(&self, x_btd: &Tensor, compute_kind: Kind) -> Result<Tensor> {
        let (q, k, v, g, beta, z) = self.rule_inputs(x_btd, compute_kind)?;
        let o = chunked_gated_delta_rule(&q, &k, &v, &g, &beta, self.chunk)?;
        self.output(&o, &z, compute_kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The module under the name `a`, and the builder holding its parameters.
    fn build(c: &ModelConfig, seed: u64) -> (GatedDeltaNet, ParamBuilder) {
        let vb = ParamBuilder::new(seed, Device::Cpu);
        let m = GatedDeltaNet::new(c, &vb.pp("a")).unwrap();
        (m, vb)
    }
    use crate::config::{AttentionConfig, AttentionKind};

    /// The gated delta rule token by token, as written in the module docs (HF's
    /// `torch_recurrent_gated_delta_rule`): the reference for the chunked form.
    fn recurrent(q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor, beta: &Tensor) -> Tensor {
        let (b, h, t, dk) = k.size4().unwrap();
        let dv = v.size()[3];
        let mut s = Tensor::zeros([b, h, dk, dv], (q.kind(), q.device()));
        let mut outs = Vec::new();
        for i in 0..t {
            let (q_i, k_i, v_i) = (q.select(2, i), k.select(2, i), v.select(2, i));
            s = &s * g.select(2, i).exp().unsqueeze(-1).unsqueeze(-1);
            let kv_mem = (&s * k_i.unsqueeze(-1)).sum_dim_intlist(-2, false, q.kind());
            let delta = (v_i - kv_mem) * beta.select(2, i).unsqueeze(-1);
            s = &s + k_i.unsqueeze(-1) * delta.unsqueeze(-2);
            outs.push((&s * q_i.unsqueeze(-1)).sum_dim_intlist(-2, false, q.kind()));
        }
        Tensor::stack(&outs, 2)
    }

    fn inputs(kind: Kind, t: i64) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
        let o = (kind, Device::Cpu);
        let q = l2norm(&Tensor::randn([2, 3, t, 8], o)).unwrap() / 8f64.sqrt();
        let k = l2norm(&Tensor::randn([2, 3, t, 8], o)).unwrap();
        let v = Tensor::randn([2, 3, t, 5], o);
        // Decays in (e^-2, 1), betas in (0, 1): the ranges the layer produces.
        let g = Tensor::rand([2, 3, t], o) * -2.0;
        let beta = Tensor::rand([2, 3, t], o);
        (q, k, v, g, beta)
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    /// Chunked equals token-by-token for chunks that divide t, do not divide it, exceed it,
    /// and hold one token. float64: both are exact up to rounding of O(t) operations, 1e-10.
    #[test]
    fn chunked_equals_recurrent_in_f64() {
        tch::manual_seed(1);
        let (q, k, v, g, beta) = inputs(Kind::Double, 13);
        let want = recurrent(&q, &k, &v, &g, &beta);
        for chunk in [1, 4, 5, 13, 64] {
            let got = chunked_gated_delta_rule(&q, &k, &v, &g, &beta, chunk).unwrap();
            assert_eq!(got.size(), vec![2, 3, 13, 5]);
            let err = max_abs(&got, &want);
            assert!(err < 1e-10, "chunk {chunk}: {err}");
        }
    }

    /// The issue's bound: float32 chunked against the float64 recurrence to 1e-5 (outputs of
    /// order 1; float32 rounding through a triangular solve of size 16 and 4 chunks).
    #[test]
    fn chunked_f32_matches_recurrent_to_1e5() {
        tch::manual_seed(2);
        let (q, k, v, g, beta) = inputs(Kind::Double, 64);
        let want = recurrent(&q, &k, &v, &g, &beta);
        let f = |x: &Tensor| x.to_kind(Kind::Float);
        let got = chunked_gated_delta_rule(&f(&q), &f(&k), &f(&v), &f(&g), &f(&beta), 16).unwrap();
        let err = max_abs(&got.to_kind(Kind::Double), &want);
        assert!(err < 1e-5, "{err}");
    }

    fn cfg() -> ModelConfig {
        ModelConfig {
            d_model: 16,
            num_layers: 2,
            init_std: 0.3,
            attention: AttentionConfig {
                kind: AttentionKind::GatedDeltanet,
                linear_num_key_heads: 2,
                linear_num_value_heads: 4,
                linear_key_head_dim: 6,
                linear_value_head_dim: 5,
                linear_conv_kernel: 3,
                linear_chunk_size: 4,
                ..AttentionConfig::default()
            },
            ..ModelConfig::default()
        }
    }

    /// The whole layer against its parts: the causal convolution written out tap by tap, the
    /// recurrence token by token, the gated norm by hand. float64: 1e-10.
    #[test]
    fn layer_matches_a_token_by_token_reference() {
        tch::manual_seed(3);
        let c = cfg();
        let (m, vb) = build(&c, 1);
        for p in vb.params() {
            let mut t = p.tensor;
            let d = t.detach().to_kind(Kind::Double);
            t.set_data(&d);
        }
        let x = Tensor::randn([2, 9, 16], (Kind::Double, Device::Cpu));
        let got = m.forward(&x, Kind::Double).unwrap();

        // Convolution: out[t] = sum_j w[K-1-j] * in[t-j], zero before the start.
        let qkv = Tensor::cat(&[x.matmul(&m.wq), x.matmul(&m.wk), x.matmul(&m.wv)], 2);
        let w = m.conv.squeeze_dim(1); // [C, K]
        let kk = m.kernel;
        let mut rows = Vec::new();
        for t in 0..9 {
            let mut acc = Tensor::zeros([2, qkv.size()[2]], (Kind::Double, Device::Cpu));
            for j in 0..kk.min(t + 1) {
                acc += qkv.select(1, t - j) * w.select(1, kk - 1 - j);
            }
            rows.push(acc.silu());
        }
        let conv = Tensor::stack(&rows, 1);
        let (kd, vd) = (12, 20);
        let split = |s: i64, n: i64, h: i64, dh: i64| {
            conv.narrow(2, s, n).reshape([2, 9, h, dh]).transpose(1, 2)
        };
        let q = split(0, kd, 2, 6).repeat_interleave_self_int(2, 1, None);
        let k = split(kd, kd, 2, 6).repeat_interleave_self_int(2, 1, None);
        let v = split(2 * kd, vd, 4, 5);
        let norm =
            |x: &Tensor| x / (x.square().sum_dim_intlist(-1, true, Kind::Double) + 1e-6).sqrt();
        let q = norm(&q) / 6f64.sqrt();
        let k = norm(&k);
        let beta = x.matmul(&m.wb).sigmoid().transpose(1, 2);
        let g = ((x.matmul(&m.wa) + &m.dt_bias).softplus() * -m.a_log.exp()).transpose(1, 2);
        let o = recurrent(&q, &k, &v, &g, &beta).transpose(1, 2); // [b, t, Hv, dv]
        let z = x.matmul(&m.wz).reshape([2, 9, 4, 5]);
        let rms = (o.square().mean_dim(-1, true, Kind::Double) + c.norm_eps).sqrt();
        let y = (o / rms * &m.norm_w * z.silu())
            .reshape([2, 9, 20])
            .matmul(&m.wo);
        let err = max_abs(&got, &y);
        assert!(err < 1e-10, "{err}");
    }

    /// Later tokens never change earlier outputs (the convolution and the scan are causal).
    #[test]
    fn causal() {
        let c = cfg();
        let (m, _) = build(&c, 2);
        let x = Tensor::randn([1, 10, 16], (Kind::Float, Device::Cpu));
        let x2 = x.copy();
        x2.narrow(1, 6, 4)
            .copy_(&Tensor::randn([1, 4, 16], (Kind::Float, Device::Cpu)));
        let y = m.forward(&x, Kind::Float).unwrap();
        let y2 = m.forward(&x2, Kind::Float).unwrap();
        assert!(max_abs(&y.narrow(1, 0, 6), &y2.narrow(1, 0, 6)) < 1e-6);
        assert!(max_abs(&y.narrow(1, 6, 4), &y2.narrow(1, 6, 4)) > 1e-5);
    }

    /// Every parameter receives a finite, non-zero gradient (a_log and dt_bias included).
    #[test]
    fn every_parameter_gets_a_gradient() {
        let c = cfg();
        let (m, vb) = build(&c, 3);
        let x = Tensor::randn([2, 7, 16], (Kind::Float, Device::Cpu));
        let r = Tensor::randn([2, 7, 16], (Kind::Float, Device::Cpu));
        (m.forward(&x, Kind::Float).unwrap() * r)
            .sum(Kind::Float)
            .backward();
        for p in vb.params() {
            let g = p.tensor.grad();
            assert!(g.defined(), "{}", p.name);
            let n = g.abs().sum(Kind::Float).double_value(&[]);
            assert!(n.is_finite() && n > 0.0, "{}: {n}", p.name);
        }
    }
}
