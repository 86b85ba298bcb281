//! A checkpoint that does not fit the model a `--config` describes: the message leads with
//! the config keys that differ (`model.d_model: checkpoint 128, config 96`), which is what the
//! user has to change, and then shows at most a few of the tensors that do not fit. One
//! message for `moe eval --config` and for `moe train --resume` / `--init-from`.

use crate::exit_code::BadInput;
use moe_trainer::checkpoint::read_manifest;
use moe_trainer::config::ExperimentConfig;
use moe_trainer::TrainError;
use serde_json::Value;

/// The closing hint of `moe eval --config`.
pub const EVAL_HINT: &str = "(without --config, moe eval uses the config stored in the checkpoint)";

/// The closing hint of `moe train --resume` / `--init-from`.
pub const TRAIN_HINT: &str = "(--resume and --init-from need the model the checkpoint holds: \
     set these keys back, or train a new run without them)";

/// Tensor lines kept after the differing keys.
const MAX_TENSOR_LINES: usize = 3;

/// The `model.*` and `moe.*` keys whose values differ between the config stored in the
/// checkpoint (`saved_json`, the manifest's `config_yaml`) and `cfg`, one line each.
pub fn differing_model_keys(saved_json: &str, cfg: &ExperimentConfig) -> Vec<String> {
    let (Ok(saved), Ok(now)) = (
        serde_json::from_str::<Value>(saved_json),
        serde_json::to_value(cfg),
    ) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for section in ["model", "moe"] {
        let (Some(Value::Object(a)), Some(Value::Object(b))) =
            (saved.get(section), now.get(section))
        else {
            continue;
        };
        for (key, old) in a {
            let new = b.get(key).unwrap_or(&Value::Null);
            if old != new {
                out.push(format!("{section}.{key}: checkpoint {old}, config {new}"));
            }
        }
    }
    out
}

/// The error of loading a checkpoint into the model of `--config`: for a shape mismatch
/// ("does not fit the model" with one line per tensor), the differing keys first and at most
/// [`MAX_TENSOR_LINES`] tensors, then `hint`; any other error (a truncated file, say) as it
/// is.
pub fn explain(err: &str, saved_json: &str, cfg: &ExperimentConfig, hint: &str) -> String {
    let Some((head, tensors)) = err.split_once("does not fit the model:") else {
        return err.to_owned();
    };
    let tensors: Vec<&str> = tensors
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let keys = differing_model_keys(saved_json, cfg);
    let mut msg = format!("{head}does not fit the model of the config");
    if !keys.is_empty() {
        msg.push_str(" (the config keys that differ from the checkpoint's):\n  ");
        msg.push_str(&keys.join("\n  "));
        msg.push_str("\ntensors that do not fit:");
    } else {
        msg.push(':');
    }
    for t in tensors.iter().take(MAX_TENSOR_LINES) {
        msg.push_str("\n  ");
        msg.push_str(t);
    }
    if tensors.len() > MAX_TENSOR_LINES {
        msg.push_str(&format!(
            "\n  ... and {} more",
            tensors.len() - MAX_TENSOR_LINES
        ));
    }
    msg.push('\n');
    msg.push_str(hint);
    msg
}

/// A trainer error as `moe train` reports it (`crate::exit_code::from_train`), with a
/// checkpoint that does not fit the model of `cfg` (`--resume`, `--init-from`) explained
/// by [`explain`].
pub fn from_train(e: TrainError, cfg: &ExperimentConfig) -> anyhow::Error {
    if let TrainError::Checkpoint { path, msg } = &e {
        if msg.contains("does not fit the model:") {
            if let Ok(manifest) = read_manifest(path) {
                let text = explain(&e.to_string(), &manifest.config_yaml, cfg, TRAIN_HINT);
                return BadInput(text).into();
            }
        }
    }
    crate::exit_code::from_train(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leads_with_keys_and_caps_tensors() {
        let mut saved = ExperimentConfig::default();
        saved.model.d_model = 128;
        let saved_json = serde_json::to_string(&saved).unwrap();
        let mut cfg = saved.clone();
        cfg.model.d_model = 96;
        let err = "checkpoint c/step-1: does not fit the model:\n  a: [1]\n  b: [2]\n  c: [3]\n  d: [4]\n  e: [5]";
        let msg = explain(err, &saved_json, &cfg, EVAL_HINT);
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(
            lines[1], "  model.d_model: checkpoint 128, config 96",
            "{msg}"
        );
        assert_eq!(lines[2], "tensors that do not fit:");
        assert_eq!(&lines[3..6], ["  a: [1]", "  b: [2]", "  c: [3]"]);
        assert_eq!(lines[6], "  ... and 2 more");
        assert_eq!(lines.len(), 8, "{msg}");
        // A truncated file is not a config problem: no hint.
        let trunc = "checkpoint c/step-1: dense.safetensors is truncated";
        assert_eq!(explain(trunc, &saved_json, &cfg, EVAL_HINT), trunc);
    }
}
