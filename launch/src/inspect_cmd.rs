//! `moe inspect`: a config's model from the config alone (no tensor is allocated, so
//! full-size configs answer instantly): parameter counts per component, total and active per
//! token ([`moe_model::count`]), what one rank holds at EP size P, an activation-memory
//! estimate, the all-to-all volume per step, and FLOPs per token.
//!
//! Formulas (b = bytes of the matmul kind: 4 for fp32, 2 for bf16):
//! - memory per rank: weights, gradients and AdamW's exp_avg + exp_avg_sq, all float32
//!   (4 + 4 + 8 bytes per parameter), for the replicated parameters plus E/P of the routed
//!   experts.
//! - activations: the tensors autograd keeps for backward in one micro-batch of
//!   n = batch_size * seq_len tokens (an estimate: the exact set depends on kernels), with
//!   q = heads * head_dim, kv = kv_heads * head_dim, f = ffn_hidden, h = expert_hidden,
//!   s = num_shared * shared_hidden:
//!
//! ```text
//! n * [ L * (24 d + b A)                       the two residual sums, and each of the two
//!                                              norms' normalised input and output (f32);
//!                                              attention's tensors A (below)
//!     + dense_layers * b 4 f                   FFN gate, silu(gate), up, their product
//!     + moe_layers * (4 (2 d + 3 E)            router logits and scores, combine (f32)
//!                     + b (k (2 d + 4 h)       routed rows and outputs; gate, silu(gate),
//!                          + 4 s))             up, product per row; the same for shared
//!     + 8 v + 12 d ]                           logits and their log-softmax, the embedding
//!                                              and the final norm (f32)
//! ```
//!
//!   Checked against what the model really keeps (2026-12-01): the heap bytes in use after a
//!   forward, minus before, per token, for each module alone on the quickstart shapes (norm
//!   1029 B = 2 d f32; attention 2086 B; MoE layer 7324 B; SwiGLU of width 512 8197 B = 4 f
//!   f32), and for the whole quickstart model 52.4 MiB against 53.9 MiB from this formula
//!   (the attention term overestimates GQA a little: 2560 B here).
//!
//!   with A summed over the blocks: 4 q + 2 kv for `mha` (q, k, v, the GQA-expanded k and v,
//!   the output); for `mla`, r_q + (r_kv + rope) + r_kv + H (2 qk + nope + 2 v) (query
//!   latent, kv latent and its norm, q, the up-projected k_nope and v, the full k, the
//!   output); for `gated_deltanet`, 6 q + 2 kv in its full-attention blocks (plus the gate and
//!   the gated output) and, in its DeltaNet blocks, the projections, convolution, rule
//!   inputs and output plus `Hv (3 C + dk + dv)` per token for the chunk's matrices (C the
//!   chunk size).
//!
//! - multi-token prediction (`model.mtp_depth: 1`) counts as one more block (MoE or dense)
//!   with its own logits, in activations, all-to-all and FLOPs (plus one more LM-head matmul).
//! - all-to-all bytes per rank per step:
//!   `T * k * d * b * 2 (dispatch + combine) * (P-1)/P * 2 (forward + backward) * moe_layers`
//!   with T = batch_size * seq_len * grad_accum tokens per rank per step; (P-1)/P is the
//!   share of rows leaving the rank under balanced routing.
//! - FLOPs per token: forward 2 * (matmul parameters active per token) + seq_len * sum S
//!   (causal attention scores and values, half the square) with S = 2 q for `mha` and
//!   gated full attention and S = H (qk + v) for `mla`, plus for each gated DeltaNet block
//!   `Hv (4 C dk + C (dk + dv) + 2 C dv + 6 dk dv)` (chunk scores, system, solves,
//!   intra-chunk product, state read and update: linear in seq_len); training 3x forward (Kaplan et al. 2020, "Scaling Laws for
//!   Neural Language Models", §2.1).
//! - ranks per token: the most EP ranks one token's rows reach, `min(k, P)`, or with group
//!   limiting the ranks its `group_topk` groups can span.

use crate::cli::InspectArgs;
use crate::config_load;
use crate::exit_code::BadInput;
use moe_model::config::{AttentionKind, ModelConfig, MoeConfig};
use moe_model::count::{count_params, ParamCount, Sharding};
use moe_trainer::config::ExperimentConfig;
use moe_trainer::inference::compute_kind;
use serde_json::json;
use std::io::Write;

/// Bytes per parameter of weights, gradients and AdamW state (all float32).
const WEIGHT_BYTES: u64 = 4;
const GRAD_BYTES: u64 = 4;
const ADAM_BYTES: u64 = 8;

