//! Analytic parameter counts of a [`TransformerLm`](crate::transformer::TransformerLm), from
//! the config alone (no tensor is allocated, so full-size configs are counted instantly).
//!
//! The counts follow the tensors `TransformerLm::new` creates, one component per kind of
//! tensor; a test in `launch/tests/tools_inspect.rs` checks them against `params()` of built
//! models. "Active per token" uses the convention of the Mixtral and DeepSeek papers: every
//! dense parameter (embedding and LM head included, although a token reads one embedding
//! row), the shared experts, and `top_k / num_experts` of the routed experts.

use crate::config::{AttentionKind, ModelConfig, MoeConfig};
use crate::{ModelError, Result};

/// How a component is laid out over an expert-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharding {
    /// Every rank holds all of it.
    Replicated,
    /// Routed experts: each of P ranks holds `num_experts / P` of them.
    Expert,
}

/// One kind of parameter, summed over the layers that have it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// Stable name: `embedding`, `attention`, `norms`, `router`, `routed_experts`,
    /// `shared_experts`, `dense_ffn`, `lm_head`, and with multi-token prediction `mtp` (its
    /// block without the routed experts, its norms and projection) and `mtp_routed_experts`.
    pub name: &'static str,
    /// Parameters in the whole model.
    pub params: u64,
    /// Parameters one token uses in a forward pass.
    pub active: u64,
    /// Replicated or expert-sharded.
    pub sharding: Sharding,
}

/// Parameter counts of a model, per component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamCount {
    /// In a fixed order (see [`Component::name`]); components a model lacks count 0.
    pub components: Vec<Component>,
    /// Blocks whose FFN is an MoE layer.
    pub moe_layers: u64,
    /// Blocks whose FFN is a dense SwiGLU.
    pub dense_layers: u64,
    /// Routed experts per MoE layer (E).
    pub num_experts: u64,
}

impl ParamCount {
    /// All parameters.
    pub fn total(&self) -> u64 {
        self.components.iter().map(|c| c.params).sum()
    }

    /// Parameters one token uses.
    pub fn active(&self) -> u64 {
        self.components.iter().map(|c| c.active).sum()
    }

    /// Parameters of the multi-token prediction module (0 without one).
    pub fn mtp(&self) -> u64 {
        self.components
            .iter()
            .filter(|c| c.name.starts_with("mtp"))
            .map(|c| c.params)
            .sum()
    }

    /// [`ParamCount::total`] without the multi-token prediction module (how DeepSeek-V3's
    /// 671B is counted).
    pub fn total_without_mtp(&self) -> u64 {
        self.total() - self.mtp()
    }

    /// [`ParamCount::active`] without the multi-token prediction module.
    pub fn active_without_mtp(&self) -> u64 {
        self.active()
            - self
                .components
                .iter()
                .filter(|c| c.name.starts_with("mtp"))
                .map(|c| c.active)
                .sum::<u64>()
    }

    /// Parameters every rank holds.
    pub fn replicated(&self) -> u64 {
        self.sum_where(Sharding::Replicated)
    }

    /// Routed-expert parameters of the whole model.
    pub fn expert(&self) -> u64 {
        self.sum_where(Sharding::Expert)
    }

    /// Expert parameters one rank holds at EP size `ep_size` (which must divide E).
    pub fn expert_per_rank(&self, ep_size: u64) -> u64 {
        if ep_size == 0 {
            return 0;
        }
        self.expert() / ep_size
    }

    /// The component called `name`.
    pub fn get(&self, name: &str) -> Option<&Component> {
        self.components.iter().find(|c| c.name == name)
    }

    fn sum_where(&self, s: Sharding) -> u64 {
        self.components
            .iter()
            .filter(|c| c.sharding == s)
            .map(|c| c.params)
            .sum()
    }
}

