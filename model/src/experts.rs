//! Routed experts: one SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer") per local
//! expert, applied to contiguous row blocks.
//!
//! Two implementations, as in Megatron-Core (`SequentialMLP` as the reference for
//! `GroupedMLP`): a loop of matmuls and torch's `_grouped_mm`. Stacked `[L, d, h]` weights are
//! never indexed per expert inside the autograd graph: each index's backward writes a
//! full-size zero gradient (measured 12x slower at E=64); the loop `unbind`s them once.

use crate::config::{ExpertImpl, ModelConfig, MoeConfig};
use crate::{ModelError, ParamBuilder, Result};
use moe_comm::Placement;
use tch::{Device, Kind, Tensor};

/// Rows each expert's group is padded to a multiple of (and at least) before a grouped GEMM
/// on the GPU. torch's bf16 grouped GEMM (CUTLASS) may trip device asserts on empty groups;
/// torchtitan pads token groups to multiples of 8 (`TOKEN_GROUP_ALIGN_SIZE_M`) for this.
pub const GROUP_ALIGN_ROWS: i64 = 8;

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
    /// Initialises local experts `first_global..first_global+num_local` as the expert-sharded
    /// parameters `<vb>.w_gate`, `<vb>.w_up`, `<vb>.w_down` (e.g. `layers.3.moe.experts.w_up`),
    /// each expert from its own stream, so the values do not depend on the EP size. `w_down` uses the
    /// residual-projection std `init_std / sqrt(2 * num_layers)`.
    pub fn new(
        model: &ModelConfig,
        moe: &MoeConfig,
        vb: &ParamBuilder,
        first_global: i64,
        num_local: i64,
    ) -> Result<Self> {
        let (d, h) = (model.d_model, moe.expert_hidden);
        let std = model.init_std;
        let std_out = std / ((2 * model.num_layers.max(1)) as f64).sqrt();
        let w = |name: &str, shape: &[i64], std: f64| {
            vb.experts(name, first_global, num_local, shape, std)
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

    /// Why `_grouped_mm` should not run on `device` for rows of `kind` although it could:
    /// on CUDA, torch 2.11 has a fused kernel only for bf16 (CUTLASS, sm90 and newer); its
    /// float32 CUDA path copies the offsets to the host and loops one matmul per expert,
    /// which the sequential experts do without that extra synchronisation.
    pub fn grouped_slow_on(device: Device, kind: Kind) -> Option<String> {
        (device.is_cuda() && kind != Kind::BFloat16).then(|| {
            format!(
                "torch's grouped GEMM on CUDA is fused only for bf16; {kind:?} rows use the \
                 sequential experts"
            )
        })
    }

    /// The implementation a forward on rows of `kind` actually uses.
    pub fn effective_impl(&self, kind: Kind) -> ExpertImpl {
        let device = self.w_gate_ldh.device();
        match self.imp {
            ExpertImpl::Grouped
                if self.grouped_unsupported(kind).is_none()
                    && Self::grouped_slow_on(device, kind).is_none() =>
            {
                ExpertImpl::Grouped
            }
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
        moe_comm::check_device(
            "RoutedExperts::forward",
            "x_md",
            x_md,
            self.w_gate_ldh.device(),
        )?;
        match self.effective_impl(x_md.kind()) {
            // bf16 CUTLASS kernels may assert on empty groups: pad every group on the GPU.
            ExpertImpl::Grouped if x_md.device().is_cuda() => {
                self.forward_grouped_padded(x_md, rows_per_local_expert, GROUP_ALIGN_ROWS)
            }
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
        let offs_l = Placement::new(x_md.device(), kind).upload(&ends)?;
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

    /// [`RoutedExperts::forward_grouped`] with every group padded with zero rows to a
    /// positive multiple of `align` rows, so no expert's group is empty; the padding rows'
    /// outputs are dropped. Equal to the unpadded result (SwiGLU of a zero row is zero and
    /// rows do not interact). The row positions are built from the L group sizes with tensor
    /// ops, not a loop over rows.
    ///
    /// # Shapes
    /// `x_md [M, d]`, `rows [L]` summing to M -> `y_md [M, d]`
    pub fn forward_grouped_padded(
        &self,
        x_md: &Tensor,
        rows: &[i64],
        align: i64,
    ) -> Result<Tensor> {
        if align < 1 {
            return Err(ModelError::Invalid(format!(
                "grouped GEMM padding: align ({align}) must be >= 1"
            )));
        }
        let padded: Vec<i64> = rows
            .iter()
            .map(|r| ((r + align - 1) / align).max(1) * align)
            .collect();
        let (m, m_pad): (i64, i64) = (rows.iter().sum(), padded.iter().sum());
        let (mut off, mut off_pad) = (0i64, 0i64);
        let mut shift_l = Vec::with_capacity(rows.len());
        for (r, p) in rows.iter().zip(&padded) {
            shift_l.push(off_pad - off);
            off += r;
            off_pad += p;
        }
        let device = x_md.device();
        let placement = Placement::new(device, Kind::Int64);
        // Row i of expert l's block moves from off[l] + i to off_pad[l] + i.
        let pos_m = Tensor::f_arange(m, (Kind::Int64, device))?.f_add(
            &placement
                .upload(&shift_l)?
                .f_repeat_interleave_self_tensor(&placement.upload(rows)?, 0, Some(m))?,
        )?;
        let d = x_md.size().get(1).copied().unwrap_or(0);
        let x_pad = Tensor::f_zeros([m_pad, d], (x_md.kind(), device))?.f_index_copy(
            0,
            &pos_m,
            &x_md.f_contiguous()?,
        )?;
        let y_pad = self.forward_grouped(&x_pad, &padded)?;
        Ok(y_pad.f_index_select(0, &pos_m)?)
    }
}
