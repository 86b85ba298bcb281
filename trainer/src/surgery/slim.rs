//! `moe slim`: compress a checkpoint along experts, depth and width, from one calibration
//! pass (issue 12, items 1 to 4). Each step is a pure function in its own module, tested on
//! tiny tensors against hand-computed results:
//!
//! - experts (`--experts K`): keep K routed experts per MoE layer by `--expert-criterion`
//!   `random`, `frequency` (top-k assignments) or `weighted` (summed routing weights; "Not All
//!   Experts are Equal", Lu et al. 2024, drops the experts the router uses least), optionally
//!   folding each dropped expert into a kept one (`--merge`, see [`super::merge`]). The router's
//!   columns, every expert tensor and the aux-loss-free bias are sliced with the same sorted
//!   list, so kept expert j of the new layer is old expert `keep[j]` with its own router
//!   column: a token's logits over the kept experts are unchanged. `top_k` is clamped to K;
//!   group-limited routing is turned off (its groups would no longer be equal).
//! - depth (`--drop-layers L` by Block Influence, or `--layers i,j`): see [`super::depth`].
//! - width (`--expert-hidden H`, `--ffn-hidden H`): see [`super::width`].
//!
//! Order: blocks are removed first, then experts are chosen (and merged), then each kept
//! expert's hidden units are chosen on the merged weights (activation norms of the kept
//! expert itself). Calibration ([`super::calib`]) is a no-grad forward of the source model
//! over `--calib-batches` training batches of every rank of the source run (or of `--data`),
//! so the statistics equal what the run's all-reduce over ranks would sum and do not depend
//! on the EP size the checkpoint was written at.

use super::calib::{calibrate, CalibPlan, Calibration, Share};
use super::depth::{kept_layers, lowest_influence, refit_patterns, source_name};
use super::merge::{merge_groups, merge_targets, weighted_mean};
use super::report::{CalibSummary, LayerRouting, ModelSize, SlimDetails, SurgeryReport};
use super::run_out::{failed, load_val_data, val_loss, StagedRun};
use super::width::{hidden_importance, keep_units, slice_swiglu};
use crate::checkpoint::{expert_tensor_name, CheckpointReader};
use crate::config::{DataSource, ExperimentConfig};
use crate::hf::export::checkpoint_config;
use crate::hf::HfError;
use crate::inference::load_single;
use moe_model::param::ParamKind;
use moe_model::transformer::TransformerLm;
use moe_model::ExpertParallel;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Which experts survive `--experts K`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertCriterion {
    /// K experts drawn uniformly per layer (seeded by `run.seed` and the layer).
    Random,
    /// The K experts with the most top-k assignments on the calibration batches.
    #[default]
    Frequency,
    /// The K experts with the largest summed routing weight on the calibration batches.
    Weighted,
}

impl ExpertCriterion {
    fn name(self) -> &'static str {
        match self {
            Self::Random => "random",
            Self::Frequency => "frequency",
            Self::Weighted => "weighted",
        }
    }
}

/// What to remove. At least one of `experts`, `drop_layers`, `layers`, `expert_hidden`,
/// `ffn_hidden`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SlimOptions {
    /// Experts kept per MoE layer (`--experts`).
    pub experts: Option<i64>,
    /// How they are chosen (`--expert-criterion`).
    pub criterion: ExpertCriterion,
    /// Fold each dropped expert into its most similar kept one (`--merge`).
    pub merge: bool,
    /// Blocks to remove by lowest Block Influence (`--drop-layers`).
    pub drop_layers: Option<i64>,
    /// Blocks to remove, by index (`--layers`).
    pub layers: Option<Vec<i64>>,
    /// Hidden units kept per routed expert (`--expert-hidden`).
    pub expert_hidden: Option<i64>,
    /// Hidden units kept per dense FFN (`--ffn-hidden`).
    pub ffn_hidden: Option<i64>,
    /// Calibration batches per source rank (`--calib-batches`).
    pub calib_batches: u64,
    /// Calibration data instead of the run's own (`--data`: a text file or a token
    /// directory).
    pub data: Option<PathBuf>,
}

impl SlimOptions {
    /// Whether any chosen step reads calibration statistics.
    pub fn needs_calibration(&self) -> bool {
        (self.experts.is_some() && self.criterion != ExpertCriterion::Random)
            || self.merge
            || self.drop_layers.is_some()
            || self.expert_hidden.is_some()
            || self.ffn_hidden.is_some()
    }

