//! Local dispatcher: permute/unpermute against hand-computed values, token conservation,
//! empty experts and empty batches. Identity "experts" (y_md = x_md) make the expected output
//! `y_n = sum_k probs_{n,e} * x_n` computable by hand.

use moe_model::dispatcher::{permute, permute_topk, unpermute, Dispatcher};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Kind, Tensor};

/// Hand-built routing: `(token, expert, prob)` triples -> (probs_ne f32 leaf, map_ne bool).
fn routing(n: i64, e: i64, assignments: &[(i64, i64, f32)]) -> (Tensor, Tensor) {
    let mut probs = vec![0f32; (n * e) as usize];
    let mut map = vec![false; (n * e) as usize];
    for &(t, x, p) in assignments {
        probs[(t * e + x) as usize] = p;
        map[(t * e + x) as usize] = true;
    }
    let probs_ne = Tensor::from_slice(&probs)
        .reshape([n, e])
        .set_requires_grad(true);
    let map_ne = Tensor::from_slice(&map).reshape([n, e]);
    (probs_ne, map_ne)
}

fn to_vec2(t: &Tensor) -> Vec<Vec<f64>> {
    let t = t.to_kind(Kind::Double).contiguous();
    let (r, c) = (t.size()[0], t.size()[1]);
    let flat = Vec::<f64>::try_from(&t.reshape([-1])).unwrap();
    (0..r as usize)
        .map(|i| flat[i * c as usize..(i + 1) * c as usize].to_vec())
        .collect()
}

fn x_values(n: i64, d: i64) -> Tensor {
    let v: Vec<f32> = (0..n * d)
        .map(|i| ((i as f32) * 0.37).sin() + 0.1 * i as f32)
        .collect();
    Tensor::from_slice(&v)
        .reshape([n, d])
        .set_requires_grad(true)
}

/// Exact arithmetic on a few floats: the only rounding is one f32 product and sum per entry.
const TOL: f64 = 1e-6;

#[test]
fn identity_experts_give_weighted_sum_and_exact_gradients() {
    let (n, e, d) = (5, 4, 3);
    // Token 2 is fully dropped, expert 2 gets nothing, token 4 goes to expert 3 only.
    let assignments = [
        (0, 1, 0.7),
        (0, 3, 0.3),
        (1, 1, 0.5),
        (1, 0, 0.25),
        (3, 0, 1.0),
        (4, 3, 0.6),
    ];
    let (probs_ne, map_ne) = routing(n, e, &assignments);
    let x_nd = x_values(n, d);
    let disp = Dispatcher::local();
    let (x_md, rows, meta) = disp.dispatch_map(&x_nd, &probs_ne, &map_ne, e).unwrap();

    // Expert-major, by token within an expert.
    assert_eq!(rows, vec![2, 2, 0, 2]);
    assert_eq!(
        Vec::<i64>::try_from(meta.token_index()).unwrap(),
        vec![1, 3, 0, 1, 0, 4]
    );
    let xv = to_vec2(&x_nd);
    let xm = to_vec2(&x_md);
    for (row, tok) in [1usize, 3, 0, 1, 0, 4].iter().enumerate() {
        assert_eq!(xm[row], xv[*tok], "row {row} must be token {tok}");
    }

    let y_nd = disp.combine(&x_md, meta).unwrap();
    assert_eq!(y_nd.size(), vec![n, d]);
    let y = to_vec2(&y_nd);
    let mut expected = vec![vec![0f64; d as usize]; n as usize];
    for &(t, _, p) in &assignments {
        for j in 0..d as usize {
            expected[t as usize][j] += p as f64 * xv[t as usize][j];
        }
    }
    for (yr, er) in y.iter().zip(&expected) {
        for (a, b) in yr.iter().zip(er) {
            assert!((a - b).abs() <= TOL * (1.0 + b.abs()), "y {a} vs {b}");
        }
    }

    // loss = sum(y * g): dL/dx_n = (sum_e p_ne) g_n; dL/dp_ne = <g_n, x_n> where kept, else 0.
    let g_nd = x_values(n, d).detach().cos();
    (&y_nd * &g_nd).sum(Kind::Float).backward();
    let gx = to_vec2(&x_nd.grad());
    let gp = to_vec2(&probs_ne.grad());
    let gv = to_vec2(&g_nd);
    for t in 0..n as usize {
        let psum: f64 = assignments
            .iter()
            .filter(|a| a.0 as usize == t)
            .map(|a| a.2 as f64)
            .sum();
        for j in 0..d as usize {
            let want = psum * gv[t][j];
            assert!(
                (gx[t][j] - want).abs() <= TOL * (1.0 + want.abs()),
                "dx[{t}][{j}]"
            );
        }
        let dot: f64 = (0..d as usize).map(|j| gv[t][j] * xv[t][j]).sum();
        assert_eq!(gp[t].len(), e as usize);
        for (x, got) in gp[t].iter().enumerate() {
            let kept = assignments
                .iter()
                .any(|a| a.0 as usize == t && a.1 as usize == x);
            let want = if kept { dot } else { 0.0 };
            assert!(
                (got - want).abs() <= TOL * (1.0 + want.abs()),
                "dp[{t}][{x}] {got} vs {want}"
            );
        }
    }
}

