//! The conformance suite on the MPI backend, under `mpirun -np 2` and `-np 4`
//! (examples/mpi_conformance.rs checks its own results). Skipped, with the reason
//! printed, when mpirun is not installed.

use std::path::PathBuf;
use std::process::Command;

/// target/<profile>/examples/mpi_conformance, next to this test's target/<profile>/deps.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|d| d.parent()).unwrap().to_path_buf();
    let bin = profile_dir.join("examples").join("mpi_conformance");
    if !bin.exists() {
        // `cargo test` builds the examples, but not when filtered to this test target.
        let release = profile_dir.ends_with("release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "--examples", "-p", "moe-comm"]);
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "building the mpi_conformance example failed");
    }
    bin
}

fn mpirun_available() -> bool {
    Command::new("mpirun").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

fn run_np(np: usize) {
    if !mpirun_available() {
        println!("skipped: mpirun not found on PATH");
        return;
    }
    let bin = example_binary();
    let out = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string()])
        .arg(&bin)
        .env("OMPI_MCA_rmaps_base_oversubscribe", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mpirun -np {np} failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
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
