//! `moe slim --experts K`: keep K routed experts per MoE layer (expert pruning; the
//! frequency criterion follows "Not All Experts are Equal", Lu et al. 2024, which drops the
//! experts the router uses least on calibration data).
//!
//! Per layer a sorted list of kept global ids is chosen, then the router's columns, every
//! expert tensor and the aux-loss-free bias are sliced with the same list, so kept expert j
//! of the new layer is old expert `keep[j]` with its own router column: a token's logits over
//! the kept experts are unchanged, and the softmax/top-k runs over those K. `top_k` is clamped
//! to K. Group-limited routing is turned off (its groups would no longer be equal).
//!
//! Calibration (`frequency`): a no-grad forward of the source model over `--calib-batches`
//! training batches of the run's own data, reading each MoE layer's own statistic
//! `MoeStats::topk_load_e` (assignments per expert before capacity dropping). One process
//! evaluates the batches of every rank of the source run, so the counts equal what the
//! run's all-reduce over ranks would sum.

use super::report::{ModelSize, SurgeryReport};
use super::run_out::{load_val_data, val_loss, StagedRun};
use crate::checkpoint::{expert_tensor_name, CheckpointReader};
use crate::config::ExperimentConfig;
use crate::data::{Dataset, SamplerSpec, Split};
use crate::hf::export::checkpoint_config;
use crate::hf::HfError;
use crate::inference::{compute_kind, load_single};
use moe_model::param::ParamKind;
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::ExpertParallel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Which experts survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertCriterion {
    /// K experts drawn uniformly per layer (seeded by `run.seed` and the layer).
    Random,
    /// The K experts with the most top-k assignments on the calibration batches.
    Frequency,
}

/// What to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlimOptions {
    /// Experts kept per MoE layer (`--experts`).
    pub experts: i64,
    pub criterion: ExpertCriterion,
    /// Calibration batches (`--calib-batches`) for `frequency`.
    pub calib_batches: u64,
}

use super::run_out::failed;

/// The `k` experts with the highest `counts_e`, ties to the lower id, sorted by id.
pub fn keep_by_frequency(counts_e: &[f64], k: usize) -> Vec<i64> {
    let mut order: Vec<usize> = (0..counts_e.len()).collect();
    order.sort_by(|&a, &b| counts_e[b].total_cmp(&counts_e[a]).then(a.cmp(&b)));
    let mut keep: Vec<i64> = order.into_iter().take(k).map(|i| i as i64).collect();
    keep.sort_unstable();
    keep
}

/// `k` of `e` experts drawn uniformly without replacement from `seed`, sorted by id.
pub fn keep_random(e: usize, k: usize, seed: u64) -> Vec<i64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut keep: Vec<i64> = rand::seq::index::sample(&mut rng, e, k.min(e))
        .into_iter()
        .map(|i| i as i64)
        .collect();
    keep.sort_unstable();
    keep
}

/// Keeps the columns `keep` of a router `[d, E]` -> `[d, K]`.
pub fn slice_router(w_router_de: &Tensor, keep: &[i64]) -> Result<Tensor, HfError> {
    let idx = Tensor::from_slice(keep).to_device(w_router_de.device());
    w_router_de.f_index_select(1, &idx).map_err(failed)
}

/// Keeps the rows `keep` of a per-expert tensor `[E, ...]` (stacked weights, expert bias).
pub fn slice_experts(t_e: &Tensor, keep: &[i64]) -> Result<Tensor, HfError> {
    let idx = Tensor::from_slice(keep).to_device(t_e.device());
    t_e.f_index_select(0, &idx).map_err(failed)
}

/// The MoE layer prefix (`layers.3.moe`) of a tensor name, if it belongs to one.
fn moe_prefix(name: &str) -> Option<&str> {
    let i = name.find(".moe.")?;
    Some(&name[..i + 4])
}

