//! What a run reports, from world rank 0: `metrics.jsonl`, TensorBoard events, progress lines
//! and, in debug mode, per-layer router statistics. It decides for itself which steps it logs
//! (every `trainer.log_every`, the last, and every step in debug mode).

use super::step::AppliedStep;
use super::RunOptions;
use crate::config::ExperimentConfig;
use crate::metrics::{EvalRecord, MetricsWriter, TrainRecord};
use crate::progress::{Progress, ProgressInfo};
use crate::tensorboard::TbWriter;
use crate::{Result, TrainError};
use moe_comm::{host_read, ProcessGroups};
use moe_model::moe_layer::MoeStats;
use std::path::Path;
use std::time::Instant;
use tch::Tensor;

/// The run's metrics, TensorBoard and progress output.
pub(super) struct Logger {
    /// metrics.jsonl (world rank 0 only).
    metrics: Option<MetricsWriter>,
    /// TensorBoard events (world rank 0 only).
    tb: Option<TbWriter>,
    progress: Progress,
    /// World rank 0 of a run that is not quiet.
    printing: bool,
    debug: bool,
    log_every: u64,
    max_steps: u64,
    /// Tokens of one optimizer step over all ranks.
    tokens_per_step: f64,
    run_start: Instant,
    /// Throughput is measured over the steps since the last logged one.
    window_start: Instant,
    window_tokens: f64,
}

impl Logger {
    /// On world rank 0: creates `run.out_dir`, writes `config.yaml`, and (on resume, after
    /// `start_step`) cuts what an interrupted run logged beyond its checkpoint.
    pub fn open(
        cfg: &ExperimentConfig,
        groups: &ProcessGroups,
        opts: &RunOptions,
        start_step: u64,
    ) -> Result<Self> {
        let t = &cfg.trainer;
        let out_dir = &cfg.run.out_dir;
        let mut metrics = None;
        let mut tb = None;
        if groups.world_rank == 0 {
            std::fs::create_dir_all(out_dir).map_err(|e| TrainError::io(out_dir, e))?;
            if let Some(yaml) = &opts.config_yaml {
                write_atomic(&out_dir.join("config.yaml"), yaml)?;
            }
            if start_step > 0 {
                truncate_metrics(&out_dir.join(crate::metrics::METRICS_FILE), start_step)?;
                crate::tensorboard_truncate::truncate_events(out_dir, start_step)?;
            }
            metrics = Some(MetricsWriter::open(out_dir, start_step > 0)?);
            tb = Some(TbWriter::new(out_dir)?);
        }
        let global_batch = t.batch_size * groups.world_size as i64 * t.grad_accum;
        Ok(Self {
            metrics,
            tb,
            progress: Progress::new(t.max_steps, opts.live_progress),
            printing: groups.world_rank == 0 && !opts.quiet,
            debug: opts.debug,
            log_every: t.log_every,
            max_steps: t.max_steps,
            tokens_per_step: (global_batch * cfg.data.seq_len) as f64,
            run_start: Instant::now(),
            window_start: Instant::now(),
            window_tokens: 0.0,
        })
    }

    /// Starts the run's clock (elapsed time and throughput) as the first step begins.
    pub fn start_clock(&mut self) {
        self.run_start = Instant::now();
        self.window_start = Instant::now();
        self.window_tokens = 0.0;
    }

    /// The record of applied step `done` (1-based) at learning rate `lr`; written out, with
    /// the throughput since the last logged step, when the step is one to log.
    pub fn log_step(&mut self, done: u64, s: &AppliedStep, lr: f64) -> Result<TrainRecord> {
        self.window_tokens += self.tokens_per_step;
        let g = &s.stats;
        let mut record = TrainRecord {
            step: done,
            loss: g.lm_loss + g.aux_loss + g.z_loss + s.distill_loss.unwrap_or(0.0),
            distill_loss: s.distill_loss,
            lm_loss: g.lm_loss,
            aux_loss: g.aux_loss,
            z_loss: g.z_loss,
            dropped_frac: g.dropped_frac(),
            load_imbalance: g.load_imbalance,
            grad_norm: s.grad_norm,
            lr,
            tokens_per_s: 0.0,
            elapsed_s: self.run_start.elapsed().as_secs_f64(),
        };
        if !due(done, self.log_every, self.max_steps, self.debug) {
            return Ok(record);
        }
        let secs = self.window_start.elapsed().as_secs_f64().max(1e-9);
        record.tokens_per_s = self.window_tokens / secs;
        self.window_start = Instant::now();
        self.window_tokens = 0.0;
        if let Some(m) = self.metrics.as_mut() {
            m.write_train(&record)?;
        }
        if let Some(tb) = self.tb.as_mut() {
            log_tensorboard(tb, &record, &s.layers)?;
        }
        if self.printing {
            self.progress.update(&ProgressInfo::from_record(
                &record,
                self.max_steps,
                self.run_start.elapsed(),
            ));
            if self.debug {
                print_router_stats(&s.layers)?;
            }
        }
        Ok(record)
    }

