//! torch's multi-tensor kernels the optimizer and clipping use, through a small C++ shim
//! (csrc/fused_optim.cpp), because tch does not bind `_fused_adamw_` or the `_foreach_` ops.
//! One kernel launch per list instead of about ten tensor ops per parameter, each a full pass
//! over memory (`torch.optim.AdamW(fused=True)` and `clip_grad_norm_(foreach=True)`).

use crate::{Result, TrainError};
use std::ffi::{c_char, c_int};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn moe_shim_fused_adamw(
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        exp_avgs: *const *mut C_tensor,
        exp_avg_sqs: *const *mut C_tensor,
        step: *const C_tensor,
        grad_scale: *const C_tensor,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn moe_shim_foreach_sq_norm(
        ts: *const *mut C_tensor,
        n: usize,
        out: *mut *mut C_tensor,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn moe_shim_set_grads_to_none(
        ts: *const *mut C_tensor,
        n: usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn moe_shim_foreach_mul_scalar_(
        ts: *const *mut C_tensor,
        n: usize,
        c: f64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

fn ptrs(ts: &[&Tensor]) -> Vec<*mut C_tensor> {
    ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
}

fn check(what: &str, rc: c_int, err: &[u8]) -> Result<()> {
    if rc == 0 {
        return Ok(());
    }
    Err(TrainError::Other(format!(
        "{what}: {}",
        moe_comm::shim_message(err)
    )))
}

/// Hyper-parameters of one fused AdamW update.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
    pub eps: f64,
}

/// `torch._fused_adamw_`: updates `params` and their moments in place from `grads`. All
/// tensors float32 on one device; `step` a float32 scalar there holding the step count
/// (already incremented), shared by every parameter. `grad_scale` (a float32 scalar there)
/// divides every gradient inside the kernel, which leaves the divided values in `grads`.
pub fn fused_adamw(
    params: &[&Tensor],
    grads: &[&Tensor],
    exp_avgs: &[&Tensor],
    exp_avg_sqs: &[&Tensor],
    step: &Tensor,
    grad_scale: Option<&Tensor>,
    h: AdamWStep,
) -> Result<()> {
    let n = params.len();
    if grads.len() != n || exp_avgs.len() != n || exp_avg_sqs.len() != n {
        return Err(TrainError::Other(format!(
            "fused AdamW: {n} parameters, {} gradients, {} and {} moments",
            grads.len(),
            exp_avgs.len(),
            exp_avg_sqs.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let (p, g, m, v) = (ptrs(params), ptrs(grads), ptrs(exp_avgs), ptrs(exp_avg_sqs));
    let mut err = [0u8; 1024];
    // SAFETY: the four arrays hold `n` pointers to live tensors (borrowed for the call), `step`
    // and `grad_scale` (or null) are live, and the shim writes at most `err.len()` bytes,
    // NUL-terminated, catching every C++ exception.
    let rc = unsafe {
        moe_shim_fused_adamw(
            p.as_ptr(),
            g.as_ptr(),
            m.as_ptr(),
            v.as_ptr(),
            step.as_ptr(),
            grad_scale.map_or(std::ptr::null(), Tensor::as_ptr),
            n,
            h.lr,
            h.beta1,
            h.beta2,
            h.weight_decay,
            h.eps,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    check("fused AdamW", rc, &err)
}

/// `sum_i ||t_i||^2` as a float64 scalar on the tensors' device (one `_foreach_norm`); zero
/// for an empty list is the caller's business.
pub fn foreach_sq_norm(ts: &[&Tensor]) -> Result<Tensor> {
    let p = ptrs(ts);
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let mut err = [0u8; 1024];
    // SAFETY: `p` holds `ts.len()` live tensor pointers; on success the shim stores a new heap
    // tensor in `out`, whose ownership passes to us.
    let rc = unsafe {
        moe_shim_foreach_sq_norm(
            p.as_ptr(),
            p.len(),
            &mut out,
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    check("foreach norm", rc, &err)?;
    if out.is_null() {
        return Err(TrainError::Other("foreach norm returned no tensor".into()));
    }
    // SAFETY: a new heap at::Tensor from the shim, owned from here on.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// `t.grad = None` for every tensor (the next backward writes its gradient afresh).
pub fn set_grads_to_none(ts: &[&Tensor]) -> Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let p = ptrs(ts);
    let mut err = [0u8; 1024];
    // SAFETY: `p` holds `ts.len()` live tensor pointers; the shim only resets their gradients.
    let rc = unsafe {
        moe_shim_set_grads_to_none(p.as_ptr(), p.len(), err.as_mut_ptr().cast(), err.len())
    };
    check("set gradients to none", rc, &err)
}

/// `t_i *= c` in place for every tensor (one `_foreach_mul_`).
pub fn foreach_mul_(ts: &[&Tensor], c: f64) -> Result<()> {
    if ts.is_empty() {
        return Ok(());
    }
    let p = ptrs(ts);
    let mut err = [0u8; 1024];
    // SAFETY: `p` holds `ts.len()` live tensor pointers; the shim only scales them in place.
    let rc = unsafe {
        moe_shim_foreach_mul_scalar_(p.as_ptr(), p.len(), c, err.as_mut_ptr().cast(), err.len())
    };
    check("foreach mul", rc, &err)
}
