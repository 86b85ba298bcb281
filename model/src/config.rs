//! The `model` and `moe` sections of an experiment config.
//!
//! Every field has a default, so a config names only what it changes. The doc comment of
//! each field is its entry in README's config reference.

use serde::{Deserialize, Serialize};

/// Transformer shape (`model:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Vocabulary size; the byte-level data sources use 256.
    pub vocab_size: i64,
    /// Residual stream width d.
    pub d_model: i64,
    /// Number of transformer blocks L.
    pub num_layers: i64,
    /// Attention (query) heads; must divide `d_model` unless `head_dim` is set.
    pub num_heads: i64,
    /// Key/value heads (grouped-query attention); must divide `num_heads`.
    pub num_kv_heads: i64,
    /// Per-head width; `null` means `d_model / num_heads`.
    pub head_dim: Option<i64>,
    /// Hidden width of the dense SwiGLU FFN (dense layers and the `num_experts: 1` baseline).
    pub ffn_hidden: i64,
    /// Longest sequence the RoPE tables cover; must be >= `data.seq_len`.
    pub max_seq_len: i64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Share the embedding matrix with the LM head.
    pub tie_embeddings: bool,
    /// Standard deviation of the normal init; residual output projections use
    /// `init_std / sqrt(2 * num_layers)` (GPT-2).
    pub init_std: f64,
    /// Learned biases on the query, key and value projections (Qwen2, Qwen2-MoE).
    pub qkv_bias: bool,
    /// Per-head RMSNorm of queries and keys before RoPE, one scale of `head_dim` each
    /// (Qwen3, Qwen3-MoE).
    pub qk_norm: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            vocab_size: 256,
            d_model: 128,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: None,
            ffn_hidden: 512,
            max_seq_len: 512,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            tie_embeddings: false,
            init_std: 0.02,
            qkv_bias: false,
            qk_norm: false,
        }
    }
}

impl ModelConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(if self.num_heads > 0 {
            self.d_model / self.num_heads
        } else {
            0
        })
    }
}

/// Score function of the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFunction {
    /// Softmax over experts (Mixtral, Switch, Qwen-MoE, DBRX).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// Which auxiliary load-balancing loss the router adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuxLossKind {
    /// Switch/GShard loss over all tokens of the global batch (Megatron-Core `aux_loss`).
    AuxLoss,
    /// The same loss per sequence, averaged over sequences (DeepSeek-V2/V3 `seq_aux_loss`).
    SeqAuxLoss,
    /// No load-balancing loss (e.g. with aux-loss-free bias balancing).
    None,
}

/// Which assignments an expert over capacity keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Keep the assignments with the highest routing weights.
    Probs,
    /// Keep the earliest tokens (lowest token index).
    Position,
}

/// Implementation of the routed experts' SwiGLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExpertImpl {
    /// One `_grouped_mm` per projection over all local experts.
    Grouped,
    /// A loop of matmuls over contiguous row blocks; the reference implementation.
    Sequential,
}

