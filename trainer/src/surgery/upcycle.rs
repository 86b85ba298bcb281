//! `moe upcycle`: a dense checkpoint to an MoE run whose first forward equals the dense one
//! (sparse upcycling, Komatsuzaki et al. 2022; granular upcycling as in Megatron-Core's
//! `upcycling_utils` and He et al. 2024, "Upcycling Large Language Models into Mixture of
//! Experts").
//!
//! Every dense FFN `(silu(x W_g) * (x W_u)) W_d` with hidden width h becomes E experts of width
//! h / G. A SwiGLU is a sum over its hidden units, so cutting h into G consecutive shards gives
//! `FFN(x) = sum_g FFN_g(x)`. Expert `e` is shard `g = e % G` of copy `c = e / G`; with G = 1
//! every expert is the whole FFN.
//!
//! Why the first forward is exact: routing is post-softmax top-k (the k weights sum to 1) and
//! dropless. The router's columns are equal within each copy (the G shards of copy c share
//! column c*G of a fresh router), so the G shards of a copy always have equal logits: the
//! top-k (k a multiple of G) then holds whole copies, each shard of a selected copy with the
//! same weight `w_c / G`, `sum_c w_c = 1`. Scaling each shard's `W_d` by G gives
//! `y = sum_c w_c / G * sum_g G * FFN_g(x) = FFN(x)`. With G = 1 no scaling is needed and any
//! router works. The scale sits in the weights rather than in `moe.route_scale`, so the
//! upcycled model keeps the plain routing that HF Mixtral/Qwen computes (and exports).
//! Attention, norms and embeddings are copied; the optimizer state starts fresh at step 0.

use super::report::{ModelSize, SurgeryReport};
use super::run_out::{load_val_data, val_loss, StagedRun};
use crate::checkpoint::CheckpointReader;
use crate::config::ExperimentConfig;
use crate::hf::export::checkpoint_config;
use crate::hf::HfError;
use crate::inference::load_single;
use moe_model::config::ScoreFunction;
use moe_model::param::ParamKind;
use moe_model::transformer::TransformerLm;
use moe_model::ExpertParallel;
use std::collections::BTreeSet;
use std::path::Path;
use tch::{Device, Tensor};

/// What to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpcycleOptions {
    /// Routed experts E per MoE layer (`--experts`).
    pub experts: i64,
    /// Experts per token k (`--top-k`), a multiple of the granularity.
    pub top_k: i64,
    /// Shards per dense FFN G (`--granularity`): experts are h / G wide.
    pub granularity: i64,
}

use super::run_out::failed;

/// Expert copies of a dense `[d, h]` projection (`w_gate`, `w_up`): expert `e` gets the
/// columns of shard `e % g`, `[e, d, h / g]`.
pub fn upcycle_in_proj(w_dh: &Tensor, experts: i64, g: i64) -> Result<Tensor, HfError> {
    let (d, h) = match w_dh.size().as_slice() {
        [d, h] => (*d, *h),
        s => {
            return Err(failed(format!(
                "dense projection has shape {s:?}, not [d, h]"
            )))
        }
    };
    check_split(h, experts, g)?;
    // [d, g, h/g] -> [g, d, h/g], then copy-major repeats: index c*g + s is shard s.
    let shards_gdh = w_dh
        .f_reshape([d, g, h / g])
        .and_then(|t| t.f_permute([1, 0, 2]))
        .map_err(failed)?;
    shards_gdh
        .f_repeat([experts / g, 1, 1])
        .and_then(|t| t.f_contiguous())
        .map_err(failed)
}

/// Expert copies of a dense `[h, d]` down projection: expert `e` gets the rows of shard
/// `e % g`, times `g` (see the module doc), `[e, h / g, d]`.
pub fn upcycle_out_proj(w_hd: &Tensor, experts: i64, g: i64) -> Result<Tensor, HfError> {
    let (h, d) = match w_hd.size().as_slice() {
        [h, d] => (*h, *d),
        s => {
            return Err(failed(format!(
                "dense projection has shape {s:?}, not [h, d]"
            )))
        }
    };
    check_split(h, experts, g)?;
    w_hd.f_reshape([g, h / g, d])
        .and_then(|t| t.f_mul_scalar(g as f64))
        .and_then(|t| t.f_repeat([experts / g, 1, 1]))
        .and_then(|t| t.f_contiguous())
        .map_err(failed)
}