#[test]
fn every_kept_assignment_is_served_exactly_once() {
    let (n, e, d, k) = (64i64, 8i64, 4i64, 3usize);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut assignments = Vec::new();
    for t in 0..n {
        let mut chosen: Vec<i64> = Vec::new();
        while chosen.len() < k {
            // Expert 5 is never chosen: an empty expert between busy ones.
            let x = rng.random_range(0..e);
            if x != 5 && !chosen.contains(&x) {
                chosen.push(x);
            }
        }
        for x in chosen {
            if rng.random_bool(0.8) {
                assignments.push((t, x, rng.random_range(0.05f32..1.0)));
            }
        }
    }
    let (probs_ne, map_ne) = routing(n, e, &assignments);
    // Column 0 carries the token id, so every row names its token.
    let ids: Vec<f32> = (0..n * d)
        .map(|i| if i % d == 0 { (i / d) as f32 } else { 0.5 })
        .collect();
    let x_nd = Tensor::from_slice(&ids).reshape([n, d]);
    let (x_md, rows, meta) = Dispatcher::local()
        .dispatch_map(&x_nd, &probs_ne, &map_ne, e)
        .unwrap();

    assert_eq!(rows.iter().sum::<i64>(), assignments.len() as i64);
    assert_eq!(rows[5], 0);
    let tokens = Vec::<f32>::try_from(&x_md.select(1, 0).contiguous()).unwrap();
    let mut served: Vec<(i64, i64)> = Vec::new();
    let mut row = 0usize;
    for (x, &cnt) in rows.iter().enumerate() {
        for _ in 0..cnt {
            served.push((tokens[row] as i64, x as i64));
            row += 1;
        }
    }
    let mut want: Vec<(i64, i64)> = assignments.iter().map(|a| (a.0, a.1)).collect();
    want.sort_by_key(|&(t, x)| (x, t));
    // Same list in the same order: each assignment once, expert-major, stable by token.
    assert_eq!(served, want);
    assert_eq!(meta.sent_per_expert(), rows.as_slice());
}