/// Everything `moe inspect` reports.
struct Report {
    count: ParamCount,
    ep_size: u64,
    per_rank_params: u64,
    activation_tokens: u64,
    activation_bytes: u64,
    a2a_bytes: u64,
    max_ranks_per_token: u64,
    flops_forward: u64,
    flops_train: u64,
}

/// Attention's activation elements per token (A), score/value FLOPs per token and context
/// position (S) and context-independent mixer FLOPs per token (F) of block `layer`; see the
/// module docs.
fn attention_terms(m: &ModelConfig, layer: i64) -> (u64, u64, u64) {
    let u = |v: i64| v.max(0) as u64;
    let a = &m.attention;
    let q = u(m.num_heads * m.head_dim());
    let kv = u(m.num_kv_heads * m.head_dim());
    match a.kind {
        AttentionKind::Mha => (4 * q + 2 * kv, 2 * q, 0),
        AttentionKind::Mla => {
            let h = u(m.num_heads);
            let (qk, nope, v) = (u(a.qk_head_dim()), u(a.qk_nope_head_dim), u(a.v_head_dim));
            let (r_q, r_kv) = (a.q_lora_rank.map_or(0, u), u(a.kv_lora_rank));
            (
                r_q + (r_kv + u(a.qk_rope_head_dim)) + r_kv + h * (2 * qk + nope + 2 * v),
                h * (qk + v),
                0,
            )
        }
        // Gated attention: MHA's tensors plus the gate and the gated output.
        AttentionKind::GatedDeltanet if a.is_full_attention(layer) => (6 * q + 2 * kv, 2 * q, 0),
        AttentionKind::GatedDeltanet => {
            let (hv, c) = (u(a.linear_num_value_heads), u(a.linear_chunk_size));
            let (dk, dv) = (u(a.linear_key_head_dim), u(a.linear_value_head_dim));
            let (kd, vd) = (u(a.linear_num_key_heads) * dk, hv * dv);
            // Projections, convolution in and out, repeated q and k, z, beta and g, the rule's
            // output and its gated norm, plus per head the chunk's C x C decay, score and
            // system rows and the u and w rows.
            let act = 2 * (2 * kd + vd) + 2 * hv * dk + 3 * vd + 2 * hv + hv * (3 * c + dk + dv);
            // Per token and head: the chunk's scores and system (2 C dk each), the two
            // triangular solves (C (dk + dv)), the intra-chunk product (2 C dv) and the state
            // read, correction and update (6 dk dv).
            let flops = hv * (4 * c * dk + c * (dk + dv) + 2 * c * dv + 6 * dk * dv);
            (act, 0, flops)
        }
    }
}

/// The most EP ranks (of `p`, each holding `E/p` consecutive experts) one token's rows can
/// reach: `min(k, p)`, and with group limiting (groups of `E/G` consecutive experts) no more
/// than the ranks `group_topk` groups overlap.
fn max_ranks_per_token(moe: &MoeConfig, p: u64) -> u64 {
    let u = |v: i64| v.max(0) as u64;
    let plain = u(moe.top_k).min(p);
    match moe.group_limit() {
        Some((g, gk)) => {
            let (e, g, gk) = (u(moe.num_experts), u(g), u(gk));
            let (per_group, per_rank) = (e / g.max(1), e / p.max(1));
            // Ranks one group of consecutive experts overlaps (an upper bound when neither
            // size divides the other: the group may straddle one more boundary).
            let per_rank = per_rank.max(1);
            let ranks_per_group = if per_rank % per_group.max(1) == 0 {
                1
            } else if per_group % per_rank == 0 {
                per_group / per_rank
            } else {
                per_group.div_ceil(per_rank) + 1
            };
            plain.min(gk * ranks_per_group.min(p))
        }
        None => plain,
    }
}

