//! The experiment config: one YAML file, typed here. Loading (YAML, `--set` overrides, error
//! positions) lives in the binary; this module owns the schema and the cross-field rules.

use moe_model::config::{ModelConfig, MoeConfig};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A whole experiment: the root of the YAML file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ExperimentConfig {
    pub run: RunConfig,
    pub model: ModelConfig,
    pub moe: MoeConfig,
    pub data: DataConfig,
    pub trainer: TrainerConfig,
    pub parallel: ParallelConfig,
    pub checkpoint: CheckpointConfig,
}

/// `run:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Run name: printed at start-up, and the run directory `runs/<name>` (the run TensorBoard
    /// shows under `--logdir runs`) unless `run.out_dir` is set.
    pub name: String,
    /// Directory for `metrics.jsonl`, TensorBoard events, checkpoints, `config.yaml` and
    /// `train.log` (rank 0's stdout and stderr); when not set, `runs/<run.name>`. Relative to
    /// the working directory, like every path a run writes (paths it reads, like `data.path`,
    /// are relative to the config file).
    #[schemars(extend("format" = "path"))]
    pub out_dir: PathBuf,
    /// Seed of everything random: init, data order, jitter. Same seed, same run.
    pub seed: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            name: "moe".into(),
            out_dir: PathBuf::from("runs/moe"),
            seed: 1234,
        }
    }
}

/// Where training text comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// A deterministic generated multi-domain ASCII corpus, built in; nothing is downloaded.
    Synthetic,
    /// A UTF-8 text file at `data.path`, tokenized by `data.tokenizer`: the first 90% of the
    /// tokens train, the rest val.
    Text,
    /// A directory at `data.path` with little-endian `train.bin` and `val.bin`: uint16, or
    /// the dtype its `tokens.json` names (`moe data prepare` writes one).
    Tokens,
}

/// `data:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `synthetic`, `text` or `tokens`.
    pub source: DataSource,
    /// File (`text`) or directory (`tokens`). A relative path in a config file is relative to
    /// that file's directory (one given with `--set`, to the working directory); the saved
    /// config stores it absolute.
    #[schemars(extend("format" = "path"))]
    pub path: Option<PathBuf>,
    /// `bytes` (one token per byte, ids 0..255) or the path of a Hugging Face
    /// `tokenizer.json` (`moe tokenizer train` makes one), relative like `data.path`.
    /// `synthetic` and `text` data are encoded with it; `tokens` data must have been made
    /// with it (its `tokens.json` is checked). Its vocabulary must fit `model.vocab_size`.
    /// Checkpoints keep a copy, which `moe eval`, `moe generate` and `moe export` use.
    #[schemars(extend("format" = "path"))]
    pub tokenizer: PathBuf,
    /// Tokens per training sequence T (windows of T+1 tokens are drawn).
    pub seq_len: i64,
    /// Size in bytes of the generated synthetic corpus.
    pub synthetic_bytes: usize,
    /// Batches prepared ahead by the background prefetch thread.
    pub prefetch: usize,
}

/// The value of `data.tokenizer` that means byte-level tokens.
pub const BYTE_TOKENIZER: &str = "bytes";

impl DataConfig {
    /// The `tokenizer.json` of `data.tokenizer`; `None` for byte-level tokens.
    pub fn tokenizer_file(&self) -> Option<&Path> {
        (self.tokenizer.as_os_str() != BYTE_TOKENIZER).then_some(self.tokenizer.as_path())
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            source: DataSource::Synthetic,
            path: None,
            tokenizer: PathBuf::from(BYTE_TOKENIZER),
            seq_len: 128,
            synthetic_bytes: 2_000_000,
            prefetch: 4,
        }
    }
}

/// Compute device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// float32 everywhere.
    Fp32,
    /// bfloat16 matmuls on CUDA (fp32 master weights, router and losses in fp32).
    Bf16,
}

