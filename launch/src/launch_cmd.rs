//! `moe launch`: runs this same `moe` binary on N ranks under OpenMPI's `mpirun`.
//!
//! `moe launch --np 4 [--hostfile H] -- train --config C` becomes
//! `mpirun --np 4 [--allow-run-as-root] [--oversubscribe] [--hostfile H] --bind-to none
//! --tag-output -x ... <this exe> train --config C` (flags as documented in OpenMPI 4.1's
//! mpirun(1)). Each output line of rank r is printed as `[rank r] ...` on the stream the rank
//! wrote it to; SIGINT/SIGTERM are forwarded to mpirun, which forwards them to the ranks; the
//! result is mpirun's exit status, which is that of the first rank that failed.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::signal::unix::{signal, SignalKind};

/// Environment variable naming the `mpirun` to use instead of the one on `PATH`.
pub const MPIRUN_ENV: &str = "MOE_MPIRUN";

/// How long the launcher keeps reading output after mpirun exits: a rank that mpirun failed
/// to kill would otherwise hold the pipes open and hang the launcher forever.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything `mpirun`'s command line depends on, gathered so that building it is pure.
#[derive(Debug, Clone, PartialEq)]
pub struct MpirunPlan {
    /// Number of ranks.
    pub np: usize,
    /// OpenMPI hostfile (`host slots=n` lines); `None` runs every rank on this node.
    pub hostfile: Option<PathBuf>,
    /// The launcher runs as root: mpirun refuses to unless told `--allow-run-as-root`.
    pub as_root: bool,
    /// Names of environment variables to export to every rank (`-x NAME`).
    pub export_env: Vec<String>,
    /// The program every rank runs (this `moe` binary).
    pub program: PathBuf,
    /// Its arguments (`train --config C ...`).
    pub program_args: Vec<String>,
}

/// The arguments of `mpirun` (without `mpirun` itself) for `plan`.
///
/// - `--oversubscribe` only without a hostfile: the user asked for `np` ranks on this node,
///   and mpirun counts physical cores as slots (fewer than the logical CPUs with SMT, 2 on
///   this machine), so it would refuse; with a hostfile its `slots=` are the user's statement
///   of capacity and mpirun should report an `np` beyond them rather than overload nodes.
/// - `--bind-to none`: mpirun binds each rank to one core when np <= 2, which would confine
///   all of torch's intra-op threads of a rank to that core.
/// - `--tag-output`: lines arrive as `[job,rank]<stdout>:...`, see [`retag_line`].
pub fn mpirun_args(plan: &MpirunPlan) -> Vec<String> {
    let mut args = vec!["--np".to_string(), plan.np.to_string()];
    if plan.as_root {
        args.push("--allow-run-as-root".into());
    }
    match &plan.hostfile {
        Some(h) => {
            args.push("--hostfile".into());
            args.push(h.display().to_string());
        }
        None => args.push("--oversubscribe".into()),
    }
    args.extend(["--bind-to", "none", "--tag-output"].map(String::from));
    for name in &plan.export_env {
        args.push("-x".into());
        args.push(name.clone());
    }
    args.push(plan.program.display().to_string());
    args.extend(plan.program_args.iter().cloned());
    args
}

/// Which of the launcher's environment variables the ranks get (sorted, deduplicated).
///
/// Local ranks inherit mpirun's whole environment anyway; `-x` matters for ranks on other
/// nodes, whose orted starts from a remote shell's environment. `OMPI_*` are not listed:
/// mpirun forwards those itself.
pub fn exported_env_names<I: IntoIterator<Item = String>>(names: I) -> Vec<String> {
    const EXACT: [&str; 4] = [
        "LD_LIBRARY_PATH",
        "RUST_LOG",
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
    ];
    const PREFIXES: [&str; 2] = ["MOE_", "NCCL_"];
    let mut out: Vec<String> = names
        .into_iter()
        .filter(|n| EXACT.contains(&n.as_str()) || PREFIXES.iter().any(|p| n.starts_with(p)))
        .filter(|n| n.as_str() != MPIRUN_ENV)
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The stream a line of mpirun's output belongs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Our stdout.
    Stdout,
    /// Our stderr.
    Stderr,
}

/// Rewrites one line of `mpirun --tag-output` output: `[1,3]<stdout>:text` becomes
/// `[rank 3] text` on stdout, `<stderr>` and `<stddiag>` lines go to stderr. Lines without a
/// tag (mpirun's own messages) pass through unchanged on `default`, the pipe they came from.
pub fn retag_line(line: &[u8], default: Stream) -> (Stream, Vec<u8>) {
    match parse_tag(line) {
        Some((rank, stream, rest)) => {
            let mut out = format!("[rank {rank}] ").into_bytes();
            out.extend_from_slice(rest);
            (stream, out)
        }
        None => (default, line.to_vec()),
    }
}

