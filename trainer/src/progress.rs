//! Rank 0's progress line. On a terminal it is one live line redrawn in place (`\r` and
//! "erase line"); otherwise (a log file, CI) every update is a plain line of its own.

use crate::metrics::TrainRecord;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// What one progress line shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProgressInfo {
    /// Optimizer steps completed.
    pub step: u64,
    /// `trainer.max_steps`.
    pub max_steps: u64,
    /// Total loss (LM + aux + z).
    pub loss: f64,
    /// Load-balancing loss.
    pub aux_loss: f64,
    /// Router z-loss.
    pub z_loss: f64,
    /// Fraction of assignments dropped by capacity.
    pub dropped_frac: f64,
    /// max / mean expert load of the worst layer.
    pub load_imbalance: f64,
    /// Global tokens per second.
    pub tokens_per_s: f64,
    /// Learning rate.
    pub lr: f64,
    /// Seconds since the run (this invocation) started.
    pub elapsed_s: f64,
    /// Estimated seconds to `max_steps`; `None` prints `--`.
    pub eta_s: Option<f64>,
}

impl ProgressInfo {
    /// From a train record. The ETA assumes every completed step ran in this invocation;
    /// after a resume [`Progress::update`] replaces it with the rate it observes itself.
    pub fn from_record(r: &TrainRecord, max_steps: u64, elapsed: Duration) -> Self {
        let elapsed_s = elapsed.as_secs_f64();
        let eta_s = (r.step > 0)
            .then(|| elapsed_s / r.step as f64 * max_steps.saturating_sub(r.step) as f64);
        Self {
            step: r.step,
            max_steps,
            loss: r.loss,
            aux_loss: r.aux_loss,
            z_loss: r.z_loss,
            dropped_frac: r.dropped_frac,
            load_imbalance: r.load_imbalance,
            tokens_per_s: r.tokens_per_s,
            lr: r.lr,
            elapsed_s,
            eta_s,
        }
    }
}

/// The progress line, without any terminal control characters.
pub fn format_progress(p: &ProgressInfo) -> String {
    let width = p.max_steps.to_string().len();
    format!(
        "step {:>width$}/{} | loss {:.4} | aux {:.4} | z {:.4} | drop {:.2}% | imb {:.2} | {} tok/s | lr {:.2e} | eta {}",
        p.step,
        p.max_steps,
        p.loss,
        p.aux_loss,
        p.z_loss,
        100.0 * p.dropped_frac,
        p.load_imbalance,
        format_rate(p.tokens_per_s),
        p.lr,
        p.eta_s.map(format_duration).unwrap_or_else(|| "--".into()),
    )
}

/// `950`, `12.3k`, `4.56M`.
pub fn format_rate(v: f64) -> String {
    if !v.is_finite() {
        "--".into()
    } else if v < 1e3 {
        format!("{v:.0}")
    } else if v < 1e6 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{:.2}M", v / 1e6)
    }
}

/// `42s`, `3m07s`, `2h05m`.
pub fn format_duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--".into();
    }
    let s = secs.round() as u64;
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

/// Prints `line` to stdout, ignoring output errors: `moe train | head -1` closes the pipe, and
/// training must go on (metrics, checkpoints) when nobody reads its stdout.
pub fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints progress lines to stdout. Output errors (a closed pipe) are ignored: progress
/// must never stop training.
#[derive(Debug)]
pub struct Progress {
    max_steps: u64,
    live: bool,
    /// The line on screen, redrawn after a message.
    current: Option<String>,
    /// First (step, elapsed) seen, for a rate that is right after a resume.
    first: Option<(u64, f64)>,
}

impl Progress {
    /// Live (`Some(true)`) or plain (`Some(false)`) lines; `None`: a live line when stdout
    /// is a terminal, plain lines otherwise.
    pub fn new(max_steps: u64, live: Option<bool>) -> Self {
        Self::with_mode(
            max_steps,
            live.unwrap_or_else(|| std::io::stdout().is_terminal()),
        )
    }

    /// Forces live (`true`) or plain (`false`) output.
    pub fn with_mode(max_steps: u64, live: bool) -> Self {
        Self {
            max_steps,
            live,
            current: None,
            first: None,
        }
    }

