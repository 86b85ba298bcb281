//! `moe train` on bad input: every case exits with 2 before anything runs, prints one
//! `error:` paragraph naming the file, line, column and key, and writes nothing to out_dir.

mod common;

use common::{moe, Scratch};
use std::path::Path;

/// Runs `moe train --config <cfg> extra...` and checks the common contract of bad input;
/// returns stderr.
fn train_fails(s: &Scratch, cfg: &Path, extra: &[&str]) -> String {
    let cfg = cfg.to_str().unwrap();
    let mut args = vec!["train", "--config", cfg];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = moe(&args);
    assert_eq!(code, 2, "exit code; stderr: {stderr}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    assert!(stderr.starts_with("error: "), "stderr: {stderr}");
    assert!(!s.out_dir().exists(), "out_dir was created");
    stderr
}

fn assert_has(stderr: &str, parts: &[&str]) {
    for p in parts {
        assert!(stderr.contains(p), "missing {p:?} in: {stderr}");
    }
}

/// Parse errors are one paragraph: one line of text.
fn assert_one_line(stderr: &str) {
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one paragraph: {stderr}"
    );
}

#[test]
fn unknown_key_names_place_and_suggests() {
    let s = Scratch::new("unknown-key");
    let cfg = s.config("c.yaml", "moe:\n  num_experts: 8\n  top_kk: 2\n");
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            &cfg.display().to_string(),
            "line 5, column 3",
            "unknown key `moe.top_kk`",
            "did you mean `moe.top_k`?",
        ],
    );
    assert_one_line(&e);
}

#[test]
fn unknown_key_without_close_match_lists_the_keys() {
    let s = Scratch::new("unknown-far");
    let cfg = s.config("c.yaml", "trainer:\n  learning_rate: 0.1\n");
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            "line 4, column 3",
            "unknown key `trainer.learning_rate`",
            "max_steps",
        ],
    );
    assert!(!e.contains("did you mean"), "{e}");
}

#[test]
fn unknown_section_suggests_the_section() {
    let s = Scratch::new("unknown-section");
    let cfg = s.config("c.yaml", "trainr:\n  lr: 0.1\n");
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            "line 3, column 1",
            "unknown section `trainr`",
            "did you mean `trainer`?",
        ],
    );
}

#[test]
fn wrong_type_names_key_and_value() {
    let s = Scratch::new("wrong-type");
    let cfg = s.config("c.yaml", "trainer:\n  max_steps: \"ten\"\n");
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            "line 4, column 14",
            "`trainer.max_steps`",
            "whole number",
            "\"ten\"",
        ],
    );
    assert_one_line(&e);
}

#[test]
fn bad_enum_lists_the_valid_values() {
    let s = Scratch::new("bad-enum");
    let cfg = s.config("c.yaml", "moe:\n  score_function: softmx\n");
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            "line 4, column 19",
            "`moe.score_function`",
            "softmax, sigmoid",
            "`softmx`",
            "did you mean `softmax`?",
        ],
    );
    assert_one_line(&e);
}

#[test]
fn all_cross_field_violations_in_one_error() {
    let s = Scratch::new("cross");
    let cfg = s.config(
        "c.yaml",
        "model:\n  d_model: 100\n  num_heads: 8\n  num_kv_heads: 3\nmoe:\n  num_experts: 4\n  top_k: 6\n",
    );
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            "3 problems",
            "moe.top_k (6) must be <= moe.num_experts (4) [line 9, column 3]",
            "model.num_kv_heads (3) must divide model.num_heads (8) [line 6, column 3]",
            "model.num_heads (8) must divide model.d_model (100)",
        ],
    );
}

