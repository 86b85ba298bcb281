//! `moe export`: a checkpoint to a Hugging Face folder (`moe_trainer::hf::export`); this
//! file only parses, calls and reports.

use crate::exit_code::BadInput;
use clap::{Args, ValueEnum};
use moe_trainer::hf::{self, Arch, ExportDtype, ExportOptions, HfError};
use std::path::PathBuf;

/// Target architecture of `--arch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchArg {
    /// `MixtralForCausalLM`.
    Mixtral,
    /// `Qwen2MoeForCausalLM`.
    #[value(name = "qwen2_moe")]
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`.
    #[value(name = "qwen3_moe")]
    Qwen3Moe,
}

/// Weight dtype of `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Fp32,
    Bf16,
}

/// `moe export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Checkpoint directory (`step-N/`), or a run directory (its newest intact checkpoint).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// New output folder (must not exist, or be empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Target architecture; inferred when exactly one fits the model.
    #[arg(long, value_enum)]
    pub arch: Option<ArchArg>,
    /// Weight dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::Fp32)]
    pub dtype: DtypeArg,
    /// Largest safetensors shard in bytes; bigger models get several shards and an index.
    #[arg(long, value_name = "BYTES", default_value_t = hf::DEFAULT_MAX_SHARD_BYTES)]
    pub max_shard_size: u64,
    /// tokenizer.json to ship with the model (AutoTokenizer loads it) instead of the one the
    /// checkpoint stores (a run with data.tokenizer stores its own; byte-level runs have none).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
}

/// Maps an export/import error to the binary's exit codes: bad input 2, failure 1.
pub fn hf_error(e: HfError) -> anyhow::Error {
    match e {
        HfError::Input(m) => BadInput(m).into(),
        HfError::Failed(m) => anyhow::anyhow!(m),
    }
}

/// Runs `moe export`.
pub fn run_export(a: &ExportArgs) -> anyhow::Result<()> {
    let ckpt = crate::ckpt_lookup::resolve("--checkpoint", &a.checkpoint)?;
    let opts = ExportOptions {
        arch: a.arch.map(|x| match x {
            ArchArg::Mixtral => Arch::Mixtral,
            ArchArg::Qwen2Moe => Arch::Qwen2Moe,
            ArchArg::Qwen3Moe => Arch::Qwen3Moe,
        }),
        dtype: match a.dtype {
            DtypeArg::Fp32 => ExportDtype::F32,
            DtypeArg::Bf16 => ExportDtype::Bf16,
        },
        max_shard_bytes: a.max_shard_size.max(1),
        tokenizer: a.tokenizer.clone(),
    };
    let report = hf::export(&ckpt, &a.out, &opts).map_err(hf_error)?;
    for n in &report.notes {
        println!("{n}");
    }
    println!(
        "exported {} as {} ({} tensors): {} [{}]",
        ckpt.display(),
        report.arch.name(),
        report.tensors,
        report.out.display(),
        report.files.join(", ")
    );
    Ok(())
}
