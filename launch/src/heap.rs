//! Which malloc behaviour each command runs with, decided here once and applied by `main`
//! before any other thread starts.
//!
//! glibc's malloc returns every large block (>= 128 KiB, a threshold that rises to 32 MiB as
//! blocks are freed) to the kernel on free, so each large tensor of every iteration is
//! page-faulted in again: measured 5x slower on a 32 MiB `index_select` / elementwise op on
//! this machine. Commands that run the same tensor shapes iteration after iteration (train,
//! eval, generate, bench, and slim's calibration and evaluation passes) keep freed memory in
//! the heap instead, as a caching allocator would; their peak RSS is unchanged (freed blocks
//! are reused, not added). They also share one arena between threads, so that blocks above
//! the 64 MiB of a thread arena's heap are kept too (see [`apply`]). The streaming checkpoint tools (export, import, upcycle) touch each
//! tensor once: a kept block would only raise their peak, so they return every tensor-sized
//! block to the system, the threshold pinned at glibc's initial 128 KiB so it does not rise.
//! Commands that hold no tensors keep glibc's defaults.

use crate::cli::Command;

/// A malloc policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeapPolicy {
    /// Keep freed blocks in the heap for the next iteration's tensors.
    KeepFreed,
    /// Give every tensor-sized block back to the kernel when it is freed.
    ReturnFreed,
}

/// The policy of `cmd`; `None` leaves glibc's defaults. Every command is listed, so a new
/// one has to choose.
pub fn policy(cmd: &Command) -> Option<HeapPolicy> {
    match cmd {
        Command::Train(_)
        | Command::Eval(_)
        | Command::Generate(_)
        | Command::Bench(_)
        | Command::Slim(_) => Some(HeapPolicy::KeepFreed),
        Command::Export(_) | Command::Import(_) | Command::Upcycle(_) => {
            Some(HeapPolicy::ReturnFreed)
        }
        Command::Check(_)
        | Command::ConfigReference
        | Command::Inspect(_)
        | Command::Launch(_)
        | Command::Tokenizer(_)
        | Command::Data(_) => None,
    }
}

/// Sets `policy` for this process. Call before any other thread runs.
pub fn apply(policy: HeapPolicy) {
    // SAFETY: mallopt only changes allocator parameters; no allocation is in flight on
    // another thread (the caller's contract).
    unsafe {
        match policy {
            HeapPolicy::KeepFreed => {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
                // One arena for every thread. glibc gives each new thread an arena of
                // heaps of at most 64 MiB, so a block that large (a 64 MiB all-to-all
                // output of a `threads`-backend rank, a big logits tensor in a rank thread)
                // cannot be kept there: it is mapped and page-faulted again on every call
                // (measured: the threads all-to-all at 64 MiB ran at 0.42x the MPI backend,
                // 1.5x with one arena). The main arena grows without that limit. The cost,
                // one lock for every thread's malloc, is small next to tensor ops.
                libc::mallopt(libc::M_ARENA_MAX, 1);
            }
            HeapPolicy::ReturnFreed => {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
        }
    }
}
