//! A newcomer's commands that need no training (issue 17): every bad input exits 2 with a
//! message naming the flag or key, the help and config reference say what the tools do, and
//! `check`/`inspect` validate alike. Each test runs the binary as a user types it.

mod common;

use common::{moe, repo_root, Scratch};
use std::process::Command;

/// `moe args...` in `dir` with extra environment variables.
fn moe_in(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moe"));
    cmd.args(args)
        .current_dir(dir)
        .env_remove("OMPI_COMM_WORLD_SIZE")
        .env_remove("OMPI_COMM_WORLD_RANK")
        .env_remove("PMI_SIZE")
        .env_remove("PMI_RANK");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn assert_exit(got: &(i32, String, String), code: i32, parts: &[&str]) {
    let (c, out, err) = got;
    assert_eq!(*c, code, "exit code\n--- stdout\n{out}--- stderr\n{err}");
    for p in parts {
        assert!(err.contains(p), "stderr lacks {p:?}:\n{err}");
    }
}

/// The help promises "2 for bad input": each case the issue lists exits 2 and names what to fix.
#[test]
fn bad_input_exits_2() {
    let s = Scratch::new("newcomer-exit2");
    let cfg = s.config("c.yaml", "trainer:\n  max_steps: 2\n");
    let cfg = cfg.to_str().unwrap();
    // An out_dir that holds a run: refused, untouched, and the message names both ways on.
    std::fs::create_dir_all(s.out_dir()).unwrap();
    std::fs::write(s.out_dir().join("metrics.jsonl"), "keep\n").unwrap();
    assert_exit(
        &moe(&["train", "--config", cfg]),
        2,
        &["already holds a run", "--resume auto", "--overwrite"],
    );
    assert_eq!(
        std::fs::read_to_string(s.out_dir().join("metrics.jsonl")).unwrap(),
        "keep\n"
    );
    // A missing data file: train and check both refuse it before anything runs.
    let missing = s.config(
        "m.yaml",
        "data:\n  source: text\n  path: no-such-corpus.txt\n",
    );
    let missing = missing.to_str().unwrap();
    for cmd in ["train", "check"] {
        assert_exit(
            &moe(&[cmd, "--config", missing]),
            2,
            &[
                "data.path",
                "no-such-corpus.txt",
                "does not exist",
                "line 5",
            ],
        );
    }
    // --resume of a path that does not exist says so.
    std::fs::remove_dir_all(s.out_dir()).unwrap();
    assert_exit(
        &moe(&["train", "--config", cfg, "--resume", "/no/such/run"]),
        2,
        &["--resume /no/such/run: no such file or directory"],
    );
    assert_exit(
        &moe(&["eval", "--checkpoint", "/no/such/run"]),
        2,
        &["--checkpoint /no/such/run: no such file or directory"],
    );
    // A directory holding no checkpoint, for --resume as for --checkpoint.
    let empty = s.0.join("empty-run");
    std::fs::create_dir_all(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    assert_exit(
        &moe(&["train", "--config", cfg, "--resume", empty]),
        2,
        &["--resume", "holds no intact checkpoints"],
    );
    assert_exit(
        &moe(&["eval", "--checkpoint", empty]),
        2,
        &["--checkpoint", "holds no intact checkpoints"],
    );
    // moe launch: --np 0, -n 0 and a missing hostfile.
    for np in ["--np", "-n"] {
        assert_exit(
            &moe(&["launch", np, "0", "--", "train"]),
            2,
            &["0 is not in 1.."],
        );
    }
    assert_exit(
        &moe(&[
            "launch",
            "--np",
            "2",
            "--hostfile",
            "/no/hosts",
            "--",
            "train",
        ]),
        2,
        &["--hostfile /no/hosts: no such file"],
    );
    // The MPI all-to-all benchmark outside mpirun.
    assert_exit(
        &moe(&["bench", "a2a", "--backend", "mpi"]),
        2,
        &["must run under mpirun"],
    );
    // A negative temperature is a range error, not a clap "unexpected argument".
    assert_exit(
        &moe(&[
            "generate",
            "--checkpoint",
            "x",
            "--prompt",
            "a",
            "--temperature",
            "-1",
        ]),
        2,
        &["temperature (-1) must be a finite number >= 0"],
    );
}

/// A run that fails (an injected error on its second step) exits 1, not 2.
#[test]
fn failed_run_exits_1() {
    let s = Scratch::new("newcomer-exit1");
    let cfg = s.config(
        "c.yaml",
        "trainer:\n  max_steps: 3\n  device: cpu\n  threads: 1\nmodel:\n  num_layers: 1\n",
    );
    let got = moe_in(
        &repo_root(),
        &[("MOE_FAULT", "error@0:2")],
        &["train", "--config", cfg.to_str().unwrap()],
    );
    assert_exit(&got, 1, &["error"]);
}

/// `--set trainer.max_steps=5` and `--set trainer.lr=1e-4` on the quickstart config: one
/// warning line each, and the resolved config carries the clamped values.
#[test]
fn short_runs_need_one_flag() {
    let (code, out, err) = moe(&[
        "check",
        "--config",
        "configs/quickstart.yaml",
        "--set",
        "trainer.max_steps=5",
        "--set",
        "trainer.lr=1e-4",
    ]);
    assert_eq!(code, 0, "{err}");
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 2, "{err}");
    assert!(warnings[0].contains("trainer.warmup_steps (20) > trainer.max_steps (5)"));
    assert!(warnings[1].contains("trainer.min_lr (0.0003) > trainer.lr (0.0001)"));
    assert!(out.contains("  warmup_steps: 5\n"), "{out}");
    assert!(out.contains("  min_lr: 0.0001\n"), "{out}");
    // Under mpirun only rank 0 prints them.
    let (code, _, err) = moe_in(
        &repo_root(),
        &[("OMPI_COMM_WORLD_RANK", "1")],
        &[
            "check",
            "-c",
            "configs/quickstart.yaml",
            "--set",
            "trainer.max_steps=5",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("warning"), "{err}");
}

/// `moe check` of a multi-rank config validates for the world it needs; `--json` prints the
/// same resolved config as JSON; `inspect` refuses what `check` refuses.
#[test]
fn check_and_inspect_validate_alike() {
    let (code, _, err) = moe(&["check", "--config", "configs/ep2.yaml"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = moe(&["check", "--config", "configs/ep2.yaml", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["parallel"]["ep_size"], 2);
    assert_eq!(v["run"]["out_dir"], "runs/ep2");
    let long = [
        "--config",
        "configs/mixtral-8x7b.yaml",
        "--set",
        "data.seq_len=65536",
    ];
    let (code_check, _, err_check) = moe(&[&["check"][..], &long[..]].concat());
    let (code_inspect, _, err_inspect) = moe(&[&["inspect"][..], &long[..]].concat());
    assert_eq!(code_check, 2, "{err_check}");
    assert_eq!(code_inspect, 2, "{err_inspect}");
    assert!(err_inspect.contains("data.seq_len"), "{err_inspect}");
    // --debug under a 2-process mpirun: refused, naming the 2 in-process ranks (not 2 x 2).
    let (code, _, err) = moe_in(
        &repo_root(),
        &[("OMPI_COMM_WORLD_SIZE", "2")],
        &["check", "--config", "configs/debug.yaml", "--debug"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("world size of 2 "), "{err}");
    assert!(err.contains("mpirun started 2 processes"), "{err}");
}

/// Relative data paths in a config are relative to the config file: the same config works
/// from any working directory, `check` finds the file, and the resolved path is absolute.
#[test]
fn data_paths_are_relative_to_the_config_file() {
    let s = Scratch::new("newcomer-paths");
    s.write("corpus.txt", &"to be or not to be ".repeat(200));
    let cfg = s.config("c.yaml", "data:\n  source: text\n  path: corpus.txt\n");
    let cfg = cfg.to_str().unwrap();
    for cwd in [repo_root(), std::env::temp_dir()] {
        let (code, out, err) = moe_in(&cwd, &[], &["check", "--config", cfg]);
        assert_eq!(code, 0, "from {}: {err}", cwd.display());
        let want = s.0.join("corpus.txt").canonicalize().unwrap();
        assert!(
            out.contains(&format!("path: {}\n", want.display())),
            "{out}"
        );
    }
    // A --set path is relative to the working directory, as typed.
    let (code, _, err) = moe_in(
        &s.0,
        &[],
        &["check", "--config", cfg, "--set", "data.path=missing.txt"],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("missing.txt does not exist"), "{err}");
    assert!(err.contains("[--set data.path=missing.txt]"), "{err}");
}

/// `run.out_dir` follows `run.name` unless set, so `--set run.name=x` is a new run directory.
#[test]
fn run_directory_follows_run_name() {
    let (code, out, err) = moe(&[
        "check",
        "-c",
        "configs/quickstart.yaml",
        "--set",
        "run.name=short",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("  out_dir: runs/short\n"), "{out}");
    let (_, out, _) = moe(&["check", "-c", "configs/quickstart.yaml"]);
    assert!(out.contains("  out_dir: runs/quickstart\n"), "{out}");
}

/// Help and the config reference say what the tools accept.
#[test]
fn help_and_reference_say_what_runs() {
    let (code, out, _) = moe(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("target/release/moe"), "{out}");
    assert!(out.contains("--allow-run-as-root"), "{out}");
    let (_, out, _) = moe(&["train", "--help"]);
    for flag in ["--overwrite", "--progress <plain|live>"] {
        assert!(out.contains(flag), "{out}");
    }
    let (_, reference, _) = moe(&["config-reference"]);
    for key in ["trainer.max_steps", "trainer.log_every", "checkpoint.keep"] {
        let row = reference
            .lines()
            .find(|l| l.starts_with(&format!("| `{key}` ")))
            .unwrap_or_else(|| panic!("{key} missing"));
        assert!(row.contains("integer >= 1"), "{row}");
    }
}

/// A smoke run as the issue types it: `moe train --config configs/quickstart.yaml --set
/// trainer.max_steps=5 --set trainer.lr=1e-4` trains 5 steps after one warning line for each
/// clamped value (the run directory moved to a scratch one, the torch threads to one).
#[test]
fn a_smoke_run_needs_one_flag() {
    let s = Scratch::new("newcomer-smoke");
    let out = format!("run.out_dir={}", s.out_dir().display());
    let (code, stdout, err) = moe(&[
        "train",
        "--config",
        "configs/quickstart.yaml",
        "--set",
        "trainer.max_steps=5",
        "--set",
        "trainer.lr=1e-4",
        "--set",
        &out,
        "--set",
        "trainer.threads=1",
        "--set",
        "trainer.device=cpu",
    ]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    let warnings = err.lines().filter(|l| l.starts_with("warning: ")).count();
    assert_eq!(warnings, 2, "{err}");
    assert!(stdout.contains("done: 5 steps"), "{stdout}");
}

/// `moe bench train --config configs/debug.yaml` measures the debug model under its own name
/// (not "quickstart") and runs although debug.yaml asks for two expert-parallel ranks.
#[test]
fn bench_train_takes_the_debug_config() {
    let (code, out, err) = moe(&[
        "bench",
        "train",
        "--config",
        "configs/debug.yaml",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--threads",
        "1",
        "--no-rss",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("| debug MoE |"), "{out}");
    assert!(!out.contains("quickstart"), "{out}");
}
