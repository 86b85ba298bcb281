//! The conformance suite on the MPI backend, under `mpirun -np 2` and `-np 4`
//! (examples/mpi_conformance.rs checks its own results). Skipped, with the reason
//! printed, when mpirun is not installed.

use std::path::PathBuf;
use std::process::Command;

/// target/<profile>/examples/mpi_conformance, next to this test's target/<profile>/deps.
///
/// An unfiltered `cargo test` builds the examples before running tests; with a filter
/// (`--test mpi`) run `cargo build --release --examples -p moe-comm` first. (Building it
/// from here would nest cargo inside cargo test and wait on its locks.) A binary older than
/// a source file of this crate is refused rather than silently tested. (Sources, not the
/// `libmoe_comm-*.rlib`s in deps: a `cargo test -p <crate>` builds another, newer rlib of the
/// same sources with other features, which made a fresh example look stale.)
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let bin = deps
        .parent()
        .unwrap()
        .join("examples")
        .join("mpi_conformance");
    let hint = "run `cargo build --release --examples -p moe-comm` (or an unfiltered cargo test)";
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{} is missing ({e}): {hint}", bin.display()));
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let mut dirs = vec![crate_dir.join("src"), crate_dir.join("examples")];
    dirs.push(crate_dir.join("Cargo.toml"));
    while let Some(path) = dirs.pop() {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            dirs.extend(
                std::fs::read_dir(&path)
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.path()),
            );
        } else if let Ok(t) = meta.modified() {
            if newest.as_ref().is_none_or(|(n, _)| t > *n) {
                newest = Some((t, path));
            }
        }
    }
    if let Some((t, src)) = newest {
        assert!(
            built >= t,
            "{} is older than {}: {hint}",
            bin.display(),
            src.display()
        );
    }
    bin
}

fn mpirun_available() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run_np(np: usize) {
    if !mpirun_available() {
        // Under .ci/run (MOE_REQUIRE_MPI=1) a missing mpirun is a failure, not a skip.
        assert!(
            std::env::var("MOE_REQUIRE_MPI").as_deref() != Ok("1"),
            "mpirun not found on PATH, and MOE_REQUIRE_MPI=1 requires the MPI tests to run"
        );
        println!("skipped: mpirun not found on PATH");
        return;
    }
    let bin = example_binary();
    let out = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .arg(&bin)
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "mpirun -np {np} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert_eq!(
        stdout.matches("all checks passed").count(),
        np,
        "every rank must report success\n{stdout}\n{stderr}"
    );
}

#[test]
fn mpi_backend_conforms_np2() {
    run_np(2);
}

#[test]
fn mpi_backend_conforms_np4() {
    run_np(4);
}
