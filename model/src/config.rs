//! The `model` and `moe` sections of an experiment config.
//!
//! Every field has a default, so a config names only what it changes. The doc comment of
//! each field is its entry in README's config reference.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Transformer shape (`model:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// Attention kind and its shape (`model.attention.*`).
    pub attention: AttentionConfig,
    /// Multi-token prediction depth (DeepSeek-V3 section 2.2): 0 for none, or 1 for one extra
    /// block `layers.{num_layers}` predicting the token after next from the last hidden
    /// state and the next token's embedding (weighted by `trainer.mtp_loss_weight`).
    pub mtp_depth: i64,
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
            attention: AttentionConfig::default(),
            mtp_depth: 0,
            qkv_bias: false,
            qk_norm: false,
        }
    }
}

/// Which attention the blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttentionKind {
    /// Multi-head attention with grouped key/value heads and RoPE (Llama, Mixtral).
    Mha,
    /// Multi-head latent attention (DeepSeek-V2/V3): low-rank queries, a compressed KV latent
    /// and a decoupled RoPE key shared by all heads.
    Mla,
    /// Qwen3-Next's hybrid: gated DeltaNet linear attention, with gated full attention (output
    /// gate, per-head q/k norm, partial RoPE) every `full_attention_interval`-th block.
    GatedDeltanet,
}

/// Attention kind and shape (`model.attention:` section). The `mha` kind reads the head
/// counts and `head_dim` of `model`; the other keys are MLA's (DeepSeek-V2 section 2.1,
/// DeepSeek-V3's `config.json` names in parentheses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AttentionConfig {
    /// `mha` (default) or `mla`.
    pub kind: AttentionKind,
    /// MLA: rank of the query compression (`q_lora_rank`); `null` projects queries directly.
    pub q_lora_rank: Option<i64>,
    /// MLA: width of the compressed key/value latent (`kv_lora_rank`), RMS-normalised.
    pub kv_lora_rank: i64,
    /// MLA: per-head query/key channels without position information (`qk_nope_head_dim`).
    pub qk_nope_head_dim: i64,
    /// MLA: per-head query channels with RoPE; the RoPE key of this width is shared by all
    /// heads (`qk_rope_head_dim`, even).
    pub qk_rope_head_dim: i64,
    /// MLA: per-head value width (`v_head_dim`).
    pub v_head_dim: i64,
    /// MLA: softmax scale; `null` is `1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)`.
    /// DeepSeek-V3's YaRN-extended checkpoints multiply it by `mscale^2`.
    pub softmax_scale: Option<f64>,
    /// gated_deltanet: block i uses gated full attention when `(i + 1) %
    /// full_attention_interval == 0`, gated DeltaNet otherwise (Qwen3-Next: 4).
    pub full_attention_interval: i64,
    /// gated_deltanet: channels of each full-attention head that RoPE rotates (partial RoPE,
    /// even); `null` rotates all `head_dim` (Qwen3-Next: 64 of 256).
    pub rotary_dim: Option<i64>,
    /// gated_deltanet: query/key heads of the linear attention (`linear_num_key_heads`).
    pub linear_num_key_heads: i64,
    /// gated_deltanet: value heads (`linear_num_value_heads`), a multiple of the key heads.
    pub linear_num_value_heads: i64,
    /// gated_deltanet: query/key head width (`linear_key_head_dim`).
    pub linear_key_head_dim: i64,
    /// gated_deltanet: value head width (`linear_value_head_dim`).
    pub linear_value_head_dim: i64,
    /// gated_deltanet: width of the short causal depthwise convolution on q, k, v
    /// (`linear_conv_kernel_dim`).
    pub linear_conv_kernel: i64,
    /// gated_deltanet: tokens per chunk of the chunk-wise delta rule (a speed knob: the result
    /// does not depend on it).
    pub linear_chunk_size: i64,
}

impl Default for AttentionConfig {
    fn default() -> Self {
        Self {
            kind: AttentionKind::Mha,
            q_lora_rank: None,
            kv_lora_rank: 64,
            qk_nope_head_dim: 32,
            qk_rope_head_dim: 16,
            v_head_dim: 32,
            softmax_scale: None,
            full_attention_interval: 4,
            rotary_dim: None,
            linear_num_key_heads: 2,
            linear_num_value_heads: 4,
            linear_key_head_dim: 16,
            linear_value_head_dim: 16,
            linear_conv_kernel: 4,
            linear_chunk_size: 64,
        }
    }
}

impl AttentionConfig {
    /// MLA's query/key head width `qk_nope_head_dim + qk_rope_head_dim`.
    pub fn qk_head_dim(&self) -> i64 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether block `layer` uses (gated) full attention under `gated_deltanet`.
    pub fn is_full_attention(&self, layer: i64) -> bool {
        self.full_attention_interval > 0 && (layer + 1) % self.full_attention_interval == 0
    }

