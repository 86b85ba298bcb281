//! `moe train`: picks the mode (single process, debug/threads ranks, or an MPI rank), builds
//! the process groups and runs the trainer on every rank. The config is loaded and validated
//! by the caller.

use crate::cli::Resume;
use crate::device::{describe, resolve_device, resolve_rank_device};
use crate::exit_code::BadInput;
use anyhow::{anyhow, bail, Context};
use moe_comm::{threads::threads_world_on, ProcessGroups};
use moe_trainer::checkpoint::find_latest_intact;
use moe_trainer::config::{Backend, DebugRanks, ExperimentConfig, Precision};
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
    /// The config file, for logs.
    pub config_path: PathBuf,
    /// The `--set` overrides as given, for logs.
    pub overrides: Vec<String>,
    /// Processes started by mpirun (1 outside it).
    pub processes: i64,
    /// The world size the config was validated for (`crate::world::world_size`).
    pub world_size: i64,
}

/// Runs `moe train`.
pub fn run_train(cfg: ExperimentConfig, opts: TrainOpts) -> anyhow::Result<()> {
    let stop = install_stop_flag();
    if opts.debug || cfg.parallel.backend == Backend::Threads {
        return run_threads(cfg, opts, stop);
    }
    if opts.processes > 1 || cfg.parallel.backend == Backend::Mpi {
        return run_mpi(cfg, opts, stop);
    }
    let resume = prepare_out_dir(&cfg, &opts)?;
    let device = resolve_device(&cfg.trainer.device, 0)?;
    check_precision(&cfg, device)?;
    if cfg.parallel.backend == Backend::Nccl && !device.is_cuda() {
        bail!(
            "parallel.backend is nccl, which needs CUDA tensors, but trainer.device {} resolved \
             to {device:?}; use parallel.backend local (or auto) on a CPU",
            cfg.trainer.device
        );
    }
    set_threads(cfg.trainer.threads, 1);
    announce(&cfg, &opts, device);
    let config_yaml = Some(crate::config_load::to_yaml(&cfg)?);
    let run = RunOptions {
        debug: false,
        resume,
        stop,
        config_yaml,
        ..RunOptions::default()
    };
    let summary =
        train(&cfg, ProcessGroups::single(device), device, &run).map_err(|e| anyhow!("{e}"))?;
    report(&cfg, &opts, &summary);
    Ok(())
}

/// Debug mode with `parallel.debug_ranks: virtual` (the default on a GPU): the P ranks'
/// batches concatenated and trained as one process whose router computes capacity per rank's
/// tokens, so each step equals P real ranks' (DESIGN.md's EP-equivalence reference) and no
/// collective blocks. The resolved config written to the run directory is the user's.
fn run_virtual_ranks(
    cfg: ExperimentConfig,
    opts: TrainOpts,
    stop: Arc<AtomicBool>,
    device: tch::Device,
    resume: Option<PathBuf>,
) -> anyhow::Result<()> {
    let p = cfg.parallel.ep_size;
    set_threads(cfg.trainer.threads, 1);
    announce(&cfg, &opts, device);
    if opts.debug {
        println!(
            "debug mode: {p} virtual expert-parallel rank(s) in one autograd graph on {device:?} \
             (their batches concatenated, capacity per rank, the exchange one permutation by \
             expert); routing invariants checked after every step"
        );
    }
    let config_yaml = Some(crate::config_load::to_yaml(&cfg)?);
    let mut single = cfg.clone();
    single.trainer.batch_size = cfg.trainer.batch_size * p;
    single.parallel.ep_size = 1;
    single.parallel.backend = Backend::Local;
    let run = RunOptions {
        debug: opts.debug,
        resume,
        stop,
        capacity_groups: p,
        quiet: false,
        config_yaml,
    };
    let summary =
        train(&single, ProcessGroups::single(device), device, &run).map_err(|e| anyhow!("{e}"))?;
    report(&cfg, &opts, &summary);
    Ok(())
}

