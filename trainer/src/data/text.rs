//! `data.source: text`: a UTF-8 file whose bytes are the tokens (vocabulary 256).

use crate::{Result, TrainError};
use std::io::ErrorKind;
use std::path::Path;

/// Reads `path` and checks it is a non-empty UTF-8 file. Every error names the file.
pub fn read_text(path: &Path) -> Result<Vec<u8>> {
    let err = |msg: String| TrainError::File {
        path: path.to_path_buf(),
        msg,
    };
    if path.is_dir() {
        return Err(err(
            "is a directory; data.source text reads one UTF-8 file (a directory of train.bin \
             and val.bin is data.source tokens)"
                .into(),
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        ErrorKind::NotFound => {
            err("does not exist (data.path, read as UTF-8 text for data.source text)".into())
        }
        _ => err(format!("cannot be read (data.path, data.source text): {e}")),
    })?;
    if bytes.is_empty() {
        return Err(err(
            "is empty; data.source text needs UTF-8 text to train on".into(),
        ));
    }
    if let Err(e) = std::str::from_utf8(&bytes) {
        let at = e.valid_up_to();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let what = match e.error_len() {
            Some(_) => format!(
                "invalid byte 0x{:02x} at byte offset {at} (line {line})",
                bytes[at]
            ),
            None => format!("an incomplete character at the end (byte offset {at}, line {line})"),
        };
        return Err(err(format!(
            "is not valid UTF-8: {what}; data.source text expects UTF-8 text (use data.source \
             tokens for pre-tokenised uint16 data)"
        )));
    }
    Ok(bytes)
}