impl Precision {
    /// The config spelling (`fp32`, `bf16`), for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// `trainer:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// Optimizer steps to run; at least 1.
    pub max_steps: u64,
    /// Sequences per rank per micro-batch; the global batch is `batch_size * world * grad_accum`.
    pub batch_size: i64,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: i64,
    /// Peak learning rate, reached after `warmup_steps`.
    pub lr: f64,
    /// Floor of the cosine decay, reached at `max_steps`; `moe train` lowers one above `lr`
    /// to `lr`, with a warning.
    pub min_lr: f64,
    /// Linear warmup steps from 0 to `lr`; `moe train` cuts more than `max_steps` to
    /// `max_steps`, with a warning.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay; never applied to norms, biases and embeddings.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
    /// Log (terminal, metrics.jsonl, TensorBoard) every this many steps; at least 1.
    pub log_every: u64,
    /// Evaluate on the validation split every this many steps; 0 disables eval.
    pub eval_every: u64,
    /// Validation batches per eval.
    pub eval_iters: u64,
    /// `auto` (cuda:<local rank> if CUDA is available, else cpu), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// `fp32` or `bf16` (bf16 only on CUDA).
    pub precision: Precision,
    /// Torch intra-op threads per rank; 0 means cores / ranks on this node (at least 1).
    pub threads: i64,
    /// Non-finite steps in a row before training aborts (each one is skipped and logged).
    pub max_bad_steps: u64,
    /// Weight of the multi-token prediction loss (`model.mtp_depth: 1`) added to the LM loss:
    /// the cross-entropy of predicting the token after next (DeepSeek-V3 uses 0.3, then 0.1).
    pub mtp_loss_weight: f64,
    /// Knowledge distillation: `{teacher: CKPT, alpha: 1.0, temperature: 2.0}` adds
    /// `alpha * T^2 * KL(teacher || student)` on the logits to the loss (logged as
    /// `distill_loss`); the teacher (same vocabulary, any EP size) runs forward only. Null for
    /// none.
    pub distill: Option<DistillConfig>,
}

/// `trainer.distill:` adds `alpha * T^2 * KL(teacher || student)` on temperature-softened
/// logits to the loss (Hinton et al. 2015). The teacher runs forward only, in the same
/// process, on the same batch, whatever the student's EP size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// Teacher checkpoint (`step-N/`, any EP size), or a run directory (its newest intact
    /// checkpoint); a relative path is relative to the working directory. Its vocabulary
    /// must be the student's.
    #[schemars(extend("format" = "path"))]
    pub teacher: PathBuf,
    /// Weight alpha of the distillation term; at least 0.
    #[serde(default = "DistillConfig::default_alpha")]
    pub alpha: f64,
    /// Softmax temperature T; positive.
    #[serde(default = "DistillConfig::default_temperature")]
    pub temperature: f64,
}

impl DistillConfig {
    fn default_alpha() -> f64 {
        1.0
    }

    fn default_temperature() -> f64 {
        2.0
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            max_steps: 200,
            batch_size: 8,
            grad_accum: 1,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 20,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            grad_clip: 1.0,
            log_every: 10,
            eval_every: 100,
            eval_iters: 10,
            device: "auto".into(),
            precision: Precision::Fp32,
            threads: 0,
            max_bad_steps: 5,
            mtp_loss_weight: 0.3,
            distill: None,
        }
    }
}

/// Communication backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    /// nccl for CUDA tensors when libnccl loads, else mpi under mpirun, else local.
    Auto,
    /// One process, one rank.
    Local,
    /// `ep_size` in-process ranks (debug mode and tests).
    Threads,
    /// OpenMPI, CPU tensors.
    Mpi,
    /// NCCL, CUDA tensors (bootstrapped over MPI).
    Nccl,
}

/// How debug mode (and `backend: threads`) simulates `ep_size` ranks in one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DebugRanks {
    /// `threads` on a CPU, `virtual` on a GPU.
    Auto,
    /// One thread per rank, exchanging through the real all-to-all code. CPU only: on one
    /// GPU the autograd engine runs every rank's backward on that device's single worker
    /// thread, where one rank's blocking all-to-all would wait for peers queued behind it.
    Threads,
    /// P virtual ranks in one autograd graph: the ranks' batches concatenated in rank order,
    /// capacity computed per rank's tokens, and the exchange one differentiable permutation
    /// of the whole batch by expert. No collective blocks, so nothing can deadlock; the
    /// losses and gradients equal those of P real ranks (the EP-equivalence tests).
    Virtual,
}

