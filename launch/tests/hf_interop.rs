//! `moe export` and `moe import` against the real `transformers` (the project's .venv):
//! tiny models trained here load in `transformers` with the same logits and greedy text, and
//! tiny random models saved by `transformers` import with the same logits and export back
//! bit for bit. Reference models are made locally by `tests/python/hf_reference.py` with
//! `transformers`' own config classes and `save_pretrained`; nothing is downloaded.

mod common;

use common::{moe, repo_root, Scratch};
use moe_model::transformer::LmForward;
use moe_testutil::only_checkpoint;
use moe_trainer::checkpoint::{read_manifest, Checkpointer, Snapshot, StFile};
use moe_trainer::config::ExperimentConfig;
use moe_trainer::hf::shards::{write_file, ExportDtype, OutTensor};
use moe_trainer::inference::{last_logits, load_single, EvalModel};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

/// Logits tolerance: 1e-5 of the largest logit, float32 on both sides. The two compute the
/// same function with differently ordered float32 reductions (fused vs split projections,
/// SDPA kernels, RoPE tables built in float64 here and float32 there: ~1e-7 relative each).
const REL_TOL: f64 = 1e-5;

/// Batch of the logits comparison: [2, 24] byte tokens.
fn batch() -> Vec<Vec<i64>> {
    let text = b"The quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.";
    vec![
        text[..24].iter().map(|&b| i64::from(b)).collect(),
        text[30..54].iter().map(|&b| i64::from(b)).collect(),
    ]
}

const PROMPT: &[u8] = b"the cat ";
const NEW_TOKENS: usize = 32;

fn python() -> PathBuf {
    repo_root().join(".venv/bin/python")
}

