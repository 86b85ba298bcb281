//! Group-limited routing (Megatron-Core `group_limited_topk`, DeepSeek-V3's node-limited
//! routing) against its PyTorch reference, and the all-to-all traffic it saves.
//!
//! Expected values come from Megatron-Core's function, quoted here and run in float64:
//!
//! ```python
//! def group_limited_topk(scores, topk, num_tokens, num_experts, num_groups, group_topk):
//!     group_scores = scores.view(num_tokens, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
//!     group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
//!     group_mask = torch.zeros_like(group_scores); group_mask.scatter_(1, group_idx, 1)
//!     score_mask = group_mask.unsqueeze(-1).expand(num_tokens, num_groups, num_experts // num_groups).reshape(num_tokens, -1)
//!     return torch.topk(scores.masked_fill(~score_mask.bool(), float('-inf')), k=topk, dim=-1)
//! X = torch.tensor([[3, -3, 2.5, -3, 2, 1.9, 0, 0.1], [0, 1, 2, 3, -1, -2, 0.5, 0.4]], dtype=torch.float64)
//! ```
//!
//! float32 results are compared to 1e-6: a few ulps of weights of order 1.

use moe_model::config::{MoeConfig, ScoreFunction};
use moe_model::router::{dispatch_traffic, route, DispatchTraffic, RouterInput, Routing};
use tch::{Device, Kind, Tensor};

const TOL_F32: f64 = 1e-6;

const X: [[f64; 8]; 2] = [
    [3.0, -3.0, 2.5, -3.0, 2.0, 1.9, 0.0, 0.1],
    [0.0, 1.0, 2.0, 3.0, -1.0, -2.0, 0.5, 0.4],
];

fn devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    if tch::Cuda::is_available() {
        d.push(Device::Cuda(0));
    }
    d
}

fn x(dev: Device) -> Tensor {
    let flat: Vec<f64> = X.iter().flatten().copied().collect();
    Tensor::from_slice(&flat)
        .reshape([2, 8])
        .to_kind(Kind::Float)
        .to_device(dev)
}

fn grouped(score_function: ScoreFunction, k: i64, groups: i64, group_topk: i64) -> MoeConfig {
    MoeConfig {
        num_experts: 8,
        top_k: k,
        score_function,
        num_groups: Some(groups),
        group_topk: Some(group_topk),
        z_loss_coeff: 0.0,
        ..MoeConfig::default()
    }
}

fn run(cfg: &MoeConfig, logits_ne: &Tensor, bias_e: Option<&Tensor>) -> Routing {
    route(
        cfg,
        &RouterInput {
            logits_ne,
            expert_bias_e: bias_e,
            seq_len: logits_ne.size()[0],
            capacity_groups: 1,
        },
    )
    .unwrap()
}

fn dense(t: &Tensor) -> Vec<Vec<f64>> {
    Vec::<Vec<f64>>::try_from(&t.to_kind(Kind::Double).to_device(Device::Cpu)).unwrap()
}

/// `(expert, weight)` of each selected expert of row `n`, ascending expert id.
fn picks(r: &Routing, n: usize) -> Vec<(usize, f64)> {
    dense(&r.probs_ne)[n]
        .iter()
        .enumerate()
        .filter(|(_, w)| **w != 0.0)
        .map(|(e, w)| (e, *w))
        .collect()
}

