//! `<run.out_dir>/train.log`: everything rank 0's `moe train` writes to stdout and stderr
//! (its own lines, warnings, errors, libtorch's and MPI's messages), as plain lines, appended
//! run after run below a header line that names the time and the command.
//!
//! How: at start-up, before any thread or MPI exists, the process forks a small tee process
//! and points its own stdout and stderr at pipes into it. The tee copies each stream to where
//! it went before (the terminal, a pipe, mpirun) and the lines to the log. It is a process,
//! not a thread, so that nothing is lost when the trainer ends abruptly (`MPI_Abort`, a
//! second Ctrl-C, `kill -9`): the pipes then close and the tee writes what it holds.
//!
//! The log file exists only once the run directory does: the trainer creates `run.out_dir`
//! when training starts (a run refused before that writes nothing, see `crate::run_dir`).
//! Until then the tee keeps the lines in memory (up to [`MAX_EARLY`] bytes), so the log also
//! holds the warnings printed before training started. Live progress redraws (`\r`, ANSI
//! "erase line") become one line per update, as `--progress plain` prints them.
//!
//! The tee process calls only `read`, `write`, `poll`, `open`, `close` and `_exit` on memory
//! allocated before the fork, so it would stay sound even if another thread existed then.

use std::io::IsTerminal;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// The log's file name in `run.out_dir`.
pub const LOG_FILE: &str = "train.log";

/// Output kept in memory until the run directory exists; beyond it a note says what is
/// missing.
pub const MAX_EARLY: usize = 1 << 20;

/// Longest line the log keeps whole; a longer one is split.
const MAX_LINE: usize = 64 << 10;

/// The parent's side of a running tee.
struct Tee {
    /// The tee process.
    pid: libc::pid_t,
    /// Our stdout and stderr as they were before the tee (restored by [`finish`]).
    saved: [libc::c_int; 2],
    /// Write end of the control pipe: the log's path, then end of file.
    control: libc::c_int,
}

static TEE: Mutex<Option<Tee>> = Mutex::new(None);
static STDOUT_TERMINAL: OnceLock<bool> = OnceLock::new();

/// Whether stdout was a terminal before [`start`] pointed it at the tee.
pub fn stdout_is_terminal() -> bool {
    *STDOUT_TERMINAL.get_or_init(|| std::io::stdout().is_terminal())
}

/// Starts the tee: from now on stdout and stderr go through it. `command` is the header's
/// command line. On failure (no pipes, no fork) prints a warning and runs without a log.
pub fn start(command: &str) {
    stdout_is_terminal();
    if let Err(e) = try_start(command) {
        eprintln!("warning: no {LOG_FILE} for this run ({e})");
    }
}

/// Tells the tee where the log goes: `<out_dir>/train.log`, written once `out_dir` exists.
/// Does nothing when no tee runs (ranks other than 0, or [`start`] failed).
pub fn log_to(out_dir: &Path) {
    let guard = TEE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(tee) = guard.as_ref() else { return };
    let path = std::path::absolute(out_dir.join(LOG_FILE)).unwrap_or(out_dir.join(LOG_FILE));
    let mut msg = path.as_os_str().as_bytes().to_vec();
    msg.push(b'\n');
    write_all(tee.control, &msg);
}

/// Ends the tee in order: restores stdout and stderr (so the tee sees the end of both
/// streams), closes the control pipe and waits until the tee has written everything, so the
/// shell's prompt comes after the last line. Call it last, after the final error line.
pub fn finish() {
    let Some(tee) = TEE.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return;
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: plain fd operations on descriptors this module owns; `waitpid` on our child.
    unsafe {
        libc::dup2(tee.saved[0], 1);
        libc::dup2(tee.saved[1], 2);
        libc::close(tee.saved[0]);
        libc::close(tee.saved[1]);
        libc::close(tee.control);
        let mut status = 0;
        while libc::waitpid(tee.pid, &mut status, 0) < 0
            && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
        {}
    }
}

fn try_start(command: &str) -> std::io::Result<()> {
    let header = format!(
        "==== {} UTC  pid {}  {command}\n",
        crate::bench::date_utc(),
        std::process::id()
    );
    let out = pipe()?;
    let err = pipe()?;
    let control = pipe()?;
    // Everything the tee process uses is allocated here, before the fork.
    let mut state = TeeState::new(header.into_bytes());
    // SAFETY: the child only runs `TeeState::run` (raw syscalls on preallocated memory) and
    // `_exit`s; the parent only rearranges descriptors.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let e = std::io::Error::last_os_error();
        for fd in [out, err, control].iter().flatten() {
            // SAFETY: closing our own fresh descriptors.
            unsafe { libc::close(*fd) };
        }
        return Err(e);
    }
    if pid == 0 {
        // SAFETY: the tee process: drop the write ends (or it never sees end of file), keep
        // running through Ctrl-C and the stop signals meant for the trainer, then copy.
        unsafe {
            libc::close(out[1]);
            libc::close(err[1]);
            libc::close(control[1]);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_IGN);
            }
            state.run([out[0], err[0], control[0]]);
            libc::_exit(0);
        }
    }
    // SAFETY: descriptor plumbing of this process: keep the old stdout/stderr for `finish`,
    // then point 1 and 2 at the pipes into the tee.
    let saved = unsafe {
        let saved = [
            libc::fcntl(1, libc::F_DUPFD_CLOEXEC, 3),
            libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3),
        ];
        libc::dup2(out[1], 1);
        libc::dup2(err[1], 2);
        for fd in [out[0], out[1], err[0], err[1], control[0]] {
            libc::close(fd);
        }
        saved
    };
    *TEE.lock().unwrap_or_else(|e| e.into_inner()) = Some(Tee {
        pid,
        saved,
        control: control[1],
    });
    Ok(())
}

