//! Helpers of the real-process tests of `moe train` under OpenMPI (mpirun_train.rs,
//! faults_mpi.rs): the `moe` binary, tiny run settings, commands with a hard deadline, and
//! losses read back from stdout and metrics.jsonl.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// mpirun jobs of one test binary run one at a time: several 4-rank jobs at once on a
/// 2-core machine would only make each slower and the deadlines flaky.
pub static MPI_JOBS: Mutex<()> = Mutex::new(());

/// Takes [`MPI_JOBS`] (a test that failed while holding it does not poison the others).
pub fn mpi_lock() -> std::sync::MutexGuard<'static, ()> {
    MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The workspace root.
pub fn root() -> PathBuf {
    moe_tests::workspace_root()
}

/// `target/release/moe` (or `MOE_BIN`). Its absence is a failure, not a skip: `make test`
/// builds the binaries first (`cargo test` alone does not rebuild it: run
/// `cargo build --release -p moe-launch` after changing it).
pub fn moe_bin() -> PathBuf {
    let bin = std::env::var_os("MOE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target/release/moe"));
    assert!(
        bin.is_file(),
        "{} not built: run `make build` or `cargo build --release -p moe-launch`",
        bin.display()
    );
    bin
}

/// Whether `mpirun` runs; when not, the caller prints why it skips.
pub fn have_mpirun() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[allow(unused_imports)] // each test file uses a different subset
pub use moe_tests::skip;

/// `--set` overrides of a tiny run on configs/ep4.yaml: small dims, one torch thread per rank,
/// a loss logged every step, no eval, dropless (capacity is per rank's tokens, which one
/// process would group differently), output in `out`.
pub fn tiny_sets(out: &Path, steps: u64) -> Vec<String> {
    let kv = [
        format!("run.out_dir={}", out.display()),
        format!("trainer.max_steps={steps}"),
        "trainer.warmup_steps=1".into(),
        "trainer.log_every=1".into(),
        "trainer.eval_every=0".into(),
        "trainer.device=cpu".into(),
        "trainer.threads=1".into(),
        "model.d_model=32".into(),
        "model.ffn_hidden=64".into(),
        "model.max_seq_len=16".into(),
        "moe.expert_hidden=32".into(),
        "moe.capacity_factor=null".into(),
        "data.seq_len=16".into(),
    ];
    kv.into_iter()
        .flat_map(|s| ["--set".to_string(), s])
        .collect()
}

/// `train --config configs/ep4.yaml <tiny sets> <extra sets>`.
pub fn train_args(out: &Path, steps: u64, extra: &[String]) -> Vec<String> {
    let mut a = vec![
        "train".to_string(),
        "--config".into(),
        root().join("configs/ep4.yaml").display().to_string(),
    ];
    a.extend(tiny_sets(out, steps));
    for kv in extra {
        a.push("--set".into());
        a.push(kv.clone());
    }
    a
}

/// `mpirun -np <np>` of the `moe` binary, as a user on this 2-core machine (and as root)
/// would run it.
pub fn mpirun(np: usize) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "-np",
        &np.to_string(),
        "--oversubscribe",
        "--bind-to",
        "none",
    ])
    .arg(moe_bin())
    .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
    .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    cmd
}

/// `moe launch --np <np> --` (the launcher adds --allow-run-as-root itself).
pub fn launch(np: usize) -> Command {
    let mut cmd = Command::new(moe_bin());
    cmd.args(["launch", "--np", &np.to_string(), "--"]);
    cmd
}

/// A finished command.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    /// Both streams, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status {:?} after {:.1}s\n--- stdout (tail)\n{}\n--- stderr (tail)\n{}",
            self.status,
            self.elapsed.as_secs_f64(),
            tail(&self.stdout, 6000),
            tail(&self.stderr, 6000)
        )
    }

    /// stdout then stderr.
    pub fn combined(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `cmd` to completion under a hard deadline: past `limit` the whole process group gets
/// SIGKILL (the ranks too, since mpirun and its ranks share the child's group) and the test
/// fails with the output so far.
pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    let child = spawn(cmd);
    finish(child, limit)
}