/// Parameters of one block's attention (validated config). MHA: wq `[d, q]`, wk and wv
/// `[d, kv]`, wo `[q, d]`. MLA: wq_a `[d, r_q]`, q_norm `[r_q]` and wq_b `[r_q, H*qk]` (or wq
/// `[d, H*qk]`), wkv_a `[d, r_kv + rope]`, kv_norm `[r_kv]`, wkv_b `[r_kv, H*(nope + v)]`,
/// wo `[H*v, d]`. Gated DeltaNet: wq, wk `[d, Hk*dk]`, wv, wz `[d, Hv*dv]`, wb, wa
/// `[d, Hv]`, conv `[2 Hk dk + Hv dv, 1, K]`, dt_bias and a_log `[Hv]`, norm `[dv]`, wo
/// `[Hv*dv, d]`; its full-attention blocks: MHA plus wgate `[d, q]` and q/k norms `[hd]`.
fn attention_per_layer(model: &ModelConfig, q: u64, kv: u64, layer: i64) -> u64 {
    let u = |v: i64| v as u64;
    let d = u(model.d_model);
    let a = &model.attention;
    match a.kind {
        // wq [d, H*hd], wk and wv [d, KV*hd], wo [H*hd, d]; with `qkv_bias` the biases bq
        // [H*hd], bk and bv [KV*hd]; with `qk_norm` one RMSNorm scale of hd for q and for k
        // (norms inside an attention count as attention, as for MLA and gated attention).
        AttentionKind::Mha => {
            let hd = u(model.head_dim());
            2 * d * q
                + 2 * d * kv
                + if model.qkv_bias { q + 2 * kv } else { 0 }
                + if model.qk_norm { 2 * hd } else { 0 }
        }
        AttentionKind::GatedDeltanet if a.is_full_attention(layer) => {
            3 * d * q + 2 * d * kv + 2 * u(model.head_dim())
        }
        AttentionKind::GatedDeltanet => {
            let (hk, hv) = (u(a.linear_num_key_heads), u(a.linear_num_value_heads));
            let (kd, vd) = (
                hk * u(a.linear_key_head_dim),
                hv * u(a.linear_value_head_dim),
            );
            d * (2 * kd + 2 * vd + 2 * hv)
                + (2 * kd + vd) * u(a.linear_conv_kernel)
                + 2 * hv
                + u(a.linear_value_head_dim)
                + vd * d
        }
        AttentionKind::Mla => {
            let h = u(model.num_heads);
            let qk = u(a.qk_head_dim());
            let query = match a.q_lora_rank {
                Some(r) => d * u(r) + u(r) + u(r) * h * qk,
                None => d * h * qk,
            };
            let r_kv = u(a.kv_lora_rank);
            query
                + d * (r_kv + u(a.qk_rope_head_dim))
                + r_kv
                + r_kv * h * u(a.qk_nope_head_dim + a.v_head_dim)
                + h * u(a.v_head_dim) * d
        }
    }
}

