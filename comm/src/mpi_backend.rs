//! The MPI backend: rsmpi over OpenMPI, for CPU tensors.
//!
//! Collectives move the raw bytes of contiguous CPU tensors, so any dtype works: an
//! all-to-all is `MPI_Alltoallv` over `u8` with counts and displacements in bytes (rows x
//! bytes per row). Sums use `MPI_Allreduce` with `MPI_SUM` on f32/f64/i32/i64 (f16/bf16 are
//! summed in f32). MPI is initialised with `MPI_THREAD_MULTIPLE` because the backward of
//! the differentiable all-to-all may run on an autograd worker thread.
//!
//! MPI's default error handler aborts the whole job on a failed call; this module checks
//! every argument it can beforehand and reports those as [`CommError`]s instead.

use crate::args::{check_all_to_all, invalid};
use crate::{CommError, Communicator, Result};
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::{Equivalence, Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::{Color, Communicator as _, SimpleCommunicator};
use mpi::{Count, Threading};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The MPI environment of this process. Create once, early in `main`.
///
/// MPI is finalised when the runtime and every communicator obtained from it are dropped.
pub struct MpiRuntime {
    universe: Arc<Universe>,
    world_rank: usize,
    world_size: usize,
    local_rank: usize,
    local_size: usize,
}

/// True when this process was started by `mpirun`/`mpiexec` (OpenMPI or a PMI launcher).
pub fn is_under_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

impl MpiRuntime {
    /// Initialises MPI with `MPI_THREAD_MULTIPLE`; errors if MPI is already initialised or
    /// the library does not provide that level.
    pub fn init() -> Result<Self> {
        let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| CommError::Mpi("MPI is already initialised in this process".into()))?;
        if provided != Threading::Multiple {
            return Err(CommError::Unavailable {
                backend: "mpi",
                reason: format!(
                    "the MPI library provides threading level {provided:?}, not Multiple \
                     (the all-to-all backward may run on an autograd worker thread)"
                ),
            });
        }
        let world = universe.world();
        let shared = world.split_shared(world.rank());
        Ok(Self {
            world_rank: to_usize(world.rank()),
            world_size: to_usize(world.size()),
            local_rank: to_usize(shared.rank()),
            local_size: to_usize(shared.size()),
            universe: Arc::new(universe),
        })
    }

    /// A communicator over all ranks (a duplicate of `MPI_COMM_WORLD`, so its traffic never
    /// mixes with other users of the world communicator).
    pub fn world(&self) -> Box<dyn Communicator> {
        let world = self.universe.world();
        Box::new(MpiComm::new(world.duplicate(), self.universe.clone()))
    }

    /// Rank in the world.
    pub fn world_rank(&self) -> usize {
        self.world_rank
    }

    /// Number of ranks in the world.
    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank among the processes of this node (from a shared-memory split): picks the GPU.
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Number of processes on this node.
    pub fn local_size(&self) -> usize {
        self.local_size
    }

    /// Aborts every process of the job with `code` (`MPI_Abort`), so that no rank is left
    /// waiting in a collective after one failed.
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }

    /// Makes a panic on any thread of this process abort the whole job (`MPI_Abort`, exit
    /// code 101 as for an unwinding panic), after printing `rank r of n: panic: ...` and
    /// running the previous hook (message and backtrace).
    ///
    /// Without it a panicking rank unwinds, drops its communicators and blocks in
    /// `MPI_Finalize`, while its peers block in their next collective: the job hangs.
    pub fn abort_on_panic(&self) {
        let (rank, size) = (self.world_rank, self.world_size);
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string payload)".into());
            let at = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let live = mpi::environment::is_initialized() && !mpi::environment::is_finalized();
            let then = if live { "; aborting the job" } else { "" };
            eprintln!("rank {rank} of {size}: panic: {msg}{at}{then}");
            previous(info);
            if !live {
                return; // MPI is over: nothing to abort, the process unwinds as usual.
            }
            // SAFETY: MPI is initialised and not finalised (checked above); MPI_Abort may be
            // called from any thread under MPI_THREAD_MULTIPLE and does not return. The raw
            // world handle is used because the hook must be 'static and must not keep the
            // `Universe` (and so MPI) alive.
            unsafe {
                mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 101);
            }
        }));
    }
}

