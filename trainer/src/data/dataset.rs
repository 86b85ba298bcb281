//! A loaded corpus: the two splits in memory, and batches drawn from them.

use super::batch::{Batch, TokenStore};
use super::sampler::{window_start, SamplerSpec, Split};
use super::sidecar::load_configured;
use super::{synthetic, text, tokens};
use crate::config::{DataConfig, DataSource};
use crate::tokenizer::TextTokenizer;
use crate::{Result, TrainError};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

/// Where a dataset's tokens came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The built-in generated corpus of this many bytes.
    Synthetic { bytes: usize },
    /// A UTF-8 file, byte-level tokens.
    Text(PathBuf),
    /// A directory with `train.bin` and `val.bin`.
    Tokens(PathBuf),
    /// Built in memory (tests, tools).
    Memory(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Synthetic { bytes } => write!(f, "the synthetic corpus ({bytes} bytes)"),
            Origin::Text(p) => write!(f, "text file {}", p.display()),
            Origin::Tokens(p) => write!(f, "token directory {}", p.display()),
            Origin::Memory(name) => write!(f, "in-memory corpus {name}"),
        }
    }
}

/// Train and validation tokens, immutable once loaded; shared by the prefetch thread and
/// the eval loop through an `Arc`.
#[derive(Debug, Clone)]
pub struct Dataset {
    origin: Origin,
    train: TokenStore,
    val: TokenStore,
}

/// Loads the corpus `cfg` names, tokenized by `cfg.tokenizer`, and checks it against `vocab`
/// (= `model.vocab_size`) and `cfg.seq_len`: every token id is `< vocab`, token files were
/// made with the configured tokenizer, and each split holds at least one window of
/// `seq_len + 1` tokens. Errors name the file and the problem.
pub fn load_dataset(cfg: &DataConfig, vocab: i64) -> Result<Arc<Dataset>> {
    let need_path = || {
        cfg.path.clone().ok_or_else(|| {
            TrainError::Data(format!(
                "data.path is required when data.source is {}",
                if cfg.source == DataSource::Text {
                    "text"
                } else {
                    "tokens"
                }
            ))
        })
    };
    let tok = load_configured(cfg.tokenizer_file(), vocab)?;
    let ds = match cfg.source {
        DataSource::Synthetic => {
            let bytes = synthetic::generate(cfg.synthetic_bytes);
            let origin = Origin::Synthetic {
                bytes: cfg.synthetic_bytes,
            };
            match &tok {
                Some(t) => Dataset::from_text(origin, &bytes, t)?,
                None => {
                    check_byte_vocab(&bytes, vocab, || "the synthetic corpus".to_string())?;
                    Dataset::from_byte_corpus(origin, bytes)
                }
            }
        }
        DataSource::Text => {
            let path = need_path()?;
            let bytes = text::read_text(&path)?;
            match &tok {
                Some(t) => Dataset::from_text(Origin::Text(path), &bytes, t)?,
                None => {
                    check_byte_vocab(&bytes, vocab, || format!("data.path {}", path.display()))?;
                    Dataset::from_byte_corpus(Origin::Text(path), bytes)
                }
            }
        }
        DataSource::Tokens => {
            let dir = need_path()?;
            let (train, val, dtype) = tokens::read_token_dir(&dir, vocab, tok.as_ref())?;
            Dataset {
                origin: Origin::Tokens(dir),
                train: TokenStore::from_le(train, dtype.width()),
                val: TokenStore::from_le(val, dtype.width()),
            }
        }
    };
    ds.check_lengths(cfg.seq_len)?;
    Ok(Arc::new(ds))
}

/// Byte-level tokens are `0..256`; a smaller vocabulary only works if no byte reaches it.
fn check_byte_vocab(bytes: &[u8], vocab: i64, what: impl Fn() -> String) -> Result<()> {
    if vocab >= 256 {
        return Ok(());
    }
    // One pass at load time, not per step.
    if let Some(pos) = bytes.iter().position(|&b| i64::from(b) >= vocab) {
        return Err(TrainError::Data(format!(
            "{} has byte {} at offset {pos}, which is >= model.vocab_size ({vocab}); byte-level \
             data needs model.vocab_size >= 256 (or bytes all below it)",
            what(),
            bytes[pos]
        )));
    }
    Ok(())
}

impl Dataset {
    /// UTF-8 `text` encoded with `tok`: the first 90% (rounded down) of the tokens are train,
    /// the rest validation, as `moe data prepare` splits them.
    fn from_text(origin: Origin, text: &[u8], tok: &TextTokenizer) -> Result<Self> {
        let text = std::str::from_utf8(text).map_err(|e| {
            TrainError::Data(format!(
                "{origin} is not UTF-8 text ({e}); data.tokenizer needs text"
            ))
        })?;
        let ids = tok.encode(text)?;
        let n_train = ids.len() * 9 / 10;
        Ok(Self {
            origin,
            train: TokenStore::from_ids(&ids[..n_train]),
            val: TokenStore::from_ids(&ids[n_train..]),
        })
    }

