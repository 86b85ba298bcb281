//! One table per Hugging Face architecture: tensor names, config keys, and the values each
//! side must have for the two models to compute the same function. Export reads every table
//! forwards and import backwards; nothing is written twice.
//!
//! The on-disk layouts are what `transformers` 5.24 writes with `save_pretrained` and reads
//! with `from_pretrained` (it fuses experts in memory, `conversion_mapping.py`, but converts
//! back when saving): one tensor per expert, `nn.Linear` weights `[out, in]`.

use super::names::NameRule;

/// A supported architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `MixtralForCausalLM` (Jiang et al. 2024).
    Mixtral,
    /// `Qwen2MoeForCausalLM`: q/k/v biases, one gated shared expert.
    Qwen2Moe,
    /// `Qwen3MoeForCausalLM`: per-head q/k RMSNorm.
    Qwen3Moe,
}

impl Arch {
    /// Every architecture, in the order inference tries them.
    pub const ALL: &'static [Arch] = &[Arch::Mixtral, Arch::Qwen2Moe, Arch::Qwen3Moe];

    /// The `--arch` / `model_type` name.
    pub fn name(self) -> &'static str {
        self.spec().model_type
    }

    /// Parses a `--arch` / `model_type` name.
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|a| a.name() == s)
    }

    /// The architecture's tables.
    pub fn spec(self) -> &'static ArchSpec {
        match self {
            Arch::Mixtral => &MIXTRAL,
            Arch::Qwen2Moe => &QWEN2_MOE,
            Arch::Qwen3Moe => &QWEN3_MOE,
        }
    }
}

/// How a config value changes between the two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv {
    /// The same JSON value.
    Same,
    /// HF's load-balancing loss has no `1/k` (DESIGN.md, step 2), so HF's coefficient is ours
    /// divided by `top_k` for the same loss.
    PerTopK,
}

/// A config key present on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigRule {
    /// Our dotted key, e.g. `model.d_model`.
    pub ours: &'static str,
    /// The `config.json` key (dotted for nested objects), e.g. `rope_parameters.rope_theta`.
    pub hf: &'static str,
    /// An older `config.json` key read when `hf` is absent ("" for none).
    pub legacy: &'static str,
    pub conv: Conv,
}

/// A value one side always has for the other's math to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixed {
    /// Dotted key.
    pub key: &'static str,
    /// The value, as JSON.
    pub json: &'static str,
    /// Why it must have this value (printed when it does not).
    pub why: &'static str,
}

/// How routing weights are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingRule {
    /// Softmax over all experts, top-k, renormalised to sum 1 (Mixtral): our post-softmax
    /// routing, or pre-softmax with `norm_topk_prob`.
    Renormalized,
    /// Softmax over all experts, top-k, renormalised only if the `config.json` key
    /// `norm_topk_prob` says so (Qwen-MoE): `true` is ours post-softmax, `false` ours
    /// `pre_softmax: true` without `norm_topk_prob`.
    NormTopkKey,
}

/// Which blocks are MoE blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRule {
    /// Every block (our `first_dense_layers: 0`, `moe_every: 1`, fixed in `ours_fixed`).
    AllMoe,
    /// Blocks not in `mlp_only_layers` and with `(i + 1) % decoder_sparse_step == 0`; the
    /// dense ones are SwiGLUs of `intermediate_size` (Qwen-MoE). Export lists our dense
    /// blocks in `mlp_only_layers` with `decoder_sparse_step: 1`.
    MlpOnlyLayers,
}

/// Shared experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedRule {
    /// None (`moe.num_shared_experts: 0`, fixed in `ours_fixed`).
    None,
    /// Exactly one shared SwiGLU of width `shared_expert_intermediate_size` behind a sigmoid
    /// gate (Qwen2-MoE); our `S` shared experts of width `h` are one of width `S * h`.
    OneGated,
}

