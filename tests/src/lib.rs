//! Shared helpers for the integration tests in `tests/tests/`.

use moe_comm::{threads::threads_world, ProcessGroups};
use moe_trainer::config::ExperimentConfig;
use moe_trainer::train_loop::{train, RunOptions, TrainSummary};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::Device;

/// The workspace root (for configs/ and target/).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh, empty temporary directory under the system temp dir.
pub fn temp_dir(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("moe-test-{tag}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A tiny, fast experiment on the synthetic corpus. Dims are multiples of 4 (grouped GEMM
/// alignment); small enough that a few steps take well under a second per rank.
pub fn tiny_config(out_dir: &Path) -> ExperimentConfig {
    let mut cfg = ExperimentConfig::default();
    cfg.run.out_dir = out_dir.to_path_buf();
    cfg.run.seed = 7;
    cfg.model.d_model = 32;
    cfg.model.num_layers = 2;
    cfg.model.num_heads = 4;
    cfg.model.num_kv_heads = 2;
    cfg.model.ffn_hidden = 64;
    cfg.model.max_seq_len = 32;
    cfg.moe.num_experts = 8;
    cfg.moe.top_k = 2;
    cfg.moe.expert_hidden = 32;
    cfg.data.seq_len = 16;
    cfg.data.synthetic_bytes = 200_000;
    cfg.trainer.max_steps = 4;
    cfg.trainer.batch_size = 4;
    cfg.trainer.warmup_steps = 1;
    cfg.trainer.log_every = 1;
    cfg.trainer.eval_every = 0;
    cfg.trainer.device = "cpu".into();
    cfg.checkpoint.every = 0;
    cfg
}

/// Runs `cfg` on `p` in-process ranks (threads backend, EP = `ep_size`) and returns every
/// rank's summary, rank order.
pub fn train_threads(cfg: &ExperimentConfig, p: usize, ep_size: usize) -> Vec<TrainSummary> {
    tch::set_num_threads(1);
    let comms = threads_world(p, Duration::from_secs(60));
    let handles: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let groups = ProcessGroups::new(comm, ep_size).expect("groups");
                let opts = RunOptions {
                    quiet: true,
                    ..RunOptions::default()
                };
                train(&cfg, groups, Device::Cpu, &opts)
            })
        })
        .collect();
    handles
        .into_iter()
        .enumerate()
        .map(|(r, h)| match h.join() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("rank {r} failed: {e}"),
            Err(_) => panic!("rank {r} panicked"),
        })
        .collect()
}

/// Runs `cfg` in one process with capacity computed per `capacity_groups` token groups.
pub fn train_single(cfg: &ExperimentConfig, capacity_groups: i64) -> TrainSummary {
    tch::set_num_threads(1);
    let opts = RunOptions {
        quiet: true,
        capacity_groups,
        ..RunOptions::default()
    };
    train(cfg, ProcessGroups::single(Device::Cpu), Device::Cpu, &opts).expect("single-process run")
}

/// Says why `test` cannot run here (missing mpirun, root or network namespaces), visibly:
/// straight to the stderr handle, which libtest does not capture. Under `MOE_REQUIRE_MPI=1`
/// (set by `.ci/run`, whose machine has everything) a skip is a failure instead, so a broken
/// set-up cannot turn the multi-process tests into silent passes.
pub fn skip(test: &str, reason: &str) {
    use std::io::Write;
    if std::env::var("MOE_REQUIRE_MPI").as_deref() == Ok("1") {
        panic!("{test} must run (MOE_REQUIRE_MPI=1) but cannot: {reason}");
    }
    let _ = writeln!(std::io::stderr(), "\nSKIPPED {test}: {reason}");
}

/// `(step, loss)` pairs of the train records in a run's `metrics.jsonl`.
pub fn read_losses(out_dir: &Path) -> Vec<(u64, f64)> {
    let text = std::fs::read_to_string(out_dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| {
            (
                v["step"].as_u64().unwrap_or(0),
                v["loss"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect()
}