fn to_usize(x: i32) -> usize {
    usize::try_from(x).unwrap_or(0)
}

/// One rank's view of an MPI communicator.
pub struct MpiComm {
    // Declared before `_universe` so it is freed before MPI can be finalised.
    comm: SimpleCommunicator,
    rank: usize,
    size: usize,
    _universe: Arc<Universe>,
}

// SAFETY: an MPI communicator handle may be used from any thread once MPI runs with
// MPI_THREAD_MULTIPLE, which `MpiRuntime::init` guarantees before any `MpiComm` exists.
// `MpiComm` is not `Sync`: callers serialise access through `SharedComm`'s mutex.
unsafe impl Send for MpiComm {}

impl MpiComm {
    fn new(comm: SimpleCommunicator, universe: Arc<Universe>) -> Self {
        Self {
            rank: to_usize(comm.rank()),
            size: to_usize(comm.size()),
            comm,
            _universe: universe,
        }
    }
}

fn count(op: &'static str, n: i64) -> Result<Count> {
    Count::try_from(n).map_err(|_| {
        invalid(
            op,
            format!("{n} bytes exceed MPI's 32-bit count; split the message"),
        )
    })
}

/// Checks the tensor is on the CPU and returns a contiguous version of it.
fn cpu_contiguous(op: &'static str, t: &Tensor) -> Result<Tensor> {
    if t.device() != Device::Cpu {
        return Err(invalid(
            op,
            format!("the mpi backend moves CPU tensors, got {:?}", t.device()),
        ));
    }
    Ok(t.f_detach()?.f_contiguous()?)
}

fn nbytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

/// The address of an empty buffer. Not Rust's `&[]` for bytes: its dangling pointer is
/// 0x1, which is OpenMPI's `MPI_IN_PLACE`, and `MPI_Alltoallv` rejects that for both sides.
fn empty_ptr() -> *mut u8 {
    std::ptr::NonNull::<u64>::dangling().as_ptr().cast()
}

/// The bytes of a contiguous CPU tensor.
fn bytes(t: &Tensor) -> &[u8] {
    let n = nbytes(t);
    if n == 0 {
        // SAFETY: a zero-length slice at a non-null, aligned address.
        return unsafe { std::slice::from_raw_parts(empty_ptr(), 0) };
    }
    // SAFETY: `t` is a contiguous CPU tensor (checked by every caller) whose storage holds
    // `n` bytes from `data_ptr`; the slice borrows `t`, which keeps the storage alive.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, n) }
}

/// The bytes of a contiguous CPU tensor that this rank exclusively owns.
fn bytes_mut(t: &mut Tensor) -> &mut [u8] {
    let n = nbytes(t);
    if n == 0 {
        // SAFETY: a zero-length slice at a non-null, aligned address.
        return unsafe { std::slice::from_raw_parts_mut(empty_ptr(), 0) };
    }
    // SAFETY: as in `bytes`; the tensor was freshly allocated by the caller, so no other
    // tensor aliases its storage, and the `&mut` borrow keeps it unique while in use.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut u8, n) }
}

/// The elements of a contiguous CPU tensor whose dtype matches `T`.
fn typed_mut<T: Equivalence>(t: &mut Tensor) -> &mut [T] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: the caller matched `T` to `t.kind()`; contiguous, freshly allocated and
    // exclusively borrowed as in `bytes_mut`.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, n) }
}

fn typed<T: Equivalence>(t: &Tensor) -> &[T] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: as in `typed_mut`, read-only.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

