//! A transformer LM with multi-head latent attention builds, names its weights and learns:
//! a few plain SGD steps on one fixed batch lower the loss.

use moe_model::config::{AttentionConfig, AttentionKind, ExpertImpl, ModelConfig, MoeConfig};
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::ExpertParallel;
use tch::{Device, Kind, Tensor};

fn model_cfg() -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 4,
        ffn_hidden: 48,
        max_seq_len: 16,
        attention: AttentionConfig {
            kind: AttentionKind::Mla,
            q_lora_rank: Some(16),
            kv_lora_rank: 8,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 4,
            v_head_dim: 8,
            softmax_scale: None,
            ..AttentionConfig::default()
        },
        ..ModelConfig::default()
    }
}

#[test]
fn mla_lm_names_its_weights_and_learns() {
    let moe = MoeConfig {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 16,
        expert_impl: ExpertImpl::Sequential,
        ..MoeConfig::default()
    };
    tch::manual_seed(0);
    let lm = TransformerLm::new(
        &model_cfg(),
        &moe,
        &ExpertParallel::single(),
        3,
        Device::Cpu,
    )
    .unwrap();
    let params = lm.params();
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "layers.0.attn.wq_a",
        "layers.0.attn.q_norm.weight",
        "layers.0.attn.wq_b",
        "layers.1.attn.wkv_a",
        "layers.1.attn.kv_norm.weight",
        "layers.1.attn.wkv_b",
        "layers.1.attn.wo",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(!names.iter().any(|n| n.ends_with("attn.wk")));
    let tokens = Tensor::arange(2 * 12, (Kind::Int64, Device::Cpu))
        .f_mul_scalar(5)
        .unwrap()
        .remainder(32)
        .view([2, 12]);
    let inputs = tokens.narrow(1, 0, 11);
    let targets = tokens.narrow(1, 1, 11);
    let ctx = LmForward {
        train: true,
        compute_kind: Kind::Float,
        step: 0,
    };
    let mut losses = Vec::new();
    for _ in 0..8 {
        let out = lm.forward(&inputs, &ctx).unwrap();
        let loss = out
            .logits_btv
            .reshape([-1, 32])
            .cross_entropy_for_logits(&targets.reshape([-1]))
            + out.aux_loss
            + out.z_loss;
        losses.push(loss.double_value(&[]));
        for p in &params {
            p.tensor.shallow_clone().zero_grad();
        }
        loss.backward();
        tch::no_grad(|| {
            for p in &params {
                let g = p.tensor.grad();
                if g.defined() {
                    let _ = p.tensor.shallow_clone().f_sub_(&(g * 0.5)).unwrap();
                }
            }
        });
    }
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    // ln(32) = 3.47 at init; eight SGD steps on one batch must lower it clearly.
    assert!(losses[7] < losses[0] - 0.3, "loss did not fall: {losses:?}");
}
