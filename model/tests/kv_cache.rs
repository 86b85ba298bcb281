//! Incremental decoding with a KV cache equals the full forward: `forward_cached` over a
//! prefix, then one token at a time, then a chunk, gives the logits `forward` gives at those
//! positions over the whole sequence; MoE layers route only the new tokens; attention kinds
//! without a cache say so and refuse.

use moe_model::config::{AttentionConfig, AttentionKind, ExpertImpl, ModelConfig, MoeConfig};
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::ExpertParallel;
use tch::{Device, Kind, Tensor};

fn model_cfg(qwen: bool) -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 32,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        ffn_hidden: 48,
        max_seq_len: 16,
        qkv_bias: qwen,
        qk_norm: qwen,
        ..ModelConfig::default()
    }
}

fn moe_cfg() -> MoeConfig {
    MoeConfig {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 16,
        first_dense_layers: 1,
        expert_impl: ExpertImpl::Grouped,
        capacity_factor: None,
        ..MoeConfig::default()
    }
}

fn ctx() -> LmForward {
    LmForward {
        train: false,
        compute_kind: Kind::Float,
        step: 0,
    }
}

/// Prefill 5, then 1 + 1 + ... (7 single tokens), then a chunk of 3 after a cache of 12 (the
/// explicit-mask path), then the last one: every position's logits equal the full forward's
/// to 1e-5 absolute (float32 logits of magnitude ~1: the cached attention reduces over the
/// keys in another order; measured differences are ~1e-7). The single-token steps' MoE
/// layers keep exactly k = 2 assignments: they routed that one token, not the prefix.
#[test]
fn cached_decoding_equals_the_full_forward() {
    for qwen in [false, true] {
        tch::manual_seed(1);
        let lm = TransformerLm::new(
            &model_cfg(qwen),
            &moe_cfg(),
            &ExpertParallel::single(),
            4,
            Device::Cpu,
        )
        .unwrap();
        assert!(lm.supports_kv_cache());
        let _g = tch::no_grad_guard();
        let tokens = Tensor::randint(32, [1, 16], (Kind::Int64, Device::Cpu));
        let full = lm.forward(&tokens, &ctx()).unwrap().logits_btv;
        let mut cache = lm.new_kv_cache();
        let mut pos = 0;
        for len in [5, 1, 1, 1, 1, 1, 1, 1, 3, 1] {
            let out = lm
                .forward_cached(&tokens.narrow(1, pos, len), &ctx(), &mut cache)
                .unwrap();
            let want = full.narrow(1, pos, len);
            let err = (&out.logits_btv - &want).abs().max().double_value(&[]);
            assert!(err < 1e-5, "qwen {qwen}: positions {pos}..+{len}: {err}");
            assert_eq!(out.moe.len(), 2);
            for (_, s) in &out.moe {
                assert_eq!(s.num_kept.int64_value(&[]), 2 * len);
            }
            pos += len;
            assert_eq!(cache.len(), pos);
        }
        // The cache is full: one more position is refused, not wrapped.
        assert!(lm
            .forward_cached(&tokens.narrow(1, 0, 1), &ctx(), &mut cache)
            .is_err());
        // Without the cache the same single token gives other logits (the test sees the
        // cache): position 15 alone vs after its prefix.
        let mut empty = lm.new_kv_cache();
        let alone = lm
            .forward_cached(&tokens.narrow(1, 15, 1), &ctx(), &mut empty)
            .unwrap()
            .logits_btv;
        let diff = (&alone - full.narrow(1, 15, 1))
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff > 1e-3, "{diff}");
    }
}

/// MLA and gated DeltaNet have no cache here: `supports_kv_cache` is false and
/// `forward_cached` is an error naming the kind (callers take the uncached path).
#[test]
fn other_attention_kinds_refuse_the_cache() {
    let mla = AttentionConfig {
        kind: AttentionKind::Mla,
        q_lora_rank: Some(16),
        kv_lora_rank: 8,
        qk_nope_head_dim: 8,
        qk_rope_head_dim: 4,
        v_head_dim: 8,
        ..AttentionConfig::default()
    };
    let gdn = AttentionConfig {
        kind: AttentionKind::GatedDeltanet,
        full_attention_interval: 2,
        ..AttentionConfig::default()
    };
    for (att, name) in [(mla, "mla"), (gdn, "gated_deltanet")] {
        let cfg = ModelConfig {
            num_kv_heads: 4,
            attention: att,
            ..model_cfg(false)
        };
        let lm = TransformerLm::new(&cfg, &moe_cfg(), &ExpertParallel::single(), 5, Device::Cpu)
            .unwrap();
        assert!(!lm.supports_kv_cache(), "{name}");
        let tokens = Tensor::randint(32, [1, 4], (Kind::Int64, Device::Cpu));
        let err = lm
            .forward_cached(&tokens, &ctx(), &mut lm.new_kv_cache())
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains("no KV cache"), "{err}");
    }
}
