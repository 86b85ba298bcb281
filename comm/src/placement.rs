//! Where a rank computes, in one place: its device and the floating kind of its activations.
//!
//! Every tensor a rank creates on a hot path takes its device from a [`Placement`] (host
//! values go up through [`Placement::upload`], pinned and non-blocking on CUDA), and every
//! device-to-host read on a hot path goes through [`host_read`], which counts it. A GPU run
//! fails the moment a CPU tensor reaches NCCL; a CPU test suite cannot see that by running,
//! so the discipline is enforced three ways:
//! - [`strict`] mode (`MOE_STRICT=1`, set by `make test`): the communicators of every backend,
//!   the token dispatcher and the experts check that what they are handed is on the rank's
//!   device and of the expected kind, as NCCL would (see [`check_device`], [`check_kind`]);
//! - the trainer checks at start-up that every communicator moves tensors of the rank's device;
//! - a source test (`tests/tests/device_discipline.rs`) rejects host-tensor constructors and
//!   host reads in hot-path files unless a line says why (`// host:`).

use crate::{CommError, Result};
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use tch::{Device, Kind, Tensor};

/// The device and compute kind of one rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    /// Where the rank's tensors live.
    pub device: Device,
    /// The kind of activations and of the expert GEMMs (`Float` or `BFloat16`); parameters,
    /// the router and the losses stay f32.
    pub compute_kind: Kind,
}

impl Placement {
    /// A placement on `device` computing in `compute_kind`.
    pub fn new(device: Device, compute_kind: Kind) -> Self {
        Self {
            device,
            compute_kind,
        }
    }

    /// f32 on the CPU (tests, tools).
    pub fn cpu() -> Self {
        Self::new(Device::Cpu, Kind::Float)
    }

    /// Host values as a 1-d tensor on the rank's device: copied into pinned memory and sent
    /// without blocking the host on CUDA (the copy is ordered on the current stream).
    pub fn upload<T: tch::kind::Element>(&self, values: &[T]) -> Result<Tensor> {
        self.to_device(&Tensor::f_from_slice(values)?)
    }

    /// A host tensor (e.g. a data batch) moved to the rank's device: pinned and non-blocking
    /// on CUDA, unchanged on the CPU.
    pub fn to_device(&self, host: &Tensor) -> Result<Tensor> {
        if host.device() == self.device {
            return Ok(host.shallow_clone());
        }
        if self.device.is_cuda() && host.device() == Device::Cpu {
            let pinned = pin_memory(host)?;
            return Ok(pinned.f_to_device_(self.device, host.kind(), true, false)?);
        }
        Ok(host.f_to_device(self.device)?)
    }

    /// In strict mode, errors unless `t` is on this placement's device.
    pub fn check(&self, op: &'static str, what: &str, t: &Tensor) -> Result<()> {
        check_device(op, what, t, self.device)
    }

    /// In strict mode, errors unless `t` is on this placement's device and of `kind`.
    pub fn check_of(&self, op: &'static str, what: &str, t: &Tensor, kind: Kind) -> Result<()> {
        check_device(op, what, t, self.device)?;
        check_kind(op, what, t, kind)
    }
}

/// 0: not decided yet (read `MOE_STRICT` on first use), 1: off, 2: on.
static STRICT: AtomicU8 = AtomicU8::new(0);

extern "C" {
    fn moe_shim_pin_memory(
        t: *const torch_sys::C_tensor,
        out: *mut *mut torch_sys::C_tensor,
        err: *mut std::ffi::c_char,
        err_len: usize,
    ) -> std::ffi::c_int;
}

/// A page-locked copy of host tensor `t` (`t` itself when it already is one), for a
/// non-blocking copy to a GPU. Through the shim: tch's `pin_memory(device)` passes a device,
/// which torch deprecates with a warning on every call.
pub fn pin_memory(t: &Tensor) -> Result<Tensor> {
    let mut out: *mut torch_sys::C_tensor = std::ptr::null_mut();
    let mut err = [0u8; 1024];
    // SAFETY: `t` is live for the call; on success the shim stores a new heap tensor in `out`,
    // owned by us from here on; it writes at most `err.len()` bytes, NUL-terminated.
    let rc =
        unsafe { moe_shim_pin_memory(t.as_ptr(), &mut out, err.as_mut_ptr().cast(), err.len()) };
    if rc != 0 || out.is_null() {
        let msg = crate::shim_message(&err);
        return Err(CommError::Device {
            op: "pin_memory",
            msg,
        });
    }
    // SAFETY: a new heap at::Tensor from the shim, owned from here on.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Strict device and kind checking: on when `MOE_STRICT=1` (`make test` sets it) or after
/// [`set_strict`]`(true)`.
pub fn strict() -> bool {
    match STRICT.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var("MOE_STRICT")
                .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
                .unwrap_or(false);
            STRICT.store(if on { 2 } else { 1 }, Ordering::Relaxed);
            on
        }
        s => s == 2,
    }
}

/// Turns strict mode on or off for the whole process (tests that must run strict whatever
/// the environment).
pub fn set_strict(on: bool) {
    STRICT.store(if on { 2 } else { 1 }, Ordering::Relaxed);
}

/// In strict mode, errors unless `t` is on `device`: what NCCL does on a GPU, done by every
/// backend so that a CPU run fails where a GPU run would.
pub fn check_device(op: &'static str, what: &str, t: &Tensor, device: Device) -> Result<()> {
    if strict() && t.device() != device {
        return Err(CommError::Device {
            op,
            msg: format!("{what} is on {:?}, expected {device:?}", t.device()),
        });
    }
    Ok(())
}

/// In strict mode, errors unless `t` is of `kind`.
pub fn check_kind(op: &'static str, what: &str, t: &Tensor, kind: Kind) -> Result<()> {
    if strict() && t.kind() != kind {
        return Err(CommError::Device {
            op,
            msg: format!("{what} is {:?}, expected {kind:?}", t.kind()),
        });
    }
    Ok(())
}

thread_local! {
    static HOST_READS: Cell<u64> = const { Cell::new(0) };
}

/// Reads a small device tensor to the host as a flat vector, counting the read: each one
/// waits for the device to drain its queue. Per thread, so in-process ranks count their own.
pub fn host_read<T: tch::kind::Element + Copy>(t: &Tensor) -> Result<Vec<T>> {
    HOST_READS.with(|c| c.set(c.get() + 1));
    Ok(Vec::<T>::try_from(
        &t.f_to_device(Device::Cpu)?.f_reshape([-1])?,
    )?)
}

/// Device-to-host reads made through [`host_read`] on this thread so far.
pub fn host_reads() -> u64 {
    HOST_READS.with(Cell::get)
}
