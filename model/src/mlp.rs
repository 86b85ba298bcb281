//! Dense SwiGLU MLP (Shazeer 2020, "GLU Variants Improve Transformer"; the FFN of LLaMA):
//! `(silu(x W_gate) * (x W_up)) W_down`. Used for dense FFN blocks and for shared experts.
//!
//! Shared experts: `S` shared experts of hidden width `h` applied to every token and summed
//! are exactly one SwiGLU of width `S * h` (concatenate the gate/up columns and the down
//! rows). DeepSeek-MoE and Megatron-Core (`SharedExpertMLP`, `moe_shared_expert_intermediate_size`)
//! implement them that way, and so does [`crate::moe_layer::MoeLayer`].

use crate::{ParamBuilder, Result};
use tch::Tensor;

/// A dense SwiGLU MLP.
#[derive(Debug)]
pub struct SwiGlu {
    /// Gate projection `[d, h]`.
    pub w_gate_dh: Tensor,
    /// Up projection `[d, h]`.
    pub w_up_dh: Tensor,
    /// Down projection `[h, d]`.
    pub w_down_hd: Tensor,
}

impl SwiGlu {
    /// Dense decayed parameters `<vb>.w_gate`, `<vb>.w_up`, `<vb>.w_down`; `w_down` uses the
    /// residual-projection std `init_std / sqrt(2 * num_layers)` (GPT-2).
    pub fn new(vb: &ParamBuilder, d: i64, h: i64, init_std: f64, num_layers: i64) -> Result<Self> {
        let std_out = init_std / ((2 * num_layers.max(1)) as f64).sqrt();
        Ok(Self {
            w_gate_dh: vb.normal("w_gate", &[d, h], init_std)?,
            w_up_dh: vb.normal("w_up", &[d, h], init_std)?,
            w_down_hd: vb.normal("w_down", &[h, d], std_out)?,
        })
    }

    /// Runs in the dtype of `x` (weights are cast to it).
    ///
    /// # Shapes
    /// `x_nd [..., d]` -> `[..., d]`
    pub fn forward(&self, x_nd: &Tensor) -> Result<Tensor> {
        let kind = x_nd.kind();
        let gate = x_nd.f_matmul(&self.w_gate_dh.f_to_kind(kind)?)?.f_silu()?;
        let up = x_nd.f_matmul(&self.w_up_dh.f_to_kind(kind)?)?;
        Ok(gate
            .f_mul(&up)?
            .f_matmul(&self.w_down_hd.f_to_kind(kind)?)?)
    }
}
