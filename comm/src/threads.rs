//! In-process ranks: P communicators, one per thread, over shared memory.
//!
//! Used by tests and by `--debug` mode to run the real dispatch and all-to-all code with
//! `parallel.ep_size = P` in one process. The ranks of a group share one [`Board`]: a slot
//! per rank where it posts what it brings to the current collective (a view of its input
//! tensor, its split sizes, its split key), and a counter per rank for the two
//! synchronisation points every collective has:
//!
//! 1. *posted*: every rank has posted; each rank now reads its peers' posts directly
//!    (an all-to-all copies each incoming block once, straight from the sender's tensor into
//!    the receiver's freshly allocated output: no message, no intermediate buffer);
//! 2. *read*: every rank has finished reading; only now may a rank return, so the caller
//!    may then modify its input and the output never aliases it (MPI's `MPI_Alltoallv`
//!    semantics).
//!
//! `split` builds a fresh board for each new group (through a registry shared by the
//! world), so collectives of different groups never mix. Every post carries the
//! collective's sequence number and name, so ranks calling different collectives get an
//! error instead of each other's data.
//!
//! Nobody hangs: every wait lasts at most the world's timeout ([`CommError::Timeout`],
//! naming the silent rank), and a peer whose communicator was dropped (its thread returned
//! or failed) is seen as [`CommError::PeerGone`]. A wait spins briefly, then yields, then
//! sleeps on a condition variable, so a debug run whose ranks compute for seconds between
//! collectives does not burn the cores its peers need.

use crate::args::{check_all_to_all, invalid};
use crate::{check_device, CommError, Communicator, Result};
use std::collections::HashMap;
use std::ffi::{c_char, c_int};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

/// How long a waiting rank busy-waits before it starts yielding its core.
const SPIN_FOR: Duration = Duration::from_micros(20);
/// How long a waiting rank yields before it sleeps on the condition variable.
const YIELD_FOR: Duration = Duration::from_micros(50);

/// What one rank brings to one collective.
struct Post {
    seq: u64,
    op: &'static str,
    /// A detached view of the rank's input (all_to_all, all_reduce_sum, all_gather, the
    /// root of broadcast).
    tensor: Option<Tensor>,
    /// all_to_all: the send split sizes.
    splits: Vec<i64>,
    /// split: `(color, key)`.
    key: (usize, usize),
}

/// Shared by the ranks of one group.
struct Board {
    /// Synchronisation points each rank has reached (two per collective).
    arrivals: Vec<AtomicU64>,
    /// Set when a rank's communicator is dropped.
    dead: Vec<AtomicBool>,
    /// Ranks asleep on `wake` (arrivals notify only when someone sleeps).
    sleepers: AtomicUsize,
    /// How long a waiting rank busy-waits: [`SPIN_FOR`] while every rank can have a core
    /// of its own, zero when they outnumber the cores (a spinning rank would then hold
    /// the core the rank it waits for needs).
    spin_for: Duration,
    posts: Vec<Mutex<Option<Post>>>,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Board {
    fn new(size: usize) -> Arc<Board> {
        Arc::new(Board {
            arrivals: (0..size).map(|_| AtomicU64::new(0)).collect(),
            dead: (0..size).map(|_| AtomicBool::new(false)).collect(),
            sleepers: AtomicUsize::new(0),
            spin_for: if size <= std::thread::available_parallelism().map_or(1, |n| n.get()) {
                SPIN_FOR
            } else {
                Duration::ZERO
            },
            posts: (0..size).map(|_| Mutex::new(None)).collect(),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        })
    }

    /// The first rank that has not reached synchronisation point `k`.
    fn missing(&self, k: u64) -> Option<usize> {
        self.arrivals
            .iter()
            .position(|a| a.load(Ordering::SeqCst) < k)
    }

    fn notify(&self) -> Result<()> {
        let _g = self.lock.lock().map_err(|_| CommError::Poisoned)?;
        self.wake.notify_all();
        Ok(())
    }

    /// Marks `rank` as arrived at its next synchronisation point and waits until every rank
    /// has arrived there too, for at most `timeout`.
    fn sync(&self, rank: usize, op: &'static str, timeout: Duration) -> Result<()> {
        let k = self.arrivals[rank].fetch_add(1, Ordering::SeqCst) + 1;
        // SeqCst on both sides (arrival then sleepers here, sleepers then arrivals in the
        // sleeper): either we see the sleeper, or it sees our arrival before sleeping.
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.notify()?;
        }
        let start = Instant::now();
        while start.elapsed() < self.spin_for {
            for _ in 0..64 {
                if self.missing(k).is_none() {
                    return Ok(());
                }
                std::hint::spin_loop();
            }
        }
        while start.elapsed() < self.spin_for + YIELD_FOR {
            if self.missing(k).is_none() {
                return Ok(());
            }
            std::thread::yield_now();
        }
        let deadline = start + timeout;
        let mut guard = self.lock.lock().map_err(|_| CommError::Poisoned)?;
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let outcome = loop {
            let Some(peer) = self.missing(k) else {
                break Ok(());
            };
            if self.dead[peer].load(Ordering::SeqCst) {
                break Err(gone(peer));
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(CommError::Timeout {
                    op,
                    rank: peer,
                    secs: timeout.as_secs(),
                });
            }
            guard = match self.wake.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(_) => break Err(CommError::Poisoned),
            };
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        outcome
    }
}