    /// Rules of the gated DeltaNet keys; `head_dim` is the full-attention head width.
    fn validate_deltanet(&self, head_dim: i64) -> Vec<String> {
        let mut errs = Vec::new();
        for (key, v) in [
            (
                "model.attention.full_attention_interval",
                self.full_attention_interval,
            ),
            (
                "model.attention.linear_num_key_heads",
                self.linear_num_key_heads,
            ),
            (
                "model.attention.linear_num_value_heads",
                self.linear_num_value_heads,
            ),
            (
                "model.attention.linear_key_head_dim",
                self.linear_key_head_dim,
            ),
            (
                "model.attention.linear_value_head_dim",
                self.linear_value_head_dim,
            ),
            (
                "model.attention.linear_conv_kernel",
                self.linear_conv_kernel,
            ),
            ("model.attention.linear_chunk_size", self.linear_chunk_size),
        ] {
            if v <= 0 {
                errs.push(format!("{key} ({v}) must be positive"));
            }
        }
        if self.linear_num_key_heads > 0
            && self.linear_num_value_heads % self.linear_num_key_heads != 0
        {
            errs.push(format!(
                "model.attention.linear_num_key_heads ({}) must divide model.attention.linear_num_value_heads ({})",
                self.linear_num_key_heads, self.linear_num_value_heads
            ));
        }
        if let Some(r) = self.rotary_dim {
            if r <= 0 || r % 2 != 0 || r > head_dim {
                errs.push(format!(
                    "model.attention.rotary_dim ({r}) must be even and in 2..=head_dim ({head_dim})"
                ));
            }
        }
        errs
    }

    /// Rules of the MLA and gated DeltaNet keys (none apply to `mha`).
    fn validate(&self, head_dim: i64) -> Vec<String> {
        let mut errs = Vec::new();
        if self.kind == AttentionKind::GatedDeltanet {
            return self.validate_deltanet(head_dim);
        }
        if self.kind != AttentionKind::Mla {
            return errs;
        }
        for (key, v) in [
            ("model.attention.kv_lora_rank", self.kv_lora_rank),
            ("model.attention.qk_nope_head_dim", self.qk_nope_head_dim),
            ("model.attention.qk_rope_head_dim", self.qk_rope_head_dim),
            ("model.attention.v_head_dim", self.v_head_dim),
        ] {
            if v <= 0 {
                errs.push(format!("{key} ({v}) must be positive"));
            }
        }
        if let Some(r) = self.q_lora_rank {
            if r <= 0 {
                errs.push(format!(
                    "model.attention.q_lora_rank ({r}) must be positive, or null"
                ));
            }
        }
        if self.qk_rope_head_dim > 0 && self.qk_rope_head_dim % 2 != 0 {
            errs.push(format!(
                "model.attention.qk_rope_head_dim ({}) must be even (RoPE rotates pairs)",
                self.qk_rope_head_dim
            ));
        }
        if let Some(s) = self.softmax_scale {
            if s <= 0.0 || !s.is_finite() {
                errs.push(format!(
                    "model.attention.softmax_scale ({s}) must be positive, or null"
                ));
            }
        }
        errs
    }
}

impl ModelConfig {
    /// Channels RoPE rotates per head: `head_dim` for `mha`, `qk_rope_head_dim` for `mla`,
    /// `rotary_dim` (default `head_dim`) for the full attention of `gated_deltanet`.
    pub fn rope_dim(&self) -> i64 {
        match self.attention.kind {
            AttentionKind::Mha => self.head_dim(),
            AttentionKind::Mla => self.attention.qk_rope_head_dim,
            AttentionKind::GatedDeltanet => self.attention.rotary_dim.unwrap_or(self.head_dim()),
        }
    }

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ScoreFunction {
    /// Softmax over experts (Mixtral, Switch, Qwen-MoE, DBRX).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// Which auxiliary load-balancing loss the router adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Keep the assignments with the highest routing weights.
    Probs,
    /// Keep the earliest tokens (lowest token index).
    Position,
}

/// Implementation of the routed experts' SwiGLU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExpertImpl {
    /// One `_grouped_mm` per projection over all local experts.
    Grouped,
    /// A loop of matmuls over contiguous row blocks; the reference implementation.
    Sequential,
}