/// `parallel:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Expert-parallel group size P: each rank holds `num_experts / P` experts. The world
    /// size must be a multiple of P; the remaining factor is data parallelism.
    pub ep_size: i64,
    /// `auto`, `local`, `threads`, `mpi` or `nccl`.
    pub backend: Backend,
    /// Seconds a rank waits in a collective for a silent peer before it aborts the job.
    pub timeout_s: u64,
    /// Debug mode's simulated ranks: `auto` (threads on a CPU, virtual on a GPU), `threads`
    /// (one thread per rank through the real all-to-all; CPU only) or `virtual` (one autograd
    /// graph over the ranks' concatenated batches, capacity per rank; cannot deadlock on a GPU).
    pub debug_ranks: DebugRanks,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            ep_size: 1,
            backend: Backend::Auto,
            timeout_s: 60,
            debug_ranks: DebugRanks::Auto,
        }
    }
}

/// `checkpoint:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many steps (and at the end); 0 writes only at the end.
    pub every: u64,
    /// Checkpoints kept (oldest deleted first); at least 1.
    pub keep: usize,
    /// Directory; `null` means `<run.out_dir>/checkpoints`. Relative to the working
    /// directory, like `run.out_dir`.
    #[schemars(extend("format" = "path"))]
    pub dir: Option<PathBuf>,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 0,
            keep: 2,
            dir: None,
        }
    }
}

