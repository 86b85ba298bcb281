//! Short runs need one flag: `--set trainer.max_steps=5` shortens the warmup to fit, and
//! `--set trainer.lr=1e-4` lowers `min_lr` to `lr`, each with one warning line (as
//! Megatron-LM and torchtitan do) instead of refusing the config.

use moe_trainer::config::ExperimentConfig;

/// Clamps `trainer.warmup_steps` to `trainer.max_steps` and `trainer.min_lr` to `trainer.lr`;
/// returns one warning per value changed. Values the rules reject for other reasons (a NaN,
/// a negative lr) are left for validation to report.
pub fn fit_schedule(cfg: &mut ExperimentConfig) -> Vec<String> {
    let t = &mut cfg.trainer;
    let mut warnings = Vec::new();
    if t.max_steps > 0 && t.warmup_steps > t.max_steps {
        warnings.push(format!(
            "trainer.warmup_steps ({}) > trainer.max_steps ({}): warming up over all {} steps",
            t.warmup_steps, t.max_steps, t.max_steps
        ));
        t.warmup_steps = t.max_steps;
    }
    if t.lr.is_finite() && t.lr >= 0.0 && t.min_lr.is_finite() && t.min_lr > t.lr {
        warnings.push(format!(
            "trainer.min_lr ({}) > trainer.lr ({}): using trainer.min_lr = {} (no decay after \
             warmup)",
            t.min_lr, t.lr, t.lr
        ));
        t.min_lr = t.lr;
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamps_warmup_and_min_lr_once_each() {
        let mut cfg = ExperimentConfig::default();
        cfg.trainer.max_steps = 5;
        cfg.trainer.warmup_steps = 20;
        cfg.trainer.lr = 1e-4;
        cfg.trainer.min_lr = 3e-4;
        let w = fit_schedule(&mut cfg);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].starts_with("trainer.warmup_steps (20) > trainer.max_steps (5)"));
        assert!(w[1].starts_with("trainer.min_lr (0.0003) > trainer.lr (0.0001)"));
        assert_eq!(cfg.trainer.warmup_steps, 5);
        assert_eq!(cfg.trainer.min_lr, 1e-4);
        assert!(cfg.validate(1).is_empty(), "{:?}", cfg.validate(1));
        assert!(fit_schedule(&mut cfg).is_empty());
    }

    #[test]
    fn leaves_invalid_values_to_validation() {
        let mut cfg = ExperimentConfig::default();
        cfg.trainer.max_steps = 0;
        cfg.trainer.lr = f64::NAN;
        assert!(fit_schedule(&mut cfg).is_empty());
        assert_eq!(
            cfg.trainer.warmup_steps,
            ExperimentConfig::default().trainer.warmup_steps
        );
    }
}