    /// The command line this stands for (the report's `command`).
    pub fn command(&self) -> String {
        let mut c = vec!["slim".to_string()];
        if let Some(k) = self.experts {
            c.push(format!(
                "--experts {k} --expert-criterion {}",
                self.criterion.name()
            ));
        }
        if self.merge {
            c.push("--merge".into());
        }
        if let Some(l) = self.drop_layers {
            c.push(format!("--drop-layers {l}"));
        }
        if let Some(l) = &self.layers {
            let l: Vec<String> = l.iter().map(i64::to_string).collect();
            c.push(format!("--layers {}", l.join(",")));
        }
        if let Some(h) = self.expert_hidden {
            c.push(format!("--expert-hidden {h}"));
        }
        if let Some(h) = self.ffn_hidden {
            c.push(format!("--ffn-hidden {h}"));
        }
        if self.needs_calibration() {
            c.push(format!("--calib-batches {}", self.calib_batches));
            if let Some(d) = &self.data {
                c.push(format!("--data {}", d.display()));
            }
        }
        c.join(" ")
    }
}

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

/// Whether block `i` of `cfg` has a dense FFN (the MTP block, index `num_layers`, included).
fn is_dense_block(cfg: &ExperimentConfig, i: i64) -> bool {
    let has_moe = cfg.moe.num_experts > 1 || cfg.moe.num_shared_experts > 0;
    !(has_moe && cfg.moe.is_moe_layer(i))
}

/// Checks the arguments against the source config; every error names its flag (exit 2).
pub fn validate_args(
    src: &ExperimentConfig,
    opts: &SlimOptions,
    source: &Path,
) -> Result<(), HfError> {
    let input = |m: String| Err(HfError::Input(m));
    let e = src.moe.num_experts;
    let n = src.model.num_layers;
    if opts.merge && opts.experts.is_none() {
        return input("--merge needs --experts K (which experts to fold the others into)".into());
    }
    if opts.experts.is_none()
        && opts.drop_layers.is_none()
        && opts.layers.is_none()
        && opts.expert_hidden.is_none()
        && opts.ffn_hidden.is_none()
    {
        return input(
            "nothing to slim: give --experts, --drop-layers, --layers, --expert-hidden or \
             --ffn-hidden"
                .into(),
        );
    }
    let has_moe = (0..n).any(|i| !is_dense_block(src, i));
    if let Some(k) = opts.experts {
        if e <= 1 || !has_moe {
            return input(format!(
                "--experts: --checkpoint {} has no routed experts to slim (moe.num_experts {e})",
                source.display()
            ));
        }
        if k < 1 || k > e {
            return input(format!(
                "--experts ({k}) must be in 1..={e} (the checkpoint's moe.num_experts)"
            ));
        }
        if k == 1 && src.moe.num_shared_experts == 0 {
            return input(
                "--experts (1) without shared experts would make every MoE layer a dense FFN \
                 of another shape; keep at least 2"
                    .into(),
            );
        }
    }
    if opts.drop_layers.is_some() && opts.layers.is_some() {
        return input("--drop-layers and --layers exclude each other: give one".into());
    }
    if let Some(l) = opts.drop_layers {
        if l < 1 || l >= n {
            return input(format!(
                "--drop-layers ({l}) must be in 1..={} (model.num_layers is {n}; dropping every \
                 block leaves no model)",
                n - 1
            ));
        }
    }
    if let Some(layers) = &opts.layers {
        let mut seen = std::collections::BTreeSet::new();
        for &i in layers {
            if !(0..n).contains(&i) {
                return input(format!(
                    "--layers: block {i} does not exist (model.num_layers is {n}: 0..={})",
                    n - 1
                ));
            }
            if !seen.insert(i) {
                return input(format!("--layers: block {i} is named twice"));
            }
        }
        if seen.is_empty() || seen.len() as i64 >= n {
            return input(format!(
                "--layers names {} of {n} blocks: keep at least one and drop at least one",
                seen.len()
            ));
        }
    }
    if let Some(h) = opts.expert_hidden {
        let full = src.moe.expert_hidden;
        if e <= 1 || !has_moe {
            return input(format!(
                "--expert-hidden: --checkpoint {} has no routed experts",
                source.display()
            ));
        }
        if h < 1 || h > full {
            return input(format!(
                "--expert-hidden ({h}) must be in 1..={full} (the checkpoint's moe.expert_hidden)"
            ));
        }
    }
    if let Some(h) = opts.ffn_hidden {
        let full = src.model.ffn_hidden;
        if !(0..n).any(|i| is_dense_block(src, i)) {
            return input(format!(
                "--ffn-hidden: --checkpoint {} has no dense FFN blocks",
                source.display()
            ));
        }
        if h < 1 || h > full {
            return input(format!(
                "--ffn-hidden ({h}) must be in 1..={full} (the checkpoint's model.ffn_hidden)"
            ));
        }
    }
    if opts.needs_calibration() && opts.calib_batches == 0 {
        return input(format!(
            "--calib-batches (0) must be at least 1 for {}",
            opts.command()
        ));
    }
    Ok(())
}

