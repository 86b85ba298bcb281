//! Aux-loss-free load balancing (DeepSeek-V3, Wang et al. 2024, "Auxiliary-Loss-Free Load
//! Balancing Strategy for Mixture-of-Experts").

use crate::Result;
use tch::Tensor;

/// Updates the selection bias in place: `bias_e += rate * sign(mean(load) - load_e)`.
///
/// Underloaded experts become more attractive, overloaded ones less; an expert exactly at the
/// mean is left alone. Runs under `no_grad`, so the bias may be a tensor that requires grad.
///
/// # Shapes
/// `bias_e`, `load_e` `[E]` (`load_e` is converted to the bias's kind and device).
pub fn update_expert_bias(bias_e: &Tensor, load_e: &Tensor, rate: f64) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    let load_e = load_e
        .f_to_device(bias_e.device())?
        .f_to_kind(bias_e.kind())?;
    let step_e = load_e
        .f_mean(bias_e.kind())?
        .f_sub(&load_e)?
        .f_sign()?
        .f_mul_scalar(rate)?;
    // `f_add_` mutates through the shared storage; tch only needs `&mut` for its handle.
    let mut bias_e = bias_e.shallow_clone();
    let _ = bias_e.f_add_(&step_e)?;
    Ok(())
}
