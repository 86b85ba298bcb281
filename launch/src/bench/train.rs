//! `moe bench train`: end-to-end training steps of three models built from one config (the
//! quickstart by default): the config itself, a dense model with the same active parameters
//! (`num_experts: 1`, `ffn_hidden = top_k * expert_hidden`) and a larger MoE (2x width, 4x
//! experts, 2x expert width). Steps of the three are interleaved.
//!
//! - tokens/s and MFU: model FLOPs per token (`moe inspect`'s `flops_per_token.train`) times
//!   tokens/s, over the float32 matmul peak measured in the same run (a square `matmul`).
//! - per-phase time: data (the batch read, synchronous here; the trainer prefetches it),
//!   forward+backward, optimizer (clipping, AdamW, zeroing); and, measured standalone on the
//!   same shapes, attention and FFN (MoE or dense) forward+backward times the layer count.
//! - peak RSS of a real `moe train` run (child process, `getrusage`) against `moe inspect`'s
//!   weights+gradients+AdamW+activations estimate, above the peak of the same run at tiny
//!   shapes (libtorch's code pages, pools and the corpus, which no parameter count includes).

use super::eager;
use super::report::{Report, Table};
use super::{children_max_rss_mib, median, proc_status_mib};
use crate::cli::BenchArgs;
use crate::config_load;
use crate::threads::set_threads;
use anyhow::{anyhow, bail, Context};
use moe_comm::ProcessGroups;
use moe_model::config::AttentionKind;
use moe_model::mixer::TokenMixer;
use moe_model::moe_layer::{MoeForward, MoeLayer};
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::{mlp::SwiGlu, rope::Rope};
use moe_model::{ExpertParallel, ParamBuilder};
use moe_trainer::config::ExperimentConfig;
use moe_trainer::data::{load_dataset, Dataset, SamplerSpec, Split};
use moe_trainer::grad_sync::{clip_coef, global_grad_norm};
use moe_trainer::loss::train_loss;
use moe_trainer::optim::{release_grads, AdamW};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// What `moe inspect --json` says about one model.
struct Inspect {
    active_params: f64,
    total_params: f64,
    flops_train: f64,
    state_bytes: f64,
    activation_bytes: f64,
}

fn inspect(config: &Path, sets: &[String]) -> anyhow::Result<Inspect> {
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["inspect", "--json", "--config"]).arg(config);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().context("running moe inspect")?;
    if !out.status.success() {
        bail!(
            "moe inspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let num = |ptr: &str| {
        v.pointer(ptr)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| anyhow!("moe inspect --json has no {ptr}"))
    };
    Ok(Inspect {
        active_params: num("/active_params")?,
        total_params: num("/total_params")?,
        flops_train: num("/flops_per_token/train")?,
        state_bytes: num("/per_rank/total_bytes")?,
        activation_bytes: num("/activations/bytes")?,
    })
}

/// One model under test.
struct Model {
    name: String,
    sets: Vec<String>,
    cfg: ExperimentConfig,
    info: Inspect,
    lm: TransformerLm,
    opt: AdamW,
    data: Arc<Dataset>,
    samples: [Vec<f64>; 3],
    /// Heap bytes in use after the forward minus before, per step: what autograd keeps.
    saved_bytes: Vec<f64>,
}

impl Model {
    fn new(name: &str, config: &Path, sets: Vec<String>) -> anyhow::Result<Self> {
        let loaded = config_load::load(config, &sets)?;
        loaded
            .validate(1, Vec::new())
            .with_context(|| format!("bench model {name}"))?;
        let cfg = loaded.config;
        let info = inspect(config, &sets)?;
        let lm = TransformerLm::new(
            &cfg.model,
            &cfg.moe,
            &ExpertParallel::single(),
            cfg.run.seed,
            Device::Cpu,
        )?;
        let opt = AdamW::new(&lm.params(), &cfg.trainer)?;
        let data = load_dataset(&cfg.data, cfg.model.vocab_size)?;
        Ok(Self {
            name: name.into(),
            sets,
            cfg,
            info,
            lm,
            opt,
            data,
            samples: Default::default(),
            saved_bytes: Vec::new(),
        })
    }

    fn tokens_per_step(&self) -> i64 {
        self.cfg.trainer.batch_size * self.cfg.data.seq_len
    }

