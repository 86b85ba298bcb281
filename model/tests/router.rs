//! Router maths against hand-computed values, finite differences and the single-process
//! definition of the global aux loss. Every test runs on the CPU and, when usable, on CUDA
//! (`devices()`).
//!
//! Expected numbers come from the quoted PyTorch expressions (evaluated in float64); float32
//! results are compared with a tolerance of 1e-6, a few ulps of values of order 1.

use moe_model::config::{AuxLossKind, DropPolicy, MoeConfig, ScoreFunction};
use moe_model::router::{aux_loss, capacity, route, update_expert_bias, RouterInput, Routing};
use moe_testutil::{assert_close, Tol};
use tch::{Device, Kind, Tensor};

/// float32 softmax/sigmoid of O(1) logits: a few ulps.
const TOL_F32: f64 = 1e-6;

/// The CPU, and `cuda:0` where CUDA is usable (libtorch_cuda is loaded for this); with
/// `MOE_REQUIRE_CUDA=1` (scripts/gpu-check.sh) a machine without usable CUDA fails the tests
/// instead of running them on the CPU only. The same hand-computed values and tolerances
/// hold on both devices, so the routing on CUDA equals the routing on the CPU.
fn devices() -> Vec<Device> {
    moe_comm::cuda::test_devices()
}

fn logits(rows: &[&[f64]], kind: Kind, dev: Device) -> Tensor {
    let e = rows[0].len() as i64;
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat)
        .reshape([-1, e])
        .to_kind(kind)
        .to_device(dev)
}

fn cfg(e: i64, k: i64) -> MoeConfig {
    MoeConfig {
        num_experts: e,
        top_k: k,
        aux_loss_coeff: 0.01,
        z_loss_coeff: 0.0,
        ..MoeConfig::default()
    }
}

fn run(
    cfg: &MoeConfig,
    logits_ne: &Tensor,
    bias_e: Option<&Tensor>,
    seq_len: i64,
    groups: i64,
) -> Routing {
    let n = logits_ne.size()[0];
    route(
        cfg,
        &RouterInput {
            logits_ne,
            expert_bias_e: bias_e,
            seq_len: if seq_len > 0 { seq_len } else { n },
            capacity_groups: groups,
        },
    )
    .unwrap()
}

fn dense(t: &Tensor) -> Vec<Vec<f64>> {
    Vec::<Vec<f64>>::try_from(&t.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap()
}

fn flat(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double).to_device(Device::Cpu).reshape([-1])).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double)
        .to_device(Device::Cpu)
        .double_value(&[])
}

/// Expert ids of each row of a bool map.
fn rows_of(map_ne: &Tensor) -> Vec<Vec<i64>> {
    Vec::<Vec<i64>>::try_from(&map_ne.to_kind(Kind::Int64).to_device(Device::Cpu))
        .unwrap()
        .iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .filter(|(_, v)| **v != 0)
                .map(|(e, _)| e as i64)
                .collect()
        })
        .collect()
}

/// Token ids in expert e's column of a bool map.
fn column(map_ne: &Tensor, e: usize) -> Vec<i64> {
    rows_of(map_ne)
        .iter()
        .enumerate()
        .filter(|(_, r)| r.contains(&(e as i64)))
        .map(|(n, _)| n as i64)
        .collect()
}

#[test]
fn post_softmax_takes_topk_logits_then_softmax_over_k() {
    for dev in devices() {
        let c = cfg(4, 2);
        let r = run(
            &c,
            &logits(&[&[1.0, 3.0, 2.0, 0.0]], Kind::Float, dev),
            None,
            0,
            1,
        );
        // torch.softmax(torch.tensor([3., 2.], dtype=torch.float64), 0)
        assert_close(
            "probs",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.73105857863, 0.26894142137, 0.0],
            Tol::Abs(TOL_F32),
        );
        assert_eq!(rows_of(&r.routing_map_ne), vec![vec![1, 2]]);
        assert_eq!(r.host_counts().unwrap().0, vec![0, 1, 1, 0]);
        assert_eq!(
            {
                let c = r.host_counts().unwrap();
                (c.1, c.2)
            },
            (2, 0)
        );
        assert_eq!(flat(&r.topk_counts_e), vec![0.0, 1.0, 1.0, 0.0]);
    }
}

#[test]
fn pre_softmax_is_not_renormalised_unless_norm_topk_prob() {
    for dev in devices() {
        let x = logits(&[&[1.0, 3.0, 2.0, 0.0]], Kind::Float, dev);
        let mut c = MoeConfig {
            pre_softmax: true,
            ..cfg(4, 2)
        };
        // torch.softmax(torch.tensor([1., 3., 2., 0.], dtype=torch.float64), 0)[[1, 2]]
        let r = run(&c, &x, None, 0, 1);
        assert_close(
            "pre",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.643914259888, 0.23688281809, 0.0],
            Tol::Abs(TOL_F32),
        );
        c.norm_topk_prob = Some(true);
        // p = torch.softmax(..); p[[1, 2]] / p[[1, 2]].sum()
        let r = run(&c, &x, None, 0, 1);
        assert_close(
            "pre+norm",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.73105857863, 0.26894142137, 0.0],
            Tol::Abs(TOL_F32),
        );
    }
}

