//! The MoE FFN layer: router, global router statistics, dispatch, routed experts, combine,
//! plus optional shared experts.
//!
//! Follows Megatron-Core's `MoELayer` (router -> token dispatcher -> experts -> combine, shared
//! experts added to the output) with the loss definitions of `shared/DESIGN.md` step 2.
//! Router input jitter is Switch Transformer's (Fedus et al. 2021, section 2.4).

use crate::config::{AuxLossKind, ModelConfig, MoeConfig, ScoreFunction};
use crate::dispatcher::Dispatcher;
use crate::experts::RoutedExperts;
use crate::mlp::SwiGlu;
use crate::parallel::ExpertParallel;
use crate::router::{self, RouterInput, Routing};
use crate::{ModelError, ParamBuilder, Result};
use moe_comm::Placement;
use rand::distr::{Distribution, Uniform};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// One MoE layer's parameters and buffers.
#[derive(Debug)]
pub struct MoeLayer {
    /// Router weight `[d, E]`, always f32 (routing decisions are precision-sensitive).
    pub w_router_de: Tensor,
    /// The routed experts this rank holds.
    pub experts: RoutedExperts,
    /// `num_shared_experts` shared experts as one SwiGLU of width
    /// `num_shared_experts * shared_hidden()` (see [`crate::mlp`]).
    pub shared: Option<SwiGlu>,
    /// Shared-expert gate `[d, 1]` (`moe.shared_expert_gate`, Qwen2-MoE): the shared output
    /// of token n is scaled by `sigmoid(x_n . w)`.
    pub shared_gate_d1: Option<Tensor>,
    /// Aux-loss-free balancing bias f32 `[E]` (a buffer, not a parameter), when
    /// `bias_update_rate > 0`.
    pub expert_bias_e: Option<Tensor>,
    /// How rows reach the experts, built once with the layer; its EP position decided which
    /// experts [`MoeLayer::experts`] holds.
    dispatcher: Dispatcher,
    /// Capacity groups of the router, see [`ExpertParallel::capacity_groups`].
    capacity_groups: i64,
    cfg: MoeConfig,
}

/// Per-call context of [`MoeLayer::forward`].
pub struct MoeForward {
    /// Training (jitter on) or evaluation.
    pub train: bool,
    /// Tokens per sequence (`seq_aux_loss`).
    pub seq_len: i64,
    /// Seed of the router jitter noise of this call (unused unless training with jitter).
    pub jitter_seed: u64,
    /// The kind the layer input and the expert GEMMs run in (strict mode checks it).
    pub compute_kind: Kind,
}

/// Losses and routing statistics of one forward.
#[derive(Debug)]
pub struct MoeStats {
    /// Scalar load-balancing loss (x coeff) with grad: this rank's share of the global loss
    /// (see [`router::aux_loss`]), or the sequence-level loss; 0 when disabled.
    pub aux_loss: Tensor,
    /// Scalar z-loss (x coeff) with grad.
    pub z_loss: Tensor,
    /// f32 `[E]` kept assignments per expert summed over all data-parallel ranks; no grad.
    pub load_e: Tensor,
    /// f32 `[E]` assignments per expert before capacity dropping, summed over all ranks.
    pub topk_load_e: Tensor,
    /// i64 scalar on the device: kept assignments on this rank.
    pub num_kept: Tensor,
    /// i64 scalar on the device: dropped assignments on this rank.
    pub num_dropped: Tensor,
    /// Bool scalar on the layer's device: the routing weights are finite, non-negative and
    /// sum per token as configured. Kept on the device so the forward pass does not wait on
    /// it; only debug mode reads it ([`MoeStats::probs_sum_ok`]).
    pub probs_ok_flag: Tensor,
}