    /// Shows `info` (its `max_steps` is replaced by this progress's).
    pub fn update(&mut self, info: &ProgressInfo) {
        let line = self.line_for(info);
        let mut out = std::io::stdout().lock();
        let _ = if self.live {
            write!(out, "\r\x1b[2K{line}")
        } else {
            writeln!(out, "{line}")
        };
        let _ = out.flush();
        self.current = Some(line);
    }

    /// The line for `info`, with the ETA from the rate seen since the first update (so a
    /// resumed run, whose step count includes steps run earlier, still gets it right).
    fn line_for(&mut self, info: &ProgressInfo) -> String {
        let mut info = ProgressInfo {
            max_steps: self.max_steps,
            ..info.clone()
        };
        match self.first {
            Some((s0, t0)) if info.step > s0 => {
                let per_step = (info.elapsed_s - t0) / (info.step - s0) as f64;
                info.eta_s = Some(per_step * self.max_steps.saturating_sub(info.step) as f64);
            }
            Some(_) => {}
            None => self.first = Some((info.step, info.elapsed_s)),
        }
        format_progress(&info)
    }

    /// Prints a line of its own (an eval result, a warning) without breaking the live line.
    pub fn message(&mut self, msg: &str) {
        let mut out = std::io::stdout().lock();
        if self.live {
            let _ = write!(out, "\r\x1b[2K{msg}\n");
            if let Some(line) = &self.current {
                let _ = write!(out, "{line}");
            }
        } else {
            let _ = writeln!(out, "{msg}");
        }
        let _ = out.flush();
    }

    /// Ends the live line so later output starts on a fresh line.
    pub fn finish(&mut self) {
        if self.live && self.current.take().is_some() {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out);
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_every_field() {
        let p = ProgressInfo {
            step: 42,
            max_steps: 200,
            loss: 2.345_67,
            aux_loss: 0.010_24,
            z_loss: 0.000_31,
            dropped_frac: 0.0125,
            load_imbalance: 1.337,
            tokens_per_s: 12_345.0,
            lr: 0.003,
            elapsed_s: 10.0,
            eta_s: Some(65.0),
        };
        assert_eq!(
            format_progress(&p),
            "step  42/200 | loss 2.3457 | aux 0.0102 | z 0.0003 | drop 1.25% | imb 1.34 | \
             12.3k tok/s | lr 3.00e-3 | eta 1m05s"
        );
        let p = ProgressInfo {
            eta_s: None,
            tokens_per_s: 2.5e6,
            ..p
        };
        assert!(format_progress(&p).ends_with("2.50M tok/s | lr 3.00e-3 | eta --"));
    }

    #[test]
    fn durations_and_rates() {
        assert_eq!(format_duration(42.4), "42s");
        assert_eq!(format_duration(187.0), "3m07s");
        assert_eq!(format_duration(7500.0), "2h05m");
        assert_eq!(format_duration(f64::NAN), "--");
        assert_eq!(format_rate(950.2), "950");
        assert_eq!(format_rate(f64::INFINITY), "--");
    }

    /// 50 steps in 100 s -> 2 s/step; 150 steps left -> 300 s.
    #[test]
    fn eta_from_record() {
        let r = TrainRecord {
            step: 50,
            ..Default::default()
        };
        let p = ProgressInfo::from_record(&r, 200, Duration::from_secs(100));
        assert_eq!(p.eta_s, Some(300.0));
        let r0 = TrainRecord {
            step: 0,
            ..Default::default()
        };
        assert_eq!(
            ProgressInfo::from_record(&r0, 200, Duration::from_secs(1)).eta_s,
            None
        );
    }

    /// Resumed at step 100: the first update (step 110 after 30 s) keeps the record's
    /// estimate; the second (step 120 after 50 s) uses 20 s / 10 steps = 2 s/step, 80 left.
    #[test]
    fn eta_after_resume_uses_observed_rate() {
        let mut prog = Progress::with_mode(200, false);
        let info = |step, secs: f64| ProgressInfo {
            step,
            elapsed_s: secs,
            eta_s: Some(1.0),
            ..Default::default()
        };
        assert!(prog.line_for(&info(110, 30.0)).ends_with("eta 1s"));
        assert!(prog.line_for(&info(120, 50.0)).ends_with("eta 2m40s"));
    }
}
