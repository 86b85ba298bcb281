//! End to end, a newcomer's first hour (issue 17), each command run as a user types it: the
//! `moe train --help` examples run as printed, twice, after `make train`; `--overwrite`
//! starts over; progress is one plain line per log step off a terminal and with several
//! ranks; a closed stdout does not stop training; `--resume` takes a run directory, warns
//! about a changed schedule and leaves TensorBoard without the steps beyond the checkpoint.

mod e2e_support;

use e2e_support::{ckpt, metrics, moe_bin, python, run, steps, train_cmd, Running};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const DEBUG: &str = "configs/debug.yaml";
const T: Duration = Duration::from_secs(300);
/// One simulated rank, no eval: a few seconds per run.
const TINY: [&str; 3] = [
    "parallel.ep_size=1",
    "trainer.batch_size=4",
    "trainer.eval_every=0",
];

fn sets<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    TINY.iter().copied().chain(extra.iter().copied()).collect()
}

/// A copy of configs/ in `dir`, shrunk (1 layer of width 32, 3 steps, batch 2) so that the
/// commands run as printed finish in seconds; the commands and run directories are the real
/// ones.
fn shrunk_configs(dir: &Path) {
    let src = moe_tests::workspace_root().join("configs");
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let shrunk: String = text
            .lines()
            .map(|l| {
                let key = l.trim_start().split(':').next().unwrap_or("");
                let indent = &l[..l.len() - l.trim_start().len()];
                match key {
                    "max_steps" => format!("{indent}max_steps: 3"),
                    "num_layers" => format!("{indent}num_layers: 1"),
                    "d_model" => format!("{indent}d_model: 32"),
                    "batch_size" => format!("{indent}batch_size: 2"),
                    "threads" => format!("{indent}threads: 1"),
                    _ => l.to_owned(),
                }
            })
            .map(|l| l + "\n")
            .collect();
        std::fs::write(dir.join("configs").join(p.file_name().unwrap()), shrunk).unwrap();
    }
}

/// `line` (a command as printed, starting with `moe`) run by the shell in `dir`, with `moe`
/// being the built binary.
fn shell(dir: &Path, line: &str) -> Command {
    let rest = line.strip_prefix("moe ").expect("a moe command");
    let mut cmd = Command::new("sh");
    cmd.current_dir(dir)
        .env_remove("MOE_FAULT")
        .arg("-c")
        .arg(format!("{} {rest}", moe_bin().display()));
    cmd
}

