//! The decoder-only transformer language model: token embedding, `num_layers` pre-norm
//! blocks `x + attn(norm(x))`, `x + ffn(norm(x))`, a final RMSNorm and the LM head, as in
//! Llama (Touvron et al. 2023) with Mixtral's MoE FFN (Jiang et al. 2024) in the blocks that
//! [`MoeConfig::is_moe_layer`] selects.
//!
//! Mixed precision follows PyTorch autocast: parameters and the residual stream stay
//! float32; matmuls (attention, FFN, LM head) run in `compute_kind`; norms accumulate in
//! float32, the router runs in float32 (inside [`MoeLayer`]), and logits are returned in
//! float32 for the loss. A float64 `compute_kind` with float64 parameters runs everything
//! in float64 (gradient checks).

use crate::config::{ModelConfig, MoeConfig};
use crate::kv_cache::{KvCache, LayerKv};
use crate::mixer::TokenMixer;
use crate::mlp::SwiGlu;
use crate::moe_layer::{MoeForward, MoeLayer, MoeStats};
use crate::mtp::Mtp;
use crate::norm::{accum_kind, RmsNorm};
use crate::observe::{FfnView, ForwardObserver};
use crate::parallel::ExpertParallel;
use crate::rope::Rope;
use crate::{init, ModelError, Param, ParamBuilder, Result};
use tch::{Device, Kind, Tensor};

/// Per-call context of [`TransformerLm::forward`].
pub struct LmForward {
    /// Training (router jitter on) or evaluation.
    pub train: bool,
    /// Kind of the matmuls: `Float` or `BFloat16` (`Double` for gradient checks).
    pub compute_kind: Kind,
    /// A counter seeding the router jitter, so a run is reproducible: the trainer passes one
    /// value per micro-batch (`optimizer_step * 1024 + micro_batch`), not the optimizer step.
    pub step: u64,
}

/// What [`TransformerLm::forward`] returns.
#[derive(Debug)]
pub struct LmOutput {
    /// Logits `[b, t, v]`, float32 (float64 when computing in float64).
    pub logits_btv: Tensor,
    /// Multi-token prediction (`model.mtp_depth: 1`, `t > 1`): logits `[b, t-1, v]` whose
    /// position i predicts the token after next, `targets[:, i+1]`.
    pub mtp_logits_btv: Option<Tensor>,
    /// Sum over MoE layers of their load-balancing losses (x coeff); scalar with grad, 0
    /// without MoE layers.
    pub aux_loss: Tensor,
    /// Sum over MoE layers of their z-losses (x coeff); scalar with grad.
    pub z_loss: Tensor,
    /// Statistics of each MoE layer, with its block index.
    pub moe: Vec<(i64, MoeStats)>,
}

/// The FFN of one block.
#[derive(Debug)]
enum Ffn {
    Dense(SwiGlu),
    Moe(Box<MoeLayer>),
}

#[derive(Debug)]
pub(crate) struct Block {
    attn_norm: RmsNorm,
    attn: TokenMixer,
    ffn_norm: RmsNorm,
    ffn: Ffn,
}