/// The slimmed run's config without the blocks `dropped`, with one note per setting changed.
/// Call [`validate_args`] first.
pub fn slim_config(
    src: &ExperimentConfig,
    opts: &SlimOptions,
    dropped: &[i64],
) -> Result<(ExperimentConfig, Vec<String>), HfError> {
    let mut cfg = src.clone();
    let mut notes = Vec::new();
    if let Some(k) = opts.experts {
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
    }
    if let Some(h) = opts.expert_hidden {
        if cfg.moe.num_shared_experts > 0 && cfg.moe.shared_expert_hidden.is_none() {
            notes.push(format!(
                "moe.shared_expert_hidden set to {} (it followed moe.expert_hidden)",
                cfg.moe.expert_hidden
            ));
            cfg.moe.shared_expert_hidden = Some(cfg.moe.expert_hidden);
        }
        cfg.moe.expert_hidden = h;
    }
    if let Some(h) = opts.ffn_hidden {
        cfg.model.ffn_hidden = h;
    }
    if !dropped.is_empty() {
        let kept = kept_layers(src.model.num_layers, dropped);
        let flag = if opts.layers.is_some() {
            "--layers"
        } else {
            "--drop-layers"
        };
        let (fd, every) = (cfg.moe.first_dense_layers, cfg.moe.moe_every);
        refit_patterns(&mut cfg.model, &mut cfg.moe, &kept, flag)?;
        if (fd, every) != (cfg.moe.first_dense_layers, cfg.moe.moe_every) {
            notes.push(format!(
                "moe.first_dense_layers / moe.moe_every {fd} / {every} -> {} / {}",
                cfg.moe.first_dense_layers, cfg.moe.moe_every
            ));
        }
    }
    Ok((cfg, notes))
}

/// `src` reading its data from `path` instead (`--data`): a directory is a token directory,
/// a file is text.
fn with_data(src: &ExperimentConfig, path: &Path) -> ExperimentConfig {
    let mut c = src.clone();
    c.data.source = if path.is_dir() {
        DataSource::Tokens
    } else {
        DataSource::Text
    };
    c.data.path = Some(path.to_path_buf());
    c
}

/// Per-layer choices, made once per source MoE layer and cached.
struct Planner<'a> {
    src: &'a ExperimentConfig,
    opts: &'a SlimOptions,
    calib: Option<&'a Calibration>,
    reader: &'a CheckpointReader,
    details: SlimDetails,
    notes: Vec<String>,
}