/// `[<job>,<rank>]<name>:rest` -> (rank, stream of name, rest).
fn parse_tag(line: &[u8]) -> Option<(&str, Stream, &[u8])> {
    let s = line.strip_prefix(b"[")?;
    let close = s.iter().position(|&c| c == b']')?;
    let inner = std::str::from_utf8(&s[..close]).ok()?;
    let (job, rank) = inner.split_once(',')?;
    let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit());
    if !all_digits(job) || !all_digits(rank) {
        return None;
    }
    let s = s[close + 1..].strip_prefix(b"<")?;
    let gt = s.iter().position(|&c| c == b'>')?;
    let stream = match &s[..gt] {
        b"stdout" => Stream::Stdout,
        b"stderr" | b"stddiag" => Stream::Stderr,
        _ => return None,
    };
    let rest = s[gt + 1..].strip_prefix(b":")?;
    Some((rank, stream, rest))
}

/// Runs `np` ranks of this binary with `moe_args` under mpirun, streams their output with
/// `[rank r]` prefixes, forwards SIGINT/SIGTERM, and returns mpirun's exit code (128 + n when
/// mpirun itself died of signal n).
pub fn run_launch(np: usize, hostfile: Option<&Path>, moe_args: &[String]) -> Result<i32> {
    if np == 0 {
        bail!("--np must be at least 1");
    }
    if let Some(h) = hostfile {
        if !h.is_file() {
            bail!("hostfile {} does not exist", h.display());
        }
    }
    let program = std::env::current_exe().context("cannot locate the moe executable")?;
    let plan = MpirunPlan {
        np,
        hostfile: hostfile.map(Path::to_path_buf),
        // SAFETY: geteuid has no preconditions and cannot fail.
        as_root: unsafe { libc::geteuid() } == 0,
        export_env: exported_env_names(
            std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()),
        ),
        program,
        program_args: moe_args.to_vec(),
    };
    let mpirun = std::env::var_os(MPIRUN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| "mpirun".into());
    let args = mpirun_args(&plan);
    eprintln!("moe launch: {} {}", mpirun.display(), args.join(" "));

    // A runtime of our own on a thread of our own: `block_on` panics when the caller is
    // already inside a tokio runtime.
    let worker = std::thread::Builder::new()
        .name("moe-launch".into())
        .spawn(move || -> Result<i32> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the launcher's runtime")?;
            rt.block_on(supervise(&mpirun, &args))
        })
        .context("cannot start the launcher thread")?;
    match worker.join() {
        Ok(result) => result,
        Err(_) => bail!("the launcher thread panicked"),
    }
}

