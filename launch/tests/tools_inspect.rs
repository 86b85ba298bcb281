//! `moe inspect`: the analytic parameter counts equal what `TransformerLm::new` allocates
//! (whole model and each EP rank's slice), the JSON output carries them, and the full-size
//! configs report their published counts.

mod common;

use common::{moe, repo_root, Scratch};
use moe_model::config::{AttentionConfig, AttentionKind, ModelConfig, MoeConfig};
use moe_model::count::count_params;
use moe_model::transformer::TransformerLm;
use moe_model::ExpertParallel;
use moe_model::ParamKind;
use tch::Device;

fn numel(lm: &TransformerLm, expert: Option<bool>) -> u64 {
    lm.params()
        .iter()
        .filter(|p| expert.is_none_or(|e| e == matches!(p.kind, ParamKind::Expert { .. })))
        .map(|p| p.tensor.numel() as u64)
        .sum()
}

fn mla(q_lora_rank: Option<i64>) -> AttentionConfig {
    AttentionConfig {
        kind: AttentionKind::Mla,
        q_lora_rank,
        kv_lora_rank: 5,
        qk_nope_head_dim: 3,
        qk_rope_head_dim: 4,
        v_head_dim: 7,
        softmax_scale: None,
        ..AttentionConfig::default()
    }
}

