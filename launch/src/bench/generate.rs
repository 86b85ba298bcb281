//! `moe bench generate`: greedy generation from one model (the config's shapes, its seeded
//! initial weights, dropless routing), with the KV cache and by recomputing the context for
//! every token, at 100, 200 and 400 new tokens. Runs of the two modes and three lengths are
//! interleaved iteration by iteration, so a loaded machine slows all of them alike. Each run
//! also checks that both modes produced the same tokens.

use super::median;
use super::report::{Report, Table};
use crate::cli::BenchArgs;
use crate::config_load;
use crate::threads::set_threads;
use anyhow::{anyhow, bail};
use moe_model::transformer::TransformerLm;
use moe_model::ExpertParallel;
use moe_trainer::decode::Decoder;
use moe_trainer::inference::{compute_kind, EvalModel, Sampler};
use std::path::PathBuf;
use std::time::Instant;
use tch::Device;

/// New tokens per run.
const LENGTHS: [usize; 3] = [100, 200, 400];

/// Generates `n` tokens after `prompt` greedily; returns them and the seconds taken.
fn generate(
    m: &EvalModel,
    cached: bool,
    prompt: &[i64],
    n: usize,
) -> anyhow::Result<(Vec<i64>, f64)> {
    let mut sampler = Sampler::new(0.0, None, 0).map_err(|e| anyhow!("{e}"))?;
    let mut decoder = Decoder::new(m, cached);
    let mut tokens = prompt.to_vec();
    let start = Instant::now();
    for _ in 0..n {
        let logits = decoder.next_logits(&tokens).map_err(|e| anyhow!("{e}"))?;
        tokens.push(sampler.sample(&logits).map_err(|e| anyhow!("{e}"))?);
    }
    Ok((
        tokens.split_off(prompt.len()),
        start.elapsed().as_secs_f64(),
    ))
}

/// Runs the bench.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("configs/quickstart.yaml"));
    let mut sets = vec![
        "parallel.ep_size=1".to_string(),
        "parallel.backend=local".to_string(),
    ];
    sets.extend(args.set.iter().cloned());
    let mut cfg = config_load::load(&config, &sets)?.config;
    cfg.moe.capacity_factor = None;
    cfg.moe.pad_to_capacity = false;
    let threads = args.threads.first().copied().unwrap_or(1);
    set_threads(threads.into(), 1);
    let model = TransformerLm::new(
        &cfg.model,
        &cfg.moe,
        &ExpertParallel::single(),
        cfg.run.seed,
        Device::Cpu,
    )?;
    let m = EvalModel {
        model: &model,
        device: Device::Cpu,
        compute_kind: compute_kind(&cfg.trainer.precision),
    };
    if !model.supports_kv_cache() {
        bail!("this config's attention kind has no KV cache: nothing to compare");
    }
    let prompt: Vec<i64> = "The quick brown fox ".bytes().map(i64::from).collect();
    // secs[mode][length]
    let mut secs = vec![vec![Vec::new(); LENGTHS.len()]; 2];
    for it in 0..args.warmup + args.iters {
        for (li, &n) in LENGTHS.iter().enumerate() {
            let (cached_toks, c) = generate(&m, true, &prompt, n)?;
            let (plain_toks, u) = generate(&m, false, &prompt, n)?;
            if cached_toks != plain_toks {
                bail!("cached and uncached generation differ at {n} tokens");
            }
            if it >= args.warmup {
                secs[0][li].push(c);
                secs[1][li].push(u);
            }
        }
    }
    let med: Vec<Vec<f64>> = secs
        .iter()
        .map(|mode| mode.iter().map(|s| median(s)).collect())
        .collect();
    let mut report = Report::new(&format!(
        "moe bench generate: greedy generation with and without the KV cache (CPU, {threads} thread(s))"
    ));
    let label = config.display().to_string();
    let mut t = Table::new(
        &format!(
            "{label}, random initial weights, max_seq_len {}, prompt of {} bytes; median of {} runs",
            cfg.model.max_seq_len,
            prompt.len(),
            args.iters
        ),
        &[
            "mode",
            "100 tokens (s)",
            "200 tokens (s)",
            "400 tokens (s)",
            "tokens/s at 200",
            "time(400)/time(100)",
        ],
    );
    for (mi, name) in ["KV cache", "recompute"].into_iter().enumerate() {
        let s = &med[mi];
        t.row(vec![
            name.into(),
            format!("{:.3}", s[0]),
            format!("{:.3}", s[1]),
            format!("{:.3}", s[2]),
            format!("{:.1}", 200.0 / s[1]),
            format!("{:.2}", s[2] / s[0]),
        ]);
    }
    report.tables.push(t);
    report.notes.push(format!(
        "KV cache speed-up at 200 tokens: {:.1}x (target >= 5x); time(400)/time(100) with the \
         cache: {:.2} (target <= 5); both modes gave the same tokens in every run",
        med[1][1] / med[0][1],
        med[0][2] / med[0][0]
    ));
    Ok(report)
}
