//! `moe train` as real OpenMPI processes: EP over ranks equals one process on the global
//! batch (DESIGN.md "EP=P equals EP=1"), through plain `mpirun` and through `moe launch`;
//! the graceful stop of `moe launch` (SIGTERM -> SIGUSR1 -> finish the step, checkpoint,
//! exit 0) and its resume; and the NCCL backend's clear refusal on this CPU-only machine.
//!
//! Every child runs under a hard deadline. Without mpirun the mpirun tests print
//! `SKIPPED ...: reason`.

mod mpi_support;

use mpi_support::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Deadline of one tiny run (a few seconds normally; generous for a loaded 2-core machine).
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// Float32 EP=P against EP=1: reductions over P ranks sum in another order than one process
/// (~1e-7 relative per step), so 1e-5 leaves room for a few steps of drift and none for a
/// real bug (a wrong shard, a lost token, a per-rank instead of a global aux loss, a wrong
/// gradient average: each moves the loss by >= 1e-3 within two steps).
const REL_TOL: f64 = 1e-5;

/// Losses on stdout have 4 decimals: the same loss may round to neighbours when it lies
/// within the float32 noise of a rounding boundary, so one unit in the last place (plus the
/// parse's own error) is allowed.
const PRINTED_TOL: f64 = 1.0001e-4;

/// How the multi-rank run is started.
#[derive(Clone, Copy, Debug)]
enum Via {
    Mpirun,
    Launch,
}

