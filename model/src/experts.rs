//! Routed experts: one SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") per local
//! expert, applied to contiguous row blocks.
//!
//! Two implementations, as in Megatron-Core (`SequentialMLP` as the reference for
//! `GroupedMLP`): a loop of matmuls and torch's `_grouped_mm`. Stacked `[L, d, h]` weights are
//! never indexed per expert inside the autograd graph: each index's backward writes a
//! full-size zero gradient (measured 12x slower at E=64); the loop `unbind`s them once.

use crate::config::{ExpertImpl, ModelConfig, MoeConfig};
use crate::param::{Param, ParamKind};
use crate::{init, ModelError, Result};
use tch::{Device, Kind, Tensor};

/// The routed experts held by this rank: global experts `first_global .. first_global + num_local`.
#[derive(Debug)]
pub struct RoutedExperts {
    /// Gate projection `[L, d, h]`.
    pub w_gate_ldh: Tensor,
    /// Up projection `[L, d, h]`.
    pub w_up_ldh: Tensor,
    /// Down projection `[L, h, d]`.
    pub w_down_lhd: Tensor,
    /// Global id of local expert 0.
    pub first_global: i64,
    /// Local experts L = E / P.
    pub num_local: i64,
    /// Requested implementation (see [`RoutedExperts::grouped_unsupported`] for fallbacks).
    pub imp: ExpertImpl,
}