    /// The batch of step `step` (the sampler the trainer uses, one rank, no accumulation).
    fn batch(&self, step: u64) -> anyhow::Result<moe_trainer::data::Batch> {
        let t = &self.cfg.trainer;
        let spec = SamplerSpec {
            seed: self.cfg.run.seed,
            seq_len: self.cfg.data.seq_len,
            batch_size: t.batch_size,
            world_size: 1,
            rank: 0,
            grad_accum: 1,
        };
        Ok(self.data.batch(Split::Train, step, &spec, 0)?)
    }

    /// One optimizer step; returns seconds of (data, forward+backward, optimizer) and the
    /// loss (a detached scalar, read after the timings).
    fn step(&mut self, step: u64) -> anyhow::Result<([f64; 3], Tensor)> {
        let t0 = Instant::now();
        let batch = self.batch(step)?;
        let t1 = Instant::now();
        let t = &self.cfg.trainer;
        let ctx = LmForward {
            train: true,
            compute_kind: Kind::Float,
            step,
        };
        let heap_before = heap_in_use();
        let out = self.lm.forward(&batch.inputs_bt, &ctx)?;
        let (loss, _) = train_loss(&out, &batch.targets_bt, t.mtp_loss_weight)?;
        self.saved_bytes.push(heap_in_use() - heap_before);
        loss.f_backward()?;
        let t2 = Instant::now();
        // The trainer's update (train_loop/step.rs): the norm, clipping inside the fused
        // AdamW, gradients dropped.
        let params = self.lm.params();
        let norm = global_grad_norm(&params, &ProcessGroups::single(tch::Device::Cpu))?;
        self.opt
            .step_clipped(&params, t.lr, clip_coef(norm, t.grad_clip))?;
        release_grads(&params)?;
        let t3 = Instant::now();
        Ok((
            [
                (t1 - t0).as_secs_f64(),
                (t2 - t1).as_secs_f64(),
                (t3 - t2).as_secs_f64(),
            ],
            loss.f_detach()?,
        ))
    }

