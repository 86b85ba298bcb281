//! `moe train`: picks the mode (single process, debug/threads ranks, or an MPI rank), builds
//! the process groups and runs the trainer on every rank. The config is loaded and validated
//! by the caller.

use crate::cli::Resume;
use crate::device::{describe, resolve_device, resolve_rank_device};
use crate::exit_code::BadInput;
use crate::threads::set_threads;
use anyhow::{anyhow, bail, Context};
use moe_comm::{threads::threads_world_on, ProcessGroups};
use moe_trainer::config::{Backend, DebugRanks, ExperimentConfig, Precision};
use moe_trainer::fault::Fault;
use moe_trainer::progress::print_line;
use moe_trainer::train_loop::{train, RunOptions, TrainSummary};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

/// Everything `moe train` knows besides the config.
#[derive(Debug, Clone)]
pub struct TrainOpts {
    /// `--debug`: simulate `parallel.ep_size` ranks in this process, check invariants.
    pub debug: bool,
    /// `--resume`.
    pub resume: Option<Resume>,
    /// `--overwrite`: delete what an earlier run left in `run.out_dir` first.
    pub overwrite: bool,
    /// `--init-from`: the checkpoint (any form `crate::ckpt_lookup` accepts) whose weights
    /// start this fresh run.
    pub init_from: Option<std::path::PathBuf>,
    /// Progress lines redrawn in place (a terminal, one rank) or one per log step.
    pub live_progress: bool,
    /// The config file, for logs.
    pub config_path: PathBuf,
    /// The `--set` overrides as given, for logs.
    pub overrides: Vec<String>,
    /// Processes started by mpirun (1 outside it).
    pub processes: i64,
    /// The world size the config was validated for (`crate::world::world_size`).
    pub world_size: i64,
}

/// Runs `moe train`: picks where this process's ranks come from, then the one training path.
pub fn run_train(cfg: ExperimentConfig, opts: TrainOpts) -> anyhow::Result<()> {
    let stop = install_stop_flag();
    let faults = faults_from_env()?;
    let in_process = opts.debug || cfg.parallel.backend == Backend::Threads;
    if !in_process && (opts.processes > 1 || cfg.parallel.backend == Backend::Mpi) {
        return run_mpi(cfg, opts, stop, faults);
    }
    let mode = if in_process {
        Mode::InProcess
    } else {
        Mode::Single
    };
    train_ranks(cfg, &opts, mode, stop, faults)
}

/// One MPI rank under mpirun (`main` validated the config for the launcher's world size,
/// which is this world's): any error aborts the whole job, since peers blocked in a
/// collective would otherwise hang.
fn run_mpi(
    cfg: ExperimentConfig,
    opts: TrainOpts,
    stop: Arc<AtomicBool>,
    faults: Vec<Fault>,
) -> anyhow::Result<()> {
    let runtime = moe_comm::mpi_backend::MpiRuntime::init().map_err(|e| anyhow!("{e}"))?;
    runtime.abort_on_panic();
    let (rank, size) = (runtime.world_rank(), runtime.world_size());
    if let Err(e) = train_ranks(cfg, &opts, Mode::Mpi(&runtime), stop, faults) {
        // One write: `eprintln!` writes its pieces separately, and mpirun's --tag-output then
        // splits the line around its own abort notice.
        crate::error_line::print_rank(&e, rank as i64, size as i64);
        runtime.abort(i32::from(crate::exit_code::exit_code(&e)));
    }
    Ok(())
}

/// Where this process's ranks come from.
enum Mode<'a> {
    /// One process, one rank.
    Single,
    /// Debug mode or the threads backend: `parallel.ep_size` ranks in this process, as rank
    /// threads or virtual ranks (decided by `parallel.debug_ranks` and the device).
    InProcess,
    /// This process is one rank of an mpirun job.
    Mpi(&'a moe_comm::mpi_backend::MpiRuntime),
}

/// The ranks this process trains, once the device is known.
enum Ranks<'a> {
    /// One rank on the whole config.
    Single,
    /// `parallel.ep_size` virtual ranks: their batches concatenated and trained as one process
    /// whose router computes capacity per rank's tokens, so each step equals P real ranks'
    /// (DESIGN.md's EP-equivalence reference) and no collective blocks.
    Virtual(i64),
    /// `parallel.ep_size` rank threads on one device (threads backend).
    Threads(usize),
    /// One MPI rank.
    Mpi(&'a moe_comm::mpi_backend::MpiRuntime),
}

