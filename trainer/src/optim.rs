//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), step for step
//! the update of `torch.optim.AdamW` (single-tensor, non-amsgrad path):
//!
//! ```text
//! p   <- p * (1 - lr * wd)                       (only where Param.weight_decay)
//! m   <- beta1 * m + (1 - beta1) * g
//! v   <- beta2 * v + (1 - beta2) * g^2
//! p   <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! Moments are float32 on the parameter's device whatever the parameter's kind. One step
//! counter serves every parameter (torch keeps one per parameter; they differ only for a
//! parameter that had no gradient on some steps, which gradient sync never produces).
//!
//! [`AdamW::step`] runs torch's fused multi-tensor kernel (`torch.optim.AdamW(fused=True)`,
//! one launch per group of parameters with and without weight decay) on float32 parameters;
//! [`AdamW::step_reference`] is the per-tensor loop of the formula above, kept as the
//! obviously-correct reference the fused path is tested against.

use crate::config::TrainerConfig;
use crate::{Result, TrainError};
use moe_model::Param;
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// Drops every parameter's gradient (`zero_grad(set_to_none=True)`, torch's default): the
/// next backward writes each gradient afresh where `zero_` would cost a pass over every
/// gradient and the backward another to add into it. Bit-identical updates (`0 + g == g`);
/// a parameter that gets no gradient on a step is then left alone by [`AdamW::step`] on that
/// step, as in torch.
pub fn release_grads(params: &[Param]) -> Result<()> {
    let ts: Vec<&Tensor> = params.iter().map(|p| &p.tensor).collect();
    crate::fused::set_grads_to_none(&ts)
}