/// A router `[d, e]` whose G columns of each copy equal the copy's first column of `init_de`
/// (so the shards of a copy tie exactly); `init_de` itself when `g` is 1.
pub fn upcycle_router(init_de: &Tensor, g: i64) -> Result<Tensor, HfError> {
    let e = init_de.size().get(1).copied().unwrap_or(0);
    if g <= 0 || e % g != 0 {
        return Err(failed(format!("router of {e} experts, granularity {g}")));
    }
    let idx: Vec<i64> = (0..e).map(|i| (i / g) * g).collect();
    let idx = Tensor::from_slice(&idx).to_device(init_de.device());
    init_de.f_index_select(1, &idx).map_err(failed)
}

fn check_split(h: i64, experts: i64, g: i64) -> Result<(), HfError> {
    if g <= 0 || h % g != 0 || experts % g != 0 {
        return Err(failed(format!(
            "cannot cut hidden width {h} into {g} shards for {experts} experts"
        )));
    }
    Ok(())
}

/// The upcycled run's config: `src` with `opts`' MoE and the routing the module doc needs
/// (post-softmax, dropless, no groups or shared experts, `route_scale` 1). Each argument
/// error names its flag. Returns the config and one note per setting changed.
pub fn upcycle_config(
    src: &ExperimentConfig,
    opts: &UpcycleOptions,
    source: &Path,
) -> Result<(ExperimentConfig, Vec<String>), HfError> {
    let (e, k, g) = (opts.experts, opts.top_k, opts.granularity);
    let h = src.model.ffn_hidden;
    let mut errs = Vec::new();
    if src.moe.has_moe() {
        errs.push(format!(
            "--checkpoint {}: the model already has MoE layers (moe.num_experts {}, \
             moe.num_shared_experts {}); upcycle takes a dense model (moe.num_experts 1, no \
             shared experts)",
            source.display(),
            src.moe.num_experts,
            src.moe.num_shared_experts
        ));
    }
    if e < 2 {
        errs.push(format!("--experts ({e}) must be at least 2"));
    }
    if g < 1 {
        errs.push(format!("--granularity ({g}) must be at least 1"));
    } else {
        if h % g != 0 {
            errs.push(format!(
                "--granularity ({g}) must divide the dense model.ffn_hidden ({h})"
            ));
        }
        if e % g != 0 {
            errs.push(format!("--granularity ({g}) must divide --experts ({e})"));
        }
        if k % g != 0 {
            errs.push(format!(
                "--top-k ({k}) must be a multiple of --granularity ({g}): a token takes whole \
                 copies of the dense FFN, so the first forward equals the dense one"
            ));
        }
    }
    if k < 1 || k > e {
        errs.push(format!("--top-k ({k}) must be in 1..=--experts ({e})"));
    }
    if !errs.is_empty() {
        return Err(HfError::Input(errs.join("\n")));
    }
    let mut cfg = src.clone();
    let mut notes = Vec::new();
    let m = &mut cfg.moe;
    m.num_experts = e;
    m.top_k = k;
    m.expert_hidden = h / g;
    if m.score_function != ScoreFunction::Softmax || m.pre_softmax {
        notes.push("routing set to post-softmax top-k (the weights of a token sum to 1)".into());
    }
    m.score_function = ScoreFunction::Softmax;
    m.pre_softmax = false;
    m.norm_topk_prob = None;
    if m.route_scale != 1.0 {
        notes.push(format!("moe.route_scale {} -> 1", m.route_scale));
    }
    m.route_scale = 1.0;
    if let Some(cf) = m.capacity_factor.take() {
        notes.push(format!(
            "moe.capacity_factor {cf} -> null (dropless, so no token loses its FFN)"
        ));
    }
    m.num_groups = None;
    m.group_topk = None;
    m.shared_expert_gate = false;
    if cfg.parallel.ep_size <= 0 || e % cfg.parallel.ep_size != 0 {
        notes.push(format!(
            "parallel.ep_size {} does not divide {e} experts: set to 1",
            cfg.parallel.ep_size
        ));
        cfg.parallel.ep_size = 1;
    }
    Ok((cfg, notes))
}

/// `layers.{i}.moe.experts.w_gate` -> `(layers.{i}.ffn.w_gate, w_gate)`.
fn dense_source(expert_param: &str) -> Option<(String, &str)> {
    let (head, proj) = expert_param.rsplit_once('.')?;
    let block = head.strip_suffix(".moe.experts")?;
    Some((format!("{block}.ffn.{proj}"), proj))
}

