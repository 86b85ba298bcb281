//! Using a trained model outside the training loop: the validation loss the loop logs
//! (shared with it, so `moe eval` reproduces the loop's numbers), loading a checkpoint into a
//! single-process model, and next-token sampling for `moe generate` (temperature and top-k
//! sampling as in Holtzman et al. 2020, §3; temperature 0 is greedy decoding).

use crate::checkpoint::{load_for_rank, ExpertSlot, Loaded};
use crate::config::{ExperimentConfig, Precision};
use crate::data::{Dataset, SamplerSpec, Split};
use crate::loss::lm_loss;
use crate::{Result, TrainError};
use moe_model::transformer::{LmForward, TransformerLm};
use moe_model::ExpertParallel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// The matmul kind of `trainer.precision`.
pub fn compute_kind(precision: &Precision) -> Kind {
    match precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    }
}

/// A model and how to run it without gradients.
pub struct EvalModel<'a> {
    /// The model (any EP position; its MoE layers own their dispatchers).
    pub model: &'a TransformerLm,
    /// Where the model lives.
    pub device: Device,
    /// Matmul kind.
    pub compute_kind: Kind,
}

/// World rank `rank`'s mean validation loss over `trainer.eval_iters` batches of the
/// validation split, as the training loop computes it (the loop averages this over ranks).
/// Without gradients; router in eval mode (no jitter); capacity as configured, as
/// Megatron-Core applies it in evaluation too. The batches are a pure function of
/// (`run.seed`, `world_size`, `rank`, batch index), the same in every call.
pub fn rank_val_loss(
    m: &EvalModel,
    dataset: &Dataset,
    cfg: &ExperimentConfig,
    world_size: i64,
    rank: i64,
    step: u64,
) -> Result<f64> {
    let loss = rank_val_loss_on_device(m, dataset, cfg, world_size, rank, step)?;
    Ok(moe_comm::host_read::<f64>(&loss)?[0])
}

/// [`rank_val_loss`] as an f64 scalar on the model's device, not read back: the batches'
/// losses are summed there, so the loop's evaluation reads the host once (after its
/// all-reduce) rather than once per batch.
pub fn rank_val_loss_on_device(
    m: &EvalModel,
    dataset: &Dataset,
    cfg: &ExperimentConfig,
    world_size: i64,
    rank: i64,
    step: u64,
) -> Result<Tensor> {
    let t = &cfg.trainer;
    let placement = moe_comm::Placement::new(m.device, m.compute_kind);
    let _guard = tch::no_grad_guard();
    let spec = SamplerSpec {
        seed: cfg.run.seed,
        seq_len: cfg.data.seq_len,
        batch_size: t.batch_size,
        world_size,
        rank,
        grad_accum: 1,
    };
    let mut total = Tensor::f_zeros([], (Kind::Double, m.device))?;
    for i in 0..t.eval_iters {
        for batch in &dataset.batches(Split::Val, i, &spec)? {
            let inputs = placement.to_device(&batch.inputs_bt)?;
            let targets = placement.to_device(&batch.targets_bt)?;
            let ctx = LmForward {
                train: false,
                compute_kind: m.compute_kind,
                step,
            };
            let out = m.model.forward(&inputs, &ctx)?;
            total = total.f_add(&lm_loss(&out.logits_btv, &targets)?.f_to_kind(Kind::Double)?)?;
        }
    }
    Ok(total.f_div_scalar(t.eval_iters.max(1) as f64)?)
}

/// Builds the whole model of `cfg` in one process (EP size 1, every expert local) and loads
/// the checkpoint at `path` into it. Experts are stored by global id, so a checkpoint of any
/// EP size loads. A checkpoint that does not fit the config fails with an error naming each
/// tensor, both shapes and the file.
pub fn load_single(
    cfg: &ExperimentConfig,
    path: &Path,
    device: Device,
) -> Result<(TransformerLm, Loaded)> {
    let model = TransformerLm::new(
        &cfg.model,
        &cfg.moe,
        &ExpertParallel::single(),
        cfg.run.seed,
        device,
    )?;
    let params = model.params();
    let slots = ExpertSlot::from_params(&params, cfg.moe.num_experts);
    let mut loaded = load_for_rank(path, &slots)?;
    // Inference needs no optimizer state: dropping it frees its memory and keeps a shape
    // mismatch reported once per tensor rather than again for each AdamW statistic.
    loaded.optim.clear();
    loaded.copy_into(&params, &model.buffers())?;
    Ok((model, loaded))
}

/// Next-token logits of the last position of one sequence.
///
/// # Shapes
/// `tokens` of length `t`, `0 < t <= model.max_seq_len` -> f32 `[v]`
pub fn last_logits(m: &EvalModel, tokens: &[i64]) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let t = tokens.len() as i64;
    let tokens_bt = moe_comm::Placement::new(m.device, m.compute_kind)
        .upload(tokens)?
        .f_reshape([1, t])?;
    let ctx = LmForward {
        train: false,
        compute_kind: m.compute_kind,
        step: 0,
    };
    let out = m.model.forward(&tokens_bt, &ctx)?;
    Ok(out
        .logits_btv
        .f_select(1, t - 1)?
        .f_squeeze_dim(0)?
        .f_to_kind(Kind::Float)?)
}