impl Planner<'_> {
    fn read(&self, name: &str) -> Result<Tensor, HfError> {
        self.reader
            .read(name)
            .map_err(|e| HfError::Input(e.to_string()))
    }

    /// A calibration statistic of `prefix`, or `None` when calibration did not see the
    /// layer (the multi-token prediction block) or did not run.
    fn stat<T>(&self, f: impl Fn(&Calibration) -> Result<T, HfError>) -> Option<T> {
        self.calib.and_then(|c| f(c).ok())
    }

    /// The kept experts (old global ids, sorted) of the source MoE layer `old` (`layers.3.moe`).
    fn keep(&mut self, old: &str) -> Vec<i64> {
        let e = self.src.moe.num_experts as usize;
        let Some(k) = self.opts.experts else {
            return (0..e as i64).collect();
        };
        let random = |src: &ExperimentConfig| {
            let layer_seed = old.bytes().fold(src.run.seed ^ 0x5eed_51a1, |h, b| {
                h.wrapping_mul(0x100_0000_01b3) ^ u64::from(b)
            });
            keep_random(e, k as usize, layer_seed)
        };
        let counts = match self.opts.criterion {
            ExpertCriterion::Random => None,
            ExpertCriterion::Frequency => self.stat(|c| c.frequency(old)),
            ExpertCriterion::Weighted => self.stat(|c| c.weighted_frequency(old)),
        };
        match (self.opts.criterion, counts) {
            (ExpertCriterion::Random, _) => random(self.src),
            (_, Some(c)) => keep_by_frequency(&c, k as usize),
            (_, None) => {
                self.notes.push(format!(
                    "{old}: not seen by calibration (multi-token prediction block): experts \
                     kept at random"
                ));
                random(self.src)
            }
        }
    }

    /// The new layer `new`'s stacked `(w_gate, w_up, w_down)` from source layer `old`:
    /// kept experts, merged and width-sliced as asked.
    fn experts(&mut self, old: &str, new: &str) -> Result<[Tensor; 3], HfError> {
        let keep = self.keep(old);
        let e = self.src.moe.num_experts;
        let freq = self
            .stat(|c| c.frequency(old))
            .unwrap_or_else(|| vec![0.0; e as usize]);
        let groups: BTreeMap<i64, Vec<i64>> = if self.opts.merge {
            let targets = merge_targets(&self.read(&format!("{old}.w_router"))?, &keep)?;
            let groups = merge_groups(&keep, &targets);
            self.details.merged_into.insert(new.to_string(), targets);
            groups
        } else {
            keep.iter().map(|&g| (g, vec![g])).collect()
        };
        let acts = self.stat(|c| c.activation_norms(old));
        if self.opts.expert_hidden.is_some() && acts.is_none() {
            self.notes.push(format!(
                "{old}: not seen by calibration: expert hidden units ranked by weight norm"
            ));
        }
        let mut stacks: [Vec<Tensor>; 3] = Default::default();
        for &g in &keep {
            let group = groups.get(&g).cloned().unwrap_or_else(|| vec![g]);
            let mut w = Vec::with_capacity(3);
            for p in ["w_gate", "w_up", "w_down"] {
                let name = format!("{old}.experts.{p}");
                let parts = group
                    .iter()
                    .map(|&x| {
                        Ok((
                            self.read(&expert_tensor_name(&name, x, None))?,
                            freq[x as usize],
                        ))
                    })
                    .collect::<Result<Vec<_>, HfError>>()?;
                w.push(if parts.len() == 1 {
                    parts
                        .into_iter()
                        .next()
                        .map(|p| p.0)
                        .ok_or_else(|| failed("no expert"))?
                } else {
                    weighted_mean(&parts)?
                });
            }
            let (mut wg, mut wu, mut wd) = (w.remove(0), w.remove(0), w.remove(0));
            if let Some(h) = self.opts.expert_hidden {
                let act = acts
                    .as_ref()
                    .and_then(|a| a.get(g as usize).cloned())
                    .unwrap_or_else(|| vec![0.0; self.src.moe.expert_hidden as usize]);
                let units = keep_units(&hidden_importance(&act, &wd)?, h as usize);
                (wg, wu, wd) = slice_swiglu(&wg, &wu, &wd, &units)?;
            }
            stacks[0].push(wg);
            stacks[1].push(wu);
            stacks[2].push(wd);
        }
        self.details.kept_experts.insert(new.to_string(), keep);
        let [a, b, c] = stacks;
        Ok([
            Tensor::f_stack(&a, 0).map_err(failed)?,
            Tensor::f_stack(&b, 0).map_err(failed)?,
            Tensor::f_stack(&c, 0).map_err(failed)?,
        ])
    }

    /// A dense FFN `old` (`layers.0.ffn`) sliced to `--ffn-hidden` units.
    fn dense_ffn(&mut self, old: &str, h: i64) -> Result<[Tensor; 3], HfError> {
        let wg = self.read(&format!("{old}.w_gate"))?;
        let wu = self.read(&format!("{old}.w_up"))?;
        let wd = self.read(&format!("{old}.w_down"))?;
        let act = match self.stat(|c| c.activation_norms(old)) {
            Some(mut a) if !a.is_empty() => a.swap_remove(0),
            _ => {
                self.notes.push(format!(
                    "{old}: not seen by calibration: hidden units ranked by weight norm"
                ));
                vec![0.0; self.src.model.ffn_hidden as usize]
            }
        };
        let units = keep_units(&hidden_importance(&act, &wd)?, h as usize);
        let (a, b, c) = slice_swiglu(&wg, &wu, &wd, &units)?;
        Ok([a, b, c])
    }
}

