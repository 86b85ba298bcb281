//! Calibration for checkpoint surgery: one no-grad forward over a few batches, fed to a
//! [`ForwardObserver`] that sums, per layer:
//!
//! - routing frequency `freq_e`: top-k assignments per expert (dropless: calibration measures
//!   the router's preference, not what a capacity limit kept);
//! - router-weighted frequency `weighted_e`: the sum of those assignments' routing weights
//!   ("Not All Experts are Equal", Lu et al. 2024, ranks experts by it); the mean routing
//!   weight is `weighted_e / freq_e`;
//! - per-expert (and dense-FFN) hidden-unit activation norms: `sum over the expert's tokens
//!   of a_j^2` with `a = silu(x W_gate) * (x W_up)`, the input of `W_down` (its square root
//!   is the norm Wanda-style width pruning multiplies by the weight norm);
//! - Block Influence (ShortGPT, Men et al. 2024): `1 - cos(x_in, x_out)` of each block's
//!   residual-stream input and output, summed over tokens.
//!
//! Every statistic is a named float64 tensor of sums, so statistics from several ranks (or
//! several passes) add up, and [`Calibration::all_reduce`] is one loop.

use super::run_out::failed;
use crate::config::ExperimentConfig;
use crate::data::{Dataset, SamplerSpec, Split};
use crate::hf::HfError;
use crate::inference::compute_kind;
use moe_model::dispatcher::Dispatcher;
use moe_model::moe_layer::MoeLayer;
use moe_model::observe::{FfnView, ForwardObserver};
use moe_model::router::{self, RouterInput};
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::ModelError;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// Summed calibration statistics by name (see the module docs).
#[derive(Debug, Default)]
pub struct Calibration {
    sums: BTreeMap<String, Tensor>,
    /// Tokens seen.
    pub tokens: u64,
}

fn model_err(e: tch::TchError) -> ModelError {
    ModelError::Tch(e)
}

impl Calibration {
    fn add(&mut self, name: String, v: Tensor) -> Result<(), ModelError> {
        let v = v.f_to_kind(Kind::Double).map_err(model_err)?;
        let sum = match self.sums.remove(&name) {
            Some(s) => s.f_add(&v).map_err(model_err)?,
            None => v,
        };
        self.sums.insert(name, sum);
        Ok(())
    }

    fn vec(&self, name: &str) -> Result<Vec<f64>, HfError> {
        let t = self
            .sums
            .get(name)
            .ok_or_else(|| failed(format!("calibration has no statistic {name}")))?;
        Vec::<f64>::try_from(&t.f_reshape([-1]).map_err(failed)?).map_err(failed)
    }

    /// Top-k assignments per expert of MoE layer `prefix` (`layers.3.moe`), `[E]`.
    pub fn frequency(&self, prefix: &str) -> Result<Vec<f64>, HfError> {
        self.vec(&format!("{prefix}.freq"))
    }

    /// Summed routing weights per expert of MoE layer `prefix`, `[E]`.
    pub fn weighted_frequency(&self, prefix: &str) -> Result<Vec<f64>, HfError> {
        self.vec(&format!("{prefix}.weighted"))
    }

    /// Mean routing weight of each expert's assignments (0 for an expert never chosen).
    pub fn mean_weight(&self, prefix: &str) -> Result<Vec<f64>, HfError> {
        let (f, w) = (self.frequency(prefix)?, self.weighted_frequency(prefix)?);
        Ok(f.iter()
            .zip(&w)
            .map(|(f, w)| if *f > 0.0 { w / f } else { 0.0 })
            .collect())
    }

    /// Hidden-unit activation norms `sqrt(sum a_j^2)`: `[E][H]` for an MoE layer `prefix`
    /// (`layers.3.moe`), `[1][H]` for a dense FFN (`layers.0.ffn`).
    pub fn activation_norms(&self, prefix: &str) -> Result<Vec<Vec<f64>>, HfError> {
        let name = format!("{prefix}.act_sumsq");
        let t = self
            .sums
            .get(&name)
            .ok_or_else(|| failed(format!("calibration has no statistic {name}")))?;
        let h = *t.size().last().unwrap_or(&0);
        let rows = Vec::<f64>::try_from(&t.f_reshape([-1]).map_err(failed)?).map_err(failed)?;
        Ok(rows
            .chunks(h.max(1) as usize)
            .map(|r| r.iter().map(|s| s.max(0.0).sqrt()).collect())
            .collect())
    }