impl MpiComm {
    fn reduce_typed<T: Equivalence>(&self, x: &Tensor) -> Result<Tensor> {
        let mut out = x.f_empty_like()?;
        self.comm.all_reduce_into(
            typed::<T>(x),
            typed_mut::<T>(&mut out),
            SystemOperation::sum(),
        );
        Ok(out)
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn all_to_all(&mut self, input: &Tensor, send: &[i64], recv: &[i64]) -> Result<Tensor> {
        const OP: &str = "all_to_all";
        let shape = input.size();
        let (_, recv_total) = check_all_to_all(OP, &shape, send, recv, self.size)?;
        let x = cpu_contiguous(OP, input)?;
        let row_bytes = (shape[1..].iter().product::<i64>()) * x.kind().elt_size_in_bytes() as i64;
        let layout = |splits: &[i64]| -> Result<(Vec<Count>, Vec<Count>)> {
            let (mut counts, mut displs, mut off) = (Vec::new(), Vec::new(), 0i64);
            for &s in splits {
                counts.push(count(OP, s * row_bytes)?);
                displs.push(count(OP, off)?);
                off += s * row_bytes;
            }
            count(OP, off)?;
            Ok((counts, displs))
        };
        let (scounts, sdispls) = layout(send)?;
        let (rcounts, rdispls) = layout(recv)?;
        let mut out_shape = shape.clone();
        out_shape[0] = recv_total;
        let mut out = Tensor::f_empty(&out_shape, (x.kind(), Device::Cpu))?;
        let sbuf = Partition::new(bytes(&x), scounts, sdispls);
        let mut rbuf = PartitionMut::new(bytes_mut(&mut out), rcounts, rdispls);
        self.comm.all_to_all_varcount_into(&sbuf, &mut rbuf);
        Ok(out)
    }

    fn all_reduce_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce_sum";
        let x = cpu_contiguous(OP, input)?;
        count(OP, x.numel() as i64)?;
        match x.kind() {
            Kind::Float => self.reduce_typed::<f32>(&x),
            Kind::Double => self.reduce_typed::<f64>(&x),
            Kind::Int64 => self.reduce_typed::<i64>(&x),
            Kind::Int => self.reduce_typed::<i32>(&x),
            Kind::Half | Kind::BFloat16 => {
                let sum = self.reduce_typed::<f32>(&x.f_to_kind(Kind::Float)?)?;
                Ok(sum.f_to_kind(x.kind())?)
            }
            k => Err(invalid(OP, format!("no MPI sum for dtype {k:?}"))),
        }
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        let x = cpu_contiguous(OP, input)?;
        count(OP, (nbytes(&x) * self.size) as i64)?;
        let mut shape = vec![self.size as i64];
        shape.extend(x.size());
        let mut out = Tensor::f_empty(&shape, (x.kind(), Device::Cpu))?;
        self.comm.all_gather_into(bytes(&x), bytes_mut(&mut out));
        Ok(out)
    }

    fn broadcast(&mut self, input: &Tensor, root: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        if root >= self.size {
            return Err(invalid(
                OP,
                format!("root {root} in a group of size {}", self.size),
            ));
        }
        let x = cpu_contiguous(OP, input)?;
        count(OP, nbytes(&x) as i64)?;
        let mut out = if self.rank == root {
            x.f_detach_copy()?
        } else {
            x.f_empty_like()?
        };
        let root_rank = i32::try_from(root).map_err(|_| invalid(OP, format!("root {root}")))?;
        self.comm
            .process_at_rank(root_rank)
            .broadcast_into(bytes_mut(&mut out));
        Ok(out)
    }

    fn barrier(&mut self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }

    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        let c = i32::try_from(color).map_err(|_| invalid("split", format!("color {color}")))?;
        let k = i32::try_from(key).map_err(|_| invalid("split", format!("key {key}")))?;
        let sub = self
            .comm
            .split_by_color_with_key(Color::with_value(c), k)
            .ok_or_else(|| {
                CommError::Mpi(format!("MPI_Comm_split gave no communicator for color {c}"))
            })?;
        Ok(Box::new(MpiComm::new(sub, self._universe.clone())))
    }
}