#[test]
fn sigmoid_selects_with_bias_and_weighs_without_it() {
    for dev in devices() {
        let x = logits(&[&[1.0, 3.0, 2.0, 0.0]], Kind::Float, dev);
        let bias = Tensor::from_slice(&[0.0f32, -1.0, 0.0, 1.0]).to_device(dev);
        let c = MoeConfig {
            score_function: ScoreFunction::Sigmoid,
            norm_topk_prob: Some(true),
            route_scale: 2.5,
            ..cfg(4, 2)
        };
        // s = torch.sigmoid(x); s + bias = [0.731, -0.047, 0.881, 1.5] selects experts {3, 2};
        // w = s[[3, 2]]; w / w.sum() * 2.5
        let r = run(&c, &x, Some(&bias), 0, 1);
        assert_close(
            "sigmoid",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.0, 1.594725778367, 0.905274221633],
            Tol::Abs(TOL_F32),
        );
        assert_eq!(flat(&r.topk_counts_e), vec![0.0, 0.0, 1.0, 1.0]);
        // Without renormalisation the weights are the raw sigmoid scores: s[[3, 2]] * 2.5.
        let r = run(
            &MoeConfig {
                norm_topk_prob: Some(false),
                ..c.clone()
            },
            &x,
            Some(&bias),
            0,
            1,
        );
        assert_close(
            "raw",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.0, 2.5 * 0.880797077978, 2.5 * 0.5],
            Tol::Abs(TOL_F32),
        );
        // Without the bias the top-2 sigmoid scores are experts {1, 2}.
        let r = run(&c, &x, None, 0, 1);
        assert_eq!(rows_of(&r.routing_map_ne), vec![vec![1, 2]]);
    }
}

#[test]
fn bias_changes_softmax_selection_but_not_weights() {
    for dev in devices() {
        let x = logits(&[&[1.0, 3.0, 2.0, 0.0]], Kind::Float, dev);
        let bias = Tensor::from_slice(&[0.0f32, 0.0, 0.0, 5.0]).to_device(dev);
        // Selection on x + bias = [1, 3, 2, 5] -> {3, 1}; torch.softmax(torch.tensor([0., 3.]), 0)
        let r = run(&cfg(4, 2), &x, Some(&bias), 0, 1);
        assert_close(
            "post",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.952574126822, 0.0, 0.047425873178],
            Tol::Abs(TOL_F32),
        );
        // Pre-softmax: selection on softmax(x) + bias -> {3, 1}; weights softmax(x)[[1, 3]].
        let c = MoeConfig {
            pre_softmax: true,
            ..cfg(4, 2)
        };
        let r = run(&c, &x, Some(&bias), 0, 1);
        assert_close(
            "pre",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.643914259888, 0.0, 0.03205860328],
            Tol::Abs(TOL_F32),
        );
    }
}

#[test]
fn route_scale_multiplies_the_weights() {
    for dev in devices() {
        let c = MoeConfig {
            route_scale: 2.0,
            ..cfg(4, 2)
        };
        let x = logits(
            &[&[1.0, 3.0, 2.0, 0.0], &[0.5, -1.0, 0.25, 2.0]],
            Kind::Float,
            dev,
        );
        let r = run(&c, &x, None, 0, 1);
        assert_close(
            "p",
            &dense(&r.probs_ne)[0],
            &[0.0, 2.0 * 0.73105857863, 2.0 * 0.26894142137, 0.0],
            Tol::Abs(TOL_F32),
        );
        // Post-softmax weights sum to route_scale on every token.
        assert_close(
            "sums",
            &flat(&r.probs_ne.sum_dim_intlist(1, false, Kind::Float)),
            &[2.0, 2.0],
            Tol::Abs(TOL_F32),
        );
    }
}

