//! `data.source: tokens`: a directory with `train.bin` and `val.bin`, little-endian uint16
//! token ids (the nanoGPT layout).

use crate::{Result, TrainError};
use std::io::ErrorKind;
use std::path::Path;

/// Reads `dir/train.bin` and `dir/val.bin` as raw little-endian bytes after checking each is
/// present, non-empty, of even length and holds only ids `< vocab`, and that the sidecar
/// `tokens.json` (written by `moe data prepare`), if any, fits `vocab`. Errors name the file.
pub fn read_token_dir(dir: &Path, vocab: i64) -> Result<(Vec<u8>, Vec<u8>)> {
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
    super::prepare::check_sidecar(dir, vocab)?;
    Ok((
        read_bin(&dir.join("train.bin"), vocab)?,
        read_bin(&dir.join("val.bin"), vocab)?,
    ))
}

fn read_bin(path: &Path, vocab: i64) -> Result<Vec<u8>> {
    let err = |msg: String| TrainError::File {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => err(
            "does not exist; data.source tokens needs train.bin and val.bin in data.path".into(),
        ),
        _ => err(format!("cannot be read: {e}")),
    })?;
    if bytes.is_empty() {
        return Err(err(
            "is empty; expected little-endian uint16 token ids".into()
        ));
    }
    if bytes.len() % 2 != 0 {
        return Err(err(format!(
            "has {} bytes, an odd number; expected little-endian uint16 token ids (2 bytes each)",
            bytes.len()
        )));
    }
    // One pass at load time, not per step; the first offender makes the clearest message.
    let bad = bytes
        .chunks_exact(2)
        .enumerate()
        .map(|(i, c)| (i, i64::from(u16::from_le_bytes([c[0], c[1]]))))
        .find(|&(_, id)| id >= vocab);
    if let Some((i, id)) = bad {
        return Err(err(format!(
            "token {i} has id {id}, which is >= model.vocab_size ({vocab}); the tokenizer and \
             model.vocab_size disagree"
        )));
    }
    Ok(bytes)
}