/// Debug mode / threads backend: `parallel.ep_size` in-process ranks on one device.
fn run_threads(
    cfg: ExperimentConfig,
    opts: TrainOpts,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let p = usize::try_from(cfg.parallel.ep_size).context("parallel.ep_size")?;
    let device = resolve_device(&cfg.trainer.device, 0)?;
    check_precision(&cfg, device)?;
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
    let resume = prepare_out_dir(&cfg, &opts)?;
    if virtual_ranks {
        return run_virtual_ranks(cfg, opts, stop, device, resume);
    }
    set_threads(cfg.trainer.threads, p);
    announce(&cfg, &opts, device);
    if opts.debug {
        println!(
            "debug mode: {p} expert-parallel rank(s) in one process on {device:?} (threads backend); routing invariants checked after every step"
        );
    }
    let config_yaml = Some(crate::config_load::to_yaml(&cfg)?);
    let comms = threads_world_on(p, Duration::from_secs(cfg.parallel.timeout_s), device);
    let cfg = Arc::new(cfg);
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let cfg = cfg.clone();
            let run = RunOptions {
                debug: opts.debug,
                resume: resume.clone(),
                stop: stop.clone(),
                quiet: rank != 0,
                config_yaml: config_yaml.clone(),
                ..RunOptions::default()
            };
            std::thread::Builder::new()
                .name(format!("rank{rank}"))
                .spawn(move || -> anyhow::Result<TrainSummary> {
                    let groups = ProcessGroups::new(comm, p).map_err(|e| anyhow!("{e}"))?;
                    train(&cfg, groups, device, &run).map_err(|e| anyhow!("{e}"))
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
        bail!("rank {rank} failed: {e:#}");
    }
    if let Some(s) = rank0 {
        report(&cfg, &opts, &s);
    }
    Ok(())
}

/// One MPI rank under mpirun.
fn run_mpi(cfg: ExperimentConfig, opts: TrainOpts, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let runtime = moe_comm::mpi_backend::MpiRuntime::init().map_err(|e| anyhow!("{e}"))?;
    runtime.abort_on_panic();
    let world = runtime.world();
    let (rank, size) = (world.rank(), world.size());
    let errs = cfg.validate(size as i64);
    if !errs.is_empty() {
        if rank == 0 {
            eprintln!(
                "error: invalid config for a world of {size} ranks:\n  {}",
                errs.join("\n  ")
            );
        }
        runtime.abort(2);
    }
    let result = (|| -> anyhow::Result<TrainSummary> {
        // Every rank checks the same directory; the trainer's rank 0 writes config.yaml.
        let resume = prepare_out_dir_for(&cfg, &opts, rank == 0)?;
        let local_rank = runtime.local_rank();
        let device = resolve_rank_device(&cfg.trainer.device, local_rank, runtime.local_size())?;
        check_precision(&cfg, device)?;
        set_threads(cfg.trainer.threads, runtime.local_size());
        if rank == 0 {
            announce(&cfg, &opts, device);
        }
        let world = world_comm(&cfg, device, world)?;
        let groups =
            ProcessGroups::new(world, cfg.parallel.ep_size as usize).map_err(|e| anyhow!("{e}"))?;
        let config_yaml = if rank == 0 {
            Some(crate::config_load::to_yaml(&cfg)?)
        } else {
            None
        };
        let run = RunOptions {
            debug: false,
            resume,
            stop,
            quiet: rank != 0,
            config_yaml,
            ..RunOptions::default()
        };
        train(&cfg, groups, device, &run).map_err(|e| anyhow!("{e}"))
    })();
    match result {
        Ok(s) => {
            if rank == 0 {
                report(&cfg, &opts, &s);
            }
            Ok(())
        }
        Err(e) => {
            // Abort the whole job: peers blocked in a collective would otherwise hang.
            eprintln!("rank {rank} of {size}: error: {e:#}");
            runtime.abort(i32::from(crate::exit_code::exit_code(&e)));
        }
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

/// Checks the output directory and resolves `--resume`. Nothing is written here: the trainer
/// writes `config.yaml` once the data and checkpoint have loaded, so a run that fails on
/// them leaves `out_dir` as it was.
fn prepare_out_dir(cfg: &ExperimentConfig, opts: &TrainOpts) -> anyhow::Result<Option<PathBuf>> {
    prepare_out_dir_for(cfg, opts, true)
}

/// A fresh run refuses a directory that already holds a run (nothing is written over);
/// `--resume auto` takes the newest intact checkpoint (or starts fresh if there is none),
/// `--resume PATH` that checkpoint.
fn prepare_out_dir_for(
    cfg: &ExperimentConfig,
    opts: &TrainOpts,
    is_rank0: bool,
) -> anyhow::Result<Option<PathBuf>> {
    let out = &cfg.run.out_dir;
    let ckpt_dir = cfg
        .checkpoint
        .dir
        .clone()
        .unwrap_or_else(|| out.join("checkpoints"));
    let resume = match &opts.resume {
        None => {
            let existing = [out.join("metrics.jsonl"), ckpt_dir.clone()];
            if let Some(found) = existing.iter().find(|p| p.exists()) {
                bail!(
                    "run.out_dir {} already holds a run ({} exists); pass --resume auto to continue it, or set another run.out_dir (e.g. --set run.out_dir=runs/new)",
                    out.display(),
                    found.display()
                );
            }
            None
        }
        Some(Resume::Path(p)) => {
            if !p.join("manifest.json").exists() {
                bail!(
                    "--resume {}: not a checkpoint directory (no manifest.json)",
                    p.display()
                );
            }
            Some(p.clone())
        }
        Some(Resume::Auto) => match find_latest_intact(&ckpt_dir).map_err(|e| anyhow!("{e}"))? {
            Some((path, warnings)) => {
                for w in warnings {
                    eprintln!("warning: {w}");
                }
                Some(path)
            }
            None => {
                if is_rank0 {
                    eprintln!(
                        "--resume auto: no checkpoint in {}; starting from step 0",
                        ckpt_dir.display()
                    );
                }
                None
            }
        },
    };
    Ok(resume)
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
    println!(
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
        match cfg.trainer.precision {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        },
        cfg.run.out_dir.display()
    );
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

/// Torch intra-op threads per rank: the configured number, or this node's cores divided by
/// its ranks (at least one), so ranks do not fight over cores.
fn set_threads(configured: i64, ranks_on_node: usize) {
    let n = if configured > 0 {
        configured
    } else {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (cores / ranks_on_node.max(1)).max(1) as i64
    };
    tch::set_num_threads(n as i32);
}

/// SIGINT/SIGTERM set a flag; the trainer finishes its step, checkpoints and exits 0.
fn install_stop_flag() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    crate::signals::install(flag.clone());
    flag
}

fn report(cfg: &ExperimentConfig, opts: &TrainOpts, s: &TrainSummary) {
    if let Some(last) = s.records.last() {
        println!(
            "{}: {} steps, final loss {:.4}{}; metrics in {}",
            if s.interrupted { "stopped" } else { "done" },
            last.step,
            last.loss,
            s.evals
                .last()
                .map(|e| format!(", val_loss {:.4}", e.val_loss))
                .unwrap_or_default(),
            cfg.run.out_dir.join("metrics.jsonl").display()
        );
    } else if s.bad_steps == 0 && !s.interrupted {
        println!(
            "nothing to do: the run in {} already reached trainer.max_steps ({}); raise it with --set trainer.max_steps=N to train on, or pick another run.out_dir",
            cfg.run.out_dir.display(),
            cfg.trainer.max_steps
        );
    }
    if s.bad_steps > 0 {
        println!(
            "skipped {} step(s) with non-finite values (see the log above)",
            s.bad_steps
        );
    }
    if let Some(c) = &s.last_checkpoint {
        println!("checkpoint: {}", c.display());
    }
    if s.interrupted {
        let sets: String = opts
            .overrides
            .iter()
            .map(|o| format!(" --set {}", shell_quote(o)))
            .collect();
        let launcher = if opts.processes > 1 {
            format!("moe launch --np {} -- ", opts.processes)
        } else {
            String::new()
        };
        println!(
            "to resume: {launcher}moe train --config {}{sets} --resume auto",
            shell_quote(&opts.config_path.display().to_string())
        );
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