/// Spawns `cmd` in a process group of its own, output piped.
pub fn spawn(cmd: &mut Command) -> Child {
    use std::os::unix::process::CommandExt;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

/// Waits for `child` (spawned by [`spawn`], pipes not taken) under a hard deadline.
pub fn finish(mut child: Child, limit: Duration) -> Finished {
    let out = reader(child.stdout.take().expect("piped stdout"));
    let err = reader(child.stderr.take().expect("piped stderr"));
    let (status, elapsed, killed) = wait_or_kill(&mut child, limit);
    let f = Finished {
        status,
        stdout: join_reader(out),
        stderr: join_reader(err),
        elapsed,
    };
    assert!(!killed, "killed after the {limit:?} deadline\n{}", f.dump());
    f
}

/// Waits up to `limit`; then SIGKILLs the child's process group. Returns the status, the
/// time waited and whether it had to kill.
pub fn wait_or_kill(child: &mut Child, limit: Duration) -> (ExitStatus, Duration, bool) {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return (st, start.elapsed(), false);
        }
        if start.elapsed() > limit {
            kill_group(child);
            let st = child.wait().expect("wait after kill");
            return (st, start.elapsed(), true);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILL to the child's process group (it leads one: see [`spawn`]).
pub fn kill_group(child: &Child) {
    // SAFETY: kill(2) on the group our child leads; it has not been reaped yet.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL);
    }
}

fn reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn join_reader(h: std::thread::JoinHandle<String>) -> String {
    h.join().unwrap_or_else(|_| "<reader panicked>".into())
}

/// Streams a child's stdout piece by piece to a channel (and keeps it all), so that a test
/// can act when a line appears. `\r` ends a piece as `\n` does, and whatever arrived is
/// sent at once: rank 0's progress line under plain mpirun is redrawn with `\r` and never
/// ends with a newline until the run does.
pub fn stream_lines<R: Read + Send + 'static>(
    mut r: R,
) -> (mpsc::Receiver<String>, std::thread::JoinHandle<String>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending = String::new();
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            all.extend_from_slice(&buf[..n]);
            pending.push_str(&String::from_utf8_lossy(&buf[..n]));
            // Complete pieces go out; the unterminated tail is sent as is too (a progress
            // line is complete when it is written), and kept in case more of it follows.
            let mut parts: Vec<&str> = pending.split(['\r', '\n']).collect();
            let tail = parts.pop().unwrap_or("").to_string();
            for part in parts.into_iter().filter(|p| !p.is_empty()) {
                let _ = tx.send(part.to_string());
            }
            if !tail.is_empty() {
                let _ = tx.send(tail.clone());
            }
            pending = tail;
        }
        String::from_utf8_lossy(&all).into_owned()
    });
    (rx, h)
}

/// The last `n` characters of `s` (output in assertion messages stays readable).
pub fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    &s[start..]
}

/// `step -> loss` printed on stdout by rank 0's progress line (`step 3/5 | loss 5.4409 |`),
/// with or without the launcher's `[rank 0] ` prefix, carriage returns and the terminal's
/// erase-line escape (mpirun gives ranks a pty, so the progress line redraws in place).
pub fn printed_losses(stdout: &str) -> BTreeMap<u64, f64> {
    let mut out = BTreeMap::new();
    for piece in stdout.split(['\r', '\n']) {
        let piece = piece.replace("\x1b[2K", "");
        let piece = match piece.strip_prefix("[rank ") {
            Some(rest) => match rest.split_once("] ") {
                Some(("0", body)) => body.to_string(),
                _ => continue,
            },
            None => piece,
        };
        let Some(rest) = piece.trim_start().strip_prefix("step ") else {
            continue;
        };
        let mut fields = rest.split(" | ");
        let step = fields
            .next()
            .and_then(|s| s.trim().split('/').next())
            .and_then(|s| s.trim().parse::<u64>().ok());
        let loss = fields
            .next()
            .and_then(|s| s.trim().strip_prefix("loss "))
            .and_then(|s| s.trim().parse::<f64>().ok());
        if let (Some(step), Some(loss)) = (step, loss) {
            out.insert(step, loss);
        }
    }
    out
}

/// `step -> record` of the train records of `<out>/metrics.jsonl`.
pub fn metrics(out: &Path) -> BTreeMap<u64, serde_json::Value> {
    let path = out.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("kind").and_then(|k| k.as_str()) == Some("train"))
        .filter_map(|v| Some((v.get("step")?.as_u64()?, v)))
        .collect()
}

/// A fresh temporary directory for one test's runs.
pub fn temp(tag: &str) -> PathBuf {
    moe_tests::temp_dir(tag)
}

/// Pids of live processes whose environment holds `KEY=value` (the tests tag each job with
/// a unique `MOE_TEST_JOB`), excluding zombies.
pub fn pids_with_env(key: &str, value: &str) -> Vec<u32> {
    let needle = format!("{key}={value}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z'));
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            !zombie && env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes())
        })
        .collect()
}

/// The environment variable `key` of process `pid`.
pub fn env_of(pid: u32, key: &str) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{key}=");
    env.split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A value unique to this test process and call, for `MOE_TEST_JOB`.
pub fn job_tag(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{name}-{}-{nanos}", std::process::id())
}

/// Waits until no process tagged `MOE_TEST_JOB=tag` is left, up to `limit`; returns the
/// survivors (after SIGKILLing them, so that a failing test leaves nothing behind).
pub fn survivors(tag: &str, limit: Duration) -> Vec<u32> {
    let start = Instant::now();
    loop {
        let left = pids_with_env("MOE_TEST_JOB", tag);
        if left.is_empty() {
            return left;
        }
        if start.elapsed() > limit {
            for p in &left {
                // SAFETY: kill(2) of a process this test started (tagged by its env).
                unsafe {
                    libc::kill(*p as libc::pid_t, libc::SIGKILL);
                }
            }
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
