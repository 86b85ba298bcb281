//! `moe slim`: keep K experts per MoE layer of a checkpoint (`moe_trainer::surgery::slim`);
//! this file only parses, calls and reports.

use crate::config_load::to_yaml;
use crate::export_cmd::hf_error;
use crate::upcycle_cmd::print_report;
use clap::{Args, ValueEnum};
use moe_trainer::config::ExperimentConfig;
use moe_trainer::surgery::{self, ExpertCriterion, SlimOptions};
use std::path::PathBuf;

/// `--expert-criterion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CriterionArg {
    /// K experts drawn at random per layer (seeded by run.seed).
    Random,
    /// The K experts the router chose most often on the calibration batches.
    Frequency,
}

/// `moe slim`.
#[derive(Debug, Args)]
pub struct SlimArgs {
    /// Checkpoint (`step-N/`, any EP size), or a run directory (its newest intact checkpoint).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Routed experts to keep per MoE layer (1..=moe.num_experts); top_k is clamped to it.
    #[arg(long, value_name = "K")]
    pub experts: i64,
    /// Which experts to keep.
    #[arg(long, value_enum, default_value_t = CriterionArg::Frequency)]
    pub expert_criterion: CriterionArg,
    /// Training batches of the run's own data for the calibration forward (frequency).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub calib_batches: u64,
    /// New run directory: gets config.yaml, checkpoints/ and surgery.json (must not exist,
    /// or be empty).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: PathBuf,
}

/// Runs `moe slim`.
pub fn run_slim(a: &SlimArgs) -> anyhow::Result<()> {
    crate::upcycle_cmd::refuse_mpirun("slim")?;
    let ckpt = crate::ckpt_lookup::resolve("--checkpoint", &a.checkpoint)?;
    let render = |cfg: &ExperimentConfig| to_yaml(cfg).map_err(|e| e.to_string());
    let opts = SlimOptions {
        experts: a.experts,
        criterion: match a.expert_criterion {
            CriterionArg::Random => ExpertCriterion::Random,
            CriterionArg::Frequency => ExpertCriterion::Frequency,
        },
        calib_batches: a.calib_batches,
    };
    let r = surgery::slim(&ckpt, &a.out, &opts, &render).map_err(hf_error)?;
    print_report(&r);
    Ok(())
}
