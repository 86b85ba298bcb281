//! What a rank hands to the checkpointer, and its host copy. Copying to host memory is the
//! only part of a save that stalls training; everything after works on the copy.

use super::format::ELT_BYTES;
use super::manifest::{PartExpert, OPTIM_PREFIX};
use crate::error::{Result, TrainError};
use moe_model::param::{Param, ParamKind};
use std::collections::HashMap;
use tch::{Kind, Tensor};

/// One rank's state at a step. Tensors may live on any device and be shallow clones of the
/// live ones: [`super::Checkpointer::save`] copies them before it returns.
#[derive(Debug)]
pub struct Snapshot {
    /// Training step the state was taken after (names the directory `step-<8 digits>`).
    pub step: u64,
    /// Optimizer step count, passed back to `AdamW::load_state`.
    pub optim_step: u64,
    /// Dense parameters and buffers (replicated on every rank), by name.
    pub dense: Vec<(String, Tensor)>,
    /// This rank's stacked expert parameters.
    pub experts: Vec<ExpertTensor>,
    /// Optimizer state of dense parameters, `<param>.<stat>` (e.g. `wq.exp_avg`).
    pub optim_dense: Vec<(String, Tensor)>,
    /// Optimizer state of expert parameters, stacked like them, named `<param>.<stat>`.
    pub optim_experts: Vec<ExpertTensor>,
    /// RNG and data-cursor state, stored verbatim in the manifest.
    pub extra: serde_json::Value,
    /// The resolved config, stored verbatim in the manifest.
    pub config_yaml: String,
}

/// A stacked expert tensor `[num_local, ...]`: slice `i` is global expert `first_global + i`.
#[derive(Debug)]
pub struct ExpertTensor {
    /// Parameter name (`layers.3.moe.experts.w_gate`) or optimizer-state name
    /// (`layers.3.moe.experts.w_gate.exp_avg`; the statistic is the last name component).
    pub name: String,
    /// Global id of the first local expert.
    pub first_global: i64,
    /// `[num_local, ...]`.
    pub stacked: Tensor,
}

impl Snapshot {
    /// Sorts the model's parameters, buffers and optimizer state (`<param>.<stat>` names, as
    /// `AdamW::state` returns them) into a snapshot by each parameter's [`ParamKind`].
    /// `step`, `optim_step`, `extra` and `config_yaml` are left empty for the caller to set
    /// (`Snapshot { step, ..Snapshot::from_params(..)? }`).
    pub fn from_params(
        params: &[Param],
        buffers: &[(String, Tensor)],
        optim_state: Vec<(String, Tensor)>,
    ) -> Result<Self> {
        let kinds: HashMap<&str, ParamKind> =
            params.iter().map(|p| (p.name.as_str(), p.kind)).collect();
        let mut snap = Snapshot {
            step: 0,
            optim_step: 0,
            dense: Vec::new(),
            experts: Vec::new(),
            optim_dense: Vec::new(),
            optim_experts: Vec::new(),
            extra: serde_json::Value::Null,
            config_yaml: String::new(),
        };
        for p in params {
            match p.kind {
                ParamKind::Dense => snap.dense.push((p.name.clone(), p.tensor.shallow_clone())),
                ParamKind::Expert { first_global, .. } => snap.experts.push(ExpertTensor {
                    name: p.name.clone(),
                    first_global,
                    stacked: p.tensor.shallow_clone(),
                }),
            }
        }
        snap.dense
            .extend(buffers.iter().map(|(n, t)| (n.clone(), t.shallow_clone())));
        for (name, t) in optim_state {
            let owner = name.rsplit_once('.').map(|(owner, _)| owner);
            match owner.and_then(|o| kinds.get(o)) {
                Some(ParamKind::Dense) => snap.optim_dense.push((name, t)),
                Some(ParamKind::Expert { first_global, .. }) => {
                    snap.optim_experts.push(ExpertTensor {
                        name,
                        first_global: *first_global,
                        stacked: t,
                    })
                }
                None => {
                    return Err(TrainError::Other(format!(
                        "optimizer state {name} names no parameter (expected <param>.<stat>)"
                    )))
                }
            }
        }
        Ok(snap)
    }
}