    /// Block Influence `1 - mean cos(x_in, x_out)` of every block, by index.
    pub fn block_influence(&self) -> Result<BTreeMap<i64, f64>, HfError> {
        let mut out = BTreeMap::new();
        for name in self.sums.keys() {
            let Some(i) = name
                .strip_prefix("layers.")
                .and_then(|r| r.strip_suffix(".bi_sum"))
                .and_then(|i| i.parse::<i64>().ok())
            else {
                continue;
            };
            let sum = self.vec(name)?.first().copied().unwrap_or(0.0);
            let n = self
                .vec(&format!("layers.{i}.bi_tokens"))?
                .first()
                .copied()
                .unwrap_or(0.0);
            out.insert(i, if n > 0.0 { sum / n } else { 0.0 });
        }
        Ok(out)
    }

    /// Sums every statistic over ranks with `sum_f64` (an all-reduce of a flat f64 buffer,
    /// called with the same lengths in the same order on every rank: the names are sorted and
    /// every rank observes the same layers).
    pub fn all_reduce(
        &mut self,
        sum_f64: &mut dyn FnMut(&mut [f64]) -> Result<(), String>,
    ) -> Result<(), HfError> {
        let mut flat = Vec::new();
        let mut shapes = Vec::new();
        for (name, t) in &self.sums {
            flat.extend(self.vec(name)?);
            shapes.push((name.clone(), t.size()));
        }
        flat.push(self.tokens as f64);
        sum_f64(&mut flat).map_err(failed)?;
        let mut at = 0usize;
        for (name, shape) in shapes {
            let n: i64 = shape.iter().product();
            let t = Tensor::from_slice(&flat[at..at + n as usize])
                .f_reshape(&shape)
                .map_err(failed)?;
            self.sums.insert(name, t);
            at += n as usize;
        }
        self.tokens = flat[at] as u64;
        Ok(())
    }

    /// The SwiGLU hidden activations `silu(x W_gate) * (x W_up)` squared and summed over
    /// rows, in f32. `x_nd [n, d]`, weights `[d, h]` -> `[h]`.
    fn act_sumsq(x_nd: &Tensor, w_gate_dh: &Tensor, w_up_dh: &Tensor) -> tch::Result<Tensor> {
        let k = Kind::Float;
        let a = x_nd
            .f_matmul(&w_gate_dh.f_to_kind(k)?)?
            .f_silu()?
            .f_mul(&x_nd.f_matmul(&w_up_dh.f_to_kind(k)?)?)?;
        a.f_square()?.f_sum_dim_intlist(0, false, Kind::Double)
    }

    fn observe_moe(
        &mut self,
        layer: i64,
        x_nd: &Tensor,
        seq_len: i64,
        m: &MoeLayer,
    ) -> Result<(), ModelError> {
        let mut cfg = m.config().clone();
        cfg.capacity_factor = None;
        cfg.pad_to_capacity = false;
        let logits_ne = x_nd
            .f_matmul(&m.w_router_de.f_to_kind(Kind::Float).map_err(model_err)?)
            .map_err(model_err)?;
        let routing = router::route(
            &cfg,
            &RouterInput {
                logits_ne: &logits_ne,
                expert_bias_e: m.expert_bias_e.as_ref(),
                seq_len,
                capacity_groups: 1,
            },
        )?;
        let p = format!("layers.{layer}.moe");
        let map_ne = &routing.routing_map_ne;
        let freq_e = map_ne
            .f_sum_dim_intlist(0, false, Kind::Double)
            .map_err(model_err)?;
        self.add(format!("{p}.freq"), freq_e)?;
        let weighted_e = routing
            .probs_ne
            .f_sum_dim_intlist(0, false, Kind::Double)
            .map_err(model_err)?;
        self.add(format!("{p}.weighted"), weighted_e)?;
        let ex = &m.experts;
        let mut rows = Vec::with_capacity(ex.num_local as usize);
        for l in 0..ex.num_local {
            let g = ex.first_global + l;
            let idx = map_ne
                .f_select(1, g)
                .and_then(|c| c.f_nonzero())
                .and_then(|i| i.f_reshape([-1]))
                .map_err(model_err)?;
            let x_md = x_nd.f_index_select(0, &idx).map_err(model_err)?;
            let wg = ex.w_gate_ldh.f_select(0, l).map_err(model_err)?;
            let wu = ex.w_up_ldh.f_select(0, l).map_err(model_err)?;
            rows.push(Self::act_sumsq(&x_md, &wg, &wu).map_err(model_err)?);
        }
        let act_eh = Tensor::f_stack(&rows, 0).map_err(model_err)?;
        self.add(format!("{p}.act_sumsq"), act_eh)
    }
}