/// Spawns mpirun, pumps its output, forwards signals, waits.
async fn supervise(mpirun: &Path, args: &[String]) -> Result<i32> {
    // Handlers first, so that a signal arriving while mpirun starts is not lost (or fatal).
    let mut sigint = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut sigterm = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut cmd = tokio::process::Command::new(mpirun);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches only us, and we forward it
        // once (two SIGINTs in a row make mpirun abort without cleaning up its ranks).
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "`{}` not found: `moe launch` needs OpenMPI's mpirun; install it \
             (Debian/Ubuntu: `apt-get install openmpi-bin`) or set {MPIRUN_ENV} to its path",
            mpirun.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot start {}", mpirun.display())),
    };
    let pid = child
        .id()
        .context("mpirun exited before it could be supervised")?;
    let mut pumps = tokio::task::JoinSet::new();
    if let Some(out) = child.stdout.take() {
        pumps.spawn(pump(out, Stream::Stdout));
    }
    if let Some(err) = child.stderr.take() {
        pumps.spawn(pump(err, Stream::Stderr));
    }

    let status = loop {
        tokio::select! {
            st = child.wait() => break st.context("waiting for mpirun")?,
            _ = sigint.recv() => forward(pid, libc::SIGINT),
            _ = sigterm.recv() => forward(pid, libc::SIGTERM),
        }
    };
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while let Some(res) = pumps.join_next().await {
            if let Ok(Err(e)) = res {
                eprintln!("moe launch: reading rank output failed: {e}");
            }
        }
    })
    .await;
    if drained.is_err() {
        eprintln!(
            "moe launch: output still open {}s after mpirun exited (a rank outlived it?)",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    Ok(exit_code(status))
}

/// Sends `sig` to mpirun, which relays it to every rank.
fn forward(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill has no memory-safety preconditions; pid is our live (not yet reaped)
    // child, so the signal cannot reach a recycled pid.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        eprintln!(
            "moe launch: forwarding signal {sig} to mpirun failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Reads lines from one of mpirun's pipes and writes them, retagged, to our own streams.
async fn pump<R: AsyncRead + Unpin>(pipe: R, from: Stream) -> std::io::Result<()> {
    let mut reader = BufReader::new(pipe);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let (to, mut out) = retag_line(&line, from);
        if !out.ends_with(b"\n") {
            out.push(b'\n');
        }
        // Whole lines through the locked std handles, so that lines of the two pumps never
        // interleave mid-line.
        let res = match to {
            Stream::Stdout => std::io::stdout().lock().write_all(&out),
            Stream::Stderr => std::io::stderr().lock().write_all(&out),
        };
        if let Err(e) = res {
            // A closed stdout (`moe launch ... | head`) must not stop the job.
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
    }
}

/// mpirun's exit code, or 128 + n when it was killed by signal n (the shell's convention).
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> MpirunPlan {
        MpirunPlan {
            np: 4,
            hostfile: None,
            as_root: false,
            export_env: vec![],
            program: PathBuf::from("/opt/moe/bin/moe"),
            program_args: vec!["train".into(), "--config".into(), "c.yaml".into()],
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn single_node_oversubscribes_and_runs_program_last() {
        let args = mpirun_args(&plan());
        assert_eq!(
            args,
            s(&[
                "--np",
                "4",
                "--oversubscribe",
                "--bind-to",
                "none",
                "--tag-output",
                "/opt/moe/bin/moe",
                "train",
                "--config",
                "c.yaml",
            ])
        );
    }

    #[test]
    fn root_hostfile_and_env() {
        let p = MpirunPlan {
            np: 2,
            hostfile: Some(PathBuf::from("/h/hosts")),
            as_root: true,
            export_env: s(&["MOE_X", "RUST_LOG"]),
            ..plan()
        };
        let args = mpirun_args(&p);
        assert_eq!(
            args,
            s(&[
                "--np",
                "2",
                "--allow-run-as-root",
                "--hostfile",
                "/h/hosts",
                "--bind-to",
                "none",
                "--tag-output",
                "-x",
                "MOE_X",
                "-x",
                "RUST_LOG",
                "/opt/moe/bin/moe",
                "train",
                "--config",
                "c.yaml",
            ])
        );
        assert!(
            !args.contains(&"--oversubscribe".to_string()),
            "slots of a hostfile rule"
        );
    }

    #[test]
    fn program_args_that_look_like_mpirun_flags_stay_after_the_program() {
        let p = MpirunPlan {
            program_args: s(&["--np", "9", "-x", "Y"]),
            ..plan()
        };
        let args = mpirun_args(&p);
        let at = args.iter().position(|a| a == "/opt/moe/bin/moe").unwrap();
        assert_eq!(&args[at + 1..], &s(&["--np", "9", "-x", "Y"])[..]);
        assert_eq!(args[1], "4");
    }

    #[test]
    fn exported_env_filters_sorts_and_dedups() {
        let got = exported_env_names(s(&[
            "PATH",
            "RUST_LOG",
            "MOE_SEED",
            "LD_LIBRARY_PATH",
            "OMPI_MCA_btl",
            "HOME",
            "NCCL_DEBUG",
            "MOE_MPIRUN",
            "RUST_LOG",
            "XMOE_A",
            "RUST_BACKTRACE",
        ]));
        assert_eq!(
            got,
            s(&[
                "LD_LIBRARY_PATH",
                "MOE_SEED",
                "NCCL_DEBUG",
                "RUST_BACKTRACE",
                "RUST_LOG"
            ])
        );
    }

    #[test]
    fn retags_rank_lines() {
        assert_eq!(
            retag_line(b"[1,0]<stdout>:step 1 loss 2.5\n", Stream::Stderr),
            (Stream::Stdout, b"[rank 0] step 1 loss 2.5\n".to_vec())
        );
        assert_eq!(
            retag_line(b"[12,13]<stderr>:boom", Stream::Stdout),
            (Stream::Stderr, b"[rank 13] boom".to_vec())
        );
        assert_eq!(
            retag_line(b"[1,2]<stddiag>:[1,2]<x>:y\n", Stream::Stdout),
            (Stream::Stderr, b"[rank 2] [1,2]<x>:y\n".to_vec())
        );
        // Non-UTF-8 payloads are passed through byte for byte.
        assert_eq!(
            retag_line(b"[1,1]<stdout>:\xff\xfe\n", Stream::Stdout).1,
            b"[rank 1] \xff\xfe\n".to_vec()
        );
    }

    #[test]
    fn untagged_lines_pass_through_on_their_pipe() {
        for line in [
            &b"mpirun noticed that process rank 1 ... exited on signal 9\n"[..],
            b"[1,a]<stdout>:x",
            b"[1,0]<other>:x",
            b"[1,0]<stdout>x",
            b"[,0]<stdout>:x",
            b"",
        ] {
            assert_eq!(
                retag_line(line, Stream::Stderr),
                (Stream::Stderr, line.to_vec())
            );
        }
    }
}
