//! `moe tokenizer train` and `moe data prepare`: a byte-level BPE `tokenizer.json`, and the
//! token files `data.source: tokens` reads. Thin: parse, call `moe_trainer`, report.

use crate::exit_code::BadInput;
use clap::{Args, Subcommand};
use moe_trainer::data::prepare::prepare_tokens;
use moe_trainer::tokenizer::{train_bpe, TextTokenizer};
use moe_trainer::TrainError;
use std::path::PathBuf;

/// `moe tokenizer ...`.
#[derive(Debug, Args)]
pub struct TokenizerArgs {
    #[command(subcommand)]
    pub command: TokenizerCommand,
}

/// Tokenizer subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE on text files and write its tokenizer.json.
    Train(TokenizerTrainArgs),
}

/// `moe tokenizer train`.
#[derive(Debug, Args)]
pub struct TokenizerTrainArgs {
    /// UTF-8 text files to learn the merges from.
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    pub input: Vec<PathBuf>,
    /// Ids in the vocabulary: 256 bytes plus the merges (at least 256).
    #[arg(long, value_name = "N")]
    pub vocab_size: usize,
    /// Where to write tokenizer.json (must not exist).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// `moe data ...`.
#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

/// Data subcommands.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Encode text files into train.bin / val.bin (uint16) plus tokens.json.
    Prepare(DataPrepareArgs),
}

/// `moe data prepare`.
#[derive(Debug, Args)]
pub struct DataPrepareArgs {
    /// The tokenizer.json to encode with.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: PathBuf,
    /// UTF-8 text files, concatenated in order; the first 90% of the tokens train.
    #[arg(long, required = true, num_args = 1.., value_name = "FILE")]
    pub input: Vec<PathBuf>,
    /// New directory for train.bin, val.bin and tokens.json (absent or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Errors about the user's files are bad input (exit 2).
fn input_error(e: TrainError) -> anyhow::Error {
    match e {
        TrainError::File { .. } | TrainError::Data(_) | TrainError::Other(_) => {
            BadInput(e.to_string()).into()
        }
        other => anyhow::anyhow!("{other}"),
    }
}

/// Runs `moe tokenizer train`.
pub fn run_tokenizer(a: &TokenizerArgs) -> anyhow::Result<()> {
    let TokenizerCommand::Train(t) = &a.command;
    if t.out.exists() {
        return Err(BadInput(format!(
            "--out {}: exists; nothing was written (choose a new file)",
            t.out.display()
        ))
        .into());
    }
    let json = train_bpe(&t.input, t.vocab_size).map_err(input_error)?;
    if let Some(dir) = t.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&t.out, json)?;
    let tok = TextTokenizer::load(&t.out).map_err(input_error)?;
    println!(
        "wrote {} (byte-level BPE, {} ids, sha256 {})",
        t.out.display(),
        tok.vocab_size(),
        tok.sha256()
    );
    Ok(())
}

/// Runs `moe data prepare`.
pub fn run_data(a: &DataArgs) -> anyhow::Result<()> {
    let DataCommand::Prepare(p) = &a.command;
    let tok = TextTokenizer::load(&p.tokenizer).map_err(input_error)?;
    let mut progress = |done: usize, total: usize, file: &std::path::Path| {
        let width = 30;
        let filled = done * width / total.max(1);
        eprintln!(
            "[{}{}] {done}/{total} files encoded ({})",
            "#".repeat(filled),
            "-".repeat(width - filled),
            file.display()
        );
    };
    let meta = prepare_tokens(&tok, &p.input, &p.out, &mut progress).map_err(input_error)?;
    println!(
        "wrote {}: train.bin {} tokens, val.bin {} tokens (uint16), tokens.json (vocabulary {}); \
         train with data.source: tokens, data.path: {}, model.vocab_size >= {}",
        p.out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.vocab_size,
        p.out.display(),
        meta.vocab_size
    );
    Ok(())
}