/// A pipe whose ends are closed on exec (the tee's descriptors must not leak into children).
fn pipe() -> std::io::Result<[libc::c_int; 2]> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fds)
}

/// Writes all of `buf` to `fd`; false once the descriptor fails (a closed pipe).
fn write_all(fd: libc::c_int, mut buf: &[u8]) -> bool {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return false;
        }
        buf = &buf[n as usize..];
    }
    true
}

/// One stream's text on its way into log lines.
struct LineSplitter {
    /// The line being assembled.
    line: Vec<u8>,
    /// Inside an ANSI escape sequence (`ESC [ ... letter`): its bytes are dropped.
    in_escape: bool,
}

/// What a finished line ended with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    /// `\n`: a line.
    Newline,
    /// `\r`: a live line about to be redrawn.
    Return,
}

impl LineSplitter {
    fn new() -> Self {
        Self {
            line: Vec::with_capacity(MAX_LINE),
            in_escape: false,
        }
    }

    /// Feeds `bytes`; `emit` gets each finished line (without its end).
    fn feed(&mut self, bytes: &[u8], emit: &mut impl FnMut(&[u8], End)) {
        for &b in bytes {
            if self.in_escape {
                // CSI parameters and intermediates are 0x20..=0x3f; a final byte ends it.
                if !(0x20..=0x3f).contains(&b) && b != b'[' {
                    self.in_escape = false;
                }
                continue;
            }
            match b {
                0x1b => self.in_escape = true,
                b'\n' | b'\r' => {
                    let end = if b == b'\n' {
                        End::Newline
                    } else {
                        End::Return
                    };
                    if end == End::Newline || !self.line.is_empty() {
                        emit(&self.line, end);
                    }
                    self.line.clear();
                }
                _ => {
                    if self.line.len() == MAX_LINE {
                        emit(&self.line, End::Newline);
                        self.line.clear();
                    }
                    self.line.push(b);
                }
            }
        }
    }

    /// The unfinished last line, if any.
    fn flush(&mut self, emit: &mut impl FnMut(&[u8], End)) {
        if !self.line.is_empty() {
            emit(&self.line, End::Newline);
            self.line.clear();
        }
    }
}

/// The log side of the tee: lines in, the file (or memory until it can be opened) out.
struct LogSink {
    header: Vec<u8>,
    /// Lines kept until the file opens.
    early: Vec<u8>,
    /// Bytes that did not fit in `early`.
    dropped: usize,
    /// The last live line written: its redraw after a message is not written again.
    last_live: Vec<u8>,
    /// NUL-terminated path, once the control pipe gave it.
    path: Vec<u8>,
    path_done: bool,
    fd: libc::c_int,
}

impl LogSink {
    fn new(header: Vec<u8>) -> Self {
        Self {
            header,
            early: Vec::with_capacity(MAX_EARLY),
            dropped: 0,
            last_live: Vec::with_capacity(MAX_LINE),
            path: Vec::with_capacity(4097),
            path_done: false,
            fd: -1,
        }
    }

    fn line(&mut self, line: &[u8], end: End) {
        if !self.last_live.is_empty() && line == self.last_live.as_slice() {
            // A live line drawn again (after a message, or finished with a newline).
            return;
        }
        if end == End::Return {
            self.last_live.clear();
            self.last_live.extend_from_slice(line);
        }
        self.write(line);
        self.write(b"\n");
    }

    fn write(&mut self, bytes: &[u8]) {
        if self.fd >= 0 {
            write_all(self.fd, bytes);
        } else if self.early.len() + bytes.len() <= self.early.capacity() {
            self.early.extend_from_slice(bytes);
        } else {
            self.dropped += bytes.len();
        }
    }

