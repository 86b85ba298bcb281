//! Learning-rate schedule: linear warmup then cosine decay (Loshchilov & Hutter 2017,
//! "SGDR", without restarts), as nanoGPT's `get_lr`.
//!
//! Step `s` (0-based) below `warmup_steps` uses `lr * (s + 1) / warmup_steps`, so the first
//! step already moves and step `warmup_steps - 1` uses the peak. From `warmup_steps` on, the
//! rate follows a half cosine from `lr` down to `min_lr`, which the last step
//! (`max_steps - 1`) uses; later steps stay at `min_lr`.

use crate::config::TrainerConfig;

/// Learning rate of optimizer step `step` (0-based).
pub fn lr_at(step: u64, cfg: &TrainerConfig) -> f64 {
    let (lr, min_lr, warmup) = (cfg.lr, cfg.min_lr, cfg.warmup_steps);
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let last = cfg.max_steps.saturating_sub(1);
    if last <= warmup {
        // No step left to decay over (e.g. a 1-step run): the peak, not the floor.
        return if step > last { min_lr } else { lr };
    }
    let progress = ((step - warmup) as f64 / (last - warmup) as f64).min(1.0);
    min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(warmup: u64, max_steps: u64) -> TrainerConfig {
        TrainerConfig {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: warmup,
            max_steps,
            ..TrainerConfig::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-15
    }

    /// Warmup values by hand: lr * 1/4, 2/4, 3/4, 4/4.
    #[test]
    fn warmup_is_linear_and_reaches_peak() {
        let c = cfg(4, 104);
        for (s, want) in [(0, 2.5e-4), (1, 5e-4), (2, 7.5e-4), (3, 1e-3)] {
            assert!(close(lr_at(s, &c), want), "step {s}: {}", lr_at(s, &c));
        }
    }

    /// Cosine endpoints and midpoint: steps 4..=104 decay over 100 steps; step 54 is half
    /// way, where cos(pi/2) = 0 gives (lr + min_lr) / 2 = 5.5e-4; step 29 is a quarter,
    /// min_lr + 0.45e-3 * (1 + cos(pi/4)).
    #[test]
    fn cosine_endpoints_and_midpoint() {
        let c = cfg(4, 105);
        assert!(close(lr_at(4, &c), 1e-3));
        assert!(close(lr_at(54, &c), 5.5e-4), "{}", lr_at(54, &c));
        let quarter = 1e-4 + 0.45e-3 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        assert!(close(lr_at(29, &c), quarter), "{}", lr_at(29, &c));
        assert!(close(lr_at(104, &c), 1e-4), "{}", lr_at(104, &c));
        assert!(close(lr_at(500, &c), 1e-4));
        // Monotone non-increasing after the peak.
        assert!((4..104).all(|s| lr_at(s + 1, &c) <= lr_at(s, &c)));
    }

    #[test]
    fn no_warmup_and_degenerate_runs() {
        let c = cfg(0, 11);
        assert!(close(lr_at(0, &c), 1e-3));
        assert!(close(lr_at(5, &c), 5.5e-4));
        assert!(close(lr_at(10, &c), 1e-4));
        // A single step, or warmup covering the whole run: the peak, never 0 or NaN.
        assert!(close(lr_at(0, &cfg(0, 1)), 1e-3));
        assert!(close(lr_at(4, &cfg(5, 5)), 1e-3));
    }
}
