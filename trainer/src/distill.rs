//! Recovery by knowledge distillation (Hinton et al. 2015, "Distilling the Knowledge in a
//! Neural Network"): with `trainer.distill`, each micro-batch's loss gains
//! `alpha * T^2 * KL(p_teacher || p_student)`, `p = softmax(logits / T)`, averaged over
//! positions. The T^2 keeps the term's gradient scale independent of T (the soft targets'
//! gradients scale as 1/T^2).
//!
//! The teacher is a whole checkpoint loaded once per rank as one process (every expert local,
//! no all-to-all), so it runs on the same batch in the same process whatever the
//! student's EP size, forward only under no-grad. The training loop calls [`Distiller::term`]
//! where it sums the loss, and [`Distiller::global_step_term`] for the metrics.

use crate::checkpoint::{find_latest_intact, read_manifest};
use crate::config::{DistillConfig, ExperimentConfig};
use crate::inference::load_single;
use crate::{Result, TrainError};
use moe_comm::{lock, ProcessGroups};
use moe_model::transformer::{LmForward, TransformerLm};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// `KL(softmax(t / T) || softmax(s / T))` per position, averaged over positions, in f32 (f64
/// for f64 logits). Not scaled by alpha or T^2.
///
/// # Shapes
/// `teacher_btv`, `student_btv` `[b, t, v]` (any leading shape) -> scalar
pub fn distill_kl(teacher_btv: &Tensor, student_btv: &Tensor, temperature: f64) -> Result<Tensor> {
    if teacher_btv.size() != student_btv.size() {
        return Err(TrainError::Other(format!(
            "teacher logits {:?} and student logits {:?} differ in shape",
            teacher_btv.size(),
            student_btv.size()
        )));
    }
    let kind = student_btv.kind();
    let log_p_t = teacher_btv
        .f_to_kind(kind)?
        .f_div_scalar(temperature)?
        .f_log_softmax(-1, kind)?;
    let log_p_s = student_btv
        .f_div_scalar(temperature)?
        .f_log_softmax(-1, kind)?;
    let kl = log_p_t
        .f_exp()?
        .f_mul(&log_p_t.f_sub(&log_p_s)?)?
        .f_sum_dim_intlist(-1, false, kind)?;
    Ok(kl.f_mean(kind)?)
}

/// The teacher checkpoint `path` names: a `step-N/` directory, or the newest intact one of a
/// run directory (or of its `checkpoints/`).
fn resolve_teacher(path: &Path) -> Result<PathBuf> {
    let bad = |msg: String| TrainError::Config(vec![format!("trainer.distill.teacher {msg}")]);
    if path.join("manifest.json").is_file() {
        return Ok(path.to_path_buf());
    }
    for dir in [path.join("checkpoints"), path.to_path_buf()] {
        if dir.is_dir() {
            if let Some((p, _)) = find_latest_intact(&dir).map_err(|e| bad(e.to_string()))? {
                return Ok(p);
            }
        }
    }
    Err(bad(format!(
        "({}): not a checkpoint, nor a run directory holding one",
        path.display()
    )))
}

/// A teacher model and its settings, loaded once per rank.
pub struct Distiller {
    teacher: TransformerLm,
    compute_kind: Kind,
    alpha: f64,
    temperature: f64,
    /// f64 scalar on the device: this step's term (detached), mean over micro-batches.
    step_term: Tensor,
}

impl Distiller {
    /// The teacher of `cfg.trainer.distill` on `device`, or `None` without one. Errors (bad
    /// input, exit 2) name `trainer.distill.teacher`: no checkpoint there, another
    /// vocabulary, or weights that do not load.
    pub fn from_config(cfg: &ExperimentConfig, device: Device) -> Result<Option<Self>> {
        let Some(dc) = &cfg.trainer.distill else {
            return Ok(None);
        };
        Self::new(dc, cfg, device).map(Some)
    }