/// The calibration statistics as the report shows them.
fn summarize(calib: &Calibration, src: &ExperimentConfig, batches: u64) -> CalibSummary {
    let mut s = CalibSummary {
        batches,
        tokens: calib.tokens,
        ..Default::default()
    };
    if let Ok(bi) = calib.block_influence() {
        s.block_influence = bi
            .into_iter()
            .map(|(i, b)| (format!("layers.{i}"), b))
            .collect();
    }
    for i in 0..src.model.num_layers {
        let p = format!("layers.{i}.moe");
        if let (Ok(f), Ok(w), Ok(m)) = (
            calib.frequency(&p),
            calib.weighted_frequency(&p),
            calib.mean_weight(&p),
        ) {
            s.routing.insert(
                p,
                LayerRouting {
                    frequency: f,
                    weighted_frequency: w,
                    mean_weight: m,
                },
            );
        }
    }
    s
}

/// Slims the checkpoint `ckpt` (any EP size) into the new run directory `run_dir`, in one
/// process.
pub fn slim(
    ckpt: &Path,
    run_dir: &Path,
    opts: &SlimOptions,
    render_yaml: &dyn Fn(&ExperimentConfig) -> Result<String, String>,
) -> Result<SurgeryReport, HfError> {
    slim_shared(ckpt, run_dir, opts, render_yaml, None)?
        .ok_or_else(|| failed("a single-process slim wrote nothing"))
}