/// The new families' shape rules: an odd MLA RoPE width, group_topk above num_groups and
/// experts that do not split into the groups, each naming its key and line.
#[test]
fn mla_and_group_violations_name_keys_and_lines() {
    let s = Scratch::new("families");
    let cfg = s.config(
        "c.yaml",
        "model:\n  attention:\n    kind: mla\n    qk_rope_head_dim: 7\nmoe:\n  num_experts: 12\n  top_k: 4\n  num_groups: 5\n  group_topk: 6\n",
    );
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            "model.attention.qk_rope_head_dim (7) must be even (RoPE rotates pairs) [line 6, column 5]",
            "moe.num_experts (12) must be divisible by moe.num_groups (5) [line 8, column 3]",
            "moe.group_topk (6) must be in 1..=moe.num_groups (5) [line 11, column 3]",
        ],
    );
    let cfg = s.config(
        "d.yaml",
        "model:\n  attention:\n    kind: gated_deltanet\n    full_attention_interval: 0\n    linear_num_key_heads: 3\n",
    );
    let e = train_fails(&s, &cfg, &[]);
    assert_has(
        &e,
        &[
            "model.attention.full_attention_interval (0) must be positive [line 6, column 5]",
            "model.attention.linear_num_key_heads (3) must divide model.attention.linear_num_value_heads (4) [line 7, column 5]",
        ],
    );
}

#[test]
fn empty_and_comment_only_files() {
    let s = Scratch::new("empty");
    for (name, text) in [("empty.yaml", ""), ("comments.yaml", "# nothing here\n\n")] {
        let cfg = s.write(name, text);
        let e = train_fails(&s, &cfg, &[]);
        assert_has(&e, &[name, "is empty"]);
    }
}

#[test]
fn missing_file() {
    let s = Scratch::new("missing");
    let cfg = s.0.join("nope.yaml");
    let e = train_fails(&s, &cfg, &[]);
    assert_has(&e, &["cannot read the config file", "nope.yaml"]);
}

#[test]
fn syntax_error_names_line_and_column() {
    let s = Scratch::new("syntax");
    let cfg = s.config("c.yaml", "moe:\n  num_experts: [8\n  top_k: 2\n");
    let e = train_fails(&s, &cfg, &[]);
    assert_has(&e, &["c.yaml, line ", "invalid YAML"]);
    assert_one_line(&e);
}

#[test]
fn bad_set_overrides() {
    let s = Scratch::new("bad-set");
    let cfg = s.config("c.yaml", "moe:\n  num_experts: 8\n");
    let e = train_fails(&s, &cfg, &["--set", "moe.top_kk=3"]);
    assert_has(
        &e,
        &[
            "--set moe.top_kk=3",
            "unknown key `moe.top_kk`",
            "did you mean `moe.top_k`?",
        ],
    );
    let e = train_fails(&s, &cfg, &["--set", "trainer.max_steps=ten"]);
    assert_has(
        &e,
        &[
            "--set trainer.max_steps=ten",
            "`trainer.max_steps`",
            "whole number",
        ],
    );
    let e = train_fails(&s, &cfg, &["--set", "trainer.max_steps"]);
    assert_has(&e, &["--set trainer.max_steps", "KEY=VALUE"]);
    let e = train_fails(&s, &cfg, &["--set", "moe.score_function=softmx"]);
    assert_has(
        &e,
        &["--set moe.score_function=softmx", "did you mean `softmax`?"],
    );
    // A valid override that breaks a cross-field rule is named in the validation error.
    let e = train_fails(&s, &cfg, &["--set", "moe.top_k=9"]);
    assert_has(
        &e,
        &["moe.top_k (9) must be <= moe.num_experts (8) [--set moe.top_k=9]"],
    );
}

#[test]
fn overrides_reach_the_resolved_config() {
    let s = Scratch::new("good-set");
    let cfg = s.config("c.yaml", "moe:\n  capacity_factor: 1.5\n");
    let cfg = cfg.to_str().unwrap();
    let (code, out, err) = moe(&[
        "check",
        "--config",
        cfg,
        "--set",
        "moe.capacity_factor=null",
        "--set",
        "trainer.lr=1e-3",
        "--set",
        "run.name=x",
        "--set",
        "trainer.min_lr=0",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_has(&out, &["capacity_factor: null", "lr: 0.001", "name: x"]);
    assert!(!s.out_dir().exists(), "check must not create out_dir");
}