/// The slimmed run's config, with one note per setting changed. Argument errors name the
/// flag.
pub fn slim_config(
    src: &ExperimentConfig,
    opts: &SlimOptions,
    source: &Path,
) -> Result<(ExperimentConfig, Vec<String>), HfError> {
    let (k, e) = (opts.experts, src.moe.num_experts);
    if e <= 1 {
        return Err(HfError::Input(format!(
            "--checkpoint {}: the model has no routed experts to slim (moe.num_experts {e})",
            source.display()
        )));
    }
    if k < 1 || k > e {
        return Err(HfError::Input(format!(
            "--experts ({k}) must be in 1..={e} (the checkpoint's moe.num_experts)"
        )));
    }
    if k == 1 && src.moe.num_shared_experts == 0 {
        return Err(HfError::Input(
            "--experts (1) without shared experts would make every MoE layer a dense FFN of \
             another shape; keep at least 2"
                .into(),
        ));
    }
    if opts.criterion == ExpertCriterion::Frequency && opts.calib_batches == 0 {
        return Err(HfError::Input(
            "--calib-batches (0) must be at least 1 for --expert-criterion frequency".into(),
        ));
    }
    let mut cfg = src.clone();
    let mut notes = Vec::new();
    cfg.moe.num_experts = k;
    if cfg.moe.top_k > k {
        notes.push(format!("moe.top_k {} clamped to {k}", cfg.moe.top_k));
        cfg.moe.top_k = k;
    }
    if cfg.moe.num_groups.is_some() || cfg.moe.group_topk.is_some() {
        notes.push("group-limited routing turned off (moe.num_groups, moe.group_topk)".into());
        cfg.moe.num_groups = None;
        cfg.moe.group_topk = None;
    }
    if cfg.parallel.ep_size <= 0 || k % cfg.parallel.ep_size != 0 {
        notes.push(format!(
            "parallel.ep_size {} does not divide {k} experts: set to 1",
            cfg.parallel.ep_size
        ));
        cfg.parallel.ep_size = 1;
    }
    Ok((cfg, notes))
}

