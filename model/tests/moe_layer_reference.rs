//! MoE layer against references:
//! - a naive dense MoE (every expert on every token, weighted by the routing weights, plus the
//!   shared experts computed one by one) for dropless routing, outputs and gradients;
//! - EP=P equals EP=1: P in-process ranks (`threads`) against one process on the concatenated
//!   batch with `capacity_groups = P`, with capacity dropping;
//! - router jitter determinism, parameters, buffers.
//!
//! Tolerance 1e-5 relative to the largest reference magnitude: f32 throughout; the paths sum
//! the same products in different orders.

use moe_comm::threads::threads_world;
use moe_comm::ProcessGroups;
use moe_model::config::{ExpertImpl, ModelConfig, MoeConfig};
use moe_model::moe_layer::{jitter_noise, MoeForward, MoeLayer};
use moe_model::router::{self, RouterInput};
use moe_model::{ExpertParallel, ParamBuilder, ParamKind};
use moe_testutil::{assert_close, Tol};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const D: i64 = 8;
const SEED: u64 = 3;
const PREFIX: &str = "layers.1.moe";

fn configs(imp: ExpertImpl) -> (ModelConfig, MoeConfig) {
    let model = ModelConfig {
        d_model: D,
        num_layers: 2,
        init_std: 0.4,
        ..Default::default()
    };
    let moe = MoeConfig {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 8,
        num_shared_experts: 2,
        shared_expert_hidden: Some(4),
        aux_loss_coeff: 0.01,
        z_loss_coeff: 0.001,
        expert_impl: imp,
        ..Default::default()
    };
    (model, moe)
}

fn values(n: i64, d: i64, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    Tensor::from_slice(&v).reshape([n, d])
}

/// The layer under `PREFIX` at `par`, and the builder holding its parameters and buffers.
fn build(model: &ModelConfig, moe: &MoeConfig, par: &ExpertParallel) -> (MoeLayer, ParamBuilder) {
    let vb = ParamBuilder::new(SEED, Device::Cpu);
    let layer = MoeLayer::new(model, moe, &vb.pp(PREFIX), par).unwrap();
    (layer, vb)
}

fn swiglu(x: &Tensor, wg: &Tensor, wu: &Tensor, wd: &Tensor) -> Tensor {
    (x.matmul(wg).silu() * x.matmul(wu)).matmul(wd)
}

fn ctx() -> MoeForward {
    MoeForward {
        train: true,
        seq_len: 4,
        jitter_seed: 0,
        compute_kind: tch::Kind::Float,
    }
}