#[test]
fn ties_go_to_the_lower_expert_index() {
    for dev in devices() {
        let x = logits(
            &[
                &[1.0, 2.0, 2.0, 2.0, 0.0],
                &[0.0; 5],
                &[2.0, 1.0, 2.0, 1.0, 2.0],
            ],
            Kind::Float,
            dev,
        );
        let r = run(&cfg(5, 2), &x, None, 0, 1);
        assert_eq!(
            rows_of(&r.routing_map_ne),
            vec![vec![1, 2], vec![0, 1], vec![0, 2]]
        );
        let r = run(&cfg(5, 1), &x, None, 0, 1);
        assert_eq!(rows_of(&r.routing_map_ne), vec![vec![1], vec![0], vec![0]]);
        // Many identical rows (CUDA sorts these in parallel): every one picks experts 0..8.
        let zeros = Tensor::zeros([4096, 64], (Kind::Float, dev));
        let r = run(&cfg(64, 8), &zeros, None, 0, 1);
        let mut want = vec![0i64; 64];
        want[..8].fill(4096);
        assert_eq!(r.host_counts().unwrap().0, want);
        // The aux statistics use the same rule.
        assert_eq!(
            flat(&r.aux_stats.counts_e),
            want.iter().map(|v| *v as f64).collect::<Vec<_>>()
        );
    }
}

#[test]
fn capacity_arithmetic_matches_megatron() {
    // math.ceil((100 * 1 / 1) * 1.1): (100/1)*1.1 == 110.00000000000001 in float64.
    assert_eq!((100.0f64 / 1.0) * 1.1, 110.00000000000001);
    assert_eq!(capacity(100, 1, 1, 1.1), 111);
    assert_eq!(capacity(8, 2, 4, 1.0), 4); // ceil(4.0)
    assert_eq!(capacity(10, 2, 4, 1.25), 7); // ceil(6.25)
    assert_eq!(capacity(7, 1, 2, 1.0), 4); // ceil(3.5)
    assert_eq!(capacity(6, 1, 2, 0.5), 2); // ceil(1.5)
    assert_eq!(capacity(0, 2, 4, 1.0), 0);
}

/// Six tokens, two experts, top-1, pre-softmax, so expert 0's weight is `sigmoid(a)` for
/// logits `[a, 0]`: tokens 0..6 weigh [0.599, 0.701, 0.900, 0.701, e1: 0.731, 0.599]
/// (`torch.sigmoid(torch.tensor([0.4, 0.85, 2.2, 0.85, 1.0, 0.4]))`). Expert 0 holds tokens
/// {0, 1, 2, 3, 5}; with factor 0.5, C = ceil((6 / 2) * 0.5) = 2.
fn drop_case(dev: Device) -> Tensor {
    logits(
        &[
            &[0.4, 0.0],
            &[0.85, 0.0],
            &[2.2, 0.0],
            &[0.85, 0.0],
            &[0.0, 1.0],
            &[0.4, 0.0],
        ],
        Kind::Float,
        dev,
    )
}

fn capped(policy: DropPolicy, factor: f64, pad: bool) -> MoeConfig {
    MoeConfig {
        pre_softmax: true,
        capacity_factor: Some(factor),
        drop_policy: policy,
        pad_to_capacity: pad,
        ..cfg(2, 1)
    }
}

/// Megatron-Core's probs policy takes the top C of the whole weight column, where unrouted
/// tokens weigh 0. An assignment whose sigmoid weight saturated to exactly 0.0 (f32) ties with
/// them and, ties going to the lower token index, loses the one place to token 0, which is not
/// routed there: it is dropped. Hand-worked: E=2, k=1, N=2, factor 1.0 gives C = 1; token 0
/// picks expert 1 (sigmoid(5)), token 1 picks expert 0 with weight sigmoid(-200) = 0.0.
#[test]
fn probs_policy_drops_a_zero_weight_assignment_behind_an_earlier_unrouted_token() {
    let c = MoeConfig {
        score_function: ScoreFunction::Sigmoid,
        capacity_factor: Some(1.0),
        drop_policy: DropPolicy::Probs,
        ..cfg(2, 1)
    };
    let x = logits(&[&[-5.0, 5.0], &[-200.0, -300.0]], Kind::Float, Device::Cpu);
    let r = run(&c, &x, None, 0, 1);
    assert_eq!(column(&r.routing_map_ne, 1), vec![0]);
    assert_eq!(
        column(&r.routing_map_ne, 0),
        Vec::<i64>::new(),
        "token 1 is dropped"
    );
    let (rows, kept, dropped) = r.host_counts().unwrap();
    assert_eq!((rows, kept, dropped), (vec![0, 1], 1, 1));
}

