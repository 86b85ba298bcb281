//! Which malloc behaviour each command runs with, decided here once and applied by `main`
//! before any other thread starts.
//!
//! glibc's malloc returns every large block (>= 128 KiB, a threshold that rises to 32 MiB as
//! blocks are freed) to the kernel on free, so each large tensor of every iteration is
//! page-faulted in again: measured 5x slower on a 32 MiB `index_select` / elementwise op on
//! this machine. Commands that run the same tensor shapes iteration after iteration (train,
//! eval, generate, bench, and slim's calibration and evaluation passes) keep freed memory in
//! the heap instead, as a caching allocator would; their peak RSS is unchanged (freed blocks
//! are reused, not added). Blocks of 64 MiB and more that a thread other than the main one
//! allocates are still mapped and unmapped each time (a thread arena's heaps are at most 64
//! MiB); one arena for all threads (`M_ARENA_MAX` 1) would keep them, but was measured to
//! triple the latency of the `threads` all-to-all at 1 KiB (2 us to 6 us: every rank
//! thread's malloc behind one lock), so it is not set; the `threads` all-to-all, whose rank
//! threads receive such blocks on every call, keeps its own (see
//! `moe_comm::threads::RECV_POOL_MIN_BYTES`). The streaming checkpoint tools (export, import,
//! upcycle) touch each tensor once: a kept block would only raise their peak, so they return
//! every tensor-sized block to the system, the threshold pinned at glibc's initial 128 KiB so
//! it does not rise.
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
            }
            HeapPolicy::ReturnFreed => {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
            }
        }
    }
}