impl ExperimentConfig {
    /// Every cross-field rule, checked before any work starts. Each violation names the dotted
    /// keys and their values; an empty list means valid. `world_size` is the number of ranks
    /// the run will have (1 outside mpirun; `ep_size` in threads/debug mode).
    pub fn validate(&self, world_size: i64) -> Vec<String> {
        let mut errs = MoeConfig::validate(&self.model, &self.moe);
        let (m, t, d, p) = (&self.moe, &self.trainer, &self.data, &self.parallel);
        if p.ep_size <= 0 {
            errs.push(format!("parallel.ep_size ({}) must be positive", p.ep_size));
        } else {
            if m.num_experts > 0 && m.num_experts % p.ep_size != 0 {
                errs.push(format!(
                    "moe.num_experts ({}) must be divisible by parallel.ep_size ({})",
                    m.num_experts, p.ep_size
                ));
            }
            if world_size % p.ep_size != 0 {
                errs.push(format!(
                    "the world size ({world_size}) must be divisible by parallel.ep_size ({}): \
                     start a multiple of {} ranks with mpirun, or simulate them with --debug",
                    p.ep_size, p.ep_size
                ));
            }
        }
        // `threads` runs every rank in one process, so its world size is the thread count;
        // whether mpirun started several processes is the launcher's check, not this one's.
        if p.backend == Backend::Local && world_size != 1 {
            errs.push(format!(
                "parallel.backend (local) runs one rank, but the world size is {world_size}"
            ));
        }
        if p.backend == Backend::Nccl && t.device == "cpu" {
            errs.push(
                "parallel.backend (nccl) needs CUDA tensors, but trainer.device is cpu".into(),
            );
        }
        if d.seq_len <= 0 {
            errs.push(format!("data.seq_len ({}) must be positive", d.seq_len));
        } else if d.seq_len > self.model.max_seq_len {
            errs.push(format!(
                "data.seq_len ({}) must be <= model.max_seq_len ({})",
                d.seq_len, self.model.max_seq_len
            ));
        }
        match d.source {
            DataSource::Text | DataSource::Tokens if d.path.is_none() => errs.push(format!(
                "data.path is required when data.source is {}",
                if d.source == DataSource::Text {
                    "text"
                } else {
                    "tokens"
                }
            )),
            _ => {}
        }
        if d.source == DataSource::Synthetic && d.synthetic_bytes < 4096 {
            errs.push(format!(
                "data.synthetic_bytes ({}) must be >= 4096",
                d.synthetic_bytes
            ));
        }
        if d.prefetch == 0 {
            errs.push("data.prefetch (0) must be >= 1".into());
        }
        if t.max_steps == 0 {
            errs.push("trainer.max_steps (0) must be >= 1".into());
        }
        if t.batch_size <= 0 {
            errs.push(format!(
                "trainer.batch_size ({}) must be positive",
                t.batch_size
            ));
        }
        if t.grad_accum <= 0 {
            errs.push(format!(
                "trainer.grad_accum ({}) must be positive",
                t.grad_accum
            ));
        }
        if t.lr <= 0.0 || !t.lr.is_finite() {
            errs.push(format!("trainer.lr ({}) must be positive", t.lr));
        }
        if t.min_lr.is_nan() || t.min_lr < 0.0 || t.min_lr > t.lr {
            errs.push(format!(
                "trainer.min_lr ({}) must be in [0, trainer.lr ({})]",
                t.min_lr, t.lr
            ));
        }
        if t.warmup_steps > t.max_steps {
            errs.push(format!(
                "trainer.warmup_steps ({}) must be <= trainer.max_steps ({})",
                t.warmup_steps, t.max_steps
            ));
        }
        for (key, v) in [("trainer.beta1", t.beta1), ("trainer.beta2", t.beta2)] {
            if !(0.0..1.0).contains(&v) {
                errs.push(format!("{key} ({v}) must be in [0, 1)"));
            }
        }
        if t.eps.is_nan() || t.eps <= 0.0 {
            errs.push(format!("trainer.eps ({}) must be positive", t.eps));
        }
        if t.weight_decay.is_nan() || t.weight_decay < 0.0 {
            errs.push(format!(
                "trainer.weight_decay ({}) must be >= 0",
                t.weight_decay
            ));
        }
        if let Some(dc) = &t.distill {
            if !dc.alpha.is_finite() || dc.alpha < 0.0 {
                errs.push(format!(
                    "trainer.distill.alpha ({}) must be a finite number >= 0",
                    dc.alpha
                ));
            }
            if !dc.temperature.is_finite() || dc.temperature <= 0.0 {
                errs.push(format!(
                    "trainer.distill.temperature ({}) must be a finite number > 0",
                    dc.temperature
                ));
            }
        }
        if !t.mtp_loss_weight.is_finite() || t.mtp_loss_weight < 0.0 {
            errs.push(format!(
                "trainer.mtp_loss_weight ({}) must be a finite number >= 0",
                t.mtp_loss_weight
            ));
        }
        if t.grad_clip.is_nan() || t.grad_clip < 0.0 {
            errs.push(format!("trainer.grad_clip ({}) must be >= 0", t.grad_clip));
        }
        if t.log_every == 0 {
            errs.push("trainer.log_every (0) must be >= 1".into());
        }
        if t.eval_every > 0 && t.eval_iters == 0 {
            errs.push("trainer.eval_iters (0) must be >= 1 when trainer.eval_every is set".into());
        }
        if t.threads < 0 {
            errs.push(format!("trainer.threads ({}) must be >= 0", t.threads));
        }
        if !(t.device == "auto"
            || t.device == "cpu"
            || t.device == "cuda"
            || parse_cuda_index(&t.device).is_some())
        {
            errs.push(format!(
                "trainer.device ({:?}) must be auto, cpu, cuda or cuda:N",
                t.device
            ));
        }
        if t.precision == Precision::Bf16 && t.device == "cpu" {
            errs.push(
                "trainer.precision (bf16) needs a CUDA device, but trainer.device is cpu".into(),
            );
        }
        if self.checkpoint.keep == 0 {
            errs.push("checkpoint.keep (0) must be >= 1".into());
        }
        if self.run.name.trim().is_empty() {
            errs.push("run.name must not be empty".into());
        }
        errs
    }
}

/// `cuda:N` -> N.
pub fn parse_cuda_index(device: &str) -> Option<usize> {
    device.strip_prefix("cuda:").and_then(|n| n.parse().ok())
}