/// Runs `hf_reference.py args...`; panics with its output on failure.
fn reference(args: &[&str]) {
    let out = Command::new(python())
        .arg(repo_root().join("tests/python/hf_reference.py"))
        .args(args)
        .output()
        .expect("running tests/python/hf_reference.py with .venv/bin/python");
    assert!(
        out.status.success(),
        "hf_reference.py {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// transformers' logits `[b, t, v]` (flattened) and greedy continuation of the folder `hf`.
fn theirs(s: &Scratch, hf: &Path) -> (Vec<f64>, Vec<i64>) {
    let input = s.write(
        "ref-in.json",
        &json!({
            "tokens": batch(),
            "prompt": PROMPT.iter().map(|&b| i64::from(b)).collect::<Vec<_>>(),
            "new_tokens": NEW_TOKENS,
        })
        .to_string(),
    );
    let output = s.0.join("ref-out.json");
    reference(&[
        "run",
        "--hf",
        hf.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter())
        .flat_map(|r| r.as_array().unwrap().iter())
        .map(|x| x.as_f64().unwrap())
        .collect();
    let generated = v["generated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect();
    (logits, generated)
}

/// Our logits and greedy continuation of the checkpoint `ckpt`, dropless (as transformers).
fn ours(ckpt: &Path) -> (Vec<f64>, Vec<i64>) {
    let manifest = read_manifest(ckpt).unwrap();
    let mut cfg: ExperimentConfig = serde_json::from_str(&manifest.config_yaml).unwrap();
    cfg.parallel.ep_size = 1;
    cfg.moe.capacity_factor = None;
    let (model, _) = load_single(&cfg, ckpt, Device::Cpu).unwrap();
    let m = EvalModel {
        model: &model,
        device: Device::Cpu,
        compute_kind: Kind::Float,
    };
    let b = batch();
    let tokens = Tensor::from_slice(&b.concat()).view([b.len() as i64, -1]);
    let ctx = LmForward {
        train: false,
        compute_kind: Kind::Float,
        step: 0,
    };
    let logits = tch::no_grad(|| model.forward(&tokens, &ctx).unwrap().logits_btv);
    let logits = Vec::<f64>::try_from(logits.to_kind(Kind::Double).reshape([-1])).unwrap();
    let mut seq: Vec<i64> = PROMPT.iter().map(|&b| i64::from(b)).collect();
    for _ in 0..NEW_TOKENS {
        let next = last_logits(&m, &seq)
            .unwrap()
            .argmax(0, false)
            .int64_value(&[]);
        seq.push(next);
    }
    (logits, seq[PROMPT.len()..].to_vec())
}

fn assert_same_outputs(ours: &(Vec<f64>, Vec<i64>), theirs: &(Vec<f64>, Vec<i64>)) {
    assert_eq!(ours.0.len(), theirs.0.len());
    let scale = ours.0.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let diff = ours
        .0
        .iter()
        .zip(&theirs.0)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    eprintln!(
        "max |logit| {scale:.4}, max diff {diff:.3e}; greedy ours {:?} theirs {:?}",
        ours.1, theirs.1
    );
    assert!(scale > 0.1, "degenerate logits (max |logit| {scale})");
    assert!(
        diff <= REL_TOL * scale,
        "logits differ by {diff} (max |logit| {scale}, tolerance {REL_TOL} relative)"
    );
    assert_eq!(ours.1, theirs.1, "greedy continuations differ");
    let mut distinct = ours.1.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 1, "degenerate continuation {:?}", ours.1);
}

/// A tiny model trained by the binary (150 steps, ~3 s: enough that its greedy text is not
/// one repeated byte); `model` and `moe` are extra YAML lines of those sections.
fn train_tiny(s: &Scratch, name: &str, model: &str, moe_extra: &str) -> PathBuf {
    let out = s.0.join(name);
    let cfg = s.write(
        &format!("{name}.yaml"),
        &format!(
            "run:\n  out_dir: {}\n\
             model:\n  vocab_size: 256\n  d_model: 32\n  num_layers: 2\n  num_heads: 4\n  \
             num_kv_heads: 2\n  ffn_hidden: 48\n  max_seq_len: 64\n  rope_theta: 10000.0\n{model}\
             moe:\n  num_experts: 4\n  top_k: 2\n  expert_hidden: 32\n{moe_extra}\
             data:\n  seq_len: 32\n  synthetic_bytes: 100000\n\
             trainer:\n  max_steps: 150\n  batch_size: 4\n  lr: 1.0e-2\n  warmup_steps: 2\n  \
             log_every: 50\n  eval_every: 0\n  device: cpu\n  threads: 1\n\
             checkpoint:\n  every: 0\n  keep: 1\n",
            out.display()
        ),
    );
    let (code, o, e) = moe(&["train", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "train failed:\n{o}\n{e}");
    out
}

fn export(ckpt: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "export",
        "--checkpoint",
        ckpt.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let (code, o, e) = moe(&args);
    assert_eq!(code, 0, "export failed:\n{o}\n{e}");
    o
}

/// Every tensor of a HF folder, by name, as float32.
fn hf_tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            let f = StFile::open(&p).unwrap();
            for name in f.tensors().keys() {
                out.insert(name.clone(), f.read(name).unwrap());
            }
        }
    }
    out
}

/// Export of a briefly trained model of `arch` (inferred, not passed): transformers gives our
/// logits and greedy text. Returns the export folder.
fn check_export(tag: &str, arch: &str, model: &str, moe_extra: &str, args: &[&str]) -> Scratch {
    let s = Scratch::new(tag);
    let run = train_tiny(&s, "run", model, moe_extra);
    let ckpt = only_checkpoint(&run);
    let out = s.0.join("hf");
    let printed = export(&run, &out, args);
    assert!(printed.contains(&format!("as {arch} (")), "{printed}");
    assert!(!printed.contains("note:"), "{printed}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], json!(arch));
    assert_same_outputs(&ours(&ckpt), &theirs(&s, &out));
    s
}

/// Mixtral, exported as ~20 kB shards (the tiny model's 82 kB of expert weights need several)
/// that transformers loads through the index.
#[test]
fn export_mixtral_matches_transformers() {
    let s = check_export(
        "hf-exp-mixtral",
        "mixtral",
        "",
        "",
        &["--max-shard-size", "20000"],
    );
    let out = s.0.join("hf");
    assert!(out.join("model.safetensors.index.json").is_file());
    let shards = std::fs::read_dir(&out)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("model-0")
        })
        .count();
    assert!(shards > 1, "{shards} shards");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"], json!(["MixtralForCausalLM"]));
    assert_eq!(config["num_local_experts"], json!(4));
    assert_eq!(config["intermediate_size"], json!(32));
}

