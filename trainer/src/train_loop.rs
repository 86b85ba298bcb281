//! The training loop of one rank.
//!
//! Every rank runs this same function (threads in debug mode, processes under mpirun). Per
//! step: forward + backward over `grad_accum` micro-batches, one small all-reduce of the step's
//! statistics (losses, drop counts, "this rank saw a non-finite value", "this rank was asked
//! to stop"), gradient sync, global-norm clipping, AdamW, the aux-loss-free bias update, then
//! logging, eval and checkpoints. Decisions that must be collective (skip a bad step, stop on
//! a signal) come from the all-reduced statistics, so every rank takes the same branch and
//! none is left waiting in a collective.

use crate::checkpoint::{load_for_rank, Checkpointer, ExpertSlot, Snapshot};
use crate::config::ExperimentConfig;
use crate::data::{self, Batch, Dataset, Prefetcher};
use crate::grad_sync::{clip_grad_norm, sync_gradients};
use crate::metrics::{EvalRecord, MetricsWriter, TrainRecord};
use crate::optim::AdamW;
use crate::progress::{Progress, ProgressInfo};
use crate::schedule::lr_at;
use crate::tensorboard::TbWriter;
use crate::{Result, TrainError};
use moe_comm::{host_read, lock, Placement, ProcessGroups};
use moe_model::moe_layer::MoeStats;
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::ExpertParallel;
use moe_model::Param;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// How one rank's run is started.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Single-device debug mode: check the routing invariants after every step and print
    /// per-layer router statistics.
    pub debug: bool,
    /// Checkpoint directory to resume from (already resolved from `auto`).
    pub resume: Option<PathBuf>,
    /// Checkpoint directory whose weights (and buffers) start a fresh run: step 0, a new
    /// optimizer (fine-tuning). Exclusive with `resume`.
    pub init_from: Option<PathBuf>,
    /// Set by SIGINT/SIGTERM: finish the step, checkpoint, exit cleanly.
    pub stop: Arc<AtomicBool>,
    /// Capacity is computed per group of N/G tokens. 1 in real runs; the single-process
    /// reference of an EP=P run uses P, reproducing each rank's per-rank capacity. Set on the
    /// model once, when it is built ([`ExpertParallel::with_capacity_groups`]).
    pub capacity_groups: i64,
    /// Print nothing (tests).
    pub quiet: bool,
    /// Progress lines redrawn in place (`Some(true)`) or one per log step (`Some(false)`);
    /// `None` decides by whether stdout is a terminal.
    pub live_progress: Option<bool>,
    /// The resolved config as YAML (the launcher's rendering), written to
    /// `<out_dir>/config.yaml` by world rank 0 only once the data has loaded, so that a run
    /// failing on its data or checkpoint leaves nothing in `out_dir`.
    pub config_yaml: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            debug: false,
            resume: None,
            init_from: None,
            stop: Arc::new(AtomicBool::new(false)),
            capacity_groups: 1,
            quiet: false,
            live_progress: None,
            config_yaml: None,
        }
    }
}

/// What a rank's run produced (rank 0's view of the global metrics).
#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    /// Per-step global metrics, one record per optimizer step run in this invocation.
    pub records: Vec<TrainRecord>,
    /// Validation records.
    pub evals: Vec<EvalRecord>,
    /// Steps skipped because of non-finite values.
    pub bad_steps: u64,
    /// True when a stop signal ended the run before `max_steps`.
    pub interrupted: bool,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Option<PathBuf>,
}

/// Statistics of one step that are reduced over all ranks in a single all-reduce, read to
/// the host once per step. Layout of the f64 vector: see [`LocalStats::to_tensor`].
#[derive(Debug, Clone, Default)]
struct StepStats {
    lm_loss: f64,
    aux_loss: f64,
    z_loss: f64,
    kept: f64,
    dropped: f64,
    non_finite: f64,
    stop: f64,
    /// max/mean of the global kept load in the worst MoE layer (identical on every rank).
    load_imbalance: f64,
}

