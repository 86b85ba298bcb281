//! Creating parameters: one call creates, initialises and registers a tensor under its dotted
//! name, as candle's `VarBuilder` does (`vb.pp("layers").pp(i)`). A module's names exist in
//! one place, its constructor; the model's parameter list is the registry this fills, not a
//! second list kept in step by hand.
//!
//! Values are a pure function of (seed, full name[, global expert id]) ([`crate::init`]), so
//! the order in which modules are built changes no value; the registry keeps creation order,
//! which is the order [`crate::transformer::TransformerLm::params`] returns.

use crate::param::{Param, ParamKind};
use crate::{init, ModelError, Result};
use std::cell::RefCell;
use std::fmt::Display;
use std::rc::Rc;
use tch::{Device, Tensor};

/// What the builders of one model share: the parameters and buffers created so far.
#[derive(Debug, Default)]
struct Registry {
    params: Vec<Param>,
    buffers: Vec<(String, Tensor)>,
}

impl Registry {
    fn check_new(&self, name: &str) -> Result<()> {
        let taken = self.params.iter().any(|p| p.name == name)
            || self.buffers.iter().any(|(n, _)| n == name);
        if taken {
            return Err(ModelError::Invalid(format!(
                "parameter name {name} is created twice"
            )));
        }
        Ok(())
    }
}

/// Creates a model's parameters under a name prefix. Clones (and [`ParamBuilder::pp`]) share
/// one registry. Lives only while the model is built (not `Send`).
#[derive(Debug, Clone)]
pub struct ParamBuilder {
    prefix: String,
    seed: u64,
    device: Device,
    registry: Rc<RefCell<Registry>>,
}

impl ParamBuilder {
    /// The root builder of a model: values drawn from `seed`, tensors on `device`.
    pub fn new(seed: u64, device: Device) -> Self {
        Self {
            prefix: String::new(),
            seed,
            device,
            registry: Rc::default(),
        }
    }

    /// A builder for the sub-module `part` (`layers`, then `3`, ...): names below it are
    /// `<prefix>.<part>.<leaf>`.
    pub fn pp(&self, part: impl Display) -> Self {
        Self {
            prefix: self.name(&part.to_string()),
            ..self.clone()
        }
    }

    /// The full name of `leaf` under this builder's prefix.
    pub fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    /// The device the tensors are created on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The seed the values are drawn from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Registers a tensor the caller initialised as the dense parameter `leaf`.
    pub fn add(&self, leaf: &str, tensor: Tensor, weight_decay: bool) -> Result<Tensor> {
        self.register(leaf, tensor, ParamKind::Dense, weight_decay)
    }

    /// A decayed dense matrix `leaf` of Normal(0, std) values from the stream (seed, name).
    pub fn normal(&self, leaf: &str, shape: &[i64], std: f64) -> Result<Tensor> {
        let t = init::normal(self.seed, &self.name(leaf), 0, shape, std, self.device)?;
        self.add(leaf, t, true)
    }

    /// [`ParamBuilder::normal`] without weight decay (embeddings).
    pub fn normal_no_decay(&self, leaf: &str, shape: &[i64], std: f64) -> Result<Tensor> {
        let t = init::normal(self.seed, &self.name(leaf), 0, shape, std, self.device)?;
        self.add(leaf, t, false)
    }

    /// A scale of ones `leaf` (norm weights), not decayed.
    pub fn ones(&self, leaf: &str, shape: &[i64]) -> Result<Tensor> {
        self.add(leaf, init::ones(shape, self.device)?, false)
    }

    /// Zeros `leaf` (biases), not decayed.
    pub fn zeros(&self, leaf: &str, shape: &[i64]) -> Result<Tensor> {
        self.add(leaf, init::zeros(shape, self.device)?, false)
    }

