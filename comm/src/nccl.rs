//! The NCCL backend for CUDA tensors.
//!
//! NCCL is loaded at run time so the crate builds, and its CPU paths run, on machines with
//! no CUDA at all. The ABI types (`ncclUniqueId`, `ncclComm_t`, data types, reduction ops)
//! are cudarc's `nccl::sys` bindings. The library itself is opened here rather than through
//! cudarc's loader, because cudarc panics when the library is missing and its list of
//! candidate names lacks `libnccl.so.2`, the only name pip's `nvidia-nccl` wheel ships;
//! [`probe`] tries the usual names and reports a clear [`CommError::Unavailable`].
//!
//! The unique id is broadcast over a bootstrap communicator (the MPI world). The
//! all-to-all is the usual grouped `ncclSend`/`ncclRecv` (NCCL's own recipe for
//! all-to-allv), on torch's current CUDA stream of the communicator's device, obtained
//! through the C++ shim (c10's device-guard interface, no CUDA headers needed).
//!
//! Errors and stuck collectives: a [`Watchdog`] thread times every call into NCCL (which can
//! block on the host while connecting to or splitting with a dead peer) and every collective
//! on the GPU (a CUDA event recorded after it). It polls `ncclCommGetAsyncError` and those
//! markers and, on an asynchronous error or a collective older than `parallel.timeout_s`,
//! aborts the communicator (`ncclCommAbort`) so that no rank hangs; the next call returns the
//! failure, naming the collective, the rank and the timeout. `Drop` never blocks: it destroys
//! the communicator only when nothing is pending and nothing failed, and aborts it otherwise.
//! Not covered: `ncclCommInitRank` itself (there is no communicator to abort yet).

use crate::args::{check_all_to_all, invalid};
use crate::watchdog::{Failure, Limits, Watchdog, Watched};
use crate::{CommError, Communicator, Result};
use cudarc::nccl::sys::{cudaStream_t, ncclComm_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Library names tried in order: pip's wheel ships only the versioned soname.
const NCCL_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int) -> c_int;
type CommDestroy = unsafe extern "C" fn(ncclComm_t) -> c_int;
type CommAbort = unsafe extern "C" fn(ncclComm_t) -> c_int;
type CommGetAsyncError = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
type CommSplit =
    unsafe extern "C" fn(ncclComm_t, c_int, c_int, *mut ncclComm_t, *mut c_void) -> c_int;
