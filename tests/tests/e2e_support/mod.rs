//! Helpers of the end-to-end tests (e2e_*.rs): they run the real `moe` binary built by
//! `cargo build --release --bins` (`make test` builds it first), read back what a run wrote,
//! and compare runs.

#![allow(dead_code)] // each test file uses a different subset

use moe_trainer::metrics::{read_metrics, EvalRecord, MetricsRecord, TrainRecord};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `target/release/moe` of this workspace; fails the test with what to do when missing.
pub fn moe_bin() -> PathBuf {
    let bin = moe_tests::workspace_root().join("target/release/moe");
    assert!(
        bin.is_file(),
        "{} not found: the end-to-end tests run the release binary; build it first with \
         `cargo build --release --bins` (or run `make test`, which does)",
        bin.display()
    );
    bin
}

/// The project virtualenv's Python (torch-free tools: safetensors, tensorboard).
pub fn python() -> PathBuf {
    let py = moe_tests::workspace_root().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} not found: create the virtualenv with `make setup`",
        py.display()
    );
    py
}

/// `moe train --config <config>` in the workspace root, on the CPU with one torch thread
/// per rank (the machine has 2 cores and tests run side by side), writing into `out`.
pub fn train_cmd<S: AsRef<str>>(config: &str, out: &Path, sets: &[S]) -> Command {
    let mut cmd = Command::new(moe_bin());
    cmd.current_dir(moe_tests::workspace_root())
        .env_remove("MOE_FAULT")
        .args(["train", "--config", config])
        .args(["--set", "trainer.device=cpu", "--set", "trainer.threads=1"])
        .arg("--set")
        .arg(format!("run.out_dir={}", out.display()));
    for s in sets {
        cmd.args(["--set", s.as_ref()]);
    }
    cmd
}

/// Output of a finished command.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub secs: f64,
}

impl Finished {
    /// Both streams, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status {:?} after {:.1}s\n--- stdout\n{}--- stderr\n{}",
            self.status, self.secs, self.stdout, self.stderr
        )
    }

    /// Asserts exit status 0.
    pub fn ok(self) -> Self {
        assert!(self.status.success(), "expected success\n{}", self.dump());
        self
    }
}

/// A started child with its output being collected.
pub struct Running {
    pub child: Child,
    out: Option<JoinHandle<String>>,
    err: Option<JoinHandle<String>>,
    start: Instant,
}

impl Running {
    /// Starts `cmd` with piped output.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let out = reader(child.stdout.take().unwrap());
        let err = reader(child.stderr.take().unwrap());
        Self {
            child,
            out: Some(out),
            err: Some(err),
            start: Instant::now(),
        }
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid; it has not been reaped yet (we hold it).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, sig);
        }
    }

    /// Whether the child is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits up to `timeout`; past it the child is killed and the test fails with its output.
    pub fn finish(mut self, timeout: Duration) -> Finished {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let secs = self.start.elapsed().as_secs_f64();
        let stdout = self.out.take().unwrap().join().unwrap();
        let stderr = self.err.take().unwrap().join().unwrap();
        match status {
            Some(status) => Finished {
                status,
                stdout,
                stderr,
                secs,
            },
            None => panic!(
                "still running after {timeout:?}, killed\n--- stdout\n{stdout}--- stderr\n{stderr}"
            ),
        }
    }
}

fn reader<R: Read + Send + 'static>(mut r: R) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs `cmd` to completion within `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Finished {
    Running::spawn(cmd).finish(timeout)
}

/// Polls `cond` every 5 ms until it holds; fails the test past `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Train and eval records of `<out>/metrics.jsonl`, in file order.
pub fn metrics(out: &Path) -> (Vec<TrainRecord>, Vec<EvalRecord>) {
    let path = out.join("metrics.jsonl");
    let all = read_metrics(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for r in all {
        match r {
            MetricsRecord::Train(t) => train.push(t),
            MetricsRecord::Eval(e) => eval.push(e),
        }
    }
    (train, eval)
}

/// Number of complete train lines in `<out>/metrics.jsonl` (0 if it does not exist yet).
pub fn train_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|t| {
            t.lines()
                .filter(|l| l.contains("\"kind\":\"train\""))
                .count()
        })
        .unwrap_or(0)
}

/// The steps of `records`, in order.
pub fn steps(records: &[TrainRecord]) -> Vec<u64> {
    records.iter().map(|r| r.step).collect()
}

/// The quantities a resumed run must reproduce bit for bit, by name.
pub fn exact_fields(r: &TrainRecord) -> [(&'static str, f64); 8] {
    [
        ("loss", r.loss),
        ("lm_loss", r.lm_loss),
        ("aux_loss", r.aux_loss),
        ("z_loss", r.z_loss),
        ("grad_norm", r.grad_norm),
        ("lr", r.lr),
        ("dropped_frac", r.dropped_frac),
        ("load_imbalance", r.load_imbalance),
    ]
}

/// Asserts that every record of `got` with step > `after` equals the record of the same step
/// in `want` in every field of [`exact_fields`], compared as f64 bit patterns.
pub fn assert_same_steps(got: &[TrainRecord], want: &[TrainRecord], after: u64) {
    let want: BTreeMap<u64, &TrainRecord> = want.iter().map(|r| (r.step, r)).collect();
    let mut compared = 0;
    for g in got.iter().filter(|r| r.step > after) {
        let w = want
            .get(&g.step)
            .unwrap_or_else(|| panic!("step {} missing in the reference", g.step));
        for ((name, a), (_, b)) in exact_fields(g).into_iter().zip(exact_fields(w)) {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "step {}: {name} {a:?} (resumed) != {b:?} (uninterrupted)",
                g.step
            );
        }
        compared += 1;
    }
    assert!(compared > 0, "no step after {after} to compare");
}

/// Every file under `dir` with its bytes (to check that nothing changed).
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// `checkpoints/step-XXXXXXXX` of a run.
pub fn ckpt(out: &Path, step: u64) -> PathBuf {
    out.join("checkpoints").join(format!("step-{step:08}"))
}

/// The step of `resumed from <path> at step N` in a run's stdout.
pub fn resumed_step(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .find(|l| l.starts_with("resumed from "))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
}