/// Small shapes covering every component: tied/untied head, shared experts (and their own
/// width), dense first layers, MoE every other layer, GQA and MHA, an explicit head_dim,
/// MLA with and without query compression, and the dense baseline. Counts are integers: exact equality.
#[test]
fn analytic_counts_equal_allocated_params() {
    let base = ModelConfig {
        vocab_size: 40,
        d_model: 16,
        num_layers: 4,
        num_heads: 4,
        num_kv_heads: 2,
        ffn_hidden: 24,
        max_seq_len: 8,
        ..ModelConfig::default()
    };
    let moe = MoeConfig {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 8,
        ..MoeConfig::default()
    };
    let cases: Vec<(&str, ModelConfig, MoeConfig)> = vec![
        ("untied, all MoE, GQA", base.clone(), moe.clone()),
        (
            "tied, MHA",
            ModelConfig {
                tie_embeddings: true,
                num_kv_heads: 4,
                ..base.clone()
            },
            moe.clone(),
        ),
        (
            "shared experts of their own width, 1 dense first layer",
            base.clone(),
            MoeConfig {
                num_shared_experts: 2,
                shared_expert_hidden: Some(12),
                first_dense_layers: 1,
                ..moe.clone()
            },
        ),
        (
            "moe_every 2 after a dense layer, head_dim set, top-1",
            ModelConfig {
                head_dim: Some(6),
                num_kv_heads: 1,
                num_layers: 5,
                ..base.clone()
            },
            MoeConfig {
                first_dense_layers: 1,
                moe_every: 2,
                top_k: 1,
                ..moe.clone()
            },
        ),
        (
            "Qwen options: q/k/v biases, q/k norms, gated shared expert",
            ModelConfig {
                qkv_bias: true,
                qk_norm: true,
                ..base.clone()
            },
            MoeConfig {
                num_shared_experts: 1,
                shared_expert_gate: true,
                ..moe.clone()
            },
        ),
        (
            "one routed expert plus a shared expert is still MoE",
            base.clone(),
            MoeConfig {
                num_experts: 1,
                top_k: 1,
                num_shared_experts: 1,
                ..moe.clone()
            },
        ),
        (
            "MLA with compressed queries",
            ModelConfig {
                attention: mla(Some(6)),
                ..base.clone()
            },
            moe.clone(),
        ),
        (
            "MLA with full queries, tied",
            ModelConfig {
                attention: mla(None),
                tie_embeddings: true,
                ..base.clone()
            },
            moe.clone(),
        ),
        (
            "multi-token prediction, MoE block",
            ModelConfig {
                mtp_depth: 1,
                ..base.clone()
            },
            moe.clone(),
        ),
        (
            "multi-token prediction, dense block (moe_every 2), MLA",
            ModelConfig {
                mtp_depth: 1,
                num_layers: 3,
                attention: mla(Some(6)),
                ..base.clone()
            },
            MoeConfig {
                moe_every: 2,
                ..moe.clone()
            },
        ),
        (
            "gated DeltaNet hybrid with gated shared experts",
            ModelConfig {
                num_layers: 4,
                head_dim: Some(6),
                attention: AttentionConfig {
                    kind: AttentionKind::GatedDeltanet,
                    full_attention_interval: 2,
                    rotary_dim: Some(4),
                    linear_num_key_heads: 2,
                    linear_num_value_heads: 4,
                    linear_key_head_dim: 3,
                    linear_value_head_dim: 5,
                    linear_conv_kernel: 3,
                    ..AttentionConfig::default()
                },
                ..base.clone()
            },
            MoeConfig {
                num_shared_experts: 1,
                shared_expert_gate: true,
                ..moe.clone()
            },
        ),
        (
            "dense baseline",
            base.clone(),
            MoeConfig {
                num_experts: 1,
                top_k: 1,
                ..moe.clone()
            },
        ),
    ];
    for (what, m, e) in cases {
        let c = count_params(&m, &e).unwrap();
        let full = TransformerLm::new(&m, &e, &ExpertParallel::single(), 1, Device::Cpu).unwrap();
        assert_eq!(c.total(), numel(&full, None), "{what}: total");
        assert_eq!(c.expert(), numel(&full, Some(true)), "{what}: expert");
        assert_eq!(
            c.replicated(),
            numel(&full, Some(false)),
            "{what}: replicated"
        );
        // Per-component check against the parameter names.
        // The prediction block is `layers.{num_layers}`; the main components exclude it.
        let mtp_prefix = format!("layers.{}.", m.num_layers);
        let numel_where = |pred: &dyn Fn(&str) -> bool| -> u64 {
            full.params()
                .iter()
                .filter(|p| pred(&p.name))
                .map(|p| p.tensor.numel() as u64)
                .sum()
        };
        let by_name = |pred: &dyn Fn(&str) -> bool| -> u64 {
            numel_where(&|n| !n.starts_with(&mtp_prefix) && pred(n))
        };
        let get_or_0 = |n: &str| c.get(n).map_or(0, |x| x.params);
        assert_eq!(
            get_or_0("mtp"),
            numel_where(&|n| n.starts_with(&mtp_prefix) && !n.contains(".experts.")),
            "{what}: mtp"
        );
        assert_eq!(
            get_or_0("mtp_routed_experts"),
            numel_where(&|n| n.starts_with(&mtp_prefix) && n.contains(".experts.")),
            "{what}: mtp_routed_experts"
        );
        let get = |n: &str| c.get(n).unwrap().params;
        assert_eq!(
            get("embedding"),
            by_name(&|n| n == "embed.weight"),
            "{what}"
        );
        assert_eq!(
            get("lm_head"),
            by_name(&|n| n == "lm_head.weight"),
            "{what}"
        );
        assert_eq!(
            get("attention"),
            // Norms inside an attention (MHA's q/k norms, MLA's latent norms, gated attention's
            // q/k norms) count as attention.
            by_name(&|n| n.contains(".attn.")),
            "{what}"
        );
        assert_eq!(
            get("norms"),
            by_name(&|n| n.ends_with("norm.weight") && !n.contains(".attn.")),
            "{what}"
        );
        assert_eq!(
            get("router"),
            by_name(&|n| n.ends_with(".w_router")),
            "{what}"
        );
        assert_eq!(
            get("routed_experts"),
            by_name(&|n| n.contains(".experts.")),
            "{what}"
        );
        assert_eq!(
            get("shared_experts"),
            by_name(&|n| n.contains(".shared.") || n.ends_with(".shared_gate")),
            "{what}"
        );
        assert_eq!(
            get("dense_ffn"),
            by_name(&|n| n.contains(".ffn.")),
            "{what}"
        );
        // Active: routed experts count k/E of their parameters, the rest in full.
        let routed = get("routed_experts") + get_or_0("mtp_routed_experts");
        let expect_active = c.total() - routed + routed / e.num_experts as u64 * e.top_k as u64;
        assert_eq!(c.active(), expect_active, "{what}: active");
        for p in [1i64, 2, 4] {
            if e.num_experts % p != 0 {
                continue;
            }
            for r in 0..p {
                let par = ExpertParallel::detached(r, p);
                let lm = TransformerLm::new(&m, &e, &par, 1, Device::Cpu).unwrap();
                assert_eq!(
                    c.replicated() + c.expert_per_rank(p as u64),
                    numel(&lm, None),
                    "{what}: EP rank {r} of {p}"
                );
            }
        }
    }
}