/// Mixture-of-Experts FFN (`moe:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// Routed experts E. `num_experts: 1, top_k: 1` with no shared experts is the dense baseline.
    pub num_experts: i64,
    /// Experts per token k.
    pub top_k: i64,
    /// Hidden width of each routed expert's SwiGLU (fine-grained experts use a small one).
    pub expert_hidden: i64,
    /// Shared experts applied to every token (DeepSeek, Qwen-MoE); 0 for none.
    pub num_shared_experts: i64,
    /// Hidden width of each shared expert; `null` means `expert_hidden`.
    pub shared_expert_hidden: Option<i64>,
    /// Scale the shared experts' output per token by `sigmoid(x . w)` with a learned `w [d]`
    /// (Qwen2-MoE's `shared_expert_gate`); needs shared experts.
    pub shared_expert_gate: bool,
    /// Dense blocks before the first MoE block (DeepSeek-V3 uses 3).
    pub first_dense_layers: i64,
    /// After `first_dense_layers`, every `moe_every`-th block is MoE (1 = all of them).
    pub moe_every: i64,
    /// Router score function: `softmax` or `sigmoid`.
    pub score_function: ScoreFunction,
    /// Softmax routing only: `true` takes a softmax over all E then the top-k (weights not
    /// renormalised unless `norm_topk_prob`); `false` takes the top-k logits then a softmax
    /// over those k.
    pub pre_softmax: bool,
    /// Renormalise the k selected weights to sum to 1 (pre-softmax and sigmoid routing).
    pub norm_topk_prob: bool,
    /// Multiplies the routing weights (DeepSeek-V3's `routed_scaling_factor`).
    pub route_scale: f64,
    /// Load-balancing loss: `aux_loss`, `seq_aux_loss` or `none`.
    pub aux_loss: AuxLossKind,
    /// Coefficient of the load-balancing loss; a balanced router's loss equals it.
    pub aux_loss_coeff: f64,
    /// Coefficient of the router z-loss (ST-MoE); 0 disables it.
    pub z_loss_coeff: f64,
    /// Expert capacity factor: each expert keeps at most `ceil(N*k/E * factor)` of a rank's
    /// N tokens' assignments. `null` is dropless.
    pub capacity_factor: Option<f64>,
    /// Which assignments survive when an expert is over capacity: `probs` or `position`.
    pub drop_policy: DropPolicy,
    /// Fill every expert to exactly its capacity with zero-weight rows (static shapes).
    pub pad_to_capacity: bool,
    /// Multiplicative jitter on the router input, uniform in `[1-eps, 1+eps]`, training only.
    pub jitter_eps: f64,
    /// Aux-loss-free balancing (DeepSeek-V3): per-expert selection bias updated each step by
    /// `rate * sign(mean_load - load_e)`; 0 disables it.
    pub bias_update_rate: f64,
    /// Routed expert implementation: `grouped` (fast) or `sequential` (reference).
    pub expert_impl: ExpertImpl,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            num_experts: 8,
            top_k: 2,
            expert_hidden: 256,
            num_shared_experts: 0,
            shared_expert_hidden: None,
            shared_expert_gate: false,
            first_dense_layers: 0,
            moe_every: 1,
            score_function: ScoreFunction::Softmax,
            pre_softmax: false,
            norm_topk_prob: false,
            route_scale: 1.0,
            aux_loss: AuxLossKind::AuxLoss,
            aux_loss_coeff: 0.01,
            z_loss_coeff: 0.001,
            capacity_factor: None,
            drop_policy: DropPolicy::Probs,
            pad_to_capacity: false,
            jitter_eps: 0.0,
            bias_update_rate: 0.0,
            expert_impl: ExpertImpl::Grouped,
        }
    }
}

impl MoeConfig {
    /// Whether block `layer` (0-based) has an MoE FFN.
    pub fn is_moe_layer(&self, layer: i64) -> bool {
        layer >= self.first_dense_layers
            && self.moe_every > 0
            && (layer - self.first_dense_layers) % self.moe_every == 0
    }

    /// Shared-expert hidden width.
    pub fn shared_hidden(&self) -> i64 {
        self.shared_expert_hidden.unwrap_or(self.expert_hidden)
    }

