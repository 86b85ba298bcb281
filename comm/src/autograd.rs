//! The differentiable all-to-all (GShard / Megatron-Core's `_AllToAll`): forward sends row
//! blocks with `send_splits`/`recv_splits`, backward sends the output gradient back with
//! the splits swapped, since the all-to-all is a permutation of rows across ranks and the
//! adjoint of a permutation is its inverse.
//!
//! tch has no custom autograd functions, so a small C++ shim (csrc/autograd_shim.cpp)
//! defines a `torch::autograd::Function` whose forward and backward call [`callback`]
//! here with an opaque pointer to [`State`] (the communicator and the splits). The shim
//! keeps the state in the autograd node, so it lives as long as the graph that may still
//! run the backward, and calls [`drop_state`] when the node is freed. Errors travel as a
//! return code and message: the shim raises them as a `c10::Error`, which `f_backward`
//! returns as `Err`. Panics are caught before they reach the FFI boundary.

use crate::{lock, CommError, Result, SharedComm};
use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use tch::Tensor;
use torch_sys::C_tensor;

/// What the autograd node remembers for its backward.
struct State {
    comm: SharedComm,
    send_splits: Vec<i64>,
    recv_splits: Vec<i64>,
}

type Callback = unsafe extern "C" fn(
    *mut c_void,
    c_int,
    *mut C_tensor,
    *mut C_tensor,
    *mut c_char,
    usize,
) -> c_int;
type DropFn = unsafe extern "C" fn(*mut c_void);

extern "C" {
    fn moe_shim_all_to_all(
        x: *const C_tensor,
        state: *mut c_void,
        callback: Callback,
        drop: DropFn,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn moe_shim_tensor_assign(dst: *mut C_tensor, src: *const C_tensor);
    fn moe_shim_backward_with(
        t: *const C_tensor,
        grad: *const C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// Backpropagates from `t` with the incoming gradient `grad` of `t`'s shape (PyTorch's
/// `t.backward(grad)`): the gradient of `sum(t * grad)` without computing that product.
pub fn backward_with(t: &Tensor, grad: &Tensor) -> Result<()> {
    let mut err = [0u8; 4096];
    // SAFETY: both tensors are live for the call; `err` is writable for `err.len()` bytes.
    let rc = unsafe {
        moe_shim_backward_with(
            t.as_ptr(),
            grad.as_ptr(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 {
        let msg = crate::shim_message(&err);
        return Err(CommError::InvalidArgument {
            op: "autograd::backward_with",
            msg,
        });
    }
    Ok(())
}

/// Differentiable all-to-all over `comm`: like [`crate::Communicator::all_to_all`], and
/// the gradient of the result flows back to `x` through the reverse all-to-all.
///
/// Every rank of the group must call it (and later run the backward) in the same order.
///
/// # Shapes
/// x `[sum(send_splits), ...]` -> `[sum(recv_splits), ...]`
pub fn all_to_all(
    comm: &SharedComm,
    x: &Tensor,
    send_splits: Vec<i64>,
    recv_splits: Vec<i64>,
) -> Result<Tensor> {
    let state = Box::new(State {
        comm: comm.clone(),
        send_splits,
        recv_splits,
    });
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0u8; 4096];
    // SAFETY: `x` is a live tensor for the duration of the call; the shim takes ownership
    // of the boxed state (and frees it through `drop_state` exactly once, on every path);
    // `out` and `err` are writable and `err.len()` bounds the message.
    let rc = unsafe {
        moe_shim_all_to_all(
            x.as_ptr(),
            Box::into_raw(state).cast(),
            callback,
            drop_state,
            &mut out,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc != 0 || out.is_null() {
        let msg = crate::shim_message(&err);
        return Err(CommError::InvalidArgument {
            op: "autograd::all_to_all",
            msg,
        });
    }
    // SAFETY: on success the shim stored a new heap `at::Tensor` that we now own; tch frees
    // it when the returned Tensor is dropped.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Called by the shim for the forward (`direction == 0`) and the backward (`1`).
///
/// # Safety
/// `state` is the pointer handed to `moe_shim_all_to_all` (not yet dropped); `input` is a
/// heap tensor whose ownership passes to us; `out` points to a live tensor; `err` has room
/// for `err_len` bytes.
unsafe extern "C" fn callback(
    state: *mut c_void,
    direction: c_int,
    input: *mut C_tensor,
    out: *mut C_tensor,
    err: *mut c_char,
    err_len: usize,
) -> c_int {
    // SAFETY: see the function's contract: we own `input` from here on.
    let input = unsafe { Tensor::from_ptr(input) };
    // SAFETY: the state is alive while its autograd node is, which is calling us; only
    // shared access is needed.
    let state = unsafe { &*(state as *const State) };
    let result = catch_unwind(AssertUnwindSafe(|| -> Result<Tensor> {
        let (send, recv) = if direction == 0 {
            (&state.send_splits, &state.recv_splits)
        } else {
            (&state.recv_splits, &state.send_splits)
        };
        let mut comm = lock(&state.comm)?;
        comm.all_to_all(&input, send, recv)
    }));
    let msg = match result {
        Ok(Ok(y)) => {
            // SAFETY: `out` is the shim's live result slot, `y` a live tensor; the assign
            // shares y's storage, so dropping `y` afterwards is fine.
            unsafe { moe_shim_tensor_assign(out, y.as_ptr()) };
            return 0;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => "panic inside the communicator".to_string(),
    };
    if !err.is_null() && err_len > 0 {
        let n = msg.len().min(err_len - 1);
        // SAFETY: `err` has room for `err_len` bytes and we write n + 1 <= err_len.
        unsafe {
            std::ptr::copy_nonoverlapping(msg.as_ptr(), err.cast::<u8>(), n);
            *err.add(n) = 0;
        }
    }
    1
}

/// Frees the state when the autograd node (or the failed call) releases it.
///
/// # Safety
/// `state` came from `Box::into_raw` in [`all_to_all`] and is dropped exactly once.
unsafe extern "C" fn drop_state(state: *mut c_void) {
    // SAFETY: see the function's contract.
    let state = unsafe { Box::from_raw(state as *mut State) };
    // Dropping a SharedComm cannot panic in practice, but never unwind into C++.
    let _ = catch_unwind(AssertUnwindSafe(move || drop(state)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    #[test]
    fn backward_with_passes_the_incoming_gradient() {
        let x = Tensor::from_slice(&[1.0f64, -2.0, 3.0]).set_requires_grad(true);
        let g = Tensor::from_slice(&[0.5f64, 4.0, -1.0]);
        backward_with(&(&x * &x), &g).unwrap();
        // d/dx sum(x^2 * g) = 2 x g, exact in f64.
        let got = Vec::<f64>::try_from(&x.grad()).unwrap();
        assert_eq!(got, [1.0, -16.0, -6.0]);
        // A gradient of the wrong shape is an error, not a crash.
        let y = &x * 2.0;
        let err = backward_with(&y, &Tensor::ones([2], (Kind::Double, tch::Device::Cpu)));
        assert!(err.is_err());
    }
}
