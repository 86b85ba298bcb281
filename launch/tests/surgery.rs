//! `moe upcycle` and `moe slim` on checkpoints of real (tiny) training runs of the binary:
//! the written run directories load, evaluate and train; upcycling keeps the dense logits;
//! slimming is independent of the EP size the checkpoint was written at; bad arguments exit 2
//! and write nothing.

mod common;

use common::{moe, Scratch};
use moe_model::transformer::LmForward;
use moe_trainer::checkpoint::{
    expert_tensor_name, read_manifest, CheckpointReader, Checkpointer, Snapshot,
};
use moe_trainer::config::ExperimentConfig;
use moe_trainer::inference::load_single;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// A tiny run: `moe` holds the moe section's lines.
fn train_tiny(s: &Scratch, name: &str, moe_lines: &str, extra: &[&str]) -> PathBuf {
    let out = s.0.join(name);
    let cfg = s.write(
        &format!("{name}.yaml"),
        &format!(
            "run:\n  out_dir: {}\n\
             model:\n  vocab_size: 256\n  d_model: 32\n  num_layers: 2\n  num_heads: 4\n  \
             num_kv_heads: 2\n  ffn_hidden: 64\n  max_seq_len: 32\n\
             moe:\n{moe_lines}\
             data:\n  seq_len: 32\n  synthetic_bytes: 100000\n\
             trainer:\n  max_steps: 20\n  batch_size: 4\n  lr: 3.0e-3\n  warmup_steps: 2\n  \
             log_every: 1\n  eval_every: 0\n  eval_iters: 2\n  device: cpu\n  threads: 1\n\
             checkpoint:\n  every: 0\n  keep: 1\n",
            out.display()
        ),
    );
    let mut args = vec!["train", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, o, e) = moe(&args);
    assert_eq!(code, 0, "train failed:\n{o}\n{e}");
    out
}

fn only_checkpoint(run: &Path) -> PathBuf {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("manifest.json").is_file())
        .collect();
    assert_eq!(steps.len(), 1, "{steps:?}");
    steps.pop().unwrap()
}

fn stored_config(ckpt: &Path) -> ExperimentConfig {
    let mut cfg: ExperimentConfig =
        serde_json::from_str(&read_manifest(ckpt).unwrap().config_yaml).unwrap();
    cfg.parallel.ep_size = 1;
    cfg
}

/// Float32 logits of the checkpoint on a fixed byte batch, loaded as `moe eval` loads it.
fn logits(ckpt: &Path) -> Tensor {
    let cfg = stored_config(ckpt);
    let (model, _) = load_single(&cfg, ckpt, Device::Cpu).unwrap();
    let text = b"To be, or not to be, that is the question: whether 'tis nobler in the mind";
    let tokens: Vec<i64> = text.iter().take(64).map(|&b| i64::from(b)).collect();
    let tokens = Tensor::from_slice(&tokens).view([2, 32]);
    let ctx = LmForward {
        train: false,
        compute_kind: Kind::Float,
        step: 0,
    };
    tch::no_grad(|| model.forward(&tokens, &ctx).unwrap().logits_btv)
}

fn run_ok(args: &[&str]) -> String {
    let (code, o, e) = moe(args);
    assert_eq!(code, 0, "moe {args:?} failed:\n{o}\n{e}");
    o
}

fn report(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("surgery.json")).unwrap()).unwrap()
}

/// Trains `run` on from its checkpoint at EP=2 (in-process ranks) for `steps` steps and
/// returns the lm_loss of each step.
fn train_on(run: &Path, steps: u64) -> Vec<f64> {
    let cfg = run.join("config.yaml");
    let max = format!("trainer.max_steps={steps}");
    let o = run_ok(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--resume",
        "auto",
        "--debug",
        "--set",
        "parallel.ep_size=2",
        "--set",
        &max,
        "--set",
        "trainer.log_every=1",
    ]);
    assert!(o.contains("resumed from"), "{o}");
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| v["lm_loss"].as_f64().unwrap())
        .collect()
}