    fn new(dc: &DistillConfig, student: &ExperimentConfig, device: Device) -> Result<Self> {
        let path = resolve_teacher(&dc.teacher)?;
        let bad = |msg: String| {
            TrainError::Config(vec![format!(
                "trainer.distill.teacher ({}): {msg}",
                path.display()
            )])
        };
        let manifest = read_manifest(&path).map_err(|e| bad(e.to_string()))?;
        let mut tcfg: ExperimentConfig = serde_json::from_str(&manifest.config_yaml)
            .map_err(|e| bad(format!("the stored config does not parse: {e}")))?;
        let (tv, sv) = (tcfg.model.vocab_size, student.model.vocab_size);
        if tv != sv {
            return Err(bad(format!(
                "the teacher's vocabulary (model.vocab_size {tv}) is not the student's \
                 (model.vocab_size {sv}); distillation compares logits token by token"
            )));
        }
        tcfg.parallel.ep_size = 1;
        let (teacher, _) = load_single(&tcfg, &path, device).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            teacher,
            compute_kind: crate::inference::compute_kind(&student.trainer.precision),
            alpha: dc.alpha,
            temperature: dc.temperature,
            step_term: Tensor::f_zeros([], (Kind::Double, device))?,
        })
    }

    /// `alpha * T^2 * KL(teacher || student)` for micro-batch `micro` of `n_micro` (with
    /// grad into the student's logits); also added, detached and divided by `n_micro`, to
    /// this step's term (reset at micro-batch 0).
    ///
    /// # Shapes
    /// `inputs_bt` int64 `[b, t]`, `student_btv` `[b, t, v]` -> scalar
    pub fn term(
        &mut self,
        micro: usize,
        n_micro: f64,
        inputs_bt: &Tensor,
        student_btv: &Tensor,
    ) -> Result<Tensor> {
        let teacher_btv = {
            let _guard = tch::no_grad_guard();
            let ctx = LmForward {
                train: false,
                compute_kind: self.compute_kind,
                step: 0,
            };
            self.teacher.forward(inputs_bt, &ctx)?.logits_btv
        };
        let t = self.temperature;
        let term = distill_kl(&teacher_btv, student_btv, t)?.f_mul_scalar(self.alpha * t * t)?;
        let part = term
            .f_detach()?
            .f_to_kind(Kind::Double)?
            .f_div_scalar(n_micro)?;
        self.step_term = if micro == 0 {
            part
        } else {
            self.step_term.f_add(&part)?
        };
        Ok(term)
    }

    /// This step's term averaged over all ranks (one small all-reduce and a host read).
    /// Collective: every rank calls it at the same step.
    pub fn global_step_term(&self, groups: &ProcessGroups) -> Result<f64> {
        let summed = lock(&groups.world)?.all_reduce_sum(&self.step_term.f_reshape([1])?)?;
        let v = moe_comm::host_read::<f64>(&summed)?;
        Ok(v.first().copied().unwrap_or(f64::NAN) / groups.world_size as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two positions over a vocabulary of 3, T = 2, by hand in f64:
    /// position 0: teacher [2, 0, 0] / 2 = [1, 0, 0] -> p = [e, 1, 1] / (e + 2);
    ///             student [0, 0, 0] -> q = [1/3, 1/3, 1/3];
    ///             KL = sum p log(p / q) = sum p log p + log 3.
    /// position 1: equal logits -> KL = 0.
    /// Mean over the two positions; exact to 1e-12 (f64 with a handful of operations).
    #[test]
    fn kl_by_hand() {
        let e = std::f64::consts::E;
        let p = [e / (e + 2.0), 1.0 / (e + 2.0), 1.0 / (e + 2.0)];
        let kl0: f64 = p.iter().map(|x| x * x.ln()).sum::<f64>() + 3f64.ln();
        let want = kl0 / 2.0;
        let t = Tensor::from_slice(&[2f64, 0., 0., 1., 2., 3.]).reshape([1, 2, 3]);
        let s = Tensor::from_slice(&[0f64, 0., 0., 1., 2., 3.]).reshape([1, 2, 3]);
        let got = distill_kl(&t, &s, 2.0).unwrap().double_value(&[]);
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // KL of identical distributions is 0; KL is not symmetric.
        assert!(distill_kl(&t, &t, 1.0).unwrap().double_value(&[]).abs() < 1e-12);
        let back = distill_kl(&s, &t, 2.0).unwrap().double_value(&[]);
        assert!((back - want).abs() > 1e-6);
        assert!(distill_kl(&t, &s.reshape([2, 3]), 1.0).is_err());
    }

    /// The gradient wrt the student's logits of T^2 * KL is (q - p) * T / positions (softmax
    /// cross-entropy's gradient, scaled by T^2 / T); checked at one coordinate by hand.
    #[test]
    fn gradient_by_hand() {
        let t = Tensor::from_slice(&[2f64, 0., 0.]).reshape([1, 1, 3]);
        let s = Tensor::from_slice(&[0f64, 0., 0.])
            .reshape([1, 1, 3])
            .set_requires_grad(true);
        let temp = 2.0;
        let loss = distill_kl(&t, &s, temp).unwrap() * (temp * temp);
        loss.backward();
        let g = Vec::<f64>::try_from(s.grad().reshape([-1])).unwrap();
        let e = std::f64::consts::E;
        let p0 = e / (e + 2.0);
        let want0 = (1.0 / 3.0 - p0) * temp;
        assert!((g[0] - want0).abs() < 1e-12, "{g:?}");
    }
}