/// The one training path of every mode: device, out_dir and checkpoints, threads, the
/// announcement, then the trainer on each rank's process groups, and the report.
fn train_ranks(
    cfg: ExperimentConfig,
    opts: &TrainOpts,
    mode: Mode<'_>,
    stop: Arc<AtomicBool>,
    faults: Vec<Fault>,
) -> anyhow::Result<()> {
    let device = match mode {
        Mode::Mpi(rt) => {
            resolve_rank_device(&cfg.trainer.device, rt.local_rank(), rt.local_size())?
        }
        _ => resolve_device(&cfg.trainer.device, 0)?,
    };
    check_precision(&cfg, device)?;
    let ranks = match mode {
        Mode::Single => {
            check_single_backend(&cfg, device)?;
            Ranks::Single
        }
        Mode::InProcess => in_process_ranks(&cfg, device)?,
        Mode::Mpi(rt) => Ranks::Mpi(rt),
    };
    let rank0 = match ranks {
        Ranks::Mpi(rt) => rt.world_rank() == 0,
        _ => true,
    };
    // Every rank checks the same directory; the trainer's rank 0 writes config.yaml.
    let resume = crate::run_dir::prepare(&cfg, opts.resume.as_ref(), opts.overwrite, rank0)?;
    let init_from = init_from(opts)?;
    let p = cfg.parallel.ep_size;
    set_threads(
        cfg.trainer.threads,
        match ranks {
            Ranks::Threads(p) => p,
            Ranks::Mpi(rt) => rt.local_size(),
            Ranks::Single | Ranks::Virtual(_) => 1,
        },
    );
    if rank0 {
        announce(&cfg, opts, device);
    }
    if opts.debug {
        match ranks {
            Ranks::Virtual(_) => print_line(&format!(
                "debug mode: {p} virtual expert-parallel rank(s) in one autograd graph on \
                 {device:?} (their batches concatenated, capacity per rank, the exchange one \
                 permutation by expert); routing invariants checked after every step"
            )),
            Ranks::Threads(_) => print_line(&format!(
                "debug mode: {p} expert-parallel rank(s) in one process on {device:?} (threads backend); routing invariants checked after every step"
            )),
            Ranks::Single | Ranks::Mpi(_) => {}
        }
    }
    // The resolved config written to the run directory is the user's (also for virtual
    // ranks, which train a rewritten one).
    let config_yaml = if rank0 {
        Some(crate::config_load::to_yaml(&cfg)?)
    } else {
        None
    };
    let run = RunOptions {
        debug: opts.debug,
        resume,
        init_from,
        stop,
        quiet: !rank0,
        config_yaml,
        live_progress: Some(opts.live_progress),
        faults,
        ..RunOptions::default()
    };
    let summary = ranks.train(&cfg, device, run)?;
    if rank0 {
        report(&cfg, opts, &summary);
    }
    Ok(())
}

/// Debug mode / threads backend: rank threads, or virtual ranks where threads cannot work
/// (`parallel.debug_ranks: virtual`, or `auto` on a GPU).
fn in_process_ranks(cfg: &ExperimentConfig, device: tch::Device) -> anyhow::Result<Ranks<'static>> {
    let p = usize::try_from(cfg.parallel.ep_size).context("parallel.ep_size")?;
    let virtual_ranks = match cfg.parallel.debug_ranks {
        DebugRanks::Virtual => true,
        DebugRanks::Auto => device.is_cuda(),
        DebugRanks::Threads if device.is_cuda() => {
            return Err(BadInput(format!(
                "parallel.debug_ranks is threads, but trainer.device resolved to {device:?}: \
                 in-process rank threads deadlock on one GPU (its autograd worker thread runs \
                 every rank's backward, and one rank's all-to-all waits for peers queued \
                 behind it); use parallel.debug_ranks virtual (or auto)"
            ))
            .into())
        }
        DebugRanks::Threads => false,
    };
    Ok(if virtual_ranks {
        Ranks::Virtual(cfg.parallel.ep_size)
    } else {
        Ranks::Threads(p)
    })
}

/// One process alone: the nccl backend needs CUDA tensors.
fn check_single_backend(cfg: &ExperimentConfig, device: tch::Device) -> anyhow::Result<()> {
    if cfg.parallel.backend == Backend::Nccl && !device.is_cuda() {
        bail!(
            "parallel.backend is nccl, which needs CUDA tensors, but trainer.device {} resolved \
             to {device:?}; use parallel.backend local (or auto) on a CPU",
            cfg.trainer.device
        );
    }
    Ok(())
}