fn analyse(cfg: &ExperimentConfig, ep_size: i64) -> anyhow::Result<Report> {
    let count = count_params(&cfg.model, &cfg.moe).map_err(|e| BadInput(e.to_string()))?;
    let e = cfg.moe.num_experts;
    if ep_size <= 0 || e % ep_size != 0 {
        return Err(BadInput(format!(
            "--ep-size / parallel.ep_size ({ep_size}) must be positive and divide moe.num_experts ({e})"
        ))
        .into());
    }
    let p = ep_size as u64;
    let (m, moe, t) = (&cfg.model, &cfg.moe, &cfg.trainer);
    let u = |v: i64| v.max(0) as u64;
    let b = compute_kind(&t.precision).elt_size_in_bytes() as u64;
    let (d, l, v) = (u(m.d_model), u(m.num_layers), u(m.vocab_size));
    let mtp = u(m.mtp_depth);
    // Summed over the blocks, the prediction block (block num_layers) included.
    let (mut attn_act, mut attn_seq_flops, mut attn_flops) = (0, 0, 0);
    for layer in 0..m.num_layers + m.mtp_depth.max(0) {
        let (a, s, f) = attention_terms(m, layer);
        attn_act += a;
        attn_seq_flops += s;
        attn_flops += f;
    }
    let (k, h, f) = (u(moe.top_k), u(moe.expert_hidden), u(m.ffn_hidden));
    let s = u(moe.num_shared_experts * moe.shared_hidden());
    let seq = u(cfg.data.seq_len);

    let n = u(t.batch_size) * seq;
    // The multi-token prediction block (if any) is one more block, MoE or dense, with its own
    // logits.
    let mtp_moe = u64::from(
        count
            .get("mtp_routed_experts")
            .is_some_and(|c| c.params > 0),
    );
    let (blocks, moe_blocks) = (l + mtp, count.moe_layers + mtp_moe);
    let dense_blocks = count.dense_layers + mtp - mtp_moe;
    let per_token = blocks * 24 * d
        + b * attn_act
        + dense_blocks * b * 4 * f
        + moe_blocks * (4 * (2 * d + 3 * u(e)) + b * (k * (2 * d + 4 * h) + 4 * s))
        + (1 + mtp) * (8 * v + 12 * d);
    let step_tokens = n * u(t.grad_accum);
    let a2a = step_tokens * k * d * b * 2 * 2 * moe_blocks * (p - 1) / p;
    let norms = count.get("norms").map_or(0, |c| c.params);
    let embedding = count.get("embedding").map_or(0, |c| c.params);
    // The embedding is a lookup, not a matmul; a tied head multiplies by it all the same, and
    // the prediction module multiplies by the (shared) head once more.
    let head = if m.tie_embeddings {
        embedding
    } else {
        count.get("lm_head").map_or(0, |c| c.params)
    };
    let head_tied = if m.tie_embeddings { embedding } else { 0 };
    let matmul_active = count.active() - embedding - norms + head_tied + mtp * head;
    let flops_forward = 2 * matmul_active + seq * attn_seq_flops + attn_flops;
    Ok(Report {
        per_rank_params: count.replicated() + count.expert_per_rank(p),
        count,
        ep_size: p,
        activation_tokens: n,
        activation_bytes: n * per_token,
        a2a_bytes: a2a,
        max_ranks_per_token: max_ranks_per_token(moe, p),
        flops_forward,
        flops_train: 3 * flops_forward,
    })
}

/// Runs `moe inspect`.
pub fn run_inspect(a: &InspectArgs) -> anyhow::Result<()> {
    let loaded = config_load::load(&a.config.config, &a.config.set)?;
    let cfg = &loaded.config;
    let ep_size = a.ep_size.unwrap_or(cfg.parallel.ep_size);
    // The same rules as `moe check` (at the world of `ep_size` ranks): an override `check`
    // rejects (a sequence longer than model.max_seq_len, say) is not inspected either.
    loaded.validate(ep_size.max(1), Vec::new())?;
    let r = analyse(cfg, ep_size)?;
    let text = if a.json {
        serde_json::to_string_pretty(&to_json(cfg, &r))? + "\n"
    } else {
        to_table(cfg, &a.config.config.display().to_string(), &r)
    };
    // `moe inspect .. | head` closes the pipe early: not an error.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn to_json(cfg: &ExperimentConfig, r: &Report) -> serde_json::Value {
    let c = &r.count;
    let breakdown: serde_json::Map<String, serde_json::Value> = c
        .components
        .iter()
        .map(|x| {
            (
                x.name.to_string(),
                json!({
                    "params": x.params,
                    "active_params": x.active,
                    "sharding": match x.sharding {
                        Sharding::Replicated => "replicated",
                        Sharding::Expert => "expert",
                    },
                }),
            )
        })
        .collect();
    let pr = r.per_rank_params;
    json!({
        "name": cfg.run.name,
        "total_params": c.total(),
        "active_params": c.active(),
        "mtp_params": c.mtp(),
        "total_params_without_mtp": c.total_without_mtp(),
        "active_params_without_mtp": c.active_without_mtp(),
        "active_params_without_embeddings": c.active_without_mtp()
            - c.get("embedding").map_or(0, |x| x.active)
            - c.get("lm_head").map_or(0, |x| x.active),
        "breakdown": breakdown,
        "moe_layers": c.moe_layers,
        "dense_layers": c.dense_layers,
        "num_experts": c.num_experts,
        "ep_size": r.ep_size,
        "per_rank": {
            "experts_per_layer": c.num_experts / r.ep_size,
            "replicated_params": c.replicated(),
            "expert_params": c.expert_per_rank(r.ep_size),
            "params": pr,
            "weights_bytes": pr * WEIGHT_BYTES,
            "grads_bytes": pr * GRAD_BYTES,
            "optimizer_bytes": pr * ADAM_BYTES,
            "total_bytes": pr * (WEIGHT_BYTES + GRAD_BYTES + ADAM_BYTES),
        },
        "activations": { "tokens": r.activation_tokens, "bytes": r.activation_bytes },
        "all_to_all_bytes_per_step": r.a2a_bytes,
        "max_ranks_per_token": r.max_ranks_per_token,
        "flops_per_token": { "forward": r.flops_forward, "train": r.flops_train },
    })
}

