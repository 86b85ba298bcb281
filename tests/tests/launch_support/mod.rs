//! Helpers shared by the launcher and multi-node tests (launch_*.rs, multinode.rs): running a
//! command under a deadline, visible skips, locating the workspace's binaries.

#![allow(dead_code)] // each test file uses a different subset

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use moe_tests::skip;

/// The workspace root (/work/main).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `target/<profile>` directory this test binary was built into (its parent is `deps`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_path_buf()
}

/// Output of a finished command.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Both streams, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Sends `sig` to a child (ignores a child that already exited).
pub fn signal(child: &Child, sig: libc::c_int) {
    // SAFETY: plain kill(2) of our own child's pid.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Runs `cmd` with piped output; past `timeout` it gets SIGTERM (the launcher forwards it
/// to mpirun and the ranks), then SIGKILL 15 s later, and the test fails with its output.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Finished {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let (status, timed_out) = wait_deadline(&mut child, timeout);
    let f = Finished {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    assert!(!timed_out, "{cmd:?} ran past {timeout:?}\n{}", f.dump());
    f
}

/// Waits for `child`; past `timeout` sends SIGTERM, then SIGKILL 15 s later. Returns the
/// status and whether the deadline passed.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> (ExitStatus, bool) {
    let start = Instant::now();
    let mut termed = None;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, termed.is_some());
        }
        match termed {
            None if start.elapsed() > timeout => {
                signal(child, libc::SIGTERM);
                termed = Some(Instant::now());
            }
            Some(t) if t.elapsed() > Duration::from_secs(15) => {
                let _ = child.kill();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn reader<R: Read + Send + 'static>(mut r: R) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `mpirun` on PATH (its absence is a skip reason for tests that need it).
pub fn have_mpirun() -> bool {
    Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// mpirun refuses to run as root without these (the launcher passes --allow-run-as-root
/// itself; direct mpirun calls in tests need the variables).
pub fn allow_root(cmd: &mut Command) -> &mut Command {
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
}
