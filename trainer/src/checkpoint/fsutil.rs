//! Durable file-system steps: temp file, fsync, rename, fsync of the directory. A rename is
//! atomic on POSIX file systems but only durable once the directory holding it is synced.

use crate::error::{Result, TrainError};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Name of a complete checkpoint directory.
pub(crate) fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Name of the directory a checkpoint is built in before it is committed.
pub(crate) fn tmp_dir_name(step: u64) -> String {
    format!("step-{step:08}.tmp")
}

/// Suffix of directories being deleted (renamed first, so a half-deleted checkpoint never
/// looks like a torn one).
pub(crate) const DELETING_SUFFIX: &str = ".deleting";

/// `step-00000100` -> 100; anything else (`.tmp`, `.deleting`, other names) -> None.
pub(crate) fn parse_step_dir(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("step-")?;
    if digits.len() < 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// `step-00000100.tmp` -> 100.
pub(crate) fn parse_tmp_dir(name: &str) -> Option<u64> {
    parse_step_dir(name.strip_suffix(".tmp")?)
}

/// Makes the directory's entries (renames, new files) durable.
pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| TrainError::io(dir, e))
}

/// Writes `dir/name` atomically: the bytes go to a hidden temp file that is fsynced and then
/// renamed over `name`. The directory itself is not synced (callers batch that).
pub(crate) fn write_atomic<T>(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut BufWriter<&File>) -> std::io::Result<T>,
) -> Result<T> {
    let tmp = dir.join(format!(".{name}.partial"));
    let dst = dir.join(name);
    let file = File::create(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let mut buf = BufWriter::with_capacity(1 << 20, &file);
    let out = write(&mut buf).map_err(|e| TrainError::io(&tmp, e))?;
    buf.flush().map_err(|e| TrainError::io(&tmp, e))?;
    drop(buf);
    file.sync_all().map_err(|e| TrainError::io(&tmp, e))?;
    fs::rename(&tmp, &dst).map_err(|e| TrainError::io(&dst, e))?;
    Ok(out)
}

/// Removes a directory by first renaming it to `<name>.deleting`, so that an interrupted
/// removal leaves a name every reader ignores.
pub(crate) fn remove_dir_safely(path: &Path) -> Result<()> {
    let mut doomed = path.as_os_str().to_owned();
    doomed.push(DELETING_SUFFIX);
    let doomed = PathBuf::from(doomed);
    if doomed.exists() {
        fs::remove_dir_all(&doomed).map_err(|e| TrainError::io(&doomed, e))?;
    }
    fs::rename(path, &doomed).map_err(|e| TrainError::io(path, e))?;
    if let Some(parent) = path.parent() {
        fsync_dir(parent)?;
    }
    fs::remove_dir_all(&doomed).map_err(|e| TrainError::io(&doomed, e))
}

/// Entry names of `dir` (UTF-8 only; others are not ours).
pub(crate) fn dir_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| TrainError::io(dir, e))? {
        let entry = entry.map_err(|e| TrainError::io(dir, e))?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}
