//! `moe train`: the config is loaded and validated by the caller; this runs the training.

use crate::cli::Resume;
use moe_trainer::config::ExperimentConfig;
use std::path::PathBuf;

/// Everything `moe train` knows besides the config.
// Until `run_train` is wired, nothing reads the fields.
#[allow(dead_code)]
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

/// Runs training. Writes `<out_dir>/config.yaml` (`crate::config_load::to_yaml`) when it starts.
pub fn run_train(cfg: ExperimentConfig, opts: TrainOpts) -> anyhow::Result<()> {
    let _ = (cfg, opts);
    anyhow::bail!("train not wired yet")
}