/// One rank's step statistics while they are still on its device: the losses are summed
/// there over the micro-batches without reading them back (one host read per step, after
/// the all-reduce, instead of three per micro-batch).
struct LocalStats {
    /// f64 `[3]`: lm, aux and z loss, each averaged over the micro-batches.
    losses_3: Tensor,
    /// f64 `[2]`: kept and dropped assignments over the micro-batches and MoE layers.
    counts_2: Tensor,
}

impl LocalStats {
    fn new(placement: &Placement) -> Result<Self> {
        Ok(Self {
            losses_3: Tensor::f_zeros([3], (Kind::Double, placement.device))?,
            counts_2: Tensor::f_zeros([2], (Kind::Double, placement.device))?,
        })
    }

    /// `[lm, aux, z, kept, dropped, non_finite, stop]` in f64 on the rank's device, the
    /// layout [`StepStats::from_tensor`] reads. `non_finite` is 1 when a loss is not finite.
    fn to_tensor(&self, placement: &Placement, stop: bool) -> Result<Tensor> {
        let non_finite_1 = self
            .losses_3
            .f_isfinite()?
            .f_all()?
            .f_logical_not()?
            .f_to_kind(Kind::Double)?
            .f_reshape([1])?;
        let stop_1 = placement.upload(&[f64::from(u8::from(stop))])?;
        Ok(Tensor::f_cat(
            &[&self.losses_3, &self.counts_2, &non_finite_1, &stop_1],
            0,
        )?)
    }
}

impl StepStats {
    /// The all-reduced statistics plus the load imbalance, appended after the reduction.
    const LEN: i64 = 8;

    fn from_tensor(t: &Tensor) -> Result<Self> {
        let v = host_read::<f64>(t)?;
        if v.len() as i64 != Self::LEN {
            return Err(TrainError::Other(format!(
                "step stats of length {}",
                v.len()
            )));
        }
        Ok(Self {
            lm_loss: v[0],
            aux_loss: v[1],
            z_loss: v[2],
            kept: v[3],
            dropped: v[4],
            non_finite: v[5],
            stop: v[6],
            load_imbalance: v[7],
        })
    }
}

/// Everything a rank holds while training.
struct Rank<'a> {
    cfg: &'a ExperimentConfig,
    groups: ProcessGroups,
    placement: Placement,
    model: TransformerLm,
    params: Vec<Param>,
    opts: &'a RunOptions,
    printing: bool,
}

/// Trains one rank. Collective: every rank of `groups.world` must call it with the same
/// config.
pub fn train(
    cfg: &ExperimentConfig,
    groups: ProcessGroups,
    device: Device,
    opts: &RunOptions,
) -> Result<TrainSummary> {
    let errs = cfg.validate(groups.world_size as i64);
    if !errs.is_empty() {
        return Err(TrainError::Config(errs));
    }
    check_comm_devices(&groups, device)?;
    let printing = groups.world_rank == 0 && !opts.quiet;
    // Every failure to load the data (missing, empty, too short, unreadable) is the data's.
    let dataset = data::load_dataset(&cfg.data, cfg.model.vocab_size).map_err(|e| match e {
        TrainError::File { path, msg } => TrainError::Data(format!("{}: {msg}", path.display())),
        other => other,
    })?;
    if printing {
        crate::progress::print_line(&format!(
            "data: {}: {} train / {} val tokens",
            dataset.origin(),
            dataset.len(data::Split::Train),
            dataset.len(data::Split::Val)
        ));
    }
    let model = TransformerLm::new(
        &cfg.model,
        &cfg.moe,
        &ExpertParallel::from_groups(&groups).with_capacity_groups(opts.capacity_groups),
        cfg.run.seed,
        device,
    )?;
    let params = model.params();
    let placement = Placement::new(
        device,
        crate::inference::compute_kind(&cfg.trainer.precision),
    );
    let mut rank = Rank {
        cfg,
        groups,
        placement,
        model,
        params,
        opts,
        printing,
    };
    rank.run(dataset)
}

