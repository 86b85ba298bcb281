//! An output directory written all or nothing: files go into a hidden sibling staging
//! directory that is renamed into place once complete, so a failed or interrupted export or
//! import leaves no half-written folder, and an existing non-empty directory is never touched.

use super::HfError;
use std::fs;
use std::path::{Path, PathBuf};

/// The staging directory of one output.
#[derive(Debug)]
pub struct Staging {
    out: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

fn io(path: &Path, e: std::io::Error) -> HfError {
    HfError::Failed(format!("{}: {e}", path.display()))
}

impl Staging {
    /// Refuses `out` if it exists and is not an empty directory; creates the staging
    /// directory next to it (removing a leftover of an interrupted run).
    pub fn new(out: &Path) -> Result<Self, HfError> {
        if out.exists() {
            let empty = out.is_dir() && fs::read_dir(out).map_err(|e| io(out, e))?.next().is_none();
            if !empty {
                return Err(HfError::Input(format!(
                    "{}: exists and is not an empty directory; nothing was written (choose a new \
                     output directory)",
                    out.display()
                )));
            }
        }
        let name = out
            .file_name()
            .ok_or_else(|| HfError::Input(format!("{}: not a directory name", out.display())))?
            .to_string_lossy()
            .into_owned();
        let parent = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
        let tmp = parent.join(format!(".{name}.moe-partial"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
        Ok(Self {
            out: out.to_path_buf(),
            tmp,
            committed: false,
        })
    }

    /// Where to write the files.
    pub fn dir(&self) -> &Path {
        &self.tmp
    }

    /// Moves the staged files into place.
    pub fn commit(mut self) -> Result<PathBuf, HfError> {
        if self.out.is_dir() {
            // Checked empty in `new`; `remove_dir` fails rather than delete anything new.
            fs::remove_dir(&self.out).map_err(|e| io(&self.out, e))?;
        }
        fs::rename(&self.tmp, &self.out).map_err(|e| io(&self.out, e))?;
        self.committed = true;
        Ok(self.out.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}