fn json_of(args: &[&str]) -> serde_json::Value {
    let (code, out, err) = moe(args);
    assert_eq!(code, 0, "moe {args:?}: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn u(v: &serde_json::Value, key: &str) -> u64 {
    v.pointer(key)
        .and_then(serde_json::Value::as_u64)
        .unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// The JSON of a small config against the model the binary would build (same shapes here),
/// the per-rank memory arithmetic, and an EP size that does not divide E.
#[test]
fn inspect_json_matches_the_built_model() {
    let s = Scratch::new("inspect-json");
    let cfg = s.config(
        "small.yaml",
        "model:\n  vocab_size: 256\n  d_model: 32\n  num_layers: 3\n  num_heads: 4\n  \
         num_kv_heads: 2\n  ffn_hidden: 48\n  max_seq_len: 32\n  tie_embeddings: true\n\
         moe:\n  num_experts: 4\n  top_k: 2\n  expert_hidden: 16\n  num_shared_experts: 1\n  \
         first_dense_layers: 1\ndata:\n  seq_len: 32\ntrainer:\n  batch_size: 2\n",
    );
    let path = cfg.to_str().unwrap();
    let v = json_of(&["inspect", "--config", path, "--json", "--ep-size", "2"]);
    let m = ModelConfig {
        vocab_size: 256,
        d_model: 32,
        num_layers: 3,
        num_heads: 4,
        num_kv_heads: 2,
        ffn_hidden: 48,
        max_seq_len: 32,
        tie_embeddings: true,
        ..ModelConfig::default()
    };
    let e = MoeConfig {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 16,
        num_shared_experts: 1,
        first_dense_layers: 1,
        ..MoeConfig::default()
    };
    let full = TransformerLm::new(&m, &e, &ExpertParallel::single(), 1, Device::Cpu).unwrap();
    assert_eq!(u(&v, "/total_params"), numel(&full, None));
    let half = TransformerLm::new(&m, &e, &ExpertParallel::detached(1, 2), 1, Device::Cpu).unwrap();
    let per_rank = numel(&half, None);
    assert_eq!(u(&v, "/per_rank/params"), per_rank);
    assert_eq!(u(&v, "/per_rank/total_bytes"), per_rank * 16);
    assert_eq!(u(&v, "/per_rank/experts_per_layer"), 2);
    assert_eq!(u(&v, "/breakdown/lm_head/params"), 0);
    assert_eq!(u(&v, "/breakdown/embedding/params"), 256 * 32);
    // Routed experts: 2 MoE layers * 4 experts * 3 * 32 * 16; active: 2 of the 4.
    assert_eq!(
        u(&v, "/breakdown/routed_experts/params"),
        2 * 4 * 3 * 32 * 16
    );
    assert_eq!(
        u(&v, "/breakdown/routed_experts/active_params"),
        2 * 2 * 3 * 32 * 16
    );
    let parts: u64 = v["breakdown"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["params"].as_u64().unwrap())
        .sum();
    assert_eq!(parts, u(&v, "/total_params"));
    // All-to-all: T = 2*32 tokens, k 2, d 32, fp32, 2 MoE layers, P 2:
    // 64*2*32*4 * 2 * 2 * 2 / 2 = 65536 bytes.
    assert_eq!(u(&v, "/all_to_all_bytes_per_step"), 65_536);

    let (code, _, err) = moe(&["inspect", "--config", path, "--ep-size", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("moe.num_experts (4)"), "{err}");
}

/// (config, published total, published active, tolerance as a fraction of the published
/// value, the parameters the real model has that ours lacks).
/// - Mixtral: expressed exactly; 0.5% as required (the published figures have 3 digits).
/// - DBRX: expressed exactly (its bias-free LayerNorm and fused Wqkv have our parameter
///   counts); published to the nearest billion, so +-0.5B: 0.5/132 and 0.5/36.
/// - DeepSeek-V3 (without its MTP module, as published): 0.5% total and 3% active, the
///   issue's bounds (the published figures have 3 and 2 digits).
/// - Qwen1.5-MoE-A2.7B: expressed exactly (q/k/v biases and the shared-expert gate
///   included); published to 0.1B, so +-0.05B: 0.05/14.3 and 0.05/2.7.
const PUBLISHED: &[(&str, f64, f64, f64, f64, u64)] = &[
    ("mixtral-8x7b", 46.7e9, 12.9e9, 0.005, 0.005, 0),
    ("dbrx", 132e9, 36e9, 0.5 / 132.0, 0.5 / 36.0, 0),
    ("deepseek-v3", 671e9, 37e9, 0.005, 0.03, 0),
    (
        "qwen1.5-moe-a2.7b",
        14.3e9,
        2.7e9,
        0.05 / 14.3,
        0.05 / 2.7,
        0,
    ),
];

#[test]
fn full_size_configs_report_published_counts() {
    for &(name, total, active, tol_total, tol_active, missing) in PUBLISHED {
        let rel = format!("configs/{name}.yaml");
        let start = std::time::Instant::now();
        let v = json_of(&["inspect", "--config", &rel, "--json"]);
        assert!(
            start.elapsed().as_secs_f64() < 10.0,
            "{name}: inspect must not allocate"
        );
        // Published counts leave out multi-token prediction (DeepSeek-V3's 671B / 37B).
        let ours_total = u(&v, "/total_params_without_mtp");
        let ours_active = u(&v, "/active_params_without_mtp");
        let (t, a) = (
            (ours_total + missing) as f64,
            (ours_active + missing) as f64,
        );
        println!(
            "{name}: total {ours_total} ({:.4} of published {total:e}), active {ours_active} \
             ({:.4} of published {active:e}){}",
            t / total,
            a / active,
            if missing > 0 {
                format!(", +{missing} parameters our model lacks")
            } else {
                String::new()
            }
        );
        assert!((t / total - 1.0).abs() <= tol_total, "{name} total {t}");
        assert!((a / active - 1.0).abs() <= tol_active, "{name} active {a}");
    }
    assert_eq!(
        u(
            &json_of(&["inspect", "--config", "configs/mixtral-8x7b.yaml", "--json"]),
            "/total_params"
        ),
        46_702_792_704
    );
    // DeepSeek-V3's released checkpoint holds 685B: 671B plus a 14B prediction module that
    // stores its own copies of the embedding and the LM head (2 * 129280 * 7168 =
    // 1,853,358,080), which ours shares with the main model.
    let v = json_of(&["inspect", "--config", "configs/deepseek-v3.yaml", "--json"]);
    let with_copies = (u(&v, "/total_params") + 1_853_358_080) as f64;
    assert!((with_copies / 685e9 - 1.0).abs() <= 0.005, "{with_copies}");
    let mtp = u(&v, "/mtp_params") + 1_853_358_080;
    assert!((mtp as f64 / 14e9 - 1.0).abs() <= 0.05, "mtp {mtp}");
    // Qwen3-Next-80B-A3B: "80B in total and 3B activated" (model card, two digits and one):
    // total within 2%, and the activated count, which leaves out the embedding and LM head
    // (0.62B; with them ours is 3.87B), within 15%, the bounds.
    let v = json_of(&[
        "inspect",
        "--config",
        "configs/qwen3-next-80b-a3b.yaml",
        "--json",
    ]);
    let total = u(&v, "/total_params") as f64;
    let active = u(&v, "/active_params_without_embeddings") as f64;
    println!("qwen3-next-80b-a3b: total {total:e}, active without embeddings {active:e}");
    assert!((total / 80e9 - 1.0).abs() <= 0.02, "total {total}");
    assert!((active / 3e9 - 1.0).abs() <= 0.15, "active {active}");
}

/// Switch-Base-8 is an encoder-decoder with ReLU FFNs, which our model cannot express; its
/// config keeps the parameter budget (see the file's header). Ours plus exactly the tensors
/// we lack (12 decoder cross-attentions, 13 layer-norm scales, 2 relative-bias tables)
/// equals the count of the published architecture, computed here from its config.json.
#[test]
fn switch_base_8_differs_by_exactly_what_we_lack() {
    let v = json_of(&[
        "inspect",
        "--config",
        "configs/switch-base-8.yaml",
        "--json",
    ]);
    let (d, f, vocab, e, h) = (768u64, 3072u64, 32128u64, 8u64, 12u64);
    let attn = 4 * d * d;
    let relu = 2 * d * f;
    let encoder = 6 * (attn + relu + 2 * d) + 6 * (attn + e * relu + d * e + 2 * d) + d + 32 * h;
    let decoder =
        6 * (2 * attn + relu + 3 * d) + 6 * (2 * attn + e * relu + d * e + 3 * d) + d + 32 * h;
    let switch = encoder + decoder + vocab * d;
    assert_eq!(switch, 619_339_008);
    let lacking = 12 * attn + 13 * d + 2 * 32 * h;
    let ours = u(&v, "/total_params");
    println!(
        "switch-base-8: ours {ours} ({:.4} of the published architecture's {switch})",
        ours as f64 / switch as f64
    );
    assert_eq!(ours + lacking, switch);
    assert!(repo_root().join("configs/switch-base-8.yaml").exists());
}