/// Boards created by a split, waiting for their members to pick them up.
struct PendingSplit {
    group_id: u64,
    board: Arc<Board>,
    remaining: usize,
}

/// Shared by all communicators of one world.
struct Registry {
    next_group_id: AtomicU64,
    /// Keyed by (parent group id, parent's split counter, color).
    pending: Mutex<HashMap<(u64, u64, usize), PendingSplit>>,
}

/// One rank of an in-process group.
pub struct ThreadComm {
    rank: usize,
    size: usize,
    group_id: u64,
    board: Arc<Board>,
    timeout: Duration,
    /// The device of the tensors the ranks exchange (strict mode checks it).
    device: Device,
    registry: Arc<Registry>,
    /// Collectives issued so far (tag of the posts).
    seq: u64,
    /// Splits issued so far (identifies the split in the registry).
    splits: u64,
    /// The block `all_to_all` receives large outputs into (see [`RECV_POOL_MIN_BYTES`]).
    recv_pool: Option<Tensor>,
}

/// CPU `all_to_all` outputs of at least this many bytes are received into the rank's pool
/// block rather than a fresh allocation. glibc serves a block of 64 MiB or more that a thread
/// other than the main one allocates with a fresh `mmap` (a thread arena's heaps are at most
/// 64 MiB) and unmaps it on free, so every such output was page-faulted in again on every call:
/// 0.4x the MPI backend's bandwidth at 64 MiB in `moe bench a2a`. The pool keeps the last
/// block and hands it out again once nothing references it any more (a caching allocator of
/// one block per rank, as torch's CUDA allocator keeps blocks); smaller outputs stay in
/// glibc's heaps, which `moe` keeps freed blocks in (launch/src/heap.rs).
pub const RECV_POOL_MIN_BYTES: usize = 32 << 20;