impl Rank<'_> {
    fn run(&mut self, dataset: Arc<Dataset>) -> Result<TrainSummary> {
        let cfg = self.cfg;
        let t = &cfg.trainer;
        let mut optimizer = AdamW::new(&self.params, t)?;
        let mut summary = TrainSummary::default();

        let mut start_step = 0u64;
        if let Some(path) = &self.opts.resume {
            start_step = self.restore(path, &mut optimizer)?;
            if self.printing {
                crate::progress::print_line(&format!(
                    "resumed from {} at step {start_step}",
                    path.display()
                ));
            }
        }

        if let (Some(path), None) = (&self.opts.init_from, &self.opts.resume) {
            self.load_weights(path)?;
            if self.printing {
                crate::progress::print_line(&format!(
                    "initialised the weights from {} (step 0, a new optimizer)",
                    path.display()
                ));
            }
        }

        let out_dir = cfg.run.out_dir.clone();
        let ckpt_dir = cfg
            .checkpoint
            .dir
            .clone()
            .unwrap_or_else(|| out_dir.join("checkpoints"));
        let mut metrics = None;
        let mut tb = None;
        if self.groups.world_rank == 0 {
            std::fs::create_dir_all(&out_dir).map_err(|e| TrainError::io(&out_dir, e))?;
            if let Some(yaml) = &self.opts.config_yaml {
                write_atomic(&out_dir.join("config.yaml"), yaml)?;
            }
            if start_step > 0 {
                truncate_metrics(&out_dir.join(crate::metrics::METRICS_FILE), start_step)?;
                crate::tensorboard_truncate::truncate_events(&out_dir, start_step)?;
            }
            metrics = Some(MetricsWriter::open(&out_dir, start_step > 0)?);
            tb = Some(TbWriter::new(&out_dir)?);
        }
        let g = &self.groups;
        let mut checkpointer = Checkpointer::new(
            &ckpt_dir,
            cfg.checkpoint.keep,
            g.world_rank as i64,
            g.ep_rank as i64,
            g.ep_size as i64,
            g.world_size as i64,
        )?;

        let world = self.groups.world_size as i64;
        let global_batch = t.batch_size * world * t.grad_accum;
        let tokens_per_step = (global_batch * cfg.data.seq_len) as f64;
        let mut prefetch = Prefetcher::pinned_for(
            dataset.clone(),
            data::SamplerSpec {
                seed: cfg.run.seed,
                seq_len: cfg.data.seq_len,
                batch_size: t.batch_size,
                world_size: world,
                rank: self.groups.world_rank as i64,
                grad_accum: t.grad_accum,
            },
            start_step,
            t.max_steps,
            cfg.data.prefetch,
            self.placement.device,
        )?;
        let faults = crate::fault::from_env()?;
        let mut progress = Progress::new(t.max_steps, self.opts.live_progress);
        let mut bad_in_a_row = 0u64;
        let run_start = Instant::now();
        let mut window_start = Instant::now();
        let mut window_tokens = 0.0;

        for step in start_step..t.max_steps {
            let (batch_step, micro) = prefetch.next()?;
            if batch_step != step {
                return Err(TrainError::Data(format!(
                    "prefetcher delivered step {batch_step}, expected {step}"
                )));
            }
            let lr = lr_at(step, t);
            if crate::fault::kills_at(&faults, self.groups.world_rank, step + 1) {
                checkpointer.wait()?;
            }
            let inject_nan = crate::fault::trigger(&faults, self.groups.world_rank, step + 1)?;
            let (local, layer_stats) = self.forward_backward(&micro, step, inject_nan)?;
            let stop = self.opts.stop.load(Ordering::SeqCst);
            let global = self.reduce_stats(&local, stop, &layer_stats)?;
            if self.opts.debug {
                // Before the skip-bad-step path, which would otherwise swallow a non-finite
                // loss; the loss flag is global so every rank stops at the same step.
                let n = t.batch_size * cfg.data.seq_len * t.grad_accum;
                // The multi-token prediction block (block num_layers, last in the list) routes
                // one token fewer per sequence.
                let main_layers = layer_stats
                    .iter()
                    .take_while(|(l, _)| *l < cfg.model.num_layers)
                    .count();
                let (main, mtp) = layer_stats.split_at(main_layers);
                let finite = global.non_finite == 0.0;
                check_invariants(step, n, cfg.moe.top_k, main, finite)?;
                let n_mtp = t.batch_size * (cfg.data.seq_len - 1) * t.grad_accum;
                check_invariants(step, n_mtp, cfg.moe.top_k, mtp, finite)?;
            }

            // One collective decision for every rank: a non-finite value anywhere skips the step.
            let mut grad_norm = f64::NAN;
            let bad = global.non_finite > 0.0;
            if !bad {
                sync_gradients(&self.params, &self.groups)?;
                grad_norm = clip_grad_norm(&self.params, &self.groups, t.grad_clip)?;
            }
            if bad || !grad_norm.is_finite() {
                summary.bad_steps += 1;
                bad_in_a_row += 1;
                if self.printing {
                    eprintln!(
                        "step {}: non-finite {} (skipped; {bad_in_a_row} in a row){}",
                        step + 1,
                        if bad { "loss" } else { "gradient norm" },
                        self.non_finite_diagnostic(&local, &layer_stats)
                    );
                }
                self.zero_grads()?;
                if bad_in_a_row >= t.max_bad_steps {
                    let path =
                        self.checkpoint_now(&mut checkpointer, &optimizer, step, "diverged")?;
                    return Err(TrainError::Diverged(format!(
                        "{bad_in_a_row} steps in a row had non-finite values (trainer.max_bad_steps = {}); last checkpoint: {}",
                        t.max_bad_steps,
                        path.map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
                    )));
                }
                continue;
            }
            bad_in_a_row = 0;
            optimizer.step(&self.params, lr)?;
            self.zero_grads()?;
            self.update_biases(&layer_stats)?;

            window_tokens += tokens_per_step;
            let done = step + 1;
            let record = TrainRecord {
                step: done,
                loss: global.lm_loss + global.aux_loss + global.z_loss,
                lm_loss: global.lm_loss,
                aux_loss: global.aux_loss,
                z_loss: global.z_loss,
                dropped_frac: if global.kept + global.dropped > 0.0 {
                    global.dropped / (global.kept + global.dropped)
                } else {
                    0.0
                },
                load_imbalance: global.load_imbalance,
                grad_norm,
                lr,
                tokens_per_s: 0.0,
                elapsed_s: run_start.elapsed().as_secs_f64(),
            };
            let mut record = record;
            if done % t.log_every == 0 || done == t.max_steps || self.opts.debug {
                let secs = window_start.elapsed().as_secs_f64().max(1e-9);
                record.tokens_per_s = window_tokens / secs;
                window_start = Instant::now();
                window_tokens = 0.0;
                if let Some(m) = metrics.as_mut() {
                    m.write_train(&record)?;
                }
                if let Some(tb) = tb.as_mut() {
                    self.log_tensorboard(tb, &record, &layer_stats)?;
                }
                if self.printing {
                    progress.update(&ProgressInfo::from_record(
                        &record,
                        t.max_steps,
                        run_start.elapsed(),
                    ));
                    if self.opts.debug {
                        self.print_router_stats(&layer_stats)?;
                    }
                }
            }
            summary.records.push(record);

            if t.eval_every > 0 && (done % t.eval_every == 0 || done == t.max_steps) {
                let val_loss = self.evaluate(&dataset, done)?;
                let rec = EvalRecord {
                    step: done,
                    val_loss,
                    val_ppl: val_loss.exp(),
                };
                if let Some(m) = metrics.as_mut() {
                    m.write_eval(&rec)?;
                }
                if let Some(tb) = tb.as_mut() {
                    tb.scalar("val/loss", done as i64, val_loss as f32)?;
                    tb.flush()?;
                }
                if self.printing {
                    progress.message(&format!(
                        "step {done}: val_loss {val_loss:.4} (ppl {:.2})",
                        val_loss.exp()
                    ));
                }
                summary.evals.push(rec);
            }

            let stop_requested = global.stop > 0.0;
            let periodic = cfg.checkpoint.every > 0 && done % cfg.checkpoint.every == 0;
            if periodic || done == t.max_steps || stop_requested {
                summary.last_checkpoint =
                    self.checkpoint_now(&mut checkpointer, &optimizer, done, "")?;
            }
            if stop_requested {
                summary.interrupted = done < t.max_steps;
                if self.printing {
                    progress.message(&format!(
                        "stopped by signal after step {done} of {}; checkpoint: {} (continue with --resume auto)",
                        t.max_steps,
                        summary
                            .last_checkpoint
                            .as_ref()
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "none".into())
                    ));
                }
                break;
            }
        }
        checkpointer.wait()?;
        if let Some(tb) = tb.as_mut() {
            tb.flush()?;
        }
        if self.printing {
            progress.finish();
        }
        Ok(summary)
    }

    /// Forward and backward over the step's micro-batches. Returns this rank's statistics
    /// (losses averaged over micro-batches) and the per-layer router statistics summed over
    /// micro-batches.
    fn forward_backward(
        &mut self,
        micro: &[Batch],
        step: u64,
        inject_nan: bool,
    ) -> Result<(LocalStats, Vec<(i64, MoeStats)>)> {
        let n_micro = micro.len() as f64;
        let mut stats = LocalStats::new(&self.placement)?;
        let mut layers: Vec<(i64, MoeStats)> = Vec::new();
        for (i, batch) in micro.iter().enumerate() {
            let inputs = self.placement.to_device(&batch.inputs_bt)?;
            let targets = self.placement.to_device(&batch.targets_bt)?;
            let ctx = LmForward {
                train: true,
                compute_kind: self.placement.compute_kind,
                step: step * 1024 + i as u64,
            };
            let out = self.model.forward(&inputs, &ctx)?;
            let lm_loss = lm_loss(&out.logits_btv, &targets)?;
            let mut loss = lm_loss.f_add(&out.aux_loss)?.f_add(&out.z_loss)?;
            if let Some(mtp_logits) = &out.mtp_logits_btv {
                loss = loss.f_add(
                    &mtp_loss(mtp_logits, &targets)?
                        .f_mul_scalar(self.cfg.trainer.mtp_loss_weight)?,
                )?;
            }
            let mut lm_loss = lm_loss;
            if inject_nan {
                lm_loss = lm_loss.f_mul_scalar(f64::NAN)?;
                loss = loss.f_mul_scalar(f64::NAN)?;
            }
            let losses_3 = Tensor::f_stack(&[&lm_loss, &out.aux_loss, &out.z_loss], 0)?
                .f_detach()?
                .f_to_kind(Kind::Double)?;
            stats.losses_3 = stats.losses_3.f_add(&losses_3.f_div_scalar(n_micro)?)?;
            // Averaging over micro-batches: each contributes 1/n of the step's gradient.
            loss.f_div_scalar(n_micro)?.f_backward()?;
            for (layer, s) in out.moe {
                let counts_2 = Tensor::f_stack(&[&s.num_kept, &s.num_dropped], 0)?;
                stats.counts_2 = stats.counts_2.f_add(&counts_2.f_to_kind(Kind::Double)?)?;
                match layers.iter_mut().find(|(l, _)| *l == layer) {
                    Some((_, acc)) => acc.accumulate(&s)?,
                    None => layers.push((layer, s)),
                }
            }
        }
        Ok((stats, layers))
    }

    /// One all-reduce on the rank's device and the step's one host read: losses become the
    /// mean over ranks, counts the sum, flags the max (>0); the load imbalance (from the
    /// layers' already global loads) rides along in the same read.
    fn reduce_stats(
        &self,
        local: &LocalStats,
        stop: bool,
        layers: &[(i64, MoeStats)],
    ) -> Result<StepStats> {
        let world = self.groups.world_size as f64;
        let summed =
            lock(&self.groups.world)?.all_reduce_sum(&local.to_tensor(&self.placement, stop)?)?;
        let imbalance_1 = load_imbalance(layers, &self.placement)?.f_reshape([1])?;
        let mut g = StepStats::from_tensor(&Tensor::f_cat(&[&summed, &imbalance_1], 0)?)?;
        g.lm_loss /= world;
        g.aux_loss /= world;
        g.z_loss /= world;
        Ok(g)
    }

    fn zero_grads(&self) -> Result<()> {
        for p in &self.params {
            let mut g = p.tensor.f_grad()?;
            if g.defined() {
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// Where this rank saw non-finite values: which loss terms (per MoE layer for aux and z),
    /// and which gradients. The first bad parameter in model order is usually the embedding
    /// (a NaN loss poisons every gradient), so the first bad MoE parameter is named too: a
    /// router or expert blow-up shows there first.
    fn non_finite_diagnostic(&self, local: &LocalStats, layers: &[(i64, MoeStats)]) -> String {
        let mut parts = Vec::new();
        // host: only on the rare path of a skipped step.
        let lm = host_read::<f64>(&local.losses_3).map_or(f64::NAN, |v| v[0]);
        if !lm.is_finite() {
            parts.push(format!("lm_loss {lm}"));
        }
        for (layer, s) in layers {
            for (what, t) in [("aux_loss", &s.aux_loss), ("z_loss", &s.z_loss)] {
                if let Ok(v) = host_read::<f64>(t).map(|v| v[0]) {
                    if !v.is_finite() {
                        parts.push(format!("layer {layer} {what} {v}"));
                    }
                }
            }
        }
        let bad: Vec<&str> = self
            .params
            .iter()
            .filter(|p| {
                let finite = p.tensor.f_grad().and_then(|g| {
                    if !g.defined() {
                        return Ok(1);
                    }
                    // host: only on the rare path of a skipped step.
                    g.f_isfinite()?.f_all()?.f_int64_value(&[])
                });
                !matches!(finite, Ok(1))
            })
            .map(|p| p.name.as_str())
            .collect();
        if let Some(first) = bad.first() {
            let moe = bad.iter().find(|n| n.contains(".moe."));
            parts.push(format!(
                "non-finite gradients in {} of {} parameters, first: {first}{}",
                bad.len(),
                self.params.len(),
                moe.filter(|m| *m != first)
                    .map(|m| format!(", first MoE: {m}"))
                    .unwrap_or_default()
            ));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!(" on rank {}: {}", self.groups.world_rank, parts.join("; "))
        }
    }

    /// Aux-loss-free balancing: each MoE layer's bias moves towards the mean load, from the
    /// global (all-reduced) pre-drop assignment counts, identically on every rank.
    fn update_biases(&self, layer_stats: &[(i64, MoeStats)]) -> Result<()> {
        if self.cfg.moe.bias_update_rate <= 0.0 {
            return Ok(());
        }
        for (layer, moe) in self.model.moe_layers() {
            if let Some((_, s)) = layer_stats.iter().find(|(l, _)| *l == layer) {
                moe.update_expert_bias(s)?;
            }
        }
        Ok(())
    }

    /// Mean validation loss over `eval_iters` global batches of the validation split: each
    /// rank's mean ([`crate::inference::rank_val_loss`], shared with `moe eval`), averaged
    /// over ranks.
    fn evaluate(&mut self, dataset: &Arc<Dataset>, step: u64) -> Result<f64> {
        let m = crate::inference::EvalModel {
            model: &self.model,
            device: self.placement.device,
            compute_kind: self.placement.compute_kind,
        };
        let world = self.groups.world_size as i64;
        let rank = self.groups.world_rank as i64;
        let local =
            crate::inference::rank_val_loss_on_device(&m, dataset, self.cfg, world, rank, step)?;
        let summed = lock(&self.groups.world)?.all_reduce_sum(&local.f_reshape([1])?)?;
        Ok(host_read::<f64>(&summed)?[0] / self.groups.world_size as f64)
    }

    fn log_tensorboard(
        &self,
        tb: &mut TbWriter,
        r: &TrainRecord,
        layers: &[(i64, MoeStats)],
    ) -> Result<()> {
        let s = r.step as i64;
        for (tag, v) in [
            ("train/loss", r.loss),
            ("train/lm_loss", r.lm_loss),
            ("train/aux_loss", r.aux_loss),
            ("train/z_loss", r.z_loss),
            ("train/dropped_frac", r.dropped_frac),
            ("train/load_imbalance", r.load_imbalance),
            ("train/grad_norm", r.grad_norm),
            ("train/lr", r.lr),
            ("train/tokens_per_s", r.tokens_per_s),
        ] {
            tb.scalar(tag, s, v as f32)?;
        }
        for (layer, st) in layers {
            // At log steps only: one read per MoE layer for the per-expert load plots.
            let load = host_read::<f64>(&st.load_e)?;
            let total: f64 = load.iter().sum::<f64>().max(1.0);
            for (e, l) in load.iter().enumerate() {
                tb.scalar(
                    &format!("moe/layer{layer:02}/expert_load/e{e:03}"),
                    s,
                    (l / total) as f32,
                )?;
            }
        }
        tb.flush()
    }

    fn print_router_stats(&self, layers: &[(i64, MoeStats)]) -> Result<()> {
        for (layer, st) in layers {
            // Debug mode only.
            let load = host_read::<f64>(&st.load_e)?;
            let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
            let max = load.iter().cloned().fold(0.0, f64::max);
            let min = load.iter().cloned().fold(f64::INFINITY, f64::min);
            // host: debug-mode statistics only.
            let counts = host_read::<i64>(&Tensor::f_stack(&[&st.num_kept, &st.num_dropped], 0)?)?;
            let (kept, dropped) = (counts[0], counts[1]);
            let assigned = (kept + dropped).max(1) as f64;
            crate::progress::print_line(&format!(
                "  layer {layer:2}: load min {min:.0} mean {mean:.1} max {max:.0} (imbalance {:.2}), dropped {:.2}% (rank 0), aux {:.5}, z {:.5}",
                if mean > 0.0 { max / mean } else { 0.0 },
                100.0 * dropped as f64 / assigned,
                host_read::<f64>(&st.aux_loss)?[0],
                host_read::<f64>(&st.z_loss)?[0],
            ));
        }
        Ok(())
    }

    /// Copies the state to host memory and hands it to the background writer.
    fn checkpoint_now(
        &self,
        checkpointer: &mut Checkpointer,
        optimizer: &AdamW,
        step: u64,
        _why: &str,
    ) -> Result<Option<PathBuf>> {
        let snapshot = Snapshot {
            step,
            optim_step: optimizer.step_count(),
            // The data order is a pure function of (seed, step): the step is the data cursor.
            extra: serde_json::json!({ "data_step": step, "seed": self.cfg.run.seed }),
            config_yaml: serde_json::to_string_pretty(self.cfg)
                .map_err(|e| TrainError::Other(format!("serialising the config: {e}")))?,
            ..Snapshot::from_params(&self.params, &self.model.buffers(), optimizer.state())?
        };
        let path = checkpointer.save(snapshot)?;
        Ok(Some(path))
    }

    /// Loads weights, buffers and optimizer state for this rank; returns the step to resume at.
    fn restore(&mut self, path: &std::path::Path, optimizer: &mut AdamW) -> Result<u64> {
        let slots = ExpertSlot::from_params(&self.params, self.cfg.moe.num_experts);
        let loaded = load_for_rank(path, &slots)?;
        loaded.copy_into(&self.params, &self.model.buffers())?;
        optimizer.load_state(&loaded.optim, loaded.optim_step)?;
        Ok(loaded.step)
    }

    /// Weights and buffers only (`--init-from`): the optimizer state is not read.
    fn load_weights(&mut self, path: &std::path::Path) -> Result<()> {
        let slots = ExpertSlot::from_params(&self.params, self.cfg.moe.num_experts);
        let mut loaded = load_for_rank(path, &slots)?;
        loaded.optim.clear();
        loaded.copy_into(&self.params, &self.model.buffers())
    }
}

/// Every communicator must move tensors of the rank's device: a mismatch is a set-up bug that
/// would otherwise surface as a failed collective at step 1 (NCCL rejects host tensors).
fn check_comm_devices(groups: &ProcessGroups, device: Device) -> Result<()> {
    for (name, comm) in [
        ("world", &groups.world),
        ("ep", &groups.ep),
        ("expert_dp", &groups.expert_dp),
    ] {
        let c = lock(comm)?;
        if c.device() != device {
            return Err(TrainError::Other(format!(
                "the {name} communicator ({} backend) moves tensors on {:?}, but this rank \
                 computes on {device:?}",
                c.backend(),
                c.device()
            )));
        }
    }
    Ok(())
}

/// Debug mode's per-step invariants (DESIGN.md, Modes): in every MoE layer each of the
/// rank's `num_tokens` tokens (over all micro-batches) has `top_k` assignments, each kept or
/// counted dropped; routing weights are finite and sum as configured; the loss is finite.
pub fn check_invariants(
    step: u64,
    num_tokens: i64,
    top_k: i64,
    layers: &[(i64, MoeStats)],
    loss_finite: bool,
) -> Result<()> {
    let invariant = |layer: i64, msg: String| {
        TrainError::Model(moe_model::ModelError::Invariant { layer, msg })
    };
    for (layer, s) in layers {
        let expected = num_tokens * top_k;
        // host: debug-mode invariant checks only.
        let counts =
            moe_comm::host_read::<i64>(&Tensor::f_stack(&[&s.num_kept, &s.num_dropped], 0)?)?;
        let (num_kept, num_dropped) = (counts[0], counts[1]);
        if num_kept + num_dropped != expected {
            return Err(invariant(
                *layer,
                format!(
                    "step {}: kept ({}) + dropped ({}) assignments != N*k ({num_tokens}*{top_k} = {expected})",
                    step + 1,
                    num_kept,
                    num_dropped,
                ),
            ));
        }
        if !s.probs_sum_ok()? {
            return Err(invariant(
                *layer,
                format!(
                    "step {}: routing weights not finite or not normalised as configured",
                    step + 1
                ),
            ));
        }
    }
    if !loss_finite {
        return Err(TrainError::Diverged(format!(
            "step {}: loss is not finite (debug mode stops at the first non-finite step)",
            step + 1
        )));
    }
    Ok(())
}

/// Writes `text` to `path` through a temp file and a rename, so a reader never sees half.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// A resumed run re-logs the steps after its checkpoint: drop the lines the interrupted run
/// wrote beyond `step` (and a torn last line of a killed writer), so each step appears once.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let kept: String = text
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .collect();
    if kept.len() != text.len() {
        write_atomic(path, &kept)?;
    }
    Ok(())
}

/// Mean token cross-entropy in float32.
///
/// # Shapes
/// logits `[b, t, v]`, targets `[b, t]` -> scalar
pub fn lm_loss(logits_btv: &Tensor, targets_bt: &Tensor) -> Result<Tensor> {
    let v = logits_btv.size().last().copied().unwrap_or(0);
    Ok(logits_btv
        .f_to_kind(Kind::Float)?
        .f_reshape([-1, v])?
        .f_cross_entropy_loss::<Tensor>(
            &targets_bt.f_reshape([-1])?,
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )?)
}

/// Multi-token prediction loss: the cross-entropy of `mtp_logits_btv` (position i predicts
/// the token after next) against `targets_bt[:, 1:]`.
///
/// # Shapes
/// `mtp_logits_btv [b, t-1, v]`, `targets_bt [b, t]` -> scalar
pub fn mtp_loss(mtp_logits_btv: &Tensor, targets_bt: &Tensor) -> Result<Tensor> {
    let t = targets_bt.size().get(1).copied().unwrap_or(0);
    lm_loss(mtp_logits_btv, &targets_bt.f_narrow(1, 1, t - 1)?)
}

/// max/mean of the global kept load over the MoE layers (the worst layer), as an f64 scalar
/// on the device; 0 without MoE layers or load.
fn load_imbalance(layers: &[(i64, MoeStats)], placement: &Placement) -> Result<Tensor> {
    let mut worst = Tensor::f_zeros([], (Kind::Double, placement.device))?;
    for (_, s) in layers {
        let load_e = s.load_e.f_to_kind(Kind::Double)?;
        let mean = load_e.f_mean(Kind::Double)?;
        // max/mean where the mean is positive, else 0 (an idle layer is not imbalanced).
        let ratio = load_e
            .f_max()?
            .f_div(&mean.f_clamp_min(f64::MIN_POSITIVE)?)?
            .f_where_scalarother(&mean.f_gt(0.0)?, 0.0)?;
        worst = worst.f_maximum(&ratio)?;
    }
    Ok(worst)
}