/// Qwen2-MoE: q/k/v biases, a gated shared expert, a dense first block, top-k weights not
/// renormalised (pre-softmax).
#[test]
fn export_qwen2_moe_matches_transformers() {
    let s = check_export(
        "hf-exp-qwen2",
        "qwen2_moe",
        "  qkv_bias: true\n",
        "  num_shared_experts: 2\n  shared_expert_hidden: 24\n  shared_expert_gate: true\n  \
         first_dense_layers: 1\n  pre_softmax: true\n",
        &[],
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.0.join("hf/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["mlp_only_layers"], json!([0]));
    assert_eq!(config["shared_expert_intermediate_size"], json!(48));
    assert_eq!(config["norm_topk_prob"], json!(false));
}

/// Qwen3-MoE: per-head q/k RMSNorm, renormalised top-k.
#[test]
fn export_qwen3_moe_matches_transformers() {
    let s = check_export("hf-exp-qwen3", "qwen3_moe", "  qk_norm: true\n", "", &[]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.0.join("hf/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["norm_topk_prob"], json!(true));
}

/// An EP=2 checkpoint exports the same bytes as its EP=1 twin (the same weights re-saved by
/// one rank), and capacity dropping is noted.
#[test]
fn ep2_exports_the_same_bytes_as_ep1() {
    let s = Scratch::new("hf-ep2");
    let run = s.0.join("run");
    let cfg = s.write(
        "ep2.yaml",
        &format!(
            "run:\n  out_dir: {}\n\
             model:\n  vocab_size: 256\n  d_model: 32\n  num_layers: 2\n  num_heads: 4\n  \
             num_kv_heads: 2\n  max_seq_len: 32\n\
             moe:\n  num_experts: 4\n  top_k: 2\n  expert_hidden: 32\n  capacity_factor: 1.25\n\
             data:\n  seq_len: 32\n  synthetic_bytes: 100000\n\
             trainer:\n  max_steps: 4\n  batch_size: 4\n  warmup_steps: 1\n  eval_every: 0\n  \
             device: cpu\n  threads: 1\n\
             parallel:\n  ep_size: 2\n\
             checkpoint:\n  every: 0\n  keep: 1\n",
            run.display()
        ),
    );
    let (code, o, e) = moe(&["train", "--config", cfg.to_str().unwrap(), "--debug"]);
    assert_eq!(code, 0, "train failed:\n{o}\n{e}");
    let ckpt2 = only_checkpoint(&run);
    let manifest = read_manifest(&ckpt2).unwrap();
    assert_eq!(manifest.ep_size, 2);
    assert!(ckpt2.join("experts-r1.safetensors").is_file());

    // The EP=1 twin: the weights loaded into one process and saved by one rank.
    let mut cfg1: ExperimentConfig = serde_json::from_str(&manifest.config_yaml).unwrap();
    cfg1.parallel.ep_size = 1;
    let (model, _) = load_single(&cfg1, &ckpt2, Device::Cpu).unwrap();
    let twin_root = s.0.join("twin");
    let mut ck = Checkpointer::new(&twin_root, 1, 0, 0, 1, 1).unwrap();
    let snap = Snapshot {
        step: manifest.step,
        config_yaml: manifest.config_yaml.clone(),
        ..Snapshot::from_params(&model.params(), &model.buffers(), Vec::new()).unwrap()
    };
    let ckpt1 = ck.save(snap).unwrap();
    ck.wait().unwrap();
    assert_eq!(read_manifest(&ckpt1).unwrap().ep_size, 1);

    let (out1, out2) = (s.0.join("hf1"), s.0.join("hf2"));
    let printed = export(&ckpt2, &out2, &[]);
    export(&ckpt1, &out1, &[]);
    let notes: Vec<&str> = printed.lines().filter(|l| l.starts_with("note:")).collect();
    assert_eq!(notes.len(), 1, "{printed}");
    assert!(notes[0].contains("moe.capacity_factor (1.25)"), "{printed}");
    for f in ["model.safetensors", "config.json", "generation_config.json"] {
        let (a, b) = (
            std::fs::read(out1.join(f)).unwrap(),
            std::fs::read(out2.join(f)).unwrap(),
        );
        assert!(a == b, "{f} differs between the EP=1 and EP=2 exports");
    }
    // And the bytes are the checkpoint's: every expert of EP rank 1 is where it belongs.
    let t = hf_tensors(&out2);
    let st = StFile::open(&ckpt2.join("experts-r1.safetensors")).unwrap();
    let ours = st.read("layers.1.moe.experts.3.w_up").unwrap();
    assert!(t["model.layers.1.block_sparse_moe.experts.3.w3.weight"].equal(&ours.tr()));
}

/// A random `arch` model saved by transformers imports with the same logits and greedy text,
/// and exporting the import gives back every tensor bit for bit. Returns the run directory.
fn check_import(s: &Scratch, arch: &str, make_args: &[&str]) -> PathBuf {
    check_import_with(s, arch, make_args, None)
}

/// [`check_import`], with `tokenizer` copied into the folder as its `tokenizer.json` first.
fn check_import_with(
    s: &Scratch,
    arch: &str,
    make_args: &[&str],
    tokenizer: Option<&Path>,
) -> PathBuf {
    let hf = s.0.join("ref");
    let mut args = vec![
        "make",
        "--arch",
        arch,
        "--out",
        hf.to_str().unwrap(),
        "--seed",
        "3",
    ];
    args.extend_from_slice(make_args);
    reference(&args);
    if let Some(t) = tokenizer {
        std::fs::copy(t, hf.join("tokenizer.json")).unwrap();
    }
    let run = s.0.join("imported");
    let (code, o, e) = moe(&[
        "import",
        "--hf",
        hf.to_str().unwrap(),
        "--out",
        run.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "import failed:\n{o}\n{e}");
    assert!(o.contains(&format!("({arch}, ")), "{o}");
    let ckpt = only_checkpoint(&run);
    assert_same_outputs(&ours(&ckpt), &theirs(s, &hf));

    let back = s.0.join("back");
    export(&ckpt, &back, &[]);
    let (a, b) = (hf_tensors(&hf), hf_tensors(&back));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} changed in the round trip");
    }
    run
}

/// Mixtral saved sharded; the imported run directory also trains on (`--resume auto`) at
/// EP=2 and evaluates.
#[test]
fn import_mixtral_matches_transformers_and_trains_on() {
    let s = Scratch::new("hf-imp-mixtral");
    let run = check_import(&s, "mixtral", &["--max-shard-size", "20KB"]);
    assert!(s.0.join("ref/model.safetensors.index.json").is_file());
    let cfg = run.join("config.yaml");
    let (code, o, e) = moe(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--resume",
        "auto",
        "--debug",
        "--set",
        "parallel.ep_size=2",
        "--set",
        "trainer.max_steps=2",
        "--set",
        "trainer.warmup_steps=1",
        "--set",
        "trainer.batch_size=2",
        "--set",
        "trainer.eval_every=0",
        "--set",
        "trainer.device=cpu",
    ]);
    assert_eq!(code, 0, "train --resume auto failed:\n{o}\n{e}");
    assert!(o.contains("resumed from"), "{o}");
    let (code, o, e) = moe(&["eval", "--checkpoint", run.to_str().unwrap()]);
    assert_eq!(code, 0, "eval failed:\n{o}\n{e}");
    assert!(o.contains("checkpoint step 2"), "{o}");
}

/// Qwen2-MoE with a dense first block, q/k/v biases and the gated shared expert.
#[test]
fn import_qwen2_moe_matches_transformers() {
    let s = Scratch::new("hf-imp-qwen2");
    let run = check_import(&s, "qwen2_moe", &[]);
    let yaml = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    for want in [
        "qkv_bias: true",
        "first_dense_layers: 1",
        "shared_expert_gate: true",
        "pre_softmax: true",
    ] {
        assert!(yaml.contains(want), "{want} not in\n{yaml}");
    }
}

/// Qwen3-MoE with per-head q/k norms and renormalised top-k, from a folder with a
/// `tokenizer.json`: the run keeps it (as `data.tokenizer` and in the checkpoint), export
/// ships it back without a flag, and `moe generate` encodes and decodes with it, giving
/// transformers' greedy text.
#[test]
fn import_qwen3_moe_matches_transformers() {
    let s = Scratch::new("hf-imp-qwen3");
    // A byte-level BPE of 256 ids (no merges) fits the reference model's vocabulary; its ids
    // are not the byte values, so generating without it would give other text.
    let input = s.write("corpus.txt", "To be, or not to be: that is the question.\n");
    let tok = s.0.join("tokenizer.json");
    let (code, o, e) = moe(&[
        "tokenizer",
        "train",
        "--input",
        input.to_str().unwrap(),
        "--vocab-size",
        "256",
        "--out",
        tok.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{o}\n{e}");
    let run = check_import_with(&s, "qwen3_moe", &[], Some(&tok));
    let yaml = std::fs::read_to_string(run.join("config.yaml")).unwrap();
    assert!(yaml.contains("qk_norm: true"), "{yaml}");
    let kept = run.join("tokenizer.json");
    assert!(
        yaml.contains(&format!("tokenizer: {}", kept.display())),
        "{yaml}"
    );
    let bytes = std::fs::read(&tok).unwrap();
    assert_eq!(std::fs::read(&kept).unwrap(), bytes);
    let ckpt = only_checkpoint(&run);
    assert_eq!(std::fs::read(ckpt.join("tokenizer.json")).unwrap(), bytes);
    let back = s.0.join("back");
    assert_eq!(std::fs::read(back.join("tokenizer.json")).unwrap(), bytes);
    assert!(back.join("tokenizer_config.json").is_file());

    let prompt = "the question";
    let (code, o, e) = moe(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        prompt,
        "--tokens",
        "10",
        "--temperature",
        "0",
    ]);
    assert_eq!(code, 0, "{o}\n{e}");
    let out = Command::new(python())
        .arg(repo_root().join("tests/python/hf_reference.py"))
        .args([
            "generate-text",
            "--hf",
            back.to_str().unwrap(),
            "--prompt",
            prompt,
        ])
        .args(["--tokens", "10"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let byte_ids: Vec<u64> = prompt.bytes().map(u64::from).collect();
    assert_ne!(
        v["prompt_ids"],
        json!(byte_ids),
        "the tokenizer must not be the identity"
    );
    assert_eq!(o, format!("{prompt}{}", v["text"].as_str().unwrap()), "{e}");
}

/// Rewrites `dir/model.safetensors` with `edit` applied to its tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(OutTensor, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let f = StFile::open(&path).unwrap();
    let mut ts: Vec<(OutTensor, Tensor)> = f
        .tensors()
        .iter()
        .map(|(n, info)| {
            (
                OutTensor {
                    name: n.clone(),
                    shape: info.shape.clone(),
                },
                f.read(n).unwrap(),
            )
        })
        .collect();
    edit(&mut ts);
    let refs: Vec<&OutTensor> = ts.iter().map(|(o, _)| o).collect();
    let values: BTreeMap<String, Tensor> = ts
        .iter()
        .map(|(o, t)| (o.name.clone(), t.shallow_clone()))
        .collect();
    let mut read = |o: &OutTensor| Ok(values[&o.name].shallow_clone());
    write_file(&path, &refs, ExportDtype::F32, &mut read).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// Bad input: each case exits 2 with a message naming the file and the problem, and leaves
/// no output directory behind (or, for an existing one, leaves it untouched).
#[test]
fn import_rejects_bad_input() {
    let s = Scratch::new("hf-bad");
    let good = s.0.join("good");
    reference(&["make", "--arch", "mixtral", "--out", good.to_str().unwrap()]);
    let expert = "model.layers.1.block_sparse_moe.experts.2.w1.weight";

    type Break = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Break, Vec<String>)> = vec![
        (
            "truncated",
            Box::new(|d: &Path| {
                let p = d.join("model.safetensors");
                let len = std::fs::metadata(&p).unwrap().len();
                let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
                f.set_len(len - 100).unwrap();
            }),
            vec!["model.safetensors".into(), "truncated".into()],
        ),
        (
            "corrupt",
            Box::new(|d: &Path| {
                let p = d.join("model.safetensors");
                let mut b = std::fs::read(&p).unwrap();
                b[8..16].copy_from_slice(b"garbage!");
                std::fs::write(&p, b).unwrap();
            }),
            vec!["model.safetensors".into(), "header is not JSON".into()],
        ),
        (
            "missing-field",
            Box::new(|d: &Path| {
                let p = d.join("config.json");
                let mut v: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                v.as_object_mut().unwrap().remove("num_local_experts");
                std::fs::write(&p, v.to_string()).unwrap();
            }),
            vec![
                "config.json".into(),
                "missing field `num_local_experts`".into(),
            ],
        ),
        (
            "missing-tensor",
            Box::new(move |d: &Path| rewrite(d, |ts| ts.retain(|(o, _)| o.name != expert))),
            vec![format!("missing tensor {expert}")],
        ),
        (
            "extra-tensor",
            Box::new(|d: &Path| {
                rewrite(d, |ts| {
                    ts.push((
                        OutTensor {
                            name: "model.layers.0.mlp.extra.weight".into(),
                            shape: vec![2],
                        },
                        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
                    ))
                })
            }),
            vec![
                "unexpected tensor model.layers.0.mlp.extra.weight".into(),
                "model.safetensors".into(),
            ],
        ),
        (
            "mis-shaped",
            Box::new(move |d: &Path| {
                rewrite(d, |ts| {
                    for (o, t) in ts.iter_mut() {
                        if o.name == expert {
                            o.shape = vec![16, 32];
                            *t = Tensor::zeros([16, 32], (Kind::Float, Device::Cpu));
                        }
                    }
                })
            }),
            vec![
                format!("tensor {expert} in"),
                "shape [16, 32], the config needs [32, 32]".into(),
            ],
        ),
    ];
    for (name, breaker, wants) in cases {
        let dir = s.0.join(name);
        copy_dir(&good, &dir);
        breaker(&dir);
        let out = s.0.join(format!("{name}-out"));
        let (code, o, e) = moe(&[
            "import",
            "--hf",
            dir.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, 2, "{name}: exit {code}\n{o}\n{e}");
        for w in &wants {
            assert!(e.contains(w.as_str()), "{name}: `{w}` not in:\n{e}");
        }
        assert!(!out.exists(), "{name}: {} was created", out.display());
    }

    // A non-empty output directory is refused and left as it was.
    let taken = s.0.join("taken");
    std::fs::create_dir_all(&taken).unwrap();
    std::fs::write(taken.join("keep.txt"), "mine").unwrap();
    let (code, _, e) = moe(&[
        "import",
        "--hf",
        good.to_str().unwrap(),
        "--out",
        taken.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("exists and is not an empty directory"), "{e}");
    assert_eq!(
        std::fs::read_to_string(taken.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(std::fs::read_dir(&taken).unwrap().count(), 1);
}

/// A model whose math transformers' Mixtral does not compute is refused, naming the key.
#[test]
fn export_refuses_what_mixtral_does_not_compute() {
    let s = Scratch::new("hf-refuse");
    let run = {
        let out = s.0.join("sig");
        let cfg = s.write(
            "sig.yaml",
            &format!(
                "run:\n  out_dir: {}\n\
                 model:\n  vocab_size: 256\n  d_model: 32\n  num_layers: 2\n  num_heads: 4\n  \
                 num_kv_heads: 2\n  max_seq_len: 32\n\
                 moe:\n  num_experts: 4\n  top_k: 2\n  expert_hidden: 32\n  \
                 score_function: sigmoid\n  route_scale: 2.5\n\
                 data:\n  seq_len: 32\n  synthetic_bytes: 100000\n\
                 trainer:\n  max_steps: 1\n  batch_size: 2\n  warmup_steps: 0\n  eval_every: 0\n  \
                 device: cpu\n  threads: 1\n",
                out.display()
            ),
        );
        let (code, o, e) = moe(&["train", "--config", cfg.to_str().unwrap()]);
        assert_eq!(code, 0, "train failed:\n{o}\n{e}");
        out
    };
    let out = s.0.join("hf");
    let (code, o, e) = moe(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{o}\n{e}");
    assert!(
        e.contains("moe.score_function (sigmoid) cannot be exported to mixtral: the router applies a softmax"),
        "{e}"
    );
    assert!(e.contains("moe.route_scale (2.5)"), "{e}");
    assert!(!out.exists());
}