impl Block {
    /// Block `i`: its attention, and an MoE FFN where `moe.is_moe_layer(i)`, else a dense
    /// SwiGLU.
    ///
    /// Parameters under `vb` (`layers.{i}`): `attn_norm.weight`, `attn.*`, `ffn_norm.weight`,
    /// then `ffn.*` or `moe.*`.
    pub(crate) fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        par: &ExpertParallel,
        i: i64,
        vb: &ParamBuilder,
    ) -> Result<Self> {
        let d = model.d_model;
        let attn_norm = RmsNorm::new(&vb.pp("attn_norm"), d, model.norm_eps)?;
        let attn = TokenMixer::new(model, i, &vb.pp("attn"))?;
        let ffn_norm = RmsNorm::new(&vb.pp("ffn_norm"), d, model.norm_eps)?;
        let ffn = if moe.is_moe_layer(i) {
            Ffn::Moe(Box::new(MoeLayer::new(model, moe, &vb.pp("moe"), par)?))
        } else {
            Ffn::Dense(SwiGlu::new(
                &vb.pp("ffn"),
                d,
                model.ffn_hidden,
                model.init_std,
                model.num_layers,
            )?)
        };
        Ok(Block {
            attn_norm,
            attn,
            ffn_norm,
            ffn,
        })
    }

    /// `x + attn(norm(x))`, then `+ ffn(norm(.))`, on the residual stream `x_btd` (kind
    /// `accum_kind(compute_kind)`); block `i`'s MoE statistics when its FFN is MoE.
    pub(crate) fn forward(
        &self,
        x_btd: &Tensor,
        rope: &Rope,
        ctx: &LmForward,
        i: i64,
        seed: u64,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        self.forward_kv(x_btd, rope, ctx, i, seed, None)
    }

    /// [`Block::forward`]; with `kv`, the attention continues after the positions cached
    /// there (and appends these), and the MoE FFN routes only these `t` positions.
    pub(crate) fn forward_kv(
        &self,
        x_btd: &Tensor,
        rope: &Rope,
        ctx: &LmForward,
        i: i64,
        seed: u64,
        kv: Option<&mut LayerKv>,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        self.forward_observed(x_btd, rope, ctx, i, seed, kv, None)
    }

    /// [`Block::forward_kv`], showing the FFN input to `obs` when there is one.
    #[allow(clippy::too_many_arguments)]
    fn forward_observed(
        &self,
        x_btd: &Tensor,
        rope: &Rope,
        ctx: &LmForward,
        i: i64,
        seed: u64,
        kv: Option<&mut LayerKv>,
        obs: Option<&mut (dyn ForwardObserver + '_)>,
    ) -> Result<(Tensor, Option<MoeStats>)> {
        let size = x_btd.size();
        let [b, t, d] = size[..] else {
            return Err(ModelError::Invalid(format!(
                "block input must be [b, t, d], got {size:?}"
            )));
        };
        let ck = ctx.compute_kind;
        let res_kind = accum_kind(ck);
        let h_btd = self.attn_norm.forward(x_btd)?;
        let a_btd = match kv {
            None => self.attn.forward(&h_btd, rope, ck)?,
            Some(kv) => self.attn.forward_cached(&h_btd, rope, ck, kv)?,
        };
        let x_btd = x_btd.f_add(&a_btd.f_to_kind(res_kind)?)?;
        let h_btd = self.ffn_norm.forward(&x_btd)?.f_to_kind(ck)?;
        if let Some(obs) = obs {
            let view = match &self.ffn {
                Ffn::Dense(mlp) => FfnView::Dense(mlp),
                Ffn::Moe(moe) => FfnView::Moe(moe),
            };
            obs.ffn(i, &h_btd, view)?;
        }
        let (f_btd, stats) = match &self.ffn {
            Ffn::Dense(mlp) => (mlp.forward(&h_btd)?, None),
            Ffn::Moe(moe) => {
                let fwd = MoeForward {
                    train: ctx.train,
                    seq_len: t,
                    jitter_seed: init::stream_seed(seed ^ ctx.step, "router_jitter", i),
                    compute_kind: ck,
                };
                let (y_nd, stats) = moe.forward(&h_btd.f_reshape([b * t, d])?, &fwd)?;
                (y_nd.f_reshape([b, t, d])?, Some(stats))
            }
        };
        Ok((x_btd.f_add(&f_btd.f_to_kind(res_kind)?)?, stats))
    }

    /// The MoE layer, if the FFN is one.
    pub(crate) fn moe(&self) -> Option<&MoeLayer> {
        match &self.ffn {
            Ffn::Moe(m) => Some(m.as_ref()),
            Ffn::Dense(_) => None,
        }
    }
}

/// A transformer LM whose FFNs are MoE layers where `moe.is_moe_layer(i)` (never in the
/// `num_experts: 1` dense baseline); other blocks use a dense SwiGLU of width
/// `model.ffn_hidden`.
///
/// Parameter names: `embed.weight`, `layers.{i}.attn_norm.weight`,
/// `layers.{i}.attn.{wq,wk,wv,wo}` (MLA: see [`crate::mla::Mla::new`]),
/// `layers.{i}.ffn_norm.weight`,
/// `layers.{i}.ffn.{w_gate,w_up,w_down}` (dense) or `layers.{i}.moe.*` (see
/// [`MoeLayer::new`]), `norm.weight`, `lm_head.weight` (absent when tied). Each module creates
/// and names its parameters once, through a [`ParamBuilder`]; [`TransformerLm::params`]
/// returns that registry.
#[derive(Debug)]
pub struct TransformerLm {
    /// Token embedding `[v, d]`; also the LM head when `tie_embeddings`.
    embed_vd: Tensor,
    layers: Vec<Block>,
    norm: RmsNorm,
    /// Untied LM head `[v, d]` (logits = `x W^T`).
    lm_head_vd: Option<Tensor>,
    rope: Rope,
    /// DeepSeek-V3's multi-token prediction module (`model.mtp_depth: 1`).
    mtp: Option<Mtp>,
    /// Every parameter, as the modules created them (shallow clones), in creation order.
    params: Vec<Param>,
    /// Every buffer, likewise.
    buffers: Vec<(String, Tensor)>,
    cfg: ModelConfig,
    seed: u64,
}