/// A float32 host copy of one tensor.
pub(crate) struct HostTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

/// A float32 host copy of one stacked expert tensor.
pub(crate) struct HostExpert {
    pub part: PartExpert,
    pub bytes: Vec<u8>,
}

impl HostExpert {
    /// Bytes of local expert `i`.
    pub fn slice(&self, i: usize) -> &[u8] {
        let per = self.part.expert_shape.iter().product::<usize>() * ELT_BYTES;
        &self.bytes[i * per..(i + 1) * per]
    }
}

/// The parts of a [`Snapshot`] this rank writes, on the host.
pub(crate) struct HostSnapshot {
    pub step: u64,
    pub optim_step: u64,
    /// Dense tensors then `optim.`-prefixed dense optimizer state (rank 0 only).
    pub dense: Vec<HostTensor>,
    /// Parameters then optimizer state (expert writers only).
    pub experts: Vec<HostExpert>,
    pub extra: serde_json::Value,
    pub config_yaml: String,
}

fn host_copy(name: &str, t: &Tensor) -> Result<(Vec<usize>, Vec<u8>)> {
    if !t.defined() {
        return Err(TrainError::Other(format!(
            "checkpoint: tensor {name} is undefined"
        )));
    }
    let t = t.f_detach()?;
    let t = if t.f_kind()? == Kind::Float {
        t
    } else {
        t.f_to_kind(Kind::Float)?
    };
    let shape: Vec<usize> = t.size().iter().map(|&s| s as usize).collect();
    let numel = shape.iter().product::<usize>();
    let mut bytes = vec![0u8; numel * ELT_BYTES];
    // Copies device memory (or a non-contiguous layout) into our own buffer in one call.
    t.f_copy_data_u8(&mut bytes, numel)?;
    Ok((shape, bytes))
}

fn host_expert(e: &ExpertTensor, is_optim: bool) -> Result<HostExpert> {
    let (shape, bytes) = host_copy(&e.name, &e.stacked)?;
    let Some((&num_local, expert_shape)) = shape.split_first() else {
        return Err(TrainError::Other(format!(
            "checkpoint: expert tensor {} is a scalar; expected [num_local, ...]",
            e.name
        )));
    };
    let (param, stat) = match (is_optim, e.name.rsplit_once('.')) {
        (false, _) => (e.name.clone(), None),
        (true, Some((param, stat))) => (param.to_string(), Some(stat.to_string())),
        (true, None) => {
            return Err(TrainError::Other(format!(
                "checkpoint: optimizer state {} is not named <param>.<stat>",
                e.name
            )))
        }
    };
    let part = PartExpert {
        key: e.name.clone(),
        param,
        stat,
        first_global: e.first_global,
        num_local: num_local as i64,
        expert_shape: expert_shape.to_vec(),
    };
    Ok(HostExpert { part, bytes })
}

impl HostSnapshot {
    /// Copies the dense part (`dense`) and/or the expert part (`experts`) to the host.
    pub fn copy(snap: &Snapshot, dense: bool, experts: bool) -> Result<Self> {
        let mut host = HostSnapshot {
            step: snap.step,
            optim_step: snap.optim_step,
            dense: Vec::new(),
            experts: Vec::new(),
            extra: snap.extra.clone(),
            config_yaml: snap.config_yaml.clone(),
        };
        if dense {
            let optim = snap
                .optim_dense
                .iter()
                .map(|(n, t)| (format!("{OPTIM_PREFIX}{n}"), t));
            for (name, t) in snap.dense.iter().map(|(n, t)| (n.clone(), t)).chain(optim) {
                let (shape, bytes) = host_copy(&name, t)?;
                host.dense.push(HostTensor { name, shape, bytes });
            }
        }
        if experts {
            for e in &snap.experts {
                host.experts.push(host_expert(e, false)?);
            }
            for e in &snap.optim_experts {
                host.experts.push(host_expert(e, true)?);
            }
        }
        Ok(host)
    }
}