#[test]
fn dropless_layer_equals_dense_reference() {
    for imp in [ExpertImpl::Sequential, ExpertImpl::Grouped] {
        let (model, moe) = configs(imp);
        let (n, e) = (12, moe.num_experts);
        let (layer, layer_vb) = build(&model, &moe, &ExpertParallel::single());
        let (refl, refl_vb) = build(&model, &moe, &ExpertParallel::single());
        let g = values(n, D, 2);

        let x = values(n, D, 1).set_requires_grad(true);
        let (y, stats) = layer.forward(&x, &ctx()).unwrap();
        (&y * &g + &stats.aux_loss + &stats.z_loss)
            .sum(Kind::Float)
            .backward();

        // Naive dense reference on the twin layer's weights.
        let xr = values(n, D, 1).set_requires_grad(true);
        let logits = xr.matmul(&refl.w_router_de);
        let input = RouterInput {
            logits_ne: &logits,
            expert_bias_e: None,
            seq_len: 4,
            capacity_groups: 1,
        };
        let routing = router::route(&moe, &input).unwrap();
        let ex = &refl.experts;
        let routed = (0..e).map(|i| {
            let out = swiglu(
                &xr,
                &ex.w_gate_ldh.get(i),
                &ex.w_up_ldh.get(i),
                &ex.w_down_lhd.get(i),
            );
            routing.probs_ne.narrow(1, i, 1) * out
        });
        // Two shared experts of width 4 one by one: column/row blocks of the width-8 SwiGLU.
        let sh = refl.shared.as_ref().unwrap();
        let shared = (0..2).map(|s| {
            let (wg, wu) = (
                sh.w_gate_dh.narrow(1, 4 * s, 4),
                sh.w_up_dh.narrow(1, 4 * s, 4),
            );
            swiglu(&xr, &wg, &wu, &sh.w_down_hd.narrow(0, 4 * s, 4))
        });
        let yr = routed.chain(shared).reduce(|a, b| a + b).unwrap();
        let aux =
            router::aux_loss(&moe, &routing.aux_stats, &routing.aux_stats.counts_e, n).unwrap();
        (&yr * &g + &aux + &routing.z_loss)
            .sum(Kind::Float)
            .backward();

        let tag = format!("{imp:?}");
        assert_close(&format!("{tag} y"), &y, &yr, Tol::Rel(1e-5));
        assert_close(&format!("{tag} aux"), &stats.aux_loss, &aux, Tol::Rel(1e-5));
        assert_close(
            &format!("{tag} z"),
            &stats.z_loss,
            &routing.z_loss,
            Tol::Rel(1e-5),
        );
        assert_close(&format!("{tag} dx"), &x.grad(), &xr.grad(), Tol::Rel(1e-5));
        for (p, q) in layer_vb.params().iter().zip(refl_vb.params()) {
            assert_eq!(p.name, q.name);
            assert_close(
                &format!("{tag} d{}", p.name),
                &p.tensor.grad(),
                &q.tensor.grad(),
                Tol::Rel(1e-5),
            );
        }
        assert_eq!(
            (
                stats.num_kept.int64_value(&[]),
                stats.num_dropped.int64_value(&[])
            ),
            (n * 2, 0)
        );
        let tpe = routing.tokens_per_expert_e.to_kind(Kind::Float);
        assert!(
            stats.load_e.equal(&tpe) && stats.topk_load_e.equal(&tpe),
            "{tag} loads"
        );
        assert!(stats.probs_sum_ok().unwrap());
    }
}

/// One rank of the EP run: output, dx, the losses, stats, and dense/expert gradients.
struct RankOut {
    y: Tensor,
    gx: Tensor,
    aux: f64,
    load: Tensor,
    dropped: i64,
    grads: Vec<(String, ParamKind, Tensor)>,
}

