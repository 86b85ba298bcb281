//! `moe upcycle`: a dense checkpoint to an MoE run directory (`moe_trainer::surgery::upcycle`);
//! this file only parses, calls and reports.

use crate::config_load::to_yaml;
use crate::export_cmd::hf_error;
use clap::Args;
use moe_trainer::config::ExperimentConfig;
use moe_trainer::surgery::{self, SurgeryReport, UpcycleOptions};
use std::path::PathBuf;

/// `moe upcycle`.
#[derive(Debug, Args)]
pub struct UpcycleArgs {
    /// Dense checkpoint (`step-N/`), or a run directory (its newest intact checkpoint).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Routed experts per MoE layer.
    #[arg(long, value_name = "E")]
    pub experts: i64,
    /// Experts per token (a multiple of --granularity).
    #[arg(long, value_name = "K")]
    pub top_k: i64,
    /// Cut each dense FFN into G narrower experts (granular upcycling); 1 copies it whole.
    #[arg(long, value_name = "G", default_value_t = 1)]
    pub granularity: i64,
    /// New run directory: gets config.yaml, checkpoints/ and surgery.json (must not exist,
    /// or be empty).
    #[arg(long, value_name = "RUN_DIR")]
    pub out: PathBuf,
}

/// Prints a surgery's report and how to continue.
pub fn print_report(r: &SurgeryReport) {
    for line in r.lines() {
        println!("{line}");
    }
    println!(
        "wrote {}: config {}, checkpoint {}, report {}",
        r.run_dir.display(),
        r.run_dir.join("config.yaml").display(),
        r.checkpoint.display(),
        r.run_dir.join(surgery::run_out::REPORT_FILE).display()
    );
    println!(
        "continue training: moe train --config {} --resume auto",
        r.run_dir.join("config.yaml").display()
    );
}

/// Runs `moe upcycle`.
pub fn run_upcycle(a: &UpcycleArgs) -> anyhow::Result<()> {
    // Nothing to share: under mpirun rank 0 writes, the others exit.
    crate::surgery_ranks::run_ranks("upcycle", false, |_| {
        let ckpt = crate::ckpt_lookup::resolve("--checkpoint", &a.checkpoint)?;
        let render = |cfg: &ExperimentConfig| to_yaml(cfg).map_err(|e| e.to_string());
        let opts = UpcycleOptions {
            experts: a.experts,
            top_k: a.top_k,
            granularity: a.granularity,
        };
        let r = surgery::upcycle(&ckpt, &a.out, &opts, &render).map_err(hf_error)?;
        print_report(&r);
        Ok(())
    })?;
    Ok(())
}