#[test]
fn probs_policy_keeps_highest_weights_ties_to_earlier_tokens() {
    for dev in devices() {
        let r = run(
            &capped(DropPolicy::Probs, 0.5, false),
            &drop_case(dev),
            None,
            0,
            1,
        );
        // Highest two of expert 0: token 2 (0.900), then tokens 1 and 3 tie at 0.701: token 1.
        assert_eq!(column(&r.routing_map_ne, 0), vec![1, 2]);
        assert_eq!(column(&r.routing_map_ne, 1), vec![4]);
        assert_eq!(
            {
                let c = r.host_counts().unwrap();
                (c.1, c.2)
            },
            (3, 3)
        );
        assert_eq!(r.host_counts().unwrap().0, vec![2, 1]);
        let p = dense(&r.probs_ne);
        let want = [
            [0.0, 0.0],
            [0.700567142474, 0.0],
            [0.90024951088, 0.0],
            [0.0, 0.0],
            [0.0, 0.73105857863],
            [0.0, 0.0],
        ];
        for (n, w) in want.iter().enumerate() {
            assert_close(
                &format!("probs row {n} (not renormalised)"),
                &p[n],
                w,
                Tol::Abs(TOL_F32),
            );
        }
        // Counts before dropping still see every selection.
        assert_eq!(flat(&r.topk_counts_e), vec![5.0, 1.0]);
    }
}

#[test]
fn position_policy_keeps_earliest_tokens() {
    for dev in devices() {
        let r = run(
            &capped(DropPolicy::Position, 0.5, false),
            &drop_case(dev),
            None,
            0,
            1,
        );
        assert_eq!(column(&r.routing_map_ne, 0), vec![0, 1]);
        assert_eq!(column(&r.routing_map_ne, 1), vec![4]);
        assert_eq!(
            {
                let c = r.host_counts().unwrap();
                (c.1, c.2)
            },
            (3, 3)
        );
        let p = dense(&r.probs_ne);
        assert_close("row 0", &p[0], &[0.598687660112, 0.0], Tol::Abs(TOL_F32));
        assert_close("row 2 dropped", &p[2], &[0.0, 0.0], Tol::Abs(TOL_F32));
    }
}

#[test]
fn pad_to_capacity_fills_each_expert_with_earliest_free_tokens() {
    for dev in devices() {
        for (policy, kept0) in [
            (DropPolicy::Probs, vec![1, 2]),
            (DropPolicy::Position, vec![0, 1]),
        ] {
            let r = run(&capped(policy, 0.5, true), &drop_case(dev), None, 0, 1);
            assert_eq!(column(&r.routing_map_ne, 0), kept0, "{policy:?}");
            // Expert 1 keeps token 4 and is padded with the earliest other token, 0, at weight 0.
            assert_eq!(column(&r.routing_map_ne, 1), vec![0, 4], "{policy:?}");
            assert_eq!(r.host_counts().unwrap().0, vec![2, 2]);
            assert_eq!(
                {
                    let c = r.host_counts().unwrap();
                    (c.1, c.2)
                },
                (3, 3),
                "padding is not counted as kept"
            );
            assert_eq!(dense(&r.probs_ne)[0][1], 0.0);
        }
        // C = ceil((2 / 2) * 3) = 3 exceeds the 2 tokens: padding stops at the group's tokens.
        let x = logits(&[&[1.0, 0.0], &[2.0, 0.0]], Kind::Float, dev);
        let r = run(&capped(DropPolicy::Probs, 3.0, true), &x, None, 0, 1);
        assert_eq!(r.host_counts().unwrap().0, vec![2, 2]);
        assert_eq!(
            {
                let c = r.host_counts().unwrap();
                (c.1, c.2)
            },
            (2, 0)
        );
    }
}

#[test]
fn capacity_at_least_tokens_drops_nothing() {
    for dev in devices() {
        let x = drop_case(dev);
        let dropless = run(
            &MoeConfig {
                capacity_factor: None,
                ..capped(DropPolicy::Probs, 1.0, false)
            },
            &x,
            None,
            0,
            1,
        );
        // C = ceil(3 * 2.0) = 6 >= 6 tokens.
        let big = run(&capped(DropPolicy::Probs, 2.0, false), &x, None, 0, 1);
        assert_eq!(
            {
                let c = big.host_counts().unwrap();
                (c.1, c.2)
            },
            (6, 0)
        );
        assert_eq!(
            big.host_counts().unwrap().0,
            dropless.host_counts().unwrap().0
        );
        assert_eq!(dense(&big.probs_ne), dense(&dropless.probs_ne));
    }
}

#[test]
fn capacity_groups_apply_the_limit_per_group() {
    for dev in devices() {
        let c = capped(DropPolicy::Probs, 0.5, false);
        // G = 2: groups {0,1,2} and {3,4,5}, C = ceil((3 / 2) * 0.5) = 1 per group.
        let r = run(&c, &drop_case(dev), None, 0, 2);
        assert_eq!(column(&r.routing_map_ne, 0), vec![2, 3]);
        assert_eq!(column(&r.routing_map_ne, 1), vec![4]);
        // G = 3: groups {0,1}, {2,3}, {4,5}, C = ceil((2 / 2) * 0.5) = 1.
        let r = run(&c, &drop_case(dev), None, 0, 3);
        assert_eq!(column(&r.routing_map_ne, 0), vec![1, 2, 5]);
        // Position policy, G = 2: the first expert-0 token of each group.
        let r = run(
            &capped(DropPolicy::Position, 0.5, false),
            &drop_case(dev),
            None,
            0,
            2,
        );
        assert_eq!(column(&r.routing_map_ne, 0), vec![0, 3]);
        // Padding per group: expert 1 gets the earliest free token of group 0 (token 0).
        let r = run(
            &capped(DropPolicy::Probs, 0.5, true),
            &drop_case(dev),
            None,
            0,
            2,
        );
        assert_eq!(column(&r.routing_map_ne, 1), vec![0, 4]);
        let err = route(
            &c,
            &RouterInput {
                logits_ne: &drop_case(dev),
                expert_bias_e: None,
                seq_len: 6,
                capacity_groups: 4,
            },
        );
        assert!(err.is_err(), "6 tokens do not split into 4 groups");
    }
}

