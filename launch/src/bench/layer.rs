//! `moe bench layer`: one MoE layer, forward + backward, against a dense bound and a
//! textbook loop, with the time split into routing, permute, experts and combine, and each
//! variant's peak memory measured in a child process of its own.
//!
//! Variants (all float32 on CPU, the same N tokens, the same upstream gradient):
//! - `dense`: the machine's GEMM limit for this layer: one SwiGLU FFN of width h over N*k
//!   rows (exactly the routed experts' FLOPs), no routing.
//! - `textbook`: the loop of HF Mixtral's `MixtralSparseMoeBlock`: softmax top-k, then for
//!   each expert mask, gather, compute with that expert's own weight tensors, scatter-add.
//! - `sequential` / `grouped`: the project's `MoeLayer` (router with aux and z losses,
//!   the local dispatcher, experts as a matmul loop or `_grouped_mm`).

use super::report::{Report, Table};
use super::{median, proc_status_mib};
use crate::cli::BenchArgs;
use crate::threads::set_threads;
use anyhow::{anyhow, bail, Context};
use moe_comm::autograd::backward_with;
use moe_model::config::{ExpertImpl, ModelConfig, MoeConfig};
use moe_model::moe_layer::{MoeForward, MoeLayer};
use moe_model::router::{self, RouterInput, TopK};
use moe_model::{init, Result};
use moe_model::{ExpertParallel, ParamBuilder};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// One layer shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub e: i64,
    pub k: i64,
    pub d: i64,
    pub h: i64,
    pub n: i64,
}

/// What one timed iteration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Dense,
    Textbook,
    Sequential,
    Grouped,
}

const VARIANTS: [Variant; 4] = [
    Variant::Dense,
    Variant::Textbook,
    Variant::Sequential,
    Variant::Grouped,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Dense => "dense",
            Variant::Textbook => "textbook",
            Variant::Sequential => "sequential",
            Variant::Grouped => "grouped",
        }
    }

    fn parse(s: &str) -> anyhow::Result<Self> {
        VARIANTS
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| anyhow!("unknown layer variant {s:?}"))
    }
}

/// The shapes of the command line: E, k, d, h lists zipped (length-1 lists broadcast), each
/// at every N.
pub fn shapes(args: &BenchArgs) -> anyhow::Result<Vec<Shape>> {
    let lists = [
        &args.experts,
        &args.top_k,
        &args.d_model,
        &args.expert_hidden,
    ];
    let len = lists.iter().map(|l| l.len()).max().unwrap_or(0);
    if lists.iter().any(|l| l.len() != 1 && l.len() != len) || len == 0 {
        bail!(
            "--experts, --top-k, --d-model and --expert-hidden must each have one value or the same \
             number of values (they are zipped into shapes)"
        );
    }
    let at = |l: &Vec<i64>, i: usize| if l.len() == 1 { l[0] } else { l[i] };
    let mut out = Vec::new();
    for i in 0..len {
        for &n in &args.tokens {
            let s = Shape {
                e: at(&args.experts, i),
                k: at(&args.top_k, i),
                d: at(&args.d_model, i),
                h: at(&args.expert_hidden, i),
                n,
            };
            if s.e < 1 || s.k < 1 || s.k > s.e || s.d < 1 || s.h < 1 || s.n < 1 {
                bail!("invalid layer shape {s:?}: need 1 <= k <= E and positive d, h, N");
            }
            out.push(s);
        }
    }
    Ok(out)
}

/// The weights and inputs of every variant of one shape (`None` for variants not built).
struct Setup {
    shape: Shape,
    moe_cfg: MoeConfig,
    x_nd: Tensor,
    dy_nd: Tensor,
    dense: Option<Dense>,
    textbook: Option<Textbook>,
    sequential: Option<MoeLayer>,
    grouped: Option<MoeLayer>,
    /// Where the inputs, weights and timed work live.
    device: Device,
}

struct Dense {
    x_rd: Tensor,
    dy_rd: Tensor,
    w_gate_dh: Tensor,
    w_up_dh: Tensor,
    w_down_hd: Tensor,
}

