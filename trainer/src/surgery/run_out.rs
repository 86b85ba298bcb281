//! The output side every surgery shares: a new run directory (staged, committed all or
//! nothing) with `config.yaml`, a step-0 checkpoint with fresh AdamW state written by the
//! [`Checkpointer`], and `surgery.json`; plus the before/after validation loss.

use super::report::SurgeryReport;
use crate::checkpoint::{Checkpointer, Snapshot, TOKENIZER_FILE};
use crate::config::ExperimentConfig;
use crate::data::{load_dataset, Dataset};
use crate::hf::outdir::Staging;
use crate::hf::HfError;
use crate::inference::{compute_kind, rank_val_loss, EvalModel};
use moe_model::transformer::TransformerLm;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::Device;

/// File name of the report beside `config.yaml` and `checkpoints/`.
pub const REPORT_FILE: &str = "surgery.json";

/// A failed run (exit 1), as opposed to bad input.
pub(super) fn failed(e: impl std::fmt::Display) -> HfError {
    HfError::Failed(e.to_string())
}

/// A run directory being written.
#[derive(Debug)]
pub struct StagedRun {
    staging: Staging,
    run_dir: PathBuf,
}

impl StagedRun {
    /// Refuses an existing non-empty `run_dir` (nothing is written then) and points `cfg` at
    /// it (`run.out_dir`, `run.name`, checkpoints under it), then validates `cfg` for one
    /// process.
    pub fn new(run_dir: &Path, cfg: &mut ExperimentConfig) -> Result<Self, HfError> {
        let abs = std::path::absolute(run_dir)
            .map_err(|e| HfError::Input(format!("--out {}: {e}", run_dir.display())))?;
        cfg.run.out_dir = abs.clone();
        cfg.run.name = abs
            .file_name()
            .map_or_else(|| "surgery".into(), |n| n.to_string_lossy().into_owned());
        cfg.checkpoint.dir = None;
        let mut single = cfg.clone();
        single.parallel.ep_size = 1;
        let errs = single.validate(1);
        if !errs.is_empty() {
            return Err(HfError::Input(format!(
                "the resulting config is invalid:\n  {}",
                errs.join("\n  ")
            )));
        }
        let staging = Staging::new(&abs).map_err(|e| match e {
            HfError::Input(m) => HfError::Input(format!("--out {m}")),
            other => other,
        })?;
        Ok(Self {
            staging,
            run_dir: abs,
        })
    }

    /// The final run directory.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Writes `config.yaml`, the model as a step-0 checkpoint with zero AdamW moments (so it
    /// resumes like a new run), and `surgery.json`, then moves the directory into place.
    /// A tokenizer (`data.tokenizer`, usually the source checkpoint's copy) is copied into
    /// the new run (`tokenizer.json`, which its config then names) and into its checkpoint,
    /// so the result does not depend on the source checkpoint staying on disk.
    /// Returns `report` with its checkpoint path filled in.
    pub fn finish(
        self,
        cfg: &ExperimentConfig,
        model: &TransformerLm,
        extra: serde_json::Value,
        render_yaml: &dyn Fn(&ExperimentConfig) -> Result<String, String>,
        mut report: SurgeryReport,
    ) -> Result<SurgeryReport, HfError> {
        let dir = self.staging.dir().to_path_buf();
        let mut cfg = cfg.clone();
        let tokenizer = cfg.data.tokenizer_file().map(Path::to_path_buf);
        if let Some(src) = &tokenizer {
            let to = dir.join(TOKENIZER_FILE);
            std::fs::copy(src, &to).map_err(|e| {
                failed(format!(
                    "copying {} to {}: {e}",
                    src.display(),
                    to.display()
                ))
            })?;
            cfg.data.tokenizer = self.run_dir.join(TOKENIZER_FILE);
        }
        let cfg = &cfg;
        let params = model.params();
        let mut optim = Vec::with_capacity(2 * params.len());
        for p in &params {
            for stat in ["exp_avg", "exp_avg_sq"] {
                optim.push((
                    format!("{}.{stat}", p.name),
                    p.tensor.f_zeros_like().map_err(failed)?,
                ));
            }
        }
        let snapshot = Snapshot {
            step: 0,
            optim_step: 0,
            extra,
            config_yaml: serde_json::to_string_pretty(cfg)
                .map_err(|e| failed(format!("serialising the config: {e}")))?,
            ..Snapshot::from_params(&params, &model.buffers(), optim).map_err(failed)?
        };
        let yaml = render_yaml(cfg).map_err(HfError::Failed)?;
        let yaml_path = dir.join("config.yaml");
        std::fs::write(&yaml_path, yaml)
            .map_err(|e| failed(format!("{}: {e}", yaml_path.display())))?;
        let mut ckpt = Checkpointer::new(dir.join("checkpoints"), 1, 0, 0, 1, 1)
            .and_then(|c| c.with_tokenizer(tokenizer.as_deref()))
            .map_err(failed)?;
        let written = ckpt.save(snapshot).map_err(failed)?;
        ckpt.wait().map_err(failed)?;
        let step_dir = written.file_name().map(PathBuf::from).unwrap_or_default();
        report.checkpoint = self.run_dir.join("checkpoints").join(step_dir);
        report.run_dir = self.run_dir.clone();
        let json_path = dir.join(REPORT_FILE);
        let json = serde_json::to_string_pretty(&report).map_err(failed)?;
        std::fs::write(&json_path, json + "\n")
            .map_err(|e| failed(format!("{}: {e}", json_path.display())))?;
        self.staging.commit()?;
        Ok(report)
    }
}

/// The run's validation data, as `moe eval` loads it.
pub fn load_val_data(cfg: &ExperimentConfig) -> Result<Arc<Dataset>, String> {
    load_dataset(&cfg.data, cfg.model.vocab_size).map_err(|e| e.to_string())
}

/// The mean validation loss of a single-process `model` over the batches the `world` ranks
/// of its run read, as `moe eval` computes it (step 0, fp32 or the configured precision).
pub fn val_loss(
    model: &TransformerLm,
    cfg: &ExperimentConfig,
    dataset: &Dataset,
    world: i64,
) -> Result<f64, HfError> {
    let m = EvalModel {
        model,
        device: Device::Cpu,
        compute_kind: compute_kind(&cfg.trainer.precision),
    };
    let mut sum = 0.0;
    for rank in 0..world {
        sum += rank_val_loss(&m, dataset, cfg, world, rank, 0).map_err(failed)?;
    }
    Ok(sum / world as f64)
}