#[test]
fn seq_aux_loss_matches_hand_value() {
    for dev in devices() {
        // Two sequences of 2 tokens, E = 2, k = 1. Softmax routing: s = torch.softmax(x, -1).
        // Seq 0 picks {0, 1}: E/(k T^2) * sum_e c_e P_e = 2/4 * (1 * P_0 + 1 * P_1) = 0.5 * 2 = 1.
        // Seq 1 picks {0, 0}: 2/4 * 2 * (s[2, 0] + s[3, 0]) = torch.sigmoid(3.) + torch.sigmoid(2.)
        //   = 1.8333712048003157. Mean over sequences: 1.416685602400158, times coeff 0.01.
        // Sigmoid routing (Megatron-Core): s = torch.sigmoid(x); s = s / s.sum(-1, keepdim=True)
        //   with the same picks gives 1.14683689945175 (seq 0 is 1 again; seq 1 differs).
        let x = logits(
            &[&[1.0, 0.0], &[0.0, 2.0], &[3.0, 0.0], &[2.0, 0.0]],
            Kind::Float,
            dev,
        );
        for (score_function, want) in [
            (ScoreFunction::Softmax, 1.416685602400158),
            (ScoreFunction::Sigmoid, 1.14683689945175),
        ] {
            let c = MoeConfig {
                aux_loss: AuxLossKind::SeqAuxLoss,
                score_function,
                ..cfg(2, 1)
            };
            let r = run(&c, &x, None, 2, 1);
            let got = scalar(r.seq_aux_loss.as_ref().unwrap());
            assert!(
                (got - 0.01 * want).abs() < 1e-8,
                "{score_function:?}: {got}"
            );
            // aux_loss() leaves the sequence-level kind to route().
            let zero = aux_loss(&c, &r.aux_stats, &r.aux_stats.counts_e, 4).unwrap();
            assert_eq!(scalar(&zero), 0.0);
        }
        assert!(run(&cfg(2, 1), &x, None, 2, 1).seq_aux_loss.is_none());
        let bad = route(
            &MoeConfig {
                aux_loss: AuxLossKind::SeqAuxLoss,
                ..cfg(2, 1)
            },
            &RouterInput {
                logits_ne: &x,
                expert_bias_e: None,
                seq_len: 3,
                capacity_groups: 1,
            },
        );
        assert!(bad.is_err(), "seq_len 3 does not divide 4 tokens");
    }
}

#[test]
fn sigmoid_aux_loss_uses_sigmoid_scores_normalised_over_all_experts() {
    // Megatron-Core's compute_routing_scores_for_aux_loss for score_function "sigmoid":
    //   X = torch.tensor([[1., 3., 2., 0.], [.5, -1., 2., 1.], [0., .1, -2., 4.]], dtype=torch.float64)
    //   s = torch.sigmoid(X); s = s / s.sum(-1, keepdim=True)
    //   top-2 of s (no ties): [[1, 2], [2, 3], [3, 1]] -> c = [0, 2, 2, 2]
    //   P = s.sum(0) = [0.7223842903581997, 0.6651954364573847, 0.6953505440989642, 0.9170697290854514]
    //   aux = E / (k N^2) * (c * P).sum() = 1.012273648729689 (a softmax of X would give
    //   1.2263436023711451 with the same counts).
    let x_rows: [&[f64]; 3] = [
        &[1.0, 3.0, 2.0, 0.0],
        &[0.5, -1.0, 2.0, 1.0],
        &[0.0, 0.1, -2.0, 4.0],
    ];
    for dev in devices() {
        let x = logits(&x_rows, Kind::Float, dev);
        let c = MoeConfig {
            score_function: ScoreFunction::Sigmoid,
            aux_loss_coeff: 1.0,
            ..cfg(4, 2)
        };
        // Also with a bias that changes the selection but must not enter the loss.
        let bias = Tensor::from_slice(&[5.0f32, 0.0, 0.0, 0.0]).to_device(dev);
        for b in [None, Some(&bias)] {
            let r = run(&c, &x, b, 0, 1);
            assert_close(
                "counts",
                &flat(&r.aux_stats.counts_e),
                &[0.0, 2.0, 2.0, 2.0],
                Tol::Abs(0.0),
            );
            assert_close(
                "probsum",
                &flat(&r.aux_stats.probsum_e),
                &[
                    0.7223842903581997,
                    0.6651954364573847,
                    0.6953505440989642,
                    0.9170697290854514,
                ],
                Tol::Abs(TOL_F32),
            );
            let aux = aux_loss(&c, &r.aux_stats, &r.aux_stats.counts_e, 3).unwrap();
            assert!(
                (scalar(&aux) - 1.012273648729689).abs() < 1e-6,
                "{}",
                scalar(&aux)
            );
        }
    }
}

