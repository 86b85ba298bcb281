//! `moe tokenizer train`, `moe data prepare`, training with `data.tokenizer`, and the
//! tokenizer the checkpoint stores: `moe eval`, `moe generate` and `moe export` use it with no
//! extra flag (the original file moved away), and the exported folder's tokenizer and model
//! give in `transformers` (`AutoTokenizer`, the project's .venv) the same ids and the same
//! greedy text as `moe`.

mod common;

use common::{moe, repo_root, Scratch};
use moe_trainer::tokenizer::TextTokenizer;
use std::path::Path;
use std::process::Command;

/// A few kB of English-like text with repeated words, so BPE has merges to learn.
fn corpus() -> String {
    let lines = [
        "To be, or not to be: that is the question.",
        "Whether 'tis nobler in the mind to suffer the slings and arrows",
        "of outrageous fortune, or to take arms against a sea of troubles.",
        "The quick brown fox jumps over the lazy dog; the dog sleeps on.",
    ];
    (0..60)
        .map(|i| format!("{} {i}\n", lines[i % lines.len()]))
        .collect()
}

fn ok(args: &[&str]) -> String {
    let (code, o, e) = moe(args);
    assert_eq!(code, 0, "moe {args:?} failed:\n{o}\n{e}");
    o
}

fn ids_le(path: &Path, width: usize) -> Vec<u32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(width)
        .map(|c| {
            c.iter()
                .rev()
                .fold(0u32, |acc, &b| (acc << 8) | u32::from(b))
        })
        .collect()
}

