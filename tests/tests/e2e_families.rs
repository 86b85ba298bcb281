//! The tiny versions of the newer model families train in debug mode at EP=2 (two simulated
//! ranks, routing invariants checked every step) and their loss falls.

mod e2e_support;

use e2e_support::{metrics, run, train_cmd};
use std::time::Duration;

/// ln(256): the loss of a uniform guess over byte tokens.
const LN_VOCAB: f64 = 5.545177444479562;

/// Trains `config` for 30 steps with `--debug` and checks the loss fell by `min_drop`.
fn trains_in_debug_mode(config: &str, tag: &str, min_drop: f64) {
    let out = moe_tests::temp_dir(tag);
    let f = run(
        train_cmd(config, &out, &["trainer.max_steps=30"]).arg("--debug"),
        Duration::from_secs(300),
    )
    .ok();
    assert!(
        f.stdout.contains("debug mode: 2 expert-parallel rank(s)"),
        "{}",
        f.dump()
    );
    let (train, _) = metrics(&out);
    assert_eq!(train.len(), 30, "{}", f.dump());
    let (first, last) = (&train[0], &train[29]);
    assert!(
        train
            .iter()
            .all(|r| r.loss.is_finite() && r.dropped_frac == 0.0),
        "{}",
        f.dump()
    );
    // Byte-level synthetic text: a model that learns drops well below ln(256) within 30
    // steps; a broken attention or router leaves it near the start.
    assert!(
        last.loss < first.loss - min_drop && last.loss < LN_VOCAB,
        "loss did not fall: first {} last {}",
        first.loss,
        last.loss
    );
    eprintln!(
        "{config}: {} -> {} in {:.1}s",
        first.loss, last.loss, f.secs
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn deepseek_v3_tiny_trains_at_ep2_in_debug_mode() {
    trains_in_debug_mode("configs/deepseek-v3-tiny.yaml", "e2e-dsv3-tiny", 1.0);
}

#[test]
fn qwen3_next_tiny_trains_at_ep2_in_debug_mode() {
    trains_in_debug_mode("configs/qwen3-next-tiny.yaml", "e2e-qwen3-next-tiny", 1.0);
}
