//! `moe tokenizer train`, `moe data prepare`, training on the prepared tokens, and
//! `moe export --tokenizer`: the exported tokenizer encodes a text to the same ids in
//! `transformers` (`AutoTokenizer`, the project's .venv) as in `moe`.

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

fn u16s(path: &Path) -> Vec<u32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(2)
        .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
        .collect()
}

#[test]
fn tokenizer_train_prepare_train_and_export() {
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

    // The token files hold exactly our encoding of the corpus, split 90/10.
    let data = s.0.join("data");
    ok(&[
        "data",
        "prepare",
        "--tokenizer",
        tok_path.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        data.to_str().unwrap(),
    ]);
    let ids = tok.encode(&text).unwrap();
    assert!(
        ids.len() * 4 < text.len() * 3,
        "BPE should compress: {} ids",
        ids.len()
    );
    let n_train = ids.len() * 9 / 10;
    assert_eq!(u16s(&data.join("train.bin")), ids[..n_train]);
    assert_eq!(u16s(&data.join("val.bin")), ids[n_train..]);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("tokens.json")).unwrap()).unwrap();
    assert_eq!(meta["vocab_size"], 300);
    assert_eq!(meta["dtype"], "uint16");
    assert_eq!(meta["tokenizer_sha256"], tok.sha256());

    // A model trains on them.
    let run = s.0.join("run");
    let cfg = |vocab: u32, out: &Path| {
        s.write(
            &format!("train-{vocab}.yaml"),
            &format!(
                "run:\n  out_dir: {}\n\
                 model:\n  vocab_size: {vocab}\n  d_model: 32\n  num_layers: 2\n  num_heads: 4\n  \
                 num_kv_heads: 2\n  max_seq_len: 32\n\
                 moe:\n  num_experts: 4\n  top_k: 2\n  expert_hidden: 32\n\
                 data:\n  source: tokens\n  path: {}\n  seq_len: 16\n\
                 trainer:\n  max_steps: 3\n  batch_size: 2\n  warmup_steps: 1\n  eval_every: 0\n  \
                 eval_iters: 1\n  device: cpu\n  threads: 1\n",
                out.display(),
                data.display()
            ),
        )
    };
    ok(&["train", "--config", cfg(300, &run).to_str().unwrap()]);

    // A model whose vocabulary is smaller than the tokenizer's is refused at load, naming
    // the sidecar; no run directory is created.
    let small = s.0.join("small");
    let (code, o, e) = moe(&["train", "--config", cfg(280, &small).to_str().unwrap()]);
    // (`moe train` exits 1 on data-file errors today, as for any unreadable data file.)
    assert_ne!(code, 0, "{o}\n{e}");
    assert!(
        e.contains("tokens.json") && e.contains("exceeds model.vocab_size (280)"),
        "{e}"
    );
    assert!(!small.exists());

    // Export with the tokenizer: transformers' AutoTokenizer gives our ids.
    let hf = s.0.join("hf");
    let printed = ok(&[
        "export",
        "--checkpoint",
        run.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
        "--tokenizer",
        tok_path.to_str().unwrap(),
    ]);
    assert!(printed.contains("tokenizer.json"), "{printed}");
    let sample = "Whether 'tis nobler, the lazy fox? Ünïcödé too.\n";
    let sample_path = s.write("sample.txt", sample);
    let out = Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tests/python/hf_reference.py"))
        .args(["tokenize", "--hf", hf.to_str().unwrap(), "--text"])
        .arg(&sample_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let theirs: Vec<u32> = v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(theirs, tok.encode(sample).unwrap());
    assert_eq!(v["decoded"], sample);

    // A tokenizer with more ids than the model is refused by export.
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