/// Everything that ties one HF architecture to our model.
#[derive(Debug)]
pub struct ArchSpec {
    /// `config.json` `model_type`.
    pub model_type: &'static str,
    /// `config.json` `architectures[0]`.
    pub class: &'static str,
    pub names: &'static [NameRule],
    /// Config keys, in groups (shared groups first).
    pub config: &'static [&'static [ConfigRule]],
    /// HF keys written on export and checked on import (when present).
    pub hf_fixed: &'static [Fixed],
    /// Our keys: export refuses other values, import sets these.
    pub ours_fixed: &'static [Fixed],
    pub routing: RoutingRule,
    pub layers: LayerRule,
    pub shared: SharedRule,
}

const fn rule(ours: &'static str, hf: &'static str, transpose: bool) -> NameRule {
    NameRule {
        ours,
        hf,
        transpose,
    }
}

const fn key(ours: &'static str, hf: &'static str) -> ConfigRule {
    ConfigRule {
        ours,
        hf,
        legacy: "",
        conv: Conv::Same,
    }
}

const fn fixed(key: &'static str, json: &'static str, why: &'static str) -> Fixed {
    Fixed { key, json, why }
}

/// Config keys every supported architecture shares.
const COMMON: &[ConfigRule] = &[
    key("model.vocab_size", "vocab_size"),
    key("model.d_model", "hidden_size"),
    key("model.num_layers", "num_hidden_layers"),
    key("model.num_heads", "num_attention_heads"),
    key("model.num_kv_heads", "num_key_value_heads"),
    key("model.head_dim", "head_dim"),
    key("model.max_seq_len", "max_position_embeddings"),
    ConfigRule {
        ours: "model.rope_theta",
        hf: "rope_parameters.rope_theta",
        legacy: "rope_theta",
        conv: Conv::Same,
    },
    key("model.norm_eps", "rms_norm_eps"),
    key("model.tie_embeddings", "tie_word_embeddings"),
    key("model.init_std", "initializer_range"),
    key("moe.top_k", "num_experts_per_tok"),
    ConfigRule {
        ours: "moe.aux_loss_coeff",
        hf: "router_aux_loss_coef",
        legacy: "",
        conv: Conv::PerTopK,
    },
];

const SOFTMAX: Fixed = fixed(
    "moe.score_function",
    "\"softmax\"",
    "the router applies a softmax over the experts",
);
const NO_BIAS: Fixed = fixed(
    "moe.bias_update_rate",
    "0.0",
    "the router has no expert-selection bias (aux-loss-free balancing)",
);
const NO_SCALE: Fixed = fixed("moe.route_scale", "1.0", "routing weights are not scaled");
const MHA: Fixed = fixed(
    "model.attention.kind",
    "\"mha\"",
    "its attention is multi-head attention with grouped key/value heads",
);
const NO_MTP: Fixed = fixed(
    "model.mtp_depth",
    "0",
    "it has no multi-token prediction module",
);
const NO_GROUPS: Fixed = fixed(
    "moe.num_groups",
    "null",
    "its router has no group-limited top-k",
);

