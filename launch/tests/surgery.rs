//! `moe upcycle` and `moe slim` on checkpoints of real (tiny) training runs of the binary:
//! the written run directories load, evaluate and train; upcycling keeps the dense logits;
//! slimming is independent of the EP size the checkpoint was written at; bad arguments exit 2
//! and write nothing.

mod common;

use common::{moe, Scratch};
use moe_model::transformer::LmForward;
use moe_testutil::only_checkpoint;
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
    // moe_run: 2 blocks, 4 experts of the default expert_hidden; no dense FFN.
    let hidden = stored_config(&only_checkpoint(&moe_run)).moe.expert_hidden;
    let too_wide = (hidden + 1).to_string();
    for (args, want) in [
        (vec!["--drop-layers", "2"], "--drop-layers (2)"),
        (vec!["--layers", "0,1"], "--layers names 2 of 2 blocks"),
        (vec!["--layers", "5"], "--layers: block 5 does not exist"),
        (
            vec!["--expert-hidden", too_wide.as_str()],
            "--expert-hidden (",
        ),
        (vec!["--ffn-hidden", "8"], "--ffn-hidden"),
        (vec!["--merge"], "--merge needs --experts"),
        (
            vec!["--experts", "2", "--calib-batches", "0"],
            "--calib-batches (0)",
        ),
        (vec![], "nothing to slim"),
        (
            vec!["--experts", "2", "--data", "/nonexistent/calib.txt"],
            "--data /nonexistent/calib.txt",
        ),
    ] {
        let mut all = vec!["slim", "--checkpoint", m, "--out", o];
        all.extend(args.iter().copied());
        let (code, so, se) = moe(&all);
        assert_eq!(code, 2, "{all:?}\n{so}\n{se}");
        assert!(se.contains(want), "{all:?}: {se}");
        assert!(!out.exists(), "{all:?} wrote {}", out.display());
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

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// The indices of the columns of `new [d, h']` within `old [d, h]` (each must equal one old
/// column to `tol`), which must be increasing.
fn column_subset(new: &Tensor, old: &Tensor, tol: f64, what: &str) -> Vec<i64> {
    let h_new = new.size()[1];
    let mut at = Vec::new();
    for j in 0..h_new {
        let col = new.select(1, j).unsqueeze(1);
        let dist = (old - &col).abs().amax([0], false); // [h]
        let i = dist.argmin(0, false).int64_value(&[]);
        let d = dist.double_value(&[i]);
        assert!(
            d <= tol,
            "{what}: column {j} matches no source column ({d})"
        );
        at.push(i);
    }
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{what}: {at:?}");
    at
}

/// One slim doing everything (3 blocks, the first dense; 8 -> 4 experts by routing weight
/// with merging; 1 block dropped by Block Influence; experts 32 -> 16 and the dense FFN
/// 64 -> 32 hidden units), on an EP=2 checkpoint and on its EP=1 twin: bit-identical outputs.
/// Then checked against the source by an independent computation from the statistics in
/// surgery.json: the dropped block has the lowest influence and the kept blocks are copied;
/// the kept experts have the highest weighted frequency; each dropped expert goes to the kept
/// expert of highest router-column cosine; each new expert equals the frequency-weighted mean
/// of its group (1e-6 absolute: float32 sums of at most 5 terms of magnitude < 1, reassociated)
/// restricted to a subset of hidden units that w_gate, w_up and w_down agree on. The output
/// evaluates and trains.
#[test]
fn slim_merge_depth_width_match_a_reference() {
    let s = Scratch::new("surgery-all");
    let run = train_tiny(
        &s,
        "moe8",
        "  num_experts: 8\n  top_k: 2\n  expert_hidden: 32\n  first_dense_layers: 1\n",
        &[
            "--debug",
            "--set",
            "parallel.ep_size=2",
            "--set",
            "model.num_layers=3",
        ],
    );
    let ckpt = only_checkpoint(&run);
    let twin = ep1_twin(&ckpt, &s.0.join("twin"));
    let slim = |src: &Path, out: &str| {
        let out = s.0.join(out);
        run_ok(&[
            "slim",
            "--checkpoint",
            src.to_str().unwrap(),
            "--experts",
            "4",
            "--expert-criterion",
            "weighted",
            "--merge",
            "--drop-layers",
            "1",
            "--expert-hidden",
            "16",
            "--ffn-hidden",
            "32",
            "--calib-batches",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    };
    let a = slim(&ckpt, "all-ep2");
    let b = slim(&twin, "all-ep1");
    let (ra, rb) = (report(&a), report(&b));
    for key in [
        "kept_experts",
        "merged_into",
        "dropped_layers",
        "calibration",
    ] {
        assert_eq!(ra[key], rb[key], "{key}");
    }
    let (ca, cb) = (only_checkpoint(&a), only_checkpoint(&b));
    let (sa, sb) = (
        CheckpointReader::open(&ca).unwrap(),
        CheckpointReader::open(&cb).unwrap(),
    );
    for n in sa.model_names() {
        assert!(sa.read(n).unwrap().equal(&sb.read(n).unwrap()), "{n}");
    }

    let src = CheckpointReader::open(&ckpt).unwrap();
    let calib = &ra["calibration"];
    let bi: Vec<(String, f64)> = calib["block_influence"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_f64().unwrap()))
        .collect();
    assert_eq!(bi.len(), 3);
    let lowest = bi
        .iter()
        .min_by(|x, y| x.1.total_cmp(&y.1))
        .map(|(k, _)| k.trim_start_matches("layers.").parse::<i64>().unwrap())
        .unwrap();
    assert_eq!(ids(&ra["dropped_layers"]), [lowest]);
    let kept_blocks: Vec<i64> = (0..3).filter(|&i| i != lowest).collect();
    for (j, &i) in kept_blocks.iter().enumerate() {
        for t in ["attn.wq", "attn_norm.weight", "ffn_norm.weight"] {
            let (n, o) = (format!("layers.{j}.{t}"), format!("layers.{i}.{t}"));
            assert!(sa.read(&n).unwrap().equal(&src.read(&o).unwrap()), "{n}");
        }
    }
    let cfg = stored_config(&ca);
    assert_eq!(
        (
            cfg.model.num_layers,
            cfg.moe.num_experts,
            cfg.moe.expert_hidden,
            cfg.model.ffn_hidden
        ),
        (2, 4, 16, 32)
    );

    // The dense block 0 (never dropped: it changes the most): a consistent unit subset.
    let o = |p: &str| src.read(&format!("layers.0.ffn.{p}")).unwrap();
    let n = |p: &str| sa.read(&format!("layers.0.ffn.{p}")).unwrap();
    let u = column_subset(&n("w_gate"), &o("w_gate"), 0.0, "ffn w_gate");
    let idx = Tensor::from_slice(&u);
    assert!(n("w_up").equal(&o("w_up").index_select(1, &idx)));
    assert!(n("w_down").equal(&o("w_down").index_select(0, &idx)));

    let kept_map = ra["kept_experts"].as_object().unwrap();
    assert_eq!(kept_map.len(), 1, "one MoE block left: {kept_map:?}");
    for (new_layer, keep) in kept_map {
        let keep = ids(keep);
        let j: usize = new_layer.split('.').nth(1).unwrap().parse().unwrap();
        let old_layer = format!("layers.{}.moe", kept_blocks[j]);
        let routing = &calib["routing"][&old_layer];
        let (freq, weighted) = (
            f64s(&routing["frequency"]),
            f64s(&routing["weighted_frequency"]),
        );
        let mut order: Vec<usize> = (0..8).collect();
        order.sort_by(|&x, &y| weighted[y].total_cmp(&weighted[x]).then(x.cmp(&y)));
        let mut want: Vec<i64> = order[..4].iter().map(|&i| i as i64).collect();
        want.sort_unstable();
        assert_eq!(keep, want, "{weighted:?}");

        let router = src
            .read(&format!("{old_layer}.w_router"))
            .unwrap()
            .to_kind(Kind::Double);
        let cos = |x: i64, y: i64| {
            let (a, b) = (router.select(1, x), router.select(1, y));
            a.dot(&b).double_value(&[]) / (a.norm().double_value(&[]) * b.norm().double_value(&[]))
        };
        let merged = ra["merged_into"][new_layer].as_object().unwrap();
        assert_eq!(merged.len(), 4);
        let mut groups: Vec<Vec<i64>> = keep.iter().map(|&g| vec![g]).collect();
        for (dropped, into) in merged {
            let (dropped, into) = (dropped.parse::<i64>().unwrap(), into.as_i64().unwrap());
            let best = keep
                .iter()
                .copied()
                .max_by(|&x, &y| cos(dropped, x).total_cmp(&cos(dropped, y)).then(y.cmp(&x)))
                .unwrap();
            assert_eq!(into, best, "expert {dropped}");
            groups[keep.iter().position(|&g| g == into).unwrap()].push(dropped);
        }
        assert!(
            sa.read(&format!("{new_layer}.w_router")).unwrap().equal(
                &router
                    .to_kind(Kind::Float)
                    .index_select(1, &Tensor::from_slice(&keep))
            ),
            "router columns"
        );
        for (slot, group) in groups.iter().enumerate() {
            let total: f64 = group.iter().map(|&x| freq[x as usize]).sum();
            let mean = |p: &str| {
                let name = format!("{old_layer}.experts.{p}");
                group
                    .iter()
                    .map(|&x| {
                        let w = src.read(&expert_tensor_name(&name, x, None)).unwrap();
                        let c = if total > 0.0 {
                            freq[x as usize] / total
                        } else {
                            1.0 / group.len() as f64
                        };
                        w.to_kind(Kind::Double) * c
                    })
                    .reduce(|acc, t| acc + t)
                    .unwrap()
            };
            let new = |p: &str| {
                sa.read(&expert_tensor_name(
                    &format!("{new_layer}.experts.{p}"),
                    slot as i64,
                    None,
                ))
                .unwrap()
                .to_kind(Kind::Double)
            };
            let what = format!("{new_layer} expert {slot} <- {group:?}");
            let u = column_subset(&new("w_gate"), &mean("w_gate"), 1e-6, &what);
            let idx = Tensor::from_slice(&u);
            let close = |x: Tensor, y: Tensor| (x - y).abs().max().double_value(&[]) <= 1e-6;
            assert!(
                close(new("w_up"), mean("w_up").index_select(1, &idx)),
                "{what}"
            );
            assert!(
                close(new("w_down"), mean("w_down").index_select(0, &idx)),
                "{what}"
            );
        }
    }
    assert!(ra["val_loss_after"].as_f64().unwrap().is_finite());
    let o = run_ok(&["eval", "--checkpoint", a.to_str().unwrap()]);
    assert!(o.contains("checkpoint step 0"), "{o}");
    let losses = train_on(&a, 3);
    assert!(
        losses.len() == 3 && losses.iter().all(|l| l.is_finite()),
        "{losses:?}"
    );

    // Blocks named explicitly: block 2 removed, blocks 0 and 1 copied.
    let named = s.0.join("named");
    run_ok(&[
        "slim",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--layers",
        "2",
        "--out",
        named.to_str().unwrap(),
    ]);
    let sn = CheckpointReader::open(&only_checkpoint(&named)).unwrap();
    for n in sn.model_names() {
        assert!(!n.starts_with("layers.2."), "{n}");
        assert!(sn.read(n).unwrap().equal(&src.read(n).unwrap()), "{n}");
    }
}

/// Distillation: a student (2 experts, trained 5 steps) trains a sixth step at EP=2 with
/// `trainer.distill` (alpha 0.5, T 2) from a teacher of 4 experts. The logged `distill_loss`
/// equals `alpha * T^2 * KL(teacher || student)` computed here, on that step's batch of each
/// of the two ranks, from the two checkpoints' logits with plain log-softmax arithmetic in f64
/// (tolerance 1e-5 relative: f32 logits, the student at EP=2 against one process here).
/// `loss` includes it. A teacher with another vocabulary is refused: exit 2, naming
/// `trainer.distill.teacher`, nothing written.
#[test]
fn distillation_term_matches_a_hand_kl() {
    use moe_trainer::data::{load_dataset, sampler::SamplerSpec, Split};
    let s = Scratch::new("surgery-distill");
    let teacher = train_tiny(&s, "teacher", "  num_experts: 4\n  top_k: 2\n", &[]);
    // A student of another seed and shape (2 experts, 5 steps), so that the two disagree.
    let student = train_tiny(
        &s,
        "student",
        "  num_experts: 2\n  top_k: 1\n",
        &["--set", "run.seed=5", "--set", "trainer.max_steps=5"],
    );
    // Loaded now: training with checkpoint.keep 1 replaces the step-0 checkpoint.
    let student_ckpt = only_checkpoint(&student);
    let cfg = stored_config(&student_ckpt);
    let (stu, _) = load_single(&cfg, &student_ckpt, Device::Cpu).unwrap();
    let teach = format!("trainer.distill.teacher={}", teacher.display());
    let cfg_path = student.join("config.yaml");
    let train_args = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--config",
            cfg_path.to_str().unwrap(),
            "--resume",
            "auto",
            "--debug",
            "--set",
            "parallel.ep_size=2",
            "--set",
            "trainer.max_steps=6",
            "--set",
            "trainer.log_every=1",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let args = train_args(&[
        "--set",
        &teach,
        "--set",
        "trainer.distill.alpha=0.5",
        "--set",
        "trainer.distill.temperature=2.0",
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&args);
    let text = std::fs::read_to_string(student.join("metrics.jsonl")).unwrap();
    let rec: serde_json::Value = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["kind"] == "train" && v["step"] == 6)
        .unwrap();
    let got = rec["distill_loss"].as_f64().unwrap();
    let parts = ["lm_loss", "aux_loss", "z_loss", "distill_loss"]
        .map(|k| rec[k].as_f64().unwrap())
        .iter()
        .sum::<f64>();
    assert!(
        (rec["loss"].as_f64().unwrap() - parts).abs() < 1e-9,
        "{rec}"
    );

    let tckpt = only_checkpoint(&teacher);
    let (tea, _) = load_single(&stored_config(&tckpt), &tckpt, Device::Cpu).unwrap();
    let data = load_dataset(&cfg.data, cfg.model.vocab_size).unwrap();
    let ctx = LmForward {
        train: false,
        compute_kind: Kind::Float,
        step: 0,
    };
    let (alpha, temp) = (0.5, 2.0);
    let mut want = 0.0;
    for rank in 0..2 {
        let spec = SamplerSpec {
            seed: cfg.run.seed,
            seq_len: cfg.data.seq_len,
            batch_size: cfg.trainer.batch_size,
            world_size: 2,
            rank,
            grad_accum: 1,
        };
        let b = data.batches(Split::Train, 5, &spec).unwrap().remove(0);
        let (zt, zs) = tch::no_grad(|| {
            (
                tea.forward(&b.inputs_bt, &ctx).unwrap().logits_btv,
                stu.forward(&b.inputs_bt, &ctx).unwrap().logits_btv,
            )
        });
        let lt = (zt.to_kind(Kind::Double) / temp).log_softmax(-1, Kind::Double);
        let ls = (zs.to_kind(Kind::Double) / temp).log_softmax(-1, Kind::Double);
        let kl_bt = (lt.exp() * (&lt - &ls)).sum_dim_intlist(-1, false, Kind::Double);
        want += alpha * temp * temp * kl_bt.mean(Kind::Double).double_value(&[]) / 2.0;
    }
    assert!(
        want > 1e-4,
        "degenerate: teacher and student agree ({want})"
    );
    assert!(
        (got - want).abs() <= 1e-5 * want,
        "logged {got}, by hand {want}"
    );

    // A teacher with another vocabulary.
    let other = train_tiny(
        &s,
        "other",
        "  num_experts: 4\n  top_k: 2\n",
        &["--set", "model.vocab_size=300"],
    );
    let fresh = s.0.join("never");
    let bad_teacher = format!("trainer.distill.teacher={}", other.display());
    let out_dir = format!("run.out_dir={}", fresh.display());
    let args = train_args(&["--set", &bad_teacher, "--set", &out_dir]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, so, se) = moe(&args);
    assert_eq!(code, 2, "{so}\n{se}");
    assert!(
        se.contains("trainer.distill.teacher") && se.contains("vocabulary"),
        "{se}"
    );
    assert!(!fresh.exists(), "wrote {}", fresh.display());
}
