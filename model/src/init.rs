//! Deterministic parameter initialisation.
//!
//! Values come from a ChaCha stream keyed by (seed, parameter name[, global expert id]), not
//! from torch's global generator, so every rank builds identical dense weights, and a global
//! expert gets the same weights whichever rank (and EP size) holds it: EP=P equals EP=1 from
//! step 0.

use crate::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use std::cell::Cell;
use tch::{Device, Kind, Tensor};

thread_local! {
    /// Set inside [`without_values`].
    static SHAPES_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` with parameter initialisation switched off on this thread: every parameter
/// made through this module is allocated but never written, so a model's names, shapes and
/// kinds cost no resident memory (the pages of an untouched allocation are not backed). What
/// accelerate's `init_empty_weights` does for `transformers`; for tools that fill every
/// parameter from a file (`moe import`). Reading such a parameter before filling it reads
/// garbage.
pub fn without_values<T>(build: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            SHAPES_ONLY.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SHAPES_ONLY.with(|c| c.replace(true)));
    build()
}

/// An uninitialised trainable tensor, inside [`without_values`].
fn unwritten(shape: &[i64], device: Device) -> Option<Result<Tensor>> {
    SHAPES_ONLY
        .with(Cell::get)
        .then(|| Ok(Tensor::f_empty(shape, (Kind::Float, device))?.f_set_requires_grad(true)?))
}

/// 64-bit FNV-1a, stable across platforms and Rust versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8], mut h: u64) -> u64 {
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The stream seed of one tensor.
pub fn stream_seed(seed: u64, name: &str, index: i64) -> u64 {
    let h = fnv1a(&seed.to_le_bytes(), 0xcbf2_9ce4_8422_2325);
    let h = fnv1a(name.as_bytes(), h);
    fnv1a(&index.to_le_bytes(), h)
}

/// Normal(0, std) values of `shape`, a pure function of (seed, name, index).
pub fn normal(
    seed: u64,
    name: &str,
    index: i64,
    shape: &[i64],
    std: f64,
    device: Device,
) -> Result<Tensor> {
    if let Some(t) = unwritten(shape, device) {
        return t;
    }
    let numel: i64 = shape.iter().product();
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, name, index));
    let dist = Normal::new(0.0f32, std as f32)
        .map_err(|e| crate::ModelError::Invalid(format!("init std {std} for {name}: {e}")))?;
    let values: Vec<f32> = (0..numel).map(|_| dist.sample(&mut rng)).collect();
    // host: initialisation, once per run (a per-tensor host stream keeps values EP-invariant).
    Ok(Tensor::f_from_slice(&values)?
        .f_reshape(shape)?
        .f_to_device(device)?
        .f_set_requires_grad(true)?)
}

/// Routed-expert weights `[num_local, ...shape]`: slice i is global expert `first_global + i`,
/// drawn from its own stream, so sharding never changes the values.
pub fn normal_experts(
    seed: u64,
    name: &str,
    first_global: i64,
    num_local: i64,
    shape: &[i64],
    std: f64,
    device: Device,
) -> Result<Tensor> {
    let stacked: Vec<i64> = std::iter::once(num_local)
        .chain(shape.iter().copied())
        .collect();
    if let Some(t) = unwritten(&stacked, device) {
        return t;
    }
    let slices = (first_global..first_global + num_local)
        // host: initialisation, once per run; stacked on the host, moved once.
        .map(|g| normal(seed, name, g, shape, std, Device::Cpu).and_then(|t| Ok(t.f_detach()?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::f_stack(&slices, 0)?
        .f_to_device(device)?
        .f_set_requires_grad(true)?)
}

/// A tensor of ones (norm weights), trainable.
pub fn ones(shape: &[i64], device: Device) -> Result<Tensor> {
    if let Some(t) = unwritten(shape, device) {
        return t;
    }
    Ok(Tensor::f_ones(shape, (Kind::Float, device))?.f_set_requires_grad(true)?)
}

/// A trainable float32 tensor of zeros (biases).
pub fn zeros(shape: &[i64], device: Device) -> Result<Tensor> {
    if let Some(t) = unwritten(shape, device) {
        return t;
    }
    Ok(Tensor::f_zeros(shape, (Kind::Float, device))?.f_set_requires_grad(true)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ModelConfig, MoeConfig};
    use crate::transformer::TransformerLm;
    use crate::ExpertParallel;

    /// A model built without values has the same parameters (names, shapes, kinds) as one
    /// built normally, and initialisation is back on afterwards, even after a failed build.
    #[test]
    fn without_values_keeps_names_and_shapes_and_restores() {
        let (model, moe) = (ModelConfig::default(), MoeConfig::default());
        let build = || TransformerLm::new(&model, &moe, &ExpertParallel::single(), 5, Device::Cpu);
        let real = build().unwrap();
        let empty = without_values(build).unwrap();
        let describe = |lm: &TransformerLm| -> Vec<(String, Vec<i64>, String)> {
            lm.params()
                .iter()
                .map(|p| (p.name.clone(), p.tensor.size(), format!("{:?}", p.kind)))
                .collect()
        };
        assert_eq!(describe(&real), describe(&empty));
        let again = build().unwrap();
        for (a, b) in real.params().iter().zip(again.params()) {
            assert!(
                a.tensor.equal(&b.tensor),
                "{} not initialised again",
                a.name
            );
        }
        let failed: Result<Tensor> = without_values(|| Err(crate::ModelError::Invalid("x".into())));
        assert!(failed.is_err());
        let t = normal(1, "w", 0, &[3], 1.0, Device::Cpu).unwrap();
        assert!(t.equal(&normal(1, "w", 0, &[3], 1.0, Device::Cpu).unwrap()));
        assert!(!SHAPES_ONLY.with(Cell::get));
    }
}