type GroupCall = unsafe extern "C" fn() -> c_int;
type Send_ = unsafe extern "C" fn(
    *const c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type Recv = unsafe extern "C" fn(
    *mut c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type AllReduce = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclRedOp_t,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type Broadcast = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    ncclDataType_t,
    c_int,
    ncclComm_t,
    cudaStream_t,
) -> c_int;
type ErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// The NCCL entry points this backend uses.
struct NcclLib {
    name: &'static str,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    comm_destroy: CommDestroy,
    comm_abort: CommAbort,
    comm_get_async_error: CommGetAsyncError,
    comm_split: CommSplit,
    group_start: GroupCall,
    group_end: GroupCall,
    send: Send_,
    recv: Recv,
    all_reduce: AllReduce,
    all_gather: AllGather,
    broadcast: Broadcast,
    error_string: ErrorString,
    // Keeps the function pointers above valid; never unloaded.
    _lib: libloading::Library,
}

fn unavailable(reason: String) -> CommError {
    CommError::Unavailable {
        backend: "nccl",
        reason,
    }
}

fn load() -> std::result::Result<NcclLib, String> {
    let mut tried = Vec::new();
    for name in NCCL_NAMES {
        // SAFETY: loading NCCL runs its library constructors, which only set up NCCL's
        // internal state; NCCL is designed to be dlopen'ed (PyTorch does the same).
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return bind(name, lib),
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!(
        "could not load the NCCL library (tried {}); install NCCL (e.g. the nvidia-nccl \
         wheel or libnccl2) and make it findable through LD_LIBRARY_PATH",
        tried.join("; ")
    ))
}

fn bind(name: &'static str, lib: libloading::Library) -> std::result::Result<NcclLib, String> {
    macro_rules! sym {
        ($sym:literal) => {
            // SAFETY: the symbol is NCCL's public C API function of that name, and the
            // pointer type it is read as is the signature from nccl.h (mirrored by the
            // type aliases above, with ncclResult_t read as int).
            *unsafe { lib.get($sym) }.map_err(|e| format!("{name} lacks a symbol: {e}"))?
        };
    }
    Ok(NcclLib {
        name,
        get_unique_id: sym!(b"ncclGetUniqueId\0"),
        comm_init_rank: sym!(b"ncclCommInitRank\0"),
        comm_destroy: sym!(b"ncclCommDestroy\0"),
        comm_abort: sym!(b"ncclCommAbort\0"),
        comm_get_async_error: sym!(b"ncclCommGetAsyncError\0"),
        comm_split: sym!(b"ncclCommSplit\0"),
        group_start: sym!(b"ncclGroupStart\0"),
        group_end: sym!(b"ncclGroupEnd\0"),
        send: sym!(b"ncclSend\0"),
        recv: sym!(b"ncclRecv\0"),
        all_reduce: sym!(b"ncclAllReduce\0"),
        all_gather: sym!(b"ncclAllGather\0"),
        broadcast: sym!(b"ncclBroadcast\0"),
        error_string: sym!(b"ncclGetErrorString\0"),
        _lib: lib,
    })
}

fn library() -> Result<&'static NcclLib> {
    static LIB: OnceLock<std::result::Result<NcclLib, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        // libtorch_cuda links the NCCL of its wheel (nvidia-nccl); once it is loaded,
        // `libnccl.so.2` resolves to that copy by its soname, without LD_LIBRARY_PATH. A
        // failure here is reported by `probe` (torch sees no CUDA device).
        let _ = crate::cuda::load();
        load()
    })
    .as_ref()
    .map_err(|e| unavailable(e.clone()))
}

/// Checks that NCCL can be loaded and CUDA is usable; returns the library name loaded.
pub fn probe() -> Result<&'static str> {
    let lib = library()?;
    if !tch::Cuda::is_available() {
        return Err(unavailable(format!(
            "{} loaded, but torch sees no CUDA device (CPU-only machine or libtorch_cuda missing)",
            lib.name
        )));
    }
    Ok(lib.name)
}

fn check(lib: &NcclLib, call: &str, rc: c_int) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let msg = error_string(lib, rc);
    Err(CommError::Nccl(format!(
        "{call} failed with code {rc}: {msg}"
    )))
}