impl Ranks<'_> {
    /// Builds the process groups of this process's ranks and trains them; returns world rank
    /// 0's summary (on other MPI ranks, their own).
    fn train(
        &self,
        cfg: &ExperimentConfig,
        device: tch::Device,
        run: RunOptions,
    ) -> anyhow::Result<TrainSummary> {
        let train_one = |cfg: &ExperimentConfig, groups, run: &RunOptions| {
            train(cfg, groups, device, run).map_err(|e| crate::ckpt_mismatch::from_train(e, cfg))
        };
        match *self {
            Ranks::Single => train_one(cfg, ProcessGroups::single(device), &run),
            Ranks::Virtual(p) => {
                let mut single = cfg.clone();
                single.trainer.batch_size = cfg.trainer.batch_size * p;
                single.parallel.ep_size = 1;
                single.parallel.backend = Backend::Local;
                let run = RunOptions {
                    capacity_groups: p,
                    ..run
                };
                train_one(&single, ProcessGroups::single(device), &run)
            }
            Ranks::Threads(p) => train_threads(cfg, device, p, &run),
            Ranks::Mpi(rt) => {
                let world = world_comm(cfg, device, rt.world())?;
                let groups = ProcessGroups::new(world, cfg.parallel.ep_size as usize)
                    .map_err(|e| anyhow!("{e}"))?;
                train_one(cfg, groups, &run)
            }
        }
    }
}

/// `p` rank threads on `device` over the threads backend; rank 0's summary. The first
/// failure is reported as the root cause, not its peers' "peer gone".
fn train_threads(
    cfg: &ExperimentConfig,
    device: tch::Device,
    p: usize,
    run: &RunOptions,
) -> anyhow::Result<TrainSummary> {
    let comms = threads_world_on(p, Duration::from_secs(cfg.parallel.timeout_s), device);
    let cfg = Arc::new(cfg.clone());
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let cfg = cfg.clone();
            let run = RunOptions {
                quiet: run.quiet || rank != 0,
                ..run.clone()
            };
            std::thread::Builder::new()
                .name(format!("rank{rank}"))
                .spawn(move || -> anyhow::Result<TrainSummary> {
                    let groups = ProcessGroups::new(comm, p).map_err(|e| anyhow!("{e}"))?;
                    train(&cfg, groups, device, &run)
                        .map_err(|e| crate::ckpt_mismatch::from_train(e, &cfg))
                })
                .map_err(|e| anyhow!("spawning rank {rank}: {e}"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut first_err = None;
    let mut rank0 = None;
    for (rank, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(Ok(s)) => {
                if rank == 0 {
                    rank0 = Some(s);
                }
            }
            Ok(Err(e)) => {
                // Peers of a failed rank fail with "peer gone": report the root cause first.
                let peer = e.to_string().contains("is gone");
                if first_err.as_ref().is_none_or(|(_, p, _)| *p && !peer) {
                    first_err = Some((rank, peer, e));
                }
            }
            Err(_) => {
                if first_err.is_none() {
                    first_err = Some((rank, false, anyhow!("rank {rank} panicked")));
                }
            }
        }
    }
    if let Some((rank, _, e)) = first_err {
        // As context, so that exit_code still sees a BadInput in the chain.
        return Err(e.context(format!("rank {rank} failed")));
    }
    rank0.ok_or_else(|| anyhow!("rank 0 returned no summary"))
}

/// Faults to inject, from `MOE_FAULT` (resilience tests; see `moe_trainer::fault`).
fn faults_from_env() -> anyhow::Result<Vec<Fault>> {
    match std::env::var("MOE_FAULT") {
        Ok(spec) => Ok(moe_trainer::fault::parse(&spec)?),
        Err(_) => Ok(Vec::new()),
    }
}

/// The world communicator of an MPI rank: NCCL (bootstrapped over the MPI world) for CUDA
/// tensors when the backend is `nccl`, or `auto` and libnccl loads; MPI for CPU tensors.
///
/// Not exercised on a CPU-only machine beyond the error paths: NCCL needs CUDA devices.
fn world_comm(
    cfg: &ExperimentConfig,
    device: tch::Device,
    mut mpi_world: Box<dyn moe_comm::Communicator>,
) -> anyhow::Result<Box<dyn moe_comm::Communicator>> {
    use moe_comm::nccl::{probe, NcclComm};
    let backend = cfg.parallel.backend;
    let tch::Device::Cuda(index) = device else {
        if backend == Backend::Nccl {
            bail!(
                "parallel.backend is nccl, which needs CUDA tensors, but this rank runs on {device:?} \
                 (trainer.device {}); use parallel.backend mpi (or auto) on CPUs",
                cfg.trainer.device
            );
        }
        return Ok(mpi_world);
    };
    match backend {
        Backend::Nccl => {}
        Backend::Auto => {
            if let Err(e) = probe() {
                bail!(
                    "parallel.backend auto on {device:?} needs NCCL (the mpi backend moves CPU \
                     tensors only): {e}"
                );
            }
        }
        _ => bail!(
            "parallel.backend {} moves CPU tensors, but this rank runs on {device:?}; \
             use parallel.backend nccl (or auto), or trainer.device cpu",
            format!("{backend:?}").to_lowercase()
        ),
    }
    // Collective over the MPI world: rank 0 makes the NCCL unique id and broadcasts it.
    let timeout = Duration::from_secs(cfg.parallel.timeout_s);
    let nccl = NcclComm::new(mpi_world.as_mut(), index, timeout)
        .map_err(|e| anyhow!("creating the NCCL communicator on {device:?}: {e}"))?;
    Ok(Box::new(nccl))
}

/// The checkpoint `--init-from` names, by the lookup rule of `--resume`.
fn init_from(opts: &TrainOpts) -> anyhow::Result<Option<std::path::PathBuf>> {
    opts.init_from
        .as_deref()
        .map(|p| crate::ckpt_lookup::resolve("--init-from", p))
        .transpose()
}

/// One line saying what runs where.
fn announce(cfg: &ExperimentConfig, opts: &TrainOpts, device: tch::Device) {
    let params = match moe_model::count::count_params(&cfg.model, &cfg.moe) {
        Ok(c) => format!(
            "{} params ({} active)",
            crate::inspect_cmd::short(c.total()),
            crate::inspect_cmd::short(c.active())
        ),
        Err(e) => format!("params unknown ({e})"),
    };
    print_line(&format!(
        "moe train: {} ({}{}) on {} rank(s), ep_size {}, {params}, device {}, {}, out_dir {}",
        cfg.run.name,
        opts.config_path.display(),
        if opts.overrides.is_empty() {
            String::new()
        } else {
            format!(" {}", opts.overrides.join(" "))
        },
        opts.world_size,
        cfg.parallel.ep_size,
        describe(device),
        cfg.trainer.precision.name(),
        cfg.run.out_dir.display()
    ));
}

/// One rule for `trainer.precision: bf16`, whatever `trainer.device` says: it needs the
/// device the run actually got to be a GPU (`moe check` already refuses an explicit `cpu`;
/// this catches `auto` on a machine without one).
fn check_precision(cfg: &ExperimentConfig, device: tch::Device) -> anyhow::Result<()> {
    if cfg.trainer.precision == Precision::Bf16 && !device.is_cuda() {
        return Err(BadInput(format!(
            "trainer.precision (bf16) needs a CUDA device, but trainer.device ({}) resolved to \
             {device:?}; use trainer.precision fp32 on a CPU",
            cfg.trainer.device
        ))
        .into());
    }
    Ok(())
}

/// SIGINT/SIGTERM set a flag; the trainer finishes its step, checkpoints and exits 0.
fn install_stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    crate::signals::install(flag.clone());
    flag
}

