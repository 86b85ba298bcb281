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
    /// The K experts with the largest summed routing weight on the calibration batches.
    Weighted,
}

/// `moe slim`.
#[derive(Debug, Args)]
pub struct SlimArgs {
    /// Checkpoint (`step-N/`, any EP size), or a run directory (its newest intact checkpoint).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Routed experts to keep per MoE layer (1..=moe.num_experts); top_k is clamped to it.
    #[arg(long, value_name = "K")]
    pub experts: Option<i64>,
    /// Which experts to keep.
    #[arg(long, value_enum, default_value_t = CriterionArg::Frequency)]
    pub expert_criterion: CriterionArg,
    /// Fold each dropped expert into the kept one with the most similar router column
    /// (cosine), weighted by routing frequency.
    #[arg(long)]
    pub merge: bool,
    /// Remove this many blocks, those with the lowest Block Influence (1 - cosine of the
    /// block's input and output on the calibration tokens).
    #[arg(long, value_name = "L")]
    pub drop_layers: Option<i64>,
    /// Remove these blocks (0-based indices, comma-separated).
    #[arg(long, value_name = "I,J", value_delimiter = ',')]
    pub layers: Option<Vec<i64>>,
    /// Hidden units kept per routed expert (activation norm x output weight norm).
    #[arg(long, value_name = "H")]
    pub expert_hidden: Option<i64>,
    /// Hidden units kept per dense FFN block (activation norm x output weight norm).
    #[arg(long, value_name = "H")]
    pub ffn_hidden: Option<i64>,
    /// Training batches per source rank for the calibration forward.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub calib_batches: u64,
    /// Calibration data instead of the run's own: a UTF-8 text file or a token directory.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// New run directory: gets config.yaml, checkpoints/ and surgery.json (must not exist,
    /// or be empty).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: PathBuf,
}

/// Runs `moe slim`.
pub fn run_slim(a: &SlimArgs) -> anyhow::Result<()> {
    let render = |cfg: &ExperimentConfig| to_yaml(cfg).map_err(|e| e.to_string());
    let opts = SlimOptions {
        experts: a.experts,
        criterion: match a.expert_criterion {
            CriterionArg::Random => ExpertCriterion::Random,
            CriterionArg::Frequency => ExpertCriterion::Frequency,
            CriterionArg::Weighted => ExpertCriterion::Weighted,
        },
        merge: a.merge,
        drop_layers: a.drop_layers,
        layers: a.layers.clone(),
        expert_hidden: a.expert_hidden,
        ffn_hidden: a.ffn_hidden,
        calib_batches: a.calib_batches,
        data: a.data.clone(),
    };
    // Under mpirun the calibration batches are split over the processes; rank 0 writes.
    crate::surgery_ranks::run_ranks("slim", opts.needs_calibration(), |share| {
        let ckpt = crate::ckpt_lookup::resolve("--checkpoint", &a.checkpoint)?;
        let r = surgery::slim_shared(&ckpt, &a.out, &opts, &render, share).map_err(hf_error)?;
        if let Some(r) = r {
            print_report(&r);
        }
        Ok(())
    })?;
    Ok(())
}