/// Upcycling a trained dense model: plain (E=4, k=2) and granular (E=8, k=4, G=2). The
/// upcycled logits equal the dense ones to 1e-5 absolute (float32: the only differences are
/// k weights summing to 1 within an ulp and the shards' partial sums reassociated, ~1e-7
/// relative on logits of magnitude ~5); the validation loss in surgery.json agrees with the
/// dense one likewise; the run trains on at EP=2 with falling loss, evaluates and generates.
#[test]
fn upcycle_keeps_the_dense_forward_and_trains() {
    let s = Scratch::new("surgery-upcycle");
    let dense = train_tiny(&s, "dense", "  num_experts: 1\n  top_k: 1\n", &[]);
    let dense_ckpt = only_checkpoint(&dense);
    let want = logits(&dense_ckpt);
    let scale = want.abs().max().double_value(&[]);
    assert!(scale > 0.5, "degenerate logits {scale}");
    for (tag, e, k, g) in [("plain", "4", "2", "1"), ("granular", "8", "4", "2")] {
        let run = s.0.join(tag);
        let o = run_ok(&[
            "upcycle",
            "--checkpoint",
            dense.to_str().unwrap(),
            "--experts",
            e,
            "--top-k",
            k,
            "--granularity",
            g,
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(o.contains("params total"), "{o}");
        let ckpt = only_checkpoint(&run);
        let cfg = stored_config(&ckpt);
        assert_eq!(cfg.moe.num_experts.to_string(), e);
        assert_eq!(cfg.moe.expert_hidden, 64 / g.parse::<i64>().unwrap());
        let got = logits(&ckpt);
        let diff = (&got - &want).abs().max().double_value(&[]);
        assert!(diff <= 1e-5, "{tag}: upcycled logits differ by {diff}");

        let r = report(&run);
        let (before, after) = (
            r["val_loss_before"].as_f64().unwrap(),
            r["val_loss_after"].as_f64().unwrap(),
        );
        assert!((before - after).abs() <= 1e-5, "{tag}: {before} vs {after}");
        let (b, a) = (&r["before"], &r["after"]);
        assert!(
            a["total_params"].as_u64() > b["total_params"].as_u64(),
            "{r}"
        );
        // Active parameters: k/E of the experts, each E/G copies of h/G... = k/G dense FFNs.
        let router = 2 * 32 * e.parse::<u64>().unwrap();
        let ffn = 2 * 3 * 32 * 64;
        let extra_active = ffn * (k.parse::<u64>().unwrap() / g.parse::<u64>().unwrap() - 1);
        assert_eq!(
            a["active_params"].as_u64().unwrap(),
            b["active_params"].as_u64().unwrap() + router + extra_active,
            "{r}"
        );

        let losses = train_on(&run, 8);
        assert_eq!(losses.len(), 8, "{losses:?}");
        let first = losses[0];
        let last = losses[losses.len() - 2..].iter().sum::<f64>() / 2.0;
        assert!(last < first, "{tag}: loss did not fall: {losses:?}");
        assert!(
            (first - before).abs() < 0.5,
            "{tag}: first step loss {first} far from the dense val loss {before}"
        );
        let o = run_ok(&["eval", "--checkpoint", run.to_str().unwrap()]);
        assert!(o.contains("checkpoint step 8"), "{o}");
        run_ok(&[
            "generate",
            "--checkpoint",
            run.to_str().unwrap(),
            "--prompt",
            "the ",
            "--tokens",
            "8",
        ]);
    }
}

/// Bad arguments name the flag, exit 2 and create nothing.
#[test]
fn surgery_rejects_bad_arguments() {
    let s = Scratch::new("surgery-bad");
    let dense = train_tiny(&s, "dense", "  num_experts: 1\n  top_k: 1\n", &[]);
    let out = s.0.join("never");
    let o = out.to_str().unwrap();
    let d = dense.to_str().unwrap();
    for (args, want) in [
        (
            vec![
                "upcycle",
                "--checkpoint",
                d,
                "--experts",
                "1",
                "--top-k",
                "1",
            ],
            "--experts (1)",
        ),
        (
            vec![
                "upcycle",
                "--checkpoint",
                d,
                "--experts",
                "4",
                "--top-k",
                "5",
            ],
            "--top-k (5)",
        ),
        (
            vec![
                "upcycle",
                "--checkpoint",
                d,
                "--experts",
                "8",
                "--top-k",
                "3",
                "--granularity",
                "2",
            ],
            "--top-k (3) must be a multiple of --granularity (2)",
        ),
        (
            vec!["slim", "--checkpoint", d, "--experts", "2"],
            "no routed experts to slim",
        ),
    ] {
        let mut args = args;
        args.extend(["--out", o]);
        let (code, so, se) = moe(&args);
        assert_eq!(code, 2, "{args:?}:\n{so}\n{se}");
        assert!(se.contains(want), "{args:?}: {se}");
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    let moe_run = train_tiny(&s, "moe", "  num_experts: 4\n  top_k: 2\n", &[]);
    let m = moe_run.to_str().unwrap();
    for (k, want) in [("5", "--experts (5)"), ("0", "--experts (0)")] {
        let (code, so, se) = moe(&["slim", "--checkpoint", m, "--experts", k, "--out", o]);
        assert_eq!(code, 2, "{so}\n{se}");
        assert!(se.contains(want), "{se}");
        assert!(!out.exists());
    }
    // An existing non-empty output directory is refused and left alone.
    let (code, _, se) = moe(&["slim", "--checkpoint", m, "--experts", "2", "--out", d]);
    assert_eq!(code, 2, "{se}");
    assert!(se.contains("not an empty directory"), "{se}");
    assert!(dense.join("checkpoints").is_dir());
}

/// Writes the model tensors of `ckpt` again as one process with EP=1 (world size unchanged,
/// so calibration reads the same batches): the EP=1 twin of an EP=2 checkpoint.
fn ep1_twin(ckpt: &Path, dir: &Path) -> PathBuf {
    let manifest = read_manifest(ckpt).unwrap();
    let cfg = stored_config(ckpt);
    let (model, _) = load_single(&cfg, ckpt, Device::Cpu).unwrap();
    let snap = Snapshot {
        step: manifest.step,
        optim_step: manifest.optim_step,
        extra: manifest.extra.clone(),
        config_yaml: manifest.config_yaml.clone(),
        ..Snapshot::from_params(&model.params(), &model.buffers(), Vec::new()).unwrap()
    };
    let mut w = Checkpointer::new(dir, 1, 0, 0, 1, manifest.world_size).unwrap();
    let path = w.save(snap).unwrap();
    w.wait().unwrap();
    path
}

/// Slimming 8 -> 4 experts by routing frequency: an EP=2 checkpoint and its EP=1 twin give
/// the same kept experts and bit-identical tensors; every slimmed tensor is the source's at
/// the kept ids (router columns, expert tensors); the output evaluates and trains at EP=2.
#[test]
fn slim_is_ep_independent_and_trains() {
    let s = Scratch::new("surgery-slim");
    let run = train_tiny(
        &s,
        "moe8",
        "  num_experts: 8\n  top_k: 2\n  expert_hidden: 32\n",
        &["--debug", "--set", "parallel.ep_size=2"],
    );
    let ckpt = only_checkpoint(&run);
    assert_eq!(read_manifest(&ckpt).unwrap().ep_size, 2);
    let twin = ep1_twin(&ckpt, &s.0.join("twin"));
    assert_eq!(read_manifest(&twin).unwrap().ep_size, 1);

    let slim = |src: &Path, out: &str| {
        let out = s.0.join(out);
        run_ok(&[
            "slim",
            "--checkpoint",
            src.to_str().unwrap(),
            "--experts",
            "4",
            "--expert-criterion",
            "frequency",
            "--calib-batches",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    };
    let a = slim(&ckpt, "slim-ep2");
    let b = slim(&twin, "slim-ep1");
    let (ra, rb) = (report(&a), report(&b));
    assert_eq!(ra["kept_experts"], rb["kept_experts"]);
    let (ca, cb) = (only_checkpoint(&a), only_checkpoint(&b));
    let (sa, sb) = (
        CheckpointReader::open(&ca).unwrap(),
        CheckpointReader::open(&cb).unwrap(),
    );
    let names: Vec<&str> = sa.model_names().collect();
    assert_eq!(names, sb.model_names().collect::<Vec<_>>());
    for n in &names {
        assert!(
            sa.read(n).unwrap().equal(&sb.read(n).unwrap()),
            "{n} differs"
        );
    }

    // Against the source, read independently: router column j is old column keep[j], expert
    // j is old expert keep[j]. Exact copies.
    let src = CheckpointReader::open(&ckpt).unwrap();
    let kept = ra["kept_experts"].as_object().unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    for (layer, keep) in kept {
        let keep: Vec<i64> = keep
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(keep.len(), 4);
        let router = format!("{layer}.w_router");
        let (old, new) = (src.read(&router).unwrap(), sa.read(&router).unwrap());
        for (j, &g) in keep.iter().enumerate() {
            assert!(new.select(1, j as i64).equal(&old.select(1, g)), "{router}");
            for w in ["w_gate", "w_up", "w_down"] {
                let stacked = format!("{layer}.experts.{w}");
                let o = src.read(&expert_tensor_name(&stacked, g, None)).unwrap();
                let n = sa
                    .read(&expert_tensor_name(&stacked, j as i64, None))
                    .unwrap();
                assert!(o.equal(&n), "{stacked} {j} <- {g}");
            }
        }
    }
    let cfg = stored_config(&ca);
    assert_eq!((cfg.moe.num_experts, cfg.moe.top_k), (4, 2));
    let (before, after) = (
        ra["before"]["total_params"].as_u64().unwrap(),
        ra["after"]["total_params"].as_u64().unwrap(),
    );
    // Two layers lose 4 experts (3 * 32 * 32 each) and 4 router columns of 32.
    assert_eq!(before - after, 2 * 4 * (3 * 32 * 32 + 32), "{ra}");
    assert!(ra["val_loss_after"].as_f64().unwrap().is_finite());

    let o = run_ok(&["eval", "--checkpoint", a.to_str().unwrap()]);
    assert!(o.contains("checkpoint step 0"), "{o}");
    let losses = train_on(&a, 3);
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");

    // Random keeps 4 distinct experts per layer, seeded: the same twice.
    let r1 = s.0.join("rand1");
    let r2 = s.0.join("rand2");
    for r in [&r1, &r2] {
        run_ok(&[
            "slim",
            "--checkpoint",
            run.to_str().unwrap(),
            "--experts",
            "3",
            "--expert-criterion",
            "random",
            "--out",
            r.to_str().unwrap(),
        ]);
    }
    assert_eq!(report(&r1)["kept_experts"], report(&r2)["kept_experts"]);
    // 3 experts do not divide ep_size 2: the config falls back to 1, with a note.
    assert_eq!(stored_config(&only_checkpoint(&r1)).moe.num_experts, 3);
    assert!(report(&r1)["notes"]
        .to_string()
        .contains("parallel.ep_size 2"));
}