fn report(cfg: &ExperimentConfig, opts: &TrainOpts, s: &TrainSummary) {
    if let Some(last) = s.records.last() {
        print_line(&format!(
            "{}: {} steps, final loss {:.4}{}; metrics in {}",
            if s.interrupted { "stopped" } else { "done" },
            last.step,
            last.loss,
            s.evals
                .last()
                .map(|e| format!(", val_loss {:.4}", e.val_loss))
                .unwrap_or_default(),
            cfg.run.out_dir.join("metrics.jsonl").display()
        ));
    } else if s.bad_steps == 0 && !s.interrupted {
        print_line(&format!(
            "nothing to do: the run in {} already reached trainer.max_steps ({}); raise it with --set trainer.max_steps=N to train on, or pick another run.out_dir",
            cfg.run.out_dir.display(),
            cfg.trainer.max_steps
        ));
    }
    if s.bad_steps > 0 {
        print_line(&format!(
            "skipped {} step(s) with non-finite values (see the log above)",
            s.bad_steps
        ));
    }
    if let Some(c) = &s.last_checkpoint {
        print_line(&format!("checkpoint: {}", c.display()));
    }
    if s.interrupted {
        let sets: String = opts
            .overrides
            .iter()
            .map(|o| format!(" --set {}", shell_quote(o)))
            .collect();
        // The program as it was started (`target/release/moe`, or the absolute path `moe
        // launch` gives its ranks), so that the line runs when pasted.
        let prog = std::env::args().next().unwrap_or_else(|| "moe".into());
        let prog = shell_quote(&prog);
        let launcher = if opts.processes > 1 {
            format!("{prog} launch --np {} -- ", opts.processes)
        } else {
            format!("{prog} ")
        };
        print_line(&format!(
            "to resume: {launcher}train --config {}{sets} --resume auto",
            shell_quote(&opts.config_path.display().to_string())
        ));
    }
}

/// `s` as one shell word: as is when it is made of safe characters, else single-quoted.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