    /// Control pipe bytes: the path, ended by a newline.
    fn control(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.path_done {
                return;
            }
            if b == b'\n' {
                self.path.push(0);
                self.path_done = true;
            } else if self.path.len() + 1 < self.path.capacity() {
                self.path.push(b);
            }
        }
    }

    /// Opens the log once its path is known and its directory exists; writes the header
    /// and what was kept.
    fn try_open(&mut self) {
        if self.fd >= 0 || !self.path_done {
            return;
        }
        // SAFETY: `path` is NUL-terminated (pushed in `control`).
        let fd = unsafe {
            libc::open(
                self.path.as_ptr().cast(),
                libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd < 0 {
            return;
        }
        // SAFETY: an lseek on the descriptor just opened.
        let size = unsafe { libc::lseek(fd, 0, libc::SEEK_END) };
        if size > 0 {
            write_all(fd, b"\n");
        }
        write_all(fd, &self.header);
        write_all(fd, &self.early);
        if self.dropped > 0 {
            write_all(
                fd,
                b"(more output came before the run directory existed than this log keeps; \
                  the rest of it went to the terminal only)\n",
            );
        }
        self.fd = fd;
    }
}

/// The tee process's whole state, allocated before the fork.
struct TeeState {
    buf: Vec<u8>,
    streams: [LineSplitter; 2],
    sink: LogSink,
}

impl TeeState {
    fn new(header: Vec<u8>) -> Self {
        Self {
            buf: vec![0; 64 << 10],
            streams: [LineSplitter::new(), LineSplitter::new()],
            sink: LogSink::new(header),
        }
    }

    /// Copies `fds` = [stdout pipe, stderr pipe, control pipe] until all three end.
    fn run(&mut self, fds: [libc::c_int; 3]) {
        let mut open = [true; 3];
        // Forwarding stops for good once the destination fails (a closed pipe: `| head`).
        let mut forward = [true; 2];
        while open.iter().any(|&o| o) {
            let mut polls = [libc::pollfd {
                fd: -1,
                events: libc::POLLIN,
                revents: 0,
            }; 3];
            for i in 0..3 {
                polls[i].fd = if open[i] { fds[i] } else { -1 };
            }
            // SAFETY: three valid pollfd entries (fd -1 is ignored by poll).
            let n = unsafe { libc::poll(polls.as_mut_ptr(), 3, -1) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            for i in 0..3 {
                if !open[i] || polls[i].revents == 0 {
                    continue;
                }
                // SAFETY: `buf` is valid for its length.
                let got =
                    unsafe { libc::read(fds[i], self.buf.as_mut_ptr().cast(), self.buf.len()) };
                if got < 0
                    && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                if got <= 0 {
                    open[i] = false;
                    continue;
                }
                let bytes = &self.buf[..got as usize];
                if i == 2 {
                    self.sink.control(bytes);
                } else {
                    if forward[i] {
                        forward[i] = write_all(i as libc::c_int + 1, bytes);
                    }
                    let sink = &mut self.sink;
                    self.streams[i].feed(bytes, &mut |l, e| sink.line(l, e));
                }
            }
            self.sink.try_open();
        }
        for s in &mut self.streams {
            let sink = &mut self.sink;
            s.flush(&mut |l, e| sink.line(l, e));
        }
        self.sink.try_open();
    }
}

/// The command line of this process, for the log's header.
pub fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

/// `path` as a C string (for tests).
#[cfg(test)]
fn c_path(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[&[u8]]) -> Vec<(String, bool)> {
        let mut s = LineSplitter::new();
        let mut out = Vec::new();
        let mut emit = |l: &[u8], e: End| {
            out.push((String::from_utf8_lossy(l).into_owned(), e == End::Return))
        };
        for chunk in input {
            s.feed(chunk, &mut emit);
        }
        s.flush(&mut emit);
        out
    }

    #[test]
    fn live_redraws_become_lines_and_escapes_vanish() {
        // Progress::update / message / finish in live mode, split across reads anywhere.
        let got = split(&[
            b"start\n\r\x1b[2Kstep 1\r\x1b[",
            b"2Kstep 2\r\x1b[2Keval 0.5\nstep 2",
            b"\r\x1b[2Kstep 3\n",
            b"tail",
        ]);
        let want = [
            ("start", false),
            ("step 1", true),
            ("step 2", true),
            ("eval 0.5", false),
            ("step 2", true),
            ("step 3", false),
            ("tail", false),
        ];
        let want: Vec<(String, bool)> = want.iter().map(|(l, r)| (l.to_string(), *r)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_sink_keeps_lines_until_the_file_opens_and_skips_redraws() {
        let dir = std::env::temp_dir().join(format!("moe-run-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut sink = LogSink::new(b"==== header\n".to_vec());
        sink.line(b"warning: early", End::Newline);
        sink.line(b"step 1", End::Return);
        sink.line(b"eval", End::Newline);
        // The redraw of step 1 after the message is not written twice.
        sink.line(b"step 1", End::Return);
        let path = dir.join(LOG_FILE);
        let mut msg = path.as_os_str().as_bytes().to_vec();
        msg.push(b'\n');
        sink.control(&msg);
        assert_eq!(sink.path.as_slice(), c_path(&path).as_bytes_with_nul());
        // The directory does not exist yet: nothing is created, lines stay in memory.
        sink.try_open();
        assert!(!dir.exists());
        std::fs::create_dir_all(&dir).unwrap();
        sink.try_open();
        sink.line(b"step 2", End::Newline);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "==== header\nwarning: early\nstep 1\neval\nstep 2\n");
        // A second run appends below a blank line and its own header.
        let mut again = LogSink::new(b"==== header 2\n".to_vec());
        again.control(&msg);
        again.try_open();
        again.line(b"resumed", End::Newline);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with("step 2\n\n==== header 2\nresumed\n"),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
