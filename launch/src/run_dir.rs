//! The run directory (`run.out_dir`) before training starts. A fresh run refuses a directory
//! that already holds a run (nothing is written over) unless `--overwrite`, which deletes what
//! the earlier run left; `--resume auto` takes the newest intact checkpoint of this run (or
//! starts fresh if there is none), `--resume PATH` the checkpoint `PATH` names
//! (`crate::ckpt_lookup`). Otherwise nothing is written here: the trainer writes
//! `config.yaml` once the data and checkpoint have loaded, so a run that fails on them leaves
//! `out_dir` as it was. Once this check passes, rank 0's output also goes to
//! `<out_dir>/train.log` as soon as the directory exists (`crate::run_log`).

use crate::cli::Resume;
use crate::exit_code::BadInput;
use anyhow::anyhow;
use moe_trainer::checkpoint::{find_latest_intact, read_manifest};
use moe_trainer::config::ExperimentConfig;
use std::path::{Path, PathBuf};

/// Checks `run.out_dir` for a fresh run (or clears it with `overwrite`) and resolves
/// `resume` to a checkpoint directory. Every rank calls it; only `is_rank0` deletes and
/// prints, so an MPI job does it once.
pub fn prepare(
    cfg: &ExperimentConfig,
    resume: Option<&Resume>,
    overwrite: bool,
    is_rank0: bool,
) -> anyhow::Result<Option<PathBuf>> {
    let out = &cfg.run.out_dir;
    let ckpt_dir = checkpoint_dir(cfg);
    let found = match resume {
        None => {
            let existing = [out.join("metrics.jsonl"), ckpt_dir.clone()];
            let held = existing.iter().find(|p| p.exists());
            match held {
                Some(_) if overwrite && is_rank0 => {
                    remove_run(out, &ckpt_dir)?;
                    eprintln!(
                        "--overwrite: removed the earlier run in {} (metrics, TensorBoard \
                         events, checkpoints, config.yaml, train.log)",
                        out.display()
                    );
                }
                // Other ranks leave the deleting to rank 0.
                Some(_) if overwrite => {}
                Some(found) => {
                    return Err(BadInput(format!(
                        "run.out_dir {} already holds a run ({} exists); pass --resume auto to \
                         continue it, --overwrite to start over, or pick another run directory \
                         (e.g. --set run.name=new trains into runs/new)",
                        out.display(),
                        found.display()
                    ))
                    .into())
                }
                None => {}
            }
            None
        }
        Some(Resume::Path(p)) => Some(crate::ckpt_lookup::resolve("--resume", p)?),
        Some(Resume::Auto) => {
            let latest = find_latest_intact(&ckpt_dir)
                .map_err(|e| BadInput(format!("--resume auto: {e}")))?;
            match latest {
                Some((path, warnings)) => {
                    if is_rank0 {
                        for w in warnings {
                            eprintln!("warning: {w}");
                        }
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
            }
        }
    };
    if let (Some(path), true) = (&found, is_rank0) {
        if let Some(w) = schedule_change(cfg, path) {
            eprintln!("warning: {w}");
        }
    }
    if is_rank0 {
        crate::run_log::log_to(out);
    }
    Ok(found)
}

/// `checkpoint.dir`, else `<run.out_dir>/checkpoints`.
pub fn checkpoint_dir(cfg: &ExperimentConfig) -> PathBuf {
    cfg.checkpoint
        .dir
        .clone()
        .unwrap_or_else(|| cfg.run.out_dir.join("checkpoints"))
}

/// Deletes what a run writes: `metrics.jsonl`, `config.yaml`, `train.log`, TensorBoard event
/// files and the checkpoint directory. Other files in `out` are the user's and stay.
fn remove_run(out: &Path, ckpt_dir: &Path) -> anyhow::Result<()> {
    let rm_file = |p: &Path| match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow!("--overwrite: cannot remove {}: {e}", p.display()))
        }
        _ => Ok(()),
    };
    rm_file(&out.join("metrics.jsonl"))?;
    rm_file(&out.join("config.yaml"))?;
    rm_file(&out.join(crate::run_log::LOG_FILE))?;
    if let Ok(entries) = std::fs::read_dir(out) {
        for e in entries.flatten() {
            let name = e.file_name();
            if name.to_string_lossy().starts_with("events.out.tfevents.") {
                rm_file(&e.path())?;
            }
        }
    }
    match std::fs::remove_dir_all(ckpt_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(anyhow!(
            "--overwrite: cannot remove {}: {e}",
            ckpt_dir.display()
        )),
        _ => Ok(()),
    }
}

/// A warning when the checkpoint's run had another `trainer.max_steps`: the learning-rate
/// schedule (warmup, cosine decay to `min_lr` at `max_steps`) then changes mid-run.
fn schedule_change(cfg: &ExperimentConfig, ckpt: &Path) -> Option<String> {
    let manifest = read_manifest(ckpt).ok()?;
    let saved: serde_json::Value = serde_json::from_str(&manifest.config_yaml).ok()?;
    let old = saved.get("trainer")?.get("max_steps")?.as_u64()?;
    let new = cfg.trainer.max_steps;
    (old != new).then(|| {
        format!(
            "trainer.max_steps is {new} but the checkpoint's run had {old}: the learning-rate \
             schedule now decays to trainer.min_lr at step {new} instead of step {old}"
        )
    })
}