#[test]
fn help_examples_run_as_printed_after_make_train() {
    let dir = moe_tests::temp_dir("e2e-help-examples");
    shrunk_configs(&dir);
    // `make train`: the Makefile's command.
    let makefile = std::fs::read_to_string(moe_tests::workspace_root().join("Makefile")).unwrap();
    assert!(makefile.contains("target/release/moe train --config $(CONFIG) --resume auto"));
    run(
        &mut shell(
            &dir,
            "moe train --config configs/quickstart.yaml --resume auto",
        ),
        T,
    )
    .ok();
    let help = run(Command::new(moe_bin()).args(["train", "--help"]), T).ok();
    let examples: Vec<&str> = help
        .stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("moe train "))
        .collect();
    assert!(examples.len() >= 3, "{}", help.stdout);
    for ex in &examples {
        for attempt in 1..=2 {
            let f = run(&mut shell(&dir, ex), T);
            assert!(
                f.status.success(),
                "`{ex}` (run {attempt}) failed\n{}",
                f.dump()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn overwrite_starts_over_and_keeps_nothing_of_the_old_run() {
    let out = moe_tests::temp_dir("e2e-overwrite");
    run(
        &mut train_cmd(DEBUG, &out, &sets(&["trainer.max_steps=3"])),
        T,
    )
    .ok();
    let refused = run(
        &mut train_cmd(DEBUG, &out, &sets(&["trainer.max_steps=2"])),
        T,
    );
    assert_eq!(refused.status.code(), Some(2), "{}", refused.dump());
    let f = run(
        train_cmd(DEBUG, &out, &sets(&["trainer.max_steps=2"])).arg("--overwrite"),
        T,
    )
    .ok();
    assert!(
        f.stderr.contains("--overwrite: removed the earlier run"),
        "{}",
        f.dump()
    );
    assert_eq!(steps(&metrics(&out).0), vec![1, 2], "{}", f.dump());
    assert!(ckpt(&out, 2).join("manifest.json").is_file());
    assert!(!ckpt(&out, 3).exists(), "the old run's checkpoint survived");
    let events = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .count();
    assert_eq!(events, 1, "old TensorBoard files survived");
    let _ = std::fs::remove_dir_all(&out);
}

/// Progress lines: plain (no carriage return, no ANSI clear) in a pipe and with several ranks
/// on a terminal; live only on a terminal with one rank, or when asked.
#[test]
fn progress_is_plain_unless_one_rank_on_a_terminal() {
    const CLEAR: &str = "\r\x1b[2K";
    let out = moe_tests::temp_dir("e2e-progress");
    // An eval every 2 steps: its line must not bring the step line back a second time.
    let s = sets(&[
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.eval_iters=1",
    ]);
    let piped = run(&mut train_cmd(DEBUG, &out, &s), T).ok();
    let step_lines: Vec<&str> = piped
        .stdout
        .lines()
        .filter(|l| l.starts_with("step ") && l.contains(" | loss "))
        .collect();
    assert_eq!(step_lines.len(), 4, "{}", piped.dump());
    assert_eq!(
        piped
            .stdout
            .lines()
            .filter(|l| l.starts_with("step ") && l.contains(": val_loss"))
            .count(),
        2,
        "{}",
        piped.dump()
    );
    assert!(!piped.stdout.contains('\r') && !piped.stdout.contains('\x1b'));
    let live = run(
        train_cmd(DEBUG, &out, &s).args(["--overwrite", "--progress", "live"]),
        T,
    )
    .ok();
    assert!(live.stdout.contains(CLEAR), "{}", live.dump());

    // A terminal, through script(1)'s pseudo-terminal: one rank is live, two are plain.
    let on_tty = |extra: &[&str]| {
        let cmd = train_cmd(DEBUG, &out, &s);
        let mut line: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| shell_word(&a.to_string_lossy()))
            .collect();
        line.extend(extra.iter().map(|a| a.to_string()));
        line.push("--overwrite".into());
        let mut script = Command::new("script");
        script.current_dir(moe_tests::workspace_root()).args([
            "-qfec",
            &line.join(" "),
            "/dev/null",
        ]);
        run(&mut script, T).ok()
    };
    let one = on_tty(&[]);
    assert!(one.stdout.contains(CLEAR), "{}", one.dump());
    let two = on_tty(&["--debug", "--set", "parallel.ep_size=2"]);
    assert!(!two.stdout.contains('\x1b'), "{}", two.dump());
    assert_eq!(
        two.stdout
            .lines()
            .filter(|l| l.starts_with("step ") && l.contains(" | loss "))
            .count(),
        4,
        "{}",
        two.dump()
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `moe train ... | head -1`: the pipe closes after the first line; training goes on to its
/// last step and checkpoint and exits 0.
#[test]
fn a_closed_stdout_does_not_stop_training() {
    let out = moe_tests::temp_dir("e2e-closed-stdout");
    let mut cmd = train_cmd(
        DEBUG,
        &out,
        &sets(&["trainer.max_steps=6", "trainer.log_every=1"]),
    );
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.starts_with("moe train: "), "{first}");
    // The reader is dropped here: stdout is a closed pipe from now on.
    let stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let status = child.wait().unwrap();
    let err = err.join().unwrap();
    assert!(status.success(), "{status:?}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(steps(&metrics(&out).0), (1..=6).collect::<Vec<_>>());
    assert!(ckpt(&out, 6).join("manifest.json").is_file());
    let _ = std::fs::remove_dir_all(&out);
}

/// A run killed between checkpoints (simulated: its last checkpoint removed, metrics and
/// events kept) resumes from its run directory; a changed max_steps is warned about once;
/// TensorBoard then holds each step once, as metrics.jsonl does.
#[test]
fn resume_from_a_run_directory_rewinds_tensorboard() {
    let out = moe_tests::temp_dir("e2e-resume-rundir");
    let first = sets(&[
        "trainer.max_steps=6",
        "trainer.log_every=1",
        "checkpoint.every=3",
        "checkpoint.keep=5",
    ]);
    run(&mut train_cmd(DEBUG, &out, &first), T).ok();
    std::fs::remove_dir_all(ckpt(&out, 6)).unwrap();
    let mut longer = first.clone();
    longer.push("trainer.max_steps=8");
    let f = run(train_cmd(DEBUG, &out, &longer).arg("--resume").arg(&out), T).ok();
    assert!(f.stdout.contains("step-00000003 at step 3"), "{}", f.dump());
    let warnings: Vec<&str> = f
        .stderr
        .lines()
        .filter(|l| l.contains("trainer.max_steps is 8 but the checkpoint's run had 6"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", f.dump());
    assert_eq!(steps(&metrics(&out).0), (1..=8).collect::<Vec<_>>());
    let tb = Command::new(python())
        .arg(moe_tests::workspace_root().join("tests/python/read_tensorboard.py"))
        .arg(&out)
        .args(["--expect-count", "train/loss=8"])
        .output()
        .unwrap();
    assert!(
        tb.status.success(),
        "{}{}",
        String::from_utf8_lossy(&tb.stdout),
        String::from_utf8_lossy(&tb.stderr)
    );
    // The checkpoints directory names the same newest checkpoint: nothing left to do.
    let done = run(
        train_cmd(DEBUG, &out, &longer)
            .arg("--resume")
            .arg(out.join("checkpoints")),
        T,
    )
    .ok();
    assert!(done.stdout.contains("nothing to do"), "{}", done.dump());
    let _ = std::fs::remove_dir_all(&out);
}

/// A stopped run prints a resume command that runs when pasted into a shell.
#[test]
fn the_printed_resume_command_runs() {
    let out = moe_tests::temp_dir("e2e-resume-hint");
    let s = sets(&["trainer.max_steps=200", "trainer.log_every=1"]);
    let child = Running::spawn(&mut train_cmd(DEBUG, &out, &s));
    e2e_support::wait_for("2 logged steps", T, || e2e_support::train_lines(&out) >= 2);
    child.signal(libc::SIGINT);
    let f = child.finish(T);
    assert!(f.status.success(), "{}", f.dump());
    let hint = f
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("to resume: "))
        .unwrap_or_else(|| panic!("no resume line\n{}", f.dump()));
    let stopped = steps(&metrics(&out).0).last().copied().unwrap();
    let mut cmd = Command::new("sh");
    cmd.current_dir(moe_tests::workspace_root()).args([
        "-c",
        &format!("{hint} --set trainer.max_steps={}", stopped + 2),
    ]);
    let r = run(&mut cmd, T).ok();
    assert!(
        r.stdout.contains(&format!("at step {stopped}")),
        "`{hint}`\n{}",
        r.dump()
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `--init-from RUN_DIR` starts a fresh run (step 1 first, a new optimizer) from the trained
/// weights: its first loss is the trained model's, below the first loss of the run it came
/// from (same seed, same first batch, untrained weights). A model of another shape is bad
/// input, exit 2.
#[test]
fn init_from_starts_a_fresh_run_from_trained_weights() {
    let a = moe_tests::temp_dir("e2e-init-a");
    let b = moe_tests::temp_dir("e2e-init-b");
    run(
        &mut train_cmd(DEBUG, &a, &sets(&["trainer.max_steps=12"])),
        T,
    )
    .ok();
    let f = run(
        train_cmd(DEBUG, &b, &sets(&["trainer.max_steps=2"]))
            .arg("--init-from")
            .arg(&a),
        T,
    )
    .ok();
    assert!(
        f.stdout.contains(&format!(
            "initialised the weights from {} (step 0",
            ckpt(&a, 12).display()
        )),
        "{}",
        f.dump()
    );
    let (ta, _) = metrics(&a);
    let (tb, _) = metrics(&b);
    assert_eq!(steps(&tb), vec![1, 2]);
    assert!(
        tb[0].lm_loss < ta[0].lm_loss - 0.1,
        "init-from step 1 lm_loss {} vs untrained {}",
        tb[0].lm_loss,
        ta[0].lm_loss
    );
    let c = moe_tests::temp_dir("e2e-init-c");
    let bad = run(
        train_cmd(
            DEBUG,
            &c,
            &sets(&["trainer.max_steps=2", "model.d_model=32"]),
        )
        .arg("--init-from")
        .arg(&a),
        T,
    );
    assert_eq!(bad.status.code(), Some(2), "{}", bad.dump());
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// `<run.out_dir>/train.log` holds rank 0's stdout and stderr: the start-up line, a warning
/// printed before training started, one plain line per logged step even when the terminal
/// side was live (redraws and eval messages in between), the final lines. A run refused
/// before it starts adds nothing; a resume appends below its own header; a resume that
/// fails adds its error.
#[test]
fn train_log_keeps_rank_0_output_run_after_run() {
    const CLEAR: &str = "\r\x1b[2K";
    let out = moe_tests::temp_dir("e2e-train-log");
    let log_path = out.join("train.log");
    // warmup_steps 5 > max_steps 3: a warning on stderr before anything runs.
    let first = sets(&[
        "trainer.max_steps=3",
        "trainer.log_every=1",
        "trainer.eval_every=2",
        "trainer.eval_iters=1",
    ]);
    let f = run(
        train_cmd(DEBUG, &out, &first).args(["--progress", "live"]),
        T,
    )
    .ok();
    assert!(f.stdout.contains(CLEAR), "{}", f.dump());
    let log = std::fs::read_to_string(&log_path).unwrap();
    let headers = |log: &str| log.lines().filter(|l| l.starts_with("==== ")).count();
    assert_eq!(headers(&log), 1, "{log}");
    assert!(
        log.lines().next().unwrap().contains("train --config"),
        "{log}"
    );
    assert!(!log.contains('\r') && !log.contains('\x1b'), "{log:?}");
    for want in [
        "warning: trainer.warmup_steps (5) > trainer.max_steps (3)",
        "moe train: debug (",
        "done: 3 steps",
        "checkpoint: ",
    ] {
        assert!(log.contains(want), "train.log lacks {want:?}\n{log}");
    }
    for step in 1..=3 {
        let lines = log
            .lines()
            .filter(|l| l.starts_with(&format!("step {step}/3 ")))
            .count();
        assert_eq!(lines, 1, "step {step} in train.log\n{log}");
    }
    assert!(log.lines().any(|l| l.contains("val_loss")), "{log}");

    // Refused (the directory holds a run): nothing added.
    let refused = run(&mut train_cmd(DEBUG, &out, &first), T);
    assert_eq!(refused.status.code(), Some(2), "{}", refused.dump());
    assert_eq!(std::fs::read_to_string(&log_path).unwrap(), log);

    // A resume appends.
    let longer = sets(&["trainer.max_steps=4", "trainer.log_every=1"]);
    run(
        train_cmd(DEBUG, &out, &longer).args(["--resume", "auto"]),
        T,
    )
    .ok();
    let log2 = std::fs::read_to_string(&log_path).unwrap();
    assert!(log2.starts_with(&log), "{log2}");
    let added = &log2[log.len()..];
    assert_eq!(headers(added), 1, "{added}");
    assert!(
        added.contains("resumed from ") && added.contains("step 4/4 "),
        "{added}"
    );

    // A resume into another model fails; its error is in the log too.
    let other = sets(&["trainer.max_steps=5", "model.d_model=32"]);
    let bad = run(train_cmd(DEBUG, &out, &other).args(["--resume", "auto"]), T);
    assert_eq!(bad.status.code(), Some(2), "{}", bad.dump());
    let log3 = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log3[log2.len()..].contains("model.d_model: checkpoint 64, config 32"),
        "{log3}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// `--resume` and `--init-from` of a checkpoint of another shape: the config keys that differ
/// first, then at most three tensors, as `moe eval --config` says it; exit 2.
#[test]
fn resume_and_init_from_mismatch_lead_with_the_config_keys() {
    let a = moe_tests::temp_dir("e2e-mismatch-a");
    let b = moe_tests::temp_dir("e2e-mismatch-b");
    run(
        &mut train_cmd(DEBUG, &a, &sets(&["trainer.max_steps=1"])),
        T,
    )
    .ok();
    let other = sets(&["trainer.max_steps=2", "model.d_model=32"]);
    let resume = run(train_cmd(DEBUG, &a, &other).args(["--resume", "auto"]), T);
    let init = run(train_cmd(DEBUG, &b, &other).arg("--init-from").arg(&a), T);
    for (flag, f) in [("--resume", resume), ("--init-from", init)] {
        assert_eq!(f.status.code(), Some(2), "{flag}\n{}", f.dump());
        let lines: Vec<&str> = f.stderr.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.contains("does not fit the model of the config"))
            .unwrap_or_else(|| panic!("{flag}\n{}", f.dump()));
        assert_eq!(
            lines[at + 1],
            "  model.d_model: checkpoint 64, config 32",
            "{flag}\n{}",
            f.dump()
        );
        let tensors = lines.iter().filter(|l| l.contains(".safetensors")).count();
        assert_eq!(tensors, 3, "{flag}\n{}", f.dump());
        assert!(
            lines.iter().any(|l| l.starts_with("  ... and ")),
            "{flag}\n{}",
            f.dump()
        );
        assert!(
            f.stderr.contains("--init-from need the model"),
            "{}",
            f.dump()
        );
    }
    for d in [a, b] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// One rule for paths: what a run reads (`data.path`) is relative to the config file, what
/// it writes (`run.out_dir`, `checkpoint.dir`) is relative to the working directory, as
/// `moe train --help` and the README say.
#[test]
fn outputs_are_relative_to_the_working_directory() {
    let base = moe_tests::temp_dir("e2e-paths");
    let (cfg_dir, work) = (base.join("cfg"), base.join("work"));
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(
        cfg_dir.join("corpus.txt"),
        "to be or not to be, that is the question. ".repeat(500),
    )
    .unwrap();
    std::fs::write(
        cfg_dir.join("c.yaml"),
        "run:\n  out_dir: myrun\ndata:\n  source: text\n  path: corpus.txt\n  seq_len: 16\n\
         checkpoint:\n  dir: ckpts\ntrainer:\n  max_steps: 2\n  warmup_steps: 1\n  \
         batch_size: 2\n  eval_every: 0\n  device: cpu\n  threads: 1\nmodel:\n  num_layers: 1\n  \
         d_model: 32\n",
    )
    .unwrap();
    let help = run(Command::new(moe_bin()).args(["train", "--help"]), T).ok();
    assert!(
        help.stdout
            .contains("(run.out_dir, checkpoint.dir) is relative to the working directory"),
        "{}",
        help.stdout
    );
    run(&mut shell(&work, "moe train --config ../cfg/c.yaml"), T).ok();
    assert!(work.join("myrun/metrics.jsonl").is_file());
    assert!(work.join("myrun/train.log").is_file());
    assert!(work.join("ckpts/step-00000002/manifest.json").is_file());
    assert!(!cfg_dir.join("myrun").exists() && !cfg_dir.join("ckpts").exists());
    let saved = std::fs::read_to_string(work.join("myrun/config.yaml")).unwrap();
    let corpus = cfg_dir.join("corpus.txt").canonicalize().unwrap();
    assert!(
        saved.contains(&format!("path: {}\n", corpus.display())),
        "{saved}"
    );
    let _ = std::fs::remove_dir_all(&base);
}