/// Draws tokens from logits: greedy at temperature 0, else softmax(logits / T) restricted to
/// the `top_k` most likely tokens. Deterministic for a seed (ChaCha8, one uniform per draw).
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    top_k: Option<i64>,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler; `temperature` must be finite and >= 0, `top_k` >= 1 when given.
    pub fn new(temperature: f64, top_k: Option<i64>, seed: u64) -> Result<Self> {
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(TrainError::Other(format!(
                "temperature ({temperature}) must be a finite number >= 0"
            )));
        }
        if let Some(k) = top_k {
            if k < 1 {
                return Err(TrainError::Other(format!("top-k ({k}) must be >= 1")));
            }
        }
        Ok(Self {
            temperature,
            top_k,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// The next token id.
    ///
    /// # Shapes
    /// `logits_v [v]` -> token id in `0..v`
    pub fn sample(&mut self, logits_v: &Tensor) -> Result<i64> {
        let v = logits_v.size().first().copied().unwrap_or(0);
        if v == 0 {
            return Err(TrainError::Other("no logits to sample from".into()));
        }
        let logits = logits_v.f_to_kind(Kind::Double)?;
        if self.temperature == 0.0 {
            // host: the sampled token is needed on the host (one read per token).
            return Ok(logits.f_argmax(0, false)?.f_int64_value(&[])?);
        }
        let k = self.top_k.unwrap_or(v).min(v);
        // topk returns the k largest in descending order, so the draw below walks the most
        // likely first; ties at the k-th value are cut by torch's order.
        let (top, idx) = logits.f_topk(k, 0, true, true)?;
        let probs_k = top
            .f_div_scalar(self.temperature)?
            .f_softmax(0, Kind::Double)?;
        // host: the draw happens on the host (one read of k values per token).
        let probs = Vec::<f64>::try_from(&probs_k)?;
        // host: as above.
        let idx = Vec::<i64>::try_from(&idx)?;
        Ok(idx[pick(&probs, self.rng.random::<f64>())])
    }
}

/// The index where the cumulative sum of `probs` first exceeds `u` (in `[0, 1)`); the last
/// index when rounding leaves the sum below `u`.
fn pick(probs: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return i;
        }
    }
    probs.len().saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pick_walks_the_cumulative_distribution() {
        let p = [0.2, 0.5, 0.3];
        assert_eq!(pick(&p, 0.0), 0);
        assert_eq!(pick(&p, 0.19), 0);
        assert_eq!(pick(&p, 0.2), 1);
        assert_eq!(pick(&p, 0.69), 1);
        assert_eq!(pick(&p, 0.7), 2);
        assert_eq!(pick(&p, 0.999_999), 2);
        // Rounding leaves the total below 1: the last token, never out of range.
        assert_eq!(pick(&[0.3, 0.3], 0.99), 1);
    }

    #[test]
    fn greedy_top1_and_seeded_sampling() {
        let logits = Tensor::from_slice(&[0.1f32, 2.0, -1.0, 1.9]);
        let mut greedy = Sampler::new(0.0, None, 1).unwrap();
        assert_eq!(greedy.sample(&logits).unwrap(), 1);
        // top-k 1 is greedy at any temperature.
        let mut top1 = Sampler::new(5.0, Some(1), 2).unwrap();
        assert!((0..20).all(|_| top1.sample(&logits).unwrap() == 1));
        // top-k 2 only ever draws the two largest; both occur over 200 draws (each has
        // probability ~0.5 at T=1, so missing one has probability 2^-199).
        let mut top2 = Sampler::new(1.0, Some(2), 3).unwrap();
        let draws: Vec<i64> = (0..200).map(|_| top2.sample(&logits).unwrap()).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 3));
        assert!(draws.contains(&1) && draws.contains(&3));
        // Same seed, same draws; another seed differs somewhere.
        let mut again = Sampler::new(1.0, Some(2), 3).unwrap();
        let same: Vec<i64> = (0..200).map(|_| again.sample(&logits).unwrap()).collect();
        assert_eq!(draws, same);
        let mut other = Sampler::new(1.0, Some(2), 4).unwrap();
        let diff: Vec<i64> = (0..200).map(|_| other.sample(&logits).unwrap()).collect();
        assert_ne!(draws, diff);
    }

    /// Empirical frequencies at T=2 match softmax(logits/2): 20000 draws, standard error
    /// of a frequency <= 0.0036, tolerance 0.02 (> 5 sigma).
    #[test]
    fn frequencies_follow_the_tempered_softmax() {
        let raw = [1.0f64, 0.0, -1.0];
        let logits = Tensor::from_slice(&raw);
        let mut s = Sampler::new(2.0, None, 9).unwrap();
        let mut counts = [0usize; 3];
        let n = 20_000;
        for _ in 0..n {
            counts[s.sample(&logits).unwrap() as usize] += 1;
        }
        let z: f64 = raw.iter().map(|l| (l / 2.0).exp()).sum();
        for (i, l) in raw.iter().enumerate() {
            let want = (l / 2.0).exp() / z;
            let got = counts[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.02, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(Sampler::new(-1.0, None, 0).is_err());
        assert!(Sampler::new(f64::NAN, None, 0).is_err());
        assert!(Sampler::new(1.0, Some(0), 0).is_err());
    }
}