impl MoeStats {
    /// Adds another micro-batch's statistics into these (gradient accumulation): loads and
    /// counts add up, the losses add up detached (they are for logging once backward ran).
    pub fn accumulate(&mut self, other: &MoeStats) -> Result<()> {
        self.aux_loss = self
            .aux_loss
            .f_detach()?
            .f_add(&other.aux_loss.f_detach()?)?;
        self.z_loss = self.z_loss.f_detach()?.f_add(&other.z_loss.f_detach()?)?;
        self.load_e = self.load_e.f_add(&other.load_e)?;
        self.topk_load_e = self.topk_load_e.f_add(&other.topk_load_e)?;
        self.num_kept = self.num_kept.f_add(&other.num_kept)?;
        self.num_dropped = self.num_dropped.f_add(&other.num_dropped)?;
        self.probs_ok_flag = self.probs_ok_flag.f_logical_and(&other.probs_ok_flag)?;
        Ok(())
    }

    /// Reads [`MoeStats::probs_ok_flag`] to the host (a device sync: debug checks only).
    pub fn probs_sum_ok(&self) -> Result<bool> {
        // host: debug-mode invariant checks only.
        Ok(moe_comm::host_read::<bool>(&self.probs_ok_flag)?
            .first()
            .copied()
            .unwrap_or(false))
    }
}