/// Counts the parameters `TransformerLm::new(model, moe, ..)` creates. Errors on a config
/// it would reject ([`MoeConfig::validate`]).
pub fn count_params(model: &ModelConfig, moe: &MoeConfig) -> Result<ParamCount> {
    let errs = MoeConfig::validate(model, moe);
    if !errs.is_empty() {
        return Err(ModelError::Invalid(errs.join("; ")));
    }
    // Validated: every size below is positive, so the casts are exact.
    let u = |v: i64| v as u64;
    let (v, d, l) = (u(model.vocab_size), u(model.d_model), u(model.num_layers));
    let (q, kv) = (
        u(model.num_heads * model.head_dim()),
        u(model.num_kv_heads * model.head_dim()),
    );
    let (e, k, h) = (u(moe.num_experts), u(moe.top_k), u(moe.expert_hidden));
    let shared_h = u(moe.num_shared_experts.max(0) * moe.shared_hidden());
    let moe_layers = (0..model.num_layers)
        .filter(|&i| moe.is_moe_layer(i))
        .count() as u64;
    let dense_layers = l - moe_layers;

    let swiglu = |hidden: u64| 3 * d * hidden;
    let both = |name, params, sharding| Component {
        name,
        params,
        active: params,
        sharding,
    };
    // The shared-expert gate `[d, 1]`.
    let shared_gate = if moe.shared_expert_gate { d } else { 0 };
    let embedding = v * d;
    let components = vec![
        both("embedding", embedding, Sharding::Replicated),
        both(
            "attention",
            (0..model.num_layers)
                .map(|i| attention_per_layer(model, q, kv, i))
                .sum(),
            Sharding::Replicated,
        ),
        // Two RMSNorm scales per block plus the final one.
        both("norms", (2 * l + 1) * d, Sharding::Replicated),
        both("router", moe_layers * d * e, Sharding::Replicated),
        Component {
            name: "routed_experts",
            params: moe_layers * e * swiglu(h),
            active: moe_layers * k * swiglu(h),
            sharding: Sharding::Expert,
        },
        both(
            "shared_experts",
            if shared_h > 0 {
                moe_layers * (swiglu(shared_h) + shared_gate)
            } else {
                0
            },
            Sharding::Replicated,
        ),
        both(
            "dense_ffn",
            dense_layers * swiglu(u(model.ffn_hidden)),
            Sharding::Replicated,
        ),
        both(
            "lm_head",
            if model.tie_embeddings { 0 } else { embedding },
            Sharding::Replicated,
        ),
    ];
    let mut components = components;
    if model.mtp_depth > 0 {
        // The block `layers.{L}`: MoE where block L would be, else dense.
        let is_moe = moe.is_moe_layer(model.num_layers);
        let ffn = if is_moe {
            d * e
                + if shared_h > 0 {
                    swiglu(shared_h) + shared_gate
                } else {
                    0
                }
        } else {
            swiglu(u(model.ffn_hidden))
        };
        // enorm, hnorm, the block's two norms and the final norm; eh_proj [2d, d].
        let replicated =
            5 * d + 2 * d * d + attention_per_layer(model, q, kv, model.num_layers) + ffn;
        components.push(both("mtp", replicated, Sharding::Replicated));
        let experts = if is_moe { e * swiglu(h) } else { 0 };
        components.push(Component {
            name: "mtp_routed_experts",
            params: experts,
            active: if is_moe { k * swiglu(h) } else { 0 },
            sharding: Sharding::Expert,
        });
    }
    Ok(ParamCount {
        components,
        moe_layers,
        dense_layers,
        num_experts: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one "is this block MoE" rule: the `first_dense_layers` / `moe_every` grid, and
    /// never in the dense baseline (one routed expert, no shared expert), which the count
    /// then reports as all dense.
    #[test]
    fn moe_blocks_follow_the_grid_and_never_in_the_dense_baseline() {
        let grid = MoeConfig {
            first_dense_layers: 1,
            moe_every: 2,
            ..MoeConfig::default()
        };
        let moe: Vec<bool> = (0..6).map(|i| grid.is_moe_layer(i)).collect();
        assert_eq!(moe, [false, true, false, true, false, true]);
        let dense = MoeConfig {
            num_experts: 1,
            top_k: 1,
            ..MoeConfig::default()
        };
        assert!((0..6).all(|i| !dense.is_moe_layer(i)));
        let shared_only = MoeConfig {
            num_shared_experts: 1,
            ..dense.clone()
        };
        assert!(shared_only.is_moe_layer(0));
        let model = ModelConfig {
            num_layers: 4,
            ..ModelConfig::default()
        };
        let c = count_params(&model, &dense).unwrap();
        assert_eq!((c.moe_layers, c.dense_layers), (0, 4));
    }

    /// Mixtral 8x7B by hand (Jiang et al. 2024, Table 1: d 4096, 32 layers, 32 heads, 8 kv
    /// heads, hidden 14336, 8 experts, top-2, vocab 32000): attention
    /// 32 * (2*4096*4096 + 2*4096*1024) = 1,342,177,280; experts 32*8*3*4096*14336 =
    /// 45,097,156,608; router 32*4096*8 = 1,048,576; norms 65*4096 = 266,240; embedding
    /// and head 2*32000*4096 = 262,144,000. Exact integers: no tolerance.
    #[test]
    fn mixtral_by_hand() {
        let model = ModelConfig {
            vocab_size: 32000,
            d_model: 4096,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            ffn_hidden: 14336,
            ..ModelConfig::default()
        };
        let moe = MoeConfig {
            num_experts: 8,
            top_k: 2,
            expert_hidden: 14336,
            ..MoeConfig::default()
        };
        let c = count_params(&model, &moe).unwrap();
        assert_eq!(c.get("attention").unwrap().params, 1_342_177_280);
        assert_eq!(c.get("routed_experts").unwrap().params, 45_097_156_608);
        assert_eq!(c.get("routed_experts").unwrap().active, 45_097_156_608 / 4);
        assert_eq!(c.get("router").unwrap().params, 1_048_576);
        assert_eq!(c.get("norms").unwrap().params, 266_240);
        assert_eq!(c.get("dense_ffn").unwrap().params, 0);
        let total = 1_342_177_280 + 45_097_156_608 + 1_048_576 + 266_240 + 262_144_000;
        assert_eq!(c.total(), total);
        assert_eq!(c.active(), total - 45_097_156_608 * 3 / 4);
        assert_eq!(c.expert_per_rank(8), 45_097_156_608 / 8);
        assert_eq!((c.moe_layers, c.dense_layers), (32, 0));
    }

    /// DeepSeek-V3's MLA by hand (config.json: d 7168, 128 heads, q_lora_rank 1536,
    /// kv_lora_rank 512, qk_nope 128, qk_rope 64, v 128): wq_a 7168*1536 = 11,010,048,
    /// q_norm 1536, wq_b 1536*128*192 = 37,748,736, wkv_a 7168*576 = 4,128,768, kv_norm 512,
    /// wkv_b 512*128*256 = 16,777,216, wo 128*128*7168 = 117,440,512: 187,107,328 per layer.
    #[test]
    fn mla_by_hand() {
        use crate::config::AttentionConfig;
        let model = ModelConfig {
            d_model: 7168,
            num_layers: 2,
            num_heads: 128,
            num_kv_heads: 128,
            attention: AttentionConfig {
                kind: AttentionKind::Mla,
                q_lora_rank: Some(1536),
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128,
                softmax_scale: None,
                ..AttentionConfig::default()
            },
            ..ModelConfig::default()
        };
        let c = count_params(&model, &MoeConfig::default()).unwrap();
        assert_eq!(c.get("attention").unwrap().params, 2 * 187_107_328);
        let no_q_lora = ModelConfig {
            attention: AttentionConfig {
                q_lora_rank: None,
                ..model.attention.clone()
            },
            ..model
        };
        // wq 7168*128*192 = 176,160,768 replaces the three query tensors.
        let c = count_params(&no_q_lora, &MoeConfig::default()).unwrap();
        assert_eq!(
            c.get("attention").unwrap().params,
            2 * (187_107_328 - 48_760_320 + 176_160_768)
        );
    }

    #[test]
    fn dense_baseline_has_no_moe_layers() {
        let moe = MoeConfig {
            num_experts: 1,
            top_k: 1,
            ..MoeConfig::default()
        };
        let c = count_params(&ModelConfig::default(), &moe).unwrap();
        assert_eq!((c.moe_layers, c.dense_layers), (0, 4));
        assert_eq!(c.expert(), 0);
        assert_eq!(c.total(), c.active());
    }

    #[test]
    fn rejects_invalid_configs() {
        let moe = MoeConfig {
            top_k: 9,
            ..MoeConfig::default()
        };
        assert!(count_params(&ModelConfig::default(), &moe).is_err());
    }
}