struct Textbook {
    w_router_de: Tensor,
    /// One `(w_gate [d,h], w_up [d,h], w_down [h,d])` of separate leaf tensors per expert.
    experts: Vec<(Tensor, Tensor, Tensor)>,
}

const STD: f64 = 0.02;

fn leaf(shape: &[i64], std: f64, seed: i64, device: Device) -> Result<Tensor> {
    tch::manual_seed(seed);
    Ok(Tensor::f_randn(shape, (Kind::Float, Device::Cpu))?
        .f_to_device(device)?
        .f_mul_scalar(std)?
        .f_set_requires_grad(true)?)
}

fn swiglu(x: &Tensor, wg: &Tensor, wu: &Tensor, wd: &Tensor) -> Result<Tensor> {
    Ok(x.f_matmul(wg)?
        .f_silu()?
        .f_mul(&x.f_matmul(wu)?)?
        .f_matmul(wd)?)
}

impl Setup {
    fn new(shape: Shape, only: Option<Variant>, device: Device) -> Result<Self> {
        let Shape { e, k, d, h, n } = shape;
        let want = |v: Variant| only.is_none_or(|o| o == v);
        let model = ModelConfig {
            d_model: d,
            num_layers: 1,
            init_std: STD,
            ..ModelConfig::default()
        };
        let moe_cfg = MoeConfig {
            num_experts: e,
            top_k: k,
            expert_hidden: h,
            capacity_factor: None,
            ..MoeConfig::default()
        };
        let layer = |imp: ExpertImpl| -> Result<MoeLayer> {
            let cfg = MoeConfig {
                expert_impl: imp,
                ..moe_cfg.clone()
            };
            let vb = ParamBuilder::new(7, device).pp("bench.moe");
            MoeLayer::new(&model, &cfg, &vb, &ExpertParallel::single())
        };
        let dense = if want(Variant::Dense) {
            Some(Dense {
                x_rd: leaf(&[n * k, d], 1.0, 11, device)?,
                dy_rd: leaf(&[n * k, d], 1.0, 12, device)?.f_detach()?,
                w_gate_dh: leaf(&[d, h], STD, 13, device)?,
                w_up_dh: leaf(&[d, h], STD, 14, device)?,
                w_down_hd: leaf(&[h, d], STD, 15, device)?,
            })
        } else {
            None
        };
        let textbook = if want(Variant::Textbook) {
            let experts = (0..e)
                .map(|i| {
                    Ok((
                        init::normal(7, "bench.tb.w_gate", i, &[d, h], STD, device)?,
                        init::normal(7, "bench.tb.w_up", i, &[d, h], STD, device)?,
                        init::normal(7, "bench.tb.w_down", i, &[h, d], STD, device)?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            Some(Textbook {
                w_router_de: init::normal(7, "bench.tb.w_router", 0, &[d, e], STD, device)?,
                experts,
            })
        } else {
            None
        };
        Ok(Self {
            shape,
            x_nd: leaf(&[n, d], 1.0, 1, device)?,
            dy_nd: leaf(&[n, d], 1.0, 2, device)?.f_detach()?,
            dense,
            textbook,
            sequential: if want(Variant::Sequential) {
                Some(layer(ExpertImpl::Sequential)?)
            } else {
                None
            },
            grouped: if want(Variant::Grouped) {
                Some(layer(ExpertImpl::Grouped)?)
            } else {
                None
            },
            moe_cfg,
            device,
        })
    }

    /// Waits for the device's queued work (a no-op on the CPU), so a timer measures the
    /// work of its phase rather than how fast it was enqueued.
    fn sync(&self) {
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Seconds since `t`, after the device finished the work enqueued since then.
    fn lap(&self, t: Instant) -> f64 {
        self.sync();
        t.elapsed().as_secs_f64()
    }

    /// Every leaf whose gradient an iteration produces.
    fn leaves(&self) -> Vec<Tensor> {
        let mut v = vec![self.x_nd.shallow_clone()];
        if let Some(dn) = &self.dense {
            v.extend(
                [&dn.x_rd, &dn.w_gate_dh, &dn.w_up_dh, &dn.w_down_hd].map(|t| t.shallow_clone()),
            );
        }
        if let Some(tb) = &self.textbook {
            v.push(tb.w_router_de.shallow_clone());
            for (a, b, c) in &tb.experts {
                v.extend([a, b, c].map(|t| t.shallow_clone()));
            }
        }
        for l in [&self.sequential, &self.grouped].into_iter().flatten() {
            // The bench's layers have no shared experts: the router and the routed experts.
            let ex = &l.experts;
            v.extend(
                [&l.w_router_de, &ex.w_gate_ldh, &ex.w_up_ldh, &ex.w_down_lhd]
                    .map(|t| t.shallow_clone()),
            );
        }
        v
    }

    /// Zeroes every gradient outside the timed region, as the trainer does between steps
    /// (backward then accumulates into the existing buffers).
    fn clear_grads(&self) {
        for t in self.leaves() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.f_zero_();
            }
        }
    }

    /// One forward + backward of `v`; returns seconds.
    fn iteration(&self, v: Variant) -> Result<f64> {
        self.clear_grads();
        self.sync();
        let start = Instant::now();
        match v {
            Variant::Dense => {
                let dn = self.dense.as_ref().ok_or_else(missing)?;
                let y = swiglu(&dn.x_rd, &dn.w_gate_dh, &dn.w_up_dh, &dn.w_down_hd)?;
                y.f_mul(&dn.dy_rd)?.f_sum(Kind::Float)?.f_backward()?;
            }
            Variant::Textbook => self.textbook_step()?,
            Variant::Sequential | Variant::Grouped => {
                let layer = if v == Variant::Sequential {
                    &self.sequential
                } else {
                    &self.grouped
                };
                let layer = layer.as_ref().ok_or_else(missing)?;
                let ctx = MoeForward {
                    train: true,
                    seq_len: self.shape.n,
                    jitter_seed: 0,
                    compute_kind: self.x_nd.kind(),
                };
                let (y, stats) = layer.forward(&self.x_nd, &ctx)?;
                y.f_mul(&self.dy_nd)?
                    .f_sum(Kind::Float)?
                    .f_add(&stats.aux_loss)?
                    .f_add(&stats.z_loss)?
                    .f_backward()?;
            }
        }
        Ok(self.lap(start))
    }

    /// HF Mixtral's sparse MoE block: a mask, gather, SwiGLU and scatter-add per expert.
    fn textbook_step(&self) -> Result<()> {
        let tb = self.textbook.as_ref().ok_or_else(missing)?;
        let Shape { n, d, k, .. } = self.shape;
        let x = &self.x_nd;
        let probs_ne = x.f_matmul(&tb.w_router_de)?.f_softmax(1, Kind::Float)?;
        let (top_nk, idx_nk) = probs_ne.f_topk(k, 1, true, true)?;
        let w_nk = top_nk.f_div(&top_nk.f_sum_dim_intlist(1, true, Kind::Float)?)?;
        let mut y_nd = Tensor::f_zeros([n, d], (Kind::Float, self.device))?;
        for (e, (wg, wu, wd)) in tb.experts.iter().enumerate() {
            let mask_nk = idx_nk.f_eq(e as i64)?;
            let tok = mask_nk.f_any_dim(1, false)?.f_nonzero()?.f_squeeze_dim(1)?;
            if tok.numel() == 0 {
                continue;
            }
            let w_t = w_nk
                .f_mul(&mask_nk.f_to_kind(Kind::Float)?)?
                .f_sum_dim_intlist(1, false, Kind::Float)?
                .f_index_select(0, &tok)?;
            let out =
                swiglu(&x.f_index_select(0, &tok)?, wg, wu, wd)?.f_mul(&w_t.f_unsqueeze(1)?)?;
            y_nd = y_nd.f_index_add(0, &tok, &out)?;
        }
        y_nd.f_mul(&self.dy_nd)?.f_sum(Kind::Float)?.f_backward()?;
        Ok(())
    }

    /// The project's layer cut into routing, permute, experts and combine: each segment's
    /// output is detached into a leaf, and backward runs segment by segment in reverse with
    /// the gradient of the next one, so each phase's forward + backward is timed alone.
    /// Combine and routing end in small scalar products (`[N, d]` with the loss gradient, as
    /// the unsegmented layer does; the `[N, k]` or `[N, E]` weights with theirs, plus the
    /// router losses). Returns seconds per phase.
    fn segmented(&self, v: Variant) -> Result<[f64; 4]> {
        self.clear_grads();
        let layer = match v {
            Variant::Sequential => &self.sequential,
            _ => &self.grouped,
        };
        let layer = layer.as_ref().ok_or_else(missing)?;
        let cfg = &self.moe_cfg;
        let dispatcher = layer.dispatcher();
        let detached_leaf =
            |t: &Tensor| -> Result<Tensor> { Ok(t.f_detach()?.f_set_requires_grad(true)?) };
        let grad_dot =
            |y: &Tensor, g: &Tensor| -> Result<Tensor> { Ok(y.f_mul(g)?.f_sum(Kind::Float)?) };
        let mut f = [0.0; 4];
        let mut b = [0.0; 4];
        self.sync();

        let t = Instant::now();
        let logits_ne = self.x_nd.f_matmul(&layer.w_router_de)?;
        let routing = router::route(
            cfg,
            &RouterInput {
                logits_ne: &logits_ne,
                expert_bias_e: None,
                seq_len: self.shape.n,
                capacity_groups: 1,
            },
        )?;
        let counts_e = dispatcher.all_reduce_stats(&routing.aux_stats.counts_e)?;
        let aux = router::aux_loss(cfg, &routing.aux_stats, &counts_e, self.shape.n)?;
        // The weights leaf is in the form the layer dispatches from: `[N, k]` when every
        // assignment is kept (no capacity limit), the `[N, E]` map's weights otherwise.
        let weights = match &routing.topk {
            Some(topk) => &topk.weights_nk,
            None => &routing.probs_ne,
        };
        let weights_leaf = detached_leaf(weights)?;
        f[0] = self.lap(t);

        let t = Instant::now();
        let (x_md, rows, meta) = match &routing.topk {
            Some(topk) => dispatcher.dispatch_topk(
                &self.x_nd,
                &TopK {
                    idx_nk: topk.idx_nk.shallow_clone(),
                    weights_nk: weights_leaf.shallow_clone(),
                },
                &routing.tokens_per_expert_e,
                cfg.num_experts,
            )?,
            None => dispatcher.dispatch_map(
                &self.x_nd,
                &weights_leaf,
                &routing.routing_map_ne,
                cfg.num_experts,
            )?,
        };
        let x_md_leaf = detached_leaf(&x_md)?;
        f[1] = self.lap(t);

        let t = Instant::now();
        let y_md = layer.experts.forward(&x_md_leaf, &rows)?;
        let y_md_leaf = detached_leaf(&y_md)?;
        f[2] = self.lap(t);

        let t = Instant::now();
        let y_nd = dispatcher.combine(&y_md_leaf, meta)?;
        f[3] = self.lap(t);

        let t = Instant::now();
        grad_dot(&y_nd, &self.dy_nd)?.f_backward()?;
        b[3] = self.lap(t);
        // The middle segments backpropagate the next one's gradient as it is (a `sum(y * g)`
        // would add three passes over the `[M, d]` rows that the layer does not run).
        let t = Instant::now();
        backward_with(&y_md, &y_md_leaf.grad())?;
        b[2] = self.lap(t);
        let t = Instant::now();
        backward_with(&x_md, &x_md_leaf.grad())?;
        b[1] = self.lap(t);
        let t = Instant::now();
        grad_dot(weights, &weights_leaf.grad())?
            .f_add(&aux)?
            .f_add(&routing.z_loss)?
            .f_backward()?;
        b[0] = self.lap(t);
        Ok([f[0] + b[0], f[1] + b[1], f[2] + b[2], f[3] + b[3]])
    }
}

fn missing() -> moe_model::ModelError {
    moe_model::ModelError::Invalid("bench variant not built".into())
}

/// Medians over `iters` interleaved iterations, after `warmup` untimed ones.
struct Timings {
    ms: Vec<f64>,
    phases_ms: [[f64; 4]; 2],
}

fn time_shape(setup: &Setup, warmup: u64, iters: u64) -> anyhow::Result<Timings> {
    let mut samples = vec![Vec::new(); VARIANTS.len()];
    let mut phases: [[Vec<f64>; 4]; 2] = Default::default();
    for i in 0..warmup + iters {
        for (j, v) in VARIANTS.iter().enumerate() {
            let s = setup.iteration(*v)?;
            if i >= warmup {
                samples[j].push(s);
            }
        }
        for (j, v) in [Variant::Sequential, Variant::Grouped].iter().enumerate() {
            let p = setup.segmented(*v)?;
            if i >= warmup {
                for (q, x) in p.iter().enumerate() {
                    phases[j][q].push(*x);
                }
            }
        }
    }
    let ms = samples.iter().map(|s| 1e3 * median(s)).collect();
    let phases_ms = phases.map(|per| per.map(|s| 1e3 * median(&s)));
    Ok(Timings { ms, phases_ms })
}

/// Peak memory of one variant, measured by a fresh child process.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct MemoryResult {
    /// Resident set after building the inputs and weights, before the first iteration (MiB).
    setup_rss_mib: f64,
    /// Peak resident set of the process (MiB).
    peak_rss_mib: f64,
}

/// `--memory-child VARIANT`: builds only that variant, runs `max(iters,1)` iterations and
/// prints the setup and peak resident sets as JSON.
pub fn memory_child(args: &BenchArgs, variant: &str) -> anyhow::Result<()> {
    let v = Variant::parse(variant)?;
    let shape = *shapes(args)?
        .first()
        .ok_or_else(|| anyhow!("no shape given"))?;
    set_threads(args.threads.first().copied().unwrap_or(1).into(), 1);
    // Peak RSS is a host figure: the memory children run on the CPU.
    let setup = Setup::new(shape, Some(v), Device::Cpu)?;
    let setup_rss_mib = proc_status_mib("VmRSS").unwrap_or(f64::NAN);
    for _ in 0..args.iters.max(1) {
        setup.iteration(v)?;
    }
    let r = MemoryResult {
        setup_rss_mib,
        peak_rss_mib: proc_status_mib("VmHWM").unwrap_or(f64::NAN),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn memory_of(shape: Shape, v: Variant) -> anyhow::Result<MemoryResult> {
    let exe = std::env::current_exe().context("locating the moe binary")?;
    let out = std::process::Command::new(exe)
        .args(["bench", "layer", "--memory-child", v.name(), "--iters", "2"])
        .args([
            "--experts",
            &shape.e.to_string(),
            "--top-k",
            &shape.k.to_string(),
        ])
        .args(["--d-model", &shape.d.to_string()])
        .args(["--expert-hidden", &shape.h.to_string()])
        .args(["--tokens", &shape.n.to_string(), "--threads", "1"])
        .output()
        .context("running the memory child")?;
    if !out.status.success() {
        bail!(
            "memory child for {} failed: {}",
            v.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("parsing the memory child's output {line:?}"))
}

fn f1(x: f64) -> String {
    format!("{x:.1}")
}

fn f2(x: f64) -> String {
    format!("{x:.2}")
}

/// Runs `moe bench layer`.
pub fn run(args: &BenchArgs) -> anyhow::Result<Report> {
    let shapes = shapes(args)?;
    let device = crate::device::resolve_flag_device("--device", &args.device)?;
    let measure_memory = !args.no_memory && device == Device::Cpu;
    let mut report = Report::new(&format!(
        "moe bench layer: one MoE layer, forward + backward ({}, float32)",
        crate::device::describe(device)
    ));
    let mut main = Table::new(
        "Layer time (median ms per forward+backward; tokens/s of the fastest project path)",
        &[
            "E",
            "k",
            "d",
            "h",
            "N",
            "threads",
            "dense bound",
            "textbook",
            "sequential",
            "grouped",
            "fastest tok/s",
            "fastest / dense",
            "target",
            "fastest vs textbook",
        ],
    );
    let mut split = Table::new(
        "Time split of the project's layer (segmented run: each phase's forward+backward, median ms)",
        &[
            "E", "k", "N", "threads", "experts impl", "routing", "permute", "experts",
            "unpermute/combine", "routing+permute+combine share",
        ],
    );
    let mut mem = Table::new(
        "Peak memory per variant (threads 1; fresh process each; MiB above the resident inputs and weights)",
        &["E", "k", "d", "h", "N", "dense bound", "textbook", "sequential", "grouped"],
    );
    let mut misses = Vec::new();
    for shape in &shapes {
        let setup = Setup::new(*shape, None, device)?;
        for &threads in &args.threads {
            set_threads(threads.into(), 1);
            let t = time_shape(&setup, args.warmup, args.iters)?;
            let (dense, textbook) = (t.ms[0], t.ms[1]);
            let fastest = t.ms[2].min(t.ms[3]);
            let ratio = dense / fastest;
            let target = if shape.e >= 256 { 0.7 } else { 0.85 };
            let Shape { e, k, d, h, n } = *shape;
            if ratio < target {
                misses.push(format!(
                    "E={e},k={k},d={d},h={h},N={n},threads {threads}: fastest/dense {ratio:.2} < {target}"
                ));
            }
            main.row(vec![
                e.to_string(),
                k.to_string(),
                d.to_string(),
                h.to_string(),
                n.to_string(),
                threads.to_string(),
                f1(dense),
                f1(textbook),
                f1(t.ms[2]),
                f1(t.ms[3]),
                format!("{:.0}", n as f64 / (fastest / 1e3)),
                f2(ratio),
                format!(
                    ">= {target} {}",
                    if ratio >= target { "met" } else { "MISSED" }
                ),
                format!("{:.1}x", textbook / fastest),
            ]);
            eprintln!(
                "layer: {}",
                main.rows.last().map(|r| r.join(" | ")).unwrap_or_default()
            );
            for (j, name) in ["sequential", "grouped"].iter().enumerate() {
                let p = t.phases_ms[j];
                let total: f64 = p.iter().sum();
                split.row(vec![
                    e.to_string(),
                    k.to_string(),
                    n.to_string(),
                    threads.to_string(),
                    name.to_string(),
                    f2(p[0]),
                    f2(p[1]),
                    f2(p[2]),
                    f2(p[3]),
                    format!("{:.1}%", 100.0 * (p[0] + p[1] + p[3]) / total),
                ]);
            }
        }
        drop(setup);
        // Peak RSS (host memory of a child process) describes the CPU runs only.
        if measure_memory {
            let mut cells = vec![
                shape.e.to_string(),
                shape.k.to_string(),
                shape.d.to_string(),
                shape.h.to_string(),
                shape.n.to_string(),
            ];
            for v in VARIANTS {
                cells.push(match memory_of(*shape, v) {
                    Ok(m) => format!(
                        "{:.0} (peak RSS {:.0})",
                        m.peak_rss_mib - m.setup_rss_mib,
                        m.peak_rss_mib
                    ),
                    Err(e) => {
                        eprintln!("peak memory of {}: {e:#}", v.name());
                        "failed".into()
                    }
                });
            }
            eprintln!("memory: {}", cells.join(" | "));
            mem.row(cells);
        }
    }
    report.tables.push(main);
    report.tables.push(split);
    if measure_memory {
        report.tables.push(mem);
    } else if !args.no_memory {
        report.notes.push(format!(
            "peak memory not measured on {}: it is the host RSS of CPU child processes",
            crate::device::describe(device)
        ));
    }
    report.notes.push(format!(
        "medians of {} interleaved iterations after {} warmup; dense bound = one SwiGLU FFN of width h over N*k rows \
         (the routed experts' FLOPs, no routing); the project's paths also compute the aux and z losses",
        args.iters, args.warmup
    ));
    if misses.is_empty() {
        report
            .notes
            .push("fastest path / dense bound: every target met".into());
    } else {
        report
            .notes
            .push(format!("targets missed: {}", misses.join("; ")));
    }
    Ok(report)
}
