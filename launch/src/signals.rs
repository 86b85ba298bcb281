//! SIGINT/SIGTERM (a cluster's preemption) and SIGUSR1: the first one asks the trainer to
//! finish its step, write a checkpoint and exit 0; a second one exits at once.
//!
//! SIGUSR1 is the graceful stop under mpirun: mpirun turns its own SIGTERM into SIGTERM then,
//! 1 s later, SIGKILL to every rank (too soon to finish a step and checkpoint), but forwards
//! SIGUSR1 untouched (OpenMPI's `ess_base_forward_signals` default), so `moe launch` sends
//! SIGUSR1 first.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Set by the signal handler; only an atomic store is async-signal-safe.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNALLED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe; a second signal means "stop now".
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the handlers and mirrors the signal into `flag` from a watcher thread (the
/// handler itself may touch nothing but a static atomic).
pub fn install(flag: Arc<AtomicBool>) {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: `on_signal` only performs an atomic swap and `_exit`, both async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGUSR1, handler);
    }
    let spawned = std::thread::Builder::new()
        .name("signal-watch".into())
        .spawn(move || loop {
            if SIGNALLED.load(Ordering::SeqCst) {
                flag.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        });
    if let Err(e) = spawned {
        eprintln!("warning: no signal watcher ({e}); SIGINT/SIGTERM/SIGUSR1 will not checkpoint");
    }
}