    /// A byte-level corpus: the first 90% (rounded down) is train, the rest validation.
    pub fn from_byte_corpus(origin: Origin, mut bytes: Vec<u8>) -> Self {
        let n_train = bytes.len() * 9 / 10;
        let val = bytes.split_off(n_train);
        Self {
            origin,
            train: TokenStore::from_bytes(bytes),
            val: TokenStore::from_bytes(val),
        }
    }

    /// Where the tokens came from.
    pub fn origin(&self) -> &Origin {
        &self.origin
    }

    /// Tokens in `split`.
    pub fn len(&self, split: Split) -> usize {
        self.store(split).len()
    }

    /// True when both splits are empty.
    pub fn is_empty(&self) -> bool {
        self.len(Split::Train) == 0 && self.len(Split::Val) == 0
    }

    fn store(&self, split: Split) -> &TokenStore {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Both splits hold at least one window of `seq_len + 1` tokens.
    pub fn check_lengths(&self, seq_len: i64) -> Result<()> {
        for split in [Split::Train, Split::Val] {
            let n = self.len(split);
            if (n as i64) < seq_len + 1 {
                // Byte corpora are split 90/10 in memory; token directories by file.
                let byte_part = if split == Split::Train {
                    "the first 90%"
                } else {
                    "the last 10%"
                };
                let (what, part, fix) = match &self.origin {
                    Origin::Synthetic { bytes } => (
                        format!("data.synthetic_bytes ({bytes})"),
                        byte_part,
                        "raise data.synthetic_bytes or lower data.seq_len",
                    ),
                    Origin::Text(p) => (
                        format!("data.path {}", p.display()),
                        byte_part,
                        "use a longer file or a smaller data.seq_len",
                    ),
                    Origin::Tokens(p) => (
                        format!("data.path {}", p.display()),
                        if split == Split::Train {
                            "train.bin"
                        } else {
                            "val.bin"
                        },
                        "use a longer file or a smaller data.seq_len",
                    ),
                    Origin::Memory(name) => (format!("corpus {name}"), "", "use more data"),
                };
                return Err(TrainError::Data(format!(
                    "{what} has {n} tokens in its {} split ({part}); needs at least \
                     seq_len+1 = {} to draw one window: {fix}",
                    split.name(),
                    seq_len + 1
                )));
            }
        }
        Ok(())
    }

    /// Start offsets of windows `range` of global batch `index` of `split`.
    pub fn window_starts(
        &self,
        split: Split,
        index: u64,
        seed: u64,
        seq_len: i64,
        range: Range<i64>,
    ) -> Result<Vec<u64>> {
        let n = self.len(split) as i64;
        if seq_len <= 0 || n < seq_len + 1 {
            return Err(TrainError::Data(format!(
                "{} has {n} tokens in its {} split; needs at least seq_len+1 = {}",
                self.origin,
                split.name(),
                seq_len + 1
            )));
        }
        if range.start < 0 || range.end < range.start {
            return Err(TrainError::Data(format!("invalid window range {range:?}")));
        }
        // Starts 0..=n-(t+1): every window of t+1 tokens that fits.
        let num_starts = (n - seq_len) as u64;
        Ok(range
            .map(|g| window_start(seed, split, index, g as u64, num_starts))
            .collect())
    }

    /// Windows `range` of global batch `index` of `split` (any slice of any global batch:
    /// window `g` depends only on `(seed, split, index, g)`).
    ///
    /// # Shapes
    /// -> inputs `[range.len(), seq_len]`, targets `[range.len(), seq_len]`, int64
    pub fn sequences(
        &self,
        split: Split,
        index: u64,
        seed: u64,
        seq_len: i64,
        range: Range<i64>,
    ) -> Result<Batch> {
        let starts = self.window_starts(split, index, seed, seq_len, range)?;
        self.store(split).gather(&starts, seq_len)
    }

    /// This rank's micro-batch `micro` of global batch `index` (the step, for training).
    ///
    /// # Shapes
    /// -> inputs `[spec.batch_size, spec.seq_len]`, targets the same, int64
    pub fn batch(&self, split: Split, index: u64, spec: &SamplerSpec, micro: i64) -> Result<Batch> {
        spec.check()?;
        if !(0..spec.grad_accum).contains(&micro) {
            return Err(TrainError::Data(format!(
                "micro-batch {micro} out of range 0..{} (grad_accum)",
                spec.grad_accum
            )));
        }
        self.sequences(
            split,
            index,
            spec.seed,
            spec.seq_len,
            spec.micro_range(micro),
        )
    }

    /// All `spec.grad_accum` micro-batches of this rank for global batch `index`, in order.
    pub fn batches(&self, split: Split, index: u64, spec: &SamplerSpec) -> Result<Vec<Batch>> {
        (0..spec.grad_accum)
            .map(|a| self.batch(split, index, spec, a))
            .collect()
    }
}
