//! A step's statistics: summed on each rank's device over the micro-batches, then reduced over
//! all ranks in one all-reduce and read to the host once per step.

use crate::{Result, TrainError};
use moe_comm::{host_read, lock, Placement, ProcessGroups};
use moe_model::moe_layer::MoeStats;
use tch::{Kind, Tensor};

/// Statistics of one step that are reduced over all ranks in a single all-reduce, read to
/// the host once per step. Layout of the f64 vector: see [`LocalStats::to_tensor`].
#[derive(Debug, Clone, Default)]
pub(super) struct StepStats {
    pub lm_loss: f64,
    pub aux_loss: f64,
    pub z_loss: f64,
    pub kept: f64,
    pub dropped: f64,
    pub non_finite: f64,
    pub stop: f64,
    /// max/mean of the global kept load in the worst MoE layer (identical on every rank).
    pub load_imbalance: f64,
}

/// One rank's step statistics while they are still on its device: the losses are summed
/// there over the micro-batches without reading them back (one host read per step, after
/// the all-reduce, instead of three per micro-batch).
pub(super) struct LocalStats {
    /// f64 `[3]`: lm, aux and z loss, each averaged over the micro-batches.
    pub losses_3: Tensor,
    /// f64 `[2]`: kept and dropped assignments over the micro-batches and MoE layers.
    pub counts_2: Tensor,
}

impl LocalStats {
    pub fn new(placement: &Placement) -> Result<Self> {
        Ok(Self {
            losses_3: Tensor::f_zeros([3], (Kind::Double, placement.device))?,
            counts_2: Tensor::f_zeros([2], (Kind::Double, placement.device))?,
        })
    }

    /// `[lm, aux, z, kept, dropped, non_finite, stop]` in f64 on the rank's device, the
    /// layout [`StepStats::from_tensor`] reads. `non_finite` is 1 when a loss is not finite.
    fn to_tensor(&self, placement: &Placement, stop: bool) -> Result<Tensor> {
        let non_finite_1 = self
            .losses_3
            .f_isfinite()?
            .f_all()?
            .f_logical_not()?
            .f_to_kind(Kind::Double)?
            .f_reshape([1])?;
        let stop_1 = placement.upload(&[f64::from(u8::from(stop))])?;
        Ok(Tensor::f_cat(
            &[&self.losses_3, &self.counts_2, &non_finite_1, &stop_1],
            0,
        )?)
    }

    /// One all-reduce on the rank's device and the step's one host read: losses become the
    /// mean over ranks, counts the sum, flags the max (>0); the load imbalance (from the
    /// layers' already global loads) rides along in the same read.
    pub fn reduce(
        &self,
        groups: &ProcessGroups,
        placement: &Placement,
        stop: bool,
        layers: &[(i64, MoeStats)],
    ) -> Result<StepStats> {
        let world = groups.world_size as f64;
        let summed = lock(&groups.world)?.all_reduce_sum(&self.to_tensor(placement, stop)?)?;
        let imbalance_1 = load_imbalance(layers, placement)?.f_reshape([1])?;
        let mut g = StepStats::from_tensor(&Tensor::f_cat(&[&summed, &imbalance_1], 0)?)?;
        g.lm_loss /= world;
        g.aux_loss /= world;
        g.z_loss /= world;
        Ok(g)
    }
}

impl StepStats {
    /// The all-reduced statistics plus the load imbalance, appended after the reduction.
    const LEN: i64 = 8;

    fn from_tensor(t: &Tensor) -> Result<Self> {
        let v = host_read::<f64>(t)?;
        if v.len() as i64 != Self::LEN {
            return Err(TrainError::Other(format!(
                "step stats of length {}",
                v.len()
            )));
        }
        Ok(Self {
            lm_loss: v[0],
            aux_loss: v[1],
            z_loss: v[2],
            kept: v[3],
            dropped: v[4],
            non_finite: v[5],
            stop: v[6],
            load_imbalance: v[7],
        })
    }

    /// Dropped over all routed assignments (0 when nothing was routed).
    pub fn dropped_frac(&self) -> f64 {
        if self.kept + self.dropped > 0.0 {
            self.dropped / (self.kept + self.dropped)
        } else {
            0.0
        }
    }
}

/// max/mean of the global kept load over the MoE layers (the worst layer), as an f64 scalar
/// on the device; 0 without MoE layers or load.
fn load_imbalance(layers: &[(i64, MoeStats)], placement: &Placement) -> Result<Tensor> {
    let mut worst = Tensor::f_zeros([], (Kind::Double, placement.device))?;
    for (_, s) in layers {
        let load_e = s.load_e.f_to_kind(Kind::Double)?;
        let mean = load_e.f_mean(Kind::Double)?;
        // max/mean where the mean is positive, else 0 (an idle layer is not imbalanced).
        let ratio = load_e
            .f_max()?
            .f_div(&mean.f_clamp_min(f64::MIN_POSITIVE)?)?
            .f_where_scalarother(&mean.f_gt(0.0)?, 0.0)?;
        worst = worst.f_maximum(&ratio)?;
    }
    Ok(worst)
}