static MIXTRAL: ArchSpec = ArchSpec {
    model_type: "mixtral",
    class: "MixtralForCausalLM",
    names: &[
        rule("embed.weight", "model.embed_tokens.weight", false),
        rule("norm.weight", "model.norm.weight", false),
        rule("lm_head.weight", "lm_head.weight", false),
        rule(
            "layers.{L}.attn_norm.weight",
            "model.layers.{L}.input_layernorm.weight",
            false,
        ),
        rule(
            "layers.{L}.ffn_norm.weight",
            "model.layers.{L}.post_attention_layernorm.weight",
            false,
        ),
        rule(
            "layers.{L}.attn.wq",
            "model.layers.{L}.self_attn.q_proj.weight",
            true,
        ),
        rule(
            "layers.{L}.attn.wk",
            "model.layers.{L}.self_attn.k_proj.weight",
            true,
        ),
        rule(
            "layers.{L}.attn.wv",
            "model.layers.{L}.self_attn.v_proj.weight",
            true,
        ),
        rule(
            "layers.{L}.attn.wo",
            "model.layers.{L}.self_attn.o_proj.weight",
            true,
        ),
        rule(
            "layers.{L}.moe.w_router",
            "model.layers.{L}.block_sparse_moe.gate.weight",
            true,
        ),
        rule(
            "layers.{L}.moe.experts.{E}.w_gate",
            "model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight",
            true,
        ),
        rule(
            "layers.{L}.moe.experts.{E}.w_down",
            "model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight",
            true,
        ),
        rule(
            "layers.{L}.moe.experts.{E}.w_up",
            "model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight",
            true,
        ),
    ],
    config: &[
        COMMON,
        &[
            key("moe.num_experts", "num_local_experts"),
            key("moe.expert_hidden", "intermediate_size"),
        ],
    ],
    hf_fixed: &[
        fixed("hidden_act", "\"silu\"", "our experts are SwiGLU"),
        fixed(
            "rope_parameters.rope_type",
            "\"default\"",
            "our RoPE has no scaling",
        ),
        fixed("sliding_window", "null", "our attention is full causal"),
        fixed("attention_dropout", "0.0", "our attention has no dropout"),
        fixed(
            "router_jitter_noise",
            "0.0",
            "Mixtral's jitter also scales the experts' input, ours only the router's",
        ),
    ],
    ours_fixed: &[
        SOFTMAX,
        NO_BIAS,
        NO_SCALE,
        MHA,
        NO_MTP,
        NO_GROUPS,
        fixed(
            "moe.first_dense_layers",
            "0",
            "every Mixtral block is an MoE block",
        ),
        fixed("moe.moe_every", "1", "every Mixtral block is an MoE block"),
        fixed(
            "moe.num_shared_experts",
            "0",
            "Mixtral has no shared experts",
        ),
        NO_QKV_BIAS,
        NO_QK_NORM,
    ],
    routing: RoutingRule::Renormalized,
    layers: LayerRule::AllMoe,
    shared: SharedRule::None,
};

const NO_QKV_BIAS: Fixed = fixed(
    "model.qkv_bias",
    "false",
    "its q/k/v projections have no bias",
);
const NO_QK_NORM: Fixed = fixed("model.qk_norm", "false", "it has no per-head q/k norm");

/// Tensor names Qwen2-MoE and Qwen3-MoE share.
macro_rules! qwen_names {
    ($($extra:expr),* $(,)?) => {
        &[
            rule("embed.weight", "model.embed_tokens.weight", false),
            rule("norm.weight", "model.norm.weight", false),
            rule("lm_head.weight", "lm_head.weight", false),
            rule("layers.{L}.attn_norm.weight", "model.layers.{L}.input_layernorm.weight", false),
            rule("layers.{L}.ffn_norm.weight", "model.layers.{L}.post_attention_layernorm.weight", false),
            rule("layers.{L}.attn.wq", "model.layers.{L}.self_attn.q_proj.weight", true),
            rule("layers.{L}.attn.wk", "model.layers.{L}.self_attn.k_proj.weight", true),
            rule("layers.{L}.attn.wv", "model.layers.{L}.self_attn.v_proj.weight", true),
            rule("layers.{L}.attn.wo", "model.layers.{L}.self_attn.o_proj.weight", true),
            rule("layers.{L}.moe.w_router", "model.layers.{L}.mlp.gate.weight", true),
            rule("layers.{L}.moe.experts.{E}.w_gate", "model.layers.{L}.mlp.experts.{E}.gate_proj.weight", true),
            rule("layers.{L}.moe.experts.{E}.w_up", "model.layers.{L}.mlp.experts.{E}.up_proj.weight", true),
            rule("layers.{L}.moe.experts.{E}.w_down", "model.layers.{L}.mlp.experts.{E}.down_proj.weight", true),
            rule("layers.{L}.ffn.w_gate", "model.layers.{L}.mlp.gate_proj.weight", true),
            rule("layers.{L}.ffn.w_up", "model.layers.{L}.mlp.up_proj.weight", true),
            rule("layers.{L}.ffn.w_down", "model.layers.{L}.mlp.down_proj.weight", true),
            $($extra),*
        ]
    };
}