    /// The AdamW update alone on this model's parameters (their current gradients), fused
    /// kernel and per-tensor reference interleaved: `(fused s, reference s)` medians.
    fn optimizer_compare(&mut self, reps: u64) -> anyhow::Result<(f64, f64)> {
        // `step` dropped its gradients: one more forward and backward makes fresh ones.
        let batch = self.batch(0)?;
        let ctx = LmForward {
            train: true,
            compute_kind: Kind::Float,
            step: 0,
        };
        let out = self.lm.forward(&batch.inputs_bt, &ctx)?;
        train_loss(&out, &batch.targets_bt, self.cfg.trainer.mtp_loss_weight)?
            .0
            .f_backward()?;
        let params = self.lm.params();
        let lr = self.cfg.trainer.lr;
        let (mut fused, mut reference) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            let t0 = Instant::now();
            self.opt.step(&params, lr)?;
            let t1 = Instant::now();
            self.opt.step_reference(&params, lr)?;
            let t2 = Instant::now();
            fused.push((t1 - t0).as_secs_f64());
            reference.push((t2 - t1).as_secs_f64());
        }
        Ok((median(&fused), median(&reference)))
    }

    /// Standalone forward+backward of one attention block of each kind the model uses (MHA,
    /// MLA, gated DeltaNet, gated attention) and one FFN (MoE or dense) on this model's
    /// shapes, times the number of such layers: `(attention s, ffn s)`.
    fn components(&self, reps: u64) -> anyhow::Result<(f64, f64)> {
        let (m, moe) = (&self.cfg.model, &self.cfg.moe);
        let (b, t, d) = (
            self.cfg.trainer.batch_size,
            self.cfg.data.seq_len,
            m.d_model,
        );
        let rope = Rope::new(m.rope_dim(), m.max_seq_len, m.rope_theta, Device::Cpu)?;
        // One mixer per kind: under gated_deltanet, block 0 (DeltaNet) and the first
        // full-attention block; each weighted by its number of blocks.
        let mut mixers: Vec<(TokenMixer, f64)> = Vec::new();
        let full = (0..m.num_layers)
            .filter(|&i| {
                m.attention.kind == AttentionKind::GatedDeltanet && m.attention.is_full_attention(i)
            })
            .count() as f64;
        let first_full = (0..m.num_layers).find(|&i| m.attention.is_full_attention(i));
        match (m.attention.kind, first_full) {
            (AttentionKind::GatedDeltanet, Some(i)) => {
                mixers.push((
                    TokenMixer::new(m, i, &ParamBuilder::new(1, Device::Cpu).pp("bench.attn"))?,
                    full,
                ));
                if m.num_layers as f64 > full {
                    let j = (0..m.num_layers)
                        .find(|&j| !m.attention.is_full_attention(j))
                        .unwrap_or(0);
                    mixers.push((
                        TokenMixer::new(m, j, &ParamBuilder::new(1, Device::Cpu).pp("bench.attn"))?,
                        m.num_layers as f64 - full,
                    ));
                }
            }
            _ => mixers.push((
                TokenMixer::new(m, 0, &ParamBuilder::new(1, Device::Cpu).pp("bench.attn"))?,
                m.num_layers as f64,
            )),
        }
        let moe_layers = (0..m.num_layers).filter(|&i| moe.is_moe_layer(i)).count() as f64;
        let moe_layer = if moe_layers > 0.0 {
            Some(MoeLayer::new(
                m,
                moe,
                &ParamBuilder::new(1, Device::Cpu).pp("bench.moe"),
                &ExpertParallel::single(),
            )?)
        } else {
            None
        };
        let dense = SwiGlu::new(
            &ParamBuilder::new(1, Device::Cpu).pp("bench.ffn"),
            d,
            m.ffn_hidden,
            m.init_std,
            m.num_layers,
        )?;
        let dense_layers = m.num_layers as f64 - moe_layers;
        let x =
            Tensor::f_randn([b, t, d], (Kind::Float, Device::Cpu))?.f_set_requires_grad(true)?;
        let (mut sf, mut sd) = (Vec::new(), Vec::new());
        let mut sa: Vec<Vec<f64>> = vec![Vec::new(); mixers.len()];
        for _ in 0..reps + 1 {
            for ((mixer, _), times) in mixers.iter().zip(sa.iter_mut()) {
                let s = Instant::now();
                mixer
                    .forward(&x, &rope, Kind::Float)?
                    .f_sum(Kind::Float)?
                    .f_backward()?;
                times.push(s.elapsed().as_secs_f64());
            }
            if let Some(layer) = &moe_layer {
                let s = Instant::now();
                let ctx = MoeForward {
                    train: true,
                    seq_len: t,
                    jitter_seed: 0,
                    compute_kind: x.kind(),
                };
                let (y, st) = layer.forward(&x.f_view([b * t, d])?, &ctx)?;
                y.f_sum(Kind::Float)?
                    .f_add(&st.aux_loss)?
                    .f_add(&st.z_loss)?
                    .f_backward()?;
                sf.push(s.elapsed().as_secs_f64());
            }
            if dense_layers > 0.0 {
                let s = Instant::now();
                dense.forward(&x)?.f_sum(Kind::Float)?.f_backward()?;
                sd.push(s.elapsed().as_secs_f64());
            }
        }
        let med = |v: &[f64]| if v.len() > 1 { median(&v[1..]) } else { 0.0 };
        Ok((
            mixers
                .iter()
                .zip(&sa)
                .map(|((_, count), times)| med(times) * count)
                .sum(),
            med(&sf) * moe_layers + med(&sd) * dense_layers,
        ))
    }
}

/// Bytes the process's malloc has handed out and not taken back (glibc `mallinfo2`, summed
/// over every arena, plus mapped blocks). The bench runs its steps on this thread and nothing
/// else allocates meanwhile, so the difference across a forward is what the forward kept.
fn heap_in_use() -> f64 {
    // SAFETY: mallinfo2 only reads the allocator's statistics.
    let info = unsafe { libc::mallinfo2() };
    (info.uordblks + info.hblkhd) as f64
}