#[test]
fn ep2_with_capacity_equals_single_process() {
    tch::set_num_threads(1);
    let p = 2usize;
    let (model, mut moe) = configs(ExpertImpl::Grouped);
    moe.capacity_factor = Some(1.0);
    let n_r = 8i64;
    let x_all = values(n_r * p as i64, D, 7);
    let g_all = values(n_r * p as i64, D, 8);

    let handles: Vec<_> = threads_world(p, Duration::from_secs(60))
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let (model, moe) = (model.clone(), moe.clone());
            let x = x_all.narrow(0, rank as i64 * n_r, n_r).copy();
            let g = g_all.narrow(0, rank as i64 * n_r, n_r).copy();
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let groups = ProcessGroups::new(comm, p).unwrap();
                let par = ExpertParallel::from_groups(&groups);
                assert_eq!(par.dispatcher().ep_rank(), rank as i64);
                let (layer, layer_vb) = build(&model, &moe, &par);
                let x = x.set_requires_grad(true);
                let (y, st) = layer.forward(&x, &ctx()).unwrap();
                // Per-rank losses are means over local tokens: the global loss is their mean.
                let losses = (&st.aux_loss + &st.z_loss) / p as f64;
                ((&y * &g).sum(Kind::Float) + losses).backward();
                let grads = layer_vb
                    .params()
                    .into_iter()
                    .map(|q| (q.name, q.kind, q.tensor.grad()))
                    .collect();
                RankOut {
                    y: y.detach(),
                    gx: x.grad(),
                    aux: st.aux_loss.double_value(&[]),
                    load: st.load_e,
                    dropped: st.num_dropped.int64_value(&[]),
                    grads,
                }
            })
        })
        .collect();
    let ranks: Vec<RankOut> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    let reference = ExpertParallel::single().with_capacity_groups(p as i64);
    let (single, single_vb) = build(&model, &moe, &reference);
    let x = x_all.set_requires_grad(true);
    let (y, st) = single.forward(&x, &ctx()).unwrap();
    ((&y * &g_all).sum(Kind::Float) + &st.aux_loss + &st.z_loss).backward();
    assert!(
        st.num_dropped.int64_value(&[]) > 0,
        "the test must exercise capacity dropping"
    );

    let mean_aux = ranks.iter().map(|r| r.aux).sum::<f64>() / p as f64;
    assert!(
        (mean_aux - st.aux_loss.double_value(&[])).abs() <= 1e-6 * mean_aux.abs(),
        "aux"
    );
    assert_eq!(
        ranks.iter().map(|r| r.dropped).sum::<i64>(),
        st.num_dropped.int64_value(&[])
    );
    for (rank, r) in ranks.iter().enumerate() {
        let rows = |t: &Tensor| t.narrow(0, rank as i64 * n_r, n_r);
        assert_close(&format!("rank {rank} y"), &r.y, &rows(&y), Tol::Rel(1e-5));
        assert_close(
            &format!("rank {rank} dx"),
            &r.gx,
            &rows(&x.grad()),
            Tol::Rel(1e-5),
        );
        assert!(
            r.load.equal(&st.load_e),
            "rank {rank}: global load {:?} vs {:?}",
            r.load,
            st.load_e
        );
    }
    // Dense gradients: the single-process gradient is the sum over ranks. Expert gradients:
    // rank r's local experts match the single process's slice.
    for (i, q) in single_vb.params().iter().enumerate() {
        let want = q.tensor.grad();
        match ranks[0].grads[i].1 {
            ParamKind::Dense => {
                let sum = ranks
                    .iter()
                    .map(|r| r.grads[i].2.shallow_clone())
                    .reduce(|a, b| a + b)
                    .unwrap();
                assert_close(&q.name, &sum, &want, Tol::Rel(1e-5));
            }
            ParamKind::Expert { .. } => {
                for (rank, r) in ranks.iter().enumerate() {
                    let l = want.size()[0] / p as i64;
                    assert_close(
                        &q.name,
                        &r.grads[i].2,
                        &want.narrow(0, rank as i64 * l, l),
                        Tol::Rel(1e-5),
                    );
                }
            }
        }
    }
}

#[test]
fn jitter_is_deterministic_training_only_and_bounded() {
    let (model, mut moe) = configs(ExpertImpl::Sequential);
    moe.jitter_eps = 0.2;
    let (layer, _) = build(&model, &moe, &ExpertParallel::single());
    let x = values(16, D, 4);
    let run = |train: bool, seed: u64| {
        let c = MoeForward {
            train,
            seq_len: 4,
            jitter_seed: seed,
            compute_kind: tch::Kind::Float,
        };
        layer.forward(&x, &c).unwrap().1.z_loss.double_value(&[])
    };
    assert_eq!(run(true, 1), run(true, 1));
    assert_ne!(run(true, 1), run(true, 2));
    // Evaluation ignores jitter: equal to a layer without it.
    moe.jitter_eps = 0.0;
    let (plain, _) = build(&model, &moe, &ExpertParallel::single());
    let c = MoeForward {
        train: true,
        seq_len: 4,
        jitter_seed: 1,
        compute_kind: tch::Kind::Float,
    };
    assert_eq!(
        run(false, 1),
        plain.forward(&x, &c).unwrap().1.z_loss.double_value(&[])
    );

    let noise = jitter_noise(9, 100, 10, 0.2, Device::Cpu).unwrap();
    let (lo, hi) = (noise.min().double_value(&[]), noise.max().double_value(&[]));
    assert!(
        (0.8 - 1e-6..0.85).contains(&lo) && (1.15..1.2 + 1e-6).contains(&hi),
        "{lo} {hi}"
    );
}

