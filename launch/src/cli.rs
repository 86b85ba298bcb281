//! The `moe` command line (clap derive). Parsing only; `main.rs` dispatches.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const ABOUT: &str = "Train and study expert-parallel Mixture-of-Experts language models";

const LONG_ABOUT: &str = "\
Train and study expert-parallel Mixture-of-Experts language models.

One YAML file describes an experiment (see configs/ and docs/config-reference.md); any key
can be overridden with --set. Run on one CPU or GPU, in --debug mode (expert parallelism
simulated by in-process ranks), or on many ranks under mpirun. `make train` builds the
binary as target/release/moe (the examples say `moe` for it):

  moe train --config configs/quickstart.yaml
  moe train --config configs/debug.yaml --debug
  moe launch --np 2 -- train --config configs/ep2.yaml
  mpirun -np 2 --oversubscribe target/release/moe train --config configs/ep2.yaml
  (as root, mpirun also needs --allow-run-as-root)

Exit status: 0 on success, 2 for bad input (config, arguments), 1 when a run fails.";

/// The `moe` binary.
#[derive(Debug, Parser)]
#[command(name = "moe", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model from a YAML config.
    #[command(long_about = "Train a model from a YAML config.\n\n\
        The resolved config (overrides applied) is written to <run.out_dir>/config.yaml when \
        training starts, with metrics.jsonl, TensorBoard events, checkpoints and train.log \
        (rank 0's stdout and stderr, appended run after run) beside it.\n\n\
        run.out_dir defaults to runs/<run.name>, so a new run.name is a new run directory; \
        --overwrite starts over in a directory that holds a run.\n\n\
        Paths: a relative path the run reads (data.path) is relative to the config file; one \
        it writes (run.out_dir, checkpoint.dir) is relative to the working directory, like \
        Megatron-LM's --save; a path given with --set is relative to the working directory.\n\n\
        Examples (each runs as printed, also again):\n  \
        moe train --config configs/quickstart.yaml --resume auto   # what `make train` runs: starts or continues\n  \
        moe train --config configs/quickstart.yaml --set trainer.max_steps=50 --set run.name=short --overwrite\n  \
        moe train --config configs/debug.yaml --debug --overwrite")]
    Train(TrainArgs),
    /// Load and validate a config without running anything; print the resolved YAML.
    #[command(
        long_about = "Load and validate a config without running anything.\n\n\
        Prints the resolved config (defaults filled in, overrides applied) as YAML. Exits with \
        2 and a message naming the file, line, column and key if the config is invalid."
    )]
    Check(CheckArgs),
    /// Evaluate a checkpoint on the validation split.
    Eval(EvalArgs),
    /// Sample text from a checkpoint.
    Generate(GenerateArgs),
    /// Show a config's model: parameter counts, experts per rank, memory and FLOPs per token.
    Inspect(InspectArgs),
    /// Run `moe` on several ranks through mpirun.
    #[command(long_about = "Run `moe` on several ranks through mpirun.\n\n\
        Everything after `--` is the moe command each rank runs (a leading `moe` is allowed).\n\n\
        Example:\n  moe launch --np 2 -- train --config configs/ep2.yaml")]
    Launch(LaunchArgs),
    /// Measure the MoE layer, the all-to-all or a training step.
    Bench(Box<BenchArgs>),
    /// Export a checkpoint to a Hugging Face folder (Mixtral, Qwen2-MoE, Qwen3-MoE).
    Export(crate::export_cmd::ExportArgs),
    /// Import a Hugging Face folder (Mixtral, Qwen2-MoE, Qwen3-MoE) as a run directory.
    Import(crate::import_cmd::ImportArgs),
    /// Keep K experts per MoE layer of a checkpoint (random or by routing frequency).
    Slim(crate::slim_cmd::SlimArgs),
    /// Upcycle a dense checkpoint into an MoE whose first forward equals the dense one.
    Upcycle(crate::upcycle_cmd::UpcycleArgs),
    /// Train a byte-level BPE tokenizer (`moe tokenizer train`).
    Tokenizer(crate::tokenizer_cmd::TokenizerArgs),
    /// Prepare token files for `data.source: tokens` (`moe data prepare`).
    Data(crate::tokenizer_cmd::DataArgs),
    /// Print the config reference (docs/config-reference.md) generated from the schema.
    #[command(hide = true)]
    ConfigReference,
}

