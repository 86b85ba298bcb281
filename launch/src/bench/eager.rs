//! The PyTorch eager twin of `moe bench train`'s dense model (issue 13, item 5):
//! `scripts/eager_dense.py` builds the same block stack in PyTorch from the same initial
//! weights and trains it on the same batches with the same optimizer settings, so the step
//! times compare like for like; the losses of every step show that it is the same model.

use anyhow::{anyhow, bail, Context};
use moe_trainer::config::ExperimentConfig;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::Tensor;

/// The script, relative to the repository root (where `moe bench` runs).
pub const SCRIPT: &str = "scripts/eager_dense.py";

/// The script: under the working directory, else in the source tree this binary was built
/// from.
pub fn script() -> Option<PathBuf> {
    [
        PathBuf::from(SCRIPT),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(SCRIPT),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// The Python that runs the script: `$MOE_PYTHON`, else the project's `.venv/bin/python`
/// (found like [`script`]).
pub fn python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOE_PYTHON") {
        return Some(PathBuf::from(p));
    }
    // Like `script`: under the working directory, else in the source tree.
    [
        PathBuf::from(".venv/bin/python"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
    ]
    .into_iter()
    .find(|p| p.exists())
}

/// What the eager run reports: per-step losses and the seconds of each timed step.
pub struct EagerRun {
    pub losses: Vec<f64>,
    pub forward_backward_s: Vec<f64>,
    pub optimizer_s: Vec<f64>,
    /// `fused` or `foreach`: which torch AdamW ran.
    pub adamw: String,
    pub torch: String,
}

/// Writes `dir/state.safetensors` (the parameters under moe's names, `__inputs` and
/// `__targets` `[steps, b, t]`) and `dir/dims.json` (shapes and optimizer settings).
pub fn write_state(
    dir: &Path,
    cfg: &ExperimentConfig,
    params: &[(String, Tensor, bool)],
    inputs: &[Tensor],
    targets: &[Tensor],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut named: Vec<(String, Tensor)> = params
        .iter()
        .map(|(n, t, _)| (n.clone(), t.shallow_clone()))
        .collect();
    named.push(("__inputs".into(), Tensor::f_stack(inputs, 0)?));
    named.push(("__targets".into(), Tensor::f_stack(targets, 0)?));
    Tensor::write_safetensors(&named, dir.join("state.safetensors"))?;
    let (m, t) = (&cfg.model, &cfg.trainer);
    let dims = serde_json::json!({
        "num_layers": m.num_layers,
        "num_heads": m.num_heads,
        "num_kv_heads": m.num_kv_heads,
        "head_dim": m.head_dim(),
        "max_seq_len": m.max_seq_len,
        "rope_theta": m.rope_theta,
        "norm_eps": m.norm_eps,
        "lr": t.lr,
        "beta1": t.beta1,
        "beta2": t.beta2,
        "eps": t.eps,
        "weight_decay": t.weight_decay,
        "grad_clip": t.grad_clip,
        "decayed": params.iter().filter(|p| p.2).map(|p| p.0.clone()).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("dims.json"), serde_json::to_vec_pretty(&dims)?)?;
    Ok(())
}

/// Runs the script on `dir` with `threads` torch threads.
pub fn run(
    python: &Path,
    script: &Path,
    dir: &Path,
    threads: i32,
    warmup: u64,
    iters: u64,
) -> anyhow::Result<EagerRun> {
    let out = Command::new(python)
        .arg(script)
        .arg(dir)
        .args(["--threads", &threads.to_string()])
        .args(["--warmup", &warmup.to_string()])
        .args(["--iters", &iters.to_string()])
        // One OpenMP pool of `threads`, as moe's `set_threads` gives libtorch.
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()
        .with_context(|| format!("running {} {SCRIPT}", python.display()))?;
    if !out.status.success() {
        bail!(
            "{SCRIPT} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("{SCRIPT} printed no JSON"))?;
    let floats = |key: &str| -> anyhow::Result<Vec<f64>> {
        v[key]
            .as_array()
            .ok_or_else(|| anyhow!("{SCRIPT}: no {key}"))?
            .iter()
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| anyhow!("{SCRIPT}: {key} not numbers"))
            })
            .collect()
    };
    Ok(EagerRun {
        losses: floats("losses")?,
        forward_backward_s: floats("forward_backward_s")?,
        optimizer_s: floats("optimizer_s")?,
        adamw: v["adamw"].as_str().unwrap_or("?").into(),
        torch: v["torch"].as_str().unwrap_or("?").into(),
    })
}