    /// Routed-expert weights `leaf` `[num_local, ...shape]` of global experts
    /// `first_global..first_global + num_local`, each from its own stream, decayed.
    pub fn experts(
        &self,
        leaf: &str,
        first_global: i64,
        num_local: i64,
        shape: &[i64],
        std: f64,
    ) -> Result<Tensor> {
        let t = init::normal_experts(
            self.seed,
            &self.name(leaf),
            first_global,
            num_local,
            shape,
            std,
            self.device,
        )?;
        let kind = ParamKind::Expert {
            first_global,
            num_local,
        };
        self.register(leaf, t, kind, true)
    }

    /// Registers non-trainable state `leaf` that checkpoints carry.
    pub fn buffer(&self, leaf: &str, tensor: Tensor) -> Result<Tensor> {
        let name = self.name(leaf);
        let mut reg = self.registry.borrow_mut();
        reg.check_new(&name)?;
        reg.buffers.push((name, tensor.shallow_clone()));
        Ok(tensor)
    }

    fn register(
        &self,
        leaf: &str,
        tensor: Tensor,
        kind: ParamKind,
        weight_decay: bool,
    ) -> Result<Tensor> {
        let name = self.name(leaf);
        let mut reg = self.registry.borrow_mut();
        reg.check_new(&name)?;
        reg.params.push(Param {
            name,
            tensor: tensor.shallow_clone(),
            kind,
            weight_decay,
        });
        Ok(tensor)
    }

    /// Every parameter created so far through this builder or any builder sharing its
    /// registry, in creation order (shallow clones).
    pub fn params(&self) -> Vec<Param> {
        self.registry
            .borrow()
            .params
            .iter()
            .map(Param::shallow_clone)
            .collect()
    }

    /// Every buffer created so far, in creation order (shallow clones).
    pub fn buffers(&self) -> Vec<(String, Tensor)> {
        self.registry
            .borrow()
            .buffers
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_once_values_by_name_and_no_duplicates() {
        let vb = ParamBuilder::new(3, Device::Cpu);
        let layer = vb.pp("layers").pp(2);
        let w = layer.normal("w", &[2, 3], 0.5).unwrap();
        let _ = layer.pp("norm").ones("weight", &[3]).unwrap();
        let e = layer.experts("experts.w", 4, 2, &[3], 1.0).unwrap();
        let bias = Tensor::zeros([2], (tch::Kind::Float, Device::Cpu));
        let _ = vb.buffer("layers.2.bias", bias).unwrap();
        let names: Vec<(String, ParamKind, bool)> = vb
            .params()
            .into_iter()
            .map(|p| (p.name, p.kind, p.weight_decay))
            .collect();
        assert_eq!(
            names,
            vec![
                ("layers.2.w".to_string(), ParamKind::Dense, true),
                ("layers.2.norm.weight".to_string(), ParamKind::Dense, false),
                (
                    "layers.2.experts.w".to_string(),
                    ParamKind::Expert {
                        first_global: 4,
                        num_local: 2
                    },
                    true
                ),
            ]
        );
        // The values are the stream of the full name, as `init` draws them.
        let want = init::normal(3, "layers.2.w", 0, &[2, 3], 0.5, Device::Cpu).unwrap();
        assert!(w.equal(&want));
        let want_e = init::normal(3, "layers.2.experts.w", 5, &[3], 1.0, Device::Cpu).unwrap();
        assert!(e.get(1).equal(&want_e));
        // The registry shares storage with what the module keeps.
        let _ = tch::no_grad(|| w.shallow_clone().fill_(1.0));
        assert_eq!(vb.params()[0].tensor.double_value(&[0, 0]), 1.0);
        assert_eq!(vb.buffers()[0].0, "layers.2.bias");
        let err = layer.ones("w", &[1]).unwrap_err().to_string();
        assert!(err.contains("layers.2.w is created twice"), "{err}");
        let err = vb.ones("layers.2.bias", &[1]).unwrap_err().to_string();
        assert!(err.contains("created twice"), "{err}");
    }
}
