//! `moe launch`'s mpirun wrapper (launch/src/launch_cmd.rs) run for real, through the
//! `launch_probe` test program (which compiles that module in and also serves as every
//! rank's program): rank prefixes, exit codes, signal forwarding, a missing mpirun.

mod launch_support;

use launch_support::{have_mpirun, run_with_timeout, signal, skip, wait_deadline};
use std::io::{BufRead, BufReader};
use std::process::Child;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const PROBE: &str = env!("CARGO_BIN_EXE_launch_probe");

fn probe() -> Command {
    Command::new(PROBE)
}

#[test]
fn failing_rank_sets_exit_code_and_output_is_prefixed() {
    if !have_mpirun() {
        return skip("failing_rank_sets_exit_code", "mpirun not installed");
    }
    let f = run_with_timeout(
        probe().args(["launch", "--np", "2", "--", "rank-exit", "1", "3"]),
        Duration::from_secs(120),
    );
    assert_eq!(f.status.code(), Some(3), "rank 1 exits 3\n{}", f.dump());
    for r in 0..2 {
        let line = format!("[rank {r}] hello from stdout");
        assert!(
            f.stdout.lines().any(|l| l == line),
            "missing {line:?}\n{}",
            f.dump()
        );
        let line = format!("[rank {r}] hello from stderr");
        assert!(
            f.stderr.lines().any(|l| l == line),
            "missing {line:?}\n{}",
            f.dump()
        );
    }
    assert!(
        !f.stdout.contains("<stdout>"),
        "untranslated tag\n{}",
        f.dump()
    );
}

#[test]
fn all_ranks_succeeding_exits_zero() {
    if !have_mpirun() {
        return skip("all_ranks_succeeding_exits_zero", "mpirun not installed");
    }
    // 3 ranks on 2 cores: needs --oversubscribe; rank "-1" never matches.
    let f = run_with_timeout(
        probe().args(["launch", "--np", "3", "--", "rank-exit", "-1", "5"]),
        Duration::from_secs(120),
    );
    assert_eq!(f.status.code(), Some(0), "{}", f.dump());
    let n = f
        .stdout
        .lines()
        .filter(|l| l.ends_with("] hello from stdout"))
        .count();
    assert_eq!(n, 3, "{}", f.dump());
}

#[test]
fn missing_mpirun_is_a_clear_error() {
    let empty = std::env::temp_dir().join(format!("moe-no-mpirun-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let f = run_with_timeout(
        probe()
            .env("PATH", &empty)
            .args(["launch", "--np", "2", "--", "rank-exit", "-1", "0"]),
        Duration::from_secs(30),
    );
    let _ = std::fs::remove_dir_all(&empty);
    // launch_probe exits 3 when run_launch returns an error.
    assert_eq!(f.status.code(), Some(3), "{}", f.dump());
    assert!(f.stderr.contains("openmpi-bin"), "{}", f.dump());
}

#[test]
fn zero_ranks_is_rejected() {
    let f = run_with_timeout(
        probe().args(["launch", "--np", "0", "--", "rank-exit"]),
        Duration::from_secs(30),
    );
    assert_eq!(f.status.code(), Some(3), "{}", f.dump());
    assert!(f.stderr.contains("--np must be at least 1"), "{}", f.dump());
}

/// SIGTERM and SIGINT to the launcher reach the ranks: they are sleeping for 120 s, so the
/// launcher finishing within the deadline and the rank pids being gone show the forwarding.
#[test]
fn signals_are_forwarded_to_ranks() {
    if !have_mpirun() {
        return skip("signals_are_forwarded_to_ranks", "mpirun not installed");
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let (mut child, pids, _lines) = start_ranks("rank-sleep", "sleeping pid=");
        signal(&child, sig);
        let (status, timed_out) = wait_deadline(&mut child, Duration::from_secs(30));
        assert!(!timed_out, "launcher ignored signal {sig}");
        assert_ne!(
            status.code(),
            Some(0),
            "an interrupted job must not report success"
        );
        // mpirun signals its ranks and may exit before they have finished dying.
        for p in &pids {
            assert!(
                gone_within(*p, Duration::from_secs(10)),
                "rank pid {p} survived signal {sig}"
            );
        }
    }
}

/// Whether process `pid` exits (or is a zombie awaiting its reaper) within `limit`.
fn gone_within(pid: u32, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            // Field 3, after the parenthesised command name, is the state.
            Ok(stat) if stat.rsplit(") ").next().is_some_and(|r| r.starts_with('Z')) => {
                return true
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    false
}

/// Starts `launch --np 2 -- <rank_cmd>` and waits until both ranks printed `<marker><pid>`.
/// Returns the launcher, the rank pids and the rest of its stdout, line by line.
fn start_ranks(rank_cmd: &str, marker: &str) -> (Child, Vec<u32>, mpsc::Receiver<String>) {
    let mut child = probe()
        .args(["launch", "--np", "2", "--", rank_cmd])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut pids = Vec::new();
    while pids.len() < 2 {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => {
                if let Some(p) = line.split(marker).nth(1) {
                    pids.push(p.trim().parse::<u32>().unwrap());
                }
            }
            Err(e) => {
                let _ = child.kill();
                panic!("ranks did not start: {e}");
            }
        }
    }
    (child, pids, rx)
}
