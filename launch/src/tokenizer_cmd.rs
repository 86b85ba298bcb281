//! `moe tokenizer train` and `moe data prepare`: a byte-level BPE `tokenizer.json`, and the
//! token files `data.source: tokens` reads. Thin: parse, call `moe_trainer`, report.

use crate::exit_code::BadInput;
use clap::{Args, Subcommand};
use moe_trainer::data::prepare::{prepare_tokens, PrepareProgress};
use moe_trainer::tokenizer::{train_bpe, TextTokenizer};
use moe_trainer::TrainError;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

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
    /// Encode text files into train.bin / val.bin (uint16, or uint32 above 65536 ids) plus
    /// tokens.json.
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

/// The progress bar of `moe data prepare`, on stdout: on a terminal one line redrawn in place;
/// otherwise (a log file, CI) a plain line at every tenth of the input, so logs stay short.
struct PrepareBar {
    live: bool,
    /// Tenths of the input reported so far (plain lines only).
    shown: u64,
}

impl PrepareBar {
    fn update(&mut self, p: PrepareProgress) {
        let frac = p.done_bytes as f64 / p.total_bytes.max(1) as f64;
        let tenths = (frac * 10.0).floor() as u64;
        if !self.live && tenths <= self.shown && p.done_bytes < p.total_bytes {
            return;
        }
        self.shown = tenths;
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let line = format!(
            "[{}{}] {:>3.0}%  {:.1}/{:.1} MB encoded, {} tokens",
            "#".repeat(filled),
            "-".repeat(width - filled),
            frac * 100.0,
            p.done_bytes as f64 / 1e6,
            p.total_bytes as f64 / 1e6,
            p.tokens
        );
        let mut out = std::io::stdout().lock();
        let _ = if self.live {
            write!(out, "\r\x1b[2K{line}").and_then(|_| out.flush())
        } else {
            writeln!(out, "{line}")
        };
    }

    fn finish(&self) {
        if self.live {
            println!();
        }
    }
}

/// `p` made absolute (as the config loader stores paths), for a message to copy from.
fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

/// Runs `moe data prepare`.
pub fn run_data(a: &DataArgs) -> anyhow::Result<()> {
    let DataCommand::Prepare(p) = &a.command;
    let tok = TextTokenizer::load(&p.tokenizer).map_err(input_error)?;
    let mut bar = PrepareBar {
        live: std::io::stdout().is_terminal(),
        shown: 0,
    };
    let meta =
        prepare_tokens(&tok, &p.input, &p.out, &mut |pr| bar.update(pr)).map_err(input_error)?;
    bar.finish();
    println!(
        "wrote {}: train.bin {} tokens, val.bin {} tokens ({}), tokens.json (tokenizer sha256 \
         {}, {} ids)",
        p.out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.dtype.name(),
        meta.tokenizer_sha256,
        meta.vocab_size,
    );
    println!(
        "to train on it, set in the config (a relative path there is relative to the config \
         file's directory):\n  data.source: tokens\n  data.path: {}\n  data.tokenizer: {}\n  \
         model.vocab_size: {} (or more)",
        absolute(&p.out).display(),
        absolute(&p.tokenizer).display(),
        meta.vocab_size
    );
    Ok(())
}
