//! `moe launch`: runs this same `moe` binary on N ranks under OpenMPI's `mpirun`.
//!
//! `moe launch --np 4 [--hostfile H] -- train --config C` becomes
//! `mpirun --np 4 [--allow-run-as-root] [--oversubscribe] [--hostfile H] --bind-to none
//! --tag-output -x ... <this exe> train --config C` (flags as documented in OpenMPI 4.1's
//! mpirun(1)). Each output line of rank r is printed as `[rank r] ...` on the stream the rank
//! wrote it to (a carriage return, as in rank 0's progress line, also ends a line); the result
//! is mpirun's exit status, which is that of the first rank that failed.
//!
//! Signals: the first SIGINT/SIGTERM is forwarded to mpirun as SIGUSR1, which mpirun relays
//! to every rank as is (OpenMPI's `ess_base_forward_signals` default) and `moe train` treats
//! as "finish the step, checkpoint, exit 0". mpirun's own SIGTERM handling would not do:
//! it sends the ranks SIGTERM and SIGKILL one second later (`odls_base_sigkill_timeout`).
//! A second signal is forwarded as SIGTERM: stop now.

use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
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
/// - `--tag-output`: lines arrive as `[job,rank]<stdout>:...`, see [`Retagger`].
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stream {
    /// Our stdout.
    Stdout,
    /// Our stderr.
    Stderr,
}

/// Whose text a byte belongs to: a rank's stream (from its `--tag-output` tag), or mpirun's
/// own untagged messages.
type Source = Option<(String, Stream)>;

/// Rewrites the byte stream of one of mpirun's pipes under `--tag-output` into whole lines:
/// `[1,3]<stdout>:text` becomes `[rank 3] text` on stdout, `<stderr>` and `<stddiag>` text
/// goes to stderr, untagged text (mpirun's own messages) stays on `default`, the pipe it
/// came from.
///
/// mpirun tags every chunk a rank writes, not every line: a progress line redrawn with
/// `\r` and no newline arrives as `[1,0]<stdout>:\r\x1b[2Kstep 1 ...[1,0]<stdout>:\r...`.
/// So tags may appear mid-line, `\r` ends a line as `\n` does, the terminal's erase-line
/// escape is dropped, and text is buffered per source until its line ends (or
/// [`Retagger::flush`] is called when the pipe has been idle).
#[derive(Debug)]
pub struct Retagger {
    default: Stream,
    /// Bytes not yet parsed: the start of a tag split across two reads.
    held: Vec<u8>,
    current: Source,
    partial: std::collections::BTreeMap<Source, Vec<u8>>,
}

/// What a terminal's progress line sends before redrawing: erase the whole line.
const ERASE_LINE: &[u8] = b"\x1b[2K";

impl Retagger {
    /// A retagger for the pipe whose untagged text goes to `default`.
    pub fn new(default: Stream) -> Self {
        Self {
            default,
            held: Vec::new(),
            current: None,
            partial: Default::default(),
        }
    }

