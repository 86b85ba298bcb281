//! Finding and checking committed checkpoints: a torn, truncated or corrupted one is
//! reported and skipped, never loaded.

use super::format::verify_file;
use super::fsutil::{dir_names, parse_step_dir, parse_tmp_dir, step_dir_name};
use super::manifest::{Manifest, FORMAT_NAME, FORMAT_VERSION, MANIFEST};
use crate::error::{Result, TrainError};
use std::path::{Path, PathBuf};

/// Reads and parses `<ckpt>/manifest.json` and checks its format and version.
pub fn read_manifest(ckpt: &Path) -> Result<Manifest> {
    let path = ckpt.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| TrainError::Checkpoint {
        path: ckpt.to_path_buf(),
        msg: format!("no readable {MANIFEST} ({e}): the write did not complete"),
    })?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| TrainError::Checkpoint {
            path: path.clone(),
            msg: format!("unreadable manifest: {e}"),
        })?;
    if manifest.format != FORMAT_NAME || manifest.version != FORMAT_VERSION {
        return Err(TrainError::Checkpoint {
            path,
            msg: format!(
                "format {} version {}; this build reads {FORMAT_NAME} version {FORMAT_VERSION}",
                manifest.format, manifest.version
            ),
        });
    }
    Ok(manifest)
}

/// Checks every file the manifest lists against its size and sha256 (reads them all).
pub fn verify(ckpt: &Path) -> Result<Manifest> {
    let manifest = read_manifest(ckpt)?;
    for file in manifest.files.iter().chain(&manifest.tokenizer) {
        verify_file(&ckpt.join(&file.name), file)?;
    }
    Ok(manifest)
}

/// The tokenizer stored in the checkpoint `ckpt` (checked against the manifest's size and
/// sha256), or `None` for a byte-level run.
pub fn stored_tokenizer(ckpt: &Path, manifest: &Manifest) -> Result<Option<PathBuf>> {
    let Some(entry) = &manifest.tokenizer else {
        return Ok(None);
    };
    let path = ckpt.join(&entry.name);
    verify_file(&path, entry)?;
    Ok(Some(path))
}

/// Committed checkpoint directories under `dir` (`step-<digits>`), oldest first. Does not
/// verify them. A missing `dir` has none.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<(u64, PathBuf)> = dir_names(dir)?
        .into_iter()
        .filter_map(|n| parse_step_dir(&n).map(|s| (s, dir.join(step_dir_name(s)))))
        .filter(|(_, p)| p.is_dir())
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// The newest checkpoint under `dir` that verifies, with one warning per newer one skipped
/// (torn, truncated, corrupted, no manifest) and per unfinished `step-N.tmp` write.
/// `None` when `dir` holds no committed checkpoint; an error listing the damage when it
/// holds some but none is intact (starting afresh then would silently drop a run).
pub fn find_latest_intact(dir: &Path) -> Result<Option<(PathBuf, Vec<String>)>> {
    let mut warnings = Vec::new();
    if !dir.exists() {
        return Ok(None);
    }
    let mut unfinished: Vec<String> = dir_names(dir)?
        .into_iter()
        .filter(|n| parse_tmp_dir(n).is_some())
        .collect();
    unfinished.sort();
    for name in unfinished {
        warnings.push(format!(
            "ignoring {}: an interrupted checkpoint write (never committed)",
            dir.join(name).display()
        ));
    }
    for (_, path) in list_checkpoints(dir)?.into_iter().rev() {
        match verify(&path) {
            Ok(_) => return Ok(Some((path, warnings))),
            Err(e) => warnings.push(format!("skipping damaged checkpoint: {e}")),
        }
    }
    if list_checkpoints(dir)?.is_empty() {
        return Ok(None);
    }
    Err(TrainError::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("no intact checkpoint:\n  {}", warnings.join("\n  ")),
    })
}