#[test]
fn empty_batch_and_no_kept_assignment() {
    let (e, d) = (4, 3);
    for n in [0i64, 3] {
        let (probs_ne, map_ne) = routing(n, e, &[]);
        let x_nd = x_values(n, d);
        let disp = Dispatcher::local();
        let (x_md, rows, meta) = disp.dispatch_map(&x_nd, &probs_ne, &map_ne, e).unwrap();
        assert_eq!(x_md.size(), vec![0, d]);
        assert_eq!(rows, vec![0; e as usize]);
        let y_nd = disp.combine(&x_md, meta).unwrap();
        assert_eq!(y_nd.size(), vec![n, d]);
        if n > 0 {
            assert_eq!(y_nd.abs().sum(Kind::Float).double_value(&[]), 0.0);
            (&y_nd * 1.5).sum(Kind::Float).backward();
            assert_eq!(x_nd.grad().abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
    }
}

#[test]
fn combine_keeps_the_input_dtype_and_checks_row_count() {
    let (probs_ne, map_ne) = routing(2, 2, &[(0, 0, 0.5), (1, 1, 0.25)]);
    let x_nd = x_values(2, 4).detach().to_kind(Kind::Double);
    let disp = Dispatcher::local();
    let (x_md, _, meta) = disp.dispatch_map(&x_nd, &probs_ne, &map_ne, 2).unwrap();
    // Experts computing in f32 on f64 input: the combined output returns to f64.
    let y_nd = disp.combine(&x_md.to_kind(Kind::Float), meta).unwrap();
    assert_eq!(y_nd.kind(), Kind::Double);
    let want = &x_nd * Tensor::from_slice(&[0.5f64, 0.25]).unsqueeze(1);
    assert!((y_nd - want).abs().max().double_value(&[]) < 1e-6);

    let (_, _, meta) = disp.dispatch_map(&x_nd, &probs_ne, &map_ne, 2).unwrap();
    assert!(disp
        .combine(
            &Tensor::zeros([3, 4], (Kind::Double, tch::Device::Cpu)),
            meta
        )
        .is_err());
    assert!(
        disp.dispatch_map(&x_nd, &probs_ne, &map_ne, 3).is_err(),
        "num_experts must match the map"
    );
}

#[test]
fn permuting_from_the_topk_indices_equals_permuting_from_the_map() {
    // A routing that keeps every token's k experts reaches the dispatcher in both forms: the
    // `[N, k]` one must give the same rows, order, weights and gradients, bit for bit.
    let (n, e, k, d) = (37i64, 9i64, 3i64, 5i64);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut idx = Vec::new();
    let mut w = Vec::new();
    for _ in 0..n {
        let mut experts: Vec<i64> = (0..e).collect();
        for j in 0..k as usize {
            let pick = rng.random_range(j..e as usize);
            experts.swap(j, pick);
            idx.push(experts[j]);
            w.push(rng.random_range(0.05f32..1.0));
        }
    }
    let idx_nk = Tensor::from_slice(&idx).reshape([n, k]);
    let counts: Vec<i64> = (0..e)
        .map(|x| idx.iter().filter(|&&i| i == x).count() as i64)
        .collect();
    let dy_nd = x_values(n, d).detach() * 0.3 - 1.0;
    let run = |from_topk: bool| {
        let x_nd = x_values(n, d);
        let w_nk = Tensor::from_slice(&w)
            .reshape([n, k])
            .set_requires_grad(true);
        let probs_ne =
            Tensor::zeros([n, e], (Kind::Float, tch::Device::Cpu)).scatter(1, &idx_nk, &w_nk);
        let map_ne =
            Tensor::zeros([n, e], (Kind::Bool, tch::Device::Cpu)).scatter_value(1, &idx_nk, 1);
        let (x_md, perm) = if from_topk {
            permute_topk(&x_nd, &idx_nk, &w_nk, &counts).unwrap()
        } else {
            permute(&x_nd, &probs_ne, &map_ne, &counts).unwrap()
        };
        // A per-row nonlinearity stands in for the experts.
        let y_md = (&x_md * 1.7).sin();
        let y_nd = unpermute(&y_md, &perm, Kind::Float).unwrap();
        (&y_nd * &dy_nd).sum(Kind::Float).backward();
        (x_md.detach(), perm, y_nd.detach(), x_nd.grad(), w_nk.grad())
    };
    let (xa, pa, ya, gxa, gwa) = run(true);
    let (xb, pb, yb, gxb, gwb) = run(false);
    assert!(pa.token_idx_m.equal(&pb.token_idx_m));
    assert!(pa.probs_m.detach().equal(&pb.probs_m.detach()));
    assert_eq!(pa.counts_e, pb.counts_e);
    assert!(xa.equal(&xb));
    assert!(ya.equal(&yb));
    assert!(gxa.equal(&gxb));
    assert!(gwa.equal(&gwb));
    assert!(
        permute_topk(
            &x_values(n, d),
            &idx_nk,
            &idx_nk.to_kind(Kind::Float),
            &counts[1..]
        )
        .is_err(),
        "counts must cover the N k assignments"
    );
}