extern "C" {
    fn moe_shim_reuse_storage(
        pool: *const C_tensor,
        sizes: *const i64,
        ndim: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// A fresh tensor of `shape` over `pool`'s storage, when nothing else references that storage
/// and it is large enough (see the shim's `moe_shim_reuse_storage`).
fn reuse_storage(pool: &Tensor, shape: &[i64]) -> Result<Option<Tensor>> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0u8; 1024];
    // SAFETY: `pool` is live for the call, `shape` holds `shape.len()` sizes, `out` and `err`
    // are writable and `err.len()` bounds the message.
    let rc = unsafe {
        moe_shim_reuse_storage(
            pool.as_ptr(),
            shape.as_ptr(),
            shape.len(),
            &mut out,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 {
        let msg = crate::shim_message(&err);
        return Err(invalid("all_to_all", format!("receive pool: {msg}")));
    }
    // SAFETY: a non-null result is a new heap `at::Tensor` that we now own.
    Ok((!out.is_null()).then(|| unsafe { Tensor::from_ptr(out) }))
}

/// Creates `size` in-process ranks on the CPU; element r is rank r's world communicator.
/// Move each to its own thread. Every wait lasts at most `timeout`.
pub fn threads_world(size: usize, timeout: Duration) -> Vec<Box<dyn Communicator>> {
    // host: the default is CPU ranks.
    threads_world_on(size, timeout, Device::Cpu)
}

/// [`threads_world`] for ranks whose tensors live on `device`.
pub fn threads_world_on(
    size: usize,
    timeout: Duration,
    device: Device,
) -> Vec<Box<dyn Communicator>> {
    let registry = Arc::new(Registry {
        next_group_id: AtomicU64::new(1),
        pending: Mutex::new(HashMap::new()),
    });
    let board = Board::new(size);
    (0..size)
        .map(|rank| {
            Box::new(ThreadComm {
                rank,
                size,
                group_id: 0,
                board: board.clone(),
                timeout,
                device,
                registry: registry.clone(),
                seq: 0,
                splits: 0,
                recv_pool: None,
            }) as Box<dyn Communicator>
        })
        .collect()
}

fn gone(rank: usize) -> CommError {
    CommError::PeerGone {
        rank,
        cause: "its communicator was dropped (its thread returned or failed)".into(),
    }
}

/// What a rank read from a peer's post: the peer's tensor (a new reference to its storage,
/// which keeps it alive while it is read) and split sizes.
struct Seen {
    tensor: Option<Tensor>,
    splits: Vec<i64>,
    key: (usize, usize),
}

impl ThreadComm {
    /// Runs one collective: posts `post`, waits until every rank has posted, runs `read`
    /// over the peers' posts, then waits until every rank has read before returning (also
    /// when `read` failed, so no rank leaves while others still read its tensor).
    fn collective<T>(
        &mut self,
        op: &'static str,
        tensor: Option<Tensor>,
        splits: Vec<i64>,
        key: (usize, usize),
        read: impl FnOnce(&Self, Vec<Seen>) -> Result<T>,
    ) -> Result<T> {
        self.seq += 1;
        let seq = self.seq;
        *self.board.posts[self.rank]
            .lock()
            .map_err(|_| CommError::Poisoned)? = Some(Post {
            seq,
            op,
            tensor,
            splits,
            key,
        });
        let result = self.board.sync(self.rank, op, self.timeout).and_then(|()| {
            let result = self.seen(op, seq).and_then(|seen| read(self, seen));
            let read_done = self.board.sync(self.rank, op, self.timeout);
            let out = result?;
            read_done.map(|()| out)
        });
        // Drop our view of the input now rather than at the next collective.
        if let Ok(mut post) = self.board.posts[self.rank].lock() {
            if let Some(p) = post.as_mut() {
                p.tensor = None;
            }
        }
        result
    }

    /// Every rank's post for collective `seq`, in rank order.
    fn seen(&self, op: &'static str, seq: u64) -> Result<Vec<Seen>> {
        let mut seen = Vec::with_capacity(self.size);
        for (peer, slot) in self.board.posts.iter().enumerate() {
            let guard = slot.lock().map_err(|_| CommError::Poisoned)?;
            let post = guard
                .as_ref()
                .ok_or_else(|| invalid(op, format!("rank {peer} posted nothing")))?;
            if post.seq != seq || post.op != op {
                return Err(invalid(
                    op,
                    format!(
                        "rank {} is in collective #{seq} ({op}) but rank {peer} is in \
                         collective #{} ({}): ranks issued different collectives",
                        self.rank, post.seq, post.op
                    ),
                ));
            }
            seen.push(Seen {
                tensor: post.tensor.as_ref().map(Tensor::shallow_clone),
                splits: post.splits.clone(),
                key: post.key,
            });
        }
        Ok(seen)
    }
}

/// A peer's tensor, which the collective requires it to have posted.
fn posted<'a>(op: &'static str, peer: usize, seen: &'a Seen) -> Result<&'a Tensor> {
    seen.tensor
        .as_ref()
        .ok_or_else(|| invalid(op, format!("rank {peer} posted no tensor")))
}

/// Copies rows `[from, from + n)` of contiguous `src` into rows `[to, to + n)` of
/// contiguous `dst` (same kind and trailing shape).
fn copy_rows(dst: &Tensor, to: i64, src: &Tensor, from: i64, n: i64) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    // host: a test of where the tensors are (CPU rows are copied with one memcpy), no read.
    if dst.device() == Device::Cpu && src.device() == Device::Cpu {
        let numel = src.numel() as i64;
        let rows = src.size().first().copied().unwrap_or(1).max(1);
        let row_bytes = (numel / rows) as usize * src.kind().elt_size_in_bytes();
        // SAFETY: both tensors are contiguous CPU tensors of the same kind and trailing
        // shape (checked by the caller), `[from, from + n)` lies within `src`'s rows and
        // `[to, to + n)` within `dst`'s (split sizes checked against both shapes), and they
        // do not overlap (`dst` was allocated for this collective, or is the rank's receive
        // pool block, handed out only when nothing else, a posted input included, holds it). `src` belongs to a peer
        // that cannot return, hence cannot modify or free it, before every rank has passed
        // the collective's "read" point; our own reference also keeps its storage alive.
        unsafe {
            let s = (src.data_ptr() as *const u8).add(from as usize * row_bytes);
            let d = (dst.data_ptr() as *mut u8).add(to as usize * row_bytes);
            std::ptr::copy_nonoverlapping(s, d, n as usize * row_bytes);
        }
        return Ok(());
    }
    dst.f_narrow(0, to, n)?
        .f_copy_(&src.f_narrow(0, from, n)?)?;
    Ok(())
}

impl ThreadComm {
    /// An uninitialised `all_to_all` output of `shape`: from the receive pool when it is a
    /// large CPU one (see [`RECV_POOL_MIN_BYTES`]), freshly allocated otherwise.
    fn recv_buffer(&mut self, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let numel = shape.iter().product::<i64>().max(0);
        let bytes = numel as usize * kind.elt_size_in_bytes();
        // host: only CPU ranks page-fault fresh blocks in; other devices allocate as usual.
        if device != Device::Cpu || bytes < RECV_POOL_MIN_BYTES {
            return Ok(Tensor::f_empty(shape, (kind, device))?);
        }
        if let Some(pool) = self.recv_pool.as_ref().filter(|p| p.kind() == kind) {
            if let Some(t) = reuse_storage(pool, shape)? {
                return Ok(t);
            }
        }
        // Too small, of another kind, or still referenced by an earlier output: a new block
        // becomes the pool (the old one is freed with its last user).
        let block = Tensor::f_empty([numel], (kind, device))?;
        let out = reuse_storage(&block, shape)?
            .ok_or_else(|| invalid("all_to_all", "a fresh receive block is in use".into()))?;
        self.recv_pool = Some(block);
        Ok(out)
    }
}

impl Drop for ThreadComm {
    fn drop(&mut self) {
        self.board.dead[self.rank].store(true, Ordering::SeqCst);
        // A poisoned lock means a peer already failed; it will not sleep on `wake`.
        let _ = self.board.notify();
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn device(&self) -> Device {
        self.device
    }

    fn all_to_all(&mut self, input: &Tensor, send: &[i64], recv: &[i64]) -> Result<Tensor> {
        const OP: &str = "all_to_all";
        let shape = input.size();
        let (_, recv_total) = check_all_to_all(OP, &shape, send, recv, self.size)?;
        check_device(OP, "input", input, self.device)?;
        let x = input.f_detach()?.f_contiguous()?;
        let recv = recv.to_vec();
        let mut out_shape = shape.clone();
        out_shape[0] = recv_total;
        let out = self.recv_buffer(&out_shape, input.kind(), input.device())?;
        self.collective(OP, Some(x), send.to_vec(), (0, 0), move |me, seen| {
            let mut off = 0;
            for (peer, s) in seen.iter().enumerate() {
                let t = posted(OP, peer, s)?;
                let n = s.splits.get(me.rank).copied().unwrap_or(-1);
                let tshape = t.size();
                if n != recv[peer] || tshape[1..] != shape[1..] || t.kind() != input.kind() {
                    return Err(invalid(
                        OP,
                        format!(
                            "rank {} expected {} rows of {:?} {:?} from rank {peer}, which \
                             sends {n} rows of {:?} {:?}",
                            me.rank,
                            recv[peer],
                            &shape[1..],
                            input.kind(),
                            &tshape[1..],
                            t.kind()
                        ),
                    ));
                }
                let from: i64 = s.splits[..me.rank].iter().sum();
                // The single copy of this block: straight from the sender into the output.
                copy_rows(&out, off, t, from, n)?;
                off += n;
            }
            Ok(out)
        })
    }

    fn all_reduce_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce_sum";
        check_device(OP, "input", input, self.device)?;
        let shape = input.size();
        self.collective(OP, Some(input.f_detach()?), vec![], (0, 0), |me, seen| {
            let all = same_shapes(OP, me.rank, &shape, &seen)?;
            // The same summation order on every rank, so all ranks get bitwise-equal
            // results; the first addition (or the copy, alone) leaves the inputs untouched.
            let mut acc = match all.get(1) {
                Some(t) => all[0].f_add(t)?,
                None => all[0].f_detach_copy()?,
            };
            for t in all.iter().skip(2) {
                acc = acc.f_add(t)?;
            }
            Ok(acc)
        })
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        check_device(OP, "input", input, self.device)?;
        let shape = input.size();
        self.collective(OP, Some(input.f_detach()?), vec![], (0, 0), |me, seen| {
            let all = same_shapes(OP, me.rank, &shape, &seen)?;
            Ok(Tensor::f_stack(&all, 0)?)
        })
    }

    fn broadcast(&mut self, input: &Tensor, root: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        if root >= self.size {
            return Err(invalid(
                OP,
                format!("root {root} in a group of size {}", self.size),
            ));
        }
        check_device(OP, "input", input, self.device)?;
        let view = if self.rank == root {
            Some(input.f_detach()?)
        } else {
            None
        };
        self.collective(OP, view, vec![], (0, 0), |_, seen| {
            Ok(posted(OP, root, &seen[root])?.f_detach_copy()?)
        })
    }

    fn barrier(&mut self) -> Result<()> {
        self.collective("barrier", None, vec![], (0, 0), |_, _| Ok(()))
    }

    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        const OP: &str = "split";
        let members = self.collective(OP, None, vec![], (color, key), |_, seen| {
            // (key, parent rank) of this color
            let mut members: Vec<(usize, usize)> = seen
                .iter()
                .enumerate()
                .filter(|(_, s)| s.key.0 == color)
                .map(|(p, s)| (s.key.1, p))
                .collect();
            members.sort_unstable();
            Ok(members)
        })?;
        let new_rank = members
            .iter()
            .position(|&(_, p)| p == self.rank)
            .ok_or_else(|| invalid(OP, "this rank is missing from its own color".into()))?;
        let new_size = members.len();
        self.splits += 1;
        let id = (self.group_id, self.splits, color);
        let (group_id, board) = {
            let mut pending = self
                .registry
                .pending
                .lock()
                .map_err(|_| CommError::Poisoned)?;
            let entry = pending.entry(id).or_insert_with(|| PendingSplit {
                group_id: self.registry.next_group_id.fetch_add(1, Ordering::Relaxed),
                board: Board::new(new_size),
                remaining: new_size,
            });
            let (gid, board) = (entry.group_id, entry.board.clone());
            entry.remaining -= 1;
            if entry.remaining == 0 {
                pending.remove(&id);
            }
            (gid, board)
        };
        Ok(Box::new(ThreadComm {
            rank: new_rank,
            size: new_size,
            group_id,
            board,
            timeout: self.timeout,
            device: self.device,
            registry: self.registry.clone(),
            seq: 0,
            splits: 0,
            recv_pool: None,
        }))
    }
}

/// The posted tensors of every rank, all of `shape`.
fn same_shapes(op: &'static str, rank: usize, shape: &[i64], seen: &[Seen]) -> Result<Vec<Tensor>> {
    seen.iter()
        .enumerate()
        .map(|(peer, s)| {
            let t = posted(op, peer, s)?;
            if t.size() != shape {
                return Err(invalid(
                    op,
                    format!(
                        "rank {peer} passed shape {:?}, rank {rank} {shape:?}",
                        t.size()
                    ),
                ));
            }
            Ok(t.shallow_clone())
        })
        .collect()
}