#[test]
fn params_buffers_and_bias_update() {
    let (model, mut moe) = configs(ExpertImpl::Grouped);
    moe.bias_update_rate = 0.1;
    moe.aux_loss = moe_model::config::AuxLossKind::None;
    let (layer, layer_vb) = build(&model, &moe, &ExpertParallel::detached(1, 2));
    let names: Vec<String> = layer_vb.params().iter().map(|p| p.name.clone()).collect();
    let want: Vec<String> = [
        "w_router",
        "experts.w_gate",
        "experts.w_up",
        "experts.w_down",
        "shared.w_gate",
        "shared.w_up",
        "shared.w_down",
    ]
    .iter()
    .map(|s| format!("{PREFIX}.{s}"))
    .collect();
    assert_eq!(names, want);
    let ps = layer_vb.params();
    assert_eq!(
        ps[1].kind,
        ParamKind::Expert {
            first_global: 2,
            num_local: 2
        }
    );
    assert_eq!(
        ps[4].tensor.size(),
        vec![D, 8],
        "2 shared experts of width 4 = one of width 8"
    );
    assert_eq!(ps[0].tensor.kind(), Kind::Float);
    let bufs = layer_vb.buffers();
    assert_eq!(bufs.len(), 1);
    assert_eq!(bufs[0].0, format!("{PREFIX}.expert_bias"));

    // A shard built without process groups has its parameters but refuses to run.
    let x = values(8, D, 5);
    let err = layer.forward(&x, &ctx()).unwrap_err().to_string();
    assert!(err.contains("without process groups"), "{err}");

    // The bias moves toward under-loaded experts: +rate below the mean load, -rate above.
    let (single, _) = build(&model, &moe, &ExpertParallel::single());
    let (_, st) = single.forward(&x, &ctx()).unwrap();
    assert_eq!(st.aux_loss.double_value(&[]), 0.0);
    single.update_expert_bias(&st).unwrap();
    let bias = Vec::<f32>::try_from(single.expert_bias_e.as_ref().unwrap()).unwrap();
    let load = Vec::<f32>::try_from(&st.topk_load_e).unwrap();
    let mean = load.iter().sum::<f32>() / load.len() as f32;
    for (b, l) in bias.iter().zip(&load) {
        let want = if *l < mean {
            0.1
        } else if *l > mean {
            -0.1
        } else {
            0.0
        };
        assert!(
            (b - want).abs() < 1e-6,
            "bias {b} for load {l} (mean {mean})"
        );
    }
}

/// Qwen2-MoE's shared-expert gate: with `shared_expert_gate` the output is the ungated
/// layer's with the shared part scaled per token by `sigmoid(x . w)`, i.e.
/// `y_gated = y - shared(x) + sigmoid(x w) * shared(x)`, the twin layers sharing every other
/// weight (same seed and names). f32, 1e-5 relative.
#[test]
fn shared_expert_gate_scales_the_shared_output() {
    let (model, moe) = configs(ExpertImpl::Sequential);
    let gated_cfg = MoeConfig {
        shared_expert_gate: true,
        ..moe.clone()
    };
    let (plain, _) = build(&model, &moe, &ExpertParallel::single());
    let (gated, gated_vb) = build(&model, &gated_cfg, &ExpertParallel::single());
    let names: Vec<String> = gated_vb.params().into_iter().map(|p| p.name).collect();
    assert_eq!(names.last().unwrap(), &format!("{PREFIX}.shared.out_gate"));
    let w = gated.shared_gate_d1.as_ref().unwrap();
    assert_eq!(w.size(), vec![D, 1]);
    let x = values(10, D, 7);
    let (y, _) = plain.forward(&x, &ctx()).unwrap();
    let (yg, _) = gated.forward(&x, &ctx()).unwrap();
    let s = plain.shared.as_ref().unwrap().forward(&x).unwrap();
    let want = &y - &s + x.matmul(w).sigmoid() * &s;
    assert_close("gated", &yg, &want, Tol::Rel(1e-5));
    assert!((&yg - &y).abs().max().double_value(&[]) > 1e-3);
    // Without shared experts the gate is a config error.
    let bad = MoeConfig {
        num_shared_experts: 0,
        ..gated_cfg
    };
    assert!(MoeConfig::validate(&model, &bad)
        .iter()
        .any(|e| e.starts_with("moe.shared_expert_gate (true)")));
}
