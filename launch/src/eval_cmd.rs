//! `moe eval`: the validation loss and perplexity of a checkpoint, computed in one process
//! exactly as the training loop's periodic eval computes them (same batches, same code:
//! `moe_trainer::inference::rank_val_loss`), so the number equals the run's last `eval`
//! record in metrics.jsonl.
//!
//! Also home of what `moe generate` shares: finding the checkpoint and its config.

use crate::config_load;
use crate::device::resolve_device;
use crate::exit_code::BadInput;
use crate::threads::set_threads;
use anyhow::{anyhow, Context};
use moe_trainer::checkpoint::{read_manifest, stored_tokenizer, Manifest};
use moe_trainer::config::{Backend, ExperimentConfig};
use moe_trainer::data::load_dataset;
use moe_trainer::inference::{compute_kind, load_single, rank_val_loss, EvalModel};
use moe_trainer::TrainError;
use std::path::{Path, PathBuf};

/// A checkpoint and the config to use it with.
pub struct CheckpointSetup {
    /// The checkpoint directory (`.../step-00000100`).
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The config: the one stored in the checkpoint, or `--config`, with `--set` applied.
    pub config: ExperimentConfig,
}

/// Resolves `checkpoint` (a checkpoint directory, or a directory of them, or a run's out_dir:
/// the newest intact checkpoint), reads its manifest and the config to use: `config` if
/// given, else the one the run stored in the manifest; `sets` apply to either, through the
/// same loader as `moe train`'s. The config is validated for one process (the parallel
/// section does not matter: the model is built at EP size 1 and checkpoints store experts by
/// global id).
pub fn setup(
    checkpoint: &Path,
    config: Option<&Path>,
    sets: &[String],
) -> anyhow::Result<CheckpointSetup> {
    let path = crate::ckpt_lookup::resolve("--checkpoint", checkpoint)?;
    let manifest = read_manifest(&path).map_err(bad_checkpoint)?;
    let mut loaded = match config {
        Some(file) => config_load::load(file, sets)?,
        None => stored_config(&path, &manifest, sets)?,
    };
    // One process, one rank: the model is built at EP size 1 whatever the run used.
    loaded.config.parallel.ep_size = 1;
    loaded.config.parallel.backend = Backend::Local;
    use_stored_tokenizer(&path, &manifest, &mut loaded.config)?;
    loaded.validate(1, Vec::new())?;
    Ok(CheckpointSetup {
        path,
        manifest,
        config: loaded.config,
    })
}

/// The tokenizer the checkpoint stores (the one the model was trained with) replaces
/// `data.tokenizer`, so the original file need not exist any more.
fn use_stored_tokenizer(
    path: &Path,
    manifest: &Manifest,
    cfg: &mut ExperimentConfig,
) -> anyhow::Result<()> {
    if let Some(tok) = stored_tokenizer(path, manifest).map_err(bad_checkpoint)? {
        cfg.data.tokenizer = tok;
    }
    Ok(())
}

/// The config the run stored in the manifest (JSON, which the YAML loader reads), with the
/// `--set` overrides applied as to a config file. It is typed once without them first, so a
/// stored config from another build is reported as such, not blamed on an override.
fn stored_config(
    path: &Path,
    manifest: &Manifest,
    sets: &[String],
) -> anyhow::Result<config_load::LoadedConfig> {
    let where_ = path.join("manifest.json");
    let stored = config_load::load_text(&manifest.config_yaml, &where_, &[]).map_err(|e| {
        BadInput(format!(
            "the stored config (config_yaml) does not fit this build's schema: {e}; pass \
             --config FILE"
        ))
    })?;
    if sets.is_empty() {
        return Ok(stored);
    }
    Ok(config_load::load_text(
        &manifest.config_yaml,
        &where_,
        sets,
    )?)
}

/// Checkpoint problems (missing, damaged, not fitting the config) are input to fix: exit 2.
pub fn bad_checkpoint(e: TrainError) -> anyhow::Error {
    match e {
        TrainError::Checkpoint { .. } | TrainError::File { .. } => BadInput(e.to_string()).into(),
        other => anyhow!("{other}"),
    }
}

/// Runs `moe eval`: prints `val_loss X  ppl Y  (N tokens, checkpoint step S)`, or with
/// `json` one object with `val_loss`, `val_ppl`, `tokens`, `step`, `checkpoint`.
///
/// The run's world size W decides which validation windows each rank read; the W ranks'
/// batches are evaluated one after another here and averaged like the loop's all-reduce.
/// Expert capacity applies per rank's batch as in training (each rank's batch is one
/// forward), so dropping matches too.
pub fn run_eval(
    checkpoint: &Path,
    config: Option<&Path>,
    sets: &[String],
    json: bool,
) -> anyhow::Result<()> {
    let s = setup(checkpoint, config, sets)?;
    let cfg = &s.config;
    let device = resolve_device(&cfg.trainer.device, 0)?;
    set_threads(cfg.trainer.threads, 1);
    let (model, loaded) = load_single(cfg, &s.path, device).map_err(|e| match e {
        TrainError::Checkpoint { .. } if config.is_some() => {
            BadInput(crate::ckpt_mismatch::explain(
                &e.to_string(),
                &s.manifest.config_yaml,
                cfg,
                crate::ckpt_mismatch::EVAL_HINT,
            ))
            .into()
        }
        other => bad_checkpoint(other),
    })?;
    let dataset = load_dataset(&cfg.data, cfg.model.vocab_size)
        .map_err(|e| anyhow!("{e}"))
        .context("loading the validation data")?;
    let m = EvalModel {
        model: &model,
        device,
        compute_kind: compute_kind(&cfg.trainer.precision),
    };
    let world = s.manifest.world_size.max(1);
    let iters = cfg.trainer.eval_iters.max(1);
    let mut sum = 0.0;
    for rank in 0..world {
        sum += rank_val_loss(&m, &dataset, cfg, world, rank, loaded.step)
            .map_err(|e| anyhow!("{e}"))?;
    }
    let val_loss = sum / world as f64;
    let tokens = world as u64 * iters * cfg.trainer.batch_size as u64 * cfg.data.seq_len as u64;
    let ranks = if world > 1 {
        format!(", the batches of {world} ranks")
    } else {
        String::new()
    };
    if json {
        let obj = serde_json::json!({
            "val_loss": val_loss,
            "val_ppl": val_loss.exp(),
            "tokens": tokens,
            "step": loaded.step,
            "checkpoint": s.path,
        });
        println!("{obj}");
        return Ok(());
    }
    println!(
        "val_loss {val_loss:.6}  ppl {:.4}  ({tokens} tokens{ranks}, checkpoint step {})",
        val_loss.exp(),
        loaded.step
    );
    Ok(())
}
