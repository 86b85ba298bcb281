//! `moe slim` and `moe upcycle` as real OpenMPI jobs: with calibration, `mpirun -np 2/3`
//! splits the calibration batches over the processes, sums their statistics with an
//! all-reduce, and rank 0 alone writes a run directory equal to the one-process result
//! (the checkpoint was written at EP=2: the output does not depend on either size). Bad input
//! exits 2 on every rank and writes nothing. Without mpirun the tests print `SKIPPED`.

mod mpi_support;

use moe_testutil::only_checkpoint;
use moe_trainer::checkpoint::CheckpointReader;
use mpi_support::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(180);

fn report(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("surgery.json")).unwrap()).unwrap()
}

/// A 3-block run at EP=2 (two in-process ranks): 8 experts top-2.
fn trained(dir: &Path) -> PathBuf {
    let out = dir.join("src");
    let extra = [
        "parallel.ep_size=2".to_string(),
        "model.num_layers=3".into(),
        "moe.num_experts=8".into(),
        "moe.top_k=2".into(),
    ];
    let mut args = train_args(&out, 4, &extra);
    args.push("--debug".into());
    let f = run(Command::new(moe_bin()).args(&args), RUN_LIMIT);
    assert!(f.status.success(), "training failed\n{}", f.dump());
    out
}

#[test]
fn slim_under_mpirun_equals_one_process() {
    const TEST: &str = "slim_under_mpirun_equals_one_process";
    if !have_mpirun() {
        return skip(TEST, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    let dir = temp(TEST);
    let src = trained(&dir);
    let flags = |out: &Path| -> Vec<String> {
        [
            "slim",
            "--checkpoint",
            src.to_str().unwrap(),
            "--experts",
            "4",
            "--expert-criterion",
            "frequency",
            "--merge",
            "--drop-layers",
            "1",
            "--expert-hidden",
            "16",
            "--calib-batches",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let one = dir.join("one");
    let f = run(Command::new(moe_bin()).args(flags(&one)), RUN_LIMIT);
    assert!(f.status.success(), "{}", f.dump());
    for np in [2, 3] {
        let multi = dir.join(format!("np{np}"));
        let f = run(mpirun(np).args(flags(&multi)), RUN_LIMIT);
        assert!(f.status.success(), "np {np}\n{}", f.dump());
        // Rank 0 alone prints the report.
        assert_eq!(f.stdout.matches("wrote ").count(), 1, "{}", f.dump());
        let (ra, rb) = (report(&one), report(&multi));
        for key in ["kept_experts", "merged_into", "dropped_layers"] {
            assert_eq!(ra[key], rb[key], "np {np}: {key}");
        }
        let (ca, cb) = (&ra["calibration"], &rb["calibration"]);
        assert_eq!(ca["tokens"], cb["tokens"]);
        // Sums of floats (routing weights, Block Influence) run in another order over
        // processes, and each process's float32 matmuls may round differently (another
        // thread count): 1e-6 relative, float32's rounding with room; the counts are
        // integers, exact in any order.
        let close = |x: &serde_json::Value, y: &serde_json::Value, what: &str| {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-6 * x.abs(),
                "np {np}: {what}: {x} vs {y}"
            );
        };
        for (k, v) in ca["block_influence"].as_object().unwrap() {
            close(v, &cb["block_influence"][k], k);
        }
        for (layer, r) in ca["routing"].as_object().unwrap() {
            let other = &cb["routing"][layer];
            assert_eq!(r["frequency"], other["frequency"], "np {np}: {layer}");
            for key in ["weighted_frequency", "mean_weight"] {
                let (xs, ys) = (r[key].as_array().unwrap(), other[key].as_array().unwrap());
                assert_eq!(xs.len(), ys.len());
                for (x, y) in xs.iter().zip(ys) {
                    close(x, y, &format!("{layer} {key}"));
                }
            }
        }
        let (sa, sb) = (
            CheckpointReader::open(&only_checkpoint(&one)).unwrap(),
            CheckpointReader::open(&only_checkpoint(&multi)).unwrap(),
        );
        for n in sa.model_names() {
            assert!(
                sa.read(n).unwrap().equal(&sb.read(n).unwrap()),
                "np {np}: {n}"
            );
        }
    }

    // Bad input: exit 2, said once, nothing written.
    let bad = dir.join("bad");
    let mut args = flags(&bad);
    args[4] = "9".into();
    let f = run(mpirun(2).args(&args), RUN_LIMIT);
    assert_eq!(f.status.code(), Some(2), "{}", f.dump());
    assert_eq!(f.stderr.matches("--experts (9)").count(), 1, "{}", f.dump());
    assert!(!bad.exists());
    // More processes than calibration batches.
    let mut args = flags(&bad);
    args[13] = "1".into();
    let f = run(mpirun(3).args(&args), RUN_LIMIT);
    assert_eq!(f.status.code(), Some(2), "{}", f.dump());
    assert!(f.stderr.contains("--calib-batches (1)"), "{}", f.dump());
    assert!(!bad.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Upcycling and a slim without calibration need no communication: under mpirun rank 0
/// writes (the same tensors as one process) and the others exit 0.
#[test]
fn upcycle_and_plain_slim_under_mpirun_write_once() {
    const TEST: &str = "upcycle_and_plain_slim_under_mpirun_write_once";
    if !have_mpirun() {
        return skip(TEST, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    let dir = temp(TEST);
    let dense = dir.join("dense");
    let extra = [
        "moe.num_experts=1".to_string(),
        "moe.top_k=1".into(),
        "parallel.ep_size=1".into(),
    ];
    let f = run(
        Command::new(moe_bin()).args(train_args(&dense, 2, &extra)),
        RUN_LIMIT,
    );
    assert!(f.status.success(), "{}", f.dump());
    for (tag, args) in [
        ("up", vec!["upcycle", "--experts", "4", "--top-k", "2"]),
        ("narrow", vec!["slim", "--layers", "0"]),
    ] {
        let (one, multi) = (dir.join(format!("{tag}1")), dir.join(format!("{tag}2")));
        for (out, mut cmd) in [(&one, Command::new(moe_bin())), (&multi, mpirun(2))] {
            let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            a.extend([
                "--checkpoint".into(),
                dense.display().to_string(),
                "--out".into(),
                out.display().to_string(),
            ]);
            let f = run(cmd.args(&a), RUN_LIMIT);
            assert!(f.status.success(), "{tag}\n{}", f.dump());
            assert_eq!(f.stdout.matches("wrote ").count(), 1, "{}", f.dump());
        }
        let (sa, sb) = (
            CheckpointReader::open(&only_checkpoint(&one)).unwrap(),
            CheckpointReader::open(&only_checkpoint(&multi)).unwrap(),
        );
        for n in sa.model_names() {
            assert!(
                sa.read(n).unwrap().equal(&sb.read(n).unwrap()),
                "{tag}: {n}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
