//! End to end: `moe train` on the quickstart and debug configs, run as the real binary, and
//! what a run leaves behind (metrics.jsonl, TensorBoard events, config.yaml, a checkpoint the
//! Python `safetensors` package reads); bad data fails before anything is written.

mod e2e_support;

use e2e_support::{ckpt, metrics, moe_bin, python, run, train_cmd};
use moe_model::moe_layer::MoeStats;
use moe_trainer::train_loop::check_invariants;
use std::process::Command;
use std::time::Duration;
use tch::Tensor;

/// ln(256): the loss of a uniform guess over byte tokens.
const LN_VOCAB: f64 = 5.545177444479562;

const TRAIN_FIELDS: [&str; 8] = [
    "step",
    "loss",
    "lm_loss",
    "aux_loss",
    "z_loss",
    "dropped_frac",
    "tokens_per_s",
    "lr",
];

#[test]
fn quickstart_trains_and_writes_metrics_events_config_and_checkpoint() {
    let out = moe_tests::temp_dir("e2e-quickstart");
    let f = run(
        &mut train_cmd(
            "configs/quickstart.yaml",
            &out,
            &[
                "trainer.max_steps=60",
                "trainer.log_every=1",
                "trainer.eval_every=60",
                "trainer.eval_iters=2",
            ],
        ),
        Duration::from_secs(120),
    )
    .ok();

    // metrics.jsonl: every field present on every train line, as written (not via serde defaults).
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_lines: Vec<_> = lines.iter().filter(|v| v["kind"] == "train").collect();
    assert_eq!(train_lines.len(), 60, "{}", f.dump());
    for v in &train_lines {
        for k in TRAIN_FIELDS {
            assert!(v[k].is_number(), "train record without numeric {k}: {v}");
        }
    }
    let (train, eval) = metrics(&out);
    assert_eq!(e2e_support::steps(&train), (1..=60).collect::<Vec<_>>());
    let (first, last) = (&train[0], &train[59]);
    assert!(
        last.loss < first.loss - 1.0 && last.loss < LN_VOCAB,
        "loss did not fall: first {} last {}",
        first.loss,
        last.loss
    );
    assert!(train.iter().all(|r| r.tokens_per_s > 0.0 && r.lr > 0.0));
    assert_eq!(eval.len(), 1, "one eval at the last step");
    assert_eq!(eval[0].step, 60);
    assert!(
        eval[0].val_loss.is_finite() && eval[0].val_loss < LN_VOCAB,
        "{:?}",
        eval[0]
    );

    // TensorBoard's own reader gets back the values of metrics.jsonl (as float32) and the
    // per-layer, per-expert load of every logged step.
    let tb = Command::new(python())
        .arg(moe_tests::workspace_root().join("tests/python/read_tensorboard.py"))
        .arg(&out)
        .args(["--expect", &format!("train/loss=1:{}", first.loss)])
        .args(["--expect", &format!("train/loss=60:{}", last.loss)])
        .args(["--expect", &format!("train/aux_loss=60:{}", last.aux_loss)])
        .args(["--expect", &format!("train/lr=30:{}", train[29].lr)])
        .args(["--expect", &format!("val/loss=60:{}", eval[0].val_loss)])
        .args(["--expect-count", "train/loss=60"])
        .args(["--expect-count", "moe/layer00/expert_load/e000=60"])
        .args(["--expect-count", "moe/layer03/expert_load/e007=60"])
        .output()
        .unwrap();
    let tb_out = String::from_utf8_lossy(&tb.stdout);
    assert!(
        tb.status.success(),
        "TensorBoard read-back failed:\n{tb_out}{}",
        String::from_utf8_lossy(&tb.stderr)
    );

    // config.yaml is the resolved config, with the overrides, and loads back as the same.
    let yaml = std::fs::read_to_string(out.join("config.yaml")).unwrap();
    assert!(yaml.contains("max_steps: 60"), "{yaml}");
    let check = Command::new(moe_bin())
        .args(["check", "--config"])
        .arg(out.join("config.yaml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&check.stdout),
        yaml,
        "config.yaml does not round-trip"
    );

    // The final checkpoint: manifest, and safetensors files the Python package reads, with
    // the tensors the manifest lists.
    let dir = ckpt(&out, 60);
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["step"], 60);
    let script = r#"
import json, sys
import numpy as np
from safetensors.numpy import load_file
d = sys.argv[1]
m = json.load(open(d + "/manifest.json"))
for f in m["files"]:
    t = load_file(d + "/" + f["name"])
    want = sorted(x["name"] for x in f["tensors"])
    assert sorted(t) == want, (f["name"], sorted(t)[:5], want[:5])
    assert all(np.isfinite(v).all() for v in t.values()), f["name"]
    print(f["name"], len(t))
"#;
    let py = Command::new(python())
        .args(["-c", script])
        .arg(&dir)
        .output()
        .unwrap();
    let py_out = String::from_utf8_lossy(&py.stdout);
    assert!(
        py.status.success(),
        "safetensors could not load the checkpoint:\n{py_out}{}",
        String::from_utf8_lossy(&py.stderr)
    );
    assert!(py_out.contains("dense.safetensors"), "{py_out}");
    eprintln!("quickstart e2e: training took {:.1}s", f.secs);
    let _ = std::fs::remove_dir_all(&out);
}

const DEBUG: &str = "configs/debug.yaml";