#[test]
fn sigmoid_renormalises_by_default_whenever_k_exceeds_one() {
    // Megatron-Core: probs = scores / (scores.sum(-1) + 1e-20) if topk > 1 else scores.
    // s = torch.sigmoid(torch.tensor([1., 3., 2., 0.], dtype=torch.float64))
    // k = 2: s[[1, 2]] / s[[1, 2]].sum() = [0.5195751544086155, 0.48042484559138454]
    // k = 1: s[1] = 0.9525741268224334, not renormalised (it would be 1).
    for dev in devices() {
        let x = logits(&[&[1.0, 3.0, 2.0, 0.0]], Kind::Float, dev);
        let sig = |k: i64, norm: Option<bool>| MoeConfig {
            score_function: ScoreFunction::Sigmoid,
            norm_topk_prob: norm,
            ..cfg(4, k)
        };
        assert!(sig(2, None).renormalises_topk());
        let r = run(&sig(2, None), &x, None, 0, 1);
        assert_close(
            "k=2 default",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.5195751544086155, 0.48042484559138454, 0.0],
            Tol::Abs(TOL_F32),
        );
        let r = run(&sig(1, None), &x, None, 0, 1);
        assert_close(
            "k=1 default",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.9525741268224334, 0.0, 0.0],
            Tol::Abs(TOL_F32),
        );
        // The explicit key overrides the rule both ways.
        let r = run(&sig(2, Some(false)), &x, None, 0, 1);
        assert_close(
            "k=2 forced off",
            &dense(&r.probs_ne)[0],
            &[0.0, 0.9525741268224334, 0.8807970779778823, 0.0],
            Tol::Abs(TOL_F32),
        );
        let r = run(&sig(1, Some(true)), &x, None, 0, 1);
        assert_close(
            "k=1 forced on",
            &dense(&r.probs_ne)[0],
            &[0.0, 1.0, 0.0, 0.0],
            Tol::Abs(TOL_F32),
        );
        // Pre-softmax keeps its default: not renormalised.
        assert!(!MoeConfig {
            pre_softmax: true,
            ..cfg(4, 2)
        }
        .renormalises_topk());
    }
}

#[test]
fn z_loss_matches_hand_value() {
    for dev in devices() {
        // (torch.logsumexp(x, -1) ** 2).mean() with x = [[0, 0, 0], [1, 2, 3]] = 6.409363684864748
        let x = logits(&[&[0.0, 0.0, 0.0], &[1.0, 2.0, 3.0]], Kind::Float, dev);
        let r = run(
            &MoeConfig {
                z_loss_coeff: 0.001,
                ..cfg(3, 1)
            },
            &x,
            None,
            0,
            1,
        );
        assert!(
            (scalar(&r.z_loss) - 0.001 * 6.409363684864748).abs() < 1e-8,
            "{}",
            scalar(&r.z_loss)
        );
        let r = run(&cfg(3, 1), &x, None, 0, 1);
        assert_eq!(scalar(&r.z_loss), 0.0);
    }
}

