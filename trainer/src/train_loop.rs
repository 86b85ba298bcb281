//! The training loop of one rank, in the shape of torchtitan's `train.py`: everything is set up
//! once ([`train`]), then each step runs `Trainer::train_step` and hands its outcome to parts
//! that decide for themselves when they act: the logger (metrics.jsonl, TensorBoard, progress),
//! the validator, the checkpointer and the stop policy.
//!
//! Every rank runs this same function (threads in debug mode, processes under mpirun). Per
//! step: forward + backward over `grad_accum` micro-batches, one small all-reduce of the step's
//! statistics (losses, drop counts, "this rank saw a non-finite value", "this rank was asked
//! to stop"), gradient sync, global-norm clipping, AdamW, the aux-loss-free bias update, then
//! logging, eval and checkpoints. Decisions that must be collective (skip a bad step, stop on
//! a signal) come from the all-reduced statistics, so every rank takes the same branch and
//! none is left waiting in a collective.

mod checkpointing;
mod invariants;
mod logger;
mod stats;
mod step;
mod stop;
mod validator;

pub use invariants::check_invariants;

use crate::config::ExperimentConfig;
use crate::data::{self, Batch, Dataset, Prefetcher};
use crate::fault::{self, Fault};
use crate::metrics::{EvalRecord, TrainRecord};
use crate::optim::AdamW;
use crate::schedule::lr_at;
use crate::{Result, TrainError};
use checkpointing::TrainCheckpointer;
use logger::Logger;
use moe_comm::{lock, Placement, ProcessGroups};
use moe_model::transformer::TransformerLm;
use moe_model::ExpertParallel;
use moe_model::Param;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use step::StepOutcome;
use stop::StopPolicy;
use tch::Device;
use validator::Validator;

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
    /// reference of an EP=P run uses P, reproducing each rank's per-rank capacity.
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
    /// Faults to inject (resilience tests; empty in normal runs). The `moe` binary reads them
    /// from `MOE_FAULT` ([`crate::fault`]).
    pub faults: Vec<Fault>,
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
            faults: Vec::new(),
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

/// Everything a rank holds while training: its process groups, model, parameters and
/// optimizer.
struct Trainer<'a> {
    cfg: &'a ExperimentConfig,
    groups: ProcessGroups,
    placement: Placement,
    model: TransformerLm,
    params: Vec<Param>,
    optimizer: AdamW,
    opts: &'a RunOptions,
    /// World rank 0 of a run that is not quiet.
    printing: bool,
    /// `trainer.distill`'s teacher, if any.
    distill: Option<crate::distill::Distiller>,
}

/// Trains one rank. Collective: every rank of `groups.world` must call it with the same
/// config. This is the one training path: every mode (one process, in-process ranks, virtual
/// ranks, mpirun) only builds the process groups it hands in.
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
    let dataset = load_dataset(cfg, printing)?;
    let mut trainer = Trainer::new(cfg, groups, device, opts, printing)?;
    let start_step = trainer.load_start_state()?;
    trainer.run(dataset, start_step)
}

/// The dataset of `cfg.data`: every failure to load it (missing, empty, too short,
/// unreadable) is the data's.
fn load_dataset(cfg: &ExperimentConfig, printing: bool) -> Result<Arc<Dataset>> {
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
    Ok(dataset)
}

impl<'a> Trainer<'a> {
    /// Builds this rank's part of the model from the process groups, and a fresh optimizer.
    fn new(
        cfg: &'a ExperimentConfig,
        groups: ProcessGroups,
        device: Device,
        opts: &'a RunOptions,
        printing: bool,
    ) -> Result<Self> {
        // Each MoE layer keeps its own dispatcher over these groups; the capacity groups are
        // fixed here, once (P only in the single-process EP reference).
        let par = ExpertParallel::from_groups(&groups).with_capacity_groups(opts.capacity_groups);
        let model = TransformerLm::new(&cfg.model, &cfg.moe, &par, cfg.run.seed, device)?;
        let distill = crate::distill::Distiller::from_config(cfg, device)?;
        let params = model.params();
        let kind = crate::inference::compute_kind(&cfg.trainer.precision);
        let optimizer = AdamW::new(&params, &cfg.trainer)?;
        Ok(Self {
            cfg,
            groups,
            placement: Placement::new(device, kind),
            model,
            params,
            optimizer,
            opts,
            printing,
            distill,
        })
    }

