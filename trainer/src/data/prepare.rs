//! `moe data prepare`: text files -> a token directory for `data.source: tokens`:
//! `train.bin` (the first 90% of the tokens, the split of `data.source: text`), `val.bin`
//! (the rest), little-endian uint16 while the vocabulary fits (at most 65536 ids) and uint32
//! above, and the sidecar `tokens.json` ([`super::sidecar`]) recording the dtype, the
//! tokenizer's vocabulary size and the sha256 of its `tokenizer.json`, which loading checks.

use super::sidecar::{write_sidecar, TokenDtype, TokensMeta};
use crate::tokenizer::TextTokenizer;
use crate::{Result, TrainError};
use std::path::{Path, PathBuf};

pub use super::sidecar::SIDECAR;

/// Text encoded per call of the tokenizer: small enough for a progress bar to move.
const CHUNK_BYTES: usize = 256 * 1024;

fn bad(path: &Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// How far an encoding has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrepareProgress {
    /// Input bytes encoded so far.
    pub done_bytes: u64,
    /// Input bytes in all files.
    pub total_bytes: u64,
    /// Tokens produced so far.
    pub tokens: u64,
}

/// Cuts `text` into pieces of about `CHUNK_BYTES` whose encodings concatenate to the encoding
/// of the whole under GPT-2's byte-level split rule ([`TextTokenizer::splits_like_gpt2`]):
/// each cut follows a newline that follows a non-space and precedes a non-space, where that
/// rule always splits. Text without such places is one piece.
fn chunks(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = CHUNK_BYTES;
    while i < b.len() {
        let cut = (i..b.len()).find(|&j| {
            j >= 2
                && b[j - 1] == b'\n'
                && !b[j - 2].is_ascii_whitespace()
                && !b[j].is_ascii_whitespace()
        });
        match cut {
            Some(j) => {
                out.push(&text[start..j]);
                start = j;
                i = j + CHUNK_BYTES;
            }
            None => break,
        }
    }
    out.push(&text[start..]);
    out
}

/// Encodes `inputs` (UTF-8 files, concatenated in order) with `tok` into the new directory
/// `out` (absent or empty). `progress` is called after every piece encoded.
pub fn prepare_tokens(
    tok: &TextTokenizer,
    inputs: &[PathBuf],
    out: &Path,
    progress: &mut dyn FnMut(PrepareProgress),
) -> Result<TokensMeta> {
    if out.exists()
        && std::fs::read_dir(out)
            .map_err(|e| TrainError::io(out, e))?
            .next()
            .is_some()
    {
        return Err(bad(out, "exists and is not empty; nothing was written"));
    }
    let mut total_bytes = 0u64;
    for p in inputs {
        total_bytes += std::fs::metadata(p)
            .map_err(|e| TrainError::io(p, e))?
            .len();
    }
    let dtype = TokenDtype::for_vocab(tok.vocab_size());
    let mut ids: Vec<u32> = Vec::new();
    let mut done_bytes = 0u64;
    for p in inputs {
        let bytes = std::fs::read(p).map_err(|e| TrainError::io(p, e))?;
        let text =
            std::str::from_utf8(&bytes).map_err(|e| bad(p, format!("not UTF-8 text ({e})")))?;
        // Other tokenizers (normalizers, prefix spaces) may encode a piece differently at its
        // start, so they get the whole file at once.
        let pieces = if tok.splits_like_gpt2() {
            chunks(text)
        } else {
            vec![text]
        };
        for piece in pieces {
            ids.extend(tok.encode(piece)?);
            done_bytes += piece.len() as u64;
            progress(PrepareProgress {
                done_bytes,
                total_bytes,
                tokens: ids.len() as u64,
            });
        }
    }
    let n_train = ids.len() * 9 / 10;
    if n_train == 0 || n_train == ids.len() {
        return Err(TrainError::Data(format!(
            "the inputs encode to {} tokens: too few for a train and a validation split",
            ids.len()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| TrainError::io(out, e))?;
    let write = |name: &str, part: &[u32]| -> Result<()> {
        let path = out.join(name);
        let bytes: Vec<u8> = match dtype {
            // Ids fit: the dtype was chosen from the vocabulary.
            TokenDtype::Uint16 => part
                .iter()
                .flat_map(|&v| (v as u16).to_le_bytes())
                .collect(),
            TokenDtype::Uint32 => part.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        std::fs::write(&path, bytes).map_err(|e| TrainError::io(&path, e))
    };
    write("train.bin", &ids[..n_train])?;
    write("val.bin", &ids[n_train..])?;
    let meta = TokensMeta {
        dtype,
        vocab_size: tok.vocab_size() as u64,
        tokenizer_sha256: tok.sha256().to_string(),
        train_tokens: n_train as u64,
        val_tokens: (ids.len() - n_train) as u64,
    };
    write_sidecar(out, &meta)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces concatenate to the text, cut only after "x\n" before a non-space.
    #[test]
    fn chunks_cut_at_safe_newlines() {
        let line = "word word\n";
        let text = line.repeat(CHUNK_BYTES / line.len() * 3);
        let parts = chunks(&text);
        assert!(parts.len() >= 3, "{}", parts.len());
        assert_eq!(parts.concat(), text);
        for p in &parts[..parts.len() - 1] {
            assert!(p.ends_with("d\n"), "{:?}", &p[p.len() - 3..]);
        }
        // Blank lines and indentation never get a cut.
        let odd = "a\n\n  b\n".repeat(CHUNK_BYTES);
        assert_eq!(chunks(&odd).concat(), odd);
        assert!(chunks(&odd).iter().all(|p| !p.starts_with(['\n', ' '])));
        assert_eq!(chunks("short"), vec!["short"]);
    }
}
