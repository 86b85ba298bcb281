//! The sampler: a step's global batch is a pure function of (seed, split, step) and is cut
//! into rank slices so that every world size sees the same sequences.

use moe_trainer::data::synthetic;
use moe_trainer::data::{Batch, Dataset, Origin, SamplerSpec, Split};

fn dataset() -> Dataset {
    Dataset::from_byte_corpus(
        Origin::Memory("synthetic-50k".into()),
        synthetic::generate(50_000),
    )
}

fn spec(batch_size: i64, world_size: i64, rank: i64, grad_accum: i64) -> SamplerSpec {
    SamplerSpec {
        seed: 1234,
        seq_len: 24,
        batch_size,
        world_size,
        rank,
        grad_accum,
    }
}

fn same(a: &Batch, b: &Batch) -> bool {
    a.inputs_bt.size() == b.inputs_bt.size()
        && a.inputs_bt.equal(&b.inputs_bt)
        && a.targets_bt.equal(&b.targets_bt)
}

/// World 1 with batch 4B sees, in every micro-step, exactly the concatenation of the four
/// ranks' B-sequence slices of world 4; both equal windows [a*4B, (a+1)*4B) of the global
/// batch.
#[test]
fn global_batch_is_world_size_invariant() {
    let ds = dataset();
    let b = 3;
    for accum in [1, 2] {
        for step in [0u64, 1, 17, 1_000_000] {
            let single = ds
                .batches(Split::Train, step, &spec(4 * b, 1, 0, accum))
                .unwrap();
            let ranks: Vec<Vec<Batch>> = (0..4)
                .map(|r| {
                    ds.batches(Split::Train, step, &spec(b, 4, r, accum))
                        .unwrap()
                })
                .collect();
            assert_eq!(single.len(), accum as usize);
            for a in 0..accum as usize {
                let parts: Vec<Batch> = ranks
                    .iter()
                    .map(|r| Batch {
                        inputs_bt: r[a].inputs_bt.shallow_clone(),
                        targets_bt: r[a].targets_bt.shallow_clone(),
                    })
                    .collect();
                let joined = Batch::cat(&parts).unwrap();
                assert_eq!(joined.batch_size(), 4 * b);
                assert!(
                    same(&joined, &single[a]),
                    "accum {accum} step {step} micro {a}"
                );
                let lo = a as i64 * 4 * b;
                let direct = ds
                    .sequences(Split::Train, step, 1234, 24, lo..lo + 4 * b)
                    .unwrap();
                assert!(same(&joined, &direct));
            }
        }
    }
}

/// Micro-step major, then rank: all slices of all ranks tile `0..G` in order, without gaps.
#[test]
fn slices_cover_the_global_batch_in_order() {
    let s = spec(2, 3, 1, 2);
    assert_eq!(s.global_batch(), 12);
    assert_eq!(s.micro_range(0), 2..4);
    assert_eq!(s.micro_range(1), 8..10);
    let covered: Vec<i64> = (0..2)
        .flat_map(|a| (0..3).flat_map(move |r| spec(2, 3, r, 2).micro_range(a)))
        .collect();
    assert_eq!(covered, (0..12).collect::<Vec<_>>());
}

#[test]
fn deterministic_and_sensitive_to_seed_split_and_step() {
    let ds = dataset();
    let s = spec(4, 1, 0, 1);
    let a = ds.batch(Split::Train, 5, &s, 0).unwrap();
    assert!(same(&a, &ds.batch(Split::Train, 5, &s, 0).unwrap()));
    assert!(same(&a, &dataset().batch(Split::Train, 5, &s, 0).unwrap()));
    assert!(!same(&a, &ds.batch(Split::Train, 6, &s, 0).unwrap()));
    assert!(!same(
        &a,
        &ds.batch(Split::Train, 5, &SamplerSpec { seed: 1235, ..s }, 0)
            .unwrap()
    ));
    assert!(!same(&a, &ds.batch(Split::Val, 5, &s, 0).unwrap()));
    // Targets are the inputs shifted by one.
    assert!(a
        .inputs_bt
        .narrow(1, 1, 23)
        .equal(&a.targets_bt.narrow(1, 0, 23)));
    assert_eq!(a.inputs_bt.kind(), tch::Kind::Int64);
    assert_eq!(a.inputs_bt.device(), tch::Device::Cpu);
}

/// Starts cover the whole split: over 4000 draws from 45 000 starts, every start is in range
/// and both the first and last 2% are hit (missing either by chance has probability
/// 0.98^4000 < 1e-35).
#[test]
fn window_starts_span_the_split() {
    let ds = dataset();
    let n = ds.len(Split::Train) as u64;
    let starts = ds
        .window_starts(Split::Train, 3, 1234, 24, 0..4000)
        .unwrap();
    let max_start = n - 25;
    assert!(starts.iter().all(|&s| s <= max_start));
    assert!(starts.iter().any(|&s| s < max_start / 50));
    assert!(starts.iter().any(|&s| s > max_start - max_start / 50));
}

#[test]
fn bad_requests_are_errors() {
    let ds = dataset();
    let msg = ds
        .batch(Split::Train, 0, &spec(2, 2, 2, 1), 0)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("rank (2) must be in 0..2"), "{msg}");
    let msg = ds
        .batch(Split::Train, 0, &spec(2, 1, 0, 2), 2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("micro-batch 2 out of range 0..2"), "{msg}");
    let long = SamplerSpec {
        seq_len: 6000,
        ..spec(1, 1, 0, 1)
    };
    let msg = ds.batch(Split::Val, 0, &long, 0).unwrap_err().to_string();
    assert!(msg.contains("5000 tokens in its validation split"), "{msg}");
}