fn assert_picks(got: &[(usize, f64)], want: &[(usize, f64)], what: &str) {
    assert_eq!(
        got.iter().map(|p| p.0).collect::<Vec<_>>(),
        want.iter().map(|p| p.0).collect::<Vec<_>>(),
        "{what}: experts"
    );
    for (g, w) in got.iter().zip(want) {
        assert!((g.1 - w.1).abs() <= TOL_F32, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn sigmoid_groups_follow_megatron() {
    // s = torch.sigmoid(X); group_limited_topk(s, 4, 2, 8, 4, 2): groups scored by the sum of
    // their top 4 // 2 = 2 scores. Row 0 keeps groups {2, 3} -> experts [4, 5, 7, 6] (plain
    // top-4 would be [0, 2, 4, 5], over three groups); row 1 keeps {0, 1} -> [3, 2, 1, 0].
    // w = s.gather(1, idx); w / w.sum(-1, keepdim=True) (Megatron renormalises for k > 1):
    for dev in devices() {
        let c = grouped(ScoreFunction::Sigmoid, 4, 4, 2);
        let r = run(&c, &x(dev), None);
        assert_picks(
            &picks(&r, 0),
            &[
                (4, 0.31732798889119984),
                (5, 0.31339900561161843),
                (6, 0.18013683107334755),
                (7, 0.18913617442383412),
            ],
            "row 0",
        );
        assert_picks(
            &picks(&r, 1),
            &[
                (0, 0.16316249199232763),
                (1, 0.23856267896328118),
                (2, 0.2874260923648636),
                (3, 0.31084873667952756),
            ],
            "row 1",
        );
    }
}

#[test]
fn groups_rank_by_the_biased_scores() {
    // b = [0, 0, 1, 0, 0, 0, 0, 0]; group_limited_topk(s + b, 4, 2, 8, 4, 2): row 0 now
    // keeps groups {1, 2} -> experts [2, 4, 5, 3]; the weights are the unbiased s there,
    // renormalised: [0.3394764192757513, 0.32355406029276934, 0.3195479891694093,
    // 0.017421531262070102].
    for dev in devices() {
        let bias = Tensor::from_slice(&[0.0f32, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]).to_device(dev);
        let c = grouped(ScoreFunction::Sigmoid, 4, 4, 2);
        let r = run(&c, &x(dev), Some(&bias));
        assert_picks(
            &picks(&r, 0),
            &[
                (2, 0.3394764192757513),
                (3, 0.017421531262070102),
                (4, 0.32355406029276934),
                (5, 0.3195479891694093),
            ],
            "row 0",
        );
    }
}

#[test]
fn softmax_groups_rank_the_logits() {
    // Post-softmax routing selects on the logits: group_limited_topk(X, 2, 2, 8, 4, 1) scores
    // each group by its top 2 // 1 = 2 logits: row 0 keeps group 2 -> experts [4, 5]
    // (plain top-2 is [0, 2]), torch.softmax(torch.tensor([2., 1.9]), 0) =
    // [0.52497918747894, 0.47502081252106]; row 1 keeps group 1 -> [3, 2],
    // torch.softmax(torch.tensor([3., 2.]), 0) = [0.7310585786300049, 0.2689414213699951].
    for dev in devices() {
        let c = grouped(ScoreFunction::Softmax, 2, 4, 1);
        let r = run(&c, &x(dev), None);
        assert_picks(
            &picks(&r, 0),
            &[(4, 0.52497918747894), (5, 0.47502081252106)],
            "row 0",
        );
        assert_picks(
            &picks(&r, 1),
            &[(2, 0.2689414213699951), (3, 0.7310585786300049)],
            "row 1",
        );
        // The balancing loss ignores the groups (Megatron's compute_routing_scores_for_aux_loss):
        // its counts are the plain top-2 of softmax(X): row 0 {0, 2}, row 1 {2, 3}.
        let counts = Vec::<f64>::try_from(
            &r.aux_stats
                .counts_e
                .to_kind(Kind::Double)
                .to_device(Device::Cpu),
        )
        .unwrap();
        assert_eq!(counts, vec![1.0, 0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }
}

#[test]
fn bad_groups_are_rejected_with_the_keys() {
    let msg = |c: MoeConfig| {
        let errs = MoeConfig::validate(&Default::default(), &c);
        assert!(!errs.is_empty(), "{c:?} must be rejected");
        errs.join("; ")
    };
    let base = grouped(ScoreFunction::Sigmoid, 4, 4, 2);
    assert!(MoeConfig::validate(&Default::default(), &base).is_empty());
    assert!(msg(MoeConfig {
        group_topk: Some(5),
        ..base.clone()
    })
    .contains("moe.group_topk (5) must be in 1..=moe.num_groups (4)"));
    assert!(msg(MoeConfig {
        num_groups: Some(3),
        group_topk: Some(1),
        ..base.clone()
    })
    .contains("moe.num_experts (8) must be divisible by moe.num_groups (3)"));
    assert!(msg(MoeConfig {
        group_topk: None,
        ..base.clone()
    })
    .contains("moe.num_groups (4) and moe.group_topk (null) go together"));
    assert!(msg(MoeConfig {
        top_k: 1,
        ..base.clone()
    })
    .contains("moe.group_topk (2) must be <= moe.top_k (1)"));
    assert!(msg(MoeConfig {
        top_k: 6,
        group_topk: Some(2),
        num_groups: Some(4),
        ..base.clone()
    })
    .contains("moe.top_k (6) must be <= moe.group_topk * moe.num_experts / moe.num_groups (4)"));
    // route() refuses such a config too instead of selecting outside the groups.
    let bad = MoeConfig { top_k: 6, ..base };
    let err = route(
        &bad,
        &RouterInput {
            logits_ne: &x(Device::Cpu),
            expert_bias_e: None,
            seq_len: 2,
            capacity_groups: 1,
        },
    );
    assert!(err.is_err());
}

#[test]
fn traffic_counts_rows_and_token_rank_pairs_by_hand() {
    // E = 8 over P = 4 ranks (2 experts each), from rank 0. Token 0 -> experts {0, 2, 3}
    // (ranks 0, 1, 1): 2 remote rows, 1 remote (token, rank) pair; token 1 -> {4, 5, 7}
    // (ranks 2, 2, 3): 3 rows, 2 pairs; token 2 -> {1} (rank 0): nothing remote.
    let mut map = vec![0i64; 24];
    for (n, es) in [(0usize, &[0usize, 2, 3][..]), (1, &[4, 5, 7]), (2, &[1])] {
        for &e in es {
            map[n * 8 + e] = 1;
        }
    }
    let map_ne = Tensor::from_slice(&map).reshape([3, 8]).to_kind(Kind::Bool);
    let t = dispatch_traffic(&map_ne, 4, 0).unwrap();
    assert_eq!(
        t,
        DispatchTraffic {
            remote_rows: 5,
            remote_token_ranks: 3,
            max_ranks_per_token: 2
        }
    );
    assert_eq!(t.bytes(16, 4), (5 * 64, 3 * 64));
    // From rank 1, token 0's rows to rank 1 are local, its row to rank 0 is not.
    let t1 = dispatch_traffic(&map_ne, 4, 1).unwrap();
    assert_eq!(
        (t1.remote_rows, t1.remote_token_ranks),
        (1 + 3 + 1, 1 + 2 + 1)
    );
    assert!(
        dispatch_traffic(&map_ne, 3, 0).is_err(),
        "8 experts over 3 ranks"
    );
}

/// DeepSeek-V3's routing shape scaled down: 64 experts in 8 groups on 8 ranks, top-8 within
/// top-4 groups, random logits: every token reaches at most 4 ranks, and the deduplicated
/// dispatch shrinks while the per-assignment row count stays N*k. Prints both volumes at
/// d = 7168, bf16 (the numbers BENCHMARKS.md quotes).
#[test]
fn group_limiting_bounds_the_ranks_per_token() {
    tch::manual_seed(11);
    let logits_ne = Tensor::randn([4096, 64], (Kind::Float, Device::Cpu));
    let mut sizes = Vec::new();
    for limit in [None, Some((8, 4))] {
        let c = MoeConfig {
            num_experts: 64,
            top_k: 8,
            score_function: ScoreFunction::Sigmoid,
            num_groups: limit.map(|l: (i64, i64)| l.0),
            group_topk: limit.map(|l| l.1),
            ..MoeConfig::default()
        };
        let r = run(&c, &logits_ne, None);
        let t = dispatch_traffic(&r.routing_map_ne, 8, 0).unwrap();
        let (rows_b, pairs_b) = t.bytes(7168, 2);
        println!(
            "groups {limit:?}: remote rows {} ({rows_b} B), remote (token, rank) pairs {} ({pairs_b} B), max ranks per token {}",
            t.remote_rows, t.remote_token_ranks, t.max_ranks_per_token
        );
        sizes.push(t);
    }
    assert!(sizes[1].max_ranks_per_token <= 4, "{:?}", sizes[1]);
    assert!(sizes[0].max_ranks_per_token > 4, "{:?}", sizes[0]);
    assert!(sizes[1].remote_token_ranks < sizes[0].remote_token_ranks);
    // Each token sends k = 8 rows either way; about 7/8 of them leave rank 0.
    for t in &sizes {
        assert!(
            (t.remote_rows as f64 / (4096.0 * 8.0) - 0.875).abs() < 0.02,
            "{t:?}"
        );
    }
}