impl ForwardObserver for Calibration {
    fn ffn(&mut self, layer: i64, h_btd: &Tensor, ffn: FfnView<'_>) -> moe_model::Result<()> {
        let size = h_btd.size();
        let (t, d) = (size[1], size[size.len() - 1]);
        let x_nd = h_btd
            .f_reshape([-1, d])
            .and_then(|x| x.f_to_kind(Kind::Float))
            .map_err(model_err)?;
        match ffn {
            FfnView::Dense(mlp) => {
                let s = Self::act_sumsq(&x_nd, &mlp.w_gate_dh, &mlp.w_up_dh).map_err(model_err)?;
                self.add(format!("layers.{layer}.ffn.act_sumsq"), s)
            }
            FfnView::Moe(m) => self.observe_moe(layer, &x_nd, t, m),
        }
    }

    fn block(&mut self, layer: i64, x_in_btd: &Tensor, x_out_btd: &Tensor) -> moe_model::Result<()> {
        let k = Kind::Double;
        let cos_bt = x_in_btd
            .f_to_kind(k)
            .and_then(|a| Tensor::f_cosine_similarity(&a, &x_out_btd.f_to_kind(k)?, -1, 1e-8))
            .map_err(model_err)?;
        let bi = cos_bt
            .f_neg()
            .and_then(|c| c.f_add_scalar(1.0))
            .and_then(|c| c.f_sum(k))
            .and_then(|c| c.f_reshape([1]))
            .map_err(model_err)?;
        self.add(format!("layers.{layer}.bi_sum"), bi)?;
        let n = Tensor::from_slice(&[cos_bt.numel() as f64]);
        self.add(format!("layers.{layer}.bi_tokens"), n)
    }
}

/// Which batches a calibration pass reads: training batches `0..batches` of each source rank
/// in `ranks` (of `world`), as the source run's sampler drew them.
#[derive(Debug, Clone)]
pub struct CalibPlan {
    /// Batches per source rank (`--calib-batches`).
    pub batches: u64,
    /// The source run's world size.
    pub world: i64,
    /// The source ranks whose batches this process reads (all of them in one process; a
    /// share of them per rank under mpirun).
    pub ranks: Vec<i64>,
}

/// Runs the no-grad calibration forward of `model` (single-process, every expert local).
pub fn calibrate(
    model: &TransformerLm,
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    plan: &CalibPlan,
) -> Result<Calibration, HfError> {
    let _guard = tch::no_grad_guard();
    let dispatcher = Dispatcher::Local;
    let ctx = LmForward {
        train: false,
        dispatcher: &dispatcher,
        capacity_groups: 1,
        compute_kind: compute_kind(&cfg.trainer.precision),
        step: 0,
    };
    let mut calib = Calibration::default();
    for i in 0..plan.batches {
        for &rank in &plan.ranks {
            let spec = SamplerSpec {
                seed: cfg.run.seed,
                seq_len: cfg.data.seq_len,
                batch_size: cfg.trainer.batch_size,
                world_size: plan.world,
                rank,
                grad_accum: 1,
            };
            for b in dataset.batches(Split::Train, i, &spec).map_err(failed)? {
                model
                    .forward_observed(&b.inputs_bt, &ctx, &mut calib)
                    .map_err(failed)?;
                calib.tokens += b.inputs_bt.numel() as u64;
            }
        }
    }
    Ok(calib)
}