#[test]
fn balanced_aux_is_coeff_and_collapsed_is_e_coeff_exactly() {
    // Logits 0 on the chosen experts and -1e4 elsewhere make softmax exactly 0 and 1/k, and
    // with N a power of two every product below is exact, in float32 as in float64.
    for dev in devices() {
        for kind in [Kind::Float, Kind::Double] {
            let coeff = 0.01;
            let (n, e) = (16i64, 4i64);
            // Balanced top-2: token n prefers experts n%4 and (n+1)%4.
            let rows: Vec<Vec<f64>> = (0..n)
                .map(|t| {
                    (0..e)
                        .map(|x| {
                            if x == t % e || x == (t + 1) % e {
                                0.0
                            } else {
                                -1e4
                            }
                        })
                        .collect()
                })
                .collect();
            let refs: Vec<&[f64]> = rows.iter().map(|r| r.as_slice()).collect();
            let c = MoeConfig {
                aux_loss_coeff: coeff,
                ..cfg(e, 2)
            };
            let r = run(&c, &logits(&refs, kind, dev), None, 0, 1);
            let aux = scalar(&aux_loss(&c, &r.aux_stats, &r.aux_stats.counts_e, n).unwrap());
            let want = if kind == Kind::Float {
                f64::from(coeff as f32)
            } else {
                coeff
            };
            assert_eq!(aux, want, "balanced {kind:?}");
            // Collapsed top-1: every token on expert 0 with probability 1.
            let rows: Vec<Vec<f64>> = (0..n).map(|_| vec![0.0, -1e4, -1e4, -1e4]).collect();
            let refs: Vec<&[f64]> = rows.iter().map(|r| r.as_slice()).collect();
            let c = MoeConfig {
                aux_loss_coeff: coeff,
                ..cfg(e, 1)
            };
            let r = run(&c, &logits(&refs, kind, dev), None, 0, 1);
            let aux = scalar(&aux_loss(&c, &r.aux_stats, &r.aux_stats.counts_e, n).unwrap());
            let want = if kind == Kind::Float {
                f64::from((e as f64 * coeff) as f32)
            } else {
                e as f64 * coeff
            };
            assert_eq!(aux, want, "collapsed {kind:?}");
        }
    }
}

/// Eight tokens, four experts: well-separated float64 logits (rows differ by > 0.05), so a
/// finite-difference step of 1e-5 never changes a selection or a capacity decision.
const X: [[f64; 4]; 8] = [
    [0.0, 0.45, -0.41, -1.34],
    [-0.68, -1.49, 0.09, 2.01],
    [-0.74, -0.93, 0.73, 0.54],
    [0.16, -1.4, -0.04, 1.04],
    [-2.02, -0.69, -2.85, -1.93],
    [-2.76, -0.35, -1.9, 0.41],
    [0.24, -0.28, -3.78, -0.81],
    [-0.07, 0.17, -2.3, -0.72],
];

fn x_f64(dev: Device) -> Tensor {
    let refs: Vec<&[f64]> = X.iter().map(|r| r.as_slice()).collect();
    logits(&refs, Kind::Double, dev)
}

/// Every differentiable output of `route` folded into one scalar: `sum(probs * w)` with fixed
/// weights w, plus the global aux loss (one rank), the sequence-level loss and the z-loss.
fn total_loss(c: &MoeConfig, x: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let r = run(c, x, bias, 4, 1);
    let w = Tensor::arange(32, (Kind::Double, x.device()))
        .reshape([8, 4])
        .sin();
    let aux = aux_loss(c, &r.aux_stats, &r.aux_stats.counts_e, 8).unwrap();
    let seq = r.seq_aux_loss.unwrap_or_else(|| aux.zeros_like());
    (r.probs_ne * w).sum(Kind::Double) + aux + seq + r.z_loss
}

#[test]
fn gradients_match_central_finite_differences() {
    let cases = [
        MoeConfig {
            aux_loss_coeff: 0.3,
            z_loss_coeff: 0.1,
            ..cfg(4, 2)
        },
        MoeConfig {
            pre_softmax: true,
            norm_topk_prob: Some(true),
            aux_loss: AuxLossKind::SeqAuxLoss,
            aux_loss_coeff: 0.3,
            z_loss_coeff: 0.05,
            capacity_factor: Some(0.75),
            drop_policy: DropPolicy::Probs,
            ..cfg(4, 2)
        },
        MoeConfig {
            score_function: ScoreFunction::Sigmoid,
            norm_topk_prob: Some(true),
            route_scale: 2.5,
            aux_loss_coeff: 0.3,
            z_loss_coeff: 0.02,
            capacity_factor: Some(1.0),
            drop_policy: DropPolicy::Position,
            pad_to_capacity: true,
            ..cfg(4, 2)
        },
    ];
    for dev in devices() {
        let bias = Tensor::from_slice(&[0.3f64, -0.2, 0.1, 0.0]).to_device(dev);
        for (i, c) in cases.iter().enumerate() {
            let b = (i == 2).then_some(&bias);
            let x = x_f64(dev).set_requires_grad(true);
            total_loss(c, &x, b).backward();
            let grad = flat(&x.grad());
            // Central differences in float64 with h = 1e-5: truncation O(h^2) ~ 1e-10 and
            // rounding ~ 1e-16 / h ~ 1e-11, so 1e-7 leaves a wide margin yet catches any
            // missing or wrong gradient term (they are all of order 1e-2 or more).
            let h = 1e-5;
            let fd: Vec<f64> = (0..32)
                .map(|j| {
                    let eval = |d: f64| {
                        let xp = x_f64(dev).reshape([-1]);
                        let _ = xp.get(j).fill_(X[j as usize / 4][j as usize % 4] + d);
                        scalar(&tch::no_grad(|| total_loss(c, &xp.reshape([8, 4]), b)))
                    };
                    (eval(h) - eval(-h)) / (2.0 * h)
                })
                .collect();
            assert_close(&format!("case {i} on {dev:?}"), &grad, &fd, Tol::Abs(1e-7));
            assert!(
                grad.iter().any(|g| g.abs() > 1e-3),
                "case {i}: gradient must not vanish"
            );
        }
    }
}

