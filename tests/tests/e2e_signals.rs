//! End to end: SIGTERM/SIGINT (a cluster's preemption, Ctrl-C) finish the step, checkpoint,
//! say how to resume and exit 0; the resumed run finishes. Non-finite steps are skipped and
//! counted; too many in a row stop the run with a diagnostic and a checkpoint.

mod e2e_support;

use e2e_support::{ckpt, metrics, run, steps, train_cmd, train_lines, wait_for, Running};
use std::time::{Duration, Instant};

const DEBUG: &str = "configs/debug.yaml";
const T: Duration = Duration::from_secs(90);
const SETS: [&str; 4] = [
    "parallel.ep_size=1",
    "trainer.batch_size=4",
    "trainer.max_steps=100",
    "trainer.eval_every=0",
];

fn stop_and_resume(sig: libc::c_int, tag: &str) {
    let out = moe_tests::temp_dir(tag);
    let mut child = Running::spawn(&mut train_cmd(DEBUG, &out, &SETS));
    wait_for("3 logged steps", T, || train_lines(&out) >= 3);
    assert!(child.alive(), "finished before the signal");
    child.signal(sig);
    let sent = Instant::now();
    let f = child.finish(T);
    let took = sent.elapsed();
    assert!(
        f.status.success(),
        "a stop signal must exit 0\n{}",
        f.dump()
    );
    // The signal is seen within 50 ms and the step (tens of ms) and checkpoint finish.
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} to stop\n{}",
        f.dump()
    );

    let stopped_at = steps(&metrics(&out).0).last().copied().unwrap();
    assert!(
        stopped_at < 100,
        "ran to the end despite the signal\n{}",
        f.dump()
    );
    assert!(
        f.stdout
            .contains(&format!("stopped by signal after step {stopped_at} of 100")),
        "{}",
        f.dump()
    );
    let hint = f
        .stdout
        .lines()
        .find(|l| l.starts_with("to resume: ") && l.contains(" train --config"))
        .unwrap_or_default();
    assert!(
        hint.contains("--resume auto") && hint.contains("run.out_dir="),
        "{}",
        f.dump()
    );
    let manifest = ckpt(&out, stopped_at).join("manifest.json");
    assert!(
        manifest.is_file(),
        "no checkpoint at the stopped step {stopped_at}\n{}",
        f.dump()
    );

    let r = run(train_cmd(DEBUG, &out, &SETS).args(["--resume", "auto"]), T).ok();
    assert!(
        r.stdout.contains(&format!("at step {stopped_at}")),
        "{}",
        r.dump()
    );
    assert_eq!(steps(&metrics(&out).0), (1..=100).collect::<Vec<_>>());
    assert!(ckpt(&out, 100).join("manifest.json").is_file());
    eprintln!("signal {sig}: stopped after step {stopped_at} in {took:?}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn sigterm_checkpoints_exits_zero_and_the_run_resumes() {
    stop_and_resume(libc::SIGTERM, "e2e-sigterm");
}

#[test]
fn sigint_checkpoints_exits_zero_and_the_run_resumes() {
    stop_and_resume(libc::SIGINT, "e2e-sigint");
}

#[test]
fn a_nan_step_is_skipped_counted_and_training_continues() {
    let out = moe_tests::temp_dir("e2e-nan");
    let sets = [
        "parallel.ep_size=1",
        "trainer.max_steps=8",
        "trainer.eval_every=0",
    ];
    let f = run(train_cmd(DEBUG, &out, &sets).env("MOE_FAULT", "nan@0:3"), T).ok();
    let line = f
        .stderr
        .lines()
        .find(|l| l.starts_with("step 3: non-finite loss"))
        .unwrap_or_default();
    assert!(line.contains("skipped; 1 in a row"), "{}", f.dump());
    assert!(
        line.contains("lm_loss NaN"),
        "names the non-finite term\n{}",
        f.dump()
    );
    assert!(
        line.contains("first MoE: layers.0.moe."),
        "names a router or expert parameter\n{}",
        f.dump()
    );
    assert!(f.stdout.contains("skipped 1 step(s)"), "{}", f.dump());
    let (train, _) = metrics(&out);
    assert_eq!(
        steps(&train),
        vec![1, 2, 4, 5, 6, 7, 8],
        "step 3 is not logged"
    );
    assert!(train
        .iter()
        .all(|r| r.loss.is_finite() && r.grad_norm.is_finite()));
    assert!(ckpt(&out, 8).join("manifest.json").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn too_many_bad_steps_in_a_row_stop_with_a_diagnostic_and_a_checkpoint() {
    let out = moe_tests::temp_dir("e2e-diverge");
    let sets = [
        "parallel.ep_size=1",
        "trainer.max_steps=10",
        "trainer.max_bad_steps=3",
        "trainer.eval_every=0",
    ];
    let f = run(
        train_cmd(DEBUG, &out, &sets).env("MOE_FAULT", "nan@0:3,nan@0:4,nan@0:5,nan@0:6,nan@0:7"),
        T,
    );
    assert_eq!(f.status.code(), Some(1), "{}", f.dump());
    let err = f
        .stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(err.contains("trainer.max_bad_steps = 3"), "{}", f.dump());
    // Steps 3, 4, 5 were bad: stopped at step 5, state saved as after step 4 (the bad steps
    // changed no weight), so a resume retries step 5.
    let dir = ckpt(&out, 4);
    assert!(
        err.contains(&dir.display().to_string()),
        "names the checkpoint\n{}",
        f.dump()
    );
    moe_trainer::checkpoint::verify(&dir).unwrap();
    assert_eq!(steps(&metrics(&out).0), vec![1, 2]);
    let _ = std::fs::remove_dir_all(&out);
}
