//! EP equivalence of the dispatcher: P in-process ranks (`threads` backend) with the
//! all-to-all dispatcher and E/P local experts each give the same outputs and gradients as the
//! local dispatcher with all E experts run on each rank's tokens separately.
//!
//! Expert weight gradients: in the EP run, local expert l of rank r receives the rows of every
//! rank, so its gradient is the SUM over ranks of the single-process gradients of global
//! expert `r*E/P + l` (the reference accumulates them by running every rank's backward into the
//! same full-E experts).
//!
//! Tolerance 1e-5 relative (to the largest magnitude of the reference): f32, and the expert
//! matmuls see different row blocks (and the weight gradients sum rows in a different order).

use moe_comm::threads::threads_world;
use moe_comm::ProcessGroups;
use moe_model::config::{ExpertImpl, ModelConfig, MoeConfig};
use moe_model::dispatcher::Dispatcher;
use moe_model::experts::RoutedExperts;
use moe_model::ParamBuilder;
use moe_testutil::{assert_close, Tol};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const E: i64 = 8;
const D: i64 = 8;
const K: usize = 2;
const SEED: u64 = 11;

fn configs(imp: ExpertImpl) -> (ModelConfig, MoeConfig) {
    let model = ModelConfig {
        d_model: D,
        num_layers: 2,
        init_std: 0.5,
        ..Default::default()
    };
    let moe = MoeConfig {
        num_experts: E,
        top_k: K as i64,
        expert_hidden: 12,
        expert_impl: imp,
        ..Default::default()
    };
    (model, moe)
}

/// Tokens per rank: rank 1 of 4 has none (it sends nothing but still serves experts 2, 3).
fn tokens_of(rank: usize, p: usize) -> i64 {
    match (p, rank) {
        (4, 1) => 0,
        _ => 5 + 3 * rank as i64,
    }
}

/// Rank `rank`'s tokens, routing and output cotangent, a pure function of (rank, p).
/// Experts 2, 6 and 7 are never chosen: an empty expert in the middle, and with P=4 rank 3
/// receives nothing at all. About 20% of assignments are dropped.
fn inputs(rank: usize, p: usize) -> (Tensor, Tensor, Tensor, Tensor) {
    let n = tokens_of(rank, p);
    let mut rng = ChaCha8Rng::seed_from_u64(100 + rank as u64);
    let mut probs = vec![0f32; (n * E) as usize];
    let mut map = vec![false; (n * E) as usize];
    for t in 0..n {
        let mut chosen = Vec::new();
        while chosen.len() < K {
            let x = rng.random_range(0..E);
            if ![2, 6, 7].contains(&x) && !chosen.contains(&x) {
                chosen.push(x);
            }
        }
        for x in chosen {
            if rng.random_bool(0.8) {
                probs[(t * E + x) as usize] = rng.random_range(0.1f32..1.0);
                map[(t * E + x) as usize] = true;
            }
        }
    }
    let x: Vec<f32> = (0..n * D).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let g: Vec<f32> = (0..n * D).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    (
        Tensor::from_slice(&x)
            .reshape([n, D])
            .set_requires_grad(true),
        Tensor::from_slice(&probs)
            .reshape([n, E])
            .set_requires_grad(true),
        Tensor::from_slice(&map).reshape([n, E]),
        Tensor::from_slice(&g).reshape([n, D]),
    )
}

/// y, dL/dx, dL/dprobs of one rank, and the expert weight gradients (gate, up, down).
struct Outcome {
    y: Tensor,
    gx: Tensor,
    gp: Tensor,
    gw: Vec<Tensor>,
}

fn run(disp: &Dispatcher, experts: &RoutedExperts, rank: usize, p: usize) -> Outcome {
    let (x, probs, map, g) = inputs(rank, p);
    let (x_md, rows, meta) = disp.dispatch_map(&x, &probs, &map, E).unwrap();
    let y_md = experts.forward(&x_md, &rows).unwrap();
    let y = disp.combine(&y_md, meta).unwrap();
    (&y * &g).sum(Kind::Float).backward();
    let gw = [&experts.w_gate_ldh, &experts.w_up_ldh, &experts.w_down_lhd]
        .iter()
        .map(|w| w.grad().copy())
        .collect();
    Outcome {
        y: y.detach(),
        gx: x.grad(),
        gp: probs.grad(),
        gw,
    }
}

fn check(p: usize, imp: ExpertImpl) {
    tch::set_num_threads(1);
    let (model, moe) = configs(imp);
    let l = E / p as i64;

    let handles: Vec<_> = threads_world(p, Duration::from_secs(60))
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let (model, moe) = (model.clone(), moe.clone());
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let groups = ProcessGroups::new(comm, p).unwrap();
                // Built explicitly (not `from_groups`) so that P=1 also runs the all-to-all path.
                let disp = Dispatcher::all_to_all(&groups);
                assert_eq!(disp.world_size(), p as i64);
                let vb = ParamBuilder::new(SEED, Device::Cpu).pp("t.experts");
                let experts = RoutedExperts::new(&model, &moe, &vb, rank as i64 * l, l).unwrap();
                let out = run(&disp, &experts, rank, p);
                // The statistics all-reduce sums over the world.
                let s = disp
                    .all_reduce_stats(&Tensor::from_slice(&[rank as f64, 1.0]))
                    .unwrap();
                (out, Vec::<f64>::try_from(&s).unwrap())
            })
        })
        .collect();
    let ep: Vec<(Outcome, Vec<f64>)> = handles.into_iter().map(|h| h.join().unwrap()).collect();

    let vb = ParamBuilder::new(SEED, Device::Cpu).pp("t.experts");
    let reference = RoutedExperts::new(&model, &moe, &vb, 0, E).unwrap();
    let refs: Vec<Outcome> = (0..p)
        .map(|r| run(&Dispatcher::local(), &reference, r, p))
        .collect();
    let ref_gw: Vec<Tensor> = [
        &reference.w_gate_ldh,
        &reference.w_up_ldh,
        &reference.w_down_lhd,
    ]
    .iter()
    .map(|w| w.grad())
    .collect();

    for (rank, ((got, stats), want)) in ep.iter().zip(&refs).enumerate() {
        let tag = format!("P={p} {imp:?} rank {rank}");
        assert_close(&format!("{tag} y"), &got.y, &want.y, Tol::Rel(1e-5));
        assert_close(&format!("{tag} dx"), &got.gx, &want.gx, Tol::Rel(1e-5));
        assert_close(&format!("{tag} dprobs"), &got.gp, &want.gp, Tol::Rel(1e-5));
        for (i, g) in got.gw.iter().enumerate() {
            let want_g = ref_gw[i].narrow(0, rank as i64 * l, l);
            assert_close(
                &format!("{tag} expert weight {i}"),
                g,
                &want_g,
                Tol::Rel(1e-5),
            );
        }
        assert_eq!(
            stats,
            &vec![(p * (p - 1) / 2) as f64, p as f64],
            "{tag} all_reduce_stats"
        );
    }
    // The test is only meaningful if gradients flowed.
    assert!(ref_gw[0].abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

#[test]
fn alltoall_p2_equals_local() {
    check(2, ExpertImpl::Sequential);
}

#[test]
fn alltoall_p4_equals_local() {
    check(4, ExpertImpl::Sequential);
}

#[test]
fn alltoall_p4_grouped_equals_local() {
    check(4, ExpertImpl::Grouped);
}

#[test]
fn alltoall_p1_equals_local() {
    check(1, ExpertImpl::Sequential);
}
