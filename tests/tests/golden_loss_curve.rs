//! A golden loss curve: 20 steps of a tiny MoE model in one process on the CPU (one torch
//! thread, deterministic data and initialisation) must reproduce the committed curve in
//! tests/golden/tiny_moe_20_steps.golden.json exactly, bit for bit, so any change to the
//! numerics (router, dispatch, experts, losses, optimizer, schedule, data order) is seen.
//!
//! A deliberate change regenerates the file: `MOE_BLESS_GOLDEN=1 cargo test --release -p
//! moe-tests --test golden_loss_curve`, and the commit says why the numbers moved.

use moe_tests::{temp_dir, tiny_config, train_single};
use serde_json::{json, Value};
use std::path::PathBuf;

fn golden_path() -> PathBuf {
    moe_tests::workspace_root().join("tests/golden/tiny_moe_20_steps.golden.json")
}

#[test]
fn tiny_moe_matches_the_golden_loss_curve() {
    let mut cfg = tiny_config(&temp_dir("golden"));
    cfg.trainer.max_steps = 20;
    cfg.trainer.eval_every = 0;
    let summary = train_single(&cfg, 1);
    let curve: Vec<Value> = summary
        .records
        .iter()
        .map(|r| {
            // Rust's shortest round-trip rendering, as strings: JSON number parsing need not
            // round-trip the last bit, and the comparison is exact.
            json!({
                "step": r.step,
                "loss": format!("{:?}", r.loss),
                "lm_loss": format!("{:?}", r.lm_loss),
                "aux_loss": format!("{:?}", r.aux_loss),
                "z_loss": format!("{:?}", r.z_loss),
                "grad_norm": format!("{:?}", r.grad_norm),
                "dropped_frac": format!("{:?}", r.dropped_frac),
            })
        })
        .collect();
    assert_eq!(curve.len(), 20);
    let got =
        json!({ "config": "tests/src/lib.rs tiny_config, 20 steps, one process", "curve": curve });
    let path = golden_path();
    if std::env::var("MOE_BLESS_GOLDEN").as_deref() == Ok("1") {
        let text = serde_json::to_string_pretty(&got).expect("json");
        std::fs::write(&path, text + "\n").expect("writing the golden file");
        return;
    }
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; create it with MOE_BLESS_GOLDEN=1 cargo test --release -p moe-tests \
             --test golden_loss_curve",
            path.display()
        )
    });
    let want: Value = serde_json::from_str(&text).expect("golden file is JSON");
    let (g, w) = (&got["curve"], &want["curve"]);
    let first_diff = g
        .as_array()
        .zip(w.as_array())
        .and_then(|(g, w)| g.iter().zip(w).position(|(a, b)| a != b));
    assert!(
        g == w,
        "the loss curve moved from the golden one at record {first_diff:?}:\n got  {}\n want {}\n\
         If the change is deliberate, regenerate it (see this file's docs) and say why in the commit.",
        first_diff.map(|i| g[i].to_string()).unwrap_or_default(),
        first_diff.map(|i| w[i].to_string()).unwrap_or_default(),
    );
}