fn to_table(cfg: &ExperimentConfig, file: &str, r: &Report) -> String {
    let (m, moe, t) = (&cfg.model, &cfg.moe, &cfg.trainer);
    let c = &r.count;
    let mut o = String::new();
    let mut line = |s: String| {
        o.push_str(&s);
        o.push('\n');
    };
    line(format!("model {} ({file})", cfg.run.name));
    let a = &m.attention;
    let heads = match a.kind {
        AttentionKind::Mha => format!(
            "{} heads / {} kv heads of {}",
            m.num_heads,
            m.num_kv_heads,
            m.head_dim()
        ),
        AttentionKind::Mla => format!(
            "MLA {} heads (qk {}+{} rope, v {}, q rank {}, kv rank {})",
            m.num_heads,
            a.qk_nope_head_dim,
            a.qk_rope_head_dim,
            a.v_head_dim,
            a.q_lora_rank.map_or("none".to_string(), |r| r.to_string()),
            a.kv_lora_rank
        ),
        AttentionKind::GatedDeltanet => {
            let full = (0..m.num_layers)
                .filter(|&i| a.is_full_attention(i))
                .count();
            format!(
                "{} gated DeltaNet blocks ({} qk / {} v heads of {} / {}) and {full} gated attention blocks ({} heads / {} kv heads of {}, RoPE on {})",
                m.num_layers as usize - full,
                a.linear_num_key_heads,
                a.linear_num_value_heads,
                a.linear_key_head_dim,
                a.linear_value_head_dim,
                m.num_heads,
                m.num_kv_heads,
                m.head_dim(),
                m.rope_dim()
            )
        }
    };
    line(format!(
        "  d_model {}, {} layers ({} MoE, {} dense), {heads}, vocab {}, {} embeddings",
        m.d_model,
        m.num_layers,
        c.moe_layers,
        c.dense_layers,
        m.vocab_size,
        if m.tie_embeddings { "tied" } else { "untied" }
    ));
    if c.moe_layers > 0 {
        let shared = if moe.num_shared_experts > 0 {
            format!(
                ", {} shared of hidden {}",
                moe.num_shared_experts,
                moe.shared_hidden()
            )
        } else {
            String::new()
        };
        let groups = match moe.group_limit() {
            Some((g, gk)) => format!(" within {gk} of {g} groups"),
            None => String::new(),
        };
        line(format!(
            "  {} routed experts of hidden {} (top-{}{groups}){shared}",
            moe.num_experts, moe.expert_hidden, moe.top_k
        ));
    }
    line(String::new());
    line(format!(
        "  {:<16} {:>18} {:>18}",
        "parameters", "total", "active per token"
    ));
    for x in &c.components {
        line(format!(
            "  {:<16} {:>18} {:>18}",
            x.name,
            grouped(x.params),
            grouped(x.active)
        ));
    }
    line(format!(
        "  {:<16} {:>18} {:>18}",
        "total",
        grouped(c.total()),
        grouped(c.active())
    ));
    line(format!(
        "  {:<16} {:>18} {:>18}",
        "",
        short(c.total()),
        short(c.active())
    ));
    if c.mtp() > 0 {
        line(format!(
            "  {:<16} {:>18} {:>18}",
            "without mtp",
            short(c.total_without_mtp()),
            short(c.active_without_mtp())
        ));
    }
    line(String::new());
    let p = r.ep_size;
    let pr = r.per_rank_params;
    line(format!(
        "per rank at ep_size {p} ({} of {} experts per MoE layer): {} replicated + {} expert = {} parameters",
        c.num_experts / p,
        c.num_experts,
        short(c.replicated()),
        short(c.expert_per_rank(p)),
        short(pr)
    ));
    line(format!(
        "  weights {} + gradients {} + AdamW state {} = {} (float32)",
        bytes(pr * WEIGHT_BYTES),
        bytes(pr * GRAD_BYTES),
        bytes(pr * ADAM_BYTES),
        bytes(pr * (WEIGHT_BYTES + GRAD_BYTES + ADAM_BYTES))
    ));
    let kind = t.precision.name();
    line(format!(
        "  activations (estimate, one micro-batch of {} x {} = {} tokens, {kind} matmuls): {}",
        t.batch_size,
        cfg.data.seq_len,
        r.activation_tokens,
        bytes(r.activation_bytes)
    ));
    line(format!(
        "  all-to-all per step: {} (tokens * top_k * d * bytes * 2 [dispatch+combine] * (P-1)/P * 2 [fwd+bwd] * MoE layers)",
        bytes(r.a2a_bytes)
    ));
    line(format!(
        "  a token's rows reach at most {} of {p} ranks{}",
        r.max_ranks_per_token,
        if moe.group_limit().is_some() {
            " (group-limited routing)"
        } else {
            ""
        }
    ));
    line(format!(
        "FLOPs per token: {:.3e} forward, {:.3e} training (3x forward)",
        r.flops_forward as f64, r.flops_train as f64
    ));
    o
}