/// The config file and its overrides.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Experiment config (YAML); see configs/ and docs/config-reference.md.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: PathBuf,
    /// Override one config key, e.g. `--set trainer.max_steps=100` or
    /// `--set moe.capacity_factor=null`; the value is read as YAML. Repeatable; later wins.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Where `--resume` continues from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest valid checkpoint of the run's checkpoint directory, if there is one.
    Auto,
    /// This checkpoint.
    Path(PathBuf),
}

fn parse_resume(s: &str) -> Result<Resume, String> {
    match s {
        "" => Err("expected a checkpoint path or `auto`".into()),
        "auto" => Ok(Resume::Auto),
        p => Ok(Resume::Path(PathBuf::from(p))),
    }
}

/// `moe train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Single-device debug mode: parallel.ep_size ranks simulated in this process, checks
    /// routing invariants after every step and prints per-layer router statistics.
    #[arg(long)]
    pub debug: bool,
    /// Continue from a checkpoint: `auto` for the newest one of this run, or a checkpoint, a
    /// checkpoints directory or a run directory (its newest intact checkpoint).
    #[arg(long, value_name = "PATH|auto", value_parser = parse_resume)]
    pub resume: Option<Resume>,
    /// Start a fresh run (step 0, a new optimizer) from the weights of a checkpoint, a
    /// checkpoints directory or a run directory: fine-tuning. The model shape must match.
    #[arg(long, value_name = "PATH", conflicts_with = "resume")]
    pub init_from: Option<PathBuf>,
    /// Start over: delete what an earlier run left in run.out_dir (metrics, TensorBoard
    /// events, checkpoints, config.yaml, train.log) before training.
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Progress output: `live` redraws one line in place, `plain` prints a line per log
    /// step. Default: live on a terminal with one rank, else plain.
    #[arg(long, value_enum, value_name = "plain|live")]
    pub progress: Option<ProgressArg>,
}

/// `--progress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    /// One line per log step.
    Plain,
    /// One line redrawn in place (a terminal).
    Live,
}

/// `moe check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Validate for debug mode (world size = parallel.ep_size in-process ranks).
    #[arg(long)]
    pub debug: bool,
    /// Validate for this many ranks (default: the mpirun world size, else parallel.ep_size,
    /// the smallest world the config can run on).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub world_size: Option<i64>,
    /// Print the resolved config as JSON instead of YAML.
    #[arg(long)]
    pub json: bool,
}

/// `moe eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint to evaluate: a checkpoint, a checkpoints directory or a run directory (its
    /// newest intact checkpoint).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Config to evaluate with (default: the config stored beside the checkpoint).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one config key (see `moe train --help`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Print one JSON object instead of a line.
    #[arg(long)]
    pub json: bool,
}

/// `moe generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Checkpoint to sample from: a checkpoint, a checkpoints directory or a run directory.
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// Text the sample continues.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate.
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Softmax temperature (>= 0); 0 is greedy decoding.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Sample only among the K most likely tokens.
    #[arg(long, value_name = "K")]
    pub top_k: Option<i64>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Torch threads. Decoding runs one token's small ops at a time, where more threads
    /// mostly wait on each other (on a busy machine, 2 threads were 30x slower than 1 on
    /// the quickstart model): raise it only for models whose matmuls are large.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub threads: i64,
}

/// `moe inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Show the sharding for this expert-parallel size (default: parallel.ep_size).
    #[arg(long, value_name = "P")]
    pub ep_size: Option<i64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `moe launch`.
#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// Number of ranks (at least 1).
    #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub np: u32,
    /// MPI hostfile for multi-node runs.
    #[arg(long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// The moe command every rank runs, after `--`.
    #[arg(last = true, required = true, value_name = "MOE_ARGS")]
    pub args: Vec<String>,
}

/// What `moe bench` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchKind {
    /// One MoE layer forward and backward.
    Layer,
    /// The all-to-all exchange alone.
    A2a,
    /// Whole training steps.
    Train,
    /// Greedy generation with and without the KV cache.
    Generate,
}

