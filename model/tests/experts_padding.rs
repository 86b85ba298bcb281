//! The padded grouped GEMM the GPU path uses (bf16 CUTLASS kernels may assert on empty expert
//! groups, so every group is padded to a positive multiple of 8 rows) equals the sequential
//! reference, including experts that receive no rows, for outputs and gradients.
//!
//! Tolerance 1e-5 relative: f32 on the CPU, the same products summed by different kernels.

use moe_model::config::{ExpertImpl, ModelConfig, MoeConfig};
use moe_model::experts::{RoutedExperts, GROUP_ALIGN_ROWS};
use moe_testutil::{assert_close, Tol};
use tch::{Device, Kind, Tensor};

fn experts() -> RoutedExperts {
    let model = ModelConfig {
        d_model: 16,
        num_layers: 2,
        init_std: 0.3,
        ..Default::default()
    };
    let moe = MoeConfig {
        num_experts: 5,
        top_k: 1,
        expert_hidden: 8,
        expert_impl: ExpertImpl::Grouped,
        ..Default::default()
    };
    let vb = moe_model::ParamBuilder::new(11, Device::Cpu).pp("layers.0.moe.experts");
    RoutedExperts::new(&model, &moe, &vb, 0, 5).unwrap()
}

#[test]
fn padded_grouped_equals_sequential_with_empty_groups() {
    let ex = experts();
    // Experts 0 and 3 get nothing; the others 1, 9 (one past a multiple of 8) and 8 rows.
    let rows = [0i64, 1, 9, 0, 8];
    let m: i64 = rows.iter().sum();
    tch::manual_seed(2);
    let x = Tensor::randn([m, 16], (Kind::Float, Device::Cpu));
    let g = Tensor::randn([m, 16], (Kind::Float, Device::Cpu));

    let run = |padded: bool| {
        let x = x.copy().set_requires_grad(true);
        for w in [&ex.w_gate_ldh, &ex.w_up_ldh, &ex.w_down_lhd] {
            let mut w = w.shallow_clone();
            w.zero_grad();
        }
        let y = if padded {
            ex.forward_grouped_padded(&x, &rows, GROUP_ALIGN_ROWS)
                .unwrap()
        } else {
            ex.forward_sequential(&x, &rows).unwrap()
        };
        (&y * &g).sum(Kind::Float).backward();
        let grads: Vec<Tensor> = [&ex.w_gate_ldh, &ex.w_up_ldh, &ex.w_down_lhd]
            .iter()
            .map(|w| w.grad().copy())
            .collect();
        (y.detach(), x.grad(), grads)
    };
    let (y_pad, gx_pad, gw_pad) = run(true);
    let (y_seq, gx_seq, gw_seq) = run(false);
    assert_eq!(y_pad.size(), [m, 16]);
    assert_close("outputs", &y_pad, &y_seq, Tol::Rel(1e-5));
    assert_close("input gradients", &gx_pad, &gx_seq, Tol::Rel(1e-5));
    for (i, (a, b)) in gw_pad.iter().zip(&gw_seq).enumerate() {
        assert_close(&format!("weight gradient {i}"), a, b, Tol::Rel(1e-5));
    }
}

#[test]
fn padding_rejects_a_zero_alignment() {
    let ex = experts();
    let x = Tensor::zeros([2, 16], (Kind::Float, Device::Cpu));
    assert!(ex.forward_grouped_padded(&x, &[1, 1, 0, 0, 0], 0).is_err());
}

#[test]
fn fp32_grouped_gemm_is_not_used_on_cuda() {
    // torch's fp32 grouped GEMM on CUDA syncs and loops per expert: the sequential experts
    // are used instead; bf16 keeps the fused kernel; the CPU keeps grouped fp32.
    assert!(RoutedExperts::grouped_slow_on(Device::Cuda(0), Kind::Float).is_some());
    assert!(RoutedExperts::grouped_slow_on(Device::Cuda(0), Kind::BFloat16).is_none());
    assert!(RoutedExperts::grouped_slow_on(Device::Cpu, Kind::Float).is_none());
}
