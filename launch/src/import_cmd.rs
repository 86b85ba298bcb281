//! `moe import`: a Hugging Face folder to a run directory (`moe_trainer::hf::import`); this
//! file only parses, calls and reports.

use crate::config_load::to_yaml;
use crate::export_cmd::hf_error;
use clap::Args;
use moe_trainer::hf;
use std::path::PathBuf;

/// `moe import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Hugging Face model folder (config.json and model.safetensors or a sharded index).
    #[arg(long, value_name = "DIR")]
    pub hf: PathBuf,
    /// New run directory: gets config.yaml and checkpoints/ (must not exist, or be empty).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: PathBuf,
}

/// Runs `moe import`.
pub fn run_import(a: &ImportArgs) -> anyhow::Result<()> {
    let render =
        |cfg: &moe_trainer::config::ExperimentConfig| to_yaml(cfg).map_err(|e| e.to_string());
    let r = hf::import(&a.hf, &a.out, &render).map_err(hf_error)?;
    println!(
        "imported {} ({}, {} tensors) into {}: config {}, checkpoint {}",
        a.hf.display(),
        r.arch.name(),
        r.tensors,
        r.run_dir.display(),
        r.run_dir.join("config.yaml").display(),
        r.checkpoint.display()
    );
    println!(
        "continue training: moe train --config {} --resume auto",
        r.run_dir.join("config.yaml").display()
    );
    Ok(())
}
