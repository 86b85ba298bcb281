//! `data.source: tokens`: a directory with `train.bin` and `val.bin`, little-endian token ids
//! (the nanoGPT layout): uint16, or uint32 when its sidecar `tokens.json` says so.

use super::sidecar::{check_sidecar, TokenDtype};
use crate::tokenizer::TextTokenizer;
use crate::{Result, TrainError};
use std::io::ErrorKind;
use std::path::Path;

/// Reads `dir/train.bin` and `dir/val.bin` as raw little-endian bytes, with their element
/// type, after checking the sidecar `tokens.json` (written by `moe data prepare`), if any,
/// against `tok` (the configured `data.tokenizer`) and `vocab`, and each file is present,
/// non-empty, a whole number of ids and holds only ids `< vocab`. Errors name the file.
pub fn read_token_dir(
    dir: &Path,
    vocab: i64,
    tok: Option<&TextTokenizer>,
) -> Result<(Vec<u8>, Vec<u8>, TokenDtype)> {
    let err = |msg: &str| TrainError::File {
        path: dir.to_path_buf(),
        msg: msg.into(),
    };
    if !dir.exists() {
        return Err(err(
            "does not exist (data.path; data.source tokens expects a directory holding \
             train.bin and val.bin)",
        ));
    }
    if !dir.is_dir() {
        return Err(err(
            "is not a directory; data.source tokens expects a directory holding train.bin and \
             val.bin (a UTF-8 file is data.source text)",
        ));
    }
    let dtype = check_sidecar(dir, vocab, tok)?;
    Ok((
        read_bin(&dir.join("train.bin"), vocab, dtype)?,
        read_bin(&dir.join("val.bin"), vocab, dtype)?,
        dtype,
    ))
}

/// The id at `c` (`width` little-endian bytes).
fn id_of(c: &[u8]) -> i64 {
    c.iter()
        .rev()
        .fold(0i64, |acc, &b| (acc << 8) | i64::from(b))
}

fn read_bin(path: &Path, vocab: i64, dtype: TokenDtype) -> Result<Vec<u8>> {
    let err = |msg: String| TrainError::File {
        path: path.to_path_buf(),
        msg,
    };
    let (w, name) = (dtype.width(), dtype.name());
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => err(
            "does not exist; data.source tokens needs train.bin and val.bin in data.path".into(),
        ),
        _ => err(format!("cannot be read: {e}")),
    })?;
    if bytes.is_empty() {
        return Err(err(format!(
            "is empty; expected little-endian {name} token ids"
        )));
    }
    if bytes.len() % w != 0 {
        return Err(err(format!(
            "has {} bytes, not a multiple of {w}; expected little-endian {name} token ids \
             ({w} bytes each)",
            bytes.len()
        )));
    }
    // One pass at load time, not per step; the first offender makes the clearest message.
    let bad = bytes
        .chunks_exact(w)
        .enumerate()
        .map(|(i, c)| (i, id_of(c)))
        .find(|&(_, id)| id >= vocab);
    if let Some((i, id)) = bad {
        return Err(err(format!(
            "token {i} has id {id}, which is >= model.vocab_size ({vocab}); the tokenizer and \
             model.vocab_size disagree"
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::id_of;

    #[test]
    fn ids_are_little_endian() {
        assert_eq!(id_of(&[0x34, 0x12]), 0x1234);
        assert_eq!(id_of(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        assert_eq!(id_of(&[0xff, 0xff, 0x01, 0x00]), 0x1_ffff);
    }
}