/// `46702792704` -> `46,702,792,704`.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `46702792704` -> `46.70B`.
pub(crate) fn short(n: u64) -> String {
    let x = n as f64;
    match n {
        0..1_000 => format!("{n}"),
        1_000..1_000_000 => format!("{:.2}K", x / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2}M", x / 1e6),
        _ => format!("{:.2}B", x / 1e9),
    }
}

/// Binary units: `1536` -> `1.50 KiB`.
fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < units.len() {
        x /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(46_702_792_704), "46,702,792,704");
        assert_eq!(short(12_879_925_248), "12.88B");
        assert_eq!(short(1_500), "1.50K");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.50 KiB");
        assert_eq!(bytes(3 << 30), "3.00 GiB");
    }

    /// All-to-all volume by hand: T = 2*8*1 = 16 tokens, k 2, d 4, fp32, 1 MoE layer, P 2:
    /// 16*2*4*4 * 2 * 2 * 1/2 = 1024 bytes; P 1 sends nothing.
    #[test]
    fn all_to_all_by_hand() {
        let mut cfg = ExperimentConfig::default();
        cfg.model.d_model = 4;
        cfg.model.num_heads = 2;
        cfg.model.num_kv_heads = 1;
        cfg.model.num_layers = 1;
        cfg.model.max_seq_len = 8;
        cfg.data.seq_len = 8;
        cfg.trainer.batch_size = 2;
        cfg.moe.num_experts = 4;
        cfg.moe.top_k = 2;
        assert_eq!(analyse(&cfg, 2).unwrap().a2a_bytes, 1024);
        assert_eq!(analyse(&cfg, 1).unwrap().a2a_bytes, 0);
        assert!(analyse(&cfg, 3).is_err());
    }

    /// Ranks per token by hand: 16 experts, top-4. Plain: min(4, P). 8 groups of 2 on
    /// 8 ranks of 2: each group is one rank, 2 groups -> 2 ranks. 4 groups of 4 on 8 ranks
    /// of 2: a group spans 2 ranks, 1 group -> 2. 8 groups of 2 on 2 ranks of 8: every group
    /// inside one rank, at most min(2 groups, 2 ranks) = 2. 8 groups of 2 on 16 ranks of 1:
    /// 2 groups span 4 ranks.
    #[test]
    fn ranks_per_token_by_hand() {
        let moe = |groups: Option<(i64, i64)>| MoeConfig {
            num_experts: 16,
            top_k: 4,
            num_groups: groups.map(|g| g.0),
            group_topk: groups.map(|g| g.1),
            ..MoeConfig::default()
        };
        assert_eq!(max_ranks_per_token(&moe(None), 8), 4);
        assert_eq!(max_ranks_per_token(&moe(None), 2), 2);
        assert_eq!(max_ranks_per_token(&moe(Some((8, 2))), 8), 2);
        assert_eq!(max_ranks_per_token(&moe(Some((4, 1))), 8), 2);
        assert_eq!(max_ranks_per_token(&moe(Some((8, 2))), 2), 2);
        assert_eq!(max_ranks_per_token(&moe(Some((8, 2))), 16), 4);
    }
}