impl MoeLayer {
    /// Builds the layer under `vb` (e.g. `layers.3.moe`) at EP position `par` (rank r of P):
    /// router `<vb>.w_router`, experts `<vb>.experts.*` (global experts `r*E/P .. (r+1)*E/P`,
    /// expert-sharded), shared experts `<vb>.shared.*` and their gate `<vb>.shared.out_gate`,
    /// all decayed (as Megatron-Core does), and the buffer `<vb>.expert_bias` when aux-loss-free
    /// balancing is on. The layer keeps `par`'s dispatcher.
    pub fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        vb: &ParamBuilder,
        par: &ExpertParallel,
    ) -> Result<Self> {
        let e = moe.num_experts;
        let (ep_rank, ep_size) = (par.dispatcher.ep_rank(), par.dispatcher.ep_size());
        if ep_size <= 0 || e % ep_size != 0 || !(0..ep_size).contains(&ep_rank) {
            return Err(ModelError::Invalid(format!(
                "moe.num_experts ({e}) must be divisible by parallel.ep_size ({ep_size}), ep_rank {ep_rank} in 0..{ep_size}"
            )));
        }
        if par.capacity_groups < 1 {
            return Err(ModelError::Invalid(format!(
                "capacity groups ({}) must be at least 1",
                par.capacity_groups
            )));
        }
        let num_local = e / ep_size;
        let w_router_de = vb.normal("w_router", &[model.d_model, e], model.init_std)?;
        let experts = RoutedExperts::new(
            model,
            moe,
            &vb.pp("experts"),
            ep_rank * num_local,
            num_local,
        )?;
        let shared = if moe.num_shared_experts > 0 {
            Some(SwiGlu::new(
                &vb.pp("shared"),
                model.d_model,
                moe.num_shared_experts * moe.shared_hidden(),
                model.init_std,
                model.num_layers,
            )?)
        } else {
            None
        };
        let shared_gate_d1 = if moe.shared_expert_gate && shared.is_some() {
            Some(
                vb.pp("shared")
                    .normal("out_gate", &[model.d_model, 1], model.init_std)?,
            )
        } else {
            None
        };
        let expert_bias_e = if moe.bias_update_rate > 0.0 {
            let zeros = Tensor::f_zeros([e], (Kind::Float, vb.device()))?;
            Some(vb.buffer("expert_bias", zeros)?)
        } else {
            None
        };
        Ok(Self {
            w_router_de,
            experts,
            shared,
            shared_gate_d1,
            expert_bias_e,
            dispatcher: par.dispatcher.clone(),
            capacity_groups: par.capacity_groups,
            cfg: moe.clone(),
        })
    }

    /// The layer's MoE configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.cfg
    }

    /// How the layer's rows reach its experts.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Router, global statistics, dispatch, experts, combine, plus shared experts.
    ///
    /// Communication: one all-reduce of `3E` statistics over the world, and the dispatcher's
    /// exchange. One host read, in the dispatcher (the rows per expert it sends and
    /// receives); everything else stays on the device. The output has the dtype of `x_nd`;
    /// the router always runs in f32.
    ///
    /// # Shapes
    /// `x_nd [N, d]` -> `y_nd [N, d]`
    pub fn forward(&self, x_nd: &Tensor, ctx: &MoeForward) -> Result<(Tensor, MoeStats)> {
        let (n, d) = match x_nd.size().as_slice() {
            [n, d] => (*n, *d),
            s => {
                return Err(ModelError::Invalid(format!(
                    "MoE input must be [N, d], got {s:?}"
                )))
            }
        };
        let e = self.cfg.num_experts;
        let dispatcher = &self.dispatcher;
        // Strict mode: what reaches the dispatcher and the experts is on the layer's device
        // and of the compute kind, as NCCL and the GPU kernels will require.
        let placement = Placement::new(self.w_router_de.device(), ctx.compute_kind);
        placement.check_of("MoeLayer::forward", "x_nd", x_nd, ctx.compute_kind)?;

        let mut router_in_nd = x_nd.f_to_kind(Kind::Float)?;
        if ctx.train && self.cfg.jitter_eps > 0.0 {
            router_in_nd = router_in_nd.f_mul(&jitter_noise(
                ctx.jitter_seed,
                n,
                d,
                self.cfg.jitter_eps,
                x_nd.device(),
            )?)?;
        }
        let logits_ne = router_in_nd.f_matmul(&self.w_router_de.f_to_kind(Kind::Float)?)?;
        let routing = router::route(
            &self.cfg,
            &RouterInput {
                logits_ne: &logits_ne,
                expert_bias_e: self.expert_bias_e.as_ref(),
                seq_len: ctx.seq_len,
                capacity_groups: self.capacity_groups,
            },
        )?;

        let (global_counts_e, load_e, topk_load_e) = self.global_stats(&routing)?;
        // Every data-parallel rank routes the same number of tokens (the global batch is split
        // evenly), so the global count is known here without a read.
        let global_tokens = routing.aux_stats.num_tokens * dispatcher.world_size();
        let aux_loss = match self.cfg.aux_loss {
            AuxLossKind::AuxLoss => router::aux_loss(
                &self.cfg,
                &routing.aux_stats,
                &global_counts_e,
                global_tokens,
            )?,
            AuxLossKind::SeqAuxLoss => match &routing.seq_aux_loss {
                Some(l) => l.shallow_clone(),
                None => Tensor::f_zeros([], (Kind::Float, x_nd.device()))?,
            },
            AuxLossKind::None => Tensor::f_zeros([], (Kind::Float, x_nd.device()))?,
        };

        let (x_md, rows_l, meta) = dispatcher.dispatch(x_nd, &routing, e)?;
        placement.check_of(
            "MoeLayer::forward",
            "dispatched rows x_md",
            &x_md,
            ctx.compute_kind,
        )?;
        let y_md = self.experts.forward(&x_md, &rows_l)?;
        placement.check_of(
            "MoeLayer::forward",
            "expert output y_md",
            &y_md,
            ctx.compute_kind,
        )?;
        let mut y_nd = dispatcher.combine(&y_md, meta)?;
        if let Some(shared) = &self.shared {
            let mut s_nd = shared.forward(x_nd)?;
            if let Some(g) = &self.shared_gate_d1 {
                let gate_n1 = x_nd.f_matmul(&g.f_to_kind(x_nd.kind())?)?.f_sigmoid()?;
                s_nd = s_nd.f_mul(&gate_n1)?;
            }
            y_nd = y_nd.f_add(&s_nd.f_to_kind(y_nd.kind())?)?;
        }

        let stats = MoeStats {
            aux_loss,
            z_loss: routing.z_loss.shallow_clone(),
            load_e,
            topk_load_e,
            probs_ok_flag: self.probs_ok_flag(&routing)?,
            num_kept: routing.num_kept,
            num_dropped: routing.num_dropped,
        };
        Ok((y_nd, stats))
    }

    /// One all-reduce over the world of `[aux counts_e | top-k counts_e | kept_e]`, in f64 so
    /// that counts stay exact beyond 2^24 tokens. Returns the global aux counts (f32), load
    /// and top-k load (f32, no grad), all on the device.
    fn global_stats(&self, routing: &Routing) -> Result<(Tensor, Tensor, Tensor)> {
        let e = self.cfg.num_experts;
        // Padding rows are in the map but carry zero weight; without padding the map is exact.
        let kept_e = if self.cfg.pad_to_capacity {
            routing
                .probs_ne
                .f_ne(0.0)?
                .f_logical_and(&routing.routing_map_ne)?
                .f_sum_dim_intlist(0, false, Kind::Double)?
        } else {
            routing.kept_e.f_to_kind(Kind::Double)?
        };
        let local = Tensor::f_cat(
            &[
                routing
                    .aux_stats
                    .counts_e
                    .f_detach()?
                    .f_to_kind(Kind::Double)?,
                routing.topk_counts_e.f_detach()?.f_to_kind(Kind::Double)?,
                kept_e,
            ],
            0,
        )?;
        let global = self.dispatcher.all_reduce_stats(&local)?;
        let part = |i: i64| -> Result<Tensor> {
            Ok(global.f_narrow(0, i * e, e)?.f_to_kind(Kind::Float)?)
        };
        Ok((part(0)?, part(2)?, part(1)?))
    }

    /// Finite, non-negative weights whose per-token sums respect the configuration: exactly
    /// `route_scale` for normalised routing with nothing dropped, at most `route_scale`
    /// (softmax) or `k * route_scale` (un-normalised sigmoid) otherwise.
    fn probs_ok_flag(&self, routing: &Routing) -> Result<Tensor> {
        let cfg = &self.cfg;
        // With every assignment kept, the `[N, k]` weights are the nonzero entries of
        // `probs_ne` (the rest are exact zeros): the same checks on E/k times fewer values.
        let probs = match &routing.topk {
            Some(topk) => topk.weights_nk.f_detach()?,
            None => routing.probs_ne.f_detach()?,
        };
        let sums_n = probs.f_sum_dim_intlist(1, false, Kind::Float)?;
        let normalised = cfg.renormalises_topk()
            || (cfg.score_function == ScoreFunction::Softmax && !cfg.pre_softmax);
        let rs = cfg.route_scale;
        let tol = 1e-4 * rs.max(1.0);
        let upper = if normalised || cfg.score_function == ScoreFunction::Softmax {
            rs
        } else {
            cfg.top_k as f64 * rs
        };
        let mut ok = probs
            .f_isfinite()?
            .f_all()?
            .f_logical_and(&probs.f_ge(0.0)?.f_all()?)?;
        ok = ok.f_logical_and(&sums_n.f_le(upper + tol)?.f_all()?)?;
        if normalised {
            // Exact sums are required only when nothing was dropped (on the device: no read).
            let exact = sums_n.f_ge(rs - tol)?.f_all()?;
            ok = ok.f_logical_and(&exact.f_logical_or(&routing.num_dropped.f_gt(0)?)?)?;
        }
        Ok(ok)
    }

    /// DeepSeek-V3's aux-loss-free update of the selection bias from the GLOBAL load before
    /// dropping (`stats.topk_load_e`, identical on every rank, so biases stay in sync). No-op
    /// without a bias.
    pub fn update_expert_bias(&self, stats: &MoeStats) -> Result<()> {
        match &self.expert_bias_e {
            Some(bias_e) => {
                router::update_expert_bias(bias_e, &stats.topk_load_e, self.cfg.bias_update_rate)
            }
            None => Ok(()),
        }
    }
}

/// Switch Transformer's multiplicative router jitter: i.i.d. uniform in `[1-eps, 1+eps]` per
/// element, from a ChaCha8 stream seeded by `seed` (not torch's global generator, so in-process
/// ranks cannot disturb each other and a run is reproducible). Drawn on the host: `N*d` values
/// per call, acceptable for a regulariser that is off by default.
///
/// # Shapes
/// -> f32 `[n, d]`
pub fn jitter_noise(seed: u64, n: i64, d: i64, eps: f64, device: Device) -> Result<Tensor> {
    let dist = Uniform::new_inclusive(1.0 - eps as f32, 1.0 + eps as f32)
        .map_err(|err| ModelError::Invalid(format!("moe.jitter_eps ({eps}): {err}")))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let values: Vec<f32> = (0..n.max(0) * d.max(0))
        .map(|_| dist.sample(&mut rng))
        .collect();
    Ok(Placement::new(device, Kind::Float)
        .upload(&values)?
        .f_reshape([n, d])?)
}
