//! Named parameters and how they are sharded.

use tch::Tensor;

/// How a parameter is laid out across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// Replicated on every rank; gradients averaged over the world.
    Dense,
    /// Routed-expert weights stacked `[num_local, ...]` on dim 0; local expert `i` is global
    /// expert `first_global + i`. Gradients are summed over the expert-data-parallel group.
    Expert { first_global: i64, num_local: i64 },
}

/// One trainable tensor. `tensor` is a shallow clone sharing storage with the module's.
#[derive(Debug)]
pub struct Param {
    /// Dotted name, e.g. `layers.3.moe.experts.w_gate` (stable: checkpoints use it).
    pub name: String,
    pub tensor: Tensor,
    pub kind: ParamKind,
    /// AdamW decay applies (false for norms, biases and embeddings).
    pub weight_decay: bool,
}

impl Param {
    /// A copy whose tensor shares storage with this one's.
    pub fn shallow_clone(&self) -> Self {
        Self {
            name: self.name.clone(),
            tensor: self.tensor.shallow_clone(),
            kind: self.kind,
            weight_decay: self.weight_decay,
        }
    }
}