/// `moe bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub what: BenchKind,
    /// Config giving the shapes (default: configs/quickstart.yaml).
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one config key (see `moe train --help`). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Timed iterations.
    #[arg(long, default_value_t = 20)]
    pub iters: u64,
    /// Untimed warmup iterations.
    #[arg(long, default_value_t = 3)]
    pub warmup: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also append the results, as a Markdown section with the machine, command and date, to
    /// this file (e.g. BENCHMARKS.md).
    #[arg(long, value_name = "FILE")]
    pub markdown: Option<PathBuf>,
    /// layer: routed experts E of each shape (comma list; the E, k, d and h lists are zipped,
    /// a single value applies to every shape).
    #[arg(long, value_delimiter = ',', default_values_t = [8i64, 64, 256])]
    pub experts: Vec<i64>,
    /// layer: experts per token k of each shape.
    #[arg(long, value_delimiter = ',', default_values_t = [2i64, 2, 8])]
    pub top_k: Vec<i64>,
    /// layer: model width d of each shape.
    #[arg(long, value_delimiter = ',', default_values_t = [256i64])]
    pub d_model: Vec<i64>,
    /// layer: expert hidden width h of each shape.
    #[arg(long, value_delimiter = ',', default_values_t = [512i64, 512, 128])]
    pub expert_hidden: Vec<i64>,
    /// layer: tokens N per call (comma list; every shape runs at every N).
    #[arg(long, value_delimiter = ',', default_values_t = [4096i64])]
    pub tokens: Vec<i64>,
    /// layer, train: torch intra-op threads (comma list; every shape runs at each);
    /// generate: the first value.
    #[arg(long, value_delimiter = ',', default_values_t = [1i32, 2],
          value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Vec<i32>,
    /// layer: skip the per-variant peak-memory child processes.
    #[arg(long)]
    pub no_memory: bool,
    /// layer: `cpu`, `cuda` or `cuda:N` (on CUDA every timer waits for the device).
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// a2a: `threads` (in-process ranks) or `mpi` (run under mpirun; also measures the raw
    /// MPI_Alltoallv ceiling and, on rank 0, the threads backend at the same rank count).
    #[arg(long, value_enum, default_value_t = BenchBackend::Threads)]
    pub backend: BenchBackend,
    /// a2a over threads: rank counts (comma list).
    #[arg(long, value_delimiter = ',', default_values_t = [2usize, 4])]
    pub ranks: Vec<usize>,
    /// a2a: smallest message (bytes each rank sends per all-to-all, split evenly over peers).
    #[arg(long, default_value_t = 1024)]
    pub min_bytes: u64,
    /// a2a: largest message; sizes go up by 4x from --min-bytes.
    #[arg(long, default_value_t = 64 << 20)]
    pub max_bytes: u64,
    /// train: skip the peak-RSS run of `moe train` in a child process.
    #[arg(long)]
    pub no_rss: bool,
    /// train: skip the dense model's PyTorch eager twin (scripts/eager_dense.py, run with
    /// $MOE_PYTHON or .venv/bin/python).
    #[arg(long)]
    pub no_eager: bool,
    /// Internal: measure one variant's peak memory in this (child) process and print JSON.
    #[arg(long, hide = true, value_name = "VARIANT")]
    pub memory_child: Option<String>,
}

/// Communication backend of `moe bench a2a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    /// In-process ranks over shared memory.
    Threads,
    /// MPI processes (under mpirun).
    Mpi,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn train_args_parse() {
        let cli = Cli::try_parse_from([
            "moe", "train", "--config", "c.yaml", "--set", "a.b=1", "--set", "c.d=x", "--debug",
            "--resume", "auto",
        ])
        .unwrap();
        let Command::Train(t) = cli.command else {
            panic!("not train")
        };
        assert_eq!(t.config.set, vec!["a.b=1", "c.d=x"]);
        assert!(t.debug);
        assert_eq!(t.resume, Some(Resume::Auto));
        let cli = Cli::try_parse_from(["moe", "train", "-c", "c.yaml", "--resume", "ck/step_10"])
            .unwrap();
        let Command::Train(t) = cli.command else {
            panic!("not train")
        };
        assert_eq!(t.resume, Some(Resume::Path("ck/step_10".into())));
    }

    #[test]
    fn launch_takes_the_rest_after_dashes() {
        let cli = Cli::try_parse_from([
            "moe", "launch", "--np", "2", "--", "train", "--config", "x.yaml",
        ])
        .unwrap();
        let Command::Launch(l) = cli.command else {
            panic!("not launch")
        };
        assert_eq!(l.np, 2);
        assert_eq!(l.args, vec!["train", "--config", "x.yaml"]);
        assert!(Cli::try_parse_from(["moe", "launch", "--np", "2"]).is_err());
        assert!(Cli::try_parse_from(["moe", "launch", "-n", "2", "--", "train"]).is_ok());
        assert!(Cli::try_parse_from(["moe", "launch", "-n", "0", "--", "train"]).is_err());
        // --overwrite starts over, --resume continues: not both.
        assert!(Cli::try_parse_from([
            "moe",
            "train",
            "-c",
            "x",
            "--overwrite",
            "--resume",
            "auto"
        ])
        .is_err());
    }
}
