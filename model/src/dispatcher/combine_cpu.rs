//! The weighted combine on the CPU: a torch autograd function in C++ (csrc/combine.cpp) that
//! runs forward and backward in one pass over the `[M, d]` rows each, in place of the tensor
//! ops of [`super::permute::unpermute`] (five or six passes). The forward is bit-identical to
//! those ops, and so is the rows' gradient; the weights' gradient sums its f32 dot products in
//! another order.

use crate::{ModelError, Result};
use std::ffi::{c_char, c_int};
use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

extern "C" {
    fn moe_shim_weighted_combine(
        out_md: *const C_tensor,
        p_m: *const C_tensor,
        token_m: *const C_tensor,
        n: i64,
        y_out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Whether [`weighted_combine`] runs for these rows and weights (f32, 2-D rows, on the CPU).
pub(crate) fn handles(y_md: &Tensor, probs_m: &Tensor) -> bool {
    // host: the kernel runs only for host tensors (other devices take the tensor ops).
    y_md.device() == Device::Cpu
        && y_md.kind() == Kind::Float
        && y_md.dim() == 2
        && probs_m.kind() == Kind::Float
}

/// `y_nd[n] = sum_{m : token_m[m] = n} probs_m[m] * y_md[m]`, differentiable wrt `y_md` and
/// `probs_m`.
///
/// # Shapes
/// `y_md` f32 `[M, d]`, `probs_m` f32 `[M]`, `token_m` i64 `[M]` (each in `0..n`) ->
/// f32 `[n, d]`.
pub(crate) fn weighted_combine(
    y_md: &Tensor,
    probs_m: &Tensor,
    token_m: &Tensor,
    n: i64,
) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0u8; 1024];
    // SAFETY: the three tensors are live for the call; `out` and `err` are writable and
    // `err.len()` bounds the message.
    let rc = unsafe {
        moe_shim_weighted_combine(
            y_md.as_ptr(),
            probs_m.as_ptr(),
            token_m.as_ptr(),
            n,
            &mut out,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        let msg = moe_comm::shim_message(&err);
        return Err(ModelError::Invalid(msg));
    }
    // SAFETY: on success the shim stored a new heap `at::Tensor` that we now own.
    Ok(unsafe { Tensor::from_ptr(out) })
}