/// Median float32 matmul throughput (FLOP/s) of an n x n x n product at the current threads.
fn matmul_peak(n: i64, reps: usize) -> anyhow::Result<f64> {
    let a = Tensor::f_randn([n, n], (Kind::Float, Device::Cpu))?;
    let b = Tensor::f_randn([n, n], (Kind::Float, Device::Cpu))?;
    let mut s = Vec::new();
    for i in 0..reps + 1 {
        let t = Instant::now();
        let _ = a.f_matmul(&b)?;
        if i > 0 {
            s.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (n * n * n) as f64 / median(&s))
}

/// Peak RSS (MiB) of `moe train` on the base config for `steps` steps, in a child process,
/// and its last reported tokens/s.
fn train_child_rss(
    config: &Path,
    sets: &[String],
    steps: u64,
    threads: i32,
) -> anyhow::Result<(f64, Option<f64>)> {
    let out_dir: PathBuf =
        std::env::temp_dir().join(format!("moe-bench-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    // The child's own `main` sets train's heap policy (crate::heap).
    cmd.args(["train", "--config"]).arg(config);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let extra = [
        format!("run.out_dir={}", out_dir.display()),
        format!("trainer.max_steps={steps}"),
        format!("trainer.warmup_steps={}", steps / 2),
        format!("trainer.threads={threads}"),
        "trainer.eval_every=0".into(),
        "checkpoint.every=0".into(),
        format!("trainer.log_every={}", steps.max(1)),
    ];
    for s in &extra {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().context("running moe train")?;
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&out_dir);
    if !out.status.success() {
        bail!("moe train failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let tok_s = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["kind"] == "train")
        .filter_map(|v| v["tokens_per_s"].as_f64())
        .next_back();
    Ok((
        children_max_rss_mib().ok_or_else(|| anyhow!("getrusage failed"))?,
        tok_s,
    ))
}

/// Runs `moe bench train`.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let config = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from("configs/quickstart.yaml"));
    set_threads(1, 1);
    // One process, one rank, whatever the config's parallel section says (configs/debug.yaml
    // simulates 2 ranks); the user's --set still wins. Labels name the config.
    let sets: Vec<String> = ["parallel.ep_size=1", "parallel.backend=local"]
        .iter()
        .map(|s| s.to_string())
        .chain(args.set.iter().cloned())
        .collect();
    let label = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".into());
    // An idle `moe` process: libtorch loaded, a few ops run, no model yet.
    let _ = Tensor::f_ones([8, 8], (Kind::Float, Device::Cpu))?
        .f_matmul(&Tensor::f_ones([8, 8], (Kind::Float, Device::Cpu))?)?;
    let idle_rss = proc_status_mib("VmRSS").unwrap_or(f64::NAN);
    let mut report = Report::new("moe bench train: end-to-end training steps (CPU, float32)");
    let base = config_load::load(&config, &sets)?.config;
    let (m, moe) = (&base.model, &base.moe);
    // One process holds every expert: a config written for several ranks (ep_size > 1) is
    // benchmarked at ep_size 1.
    let with = |extra: &[String]| -> Vec<String> {
        sets.iter().cloned().chain(extra.iter().cloned()).collect()
    };

    // Peak RSS first: getrusage reports the largest child so far.
    let steps = args.warmup + args.iters;
    let threads_max = args.threads.iter().copied().max().unwrap_or(1);
    // The baseline first (the smaller child): the same training run at tiny shapes, whose
    // tensors are negligible; what it holds is the process's fixed cost (libtorch's code
    // pages of every kernel a step runs, thread pools, the corpus, the writers).
    let rss = if args.no_rss {
        None
    } else {
        let tiny = with(&[
            "model.d_model=16".into(),
            "model.num_layers=1".into(),
            "model.num_heads=2".into(),
            "model.num_kv_heads=1".into(),
            "model.ffn_hidden=16".into(),
            "moe.expert_hidden=8".into(),
            "trainer.batch_size=1".into(),
            "data.seq_len=8".into(),
        ]);
        // Some configs have no valid tiny twin (e.g. MLA's latent widths): then the idle
        // process is the baseline, and the report says why.
        let tiny_peak = train_child_rss(&config, &tiny, steps.max(2), threads_max)
            .map(|(peak, _)| peak)
            .map_err(|e| {
                let first = format!("{e:#}");
                first.lines().next().unwrap_or("").to_string()
            });
        let (peak, tok_s) = train_child_rss(&config, &with(&[]), steps.max(2), threads_max)?;
        Some((tiny_peak, peak, tok_s))
    };

    let dense_sets = with(&[
        "moe.num_experts=1".into(),
        "moe.top_k=1".into(),
        "moe.num_shared_experts=0".into(),
        "moe.shared_expert_gate=false".into(),
        "moe.num_groups=null".into(),
        "moe.group_topk=null".into(),
        format!("model.ffn_hidden={}", moe.top_k * moe.expert_hidden),
    ]);
    let mut models = vec![
        Model::new(&format!("{label} MoE"), &config, with(&[]))?,
        Model::new("dense, same active params", &config, dense_sets.clone())?,
        Model::new(
            "larger MoE",
            &config,
            with(&[
                format!("model.d_model={}", 2 * m.d_model),
                format!("model.num_heads={}", 2 * m.num_heads),
                format!("model.num_kv_heads={}", 2 * m.num_kv_heads),
                format!("moe.num_experts={}", 4 * moe.num_experts),
                format!("moe.expert_hidden={}", 2 * moe.expert_hidden),
            ]),
        )?,
    ];

    let mut table = Table::new(
        "Training throughput (median per step; MFU against the matmul peak of the same run)",
        &[
            "model",
            "params (active)",
            "threads",
            "tokens/s",
            "step ms",
            "MFU",
            "data ms",
            "fwd+bwd ms",
            "optimizer ms",
            "attention ms",
            "FFN/MoE ms",
            "other fwd+bwd ms",
        ],
    );
    let mut optim = Table::new(
        "Optimizer: torch's fused AdamW kernel vs the per-tensor loop (median AdamW update, interleaved)",
        &[
            "model",
            "threads",
            "fused ms",
            "per-tensor ms",
            "fused / per-tensor",
            "optimizer share of step",
            "target",
        ],
    );
    let mut notes = Vec::new();
    for &threads in &args.threads {
        set_threads(threads.into(), 1);
        let peak = matmul_peak(1024, 5)?;
        for mdl in models.iter_mut() {
            mdl.samples = Default::default();
        }
        for step in 0..steps {
            for mdl in models.iter_mut() {
                let (s, _) = mdl.step(step)?;
                if step >= args.warmup {
                    for (i, x) in s.iter().enumerate() {
                        mdl.samples[i].push(*x);
                    }
                }
            }
        }
        let mut tok_s = Vec::new();
        for mdl in &mut models {
            let [data, fb, opt] = mdl.samples.clone().map(|v| median(&v));
            let step_s = data + fb + opt;
            let tps = mdl.tokens_per_step() as f64 / step_s;
            tok_s.push(tps);
            let (attn, ffn) = mdl.components(args.iters.clamp(1, 10))?;
            let (fused, per_tensor) = mdl.optimizer_compare(args.iters.clamp(1, 10))?;
            let share = opt / step_s;
            optim.row(vec![
                mdl.name.clone(),
                threads.to_string(),
                format!("{:.1}", fused * 1e3),
                format!("{:.1}", per_tensor * 1e3),
                format!("{:.2}", fused / per_tensor),
                format!("{:.1}%", 100.0 * share),
                format!("<= 12% {}", if share <= 0.12 { "met" } else { "MISSED" }),
            ]);
            table.row(vec![
                mdl.name.clone(),
                format!(
                    "{:.2}M ({:.2}M)",
                    mdl.info.total_params / 1e6,
                    mdl.info.active_params / 1e6
                ),
                threads.to_string(),
                format!("{tps:.0}"),
                format!("{:.0}", step_s * 1e3),
                format!("{:.1}%", 100.0 * tps * mdl.info.flops_train / peak),
                format!("{:.1}", data * 1e3),
                format!("{:.0}", fb * 1e3),
                format!("{:.1}", opt * 1e3),
                format!("{:.0}", attn * 1e3),
                format!("{:.0}", ffn * 1e3),
                format!("{:.0}", (fb - attn - ffn) * 1e3),
            ]);
        }
        let ratio = tok_s[0] / tok_s[1];
        notes.push(format!(
            "threads {threads}: matmul peak {:.1} GFLOP/s (1024^3 float32); MoE {label} / dense tokens/s = {ratio:.2} \
             (target >= 0.7: {})",
            peak / 1e9,
            if ratio >= 0.7 { "met" } else { "MISSED" }
        ));
    }
    report.tables.push(table);
    report.tables.push(optim);
    let mut saved = Table::new(
        "Activations autograd keeps: measured against `moe inspect`'s estimate (one micro-batch)",
        &[
            "model",
            "tokens",
            "measured MiB",
            "estimate MiB",
            "estimate / measured",
        ],
    );
    for mdl in &models {
        let measured = median(&mdl.saved_bytes) / (1 << 20) as f64;
        let estimate = mdl.info.activation_bytes / (1 << 20) as f64;
        saved.row(vec![
            mdl.name.clone(),
            mdl.tokens_per_step().to_string(),
            format!("{measured:.1}"),
            format!("{estimate:.1}"),
            format!("{:.2}", estimate / measured),
        ]);
    }
    report.tables.push(saved);
    notes.push(
        "measured activations = malloc heap in use after the forward and loss minus before (glibc mallinfo2), \
         median over all steps and thread counts"
            .into(),
    );
    if !args.no_eager {
        let (t, n) = eager_table(args, &config, &dense_sets)?;
        report.tables.push(t);
        notes.push(n);
    }

    if let Some((tiny, peak_rss, child_tok_s)) = rss {
        let tiny_rss = match tiny {
            Ok(peak) => Some(peak),
            Err(why) => {
                notes.push(format!(
                    "the tiny-shape training run failed ({why}); the idle process is the RSS baseline"
                ));
                None
            }
        };
        let q = &models[0].info;
        let estimate = (q.state_bytes + q.activation_bytes) / (1 << 20) as f64;
        let mut t = Table::new(
            "Peak RSS of `moe train` on the config (child process, getrusage)",
            &[
                "steps",
                "threads",
                "peak RSS MiB",
                "idle moe RSS MiB",
                "tiny-model train RSS MiB",
                "peak - tiny",
                "estimate MiB",
                "(peak - tiny, else idle) / estimate",
                "target",
                "(peak - idle) / estimate",
                "moe train tokens/s",
            ],
        );
        let base = tiny_rss.unwrap_or(idle_rss);
        let r = (peak_rss - base) / estimate;
        let tiny_cell = |x: Option<f64>| x.map_or_else(|| "-".into(), |v| format!("{v:.0}"));
        t.row(vec![
            steps.max(2).to_string(),
            threads_max.to_string(),
            format!("{peak_rss:.0}"),
            format!("{idle_rss:.0}"),
            tiny_cell(tiny_rss),
            tiny_cell(tiny_rss.map(|t| peak_rss - t)),
            format!("{estimate:.1}"),
            format!("{r:.2}"),
            format!("<= 1.5 {}", if r <= 1.5 { "met" } else { "MISSED" }),
            format!("{:.2}", (peak_rss - idle_rss) / estimate),
            child_tok_s
                .map(|x| format!("{x:.0}"))
                .unwrap_or_else(|| "-".into()),
        ]);
        report.tables.push(t);
        notes.push(
            "estimate = `moe inspect --json`: per_rank.total_bytes (weights + grads + AdamW, 16 B/param) + activations.bytes; \
             idle moe RSS = this bench process after loading libtorch and one tiny matmul; tiny-model train RSS = \
             the same `moe train` child at d_model 16, 1 layer, batch 1 x 8 tokens (the fixed cost of a training \
             process: the code pages of every kernel a step runs, thread pools, the corpus), run first"
                .into(),
        );
    }
    notes.push(format!(
        "medians of {} steps after {} warmup, models interleaved step by step; data = synchronous batch read \
         (the trainer prefetches on a thread); attention and FFN/MoE measured standalone (forward+backward of one \
         layer on the model's [B*T, d], times the layer count); other = fwd+bwd - attention - FFN (embedding, norms, \
         LM head, loss); MFU = tokens/s x moe inspect's flops_per_token.train / matmul peak",
        args.iters, args.warmup
    ));
    for mdl in &models {
        notes.push(format!(
            "{}: --set {}",
            mdl.name,
            if mdl.sets.is_empty() {
                "(none)".into()
            } else {
                mdl.sets.join(" --set ")
            }
        ));
    }
    report.notes.extend(notes);
    Ok(report)
}

/// The dense model against its PyTorch eager twin (`scripts/eager_dense.py`) at each thread
/// count, two rounds: a fresh model (the same initial weights every time, from the config's
/// seed) trains `warmup + iters` steps in this process, then the script trains the same steps
/// from the same weights on the same batches; step = forward+backward + clipping and AdamW
/// (the batch read is not counted on either side). Returns the table and a note.
fn eager_table(
    args: &BenchArgs,
    config: &Path,
    dense_sets: &[String],
) -> anyhow::Result<(Table, String)> {
    let mut table = Table::new(
        "Dense model: moe vs the same stack in PyTorch eager (median per step, same weights and batches)",
        &[
            "threads",
            "moe step ms",
            "moe fwd+bwd ms",
            "moe optimizer ms",
            "eager step ms",
            "eager fwd+bwd ms",
            "eager optimizer ms",
            "moe / eager",
            "target",
            "max loss rel diff",
        ],
    );
    let (Some(python), Some(script)) = (eager::python(), eager::script()) else {
        return Ok((
            table,
            format!(
                "eager: not run, no .venv/bin/python (run `make setup`, or set MOE_PYTHON to a \
                 Python with torch and safetensors) for {}",
                eager::SCRIPT
            ),
        ));
    };
    let steps = args.warmup + args.iters;
    let dir = std::env::temp_dir().join(format!("moe-bench-eager-{}", std::process::id()));
    let mut versions = String::new();
    let result = (|| -> anyhow::Result<()> {
        for &threads in &args.threads {
            set_threads(threads.into(), 1);
            // Two rounds of (moe, eager), samples pooled: a drift of the machine's speed
            // during the run then hits both sides alike.
            let (mut fb, mut opt, mut efb, mut eopt) = (vec![], vec![], vec![], vec![]);
            let mut rel: f64 = 0.0;
            for _round in 0..2 {
                let mut mdl = Model::new("dense", config, dense_sets.to_vec())?;
                if !dir.join("dims.json").exists() {
                    let params: Vec<(String, Tensor, bool)> = mdl
                        .lm
                        .params()
                        .into_iter()
                        .map(|p| Ok((p.name, p.tensor.f_detach_copy()?, p.weight_decay)))
                        .collect::<Result<_, tch::TchError>>()?;
                    let batches = (0..steps)
                        .map(|s| mdl.batch(s))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let inputs: Vec<Tensor> = batches
                        .iter()
                        .map(|b| b.inputs_bt.shallow_clone())
                        .collect();
                    let targets: Vec<Tensor> = batches
                        .iter()
                        .map(|b| b.targets_bt.shallow_clone())
                        .collect();
                    eager::write_state(&dir, &mdl.cfg, &params, &inputs, &targets)?;
                }
                let mut losses = Vec::new();
                for s in 0..steps {
                    let ([_, f, o], loss) = mdl.step(s)?;
                    losses.push(loss);
                    if s >= args.warmup {
                        fb.push(f);
                        opt.push(o);
                    }
                }
                let run = eager::run(&python, &script, &dir, threads, args.warmup, args.iters)?;
                versions = format!("torch {}, AdamW {}", run.torch, run.adamw);
                efb.extend(run.forward_backward_s);
                eopt.extend(run.optimizer_s);
                for (ours, theirs) in losses.iter().zip(&run.losses) {
                    // host: read after the timed steps.
                    let ours = ours.f_double_value(&[])?;
                    rel = rel.max((ours - theirs).abs() / theirs.abs().max(1e-12));
                }
            }
            let step = |f: &[f64], o: &[f64]| {
                median(&f.iter().zip(o).map(|(a, b)| a + b).collect::<Vec<_>>())
            };
            let (moe_step, eager_step) = (step(&fb, &opt), step(&efb, &eopt));
            let (fb, opt, efb, eopt) = (median(&fb), median(&opt), median(&efb), median(&eopt));
            let ratio = moe_step / eager_step;
            table.row(vec![
                threads.to_string(),
                format!("{:.1}", moe_step * 1e3),
                format!("{:.1}", fb * 1e3),
                format!("{:.1}", opt * 1e3),
                format!("{:.1}", eager_step * 1e3),
                format!("{:.1}", efb * 1e3),
                format!("{:.1}", eopt * 1e3),
                format!("{ratio:.2}"),
                format!("<= 1.0 {}", if ratio <= 1.0 { "met" } else { "MISSED" }),
                format!("{rel:.1e}"),
            ]);
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok((
        table,
        format!(
            "eager: {} ({versions}); at each thread count two rounds of moe's steps then the script's, \
             samples pooled; losses of all {steps} steps of both rounds compared (float32, different op order: ~1e-6 relative expected)",
            eager::SCRIPT
        ),
    ))
}