    /// Parses `bytes` and returns the lines they complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(Stream, Vec<u8>)> {
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut i = 0;
        while i < buf.len() {
            let rest = &buf[i..];
            if rest[0] == b'[' {
                match parse_tag(rest) {
                    Tag::Complete { rank, stream, len } => {
                        self.current = Some((rank, stream));
                        i += len;
                        continue;
                    }
                    Tag::Incomplete => {
                        self.held = rest.to_vec();
                        break;
                    }
                    Tag::No => {}
                }
            }
            match rest[0] {
                b'\n' => {
                    let src = self.current.take();
                    let text = self.partial.remove(&src).unwrap_or_default();
                    out.push(self.line(src, text));
                }
                b'\r' => {
                    let src = self.current.clone();
                    if let Some(text) = self.partial.remove(&src) {
                        out.extend(self.nonempty_line(src, text));
                    }
                }
                c => self
                    .partial
                    .entry(self.current.clone())
                    .or_default()
                    .push(c),
            }
            i += 1;
        }
        out
    }

    /// Ends every unfinished line (the pipe is idle or closed) and returns them.
    pub fn flush(&mut self) -> Vec<(Stream, Vec<u8>)> {
        let held = std::mem::take(&mut self.held);
        if !held.is_empty() {
            self.partial
                .entry(self.current.clone())
                .or_default()
                .extend_from_slice(&held);
        }
        let partial = std::mem::take(&mut self.partial);
        partial
            .into_iter()
            .filter_map(|(src, text)| self.nonempty_line(src, text))
            .collect()
    }

    /// The line of `text` from `src`, unless it is blank (what a `\r` redraw leaves).
    fn nonempty_line(&self, src: Source, text: Vec<u8>) -> Option<(Stream, Vec<u8>)> {
        let text = strip(&text, ERASE_LINE);
        if text.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        Some(self.line(src, text))
    }

    /// The output line (with its newline) of `text` from `src`.
    fn line(&self, src: Source, text: Vec<u8>) -> (Stream, Vec<u8>) {
        let mut text = strip(&text, ERASE_LINE);
        text.push(b'\n');
        match src {
            Some((rank, stream)) => {
                let mut out = format!("[rank {rank}] ").into_bytes();
                out.extend_from_slice(&text);
                (stream, out)
            }
            None => (self.default, text),
        }
    }
}

/// `text` without any occurrence of `pat`.
fn strip(text: &[u8], pat: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(pat) {
            i += pat.len();
        } else {
            out.push(text[i]);
            i += 1;
        }
    }
    out
}

/// What the bytes at a `[` are.
#[derive(Debug, PartialEq)]
enum Tag {
    /// A whole `[<job>,<rank>]<name>:` tag of `len` bytes.
    Complete {
        rank: String,
        stream: Stream,
        len: usize,
    },
    /// The bytes end before the tag could be told from text: wait for more.
    Incomplete,
    /// Not a tag: text.
    No,
}