/// JSON printed by `tests/python/hf_reference.py args...`.
fn reference(args: &[&str]) -> serde_json::Value {
    let out = Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tests/python/hf_reference.py"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A tiny model on token data at `data` with `tokenizer` (written into the config as given:
/// relative paths are relative to the config file, in the scratch dir).
fn config(s: &Scratch, name: &str, out: &Path, vocab: u32, data: &str, tokenizer: &str) -> String {
    s.write(
        &format!("{name}.yaml"),
        &format!(
            "run:\n  out_dir: {}\n\
             model:\n  vocab_size: {vocab}\n  d_model: 32\n  num_layers: 2\n  num_heads: 4\n  \
             num_kv_heads: 2\n  max_seq_len: 64\n\
             moe:\n  num_experts: 4\n  top_k: 2\n  expert_hidden: 32\n\
             data:\n  source: tokens\n  path: {data}\n  tokenizer: {tokenizer}\n  seq_len: 16\n\
             trainer:\n  max_steps: 60\n  batch_size: 4\n  lr: 1.0e-2\n  warmup_steps: 5\n  \
             eval_every: 0\n  eval_iters: 1\n  device: cpu\n  threads: 1\n",
            out.display(),
        ),
    )
    .to_str()
    .unwrap()
    .to_string()
}

#[test]
fn tokenizer_train_prepare_train_and_use_the_stored_tokenizer() {
    let s = Scratch::new("tok-tools");
    let text = corpus();
    let input = s.write("corpus.txt", &text);
    let tok_path = s.0.join("tok/tokenizer.json");
    let printed = ok(&[
        "tokenizer",
        "train",
        "--input",
        input.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        tok_path.to_str().unwrap(),
    ]);
    assert!(printed.contains("300 ids"), "{printed}");
    let tok = TextTokenizer::load(&tok_path).unwrap();
    assert_eq!(tok.vocab_size(), 300);

    // The token files hold exactly our encoding of the corpus, split 90/10; the progress bar
    // prints plain lines (stdout is a pipe here) and the advice names absolute paths.
    let data = s.0.join("data");
    let printed = ok(&[
        "data",
        "prepare",
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert!(
        printed.contains("] 100%") && !printed.contains('\r'),
        "{printed}"
    );
    for want in [
        format!("data.path: {}", data.canonicalize().unwrap().display()),
        format!(
            "data.tokenizer: {}",
            tok_path.canonicalize().unwrap().display()
        ),
        "model.vocab_size: 300".to_string(),
    ] {
        assert!(printed.contains(&want), "{want:?} not in {printed}");
    }
    let ids = tok.encode(&text).unwrap();
    assert!(
        ids.len() * 4 < text.len() * 3,
        "BPE should compress: {} ids",
        ids.len()
    );
    let n_train = ids.len() * 9 / 10;
    assert_eq!(ids_le(&data.join("train.bin"), 2), ids[..n_train]);
    assert_eq!(ids_le(&data.join("val.bin"), 2), ids[n_train..]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("tokens.json")).unwrap()).unwrap();
    assert_eq!(meta["vocab_size"], 300);
    assert_eq!(meta["dtype"], "uint16");
    assert_eq!(meta["tokenizer_sha256"], tok.sha256());

    // A model trains on them, with data.tokenizer relative to the config file; the
    // checkpoint keeps a copy of the tokenizer and its hash.
    let run = s.0.join("run");
    ok(&[
        "train",
        "--config",
        &config(&s, "train", &run, 300, "data", "tok/tokenizer.json"),
    ]);
    let ckpt = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("manifest.json").is_file())
        .unwrap();
    assert_eq!(
        std::fs::read(ckpt.join("tokenizer.json")).unwrap(),
        std::fs::read(&tok_path).unwrap()
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["tokenizer"]["sha256"], tok.sha256());

    // The original tokenizer moves away: eval, export and generate need no flag.
    let moved = s.0.join("tok-moved");
    std::fs::rename(s.0.join("tok"), &moved).unwrap();
    let o = ok(&["eval", "--checkpoint", run.to_str().unwrap()]);
    assert!(o.contains("val_loss"), "{o}");
    let hf = s.0.join("hf");
    let printed = ok(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    assert!(
        printed.contains("tokenizer.json, tokenizer_config.json"),
        "{printed}"
    );
    let sample = "Whether 'tis nobler, the lazy fox? Ünïcödé too.\n";
    let sample_path = s.write("sample.txt", sample);
    let v = reference(&[
        "tokenize",
        "--hf",
        hf.to_str().unwrap(),
        "--text",
        sample_path.to_str().unwrap(),
    ]);
    let theirs: Vec<u32> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(theirs, tok.encode(sample).unwrap());
    assert_eq!(v["decoded"], sample);

    // Greedy generation encodes the prompt and decodes the continuation with the stored
    // tokenizer: the same text as transformers' greedy continuation of the exported model
    // and tokenizer.
    let prompt = "To be, or not";
    let (code, o, e) = moe(&[
        "generate",
        "--checkpoint",
        run.to_str().unwrap(),
        "--prompt",
        prompt,
        "--tokens",
        "12",
        "--temperature",
        "0",
    ]);
    assert_eq!(code, 0, "{o}\n{e}");
    let v = reference(&[
        "generate-text",
        "--hf",
        hf.to_str().unwrap(),
        "--prompt",
        prompt,
        "--tokens",
        "12",
    ]);
    let want_ids: Vec<u32> = tok.encode(prompt).unwrap();
    assert_eq!(v["prompt_ids"], serde_json::json!(want_ids));
    assert_eq!(o, format!("{prompt}{}", v["text"].as_str().unwrap()), "{e}");
    assert!(e.contains("[12 tokens"), "{e}");

    // A slimmed run carries its own copy of the tokenizer (its config names it, its
    // checkpoint stores it): it evaluates after the source run is gone too.
    let slim = s.0.join("slim");
    ok(&[
        "slim",
        "--checkpoint",
        run.to_str().unwrap(),
        "--experts",
        "2",
        "--expert-criterion",
        "random",
        "--out",
        slim.to_str().unwrap(),
    ]);
    let slim_tok = slim.join("tokenizer.json");
    assert_eq!(
        std::fs::read(&slim_tok).unwrap(),
        std::fs::read(moved.join("tokenizer.json")).unwrap()
    );
    let slim_cfg = std::fs::read_to_string(slim.join("config.yaml")).unwrap();
    assert!(
        slim_cfg.contains(slim_tok.to_str().unwrap()),
        "config.yaml should name {}:\n{slim_cfg}",
        slim_tok.display()
    );
    let run_moved = s.0.join("run-moved");
    std::fs::rename(&run, &run_moved).unwrap();
    let o = ok(&["eval", "--checkpoint", slim.to_str().unwrap()]);
    assert!(o.contains("val_loss"), "{o}");
    std::fs::rename(&run_moved, &run).unwrap();
    std::fs::rename(&moved, s.0.join("tok")).unwrap();

    // A model whose vocabulary is smaller than the tokenizer's is refused at config check,
    // naming the file and the key; no run directory is created.
    let small = s.0.join("small");
    let (code, o, e) = moe(&[
        "train",
        "--config",
        &config(&s, "small", &small, 280, "data", "tok/tokenizer.json"),
    ]);
    assert_eq!(code, 2, "{o}\n{e}");
    assert!(
        e.contains("tok/tokenizer.json")
            && e.contains("data.tokenizer has 300 ids")
            && e.contains("model.vocab_size (280)"),
        "{e}"
    );
    assert!(!small.exists());

    // Token data made with another tokenizer: exit 2 naming the sidecar and the tokenizer.
    let big = s.0.join("big.json");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        input.to_str().unwrap(),
        "--vocab-size",
        "400",
        "--out",
        big.to_str().unwrap(),
    ]);
    let other = s.0.join("other");
    let (code, o, e) = moe(&[
        "train",
        "--config",
        &config(&s, "other", &other, 400, "data", "big.json"),
    ]);
    assert_eq!(code, 2, "{o}\n{e}");
    assert!(
        e.contains("data/tokens.json") && e.contains("big.json") && e.contains("different"),
        "{e}"
    );
    assert!(!other.exists());

    // A tokenizer with more ids than the model is refused by export.
    let hf2 = s.0.join("hf2");
    let (code, o, e) = moe(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        hf2.to_str().unwrap(),
        "--tokenizer",
        big.to_str().unwrap(),
    ]);
    assert_eq!(TextTokenizer::load(&big).unwrap().vocab_size(), 400);
    assert_eq!(code, 2, "{o}\n{e}");
    assert!(
        e.contains("big.json") && e.contains("model.vocab_size 300"),
        "{e}"
    );
    assert!(!hf2.exists());

    // Bad input to the tools: exit 2, named.
    let (code, _, e) = moe(&[
        "data",
        "prepare",
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("exists and is not empty"), "{e}");
    let (code, _, e) = moe(&[
        "tokenizer",
        "train",
        "--input",
        input.to_str().unwrap(),
        "--vocab-size",
        "100",
        "--out",
        s.0.join("x.json").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("--vocab-size (100)"), "{e}");
}

/// A vocabulary above 65536 ids (a 300-id BPE plus 66000 added tokens) makes uint32 token
/// files holding ids above 65535, and a model of that vocabulary trains on them.
#[test]
fn large_vocabularies_prepare_uint32_and_train() {
    let s = Scratch::new("tok-u32");
    let base: String = (0..200)
        .map(|i| format!("the cat sat on the mat <t{}>\n", 65_999 - i % 40))
        .collect();
    let input = s.write("corpus.txt", &base);
    let small = s.0.join("small.json");
    ok(&[
        "tokenizer",
        "train",
        "--input",
        input.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--out",
        small.to_str().unwrap(),
    ]);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&small).unwrap()).unwrap();
    let added = v["added_tokens"].as_array_mut().unwrap();
    for i in 0..66_000 {
        added.push(serde_json::json!({
            "id": 300 + i, "content": format!("<t{i}>"), "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": false
        }));
    }
    let big = s.write("big.json", &serde_json::to_string(&v).unwrap());
    let tok = TextTokenizer::load(&big).unwrap();
    assert_eq!(tok.vocab_size(), 66_300);
    let data = s.0.join("data");
    ok(&[
        "data",
        "prepare",
        "--tokenizer",
        big.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("tokens.json")).unwrap()).unwrap();
    assert_eq!(meta["dtype"], "uint32");
    let ids = tok.encode(&base).unwrap();
    let n_train = ids.len() * 9 / 10;
    assert_eq!(ids_le(&data.join("train.bin"), 4), ids[..n_train]);
    assert_eq!(ids_le(&data.join("val.bin"), 4), ids[n_train..]);
    assert!(ids.iter().any(|&i| i > 65_535));
    let run = s.0.join("run");
    let cfg = config(&s, "u32", &run, 66_300, "data", "big.json");
    ok(&["train", "--config", &cfg, "--set", "trainer.max_steps=2"]);
}
