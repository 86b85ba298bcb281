//! Shared fixtures of the checkpoint tests: a tiny synthetic MoE model state whose expert
//! slices are cut from global stacked tensors, so any expert-parallel layout can be
//! compared against the same global truth.
#![allow(dead_code)]

use moe_model::param::{Param, ParamKind};
use moe_trainer::checkpoint::{Checkpointer, ExpertSlot, Snapshot};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tch::{Kind, Tensor};

/// Model sizes: d model, h hidden, e experts, v vocab.
#[derive(Debug, Clone, Copy)]
pub struct Fx {
    pub d: i64,
    pub h: i64,
    pub e: i64,
    pub v: i64,
}

pub const FX: Fx = Fx {
    d: 8,
    h: 12,
    e: 8,
    v: 16,
};

pub const EXPERT_PARAMS: [&str; 3] = [
    "layers.1.moe.experts.w_gate",
    "layers.1.moe.experts.w_up",
    "layers.1.moe.experts.w_down",
];

/// Distinct, deterministic values per tensor (no RNG: threads must not share a seed).
fn pattern(idx: i64, shape: &[i64]) -> Tensor {
    let n: i64 = shape.iter().product();
    (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * 0.37 + idx as f64 * 1.3)
        .sin()
        .reshape(shape)
}

/// Global tensors: (name, tensor, is_expert, is_buffer). Experts are `[E, ...]`.
pub fn global(fx: Fx) -> Vec<(String, Tensor, bool, bool)> {
    let (d, h, e, v) = (fx.d, fx.h, fx.e, fx.v);
    vec![
        ("embed.weight".into(), pattern(1, &[v, d]), false, false),
        ("layers.0.attn.wq".into(), pattern(2, &[d, d]), false, false),
        (
            "layers.0.norm.weight".into(),
            pattern(3, &[d]),
            false,
            false,
        ),
        (EXPERT_PARAMS[0].into(), pattern(4, &[e, d, h]), true, false),
        (EXPERT_PARAMS[1].into(), pattern(5, &[e, d, h]), true, false),
        (EXPERT_PARAMS[2].into(), pattern(6, &[e, h, d]), true, false),
        (
            "layers.1.moe.router.w".into(),
            pattern(7, &[d, e]),
            false,
            false,
        ),
        (
            "layers.1.moe.expert_bias".into(),
            pattern(8, &[e]),
            false,
            true,
        ),
    ]
}

/// Named tensors (buffers, optimizer state).
pub type Named = Vec<(String, Tensor)>;

/// Rank `ep_rank`'s params, buffers and AdamW-style optimizer state
/// (`exp_avg = 0.5 w`, `exp_avg_sq = w^2`).
pub fn rank_state(fx: Fx, ep_rank: i64, ep_size: i64) -> (Vec<Param>, Named, Named) {
    let num_local = fx.e / ep_size;
    let first = ep_rank * num_local;
    let (mut params, mut buffers, mut optim) = (Vec::new(), Vec::new(), Vec::new());
    for (name, t, is_expert, is_buffer) in global(fx) {
        if is_buffer {
            buffers.push((name, t));
            continue;
        }
        let (tensor, kind) = if is_expert {
            let local = t.narrow(0, first, num_local).contiguous();
            (
                local,
                ParamKind::Expert {
                    first_global: first,
                    num_local,
                },
            )
        } else {
            (t, ParamKind::Dense)
        };
        optim.push((format!("{name}.exp_avg"), &tensor * 0.5));
        optim.push((format!("{name}.exp_avg_sq"), &tensor * &tensor));
        params.push(Param {
            name,
            tensor,
            kind,
            weight_decay: true,
        });
    }
    (params, buffers, optim)
}

pub fn snapshot(fx: Fx, ep_rank: i64, ep_size: i64, step: u64) -> Snapshot {
    let (params, buffers, optim) = rank_state(fx, ep_rank, ep_size);
    Snapshot {
        step,
        optim_step: step - 1,
        extra: serde_json::json!({ "rng": [1, 2, 3], "cursor": step * 10 }),
        config_yaml: format!(
            "model:\n  d_model: {}\nmoe:\n  num_experts: {}\n",
            fx.d, fx.e
        ),
        ..Snapshot::from_params(&params, &buffers, optim).unwrap()
    }
}

pub fn slots(fx: Fx, ep_rank: i64, ep_size: i64) -> Vec<ExpertSlot> {
    ExpertSlot::from_params(&rank_state(fx, ep_rank, ep_size).0, fx.e)
}

/// A fresh empty directory under the system temp dir.
pub fn tmpdir(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "moe-ckpt-{tag}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves one checkpoint as `world` ranks (EP size `ep_size`) would: one Checkpointer per
/// rank, each saving from its own thread, rank 0 finalising by polling for the others.
pub fn save_all_ranks(dir: &Path, fx: Fx, ep_size: i64, world: i64, step: u64, keep: usize) {
    let ckpts: Vec<Checkpointer> = (0..world)
        .map(|r| Checkpointer::new(dir, keep, r, r % ep_size, ep_size, world).unwrap())
        .collect();
    let snaps: Vec<Snapshot> = (0..world)
        .map(|r| snapshot(fx, r % ep_size, ep_size, step))
        .collect();
    let handles: Vec<_> = ckpts
        .into_iter()
        .zip(snaps)
        .map(|(mut c, s)| {
            std::thread::spawn(move || {
                c.save(s).unwrap();
                c.wait().unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Exact equality: checkpoints copy float32 bytes, so nothing may change at all.
pub fn assert_same(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    assert_eq!(got.kind(), Kind::Float, "{what}: kind");
    assert!(got.equal(want), "{what}: values differ");
}

/// Checks that `loaded` holds exactly rank `ep_rank`-of-`ep_size`'s share of the fixture
/// state: dense tensors, re-stacked experts and all optimizer state.
pub fn assert_loaded_matches(
    loaded: &moe_trainer::checkpoint::Loaded,
    fx: Fx,
    ep_rank: i64,
    ep_size: i64,
) {
    let (params, buffers, optim) = rank_state(fx, ep_rank, ep_size);
    let mut n_dense = 0;
    for p in &params {
        let got = match p.kind {
            ParamKind::Dense => {
                n_dense += 1;
                loaded.dense.get(&p.name)
            }
            ParamKind::Expert { .. } => loaded.experts.get(&p.name),
        };
        assert_same(
            got.unwrap_or_else(|| panic!("{} not loaded", p.name)),
            &p.tensor,
            &p.name,
        );
    }
    for (name, t) in &buffers {
        assert_same(&loaded.dense[name], t, name);
    }
    assert_eq!(
        loaded.dense.len(),
        n_dense + buffers.len(),
        "no extra dense tensors"
    );
    assert_eq!(loaded.experts.len(), EXPERT_PARAMS.len());
    assert_eq!(loaded.optim.len(), optim.len());
    for (name, t) in &optim {
        assert_same(&loaded.optim[name], t, name);
    }
}
