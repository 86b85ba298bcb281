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

    fn block(
        &mut self,
        layer: i64,
        x_in_btd: &Tensor,
        x_out_btd: &Tensor,
    ) -> moe_model::Result<()> {
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

/// Which batches a calibration pass reads: training batch `i` of source rank `r` for each
/// `(i, r)` in `items`, as the source run's sampler (of `world` ranks) drew them.
#[derive(Debug, Clone)]
pub struct CalibPlan {
    /// The source run's world size.
    pub world: i64,
    /// `(batch index, source rank)` pairs this process reads.
    pub items: Vec<(u64, i64)>,
}

impl CalibPlan {
    /// Batches `0..batches` of every source rank, split round-robin over `size` processes;
    /// this is process `rank`'s share (all of them for one process).
    pub fn share(batches: u64, world: i64, rank: i64, size: i64) -> Self {
        let items = (0..batches)
            .flat_map(|i| (0..world).map(move |r| (i, r)))
            .enumerate()
            .filter(|(j, _)| (*j as i64) % size.max(1) == rank)
            .map(|(_, item)| item)
            .collect();
        Self { world, items }
    }
}

/// This process's part in a multi-process surgery (`mpirun -np N moe slim`): its rank, the
/// number of processes, and a sum over all of them of a flat f64 buffer (an all-reduce).
pub struct Share<'a> {
    /// This process, `0..size`; process 0 writes.
    pub rank: i64,
    /// Processes.
    pub size: i64,
    /// Sums the buffer over all processes, in place.
    pub sum_f64: &'a mut dyn FnMut(&mut [f64]) -> Result<(), String>,
}

/// Runs the no-grad calibration forward of `model` (single-process, every expert local).
pub fn calibrate(
    model: &TransformerLm,
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    plan: &CalibPlan,
) -> Result<Calibration, HfError> {
    let _guard = tch::no_grad_guard();
    let ctx = LmForward {
        train: false,
        compute_kind: compute_kind(&cfg.trainer.precision),
        step: 0,
    };
    let mut calib = Calibration::default();
    for &(i, rank) in &plan.items {
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
    Ok(calib)
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::config::{ModelConfig, MoeConfig};
    use moe_model::ExpertParallel;

    /// A random tiny model (3 blocks, the first dense, 4 experts top-2, dropless) on random
    /// tokens, observed once. References: the model's own `topk_load_e` (computed inside the
    /// MoE layer, not by the observer) for the frequencies; post-softmax top-k weights sum to
    /// 1 per token, so the weighted frequencies sum to the token count; each expert's
    /// activation sums of squares recomputed by a plain loop over tokens; Block Influence in
    /// [0, 2]. Tolerances: f32 sums of 64 terms, 1e-4 relative.
    #[test]
    fn statistics_match_independent_references() {
        let model_cfg = ModelConfig {
            d_model: 16,
            num_layers: 3,
            ffn_hidden: 24,
            max_seq_len: 16,
            init_std: 0.5,
            ..ModelConfig::default()
        };
        let moe_cfg = MoeConfig {
            num_experts: 4,
            top_k: 2,
            expert_hidden: 8,
            first_dense_layers: 1,
            ..MoeConfig::default()
        };
        let m = TransformerLm::new(
            &model_cfg,
            &moe_cfg,
            &ExpertParallel::single(),
            3,
            tch::Device::Cpu,
        )
        .unwrap();
        tch::manual_seed(0);
        let tokens = Tensor::randint(256, [4, 16], (Kind::Int64, tch::Device::Cpu));
        let ctx = LmForward {
            train: false,
            compute_kind: Kind::Float,
            step: 0,
        };
        let mut c = Calibration::default();
        let out = tch::no_grad(|| m.forward_observed(&tokens, &ctx, &mut c)).unwrap();
        let plain = tch::no_grad(|| m.forward(&tokens, &ctx)).unwrap();
        assert!(
            out.logits_btv.equal(&plain.logits_btv),
            "observing changed the forward"
        );
        for (layer, stats) in &out.moe {
            let p = format!("layers.{layer}.moe");
            let want = Vec::<f64>::try_from(stats.topk_load_e.to_kind(Kind::Double)).unwrap();
            assert_eq!(c.frequency(&p).unwrap(), want, "{p}");
            let w: f64 = c.weighted_frequency(&p).unwrap().iter().sum();
            assert!((w - 64.0).abs() < 64.0 * 1e-4, "{p}: {w}");
            let mw = c.mean_weight(&p).unwrap();
            assert!(mw.iter().all(|x| (0.0..=1.0).contains(x)), "{mw:?}");
            assert_eq!(c.activation_norms(&p).unwrap().len(), 4);
        }
        assert_eq!(out.moe.len(), 2);
        assert!(c.activation_norms("layers.0.ffn").is_ok());
        assert!(c.frequency("layers.0.moe").is_err());
        let bi = c.block_influence().unwrap();
        assert_eq!(bi.len(), 3);
        assert!(bi.values().all(|b| (0.0..=2.0).contains(b)), "{bi:?}");

        // Summing two ranks' statistics doubles every one of them.
        let before = c.frequency("layers.1.moe").unwrap();
        c.all_reduce(&mut |v: &mut [f64]| {
            v.iter_mut().for_each(|x| *x *= 2.0);
            Ok(())
        })
        .unwrap();
        let after = c.frequency("layers.1.moe").unwrap();
        assert!(before.iter().zip(&after).all(|(b, a)| 2.0 * b == *a));
        assert_eq!(
            c.tokens, 0,
            "tokens are counted by calibrate(), not the observer"
        );
    }

    /// The activation sum of squares of one expert against a loop over its tokens.
    /// 2 batches x 3 source ranks over 2 processes: process 0 reads items 0, 2, 4 of
    /// (0,0) (0,1) (0,2) (1,0) (1,1) (1,2), process 1 the others; together all of them once.
    #[test]
    fn plans_split_round_robin() {
        assert_eq!(CalibPlan::share(2, 3, 0, 2).items, [(0, 0), (0, 2), (1, 1)]);
        assert_eq!(CalibPlan::share(2, 3, 1, 2).items, [(0, 1), (1, 0), (1, 2)]);
        assert_eq!(CalibPlan::share(2, 3, 0, 1).items.len(), 6);
    }

    #[test]
    fn activation_sums_by_loop() {
        tch::manual_seed(1);
        let x = Tensor::randn([5, 3], (Kind::Float, tch::Device::Cpu));
        let wg = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let wu = Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu));
        let got = Vec::<f64>::try_from(Calibration::act_sumsq(&x, &wg, &wu).unwrap()).unwrap();
        let xs = Vec::<f32>::try_from(x.reshape([-1])).unwrap();
        let g = Vec::<f32>::try_from(wg.reshape([-1])).unwrap();
        let u = Vec::<f32>::try_from(wu.reshape([-1])).unwrap();
        for (j, got) in got.iter().enumerate() {
            let mut want = 0f64;
            for n in 0..5 {
                let (mut a, mut b) = (0f64, 0f64);
                for i in 0..3 {
                    a += f64::from(xs[n * 3 + i] * g[i * 4 + j]);
                    b += f64::from(xs[n * 3 + i] * u[i * 4 + j]);
                }
                let silu = a / (1.0 + (-a).exp());
                want += (silu * b).powi(2);
            }
            assert!(
                (got - want).abs() <= 1e-4 * want.max(1.0),
                "{j}: {got} vs {want}"
            );
        }
    }
}