/// Parses `[<job>,<rank>]<stdout|stderr|stddiag>:` at the start of `s`.
fn parse_tag(s: &[u8]) -> Tag {
    // The longest tag: `[` + two 10-digit numbers + `,` + `]<stddiag>:`.
    const MAX_TAG: usize = 1 + 10 + 1 + 10 + 11;
    let mut i = 1;
    let digits = |i: &mut usize| -> usize {
        let start = *i;
        while *i < s.len() && s[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let n_job = digits(&mut i);
    if i == s.len() {
        return if i < MAX_TAG {
            Tag::Incomplete
        } else {
            Tag::No
        };
    }
    if n_job == 0 || s[i] != b',' {
        return Tag::No;
    }
    i += 1;
    let rank_start = i;
    let n_rank = digits(&mut i);
    if i == s.len() {
        return if i < MAX_TAG {
            Tag::Incomplete
        } else {
            Tag::No
        };
    }
    if n_rank == 0 || s[i] != b']' {
        return Tag::No;
    }
    let rank = String::from_utf8_lossy(&s[rank_start..i]).into_owned();
    i += 1;
    let rest = &s[i..];
    for (name, stream) in [
        (&b"<stdout>:"[..], Stream::Stdout),
        (b"<stderr>:", Stream::Stderr),
        (b"<stddiag>:", Stream::Stderr),
    ] {
        if rest.starts_with(name) {
            return Tag::Complete {
                rank,
                stream,
                len: i + name.len(),
            };
        }
        if name.starts_with(rest) {
            return Tag::Incomplete;
        }
    }
    Tag::No
}

/// Runs `np` ranks of this binary with `moe_args` under mpirun, streams their output with
/// `[rank r]` prefixes, turns SIGINT/SIGTERM into a graceful stop, and returns mpirun's exit code (128 + n when
/// mpirun itself died of signal n).
pub fn run_launch(np: usize, hostfile: Option<&Path>, moe_args: &[String]) -> Result<i32> {
    if np == 0 {
        bail!("--np must be at least 1");
    }
    if let Some(h) = hostfile {
        if !h.is_file() {
            bail!("--hostfile {}: no such file", h.display());
        }
    }
    // `moe launch --np 2 -- moe train ...` reads naturally (it is the command each rank runs):
    // the leading program name is this binary.
    let moe_args = strip_program_name(moe_args);
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
        program_args: moe_args,
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

/// The rank command without a leading program name: `moe launch --np 2 -- moe train ..` and
/// `.. -- target/release/moe train ..` run `train ..` on every rank, like `.. -- train ..`.
pub fn strip_program_name(moe_args: &[String]) -> Vec<String> {
    let is_moe = |a: &str| Path::new(a).file_name().is_some_and(|n| n == "moe");
    match moe_args.first() {
        Some(first) if is_moe(first) => moe_args[1..].to_vec(),
        _ => moe_args.to_vec(),
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
        // Its own process group: a terminal's Ctrl-C reaches only us, and `on_signal` decides
        // what mpirun gets (two SIGINTs in a row would make mpirun abort without cleaning up
        // its ranks).
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

    let mut signals_seen = 0u32;
    let status = loop {
        tokio::select! {
            st = child.wait() => break st.context("waiting for mpirun")?,
            _ = sigint.recv() => on_signal(pid, "SIGINT", &mut signals_seen),
            _ = sigterm.recv() => on_signal(pid, "SIGTERM", &mut signals_seen),
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

/// The first stop signal asks the ranks for a graceful stop (SIGUSR1, relayed by mpirun as
/// is); any later one stops the job now (SIGTERM: mpirun signals the ranks, then kills them).
fn on_signal(pid: u32, name: &str, seen: &mut u32) {
    *seen += 1;
    if *seen == 1 {
        eprintln!(
            "moe launch: {name}: asking the ranks to finish their step, checkpoint and exit \
             (send it again to stop at once)"
        );
        forward(pid, libc::SIGUSR1);
    } else {
        eprintln!("moe launch: {name} again: stopping the job now");
        forward(pid, libc::SIGTERM);
    }
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

/// How long a pipe may be silent before a line without its end (rank 0's progress line,
/// redrawn with `\r`) is printed anyway.
const IDLE_FLUSH: Duration = Duration::from_millis(200);

/// Reads one of mpirun's pipes and writes its lines, retagged, to our own streams.
async fn pump<R: AsyncRead + Unpin>(mut pipe: R, from: Stream) -> std::io::Result<()> {
    let mut retagger = Retagger::new(from);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let lines = match tokio::time::timeout(IDLE_FLUSH, pipe.read(&mut buf)).await {
            Ok(Ok(0)) => {
                write_lines(retagger.flush())?;
                return Ok(());
            }
            Ok(Ok(n)) => retagger.feed(&buf[..n]),
            Ok(Err(e)) => return Err(e),
            Err(_idle) => retagger.flush(),
        };
        write_lines(lines)?;
    }
}

/// Writes whole lines through the locked std handles, so that lines of the two pumps never
/// interleave mid-line.
fn write_lines(lines: Vec<(Stream, Vec<u8>)>) -> std::io::Result<()> {
    for (to, line) in lines {
        let res = match to {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(&line).and_then(|()| out.flush())
            }
            Stream::Stderr => std::io::stderr().lock().write_all(&line),
        };
        if let Err(e) = res {
            // A closed stdout (`moe launch ... | head`) must not stop the job.
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(e);
            }
        }
    }
    Ok(())
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
    fn a_leading_moe_is_the_program_name() {
        assert_eq!(strip_program_name(&s(&["moe", "train"])), s(&["train"]));
        assert_eq!(
            strip_program_name(&s(&["target/release/moe", "train", "-c", "x"])),
            s(&["train", "-c", "x"])
        );
        assert_eq!(
            strip_program_name(&s(&["train", "moe"])),
            s(&["train", "moe"])
        );
        assert_eq!(strip_program_name(&s(&["moex"])), s(&["moex"]));
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

    fn feed_all(chunks: &[&[u8]], default: Stream) -> Vec<(Stream, String)> {
        let mut r = Retagger::new(default);
        let mut out: Vec<_> = chunks.iter().flat_map(|c| r.feed(c)).collect();
        out.extend(r.flush());
        out.into_iter()
            .map(|(s, l)| (s, String::from_utf8_lossy(&l).into_owned()))
            .collect()
    }

    fn o(text: &str) -> (Stream, String) {
        (Stream::Stdout, text.to_string())
    }

    fn e(text: &str) -> (Stream, String) {
        (Stream::Stderr, text.to_string())
    }

    #[test]
    fn retags_rank_lines() {
        assert_eq!(
            feed_all(&[b"[1,0]<stdout>:step 1 loss 2.5\n"], Stream::Stderr),
            vec![o("[rank 0] step 1 loss 2.5\n")]
        );
        assert_eq!(
            feed_all(&[b"[12,13]<stderr>:boom"], Stream::Stdout),
            vec![e("[rank 13] boom\n")]
        );
        assert_eq!(
            feed_all(&[b"[1,2]<stddiag>:x [1,a]<y>:z\n"], Stream::Stdout),
            vec![e("[rank 2] x [1,a]<y>:z\n")]
        );
        // Non-UTF-8 payloads are passed through byte for byte.
        let mut r = Retagger::new(Stream::Stdout);
        assert_eq!(
            r.feed(b"[1,1]<stdout>:\xff\xfe\n"),
            vec![(Stream::Stdout, b"[rank 1] \xff\xfe\n".to_vec())]
        );
    }

    #[test]
    fn untagged_lines_pass_through_on_their_pipe() {
        for line in [
            "mpirun noticed that process rank 1 ... exited on signal 9\n",
            "[1,a]<stdout>:x\n",
            "[1,0]<other>:x\n",
            "[1,0]<stdout>x\n",
            "[,0]<stdout>:x\n",
            "\n",
        ] {
            assert_eq!(
                feed_all(&[line.as_bytes()], Stream::Stderr),
                vec![e(line)],
                "{line:?}"
            );
        }
    }

    /// A progress line redrawn with `\r` and no newline, as mpirun relays it: one tag per
    /// write, tags mid-line, the erase-line escape, another rank's line in between.
    #[test]
    fn carriage_returns_and_mid_line_tags_split_lines() {
        let got = feed_all(
            &[
                b"[1,0]<stdout>:\r\x1b[2Kstep 1/3 | loss 5.5",
                b"[1,0]<stdout>:\r\x1b[2Kstep 2/3 | loss 5.4[1,1]<stderr>:warn\n",
                b"[1,0]<stdout>:\r\x1b[2Kdone\n",
            ],
            Stream::Stdout,
        );
        assert_eq!(
            got,
            vec![
                o("[rank 0] step 1/3 | loss 5.5\n"),
                e("[rank 1] warn\n"),
                o("[rank 0] step 2/3 | loss 5.4\n"),
                o("[rank 0] done\n"),
            ]
        );
    }

    /// A tag cut by a pipe read is held until the rest arrives; text that only looks like
    /// the start of a tag is released by `flush`.
    #[test]
    fn tags_split_across_reads() {
        assert_eq!(
            feed_all(&[b"[1,", b"3]<std", b"err>:hi\n"], Stream::Stdout),
            vec![e("[rank 3] hi\n")]
        );
        assert_eq!(
            feed_all(&[b"text [1,2"], Stream::Stdout),
            vec![o("text [1,2\n")]
        );
        let mut r = Retagger::new(Stream::Stdout);
        assert_eq!(r.feed(b"[1,0]<stdout>:partial"), vec![]);
        assert_eq!(
            r.flush(),
            vec![(Stream::Stdout, b"[rank 0] partial\n".to_vec())]
        );
        assert_eq!(r.flush(), vec![]);
    }
}