/// debug.yaml for `steps` steps, no eval.
fn debug_sets(steps: u64) -> Vec<String> {
    vec![
        format!("trainer.max_steps={steps}"),
        "trainer.warmup_steps=1".into(),
        "trainer.eval_every=0".into(),
    ]
}

#[test]
fn debug_mode_prints_router_statistics_per_layer() {
    let out = moe_tests::temp_dir("e2e-debug");
    let f = run(
        train_cmd(DEBUG, &out, &debug_sets(3)).arg("--debug"),
        Duration::from_secs(60),
    )
    .ok();
    assert!(
        f.stdout.contains("debug mode: 2 expert-parallel rank(s)"),
        "{}",
        f.dump()
    );
    // One line per MoE layer per step; debug.yaml has 2 layers and tight capacity.
    for layer in ["layer  0:", "layer  1:"] {
        let n = f
            .stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(layer) && l.contains("load min"))
            .count();
        assert_eq!(n, 3, "{layer} router stats lines\n{}", f.dump());
    }
    let dropped_somewhere = f
        .stdout
        .lines()
        .filter_map(|l| {
            l.split("dropped ")
                .nth(1)?
                .split('%')
                .next()?
                .parse::<f64>()
                .ok()
        })
        .any(|p| p > 0.0);
    assert!(
        dropped_somewhere,
        "capacity 1.25 should drop some assignments\n{}",
        f.dump()
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn debug_mode_stops_at_a_non_finite_loss() {
    // Without --debug a NaN step is skipped (e2e_signals.rs); the debug invariants must
    // catch it instead of letting the skip path hide it.
    let out = moe_tests::temp_dir("e2e-debug-nan");
    let f = run(
        train_cmd(DEBUG, &out, &debug_sets(4))
            .arg("--debug")
            .env("MOE_FAULT", "nan@1:2"),
        Duration::from_secs(60),
    );
    assert!(!f.status.success(), "{}", f.dump());
    assert!(
        f.stderr.contains("step 2: loss is not finite"),
        "{}",
        f.dump()
    );
    let _ = std::fs::remove_dir_all(&out);
}

fn stats(kept: i64, dropped: i64, probs_ok: bool) -> MoeStats {
    MoeStats {
        aux_loss: Tensor::from(0.0f32),
        z_loss: Tensor::from(0.0f32),
        load_e: Tensor::from_slice(&[1.0f32; 4]),
        topk_load_e: Tensor::from_slice(&[1.0f32; 4]),
        num_kept: Tensor::from(kept),
        num_dropped: Tensor::from(dropped),
        probs_ok_flag: Tensor::from(probs_ok),
    }
}

#[test]
fn invariant_check_rejects_lost_assignments_bad_weights_and_nan_loss() {
    // 8 tokens, top-2: 16 assignments, each kept or dropped.
    let ok = [(0, stats(12, 4, true)), (1, stats(16, 0, true))];
    check_invariants(0, 8, 2, &ok, true).unwrap();

    let lost = [(0, stats(12, 4, true)), (1, stats(15, 0, true))];
    let e = check_invariants(4, 8, 2, &lost, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("in layer 1") && e.contains("step 5"), "{e}");
    assert!(
        e.contains("kept (15) + dropped (0)") && e.contains("= 16"),
        "{e}"
    );

    let extra = [(0, stats(17, 0, true))];
    assert!(
        check_invariants(0, 8, 2, &extra, true).is_err(),
        "too many assignments"
    );

    let weights = [(0, stats(16, 0, false))];
    let e = check_invariants(0, 8, 2, &weights, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("routing weights"), "{e}");

    let e = check_invariants(2, 8, 2, &ok, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("step 3: loss is not finite"), "{e}");
}

/// A text data file that is missing, empty or shorter than one training window.
fn bad_data_run(tag: &str, contents: Option<&[u8]>, want: &str) {
    let root = moe_tests::temp_dir(tag);
    let data = root.join("corpus.txt");
    if let Some(bytes) = contents {
        std::fs::write(&data, bytes).unwrap();
    }
    let out = root.join("run");
    let f = run(
        &mut train_cmd(
            "configs/quickstart.yaml",
            &out,
            &["data.source=text", &format!("data.path={}", data.display())],
        ),
        Duration::from_secs(60),
    );
    assert!(!f.status.success(), "{}", f.dump());
    let data_s = data.display().to_string();
    // The error paragraph (a missing file is caught with the config's other problems, one
    // per line under the `error:` line).
    let err_line = f
        .stderr
        .lines()
        .skip_while(|l| !l.starts_with("error:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        f.status.code(),
        Some(2),
        "bad data is bad input\n{}",
        f.dump()
    );
    assert!(
        err_line.contains(&data_s),
        "the error must name {data_s}\n{}",
        f.dump()
    );
    assert!(err_line.contains(want), "expected {want:?}\n{}", f.dump());
    assert!(
        !out.exists(),
        "a run that failed on its data wrote into out_dir: {:?}",
        e2e_support::tree(&out).keys().collect::<Vec<_>>()
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn missing_text_file_is_a_clear_error_and_writes_nothing() {
    bad_data_run("e2e-data-missing", None, "does not exist");
}

#[test]
fn empty_text_file_is_a_clear_error_and_writes_nothing() {
    bad_data_run("e2e-data-empty", Some(b""), "is empty");
}

#[test]
fn too_short_text_file_is_a_clear_error_and_writes_nothing() {
    // quickstart's seq_len is 128: 100 bytes hold no window of 129 tokens.
    bad_data_run("e2e-data-short", Some(&[b'a'; 100]), "seq_len");
}