    /// Cross-field rules of the model and moe sections. Each violation is one message naming
    /// the dotted keys and their values; an empty list means valid.
    pub fn validate(model: &ModelConfig, moe: &MoeConfig) -> Vec<String> {
        let mut errs = Vec::new();
        let mut positive = |key: &str, v: i64| {
            if v <= 0 {
                errs.push(format!("{key} ({v}) must be positive"));
            }
        };
        positive("model.vocab_size", model.vocab_size);
        positive("model.d_model", model.d_model);
        positive("model.num_layers", model.num_layers);
        positive("model.num_heads", model.num_heads);
        positive("model.num_kv_heads", model.num_kv_heads);
        positive("model.ffn_hidden", model.ffn_hidden);
        positive("model.max_seq_len", model.max_seq_len);
        positive("moe.num_experts", moe.num_experts);
        positive("moe.top_k", moe.top_k);
        positive("moe.expert_hidden", moe.expert_hidden);
        positive("moe.moe_every", moe.moe_every);
        if model.head_dim.is_none() && model.num_heads > 0 && model.d_model % model.num_heads != 0 {
            errs.push(format!(
                "model.num_heads ({}) must divide model.d_model ({}) (or set model.head_dim)",
                model.num_heads, model.d_model
            ));
        }
        if let Some(h) = model.head_dim {
            if h <= 0 || h % 2 != 0 {
                errs.push(format!(
                    "model.head_dim ({h}) must be positive and even (RoPE rotates pairs)"
                ));
            }
        } else if model.num_heads > 0
            && model.d_model % model.num_heads == 0
            && model.head_dim() % 2 != 0
        {
            errs.push(format!(
                "model.d_model / model.num_heads ({}) must be even (RoPE rotates pairs)",
                model.head_dim()
            ));
        }
        if model.num_kv_heads > 0 && model.num_heads % model.num_kv_heads != 0 {
            errs.push(format!(
                "model.num_kv_heads ({}) must divide model.num_heads ({})",
                model.num_kv_heads, model.num_heads
            ));
        }
        if model.rope_theta <= 0.0 || !model.rope_theta.is_finite() {
            errs.push(format!(
                "model.rope_theta ({}) must be positive",
                model.rope_theta
            ));
        }
        if model.norm_eps.is_nan() || model.norm_eps <= 0.0 {
            errs.push(format!(
                "model.norm_eps ({}) must be positive",
                model.norm_eps
            ));
        }
        if model.init_std.is_nan() || model.init_std <= 0.0 {
            errs.push(format!(
                "model.init_std ({}) must be positive",
                model.init_std
            ));
        }
        if moe.top_k > moe.num_experts {
            errs.push(format!(
                "moe.top_k ({}) must be <= moe.num_experts ({})",
                moe.top_k, moe.num_experts
            ));
        }
        if moe.num_shared_experts < 0 {
            errs.push(format!(
                "moe.num_shared_experts ({}) must be >= 0",
                moe.num_shared_experts
            ));
        }
        if moe.shared_expert_gate && moe.num_shared_experts <= 0 {
            errs.push(format!(
                "moe.shared_expert_gate (true) gates shared experts, but moe.num_shared_experts is {}",
                moe.num_shared_experts
            ));
        }
        if moe.shared_hidden() <= 0 {
            errs.push(format!(
                "moe.shared_expert_hidden ({}) must be positive",
                moe.shared_hidden()
            ));
        }
        if moe.first_dense_layers < 0 || moe.first_dense_layers > model.num_layers {
            errs.push(format!(
                "moe.first_dense_layers ({}) must be in 0..=model.num_layers ({})",
                moe.first_dense_layers, model.num_layers
            ));
        }
        if moe.score_function == ScoreFunction::Sigmoid && moe.pre_softmax {
            errs.push("moe.pre_softmax (true) applies to softmax routing only, but moe.score_function is sigmoid".into());
        }
        if let Some(cf) = moe.capacity_factor {
            if cf <= 0.0 || !cf.is_finite() {
                errs.push(format!(
                    "moe.capacity_factor ({cf}) must be positive, or null for dropless"
                ));
            }
        } else if moe.pad_to_capacity {
            errs.push(
                "moe.pad_to_capacity (true) needs moe.capacity_factor, but it is null (dropless)"
                    .into(),
            );
        }
        for (key, v) in [
            ("moe.aux_loss_coeff", moe.aux_loss_coeff),
            ("moe.z_loss_coeff", moe.z_loss_coeff),
            ("moe.jitter_eps", moe.jitter_eps),
            ("moe.bias_update_rate", moe.bias_update_rate),
        ] {
            if v < 0.0 || !v.is_finite() {
                errs.push(format!("{key} ({v}) must be a finite number >= 0"));
            }
        }
        if moe.jitter_eps >= 1.0 {
            errs.push(format!("moe.jitter_eps ({}) must be < 1", moe.jitter_eps));
        }
        if moe.route_scale <= 0.0 || !moe.route_scale.is_finite() {
            errs.push(format!(
                "moe.route_scale ({}) must be positive",
                moe.route_scale
            ));
        }
        errs
    }
}