impl RoutedExperts {
    /// Initialises local experts `first_global..first_global+num_local` from per-expert
    /// streams named `<prefix>.w_gate`, `<prefix>.w_up`, `<prefix>.w_down` (prefix e.g.
    /// `layers.3.moe.experts`), so the values do not depend on the EP size. `w_down` uses the
    /// residual-projection std `init_std / sqrt(2 * num_layers)`.
    pub fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        prefix: &str,
        first_global: i64,
        num_local: i64,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let (d, h) = (model.d_model, moe.expert_hidden);
        let std = model.init_std;
        let std_out = std / ((2 * model.num_layers.max(1)) as f64).sqrt();
        let w = |name: &str, shape: &[i64], std: f64| {
            init::normal_experts(
                seed,
                &format!("{prefix}.{name}"),
                first_global,
                num_local,
                shape,
                std,
                device,
            )
        };
        Ok(Self {
            w_gate_ldh: w("w_gate", &[d, h], std)?,
            w_up_ldh: w("w_up", &[d, h], std)?,
            w_down_lhd: w("w_down", &[h, d], std_out)?,
            first_global,
            num_local,
            imp: moe.expert_impl,
        })
    }

    /// Why `_grouped_mm` cannot run these experts on rows of `kind` (it needs every row of
    /// every operand 16-byte aligned: `d` and `h` times the element size a multiple of 16
    /// bytes), or `None` when it can.
    pub fn grouped_unsupported(&self, kind: Kind) -> Option<String> {
        let (d, h) = match self.w_gate_ldh.size().as_slice() {
            [_, d, h] => (*d, *h),
            s => return Some(format!("w_gate_ldh has shape {s:?}, not [L, d, h]")),
        };
        let elem = kind.elt_size_in_bytes() as i64;
        if (d * elem) % 16 != 0 || (h * elem) % 16 != 0 {
            return Some(format!(
                "grouped GEMM needs 16-byte aligned rows: d_model ({d}) and expert_hidden ({h}) \
                 must be multiples of {} for {kind:?}; using the sequential experts",
                16 / elem.max(1)
            ));
        }
        None
    }

    /// The implementation a forward on rows of `kind` actually uses.
    pub fn effective_impl(&self, kind: Kind) -> ExpertImpl {
        match self.imp {
            ExpertImpl::Grouped if self.grouped_unsupported(kind).is_none() => ExpertImpl::Grouped,
            _ => ExpertImpl::Sequential,
        }
    }

    /// SwiGLU per local expert on contiguous row blocks: `(silu(x W_gate) * (x W_up)) W_down`.
    /// Runs in the dtype of `x_md` (weights are cast to it).
    ///
    /// # Shapes
    /// `x_md [M, d]`, `rows_per_local_expert [L]` summing to M -> `y_md [M, d]`
    pub fn forward(&self, x_md: &Tensor, rows_per_local_expert: &[i64]) -> Result<Tensor> {
        let m = x_md.size().first().copied().unwrap_or(-1);
        if rows_per_local_expert.len() as i64 != self.num_local
            || rows_per_local_expert.iter().any(|r| *r < 0)
            || rows_per_local_expert.iter().sum::<i64>() != m
        {
            return Err(ModelError::Invalid(format!(
                "experts: {} local experts, rows {rows_per_local_expert:?} must be >= 0 and sum to x_md's {m} rows",
                self.num_local
            )));
        }
        match self.effective_impl(x_md.kind()) {
            ExpertImpl::Grouped => self.forward_grouped(x_md, rows_per_local_expert),
            ExpertImpl::Sequential => self.forward_sequential(x_md, rows_per_local_expert),
        }
    }

    /// The reference: a loop of matmuls over `split_with_sizes` blocks. `unbind` and
    /// `split_with_sizes` are single autograd nodes whose backward stacks / concatenates the
    /// per-block gradients once, unlike per-expert `select` or `narrow`.
    pub fn forward_sequential(&self, x_md: &Tensor, rows: &[i64]) -> Result<Tensor> {
        let kind = x_md.kind();
        let w_gate = self.w_gate_ldh.f_to_kind(kind)?.f_unbind(0)?;
        let w_up = self.w_up_ldh.f_to_kind(kind)?.f_unbind(0)?;
        let w_down = self.w_down_lhd.f_to_kind(kind)?.f_unbind(0)?;
        let blocks = x_md.f_split_with_sizes(rows, 0)?;
        let outs = blocks
            .iter()
            .zip(w_gate.iter().zip(w_up.iter()).zip(w_down.iter()))
            .map(|(x_bd, ((wg_dh, wu_dh), wd_hd))| {
                let h_bh = x_bd
                    .f_matmul(wg_dh)?
                    .f_silu()?
                    .f_mul(&x_bd.f_matmul(wu_dh)?)?;
                Ok(h_bh.f_matmul(wd_hd)?)
            })
            .collect::<Result<Vec<_>>>()?;
        if outs.is_empty() {
            let d = self.w_down_lhd.size().last().copied().unwrap_or(0);
            return Ok(Tensor::f_zeros([0, d], (kind, x_md.device()))?);
        }
        Ok(Tensor::f_cat(&outs, 0)?)
    }

    /// One `_grouped_mm` per projection, groups given by the cumulative row ends (int32).
    pub fn forward_grouped(&self, x_md: &Tensor, rows: &[i64]) -> Result<Tensor> {
        if let Some(reason) = self.grouped_unsupported(x_md.kind()) {
            return Err(ModelError::Invalid(reason));
        }
        let kind = x_md.kind();
        let ends: Vec<i32> = rows
            .iter()
            .scan(0i64, |acc, r| {
                *acc += r;
                Some(i32::try_from(*acc).map_err(|_| {
                    ModelError::Invalid(format!(
                        "grouped GEMM: {acc} rows exceed the int32 offsets"
                    ))
                }))
            })
            .collect::<Result<Vec<_>>>()?;
        let offs_l = Tensor::f_from_slice(&ends)?.f_to_device(x_md.device())?;
        let x_md = x_md.f_contiguous()?;
        let gmm = |a: &Tensor, w: &Tensor| -> Result<Tensor> {
            Ok(a.f_internal_grouped_mm(&w.f_to_kind(kind)?, Some(&offs_l), None::<&Tensor>, None)?)
        };
        let h_mh = gmm(&x_md, &self.w_gate_ldh)?
            .f_silu()?
            .f_mul(&gmm(&x_md, &self.w_up_ldh)?)?;
        let y_md = gmm(&h_mh, &self.w_down_lhd)?;
        // `_grouped_mm`'s backward rejects an expanded (zero-stride) incoming gradient, which a
        // caller's `y.sum().backward()` produces. Multiplying by one makes autograd hand this
        // node a gradient materialised by the multiply's own backward.
        Ok(y_md.f_mul_scalar(1.0)?)
    }

    /// The expert weights as parameters `<prefix>.w_gate|w_up|w_down`, sharded by global id.
    pub fn params(&self, prefix: &str) -> Vec<Param> {
        let kind = ParamKind::Expert {
            first_global: self.first_global,
            num_local: self.num_local,
        };
        [
            ("w_gate", &self.w_gate_ldh),
            ("w_up", &self.w_up_ldh),
            ("w_down", &self.w_down_lhd),
        ]
        .into_iter()
        .map(|(name, t)| Param {
            name: format!("{prefix}.{name}"),
            tensor: t.shallow_clone(),
            kind,
            weight_decay: true,
        })
        .collect()
    }
}