/// Runs `np` ranks with `parallel.ep_size = ep` and `per_rank` sequences per rank, and one
/// process with EP=1 on `np * per_rank` sequences; asserts both print and log the same
/// losses at every step.
fn check_equivalence(test: &str, via: Via, np: usize, ep: usize, steps: u64) {
    if !have_mpirun() {
        return skip(test, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    let per_rank = 2;
    let dir = temp(test);
    let (single_dir, multi_dir) = (dir.join("single"), dir.join("multi"));

    let single_sets = [
        format!("trainer.batch_size={}", per_rank * np),
        "parallel.ep_size=1".into(),
        "parallel.backend=local".into(),
    ];
    let single = run(
        Command::new(moe_bin()).args(train_args(&single_dir, steps, &single_sets)),
        RUN_LIMIT,
    );
    assert!(
        single.status.success(),
        "single-process run failed\n{}",
        single.dump()
    );

    let multi_sets = [
        format!("trainer.batch_size={per_rank}"),
        format!("parallel.ep_size={ep}"),
        "parallel.backend=mpi".into(),
    ];
    let mut cmd = match via {
        Via::Mpirun => mpirun(np),
        Via::Launch => launch(np),
    };
    cmd.args(train_args(&multi_dir, steps, &multi_sets));
    let multi = run(&mut cmd, RUN_LIMIT);
    assert!(
        multi.status.success(),
        "{np} ranks (ep {ep}, via {via:?}) failed\n{}",
        multi.dump()
    );
    assert!(
        multi
            .stdout
            .contains(&format!("on {np} rank(s), ep_size {ep}")),
        "rank 0 should announce the world\n{}",
        multi.dump()
    );

    // Printed losses (rank 0's progress line; `[rank 0] ` prefixed under the launcher).
    let p1 = printed_losses(&single.stdout);
    let pn = printed_losses(&multi.stdout);
    let all_steps: Vec<u64> = (1..=steps).collect();
    assert_eq!(
        p1.keys().copied().collect::<Vec<_>>(),
        all_steps,
        "{}",
        single.dump()
    );
    assert_eq!(
        pn.keys().copied().collect::<Vec<_>>(),
        all_steps,
        "{}",
        multi.dump()
    );
    for (step, a) in &p1 {
        let b = pn[step];
        assert!(
            (a - b).abs() <= PRINTED_TOL,
            "step {step}: printed loss {a} (1 process) vs {b} ({np} ranks, ep {ep})"
        );
    }

    // Logged losses, full precision.
    let m1 = metrics(&single_dir);
    let mn = metrics(&multi_dir);
    assert_eq!(m1.keys().copied().collect::<Vec<_>>(), all_steps);
    assert_eq!(mn.keys().copied().collect::<Vec<_>>(), all_steps);
    for step in &all_steps {
        for key in ["loss", "lm_loss", "aux_loss"] {
            let a = m1[step][key].as_f64().unwrap();
            let b = mn[step][key].as_f64().unwrap();
            let rel = (a - b).abs() / a.abs().max(1e-12);
            assert!(
                rel <= REL_TOL,
                "step {step} {key}: 1 process {a} vs {np} ranks (ep {ep}) {b}: rel {rel:.2e} > {REL_TOL:e}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// EP=4 over 4 processes started by plain mpirun.
#[test]
fn ep4_under_mpirun_matches_one_process() {
    check_equivalence("mpirun_train::ep4_under_mpirun", Via::Mpirun, 4, 4, 4);
}

/// EP=2 over 2 processes started by `moe launch`.
#[test]
fn ep2_under_launch_matches_one_process() {
    check_equivalence("mpirun_train::ep2_under_launch", Via::Launch, 2, 2, 4);
}

/// DP 2 x EP 2 (4 processes, each expert held by 2 ranks) under `moe launch`.
#[test]
fn dp2_ep2_under_launch_matches_one_process() {
    check_equivalence("mpirun_train::dp2_ep2_under_launch", Via::Launch, 4, 2, 4);
}

/// SIGTERM to `moe launch` is a graceful stop: every rank finishes the same step, the
/// checkpoint of that step is written, the job exits 0 and says how to resume; then
/// `--resume auto` under the launcher continues from that step to the end.
#[test]
fn sigterm_to_launch_checkpoints_and_resumes() {
    const TEST: &str = "mpirun_train::sigterm_to_launch";
    if !have_mpirun() {
        return skip(TEST, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    let dir = temp("sigterm-launch");
    let out = dir.join("run");
    let steps = 300; // far more than run before the signal lands
    let sets = [
        "trainer.batch_size=2".to_string(),
        "parallel.ep_size=2".into(),
    ];
    let args = train_args(&out, steps, &sets);

    let mut child = spawn(launch(2).args(&args));
    let (lines, out_h) = stream_lines(child.stdout.take().expect("stdout"));
    let err = child.stderr.take().expect("stderr");
    let err_h = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { err }, &mut s);
        s
    });
    // Signal once rank 0 has logged step 3: the ranks are inside the training loop.
    let started = Instant::now();
    let mut seen = false;
    while !seen && started.elapsed() < RUN_LIMIT {
        match lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => seen = printed_losses(&l).keys().any(|&s| s >= 3),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break, // stdout closed: the job ended early
        }
    }
    if !seen {
        kill_group(&child);
    }
    // SAFETY: kill(2) of our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
    let signalled = Instant::now();
    let (status, elapsed, killed) = wait_or_kill(&mut child, Duration::from_secs(60));
    let stop_secs = signalled.elapsed().as_secs_f64();
    let f = Finished {
        status,
        stdout: out_h.join().unwrap_or_default(),
        stderr: err_h.join().unwrap_or_default(),
        elapsed,
    };
    let dump = f.dump();
    let Finished {
        status,
        stdout,
        stderr,
        ..
    } = f;
    assert!(seen, "step 3 never logged\n{dump}");
    assert!(
        !killed,
        "the launcher did not stop within 60 s of SIGTERM\n{dump}"
    );
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0\n{dump}");
    assert!(
        stderr.contains("mpirun: Forwarding signal 10 to job"),
        "mpirun should relay SIGUSR1 (10) to the ranks\n{dump}"
    );

    // The stop step, as rank 0 reports it, is the last logged step and has a checkpoint.
    let stop_line = stdout
        .lines()
        .find(|l| l.contains("stopped by signal after step"))
        .unwrap_or_else(|| panic!("no stop message\n{dump}"));
    let stop_step: u64 = stop_line
        .split("after step ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.trim_end_matches([';', ',']).parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the stop step of {stop_line:?}"));
    assert!(
        (3..steps).contains(&stop_step),
        "stopped at step {stop_step}\n{dump}"
    );
    assert!(stdout.contains("--resume"), "no resume hint\n{dump}");
    let ckpt = out.join(format!("checkpoints/step-{stop_step:08}"));
    for f in [
        "manifest.json",
        "experts-r0.safetensors",
        "experts-r1.safetensors",
    ] {
        assert!(
            ckpt.join(f).is_file(),
            "{} missing after the stop\n{dump}",
            ckpt.join(f).display()
        );
    }
    let logged = metrics(&out);
    assert_eq!(
        logged.keys().last().copied(),
        Some(stop_step),
        "metrics.jsonl should end at the stop step"
    );
    eprintln!("graceful stop at step {stop_step}, {stop_secs:.1}s after SIGTERM");

    // Progress under the launcher is plain lines: no carriage returns, no terminal escapes.
    assert!(!stdout.contains('\x1b'), "{dump}");
    // Resume by pasting the printed command into a shell: it runs under the launcher,
    // continues at the stop step and runs to the end.
    let hint = stdout
        .lines()
        .find_map(|l| l.split_once("to resume: ").map(|(_, c)| c.to_owned()))
        .unwrap_or_else(|| panic!("no resume command\n{dump}"));
    assert!(hint.contains(" launch --np 2 -- train --config "), "{hint}");
    let mut resume = Command::new("sh");
    // Five more steps are enough to see it continue (a later --set wins).
    let end = stop_step + 5;
    resume
        .current_dir(root())
        .args(["-c", &format!("{hint} --set trainer.max_steps={end}")]);
    let f = run(&mut resume, RUN_LIMIT);
    assert!(f.status.success(), "resume failed\n{}", f.dump());
    assert!(
        f.stdout.contains(&format!("at step {stop_step}")),
        "no resume message naming step {stop_step}\n{}",
        f.dump()
    );
    let logged = metrics(&out);
    assert_eq!(logged.keys().last().copied(), Some(end), "{}", f.dump());
    assert!(
        printed_losses(&f.stdout).keys().next().copied() == Some(stop_step + 1),
        "the resumed run should start at step {}\n{}",
        stop_step + 1,
        f.dump()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `moe launch --np 2 -- moe check ...` reads like the command each rank runs: the leading
/// `moe` is the program name, not a subcommand.
#[test]
fn launch_accepts_a_leading_moe() {
    const TEST: &str = "mpirun_train::launch_accepts_a_leading_moe";
    if !have_mpirun() {
        return skip(TEST, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    let f = run(
        launch(2)
            .args(["moe", "check", "--config"])
            .arg(root().join("configs/ep2.yaml")),
        RUN_LIMIT,
    );
    assert!(f.status.success(), "{}", f.dump());
    assert!(f.stdout.contains("[rank 1]   ep_size: 2"), "{}", f.dump());
}

/// `parallel.backend: nccl` on this CPU-only machine: a clear configuration error (exit 2),
/// before anything runs, not a panic.
#[test]
fn nccl_backend_with_cpu_device_is_rejected() {
    let dir = temp("nccl-cpu");
    let f = run(
        Command::new(moe_bin()).args(train_args(
            &dir.join("run"),
            2,
            &["parallel.backend=nccl".into(), "parallel.ep_size=1".into()],
        )),
        RUN_LIMIT,
    );
    assert_eq!(f.status.code(), Some(2), "{}", f.dump());
    assert!(
        f.stderr
            .contains("parallel.backend (nccl) needs CUDA tensors, but trainer.device is cpu"),
        "{}",
        f.dump()
    );
    assert!(!f.stderr.contains("panicked"), "{}", f.dump());
    assert!(!dir.join("run").exists(), "nothing should be written");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `trainer.device: auto` resolves to the CPU here, so `backend: nccl` is refused when the
/// device is known: in one process, and on every rank under mpirun (the job aborts with the
/// rank and the reason; no rank waits for a peer that gave up).
#[test]
fn nccl_backend_without_cuda_is_a_clear_error() {
    const TEST: &str = "mpirun_train::nccl_backend_without_cuda";
    let dir = temp("nccl-auto");
    let sets = [
        "parallel.backend=nccl".to_string(),
        "trainer.device=auto".into(),
    ];
    let with_auto = |out: &Path, ep: usize| {
        let mut a = train_args(out, 2, &sets);
        a.extend(["--set".into(), format!("parallel.ep_size={ep}")]);
        a
    };
    let f = run(
        Command::new(moe_bin()).args(with_auto(&dir.join("one"), 1)),
        RUN_LIMIT,
    );
    assert_eq!(f.status.code(), Some(1), "{}", f.dump());
    assert!(
        f.stderr
            .contains("parallel.backend is nccl, which needs CUDA tensors"),
        "{}",
        f.dump()
    );
    assert!(!f.stderr.contains("panicked"), "{}", f.dump());

    if !have_mpirun() {
        return skip(TEST, "mpirun not installed (apt-get install openmpi-bin)");
    }
    let _jobs = mpi_lock();
    let f = run(
        mpirun(2).args(with_auto(&dir.join("two"), 2)),
        Duration::from_secs(60),
    );
    assert_ne!(f.status.code(), Some(0), "{}", f.dump());
    let all = f.combined();
    assert!(
        all.contains("of 2: error: parallel.backend is nccl, which needs CUDA tensors"),
        "{}",
        f.dump()
    );
    // The ranks abort the job with exit code 1 (not a hang: the limit above). mpirun's own
    // "MPI_ABORT was invoked" banner is not asserted: OpenMPI 4.1 sometimes loses it when
    // ranks abort at once (`ORTE_ERROR_LOG ... show_help.c`, seen in CI), as faults_mpi.rs
    // explains.
    assert_eq!(f.status.code(), Some(1), "{}", f.dump());
    let _ = std::fs::remove_dir_all(&dir);
}
