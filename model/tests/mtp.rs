//! Multi-token prediction (depth 1): the extra block's shape, names and causal structure, and
//! that it leaves the main model untouched.

use moe_model::config::{ExpertImpl, ModelConfig, MoeConfig};
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::ExpertParallel;
use tch::{Device, Kind, Tensor};

fn model_cfg(mtp_depth: i64) -> ModelConfig {
    ModelConfig {
        vocab_size: 32,
        d_model: 16,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        ffn_hidden: 24,
        max_seq_len: 16,
        mtp_depth,
        ..ModelConfig::default()
    }
}

fn moe_cfg() -> MoeConfig {
    MoeConfig {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 8,
        first_dense_layers: 1,
        expert_impl: ExpertImpl::Sequential,
        ..MoeConfig::default()
    }
}

fn tokens(b: i64, t: i64, mul: i64) -> Tensor {
    Tensor::arange(b * t, (Kind::Int64, Device::Cpu))
        .f_mul_scalar(mul)
        .unwrap()
        .remainder(32)
        .view([b, t])
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn mtp_block_is_layer_l_and_predicts_from_the_next_token() {
    let lm = TransformerLm::new(
        &model_cfg(1),
        &moe_cfg(),
        &ExpertParallel::single(),
        5,
        Device::Cpu,
    )
    .unwrap();
    let params = lm.params();
    let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
    for want in [
        "layers.2.enorm.weight",
        "layers.2.hnorm.weight",
        "layers.2.eh_proj",
        "layers.2.attn.wq",
        "layers.2.moe.w_router",
        "layers.2.norm.weight",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    let eh = params
        .iter()
        .find(|p| p.name == "layers.2.eh_proj")
        .unwrap();
    assert_eq!(eh.tensor.size(), vec![32, 16]);
    // Its MoE layer is block 2 for statistics and bias updates.
    assert_eq!(
        lm.moe_layers().iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![1, 2]
    );
    let ctx = LmForward {
        train: false,
        compute_kind: Kind::Float,
        step: 0,
    };
    let a = tokens(2, 10, 7);
    let out = lm.forward(&a, &ctx).unwrap();
    let mtp_a = out.mtp_logits_btv.unwrap();
    assert_eq!(mtp_a.size(), vec![2, 9, 32]);
    assert_eq!(
        out.moe.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![1, 2]
    );

    // Position i reads tokens 0..=i+1: changing tokens 6.. leaves positions 0..=4 unchanged
    // (row-wise float32 kernels: 1e-5) and changes position 5, which reads token 6.
    let b = a.copy();
    b.narrow(1, 6, 4).copy_(&tokens(2, 4, 3));
    let mtp_b = lm.forward(&b, &ctx).unwrap().mtp_logits_btv.unwrap();
    assert!(max_abs(&mtp_a.narrow(1, 0, 5), &mtp_b.narrow(1, 0, 5)) < 1e-5);
    assert!(max_abs(&mtp_a.narrow(1, 5, 1), &mtp_b.narrow(1, 5, 1)) > 1e-4);

    // The main model is the one built without the module (weights come from (seed, name)).
    let plain = TransformerLm::new(
        &model_cfg(0),
        &moe_cfg(),
        &ExpertParallel::single(),
        5,
        Device::Cpu,
    )
    .unwrap();
    let out_plain = plain.forward(&a, &ctx).unwrap();
    assert!(out_plain.mtp_logits_btv.is_none());
    assert_eq!(max_abs(&out.logits_btv, &out_plain.logits_btv), 0.0);
    // One-token sequences have nothing to predict two ahead.
    let one = lm.forward(&tokens(2, 1, 7), &ctx).unwrap();
    assert!(one.mtp_logits_btv.is_none());
}

#[test]
fn mtp_depth_above_one_is_rejected() {
    let errs = MoeConfig::validate(&model_cfg(2), &moe_cfg());
    assert!(
        errs.iter()
            .any(|e| e.contains("model.mtp_depth (2) must be 0 or 1")),
        "{errs:?}"
    );
}
