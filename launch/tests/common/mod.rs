//! Helpers shared by the binary's integration tests: a scratch directory and a runner.

#![allow(dead_code)] // each test crate uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (configs/ and docs/ live there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("moe-launch-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Writes `text` to `name` in the scratch dir and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// The `run.out_dir` the test configs point at; it must never be created.
    pub fn out_dir(&self) -> PathBuf {
        self.0.join("out")
    }

    /// A config whose `run.out_dir` is `out_dir()`, followed by `body`.
    pub fn config(&self, name: &str, body: &str) -> PathBuf {
        let text = format!("run:\n  out_dir: {}\n{body}", self.out_dir().display());
        self.write(name, &text)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Exit code, stdout and stderr of `moe args...`, run in the repository root.
pub fn moe(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_moe"))
        .args(args)
        .current_dir(repo_root())
        // The config's world size must not depend on the environment the tests run in.
        .env_remove("OMPI_COMM_WORLD_SIZE")
        .env_remove("PMI_SIZE")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