/// `config.json` values Qwen2-MoE and Qwen3-MoE share.
const QWEN_HF_FIXED: &[Fixed] = &[
    fixed("hidden_act", "\"silu\"", "our experts are SwiGLU"),
    fixed(
        "rope_parameters.rope_type",
        "\"default\"",
        "our RoPE has no scaling",
    ),
    fixed(
        "use_sliding_window",
        "false",
        "our attention is full causal",
    ),
    fixed("attention_dropout", "0.0", "our attention has no dropout"),
];

static QWEN2_MOE: ArchSpec = ArchSpec {
    model_type: "qwen2_moe",
    class: "Qwen2MoeForCausalLM",
    names: qwen_names![
        rule(
            "layers.{L}.attn.bq",
            "model.layers.{L}.self_attn.q_proj.bias",
            false
        ),
        rule(
            "layers.{L}.attn.bk",
            "model.layers.{L}.self_attn.k_proj.bias",
            false
        ),
        rule(
            "layers.{L}.attn.bv",
            "model.layers.{L}.self_attn.v_proj.bias",
            false
        ),
        rule(
            "layers.{L}.moe.shared.w_gate",
            "model.layers.{L}.mlp.shared_expert.gate_proj.weight",
            true
        ),
        rule(
            "layers.{L}.moe.shared.w_up",
            "model.layers.{L}.mlp.shared_expert.up_proj.weight",
            true
        ),
        rule(
            "layers.{L}.moe.shared.w_down",
            "model.layers.{L}.mlp.shared_expert.down_proj.weight",
            true
        ),
        rule(
            "layers.{L}.moe.shared.out_gate",
            "model.layers.{L}.mlp.shared_expert_gate.weight",
            true
        ),
    ],
    config: &[
        COMMON,
        &[
            key("moe.num_experts", "num_experts"),
            key("moe.expert_hidden", "moe_intermediate_size"),
            key("model.ffn_hidden", "intermediate_size"),
            key("model.qkv_bias", "qkv_bias"),
        ],
    ],
    hf_fixed: QWEN_HF_FIXED,
    ours_fixed: &[
        SOFTMAX,
        NO_BIAS,
        NO_SCALE,
        MHA,
        NO_MTP,
        NO_GROUPS,
        NO_QK_NORM,
        fixed(
            "moe.shared_expert_gate",
            "true",
            "its shared expert's output is scaled by a sigmoid gate",
        ),
    ],
    routing: RoutingRule::NormTopkKey,
    layers: LayerRule::MlpOnlyLayers,
    shared: SharedRule::OneGated,
};

static QWEN3_MOE: ArchSpec = ArchSpec {
    model_type: "qwen3_moe",
    class: "Qwen3MoeForCausalLM",
    names: qwen_names![
        rule(
            "layers.{L}.attn.q_norm.weight",
            "model.layers.{L}.self_attn.q_norm.weight",
            false
        ),
        rule(
            "layers.{L}.attn.k_norm.weight",
            "model.layers.{L}.self_attn.k_norm.weight",
            false
        ),
    ],
    config: &[
        COMMON,
        &[
            ConfigRule {
                ours: "moe.num_experts",
                hf: "num_local_experts",
                legacy: "num_experts",
                conv: Conv::Same,
            },
            key("moe.expert_hidden", "moe_intermediate_size"),
            key("model.ffn_hidden", "intermediate_size"),
        ],
    ],
    hf_fixed: &[
        QWEN_HF_FIXED[0],
        QWEN_HF_FIXED[1],
        QWEN_HF_FIXED[2],
        QWEN_HF_FIXED[3],
        fixed("attention_bias", "false", "our projections have no bias"),
    ],
    ours_fixed: &[
        SOFTMAX,
        NO_BIAS,
        NO_SCALE,
        MHA,
        NO_MTP,
        NO_GROUPS,
        NO_QKV_BIAS,
        fixed("model.qk_norm", "true", "it normalises every q/k head"),
        fixed(
            "moe.num_shared_experts",
            "0",
            "Qwen3-MoE has no shared experts",
        ),
    ],
    routing: RoutingRule::NormTopkKey,
    layers: LayerRule::MlpOnlyLayers,
    shared: SharedRule::None,
};