/// Routing counts per MoE layer prefix (`layers.3.moe`) over `batches` training batches of
/// each of the `world` ranks of the source run: the model's own `topk_load_e`, summed.
pub fn routing_frequency(
    model: &TransformerLm,
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    world: i64,
    batches: u64,
) -> Result<BTreeMap<String, Vec<f64>>, HfError> {
    let _guard = tch::no_grad_guard();
    let ctx = LmForward {
        train: false,
        compute_kind: compute_kind(&cfg.trainer.precision),
        step: 0,
    };
    let mut sums: BTreeMap<i64, Tensor> = BTreeMap::new();
    for i in 0..batches {
        for rank in 0..world {
            let spec = SamplerSpec {
                seed: cfg.run.seed,
                seq_len: cfg.data.seq_len,
                batch_size: cfg.trainer.batch_size,
                world_size: world,
                rank,
                grad_accum: 1,
            };
            for b in dataset.batches(Split::Train, i, &spec).map_err(failed)? {
                let out = model.forward(&b.inputs_bt, &ctx).map_err(failed)?;
                for (layer, stats) in out.moe {
                    let load = stats.topk_load_e.f_to_kind(Kind::Double).map_err(failed)?;
                    let sum = match sums.remove(&layer) {
                        Some(s) => s.f_add(&load).map_err(failed)?,
                        None => load,
                    };
                    sums.insert(layer, sum);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for (layer, t) in sums {
        let v = Vec::<f64>::try_from(&t).map_err(failed)?;
        out.insert(format!("layers.{layer}.moe"), v);
    }
    Ok(out)
}

/// Slims the checkpoint `ckpt` (any EP size) into the new run directory `run_dir`.
pub fn slim(
    ckpt: &Path,
    run_dir: &Path,
    opts: &SlimOptions,
    render_yaml: &dyn Fn(&ExperimentConfig) -> Result<String, String>,
) -> Result<SurgeryReport, HfError> {
    let reader = CheckpointReader::open(ckpt).map_err(|e| HfError::Input(e.to_string()))?;
    let src = checkpoint_config(&reader)?;
    let (mut cfg, mut notes) = slim_config(&src, opts, ckpt)?;
    let staged = StagedRun::new(run_dir, &mut cfg)?;
    let world = reader.manifest().world_size.max(1);
    let data = load_val_data(&src);
    let mut single = src.clone();
    single.parallel.ep_size = 1;

    // The source model is needed for calibration and the loss before.
    let source_model = match (&data, opts.criterion) {
        (Ok(_), _) => Some(
            load_single(&single, ckpt, Device::Cpu)
                .map_err(|e| HfError::Input(e.to_string()))?
                .0,
        ),
        (Err(e), ExpertCriterion::Frequency) => {
            return Err(HfError::Input(format!(
                "--expert-criterion frequency needs the run's data for calibration: {e}"
            )))
        }
        (Err(_), ExpertCriterion::Random) => None,
    };
    let freq = match (opts.criterion, &source_model, &data) {
        (ExpertCriterion::Frequency, Some(m), Ok(ds)) => {
            routing_frequency(m, &single, ds, world, opts.calib_batches)?
        }
        _ => BTreeMap::new(),
    };

    let (e, k) = (src.moe.num_experts as usize, opts.experts as usize);
    let mut keeps: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut keep_for = |prefix: &str| -> Result<Vec<i64>, HfError> {
        if let Some(k) = keeps.get(prefix) {
            return Ok(k.clone());
        }
        let keep = match opts.criterion {
            ExpertCriterion::Random => {
                let layer_seed = prefix.bytes().fold(src.run.seed ^ 0x5eed_51a1, |h, b| {
                    h.wrapping_mul(0x100_0000_01b3) ^ u64::from(b)
                });
                keep_random(e, k, layer_seed)
            }
            ExpertCriterion::Frequency => {
                let counts = freq
                    .get(prefix)
                    .ok_or_else(|| failed(format!("calibration saw no MoE layer {prefix}")))?;
                keep_by_frequency(counts, k)
            }
        };
        keeps.insert(prefix.to_string(), keep.clone());
        Ok(keep)
    };

    let model = TransformerLm::new(
        &cfg.model,
        &cfg.moe,
        &ExpertParallel::single(),
        cfg.run.seed,
        Device::Cpu,
    )
    .map_err(|e| HfError::Input(e.to_string()))?;
    let read = |name: &str| reader.read(name).map_err(|e| HfError::Input(e.to_string()));
    tch::no_grad(|| -> Result<(), HfError> {
        let buffers = model.buffers();
        let targets = model
            .params()
            .into_iter()
            .map(|p| (p.name, p.tensor, matches!(p.kind, ParamKind::Expert { .. })))
            .chain(buffers.into_iter().map(|(n, t)| (n, t, false)));
        for (name, dst, is_expert) in targets {
            let prefix = moe_prefix(&name).map(str::to_string);
            let value = match prefix {
                Some(p) if is_expert => {
                    let keep = keep_for(&p)?;
                    let slices = keep
                        .iter()
                        .map(|&g| read(&expert_tensor_name(&name, g, None)))
                        .collect::<Result<Vec<_>, _>>()?;
                    Tensor::f_stack(&slices, 0).map_err(failed)?
                }
                Some(p) if name.ends_with(".w_router") => {
                    slice_router(&read(&name)?, &keep_for(&p)?)?
                }
                Some(p) if name.ends_with(".expert_bias") => {
                    slice_experts(&read(&name)?, &keep_for(&p)?)?
                }
                _ => read(&name)?,
            };
            if value.size() != dst.size() {
                return Err(HfError::Input(format!(
                    "{}: tensor {name} gives shape {:?}, the slimmed model needs {:?}",
                    ckpt.display(),
                    value.size(),
                    dst.size()
                )));
            }
            let mut dst = dst;
            dst.f_copy_(&value).map_err(failed)?;
        }
        Ok(())
    })?;

    let (mut before, mut after) = (None, None);
    match (&data, &source_model) {
        (Ok(ds), Some(m)) => {
            before = Some(val_loss(m, &single, ds, world)?);
            after = Some(val_loss(&model, &cfg, ds, world)?);
        }
        (Err(e), _) => notes.push(format!("validation loss not measured: {e}")),
        _ => {}
    }
    let criterion = match opts.criterion {
        ExpertCriterion::Random => "random".to_string(),
        ExpertCriterion::Frequency => {
            format!("frequency --calib-batches {}", opts.calib_batches)
        }
    };
    let report = SurgeryReport {
        command: format!("slim --experts {k} --expert-criterion {criterion}"),
        source: std::path::absolute(ckpt).unwrap_or_else(|_| ckpt.to_path_buf()),
        run_dir: staged.run_dir().to_path_buf(),
        checkpoint: Default::default(),
        before: ModelSize::of(&src, src.parallel.ep_size)?,
        after: ModelSize::of(&cfg, cfg.parallel.ep_size)?,
        val_loss_before: before,
        val_loss_after: after,
        notes,
        kept_experts: keeps,
    };
    let extra = serde_json::json!({
        "data_step": 0,
        "seed": cfg.run.seed,
        "slimmed_from": ckpt.display().to_string(),
    });
    staged.finish(&cfg, &model, extra, render_yaml, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By hand: counts [5, 1, 7, 1, 0, 7] keep the two 7s (ids 2, 5) then the 5 (id 0);
    /// ties at 1 go to the lower id.
    #[test]
    fn frequency_keeps_the_most_used() {
        let c = [5., 1., 7., 1., 0., 7.];
        assert_eq!(keep_by_frequency(&c, 3), [0, 2, 5]);
        assert_eq!(keep_by_frequency(&c, 4), [0, 1, 2, 5]);
        assert_eq!(keep_by_frequency(&c, 6), [0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn random_is_seeded_distinct_and_sorted() {
        let a = keep_random(8, 4, 7);
        assert_eq!(a, keep_random(8, 4, 7));
        assert_eq!(a.len(), 4);
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.iter().all(|&i| (0..8).contains(&i)));
        assert_eq!(keep_random(8, 8, 1), (0..8).collect::<Vec<_>>());
    }

    /// A router [d=2, E=4] with entries 10*row + col, kept columns [1, 3]: by hand
    /// [[1, 3], [11, 13]]; stacked experts [4, 1] -> rows 1 and 3. Exact copies.
    #[test]
    fn slices_by_hand() {
        let r = Tensor::from_slice(&[0f32, 1., 2., 3., 10., 11., 12., 13.]).reshape([2, 4]);
        let s = slice_router(&r, &[1, 3]).unwrap();
        assert_eq!(s.size(), [2, 2]);
        assert_eq!(
            Vec::<f32>::try_from(s.reshape([-1])).unwrap(),
            [1., 3., 11., 13.]
        );
        let x = Tensor::from_slice(&[5f32, 6., 7., 8.]).reshape([4, 1]);
        let s = slice_experts(&x, &[1, 3]).unwrap();
        assert_eq!(Vec::<f32>::try_from(s.reshape([-1])).unwrap(), [6., 8.]);
        assert_eq!(
            moe_prefix("layers.3.moe.experts.w_gate"),
            Some("layers.3.moe")
        );
        assert_eq!(moe_prefix("layers.3.attn.wq"), None);
    }

    #[test]
    fn bad_arguments_name_their_flag() {
        let src = ExperimentConfig::default(); // 8 experts, top-2
        let p = Path::new("ckpt");
        let opts = |k, c| SlimOptions {
            experts: k,
            criterion: c,
            calib_batches: 4,
        };
        let msg = |o| match slim_config(&src, &o, p) {
            Err(HfError::Input(m)) => m,
            other => panic!("expected an input error, got {other:?}"),
        };
        assert!(msg(opts(9, ExpertCriterion::Random)).contains("--experts (9)"));
        assert!(msg(opts(0, ExpertCriterion::Random)).contains("--experts (0)"));
        let mut no_calib = opts(4, ExpertCriterion::Frequency);
        no_calib.calib_batches = 0;
        assert!(msg(no_calib).contains("--calib-batches (0)"));
        let (cfg, notes) = slim_config(&src, &opts(2, ExpertCriterion::Random), p).unwrap();
        assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (2, 2));
        let mut k3 = src.clone();
        k3.moe.top_k = 3;
        let (cfg, notes3) = slim_config(&k3, &opts(2, ExpertCriterion::Random), p).unwrap();
        assert_eq!(cfg.moe.top_k, 2);
        assert!(notes3
            .iter()
            .any(|n| n.contains("moe.top_k 3 clamped to 2")));
        assert!(notes.is_empty() || !notes[0].contains("top_k"));
    }
}