/// Upcycles the dense checkpoint `ckpt` into the new run directory `run_dir`. `render_yaml`
/// writes the config as the binary's loader reads it back.
pub fn upcycle(
    ckpt: &Path,
    run_dir: &Path,
    opts: &UpcycleOptions,
    render_yaml: &dyn Fn(&ExperimentConfig) -> Result<String, String>,
) -> Result<SurgeryReport, HfError> {
    let reader = CheckpointReader::open(ckpt).map_err(|e| HfError::Input(e.to_string()))?;
    let src = checkpoint_config(&reader)?;
    let (mut cfg, notes) = upcycle_config(&src, opts, ckpt)?;
    let staged = StagedRun::new(run_dir, &mut cfg)?;

    let model = TransformerLm::new(
        &cfg.model,
        &cfg.moe,
        &ExpertParallel::single(),
        cfg.run.seed,
        Device::Cpu,
    )
    .map_err(|e| HfError::Input(e.to_string()))?;
    let g = opts.granularity;
    let mut used = BTreeSet::new();
    let read = |name: &str, used: &mut BTreeSet<String>| -> Result<Tensor, HfError> {
        used.insert(name.to_string());
        reader.read(name).map_err(|e| HfError::Input(e.to_string()))
    };
    tch::no_grad(|| -> Result<(), HfError> {
        for p in model.params() {
            let mut dst = p.tensor.shallow_clone();
            let value = match (p.kind, dense_source(&p.name)) {
                (ParamKind::Expert { .. }, Some((src_name, proj))) => {
                    let w = read(&src_name, &mut used)?;
                    if proj == "w_down" {
                        upcycle_out_proj(&w, cfg.moe.num_experts, g)?
                    } else {
                        upcycle_in_proj(&w, cfg.moe.num_experts, g)?
                    }
                }
                _ if p.name.ends_with(".moe.w_router") => upcycle_router(&p.tensor, g)?,
                _ => read(&p.name, &mut used)?,
            };
            if value.size() != dst.size() {
                return Err(HfError::Input(format!(
                    "{}: tensor {} has shape {:?}, the upcycled model needs {:?}",
                    ckpt.display(),
                    p.name,
                    value.size(),
                    dst.size()
                )));
            }
            dst.f_copy_(&value).map_err(failed)?;
        }
        Ok(())
    })?;
    let unused: Vec<&str> = reader
        .model_names()
        .filter(|n| !used.contains(*n))
        .collect();
    if !unused.is_empty() {
        return Err(HfError::Input(format!(
            "{}: tensors the upcycled model has no place for: {}",
            ckpt.display(),
            unused.join(", ")
        )));
    }

    // Validation loss before (the dense checkpoint as `moe eval` loads it) and after.
    let data = load_val_data(&cfg);
    let (mut before, mut after) = (None, None);
    let world = reader.manifest().world_size.max(1);
    let mut notes = notes;
    match &data {
        Ok(ds) => {
            let mut single = src.clone();
            single.parallel.ep_size = 1;
            let (dense, _) = load_single(&single, ckpt, Device::Cpu)
                .map_err(|e| HfError::Input(e.to_string()))?;
            before = Some(val_loss(&dense, &single, ds, world)?);
            after = Some(val_loss(&model, &cfg, ds, world)?);
        }
        Err(e) => notes.push(format!("validation loss not measured: {e}")),
    }
    let report = SurgeryReport {
        command: format!(
            "upcycle --experts {} --top-k {} --granularity {g}",
            opts.experts, opts.top_k
        ),
        source: std::path::absolute(ckpt).unwrap_or_else(|_| ckpt.to_path_buf()),
        run_dir: staged.run_dir().to_path_buf(),
        checkpoint: Default::default(),
        before: ModelSize::of(&src, src.parallel.ep_size)?,
        after: ModelSize::of(&cfg, cfg.parallel.ep_size)?,
        val_loss_before: before,
        val_loss_after: after,
        notes,
        slim: Default::default(),
    };
    let extra = serde_json::json!({
        "data_step": 0,
        "seed": cfg.run.seed,
        "upcycled_from": ckpt.display().to_string(),
    });
    staged.finish(&cfg, &model, extra, render_yaml, report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn t(v: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).reshape(shape)
    }

    /// d = 1, h = 4, G = 2, E = 4: experts 0 and 2 take hidden units {0, 1}, experts 1 and 3
    /// units {2, 3} (by hand from the layout rule `e % G`); exact copies, no tolerance.
    #[test]
    fn shards_by_hand() {
        let w_gate = t(&[1., 2., 3., 4.], &[1, 4]);
        let up = upcycle_in_proj(&w_gate, 4, 2).unwrap();
        assert_eq!(up.size(), [4, 1, 2]);
        let got = Vec::<f32>::try_from(up.reshape([-1])).unwrap();
        assert_eq!(got, [1., 2., 3., 4., 1., 2., 3., 4.]);
        // Down [h=4, d=1], rows 0..2 to shard 0 and 2..4 to shard 1, times G = 2.
        let w_down = t(&[1., 2., 3., 4.], &[4, 1]);
        let down = upcycle_out_proj(&w_down, 4, 2).unwrap();
        assert_eq!(down.size(), [4, 2, 1]);
        let got = Vec::<f32>::try_from(down.reshape([-1])).unwrap();
        assert_eq!(got, [2., 4., 6., 8., 2., 4., 6., 8.]);
        // Router [d=1, 4]: columns 0, 1 take column 0; columns 2, 3 column 2.
        let r = upcycle_router(&t(&[5., 6., 7., 8.], &[1, 4]), 2).unwrap();
        assert_eq!(
            Vec::<f32>::try_from(r.reshape([-1])).unwrap(),
            [5., 5., 7., 7.]
        );
        // G = 1: every expert is the whole FFN, unscaled.
        let down1 = upcycle_out_proj(&w_down, 3, 1).unwrap();
        assert_eq!(down1.size(), [3, 4, 1]);
        assert_eq!(
            Vec::<f32>::try_from(down1.reshape([-1])).unwrap(),
            [1., 2., 3., 4., 1., 2., 3., 4., 1., 2., 3., 4.]
        );
    }

    /// The SwiGLU identity the scheme rests on: on random weights, the shards of one copy,
    /// each weighted 1/G, sum to the dense FFN. Float32 sums of 8 terms: 1e-6 relative.
    #[test]
    fn weighted_shards_sum_to_the_dense_ffn() {
        tch::manual_seed(0);
        let (d, h, g, e) = (3, 8, 4, 8);
        let w_gate = Tensor::randn([d, h], (Kind::Float, Device::Cpu));
        let w_up = Tensor::randn([d, h], (Kind::Float, Device::Cpu));
        let w_down = Tensor::randn([h, d], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([5, d], (Kind::Float, Device::Cpu));
        let ffn = |x: &Tensor, a: &Tensor, b: &Tensor, c: &Tensor| {
            (x.matmul(a).silu() * x.matmul(b)).matmul(c)
        };
        let dense = ffn(&x, &w_gate, &w_up, &w_down);
        let (eg, eu, ed) = (
            upcycle_in_proj(&w_gate, e, g).unwrap(),
            upcycle_in_proj(&w_up, e, g).unwrap(),
            upcycle_out_proj(&w_down, e, g).unwrap(),
        );
        // Copy 1 = experts 4..8.
        let mut sum = Tensor::zeros_like(&dense);
        for i in 4..8 {
            sum += ffn(&x, &eg.get(i), &eu.get(i), &ed.get(i)) / g as f64;
        }
        let diff = (&sum - &dense).abs().max().double_value(&[]);
        let scale = dense.abs().max().double_value(&[]);
        assert!(diff <= 1e-6 * scale.max(1.0), "diff {diff}, scale {scale}");
    }

    #[test]
    fn bad_arguments_name_their_flag() {
        let mut src = ExperimentConfig::default();
        src.moe.num_experts = 1;
        src.moe.top_k = 1;
        src.model.ffn_hidden = 48;
        let p = Path::new("ckpt");
        let err = |e, k, g| match upcycle_config(
            &src,
            &UpcycleOptions {
                experts: e,
                top_k: k,
                granularity: g,
            },
            p,
        ) {
            Err(HfError::Input(m)) => m,
            other => panic!("expected an input error, got {other:?}"),
        };
        assert!(err(1, 1, 1).contains("--experts (1)"));
        assert!(err(4, 5, 1).contains("--top-k (5)"));
        assert!(err(4, 0, 1).contains("--top-k (0)"));
        assert!(err(8, 2, 5).contains("--granularity (5) must divide the dense"));
        assert!(err(8, 3, 2).contains("--top-k (3) must be a multiple"));
        assert!(err(8, 2, 0).contains("--granularity (0)"));
        let (cfg, _) = upcycle_config(
            &src,
            &UpcycleOptions {
                experts: 8,
                top_k: 4,
                granularity: 2,
            },
            p,
        )
        .unwrap();
        assert_eq!(
            (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.expert_hidden),
            (8, 4, 24)
        );
        let mut moe = src.clone();
        moe.moe.num_experts = 4;
        let r = upcycle_config(
            &moe,
            &UpcycleOptions {
                experts: 8,
                top_k: 2,
                granularity: 1,
            },
            p,
        );
        assert!(matches!(r, Err(HfError::Input(m)) if m.contains("already has MoE layers")));
    }
}