    /// Runs optimizer steps from `start_step` to `trainer.max_steps`, or until a stop signal
    /// or too many non-finite steps in a row.
    fn run(&mut self, dataset: Arc<Dataset>, start_step: u64) -> Result<TrainSummary> {
        let t = &self.cfg.trainer;
        let mut logger = Logger::open(self.cfg, &self.groups, self.opts, start_step)?;
        let mut checkpointer = TrainCheckpointer::new(self.cfg, &self.groups)?;
        let mut prefetch = self.prefetcher(dataset.clone(), start_step)?;
        let validator = Validator::new(dataset, t);
        let mut stop = StopPolicy::new(t.max_bad_steps);
        let mut summary = TrainSummary::default();
        let rank = self.groups.world_rank;
        logger.start_clock();

        for step in start_step..t.max_steps {
            let micro = next_batch(&mut prefetch, step)?;
            let lr = lr_at(step, t);
            if fault::kills_at(&self.opts.faults, rank, step + 1) {
                checkpointer.wait()?;
            }
            let inject_nan = fault::trigger(&self.opts.faults, rank, step + 1)?;
            let applied = match self.train_step(step, &micro, lr, inject_nan)? {
                StepOutcome::Applied(applied) => applied,
                StepOutcome::Skipped { what, diagnostic } => {
                    summary.bad_steps += 1;
                    let in_a_row = stop.bad_step();
                    logger.bad_step(step + 1, what, in_a_row, &diagnostic);
                    if stop.diverged() {
                        let path = checkpointer.save_now(self.snapshot(step)?)?;
                        return Err(stop.diverged_error(&path));
                    }
                    continue;
                }
            };
            stop.good_step();
            let done = step + 1;
            summary.records.push(logger.log_step(done, &applied, lr)?);
            if let Some(rec) = validator.maybe_run(self, done)? {
                logger.log_eval(&rec)?;
                summary.evals.push(rec);
            }
            let stop_requested = applied.stats.stop > 0.0;
            if let Some(path) = checkpointer.save(done, stop_requested, || self.snapshot(done))? {
                summary.last_checkpoint = Some(path);
            }
            if stop_requested {
                summary.interrupted = done < t.max_steps;
                logger.message(&stop::signal_message(
                    done,
                    t.max_steps,
                    summary.last_checkpoint.as_deref(),
                ));
                break;
            }
        }
        checkpointer.wait()?;
        logger.finish()?;
        Ok(summary)
    }

    /// This rank's shard of every step's global batch, prepared ahead on a background thread.
    fn prefetcher(&self, dataset: Arc<Dataset>, start_step: u64) -> Result<Prefetcher> {
        let t = &self.cfg.trainer;
        Prefetcher::pinned_for(
            dataset,
            data::SamplerSpec {
                seed: self.cfg.run.seed,
                seq_len: self.cfg.data.seq_len,
                batch_size: t.batch_size,
                world_size: self.groups.world_size as i64,
                rank: self.groups.world_rank as i64,
                grad_accum: t.grad_accum,
            },
            start_step,
            t.max_steps,
            self.cfg.data.prefetch,
            self.placement.device,
        )
    }
}

/// The micro-batches of optimizer step `step` (0-based).
fn next_batch(prefetch: &mut Prefetcher, step: u64) -> Result<Vec<Batch>> {
    let (batch_step, micro) = prefetch.next()?;
    if batch_step != step {
        return Err(TrainError::Data(format!(
            "prefetcher delivered step {batch_step}, expected {step}"
        )));
    }
    Ok(micro)
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