/// The MoE layers' losses summed in f32, and their statistics by layer, over one forward.
struct MoeSums {
    aux_loss: Tensor,
    z_loss: Tensor,
    stats: Vec<(i64, MoeStats)>,
}

impl MoeSums {
    fn new(device: Device) -> Result<Self> {
        Ok(Self {
            aux_loss: Tensor::f_zeros([], (Kind::Float, device))?,
            z_loss: Tensor::f_zeros([], (Kind::Float, device))?,
            stats: Vec::new(),
        })
    }

    /// Adds block `layer`'s statistics (none for a dense block).
    fn add(&mut self, layer: i64, stats: Option<MoeStats>) -> Result<()> {
        if let Some(stats) = stats {
            self.aux_loss = self
                .aux_loss
                .f_add(&stats.aux_loss.f_to_kind(Kind::Float)?)?;
            self.z_loss = self.z_loss.f_add(&stats.z_loss.f_to_kind(Kind::Float)?)?;
            self.stats.push((layer, stats));
        }
        Ok(())
    }
}

impl TransformerLm {
    /// Builds the model for EP position `par`, whose dispatcher each MoE layer keeps; every
    /// weight is drawn from (seed, name[, global expert id]) so ranks agree on dense weights
    /// and experts do not depend on the EP size.
    pub fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        par: &ExpertParallel,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let errs = MoeConfig::validate(model, moe);
        if !errs.is_empty() {
            return Err(ModelError::Invalid(errs.join("; ")));
        }
        let (v, d) = (model.vocab_size, model.d_model);
        let vb = ParamBuilder::new(seed, device);
        let embed_vd = vb
            .pp("embed")
            .normal_no_decay("weight", &[v, d], model.init_std)?;
        let layers = (0..model.num_layers)
            .map(|i| Block::new(model, moe, par, i, &vb.pp("layers").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let mtp = match model.mtp_depth {
            0 => None,
            _ => Some(Mtp::new(
                model,
                moe,
                par,
                &vb.pp("layers").pp(model.num_layers),
            )?),
        };
        let norm = RmsNorm::new(&vb.pp("norm"), d, model.norm_eps)?;
        let lm_head_vd = if model.tie_embeddings {
            None
        } else {
            Some(vb.pp("lm_head").normal("weight", &[v, d], model.init_std)?)
        };
        Ok(Self {
            embed_vd,
            layers,
            norm,
            lm_head_vd,
            rope: Rope::new(
                model.rope_dim(),
                model.max_seq_len,
                model.rope_theta,
                device,
            )?,
            mtp,
            params: vb.params(),
            buffers: vb.buffers(),
            cfg: model.clone(),
            seed,
        })
    }

    /// The model section this LM was built from.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Next-token logits for every position, plus the MoE losses and statistics.
    ///
    /// # Shapes
    /// `tokens_bt` int64 `[b, t]` with `t <= max_seq_len` -> `logits_btv [b, t, v]`
    pub fn forward(&self, tokens_bt: &Tensor, ctx: &LmForward) -> Result<LmOutput> {
        self.forward_with(tokens_bt, ctx, None)
    }

    /// [`TransformerLm::forward`], showing every block's FFN input and its input and output
    /// to `obs` (calibration statistics; the multi-token prediction block is not shown).
    pub fn forward_observed(
        &self,
        tokens_bt: &Tensor,
        ctx: &LmForward,
        obs: &mut dyn ForwardObserver,
    ) -> Result<LmOutput> {
        self.forward_with(tokens_bt, ctx, Some(obs))
    }

    fn forward_with(
        &self,
        tokens_bt: &Tensor,
        ctx: &LmForward,
        mut obs: Option<&mut (dyn ForwardObserver + '_)>,
    ) -> Result<LmOutput> {
        let t = match tokens_bt.size().as_slice() {
            [_, t] if *t <= self.cfg.max_seq_len && *t > 0 => *t,
            s => {
                return Err(ModelError::Invalid(format!(
                    "tokens must be [b, t] with 0 < t <= model.max_seq_len ({}), got {s:?}",
                    self.cfg.max_seq_len
                )))
            }
        };
        let ck = ctx.compute_kind;
        let mut x_btd = self.embed(tokens_bt, ck)?;
        let mut moe = MoeSums::new(x_btd.device())?;
        for (i, block) in self.layers.iter().enumerate() {
            let (y_btd, stats) = block.forward_observed(
                &x_btd,
                &self.rope,
                ctx,
                i as i64,
                self.seed,
                None,
                obs.as_deref_mut(),
            )?;
            if let Some(o) = obs.as_deref_mut() {
                o.block(i as i64, &x_btd, &y_btd)?;
            }
            x_btd = y_btd;
            moe.add(i as i64, stats)?;
        }
        let head_vd = self.lm_head_vd.as_ref().unwrap_or(&self.embed_vd);
        let logits_btv = self.head(&x_btd, head_vd, ck)?;
        let mtp_logits_btv = match &self.mtp {
            Some(mtp) if t > 1 => {
                let (logits, stats) = mtp.forward(
                    &x_btd,
                    tokens_bt,
                    &self.embed_vd,
                    head_vd,
                    &self.rope,
                    ctx,
                    self.seed,
                )?;
                moe.add(self.cfg.num_layers, stats)?;
                Some(logits)
            }
            _ => None,
        };
        Ok(LmOutput {
            logits_btv,
            mtp_logits_btv,
            aux_loss: moe.aux_loss,
            z_loss: moe.z_loss,
            moe: moe.stats,
        })
    }

    /// Token embeddings in the residual stream's kind (f32 unless the compute kind is f64).
    fn embed(&self, tokens_bt: &Tensor, ck: Kind) -> Result<Tensor> {
        Ok(
            Tensor::f_embedding(&self.embed_vd, tokens_bt, -1, false, false)?
                .f_to_kind(accum_kind(ck))?,
        )
    }

    /// Final norm and LM head: logits in the residual stream's kind.
    fn head(&self, x_btd: &Tensor, head_vd: &Tensor, ck: Kind) -> Result<Tensor> {
        Ok(self
            .norm
            .forward(x_btd)?
            .f_to_kind(ck)?
            .f_matmul(&head_vd.f_to_kind(ck)?.f_tr()?)?
            .f_to_kind(accum_kind(ck))?)
    }

    /// Whether [`TransformerLm::forward_cached`] works for this model: every block's
    /// attention is standard (grouped-query) attention.
    pub fn supports_kv_cache(&self) -> bool {
        self.layers.iter().all(|b| b.attn.supports_kv_cache())
    }

    /// An empty KV cache for this model.
    pub fn new_kv_cache(&self) -> KvCache {
        KvCache::new(self.layers.len())
    }

    /// Next-token logits of `t` new positions following the `p` positions held in `cache`
    /// (appended to it): each attention layer reads the cached keys and values, each MoE
    /// layer routes only the new positions. Equal to the last `t` positions of
    /// [`TransformerLm::forward`] over all `p + t` tokens, up to float rounding (dropless
    /// routing, as a token's experts then depend on that token alone; with a capacity they
    /// depend on the batch). No multi-token prediction logits; losses and statistics of the
    /// new positions only. Errors when the model's attention kind has no cache
    /// ([`TransformerLm::supports_kv_cache`]) or `p + t > max_seq_len`.
    ///
    /// # Shapes
    /// `tokens_bt` int64 `[b, t]` -> `logits_btv [b, t, v]`
    pub fn forward_cached(
        &self,
        tokens_bt: &Tensor,
        ctx: &LmForward,
        cache: &mut KvCache,
    ) -> Result<LmOutput> {
        let p = cache.len();
        let t = match tokens_bt.size().as_slice() {
            [_, t] if *t > 0 && p + *t <= self.cfg.max_seq_len => *t,
            s => {
                return Err(ModelError::Invalid(format!(
                    "tokens must be [b, t] with 0 < t and {p} cached + t <= model.max_seq_len \
                     ({}), got {s:?}",
                    self.cfg.max_seq_len
                )))
            }
        };
        let ck = ctx.compute_kind;
        let mut x_btd = self.embed(tokens_bt, ck)?;
        let mut moe = MoeSums::new(x_btd.device())?;
        for (i, block) in self.layers.iter().enumerate() {
            let kv = cache.layer(i)?;
            let (y_btd, stats) =
                block.forward_kv(&x_btd, &self.rope, ctx, i as i64, self.seed, Some(kv))?;
            x_btd = y_btd;
            moe.add(i as i64, stats)?;
        }
        cache.advance(t);
        let head_vd = self.lm_head_vd.as_ref().unwrap_or(&self.embed_vd);
        let logits_btv = self.head(&x_btd, head_vd, ck)?;
        Ok(LmOutput {
            logits_btv,
            mtp_logits_btv: None,
            aux_loss: moe.aux_loss,
            z_loss: moe.z_loss,
            moe: moe.stats,
        })
    }

    /// Every trainable tensor under its stable name (shallow clones), in the order the
    /// modules created them. Routed experts are `ParamKind::Expert`; norms, biases and the
    /// embedding are not decayed, matrices are.
    pub fn params(&self) -> Vec<Param> {
        self.params.iter().map(Param::shallow_clone).collect()
    }

    /// Non-trainable state that checkpoints carry, e.g. `layers.3.moe.expert_bias`.
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        self.buffers
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }

    /// The MoE layers with their block indices (the multi-token prediction block, if any, is
    /// block `num_layers`).
    pub fn moe_layers(&self) -> Vec<(i64, &MoeLayer)> {
        let main = self.layers.iter().map(Block::moe);
        let mtp = self.mtp.iter().map(|m| m.block.moe());
        main.chain(mtp)
            .enumerate()
            .filter_map(|(i, m)| m.map(|m| (i as i64, m)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ExpertImpl;
    use crate::ParamKind;

    fn model_cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 32,
            d_model: 16,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            ffn_hidden: 24,
            max_seq_len: 16,
            ..ModelConfig::default()
        }
    }

    fn moe_cfg() -> MoeConfig {
        MoeConfig {
            num_experts: 4,
            top_k: 2,
            expert_hidden: 8,
            first_dense_layers: 1,
            expert_impl: ExpertImpl::Sequential,
            ..MoeConfig::default()
        }
    }

    fn dense_cfg() -> MoeConfig {
        MoeConfig {
            num_experts: 1,
            top_k: 1,
            ..MoeConfig::default()
        }
    }

    fn ctx(kind: Kind) -> LmForward {
        LmForward {
            train: true,
            compute_kind: kind,
            step: 0,
        }
    }

    fn tokens(b: i64, t: i64, seed: i64) -> Tensor {
        Tensor::arange(b * t, (Kind::Int64, Device::Cpu))
            .f_mul_scalar(7 + seed)
            .unwrap()
            .remainder(32)
            .view([b, t])
    }

    #[test]
    fn forward_shapes_losses_and_param_names() {
        let lm = TransformerLm::new(
            &model_cfg(),
            &moe_cfg(),
            &ExpertParallel::single(),
            5,
            Device::Cpu,
        )
        .unwrap();
        let out = lm.forward(&tokens(2, 6, 0), &ctx(Kind::Float)).unwrap();
        assert_eq!(out.logits_btv.size(), vec![2, 6, 32]);
        assert_eq!(out.logits_btv.kind(), Kind::Float);
        assert_eq!(
            out.moe.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(out.aux_loss.size(), Vec::<i64>::new());
        // Aux loss near coeff (0.01 per layer for a near-balanced router, at most E * coeff).
        let aux = out.aux_loss.double_value(&[]);
        assert!(aux > 0.0 && aux <= 2.0 * 4.0 * 0.01, "aux {aux}");
        assert!(out.z_loss.double_value(&[]) > 0.0);
        let want_aux: f64 = out
            .moe
            .iter()
            .map(|(_, s)| s.aux_loss.double_value(&[]))
            .sum();
        assert!((aux - want_aux).abs() < 1e-7);

        let params = lm.params();
        let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "duplicate names {names:?}");
        for want in [
            "embed.weight",
            "layers.0.attn_norm.weight",
            "layers.0.attn.wq",
            "layers.0.attn.wo",
            "layers.0.ffn_norm.weight",
            "layers.0.ffn.w_gate",
            "layers.1.moe.w_router",
            "layers.2.attn.wk",
            "norm.weight",
            "lm_head.weight",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
        assert!(!names
            .iter()
            .any(|n| n.starts_with("layers.0.moe") || n.starts_with("layers.1.ffn.")));
        for p in &params {
            let no_decay = p.name.ends_with("norm.weight") || p.name == "embed.weight";
            assert_eq!(p.weight_decay, !no_decay, "{}", p.name);
            let is_expert = p.name.contains(".moe.experts.");
            assert_eq!(
                matches!(p.kind, ParamKind::Expert { .. }),
                is_expert,
                "{}",
                p.name
            );
        }
        assert_eq!(lm.moe_layers().len(), 2);
        assert!(lm.buffers().is_empty());
    }

    /// Logits at positions <= t are unchanged when tokens after t change (dropless routing
    /// is per token, so MoE layers keep causality too), and later logits do change.
    /// Row-wise float32 kernels: 1e-5.
    #[test]
    fn logits_do_not_depend_on_future_tokens() {
        for moe in [moe_cfg(), dense_cfg()] {
            let lm = TransformerLm::new(
                &model_cfg(),
                &moe,
                &ExpertParallel::single(),
                6,
                Device::Cpu,
            )
            .unwrap();
            let a = tokens(2, 10, 0);
            let b = a.copy();
            b.narrow(1, 6, 4).copy_(&tokens(2, 4, 3));
            let c = ctx(Kind::Float);
            let la = lm.forward(&a, &c).unwrap().logits_btv;
            let lb = lm.forward(&b, &c).unwrap().logits_btv;
            let past = (la.narrow(1, 0, 6) - lb.narrow(1, 0, 6))
                .abs()
                .max()
                .double_value(&[]);
            let future = (la.narrow(1, 6, 4) - lb.narrow(1, 6, 4))
                .abs()
                .max()
                .double_value(&[]);
            assert!(past < 1e-5, "past changed by {past}");
            assert!(future > 1e-4, "future unchanged ({future})");
        }
    }

    #[test]
    fn dense_baseline_and_tied_embeddings() {
        let model = ModelConfig {
            tie_embeddings: true,
            ..model_cfg()
        };
        let lm = TransformerLm::new(
            &model,
            &dense_cfg(),
            &ExpertParallel::single(),
            7,
            Device::Cpu,
        )
        .unwrap();
        assert!(lm.moe_layers().is_empty());
        let params = lm.params();
        assert!(params.iter().all(|p| p.kind == ParamKind::Dense));
        assert!(!params
            .iter()
            .any(|p| p.name == "lm_head.weight" || p.name.contains(".moe.")));
        assert_eq!(
            params
                .iter()
                .filter(|p| p.name.ends_with(".ffn.w_up"))
                .count(),
            3
        );
        let out = lm.forward(&tokens(1, 5, 0), &ctx(Kind::Float)).unwrap();
        assert_eq!(out.aux_loss.double_value(&[]), 0.0);
        assert!(out.moe.is_empty());
        // Tied head: the logits are the final hidden state times the embedding, so the
        // embedding's gradient has rows for tokens that never appear in the input.
        out.logits_btv.sum(Kind::Float).backward();
        let g = params[0].tensor.grad();
        assert!(g.get(31).abs().sum(Kind::Float).double_value(&[]) > 0.0);
        assert!(tokens(1, 5, 0).eq(31).any().int64_value(&[]) == 0);
    }

    /// Expert weights of global expert g are the same whichever EP rank holds them.
    #[test]
    fn expert_params_follow_global_ids() {
        let moe = moe_cfg();
        let full = TransformerLm::new(
            &model_cfg(),
            &moe,
            &ExpertParallel::single(),
            8,
            Device::Cpu,
        )
        .unwrap();
        let half = TransformerLm::new(
            &model_cfg(),
            &moe,
            &ExpertParallel::detached(1, 2),
            8,
            Device::Cpu,
        )
        .unwrap();
        // Built without process groups: parameters only, and a forward says so.
        let err = half
            .forward(&tokens(1, 4, 0), &ctx(Kind::Float))
            .unwrap_err()
            .to_string();
        assert!(err.contains("without process groups"), "{err}");
        let (pf, ph) = (full.params(), half.params());
        assert_eq!(pf.len(), ph.len());
        for (a, b) in pf.iter().zip(&ph) {
            assert_eq!(a.name, b.name);
            match b.kind {
                ParamKind::Expert {
                    first_global,
                    num_local,
                } => {
                    assert_eq!((first_global, num_local), (2, 2));
                    assert!(a.tensor.narrow(0, 2, 2).equal(&b.tensor), "{}", a.name);
                }
                ParamKind::Dense => assert!(a.tensor.equal(&b.tensor), "{}", a.name),
            }
        }
        assert!(TransformerLm::new(
            &model_cfg(),
            &moe,
            &ExpertParallel::detached(0, 3),
            8,
            Device::Cpu
        )
        .is_err());
    }

    /// Central finite differences in float64 of the cross-entropy of a dense 2-layer LM wrt
    /// a few entries of every parameter (embedding, norms, attention, FFN, head). Step 1e-6:
    /// truncation O(1e-12), rounding O(1e-10); 1e-6 relative (floor 1e-7 absolute).
    #[test]
    fn gradients_match_finite_differences() {
        let model = ModelConfig {
            num_layers: 2,
            ..model_cfg()
        };
        let lm = TransformerLm::new(
            &model,
            &dense_cfg(),
            &ExpertParallel::single(),
            9,
            Device::Cpu,
        )
        .unwrap();
        let params = lm.params();
        for p in &params {
            let mut t = p.tensor.shallow_clone();
            let d = t.detach().to_kind(Kind::Double);
            t.set_data(&d);
            if p.name.ends_with("norm.weight") {
                // Non-unit scales so the norm weights' gradients are not special.
                tch::no_grad(|| t.shallow_clone().copy_(&(Tensor::rand_like(&t) + 0.5)));
            }
        }
        let inputs = tokens(2, 5, 1);
        let targets = tokens(2, 5, 2);
        let loss = || {
            let out = lm.forward(&inputs, &ctx(Kind::Double)).unwrap();
            // Not `cross_entropy_for_logits`: tch computes its log-softmax in float32.
            out.logits_btv
                .view([-1, 32])
                .log_softmax(-1, Kind::Double)
                .nll_loss(&targets.view([-1]))
        };
        loss().backward();
        let eps = 1e-6;
        for p in &params {
            let grad = p.tensor.grad().reshape([-1]);
            let n = p.tensor.numel() as i64;
            // For the embedding, a row that is used: token of position 0.
            let picks = if p.name == "embed.weight" {
                let row = inputs.int64_value(&[0, 0]);
                vec![row * 16, row * 16 + 7]
            } else {
                vec![0, n / 2, n - 1]
            };
            for idx in picks {
                let flat = p.tensor.detach().reshape([-1]);
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
                    (fd - an).abs() <= 1e-6 * an.abs() + 1e-7,
                    "{}[{idx}]: finite difference {fd} vs autograd {an}",
                    p.name
                );
            }
        }
    }

    /// bfloat16 matmuls on CPU: logits stay float32 and within bf16 rounding of the float32
    /// model (8 mantissa bits through ~10 chained matmuls: 5% of the logit scale).
    #[test]
    fn bf16_compute_is_close_to_f32() {
        let lm = TransformerLm::new(
            &model_cfg(),
            &moe_cfg(),
            &ExpertParallel::single(),
            10,
            Device::Cpu,
        )
        .unwrap();
        let toks = tokens(2, 8, 0);
        let f = lm.forward(&toks, &ctx(Kind::Float)).unwrap();
        let h = lm.forward(&toks, &ctx(Kind::BFloat16)).unwrap();
        assert_eq!(h.logits_btv.kind(), Kind::Float);
        assert_eq!(h.aux_loss.kind(), Kind::Float);
        let err = (&f.logits_btv - &h.logits_btv)
            .abs()
            .max()
            .double_value(&[]);
        let scale = f.logits_btv.abs().max().double_value(&[]);
        assert!(err <= 0.05 * scale, "err {err} scale {scale}");
        assert!(err > 0.0);
    }

    #[test]
    fn rejects_bad_tokens() {
        let lm = TransformerLm::new(
            &model_cfg(),
            &dense_cfg(),
            &ExpertParallel::single(),
            11,
            Device::Cpu,
        )
        .unwrap();
        let c = ctx(Kind::Float);
        assert!(lm.forward(&tokens(1, 17, 0), &c).is_err());
        assert!(lm.forward(&tokens(1, 4, 0).view([-1]), &c).is_err());
    }
}