fn error_string(lib: &NcclLib, rc: c_int) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    unsafe {
        let p = (lib.error_string)(rc);
        if p.is_null() {
            String::from("unknown error")
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

extern "C" {
    fn moe_shim_cuda_set_device(index: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn moe_shim_cuda_current_stream(index: c_int, err: *mut c_char, err_len: usize) -> *mut c_void;
    fn moe_shim_cuda_event_record(index: c_int, err: *mut c_char, err_len: usize) -> *mut c_void;
    fn moe_shim_cuda_event_query(
        event: *mut c_void,
        index: c_int,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn moe_shim_cuda_event_destroy(event: *mut c_void, index: c_int);
}

fn set_device(index: c_int) -> Result<()> {
    let mut err = [0u8; 1024];
    // SAFETY: the shim writes at most `err.len()` bytes, NUL-terminated, and catches all
    // C++ exceptions.
    let rc = unsafe { moe_shim_cuda_set_device(index, err.as_mut_ptr().cast(), err.len()) };
    if rc != 0 {
        return Err(unavailable(format!(
            "cannot select CUDA device {index}: {}",
            crate::shim_message(&err)
        )));
    }
    Ok(())
}

fn current_stream(index: c_int) -> Result<cudaStream_t> {
    let mut err = [0u8; 1024];
    // SAFETY: as in `set_device`.
    let s = unsafe { moe_shim_cuda_current_stream(index, err.as_mut_ptr().cast(), err.len()) };
    // A null handle is also CUDA's legacy default stream: only an error message marks failure.
    if s.is_null() && err[0] != 0 {
        return Err(CommError::Nccl(format!(
            "no current CUDA stream: {}",
            crate::shim_message(&err)
        )));
    }
    Ok(s.cast())
}

/// A CUDA event recorded after one collective: its completion marker for the watchdog.
struct Event(*mut c_void);

// SAFETY: a cudaEvent_t may be queried and destroyed from any thread.
unsafe impl Send for Event {}

/// What the watchdog waits for: the host side of a call into NCCL (which blocks while NCCL
/// connects to, or splits with, peers that may never come), then the GPU side.
enum Work {
    /// Done when the call into NCCL returned.
    Host(Arc<AtomicBool>),
    /// Done when the collective ran on the GPU.
    Device(Event),
}

/// Marks the host side of a call done when dropped (also on an early return).
struct HostCall(Arc<AtomicBool>);

impl Drop for HostCall {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

const LIVE: u8 = 0;
const ABORTED: u8 = 1;
const DESTROYED: u8 = 2;

/// The NCCL communicator handle, shared by its owner ([`NcclComm`]) and its watchdog thread.
/// Freed exactly once, by whichever of abort and destroy gets there first (`state`).
struct Handle {
    lib: &'static NcclLib,
    comm: ncclComm_t,
    device: c_int,
    /// LIVE, ABORTED or DESTROYED.
    state: AtomicU8,
    /// Held by the owner while it calls into NCCL with `comm`.
    calls: Mutex<()>,
}

// SAFETY: NCCL allows ncclCommGetAsyncError and ncclCommAbort from another thread than the
// one issuing collectives (that is their purpose); every other use of `comm` happens under
// `calls`, and `state` makes sure `comm` is freed once and not used after.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Handle {
    /// Aborts the communicator once: in-flight operations end, later calls are refused.
    /// Waits up to 2 s for a call in progress to return (an enqueue takes microseconds); a
    /// call still inside NCCL after that is blocked (e.g. connecting to a dead peer), and
    /// aborting from another thread is NCCL's documented way to end it.
    fn abort(&self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        let guard = loop {
            match self.calls.try_lock() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        if self
            .state
            .compare_exchange(LIVE, ABORTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // SAFETY: `comm` is live (state was LIVE) and is freed here only.
            let _ = unsafe { (self.lib.comm_abort)(self.comm) };
        }
        drop(guard);
    }

    /// Destroys the communicator gracefully, if it is still live (all its work completed).
    fn destroy(&self) {
        if self
            .state
            .compare_exchange(LIVE, DESTROYED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // SAFETY: `comm` is live and is freed here only.
            let _ = unsafe { (self.lib.comm_destroy)(self.comm) };
        }
    }
}

impl Watched for Arc<Handle> {
    type Work = Work;

    fn is_done(&self, work: &Work) -> std::result::Result<bool, String> {
        let work = match work {
            Work::Host(done) => return Ok(done.load(Ordering::Acquire)),
            Work::Device(event) => event,
        };
        let mut err = [0u8; 1024];
        // SAFETY: `work.0` is a live event from moe_shim_cuda_event_record; the shim catches
        // all C++ exceptions and writes at most `err.len()` bytes.
        let rc = unsafe {
            moe_shim_cuda_event_query(work.0, self.device, err.as_mut_ptr().cast(), err.len())
        };
        match rc {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(crate::shim_message(&err)),
        }
    }

    fn release(&self, work: Work) {
        if let Work::Device(event) = work {
            // SAFETY: a live event, destroyed once (it is consumed here).
            unsafe { moe_shim_cuda_event_destroy(event.0, self.device) };
        }
    }

    fn async_error(&self) -> Option<String> {
        if self.state.load(Ordering::Acquire) != LIVE {
            return None;
        }
        let mut result: c_int = 0;
        // SAFETY: `comm` is live (the watchdog polls only until its owner stops it, before
        // the owner frees `comm`); `result` is writable.
        let rc = unsafe { (self.lib.comm_get_async_error)(self.comm, &mut result) };
        // ncclInProgress (7) is not an error: a non-blocking operation still running.
        match (rc, result) {
            (0, 0) | (0, 7) => None,
            (0, r) => Some(format!("code {r}: {}", error_string(self.lib, r))),
            (rc, _) => Some(format!(
                "ncclCommGetAsyncError failed with code {rc}: {}",
                error_string(self.lib, rc)
            )),
        }
    }

    fn abort(&self) {
        Handle::abort(self);
    }

    fn terminate(&self, failure: &Failure) {
        eprintln!(
            "error: {failure}; the failure was not picked up by the rank's thread (it is \
             blocked), so the process exits now rather than hang"
        );
        // SAFETY: `_exit` ends the process without running destructors or atexit handlers,
        // which could block on the aborted CUDA work.
        unsafe { libc::_exit(1) };
    }
}

/// One rank of an NCCL communicator, bound to one CUDA device.
pub struct NcclComm {
    handle: Arc<Handle>,
    watchdog: Watchdog<Arc<Handle>>,
    rank: usize,
    size: usize,
    device: c_int,
    timeout: Duration,
}

impl NcclComm {
    /// Creates the NCCL communicator of the ranks of `bootstrap` (one per rank, on CUDA
    /// device `device_index`, usually the MPI local rank). Collective over `bootstrap`:
    /// rank 0 creates the unique id and broadcasts it. A collective that does not complete
    /// within `timeout` (`parallel.timeout_s`) aborts the communicator.
    pub fn new(
        bootstrap: &mut dyn Communicator,
        device_index: usize,
        timeout: Duration,
    ) -> Result<Self> {
        let lib = library()?;
        probe()?;
        let device = c_int::try_from(device_index)
            .map_err(|_| invalid("NcclComm::new", format!("device {device_index}")))?;
        set_device(device)?;
        let mut id = ncclUniqueId { internal: [0; 128] };
        if bootstrap.rank() == 0 {
            // SAFETY: `id` is a valid, writable ncclUniqueId.
            check(lib, "ncclGetUniqueId", unsafe {
                (lib.get_unique_id)(&mut id)
            })?;
        }
        let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        // host: the unique id travels over the MPI bootstrap, which moves host tensors.
        let sent = Tensor::from_slice(&bytes);
        // host: as above, once at start-up.
        let got = Vec::<u8>::try_from(&bootstrap.broadcast(&sent, 0)?)?;
        if got.len() != id.internal.len() {
            return Err(CommError::Nccl(format!("unique id of {} bytes", got.len())));
        }
        for (dst, src) in id.internal.iter_mut().zip(got) {
            *dst = src as c_char;
        }
        let (rank, size) = (bootstrap.rank(), bootstrap.size());
        let (nranks, r) = (c_int::try_from(size), c_int::try_from(rank));
        let (Ok(nranks), Ok(r)) = (nranks, r) else {
            return Err(invalid("NcclComm::new", format!("rank {rank} of {size}")));
        };
        let mut comm: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` is writable; `id` is the same on every rank (broadcast above); the
        // current device was set for this thread.
        check(lib, "ncclCommInitRank", unsafe {
            (lib.comm_init_rank)(&mut comm, nranks, id, r)
        })?;
        Self::watched(lib, comm, rank, size, device, timeout)
    }

    /// Wraps a live `comm` and starts its watchdog (aborting `comm` if that fails).
    fn watched(
        lib: &'static NcclLib,
        comm: ncclComm_t,
        rank: usize,
        size: usize,
        device: c_int,
        timeout: Duration,
    ) -> Result<Self> {
        let handle = Arc::new(Handle {
            lib,
            comm,
            device,
            state: AtomicU8::new(LIVE),
            calls: Mutex::new(()),
        });
        let limits = Limits::for_timeout(timeout);
        let watchdog = match Watchdog::spawn(handle.clone(), "nccl", rank, size, limits) {
            Ok(w) => w,
            Err(e) => {
                handle.abort();
                return Err(CommError::Nccl(format!(
                    "cannot start the watchdog thread: {e}"
                )));
            }
        };
        Ok(Self {
            handle,
            watchdog,
            rank,
            size,
            device,
            timeout,
        })
    }

    fn check_tensor(&self, op: &'static str, t: &Tensor) -> Result<Tensor> {
        if t.device() != Device::Cuda(self.device as usize) {
            return Err(invalid(
                op,
                format!(
                    "tensor on {:?}, communicator on cuda:{}",
                    t.device(),
                    self.device
                ),
            ));
        }
        Ok(t.f_detach()?.f_contiguous()?)
    }

    fn stream(&self) -> Result<cudaStream_t> {
        current_stream(self.device)
    }

    /// The watchdog's failure, if the communicator failed.
    fn failed(&self) -> Result<()> {
        self.watchdog.check().map_err(CommError::Watchdog)
    }

    /// Starts call `op` into NCCL: refused once the communicator failed or was aborted. The
    /// watchdog times the call itself until the returned [`HostCall`] is dropped.
    fn enter(&self, op: &'static str) -> Result<(HostCall, MutexGuard<'_, ()>, ncclComm_t)> {
        self.failed()?;
        let done = Arc::new(AtomicBool::new(false));
        self.watchdog
            .watch(op, Instant::now(), Work::Host(done.clone()));
        let host = HostCall(done);
        let guard = self.handle.calls.lock().map_err(|_| CommError::Poisoned)?;
        if self.handle.state.load(Ordering::Acquire) != LIVE {
            self.failed()?;
            return Err(CommError::Nccl(format!(
                "the communicator of rank {} of {} was aborted",
                self.rank, self.size
            )));
        }
        Ok((host, guard, self.handle.comm))
    }

    /// After collective `op` was enqueued (at `started`): hands its completion event to the
    /// watchdog.
    fn watch(&self, op: &'static str, started: Instant) -> Result<()> {
        let mut err = [0u8; 1024];
        // SAFETY: the shim writes at most `err.len()` bytes and catches all C++ exceptions.
        let ev =
            unsafe { moe_shim_cuda_event_record(self.device, err.as_mut_ptr().cast(), err.len()) };
        if ev.is_null() {
            return Err(CommError::Nccl(format!(
                "{op}: cannot record its completion event: {}",
                crate::shim_message(&err)
            )));
        }
        self.watchdog.watch(op, started, Work::Device(Event(ev)));
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Never blocks: a graceful destroy waits for the communicator's work, so it is used
        // only when the watchdog saw all of it complete and nothing fail; otherwise abort.
        if self.watchdog.stop() {
            self.handle.destroy();
        } else {
            self.handle.abort();
        }
    }
}

fn nccl_type(op: &'static str, kind: Kind) -> Result<ncclDataType_t> {
    Ok(match kind {
        Kind::Float => ncclDataType_t::ncclFloat32,
        Kind::Double => ncclDataType_t::ncclFloat64,
        Kind::Half => ncclDataType_t::ncclFloat16,
        Kind::BFloat16 => ncclDataType_t::ncclBfloat16,
        Kind::Int64 => ncclDataType_t::ncclInt64,
        Kind::Int => ncclDataType_t::ncclInt32,
        Kind::Uint8 | Kind::Bool => ncclDataType_t::ncclUint8,
        Kind::Int8 => ncclDataType_t::ncclInt8,
        k => return Err(invalid(op, format!("no NCCL type for {k:?}"))),
    })
}

fn nbytes(t: &Tensor) -> usize {
    t.numel() * t.kind().elt_size_in_bytes()
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn device(&self) -> Device {
        Device::Cuda(self.device as usize)
    }

    fn all_to_all(&mut self, input: &Tensor, send: &[i64], recv: &[i64]) -> Result<Tensor> {
        const OP: &str = "all_to_all";
        let shape = input.size();
        let (_, recv_total) = check_all_to_all(OP, &shape, send, recv, self.size)?;
        let x = self.check_tensor(OP, input)?;
        let row_bytes = shape[1..].iter().product::<i64>() as usize * x.kind().elt_size_in_bytes();
        let mut out_shape = shape.clone();
        out_shape[0] = recv_total;
        let out = Tensor::f_empty(&out_shape, (x.kind(), x.device()))?;
        let stream = self.stream()?;
        let (sbase, rbase) = (x.data_ptr() as *const u8, out.data_ptr() as *mut u8);
        let lib = self.handle.lib;
        let started = Instant::now();
        {
            let (_host, _calls, comm) = self.enter(OP)?;
            // SAFETY: ncclGroupStart takes no arguments; the group is closed below on every
            // path.
            check(lib, "ncclGroupStart", unsafe { (lib.group_start)() })?;
            let (mut soff, mut roff) = (0usize, 0usize);
            let mut rc = 0;
            for p in 0..self.size {
                let (sn, rn) = (send[p] as usize * row_bytes, recv[p] as usize * row_bytes);
                let peer = p as c_int;
                let u8t = ncclDataType_t::ncclUint8;
                // SAFETY: offsets stay within the contiguous device buffers of `x` and `out`
                // (sum(send) and sum(recv) rows of `row_bytes`); both tensors outlive the
                // enqueued operations: later work on this stream is ordered after them and
                // torch's caching allocator reuses freed memory only in stream order.
                unsafe {
                    if rc == 0 && sn > 0 {
                        rc = (lib.send)(sbase.add(soff).cast(), sn, u8t, peer, comm, stream);
                    }
                    if rc == 0 && rn > 0 {
                        rc = (lib.recv)(rbase.add(roff).cast(), rn, u8t, peer, comm, stream);
                    }
                }
                soff += sn;
                roff += rn;
            }
            // SAFETY: closes the group opened above, also after a failed send/recv.
            let end = check(lib, "ncclGroupEnd", unsafe { (lib.group_end)() });
            check(lib, "ncclSend/ncclRecv", rc)?;
            end?;
        }
        self.watch(OP, started)?;
        Ok(out)
    }

    fn all_reduce_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_reduce_sum";
        let x = self.check_tensor(OP, input)?;
        let dtype = nccl_type(OP, x.kind())?;
        let out = x.f_empty_like()?;
        let stream = self.stream()?;
        let started = Instant::now();
        {
            let (_host, _calls, comm) = self.enter(OP)?;
            // SAFETY: both buffers are contiguous device memory of `numel` elements of
            // `dtype`; `comm` is live while `_calls` is held.
            let rc = unsafe {
                (self.handle.lib.all_reduce)(
                    x.data_ptr(),
                    out.data_ptr(),
                    x.numel(),
                    dtype,
                    ncclRedOp_t::ncclSum,
                    comm,
                    stream,
                )
            };
            check(self.handle.lib, "ncclAllReduce", rc)?;
        }
        self.watch(OP, started)?;
        Ok(out)
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Tensor> {
        const OP: &str = "all_gather";
        let x = self.check_tensor(OP, input)?;
        let mut shape = vec![self.size as i64];
        shape.extend(x.size());
        let out = Tensor::f_empty(&shape, (x.kind(), x.device()))?;
        let stream = self.stream()?;
        let started = Instant::now();
        {
            let (_host, _calls, comm) = self.enter(OP)?;
            // SAFETY: `out` holds size x nbytes(x) contiguous bytes; `x` holds nbytes(x).
            let rc = unsafe {
                (self.handle.lib.all_gather)(
                    x.data_ptr(),
                    out.data_ptr(),
                    nbytes(&x),
                    ncclDataType_t::ncclUint8,
                    comm,
                    stream,
                )
            };
            check(self.handle.lib, "ncclAllGather", rc)?;
        }
        self.watch(OP, started)?;
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
        let x = self.check_tensor(OP, input)?;
        let out = x.f_empty_like()?;
        let stream = self.stream()?;
        let started = Instant::now();
        {
            let (_host, _calls, comm) = self.enter(OP)?;
            // SAFETY: `x` and `out` are contiguous device buffers of nbytes(x) bytes.
            let rc = unsafe {
                (self.handle.lib.broadcast)(
                    x.data_ptr(),
                    out.data_ptr(),
                    nbytes(&x),
                    ncclDataType_t::ncclUint8,
                    root as c_int,
                    comm,
                    stream,
                )
            };
            check(self.handle.lib, "ncclBroadcast", rc)?;
        }
        self.watch(OP, started)?;
        Ok(out)
    }

    fn barrier(&mut self) -> Result<()> {
        let one = Tensor::f_ones([1], (Kind::Float, Device::Cuda(self.device as usize)))?;
        // Copying the result to the host waits for the stream, hence for every rank; a stuck
        // peer is ended by the watchdog's abort, whose failure is reported here.
        // host: a barrier waits for every rank by design.
        let host = self.all_reduce_sum(&one)?.f_to(Device::Cpu);
        self.failed()?;
        let _host = host?;
        Ok(())
    }

    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        const OP: &str = "split";
        let c = c_int::try_from(color).map_err(|_| invalid("split", format!("color {color}")))?;
        let k = c_int::try_from(key).map_err(|_| invalid("split", format!("key {key}")))?;
        let lib = self.handle.lib;
        let mut sub: ncclComm_t = std::ptr::null_mut();
        set_device(self.device)?;
        {
            let (_host, _calls, comm) = self.enter(OP)?;
            // SAFETY: `comm` is live, `sub` is writable, a null config asks for the parent's
            // configuration.
            let rc = unsafe { (lib.comm_split)(comm, c, k, &mut sub, std::ptr::null_mut()) };
            check(lib, "ncclCommSplit", rc)?;
        }
        // NCCL orders the new group by (key, parent rank) like MPI_Comm_split; ask it for
        // the resulting rank and size rather than recomputing them.
        let sizes = nccl_count(lib, sub).and_then(|n| Ok((n, nccl_user_rank(lib, sub)?)));
        let (size, rank) = match sizes {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: `sub` is live and not shared with anyone yet.
                let _ = unsafe { (lib.comm_abort)(sub) };
                return Err(e);
            }
        };
        let comm = NcclComm::watched(lib, sub, rank, size, self.device, self.timeout)?;
        Ok(Box::new(comm))
    }
}

fn nccl_count(lib: &NcclLib, comm: ncclComm_t) -> Result<usize> {
    type F = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
    let f: F = lookup(lib, b"ncclCommCount\0")?;
    let mut n: c_int = 0;
    // SAFETY: `comm` is live and `n` writable.
    check(lib, "ncclCommCount", unsafe { f(comm, &mut n) })?;
    Ok(n.max(0) as usize)
}

fn nccl_user_rank(lib: &NcclLib, comm: ncclComm_t) -> Result<usize> {
    type F = unsafe extern "C" fn(ncclComm_t, *mut c_int) -> c_int;
    let f: F = lookup(lib, b"ncclCommUserRank\0")?;
    let mut r: c_int = 0;
    // SAFETY: `comm` is live and `r` writable.
    check(lib, "ncclCommUserRank", unsafe { f(comm, &mut r) })?;
    Ok(r.max(0) as usize)
}

fn lookup<F: Copy>(lib: &NcclLib, sym: &[u8]) -> Result<F> {
    // SAFETY: callers read each symbol as its nccl.h signature.
    unsafe { lib._lib.get::<F>(sym) }
        .map(|s| *s)
        .map_err(|e| CommError::Nccl(format!("{} lacks a symbol: {e}", lib.name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without libnccl the probe must fail with a clear Unavailable error
    /// naming the library, not panic.
    #[test]
    fn probe_reports_missing_nccl() {
        match library() {
            Ok(lib) => println!("skipped: {} is loadable on this machine", lib.name),
            Err(CommError::Unavailable { backend, reason }) => {
                assert_eq!(backend, "nccl");
                assert!(reason.contains("libnccl.so.2"), "{reason}");
                assert!(matches!(probe(), Err(CommError::Unavailable { .. })));
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
}