    /// A validation result.
    pub fn log_eval(&mut self, rec: &EvalRecord) -> Result<()> {
        if let Some(m) = self.metrics.as_mut() {
            m.write_eval(rec)?;
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.scalar("val/loss", rec.step as i64, rec.val_loss as f32)?;
            tb.flush()?;
        }
        self.message(&format!(
            "step {}: val_loss {:.4} (ppl {:.2})",
            rec.step, rec.val_loss, rec.val_ppl
        ));
        Ok(())
    }

    /// Step `step` (1-based) was skipped for a non-finite `what`, the `in_a_row`-th in a row.
    pub fn bad_step(&self, step: u64, what: &str, in_a_row: u64, diagnostic: &str) {
        if self.printing {
            eprintln!("step {step}: non-finite {what} (skipped; {in_a_row} in a row){diagnostic}");
        }
    }

    /// A line between progress updates.
    pub fn message(&mut self, msg: &str) {
        if self.printing {
            self.progress.message(msg);
        }
    }

    /// Flushes the events and ends the progress display.
    pub fn finish(&mut self) -> Result<()> {
        if let Some(tb) = self.tb.as_mut() {
            tb.flush()?;
        }
        if self.printing {
            self.progress.finish();
        }
        Ok(())
    }
}

/// Whether step `done` (1-based) is logged: every `every` steps, the last step `max_steps`,
/// and every step in debug mode.
fn due(done: u64, every: u64, max_steps: u64, debug: bool) -> bool {
    done.is_multiple_of(every) || done == max_steps || debug
}

fn log_tensorboard(tb: &mut TbWriter, r: &TrainRecord, layers: &[(i64, MoeStats)]) -> Result<()> {
    let s = r.step as i64;
    for (tag, v) in [
        ("train/loss", r.loss),
        ("train/lm_loss", r.lm_loss),
        ("train/aux_loss", r.aux_loss),
        ("train/z_loss", r.z_loss),
        ("train/dropped_frac", r.dropped_frac),
        ("train/load_imbalance", r.load_imbalance),
        ("train/grad_norm", r.grad_norm),
        ("train/lr", r.lr),
        ("train/tokens_per_s", r.tokens_per_s),
    ] {
        tb.scalar(tag, s, v as f32)?;
    }
    for (layer, st) in layers {
        // At log steps only: one read per MoE layer for the per-expert load plots.
        let load = host_read::<f64>(&st.load_e)?;
        let total: f64 = load.iter().sum::<f64>().max(1.0);
        for (e, l) in load.iter().enumerate() {
            tb.scalar(
                &format!("moe/layer{layer:02}/expert_load/e{e:03}"),
                s,
                (l / total) as f32,
            )?;
        }
    }
    tb.flush()
}

fn print_router_stats(layers: &[(i64, MoeStats)]) -> Result<()> {
    for (layer, st) in layers {
        // Debug mode only.
        let load = host_read::<f64>(&st.load_e)?;
        let mean = load.iter().sum::<f64>() / load.len().max(1) as f64;
        let max = load.iter().cloned().fold(0.0, f64::max);
        let min = load.iter().cloned().fold(f64::INFINITY, f64::min);
        // host: debug-mode statistics only.
        let counts = host_read::<i64>(&Tensor::f_stack(&[&st.num_kept, &st.num_dropped], 0)?)?;
        let (kept, dropped) = (counts[0], counts[1]);
        let assigned = (kept + dropped).max(1) as f64;
        crate::progress::print_line(&format!(
            "  layer {layer:2}: load min {min:.0} mean {mean:.1} max {max:.0} (imbalance {:.2}), dropped {:.2}% (rank 0), aux {:.5}, z {:.5}",
            if mean > 0.0 { max / mean } else { 0.0 },
            100.0 * dropped as f64 / assigned,
            host_read::<f64>(&st.aux_loss)?[0],
            host_read::<f64>(&st.z_loss)?[0],
        ));
    }
    Ok(())
}

/// Writes `text` to `path` through a temp file and a rename, so a reader never sees half.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| TrainError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
}

/// A resumed run re-logs the steps after its checkpoint: drop the lines the interrupted run
/// wrote beyond `step` (and a torn last line of a killed writer), so each step appears once.
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(TrainError::io(path, e)),
    };
    let kept: String = text
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v.get("step").and_then(serde_json::Value::as_u64))
                .is_some_and(|s| s <= step)
        })
        .collect();
    if kept.len() != text.len() {
        write_atomic(path, &kept)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn logs_every_n_steps_the_last_and_every_step_in_debug_mode() {
        let at =
            |every, debug| -> Vec<u64> { (1..=10).filter(|&d| due(d, every, 10, debug)).collect() };
        assert_eq!(at(4, false), [4, 8, 10]);
        assert_eq!(at(1, false).len(), 10);
        assert_eq!(at(4, true).len(), 10);
    }
}
