//! An optional observer of the forward pass, for statistics that are not the model's own
//! (calibration before checkpoint surgery: routing, hidden-unit activations, Block
//! Influence). [`crate::transformer::TransformerLm::forward_observed`] calls it; the plain
//! `forward` passes none, so training pays one branch per block and nothing else.
//!
//! The observer sees tensors and read-only views of the layers, never mutates the model, and
//! recomputes whatever it needs (e.g. the router's decisions) from the layer's own weights.

use crate::mlp::SwiGlu;
use crate::moe_layer::MoeLayer;
use crate::Result;
use tch::Tensor;

/// The FFN of a block, as the observer sees it.
#[derive(Debug, Clone, Copy)]
pub enum FfnView<'a> {
    /// A dense SwiGLU.
    Dense(&'a SwiGlu),
    /// An MoE layer (router, routed experts, shared experts).
    Moe(&'a MoeLayer),
}

/// Receives the hidden states of one forward, block by block.
pub trait ForwardObserver {
    /// Block `layer`'s FFN input (after `ffn_norm`, in the compute kind) and the FFN.
    ///
    /// # Shapes
    /// `h_btd [b, t, d]`
    fn ffn(&mut self, layer: i64, h_btd: &Tensor, ffn: FfnView<'_>) -> Result<()>;

    /// Block `layer`'s input and output on the residual stream.
    ///
    /// # Shapes
    /// `x_in_btd [b, t, d]`, `x_out_btd [b, t, d]`
    fn block(&mut self, layer: i64, x_in_btd: &Tensor, x_out_btd: &Tensor) -> Result<()>;
}
