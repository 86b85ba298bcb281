//! A newcomer's first hour under mpirun and `moe launch` (issue 17): rank 0's output lands in
//! `<run.out_dir>/train.log` as plain lines, once; a bad input that every rank hits reads as
//! one `rank r of n: error: ...` message per rank, never `error: error: ...`.
//!
//! Without mpirun each test prints `SKIPPED ...: reason`.

mod mpi_support;

use mpi_support::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(180);

/// `train --config configs/ep2.yaml` with the tiny settings, into `out`.
fn ep2_args(out: &std::path::Path, steps: u64) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        "--config".into(),
        root().join("configs/ep2.yaml").display().to_string(),
    ];
    a.extend(tiny_sets(out, steps));
    a
}

#[test]
fn train_log_under_mpirun_and_launch() {
    const TEST: &str = "e2e_newcomer_mpi::train_log";
    if !have_mpirun() {
        return skip(TEST, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    for via_launch in [false, true] {
        let dir = temp(if via_launch {
            "log-launch"
        } else {
            "log-mpirun"
        });
        let out = dir.join("run");
        let mut cmd = if via_launch { launch(2) } else { mpirun(2) };
        let f = run(cmd.args(ep2_args(&out, 3)), LIMIT);
        assert!(f.status.success(), "launch {via_launch}\n{}", f.dump());
        let log = std::fs::read_to_string(out.join("train.log"))
            .unwrap_or_else(|e| panic!("launch {via_launch}: train.log: {e}\n{}", f.dump()));
        assert_eq!(
            log.lines().filter(|l| l.starts_with("==== ")).count(),
            1,
            "{log}"
        );
        // Rank 0's lines, untagged, once each: no other rank writes here.
        assert!(!log.contains("[rank"), "{log}");
        assert_eq!(
            log.lines()
                .filter(|l| l.starts_with("moe train: ep2"))
                .count(),
            1,
            "{log}"
        );
        for step in 1..=3 {
            let n = log
                .lines()
                .filter(|l| l.starts_with(&format!("step {step}/3 ")))
                .count();
            assert_eq!(n, 1, "step {step}\n{log}");
        }
        assert!(log.contains("done: 3 steps"), "{log}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Three ranks for a config that needs an even world: every rank refuses it, each in one
/// piece that names the rank.
#[test]
fn one_error_line_per_rank_under_mpirun() {
    const TEST: &str = "e2e_newcomer_mpi::error_lines";
    if !have_mpirun() {
        return skip(TEST, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    let dir = temp("error-lines");
    let f = run(mpirun(3).args(ep2_args(&dir.join("run"), 2)), LIMIT);
    assert_eq!(f.status.code(), Some(2), "{}", f.dump());
    assert!(!f.stderr.contains("error: error"), "{}", f.dump());
    let lines: Vec<&str> = f.stderr.lines().collect();
    for r in 0..3 {
        let at = lines
            .iter()
            .position(|l| l.starts_with(&format!("rank {r} of 3: error: ")))
            .unwrap_or_else(|| panic!("no error line of rank {r}\n{}", f.dump()));
        assert!(
            lines[at].ends_with("invalid config for a world size of 3 (1 problem):"),
            "{}",
            f.dump()
        );
        // The message's next line follows its first: the rank wrote it in one piece.
        assert!(
            lines[at + 1].starts_with("  - the world size (3) must be divisible"),
            "{}",
            f.dump()
        );
    }
    assert!(!dir.join("run").exists(), "nothing should be written");
    let _ = std::fs::remove_dir_all(&dir);
}