#[test]
fn per_rank_aux_mean_equals_single_process() {
    for dev in devices() {
        let c = MoeConfig {
            aux_loss_coeff: 0.3,
            ..cfg(4, 2)
        };
        // Single process on all 8 tokens.
        let x = x_f64(dev).set_requires_grad(true);
        let r = run(&c, &x, None, 0, 1);
        let single = aux_loss(&c, &r.aux_stats, &r.aux_stats.counts_e, 8).unwrap();
        single.backward();
        let grad_single = flat(&x.grad());
        // Two ranks of 4 tokens: counts and token numbers summed, each rank its own P^local.
        let x = x_f64(dev).set_requires_grad(true);
        let halves = [x.narrow(0, 0, 4), x.narrow(0, 4, 4)];
        let rs: Vec<Routing> = halves.iter().map(|h| run(&c, h, None, 0, 1)).collect();
        let global_counts = &rs[0].aux_stats.counts_e + &rs[1].aux_stats.counts_e;
        let per_rank: Vec<Tensor> = rs
            .iter()
            .map(|r| aux_loss(&c, &r.aux_stats, &global_counts, 8).unwrap())
            .collect();
        let mean = (&per_rank[0] + &per_rank[1]) / 2.0;
        // float64 sums of 8 terms in a different order: 1e-14 relative.
        let (s, m) = (scalar(&single), scalar(&mean));
        assert!((s - m).abs() <= 1e-14 * s.abs(), "single {s} vs mean {m}");
        // Hand check of the single-process value: coeff * E / (k N^2) * sum_e c_e P_e.
        let manual = 0.3 * 4.0 / (2.0 * 64.0)
            * scalar(&(&r.aux_stats.counts_e * &r.aux_stats.probsum_e).sum(Kind::Double));
        assert!((s - manual).abs() <= 1e-14 * s.abs());
        // A single rank's value alone is not the global loss (guards against a 1/W slip).
        assert!((scalar(&per_rank[0]) - s).abs() > 1e-6);
        mean.backward();
        assert_close(
            "gradient of the mean over ranks",
            &flat(&x.grad()),
            &grad_single,
            Tol::Abs(1e-14),
        );
    }
}

#[test]
fn update_expert_bias_follows_the_sign_of_the_load_gap() {
    for dev in devices() {
        // mean(load) = 3: underloaded expert 0 up, overloaded expert 1 down, 2 and 3 unchanged.
        let load = Tensor::from_slice(&[1.0f32, 5.0, 3.0, 3.0]).to_device(dev);
        let bias = Tensor::zeros([4], (Kind::Float, dev));
        update_expert_bias(&bias, &load, 0.1).unwrap();
        assert_close(
            "first update",
            &flat(&bias),
            &[0.1, -0.1, 0.0, 0.0],
            Tol::Abs(1e-7),
        );
        update_expert_bias(&bias, &load, 0.1).unwrap();
        assert_close(
            "second update",
            &flat(&bias),
            &[0.2, -0.2, 0.0, 0.0],
            Tol::Abs(1e-7),
        );
        // A bias that requires grad is updated in place too (under no_grad).
        let leaf = Tensor::zeros([4], (Kind::Float, dev)).set_requires_grad(true);
        update_expert_bias(&leaf, &load.to_kind(Kind::Double), 0.5).unwrap();
        assert_close(
            "grad leaf",
            &flat(&leaf),
            &[0.5, -0.5, 0.0, 0.0],
            Tol::Abs(1e-7),
        );
    }
}

#[test]
fn rejects_bad_inputs() {
    let x = logits(&[&[1.0, 0.0, 0.5]], Kind::Float, Device::Cpu);
    let input = |logits_ne| RouterInput {
        logits_ne,
        expert_bias_e: None,
        seq_len: 1,
        capacity_groups: 1,
    };
    assert!(
        route(&cfg(4, 2), &input(&x)).is_err(),
        "3 experts in the logits, 4 configured"
    );
    assert!(route(&cfg(3, 4), &input(&x)).is_err(), "top_k > E");
    let bias = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    let bad_bias = RouterInput {
        expert_bias_e: Some(&bias),
        ..input(&x)
    };
    assert!(
        route(&cfg(3, 1), &bad_bias).is_err(),
        "bias of the wrong length"
    );
    assert!(route(&cfg(3, 1), &input(&x)).is_ok());
}