/// Mixture-of-Experts FFN (`moe:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
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
    /// Renormalise the k selected weights to sum to 1 (pre-softmax and sigmoid routing;
    /// post-softmax weights always sum to 1). `null` follows Megatron-Core: sigmoid routing
    /// renormalises whenever `top_k > 1`, pre-softmax routing never; `true` or `false` forces
    /// the choice (HF DeepSeek-V3 and Qwen configs name it `norm_topk_prob`).
    pub norm_topk_prob: Option<bool>,
    /// Multiplies the routing weights (DeepSeek-V3's `routed_scaling_factor`).
    pub route_scale: f64,
    /// Group-limited routing (Megatron-Core `moe_router_num_groups`; DeepSeek-V3's `n_group`):
    /// the E experts form this many equal groups of consecutive ids; `null` (with
    /// `group_topk: null`) routes over all experts. With `num_groups = ep_size` a token's rows
    /// reach at most `group_topk` ranks.
    pub num_groups: Option<i64>,
    /// Groups each token may use (Megatron-Core `moe_router_group_topk`; DeepSeek-V3's
    /// `topk_group`): the groups with the largest sum of their top `top_k / group_topk`
    /// selection scores (biased, as the selection); the top-k experts are then chosen
    /// within them. Set together with `num_groups`.
    pub group_topk: Option<i64>,
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
            norm_topk_prob: None,
            route_scale: 1.0,
            num_groups: None,
            group_topk: None,
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
    /// Whether the config has MoE FFNs at all: more than one routed expert or any shared
    /// expert. A single routed expert without shared experts is the dense baseline, whatever
    /// `moe_every` says.
    pub fn has_moe(&self) -> bool {
        self.num_experts > 1 || self.num_shared_experts > 0
    }

    /// Whether block `layer` (0-based) has an MoE FFN: one after `first_dense_layers` on the
    /// `moe_every` grid, in a config that [`MoeConfig::has_moe`]. The one statement of this
    /// rule: the model, the parameter count, `moe bench` and the HF mappings all ask here.
    pub fn is_moe_layer(&self, layer: i64) -> bool {
        self.has_moe()
            && layer >= self.first_dense_layers
            && self.moe_every > 0
            && (layer - self.first_dense_layers) % self.moe_every == 0
    }

    /// Whether the k selected weights are renormalised to sum to 1 before `route_scale`:
    /// [`MoeConfig::norm_topk_prob`] if set, else Megatron-Core's rule (sigmoid routing with
    /// `top_k > 1`). Post-softmax weights sum to 1 by construction and ignore it.
    pub fn renormalises_topk(&self) -> bool {
        self.norm_topk_prob
            .unwrap_or(self.score_function == ScoreFunction::Sigmoid && self.top_k > 1)
    }

    /// `(num_groups, group_topk)` when group-limited routing is on.
    pub fn group_limit(&self) -> Option<(i64, i64)> {
        self.num_groups.zip(self.group_topk)
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
        errs.extend(model.attention.validate(model.head_dim()));
        if model.attention.kind != AttentionKind::Mha {
            for (key, on) in [
                ("model.qkv_bias", model.qkv_bias),
                ("model.qk_norm", model.qk_norm),
            ] {
                if on {
                    errs.push(format!(
                        "{key} (true) applies to model.attention.kind mha, not {:?}, whose \
                         projections and norms are its own",
                        model.attention.kind
                    ));
                }
            }
        }
        if !(0..=1).contains(&model.mtp_depth) {
            errs.push(format!(
                "model.mtp_depth ({}) must be 0 or 1 (one prediction module is supported)",
                model.mtp_depth
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
        if moe.shared_expert_gate && moe.num_shared_experts <= 0 {
            errs.push(format!(
                "moe.shared_expert_gate (true) needs shared experts, but moe.num_shared_experts is {}",
                moe.num_shared_experts
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
        errs.extend(Self::validate_groups(moe));
        if moe.route_scale <= 0.0 || !moe.route_scale.is_finite() {
            errs.push(format!(
                "moe.route_scale ({}) must be positive",
                moe.route_scale
            ));
        }
        errs
    }

    /// Rules of group-limited routing (`moe.num_groups`, `moe.group_topk`).
    pub(crate) fn validate_groups(moe: &MoeConfig) -> Vec<String> {
        let mut errs = Vec::new();
        let (g, gk) = match (moe.num_groups, moe.group_topk) {
            (None, None) => return errs,
            (Some(g), Some(gk)) => (g, gk),
            (g, gk) => {
                let show = |v: Option<i64>| v.map_or("null".to_string(), |v| v.to_string());
                errs.push(format!(
                    "moe.num_groups ({}) and moe.group_topk ({}) go together: set both or neither",
                    show(g),
                    show(gk)
                ));
                return errs;
            }
        };
        if g <= 0 {
            errs.push(format!("moe.num_groups ({g}) must be positive"));
            return errs;
        }
        if moe.num_experts > 0 && moe.num_experts % g != 0 {
            errs.push(format!(
                "moe.num_experts ({}) must be divisible by moe.num_groups ({g})",
                moe.num_experts
            ));
        }
        if gk < 1 || gk > g {
            errs.push(format!(
                "moe.group_topk ({gk}) must be in 1..=moe.num_groups ({g})"
            ));
        } else if gk > moe.top_k {
            errs.push(format!(
                "moe.group_topk ({gk}) must be <= moe.top_k ({}): each group is scored by its \
                 top top_k / group_topk experts",
                moe.top_k
            ));
        } else if moe.num_experts > 0 && moe.num_experts % g == 0 {
            let reachable = gk * (moe.num_experts / g);
            if moe.top_k > reachable {
                errs.push(format!(
                    "moe.top_k ({}) must be <= moe.group_topk * moe.num_experts / moe.num_groups \
                     ({reachable}): the chosen groups hold too few experts",
                    moe.top_k
                ));
            }
        }
        errs
    }
}