/// [`slim`] as one of several processes (`share`): each reads its round-robin share of the
/// calibration batches, the statistics are summed over all processes, and process 0 alone
/// stages, writes and reports (`Some`); the others return `None` after the sum. Every
/// process holds the whole source model (loaded as one EP=1 rank), so the output does not
/// depend on the number of processes or on the checkpoint's EP size.
pub fn slim_shared(
    ckpt: &Path,
    run_dir: &Path,
    opts: &SlimOptions,
    render_yaml: &dyn Fn(&ExperimentConfig) -> Result<String, String>,
    share: Option<Share>,
) -> Result<Option<SurgeryReport>, HfError> {
    let (rank, size) = share.as_ref().map_or((0, 1), |s| (s.rank, s.size.max(1)));
    let writer = rank == 0;
    let reader = CheckpointReader::open(ckpt).map_err(|e| HfError::Input(e.to_string()))?;
    let src = checkpoint_config(&reader)?;
    validate_args(&src, opts, ckpt)?;
    // Stage with the explicitly named blocks so a bad --out or layer pattern fails before
    // the calibration pass; the final config (blocks by influence) is set below.
    let explicit: Vec<i64> = opts.layers.clone().unwrap_or_default();
    let (mut prelim, _) = slim_config(&src, opts, &explicit)?;
    let staged = match writer {
        true => Some(StagedRun::new(run_dir, &mut prelim)?),
        false => None,
    };
    let world = reader.manifest().world_size.max(1);
    if opts.needs_calibration() && (opts.calib_batches as i64) * world < size {
        return Err(HfError::Input(format!(
            "--calib-batches ({}) x the checkpoint's {world} rank(s) gives fewer batches than \
             the {size} processes: raise --calib-batches or start fewer processes",
            opts.calib_batches
        )));
    }
    let mut single = src.clone();
    single.parallel.ep_size = 1;
    let data = load_val_data(&src);
    let calib_cfg = match &opts.data {
        Some(p) => with_data(&single, p),
        None => single.clone(),
    };
    let calib_data = match (&opts.data, opts.needs_calibration()) {
        (_, false) => None,
        (Some(p), true) => Some(
            load_val_data(&calib_cfg)
                .map_err(|e| HfError::Input(format!("--data {}: {e}", p.display())))?,
        ),
        (None, true) => Some(data.clone().map_err(|e| {
            HfError::Input(format!(
                "--calib-batches: calibration needs the run's data (or --data): {e}"
            ))
        })?),
    };
    let source_model = if (writer && data.is_ok()) || calib_data.is_some() {
        Some(
            load_single(&single, ckpt, Device::Cpu)
                .map_err(|e| HfError::Input(e.to_string()))?
                .0,
        )
    } else {
        None
    };
    let mut calib = match (&calib_data, &source_model) {
        (Some(ds), Some(m)) => Some(calibrate(
            m,
            &calib_cfg,
            ds,
            &CalibPlan::share(opts.calib_batches, world, rank, size),
        )?),
        _ => None,
    };
    if let (Some(c), Some(share)) = (calib.as_mut(), share) {
        c.all_reduce(share.sum_f64)?;
    }
    let Some(staged) = staged else {
        return Ok(None);
    };

    let dropped: Vec<i64> = match (&opts.layers, opts.drop_layers, &calib) {
        (Some(l), _, _) => {
            let mut l = l.clone();
            l.sort_unstable();
            l
        }
        (None, Some(l), Some(c)) => lowest_influence(&c.block_influence()?, l as usize),
        _ => Vec::new(),
    };
    let (mut cfg, notes) = slim_config(&src, opts, &dropped)?;
    cfg.run = prelim.run.clone();
    cfg.checkpoint.dir = None;
    let kept = kept_layers(src.model.num_layers, &dropped);
    let old_layers = src.model.num_layers;

    let model = TransformerLm::new(
        &cfg.model,
        &cfg.moe,
        &ExpertParallel::single(),
        cfg.run.seed,
        Device::Cpu,
    )
    .map_err(|e| HfError::Input(e.to_string()))?;
    let mut plan = Planner {
        src: &src,
        opts,
        calib: calib.as_ref(),
        reader: &reader,
        details: SlimDetails {
            dropped_layers: dropped.clone(),
            ..Default::default()
        },
        notes,
    };
    tch::no_grad(|| -> Result<(), HfError> {
        let buffers = model.buffers();
        let targets = model
            .params()
            .into_iter()
            .map(|p| (p.name, p.tensor, matches!(p.kind, ParamKind::Expert { .. })))
            .chain(buffers.into_iter().map(|(n, t)| (n, t, false)));
        // A layer's three expert (or FFN) tensors are made together, then handed out by name.
        let mut made: HashMap<String, Tensor> = HashMap::new();
        for (name, dst, is_expert) in targets {
            let src_name = source_name(&name, &kept, old_layers);
            let value = if let Some(v) = made.remove(&name) {
                v
            } else {
                let new_prefix = moe_prefix(&name).map(str::to_string);
                let old_prefix = moe_prefix(&src_name).map(str::to_string);
                let ffn = name
                    .rsplit_once('.')
                    .filter(|(head, _)| head.ends_with(".ffn"))
                    .map(|(head, _)| head.to_string());
                match (new_prefix, old_prefix, ffn) {
                    (Some(np), Some(op), _) if is_expert => {
                        let ts = plan.experts(&op, &np)?;
                        let mut value = None;
                        for (p, t) in ["w_gate", "w_up", "w_down"].into_iter().zip(ts) {
                            let n = format!("{np}.experts.{p}");
                            if n == name {
                                value = Some(t);
                            } else {
                                made.insert(n, t);
                            }
                        }
                        value.ok_or_else(|| failed(format!("unexpected expert tensor {name}")))?
                    }
                    (Some(_), Some(op), _) if name.ends_with(".w_router") => {
                        let w = plan.read(&src_name)?;
                        match opts.experts {
                            Some(_) => slice_router(&w, &plan.keep(&op))?,
                            None => w,
                        }
                    }
                    (Some(_), Some(op), _) if name.ends_with(".expert_bias") => {
                        let b = plan.read(&src_name)?;
                        match opts.experts {
                            Some(_) => slice_experts(&b, &plan.keep(&op))?,
                            None => b,
                        }
                    }
                    (_, _, Some(new_ffn)) if opts.ffn_hidden.is_some() => {
                        let old_ffn = source_name(&new_ffn, &kept, old_layers);
                        let h = opts.ffn_hidden.unwrap_or(cfg.model.ffn_hidden);
                        let ts = plan.dense_ffn(&old_ffn, h)?;
                        let mut value = None;
                        for (p, t) in ["w_gate", "w_up", "w_down"].into_iter().zip(ts) {
                            let n = format!("{new_ffn}.{p}");
                            if n == name {
                                value = Some(t);
                            } else {
                                made.insert(n, t);
                            }
                        }
                        value.ok_or_else(|| failed(format!("unexpected FFN tensor {name}")))?
                    }
                    _ => plan.read(&src_name)?,
                }
            };
            if value.size() != dst.size() {
                return Err(HfError::Input(format!(
                    "{}: tensor {src_name} gives shape {:?}, the slimmed model's {name} needs \
                     {:?}",
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
    let mut notes = std::mem::take(&mut plan.notes);
    notes.dedup();
    match (&data, &source_model) {
        (Ok(ds), Some(m)) => {
            before = Some(val_loss(m, &single, ds, world)?);
            after = Some(val_loss(&model, &cfg, ds, world)?);
        }
        (Err(e), _) => notes.push(format!("validation loss not measured: {e}")),
        _ => {}
    }
    let mut details = std::mem::take(&mut plan.details);
    details.calibration = calib
        .as_ref()
        .map(|c| summarize(c, &src, opts.calib_batches));
    let report = SurgeryReport {
        command: opts.command(),
        source: std::path::absolute(ckpt).unwrap_or_else(|_| ckpt.to_path_buf()),
        run_dir: staged.run_dir().to_path_buf(),
        checkpoint: Default::default(),
        before: ModelSize::of(&src, src.parallel.ep_size)?,
        after: ModelSize::of(&cfg, cfg.parallel.ep_size)?,
        val_loss_before: before,
        val_loss_after: after,
        notes,
        slim: details,
    };
    let extra = serde_json::json!({
        "data_step": 0,
        "seed": cfg.run.seed,
        "slimmed_from": ckpt.display().to_string(),
    });
    staged
        .finish(&cfg, &model, extra, render_yaml, report)
        .map(Some)
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
        let mut src = ExperimentConfig::default(); // 8 experts, top-2
        src.model.num_layers = 4;
        let p = Path::new("ckpt");
        let base = SlimOptions {
            calib_batches: 4,
            ..Default::default()
        };
        let msg = |o: SlimOptions| match validate_args(&src, &o, p) {
            Err(HfError::Input(m)) => m,
            other => panic!("expected an input error, got {other:?}"),
        };
        let experts = |k| SlimOptions {
            experts: Some(k),
            criterion: ExpertCriterion::Random,
            ..base.clone()
        };
        assert!(msg(experts(9)).contains("--experts (9)"));
        assert!(msg(experts(0)).contains("--experts (0)"));
        assert!(msg(base.clone()).contains("nothing to slim"));
        let no_calib = SlimOptions {
            criterion: ExpertCriterion::Weighted,
            calib_batches: 0,
            ..experts(4)
        };
        assert!(msg(no_calib).contains("--calib-batches (0)"));
        let merge_alone = SlimOptions {
            merge: true,
            ..base.clone()
        };
        assert!(msg(merge_alone).starts_with("--merge"));
        let drop_all = SlimOptions {
            drop_layers: Some(4),
            ..base.clone()
        };
        assert!(msg(drop_all).starts_with("--drop-layers (4)"));
        let name_all = SlimOptions {
            layers: Some(vec![0, 1, 2, 3]),
            ..base.clone()
        };
        assert!(msg(name_all).starts_with("--layers"));
        let wide = SlimOptions {
            expert_hidden: Some(src.moe.expert_hidden + 1),
            ..base.clone()
        };
        assert!(msg(wide).starts_with(&format!("--expert-hidden ({})", src.moe.expert_hidden + 1)));
        let ffn = SlimOptions {
            ffn_hidden: Some(8),
            ..base.clone()
        };
        assert!(msg(ffn).starts_with("--ffn-hidden"), "every block is MoE");

        validate_args(&src, &experts(2), p).unwrap();
        let (cfg, notes) = slim_config(&src, &experts(2), &[]).unwrap();
        assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (2, 2));
        assert!(notes.iter().all(|n| !n.contains("top_k")));
        let mut k3 = src.clone();
        k3.moe.top_k = 3;
        let (cfg, notes3) = slim_config(&k3, &experts(2), &[]).unwrap();
        assert_eq!(cfg.moe.top_k, 2);
        assert!(notes3
            .iter()
            .any(|n| n.contains("moe.top_k 3 clamped to 2")));
        let both = SlimOptions {
            expert_hidden: Some(16),
            layers: Some(vec![1]),
            ..base
        };
        let (cfg, _) = slim_config(&src, &both, &[1]).unwrap();
        assert_eq!((cfg.model.num_layers, cfg.moe.expert_hidden), (3, 16));
    }
}
