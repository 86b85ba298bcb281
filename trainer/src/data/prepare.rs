//! `moe data prepare`: text files -> a token directory for `data.source: tokens`:
//! `train.bin` (the first 90% of the tokens, the split of `data.source: text`), `val.bin`
//! (the rest), little-endian uint16, and the sidecar `tokens.json` recording the dtype, the
//! tokenizer's vocabulary size and the sha256 of its `tokenizer.json`, which the loader checks
//! against `model.vocab_size`.

use crate::tokenizer::TextTokenizer;
use crate::{Result, TrainError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// File name of the sidecar.
pub const SIDECAR: &str = "tokens.json";

/// The sidecar of a token directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokensMeta {
    /// Element type of `train.bin` / `val.bin`: `uint16`.
    pub dtype: String,
    /// Ids the tokenizer produces (every id is below it).
    pub vocab_size: u64,
    /// sha256 of the `tokenizer.json` the data was encoded with.
    pub tokenizer_sha256: String,
    /// Tokens in `train.bin` and `val.bin`.
    pub train_tokens: u64,
    pub val_tokens: u64,
}

/// The largest vocabulary uint16 files hold.
const U16_VOCAB: usize = 1 << 16;

fn bad(path: &Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// Encodes `inputs` (UTF-8 files, concatenated in order) with `tok` into the new directory
/// `out` (absent or empty). `progress(done, total, file)` is called as each file is encoded.
pub fn prepare_tokens(
    tok: &TextTokenizer,
    inputs: &[PathBuf],
    out: &Path,
    progress: &mut dyn FnMut(usize, usize, &Path),
) -> Result<TokensMeta> {
    if tok.vocab_size() > U16_VOCAB {
        return Err(bad(
            tok.path(),
            format!(
                "has {} ids; token files hold uint16 ids (at most {U16_VOCAB})",
                tok.vocab_size()
            ),
        ));
    }
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| TrainError::io(out, e))?
            .next()
            .is_some()
    {
        return Err(bad(out, "exists and is not empty; nothing was written"));
    }
    let mut ids: Vec<u16> = Vec::new();
    for (i, p) in inputs.iter().enumerate() {
        let bytes = std::fs::read(p).map_err(|e| TrainError::io(p, e))?;
        let text =
            std::str::from_utf8(&bytes).map_err(|e| bad(p, format!("not UTF-8 text ({e})")))?;
        // Ids fit: the vocabulary was checked against the uint16 range above.
        ids.extend(tok.encode(text)?.into_iter().map(|id| id as u16));
        progress(i + 1, inputs.len(), p);
    }
    let n_train = ids.len() * 9 / 10;
    if n_train == 0 || n_train == ids.len() {
        return Err(TrainError::Data(format!(
            "the inputs encode to {} tokens: too few for a train and a validation split",
            ids.len()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let write = |name: &str, part: &[u16]| -> Result<()> {
        let path = out.join(name);
        let bytes: Vec<u8> = part.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, bytes).map_err(|e| TrainError::io(&path, e))
    };
    write("train.bin", &ids[..n_train])?;
    write("val.bin", &ids[n_train..])?;
    let meta = TokensMeta {
        dtype: "uint16".into(),
        vocab_size: tok.vocab_size() as u64,
        tokenizer_sha256: tok.sha256().to_string(),
        train_tokens: n_train as u64,
        val_tokens: (ids.len() - n_train) as u64,
    };
    let path = out.join(SIDECAR);
    let text = serde_json::to_string_pretty(&meta).map_err(|e| bad(&path, e))?;
    std::fs::write(&path, text + "\n").map_err(|e| TrainError::io(&path, e))?;
    Ok(meta)
}

/// Checks `dir`'s sidecar, if it has one, against `model.vocab_size` (`vocab`): the dtype
/// must be uint16 and the tokenizer's vocabulary must fit the model.
pub fn check_sidecar(dir: &Path, vocab: i64) -> Result<()> {
    let path = dir.join(SIDECAR);
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(&path).map_err(|e| TrainError::io(&path, e))?;
    let meta: TokensMeta =
        serde_json::from_str(&text).map_err(|e| bad(&path, format!("unreadable: {e}")))?;
    if meta.dtype != "uint16" {
        return Err(bad(
            &path,
            format!("dtype {}: this build reads uint16 token files", meta.dtype),
        ));
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
    Ok(())
}