/// Moments of one parameter.
#[derive(Debug)]
struct Slot {
    name: String,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW with decoupled weight decay. Parameters are matched to their state by position
/// and name: pass the same list to every call.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// Zero moments for `params`; betas, eps and weight decay from `cfg`.
    pub fn new(params: &[Param], cfg: &TrainerConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|p| {
                let opts = (Kind::Float, p.tensor.device());
                Ok(Slot {
                    name: p.name.clone(),
                    exp_avg: Tensor::f_zeros(p.tensor.size(), opts)?,
                    exp_avg_sq: Tensor::f_zeros(p.tensor.size(), opts)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            slots,
            step: 0,
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        })
    }

    /// One update with learning rate `lr` from the gradients in `params` (outside autograd),
    /// with torch's fused AdamW kernel: one call for the decayed float32 parameters, one for
    /// the others; parameters of another kind take [`AdamW::step_reference`]'s per-tensor
    /// update. Parameters whose gradient is undefined are left untouched.
    pub fn step(&mut self, params: &[Param], lr: f64) -> Result<()> {
        self.step_clipped(params, lr, None)
    }

    /// [`AdamW::step`] on the gradients times `clip_coef` (gradient-norm clipping, see
    /// [`crate::grad_sync::clip_coef`]) without a pass of its own: the fused kernel divides
    /// each gradient by `1 / clip_coef` as it reads it (torch's AMP unscale), so clipping
    /// costs no extra read and write of every gradient. The gradients are left scaled. The
    /// division by the float32 reciprocal may differ from a multiply by `clip_coef` in the
    /// last bit of a gradient.
    pub fn step_clipped(
        &mut self,
        params: &[Param],
        lr: f64,
        clip_coef: Option<f64>,
    ) -> Result<()> {
        self.check_params(params)?;
        self.step += 1;
        let mut groups: [(Vec<Tensor>, Vec<Tensor>, Vec<usize>); 2] = Default::default();
        let mut others = Vec::new();
        for (i, p) in params.iter().enumerate() {
            let grad = p.tensor.f_grad()?;
            if !grad.defined() {
                continue;
            }
            if p.tensor.kind() != Kind::Float || grad.kind() != Kind::Float {
                others.push(i);
                continue;
            }
            let g = &mut groups[usize::from(p.weight_decay && self.weight_decay != 0.0)];
            g.0.push(p.tensor.shallow_clone());
            g.1.push(grad);
            g.2.push(i);
        }
        tch::no_grad(|| -> Result<()> {
            for (decay, (ps, gs, idx)) in groups.iter().enumerate() {
                let Some(first) = ps.first() else { continue };
                let step = Tensor::f_full([], self.step as f64, (Kind::Float, first.device()))?;
                let scale = clip_coef
                    .map(|c| Tensor::f_full([], 1.0 / c, (Kind::Float, first.device())))
                    .transpose()?;
                let m: Vec<&Tensor> = idx.iter().map(|&i| &self.slots[i].exp_avg).collect();
                let v: Vec<&Tensor> = idx.iter().map(|&i| &self.slots[i].exp_avg_sq).collect();
                crate::fused::fused_adamw(
                    &ps.iter().collect::<Vec<_>>(),
                    &gs.iter().collect::<Vec<_>>(),
                    &m,
                    &v,
                    &step,
                    scale.as_ref(),
                    crate::fused::AdamWStep {
                        lr,
                        beta1: self.beta1,
                        beta2: self.beta2,
                        weight_decay: if decay == 1 { self.weight_decay } else { 0.0 },
                        eps: self.eps,
                    },
                )?;
            }
            for i in others {
                if let Some(c) = clip_coef {
                    let _ = params[i].tensor.f_grad()?.f_mul_scalar_(c)?;
                }
                self.update_one(&params[i], i, lr)?;
            }
            Ok(())
        })
    }

    /// The reference update: the per-tensor loop of the module docs' formula, about ten
    /// tensor ops per parameter. Same result as [`AdamW::step`] to float32 rounding.
    pub fn step_reference(&mut self, params: &[Param], lr: f64) -> Result<()> {
        self.check_params(params)?;
        self.step += 1;
        tch::no_grad(|| -> Result<()> {
            for (i, p) in params.iter().enumerate() {
                self.update_one(p, i, lr)?;
            }
            Ok(())
        })
    }

    /// The per-tensor AdamW update of parameter `i` at the current step (no-op without a
    /// gradient).
    fn update_one(&mut self, p: &Param, i: usize, lr: f64) -> Result<()> {
        let t = self.step as f64;
        let bias1 = 1.0 - self.beta1.powf(t);
        let bias2_sqrt = (1.0 - self.beta2.powf(t)).sqrt();
        let step_size = lr / bias1;
        let slot = &mut self.slots[i];
        let grad = p.tensor.f_grad()?;
        if !grad.defined() {
            return Ok(());
        }
        let g = grad.f_to_kind(Kind::Float)?;
        let _ = slot.exp_avg.f_lerp_(&g, 1.0 - self.beta1)?;
        let _ = slot.exp_avg_sq.f_mul_scalar_(self.beta2)?;
        let _ = slot
            .exp_avg_sq
            .f_add_(&g.f_square()?.f_mul_scalar(1.0 - self.beta2)?)?;
        let denom = slot
            .exp_avg_sq
            .f_sqrt()?
            .f_div_scalar(bias2_sqrt)?
            .f_add_scalar(self.eps)?;
        let update = slot.exp_avg.f_div(&denom)?.f_mul_scalar(step_size)?;
        let mut w = p.tensor.shallow_clone();
        if p.weight_decay && self.weight_decay != 0.0 {
            let _ = w.f_mul_scalar_(1.0 - lr * self.weight_decay)?;
        }
        let _ = w.f_sub_(&update.f_to_kind(w.kind())?)?;
        Ok(())
    }

    /// Moments named `<param>.exp_avg` and `<param>.exp_avg_sq` (shallow clones).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [
                    (format!("{}.exp_avg", s.name), s.exp_avg.shallow_clone()),
                    (
                        format!("{}.exp_avg_sq", s.name),
                        s.exp_avg_sq.shallow_clone(),
                    ),
                ]
            })
            .collect()
    }

    /// Steps taken so far (the `t` of the bias corrections).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Restores moments saved by [`AdamW::state`] (copied onto each moment's device) and
    /// the step count. Every moment must be present with its shape.
    pub fn load_state(&mut self, named: &HashMap<String, Tensor>, step: u64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for slot in &mut self.slots {
                for (suffix, dst) in [
                    ("exp_avg", &mut slot.exp_avg),
                    ("exp_avg_sq", &mut slot.exp_avg_sq),
                ] {
                    let key = format!("{}.{suffix}", slot.name);
                    let src = named.get(&key).ok_or_else(|| {
                        TrainError::Other(format!("optimizer state has no {key}"))
                    })?;
                    if src.size() != dst.size() {
                        return Err(TrainError::Other(format!(
                            "optimizer state {key} has shape {:?}, the parameter needs {:?}",
                            src.size(),
                            dst.size()
                        )));
                    }
                    dst.f_copy_(&src.f_to_kind(Kind::Float)?)?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }

    fn check_params(&self, params: &[Param]) -> Result<()> {
        let same = params.len() == self.slots.len()
            && params
                .iter()
                .zip(&self.slots)
                .all(|(p, s)| p.name == s.name && p.tensor.size() == s.exp_avg.size());
        if same {
            Ok(())
        } else {
            Err(TrainError::Other(format!(
                "AdamW::step got {} parameters that do not match the {} it was built with",
                params.len(),
                self.slots.len()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_model::ParamKind;
    use tch::Device;

    fn param(name: &str, vals: &[f32], decay: bool) -> Param {
        Param {
            name: name.into(),
            tensor: Tensor::from_slice(vals).set_requires_grad(true),
            kind: ParamKind::Dense,
            weight_decay: decay,
        }
    }

    fn set_grad(p: &Param, g: &[f32]) {
        let mut grad = p.tensor.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
        (&p.tensor * Tensor::from_slice(g))
            .sum(Kind::Float)
            .backward();
    }

    fn cfg() -> TrainerConfig {
        TrainerConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            ..TrainerConfig::default()
        }
    }

    /// The torch.optim.AdamW formula run in f64 on the host, scalar by scalar.
    fn reference(p0: f64, grads: &[f64], lr: f64, wd: f64, c: &TrainerConfig) -> f64 {
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let denom = v.sqrt() / (1.0 - c.beta2.powi(t)).sqrt() + c.eps;
            p -= lr / (1.0 - c.beta1.powi(t)) * m / denom;
        }
        p
    }

    /// The fused kernel against the per-tensor reference over 20 steps: parameters of several
    /// shapes (a scalar, a vector, a matrix, a 3-d expert stack), with and without decay, and
    /// one parameter without a gradient. 1e-6 relative (float32; the kernel and the loop round
    /// the same formula in a different order).
    #[test]
    fn fused_equals_the_per_tensor_reference_over_20_steps() {
        let make = || -> Vec<Param> {
            tch::manual_seed(11);
            let shapes: [&[i64]; 5] = [&[], &[7], &[5, 3], &[4, 6, 2], &[3]];
            shapes
                .iter()
                .enumerate()
                .map(|(i, s)| Param {
                    name: format!("p{i}"),
                    tensor: Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true),
                    kind: ParamKind::Dense,
                    weight_decay: i % 2 == 0,
                })
                .collect()
        };
        let (fused, reference) = (make(), make());
        let mut opt_f = AdamW::new(&fused, &cfg()).unwrap();
        let mut opt_r = AdamW::new(&reference, &cfg()).unwrap();
        for step in 0..20 {
            tch::manual_seed(100 + step);
            // The last parameter never gets a gradient: both paths must leave it alone.
            for (pf, pr) in fused.iter().zip(&reference).take(4) {
                let g = Tensor::randn(pf.tensor.size(), (Kind::Float, Device::Cpu));
                for p in [pf, pr] {
                    let mut grad = p.tensor.grad();
                    if grad.defined() {
                        let _ = grad.zero_();
                    }
                    (&p.tensor * &g).sum(Kind::Float).backward();
                }
            }
            let lr = 0.01 * (1.0 + step as f64 / 10.0);
            opt_f.step(&fused, lr).unwrap();
            opt_r.step_reference(&reference, lr).unwrap();
        }
        for (pf, pr) in fused.iter().zip(&reference) {
            let scale = pr.tensor.abs().max().double_value(&[]).max(1e-12);
            let diff = (&pf.tensor - &pr.tensor).abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * scale, "{}: {diff} vs scale {scale}", pf.name);
        }
        for ((n, a), (_, b)) in opt_f.state().iter().zip(opt_r.state()) {
            let scale = b.abs().max().double_value(&[]).max(1e-12);
            let diff = (a - &b).abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * scale, "{n}: {diff} vs scale {scale}");
        }
        assert_eq!(opt_f.step_count(), 20);
    }

    /// Clipping inside the fused update equals a step on gradients multiplied by the
    /// coefficient first (the old separate pass), for float32 parameters (fused kernel, which
    /// divides by the float32 reciprocal) and a float64 one (per-tensor path): 1e-6 relative
    /// over 5 steps, the rounding of `g / (1 / c)` against `g * c`. The coefficient changes
    /// from step to step (Adam is invariant to a constant one), so a kernel that ignored it
    /// would fail by far.
    #[test]
    fn clipped_step_equals_a_step_on_scaled_gradients() {
        // Fixed values, not the global RNG, which other tests running in parallel reseed.
        let vals = |seed: i64, kind: Kind| {
            (Tensor::arange(12, (kind, Device::Cpu)) * 0.7 + seed as f64)
                .sin()
                .reshape([4, 3])
        };
        let make = || -> Vec<Param> {
            [Kind::Float, Kind::Float, Kind::Double]
                .iter()
                .enumerate()
                .map(|(i, &kind)| Param {
                    name: format!("p{i}"),
                    tensor: vals(i as i64, kind).set_requires_grad(true),
                    kind: ParamKind::Dense,
                    weight_decay: i == 0,
                })
                .collect()
        };
        let (clipped, scaled) = (make(), make());
        let (mut oc, mut os) = (
            AdamW::new(&clipped, &cfg()).unwrap(),
            AdamW::new(&scaled, &cfg()).unwrap(),
        );
        // Varying per step: Adam's update is invariant to one constant gradient scale.
        for (step, coef) in [Some(0.3), None, Some(0.05), Some(0.6), Some(0.2)]
            .into_iter()
            .enumerate()
        {
            let step = step as i64;
            for (i, (pc, ps)) in clipped.iter().zip(&scaled).enumerate() {
                let g = vals(10 * step + i as i64 + 3, pc.tensor.kind());
                (&pc.tensor * &g).sum(pc.tensor.kind()).backward();
                (&ps.tensor * (&g * coef.unwrap_or(1.0)))
                    .sum(ps.tensor.kind())
                    .backward();
            }
            oc.step_clipped(&clipped, 0.05, coef).unwrap();
            os.step(&scaled, 0.05).unwrap();
            release_grads(&clipped).unwrap();
            release_grads(&scaled).unwrap();
        }
        for (pc, ps) in clipped.iter().zip(&scaled) {
            let scale = ps.tensor.abs().max().double_value(&[]);
            let diff = (&pc.tensor - &ps.tensor).abs().max().double_value(&[]);
            assert!(diff <= 1e-6 * scale, "{}: {diff} vs {scale}", pc.name);
        }
    }

    /// `release_grads` leaves no gradient, and the next backward's gradient is exactly the
    /// one a zeroed gradient would have accumulated.
    #[test]
    fn released_gradients_are_rewritten_exactly() {
        let a = [param("w", &[1.0, -2.0, 3.0], true)];
        let b = [param("w", &[1.0, -2.0, 3.0], true)];
        let g = Tensor::from_slice(&[0.1f32, -0.7, 1e-30]);
        for p in [&a[0], &b[0]] {
            (&p.tensor * &g).sum(Kind::Float).backward();
        }
        release_grads(&a).unwrap();
        assert!(!a[0].tensor.grad().defined());
        let _ = b[0].tensor.grad().zero_();
        for p in [&a[0], &b[0]] {
            (&p.tensor * &g * 3.0).sum(Kind::Float).backward();
        }
        assert!(a[0].tensor.grad().equal(&b[0].tensor.grad()));
    }

    /// Two steps of a scalar worked by hand (lr 0.1, wd 0.1, g1 = 2, g2 = -1):
    /// step 1: p = 1 * 0.99 = 0.99; m = 0.2, v = 0.2; m^ = 2, v^ = 4; p -= 0.1 * 2 / (2 + 1e-8)
    ///   -> 0.89 (to 1e-9).
    /// step 2: p = 0.89 * 0.99 = 0.8811; m = 0.18 - 0.1 = 0.08, v = 0.19 + 0.05 = 0.24;
    ///   m^ = 0.08 / 0.19, v^ = 0.24 / 0.0975; p -= 0.1 * m^ / sqrt(v^)
    ///   = 0.8811 - 0.1 * 0.421052631578947 / 1.568929081105471 = 0.8542630552
    /// float32 parameters: 1e-6 absolute.
    #[test]
    fn two_steps_by_hand() {
        let p = [param("w", &[1.0], true)];
        let mut opt = AdamW::new(&p, &cfg()).unwrap();
        set_grad(&p[0], &[2.0]);
        opt.step(&p, 0.1).unwrap();
        assert!((p[0].tensor.double_value(&[0]) - 0.89).abs() < 1e-6);
        set_grad(&p[0], &[-1.0]);
        opt.step(&p, 0.1).unwrap();
        let want = 0.8811 - 0.1 * (0.08 / 0.19) / (0.24f64 / 0.0975).sqrt();
        assert!(
            (want - 0.854_263_055_2).abs() < 1e-9,
            "hand arithmetic {want}"
        );
        assert!((p[0].tensor.double_value(&[0]) - want).abs() < 1e-6);
        assert_eq!(opt.step_count(), 2);
    }

    /// A vector over 5 steps, with and without decay, against the f64 reference formula
    /// (the torch.optim.AdamW update): float32 state and parameters, 1e-5 relative.
    #[test]
    fn vector_matches_reference_with_and_without_decay() {
        let p0 = [0.5f32, -1.0, 2.0, 0.0];
        let grads: Vec<[f32; 4]> = vec![
            [0.1, -0.2, 0.3, 1e-4],
            [0.2, 0.1, -0.5, 0.0],
            [-0.3, 0.4, 0.2, 2.0],
            [0.05, -0.05, 0.0, -1.0],
            [1.0, 0.3, -0.1, 0.5],
        ];
        let ps = [param("a", &p0, true), param("b", &p0, false)];
        let c = cfg();
        let mut opt = AdamW::new(&ps, &c).unwrap();
        let lrs = [1e-2; 5];
        for (g, lr) in grads.iter().zip(lrs) {
            set_grad(&ps[0], g);
            set_grad(&ps[1], g);
            opt.step(&ps, lr).unwrap();
        }
        for (p, wd) in [(&ps[0], c.weight_decay), (&ps[1], 0.0)] {
            for i in 0..4 {
                let gs: Vec<f64> = grads.iter().map(|g| f64::from(g[i])).collect();
                let want = reference(f64::from(p0[i]), &gs, 1e-2, wd, &c);
                let got = p.tensor.double_value(&[i as i64]);
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{} [{i}]: {got} vs {want}",
                    p.name
                );
            }
        }
        // Decay made a difference where p != 0 (so the test can fail).
        assert!((ps[0].tensor.double_value(&[2]) - ps[1].tensor.double_value(&[2])).abs() > 1e-5);
    }

    #[test]
    fn skips_undefined_grads_and_keeps_state_f32() {
        let ps = [param("a", &[1.0, 2.0], true), param("b", &[3.0], true)];
        let mut opt = AdamW::new(&ps, &cfg()).unwrap();
        set_grad(&ps[0], &[1.0, 1.0]);
        opt.step(&ps, 0.1).unwrap();
        assert_eq!(ps[1].tensor.double_value(&[0]), 3.0);
        let state = opt.state();
        assert_eq!(state.len(), 4);
        assert_eq!(state[0].0, "a.exp_avg");
        assert_eq!(state[3].0, "b.exp_avg_sq");
        assert!(state
            .iter()
            .all(|(_, t)| t.kind() == Kind::Float && t.device() == Device::Cpu));
        assert_eq!(state[2].1.double_value(&[0]), 0.0);
    }

    /// Saving and loading the state reproduces the next step exactly.
    #[test]
    fn load_state_round_trip() {
        let c = cfg();
        let a = [param("w", &[1.0, -1.0], true)];
        let b = [param("w", &[1.0, -1.0], true)];
        let mut oa = AdamW::new(&a, &c).unwrap();
        set_grad(&a[0], &[0.3, -0.7]);
        oa.step(&a, 0.05).unwrap();
        let named: HashMap<String, Tensor> =
            oa.state().into_iter().map(|(k, v)| (k, v.copy())).collect();
        let mut ob = AdamW::new(&b, &c).unwrap();
        ob.load_state(&named, oa.step_count()).unwrap();
        tch::no_grad(|| b[0].tensor.shallow_clone().copy_(&a[0].tensor));
        set_grad(&a[0], &[0.1, 0.2]);
        set_grad(&b[0], &[0.1, 0.2]);
        oa.step(&a, 0.05).unwrap();
        ob.step(&b, 0.05).unwrap();
        assert!(a[0].tensor.equal(&b[0].tensor));
        let mut bad: HashMap<String, Tensor> =
            named.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
        bad.insert(
            "w.exp_avg".into(),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        );
        assert!(ob.load_state(&bad, 1).is_err());
        bad.remove("w.exp_avg");
        assert!(ob.load_state(&bad, 1).is_err());
    }

    #[test]
    fn rejects_mismatched_params() {
        let a = [param("w", &[1.0], true)];
        let mut opt = AdamW::new(&a, &cfg()).unwrap();
        let b = [param("v", &[1.0], true)];
        assert!(opt.step(&b, 0.1).is_err());
    }
}
