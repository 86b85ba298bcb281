//! One rule for naming a checkpoint, shared by `train --resume`, `eval --checkpoint` and
//! `generate --checkpoint`: a checkpoint directory (it has `manifest.json`), a directory of
//! checkpoints (`step-N/`: the newest intact one), or a run directory (the newest intact
//! checkpoint under its `checkpoints/`).

use crate::exit_code::BadInput;
use moe_trainer::checkpoint::find_latest_intact;
use std::path::{Path, PathBuf};

/// The checkpoint `p` names, by the rule above; `flag` (e.g. `--resume`) names the argument in
/// errors. A path that does not exist, or names no checkpoint, is bad input (exit 2).
pub fn resolve(flag: &str, p: &Path) -> anyhow::Result<PathBuf> {
    if p.join("manifest.json").is_file() {
        return Ok(p.to_path_buf());
    }
    if !p.exists() {
        return Err(BadInput(format!("{flag} {}: no such file or directory", p.display())).into());
    }
    if !p.is_dir() {
        return Err(BadInput(format!(
            "{flag} {}: not a directory; name a checkpoint directory (step-N/), a checkpoints \
             directory or a run directory",
            p.display()
        ))
        .into());
    }
    for dir in [p.to_path_buf(), p.join("checkpoints")] {
        let found = find_latest_intact(&dir).map_err(|e| BadInput(format!("{flag}: {e}")))?;
        if let Some((found, warnings)) = found {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            return Ok(found);
        }
    }
    Err(BadInput(format!(
        "{flag} {}: not a checkpoint directory (no manifest.json) and holds no intact \
         checkpoints (step-N/ directories) itself or under checkpoints/",
        p.display()
    ))
    .into())
}
