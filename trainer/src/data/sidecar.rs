//! `tokens.json`, the sidecar of a token directory: the element type of `train.bin` /
//! `val.bin`, the tokenizer's vocabulary size and the sha256 of its `tokenizer.json`. Loading
//! checks it against the run's `data.tokenizer` and `model.vocab_size`, so data encoded with
//! one tokenizer is never trained or evaluated under another.

use crate::tokenizer::TextTokenizer;
use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the sidecar.
pub const SIDECAR: &str = "tokens.json";

/// Element type of token files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenDtype {
    /// Little-endian uint16: vocabularies of at most 65536 ids.
    Uint16,
    /// Little-endian uint32: larger vocabularies.
    Uint32,
}

impl TokenDtype {
    /// The narrowest type that holds every id of a `vocab`-id vocabulary.
    pub fn for_vocab(vocab: usize) -> Self {
        if vocab <= 1 << 16 {
            TokenDtype::Uint16
        } else {
            TokenDtype::Uint32
        }
    }

    /// Bytes per token.
    pub fn width(self) -> usize {
        match self {
            TokenDtype::Uint16 => 2,
            TokenDtype::Uint32 => 4,
        }
    }

    /// The name in the sidecar (`uint16`, `uint32`).
    pub fn name(self) -> &'static str {
        match self {
            TokenDtype::Uint16 => "uint16",
            TokenDtype::Uint32 => "uint32",
        }
    }
}

/// The sidecar of a token directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokensMeta {
    /// Element type of `train.bin` / `val.bin`.
    pub dtype: TokenDtype,
    /// Ids the tokenizer produces (every id is below it).
    pub vocab_size: u64,
    /// sha256 of the `tokenizer.json` the data was encoded with.
    pub tokenizer_sha256: String,
    /// Tokens in `train.bin`.
    pub train_tokens: u64,
    /// Tokens in `val.bin`.
    pub val_tokens: u64,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Reads `dir`'s sidecar; `None` when it has none (raw nanoGPT-style uint16 files).
pub fn read_sidecar(dir: &Path) -> Result<Option<(PathBuf, TokensMeta)>> {
    let path = dir.join(SIDECAR);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let meta: TokensMeta = serde_json::from_str(&text).map_err(|e| {
        bad(
            &path,
            format!("unreadable (written by `moe data prepare`?): {e}"),
        )
    })?;
    Ok(Some((path, meta)))
}

/// Writes `meta` as `dir`'s sidecar.
pub fn write_sidecar(dir: &Path, meta: &TokensMeta) -> Result<()> {
    let path = dir.join(SIDECAR);
    let text = serde_json::to_string_pretty(meta).map_err(|e| bad(&path, e))?;
    std::fs::write(&path, text + "\n").map_err(|e| TrainError::io(&path, e))
}

/// Checks `dir`'s sidecar, if any, against the run: the data must have been encoded with
/// `tok` (the configured `data.tokenizer`; `None` for `bytes`), and its vocabulary must fit
/// `model.vocab_size` (`vocab`). Returns the files' element type (uint16 without a sidecar).
/// Errors name the sidecar and the tokenizer file.
pub fn check_sidecar(dir: &Path, vocab: i64, tok: Option<&TextTokenizer>) -> Result<TokenDtype> {
    let Some((path, meta)) = read_sidecar(dir)? else {
        return Ok(TokenDtype::Uint16);
    };
    match tok {
        None => {
            return Err(bad(
                &path,
                format!(
                    "the token files were made with a tokenizer (sha256 {}, {} ids), but \
                     data.tokenizer is bytes; set data.tokenizer to that tokenizer.json",
                    meta.tokenizer_sha256, meta.vocab_size
                ),
            ))
        }
        Some(t) if t.sha256() != meta.tokenizer_sha256 => {
            return Err(bad(
                &path,
                format!(
                    "the token files were made with a different tokenizer (sha256 {}, {} ids) \
                     than data.tokenizer {} (sha256 {}, {} ids); prepare the data again with \
                     `moe data prepare --tokenizer {}`, or set data.tokenizer to the one it was \
                     made with",
                    meta.tokenizer_sha256,
                    meta.vocab_size,
                    t.path().display(),
                    t.sha256(),
                    t.vocab_size(),
                    t.path().display()
                ),
            ))
        }
        Some(_) => {}
    }
    if meta.vocab_size > vocab.max(0) as u64 {
        return Err(bad(
            &path,
            format!(
                "the tokenizer's vocabulary ({}) exceeds model.vocab_size ({vocab}); set \
                 model.vocab_size to at least {}",
                meta.vocab_size, meta.vocab_size
            ),
        ));
    }
    Ok(meta.dtype)
}

/// The tokenizer `data.tokenizer` names, checked to fit `model.vocab_size` (`vocab`); `None`
/// for `bytes`. Errors name the file and the key.
pub fn load_configured(file: Option<&Path>, vocab: i64) -> Result<Option<TextTokenizer>> {
    let Some(path) = file else {
        return Ok(None);
    };
    if !path.is_file() {
        return Err(bad(
            path,
            format!(
                "data.tokenizer: {} (a tokenizer.json, or `bytes` for byte-level tokens)",
                if path.exists() {
                    "not a file"
                } else {
                    "does not exist"
                }
            ),
        ));
    }
    let tok = TextTokenizer::load(path)
        .map_err(|e| bad(path, format!("data.tokenizer: {}", strip_path(&e, path))))?;
    if tok.vocab_size() as i64 > vocab {
        return Err(bad(
            path,
            format!(
                "data.tokenizer has {} ids, more than model.vocab_size ({vocab}); set \
                 model.vocab_size to at least {}",
                tok.vocab_size(),
                tok.vocab_size()
            ),
        ));
    }
    Ok(Some(tok))
}

/// `e`'s message without a leading `<path>: ` (the caller names the path itself).
fn strip_path(e: &TrainError, path: &Path) -> String {
    let msg = e.to_string();
    let prefix = format!("{}: ", path.display());
    msg.strip_prefix(&prefix)
        .map_or(msg.clone(), str::to_string)
}
