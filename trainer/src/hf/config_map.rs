//! Our experiment config <-> a Hugging Face `config.json`, driven by an [`ArchSpec`]'s
//! tables. Both sides are handled as JSON trees addressed by dotted keys.

use super::arch::{ArchSpec, Conv, LayerRule, RoutingRule, SharedRule};
use crate::config::ExperimentConfig;
use serde_json::{json, Map, Value};

/// `a.b.c` in `v`.
pub fn get_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

/// Sets `a.b.c` in `v`, creating objects on the way.
pub fn set_path(v: &mut Value, path: &str, value: Value) {
    let mut cur = v;
    let mut parts = path.split('.').peekable();
    while let Some(k) = parts.next() {
        if !cur.is_object() {
            *cur = Value::Object(Map::new());
        }
        let Value::Object(map) = cur else { return };
        if parts.peek().is_none() {
            map.insert(k.to_string(), value);
            return;
        }
        cur = map
            .entry(k.to_string())
            .or_insert(Value::Object(Map::new()));
    }
}

fn parse_fixed(json: &str) -> Value {
    // The tables hold literal JSON written in this crate; a typo is caught by the tests.
    serde_json::from_str(json).unwrap_or(Value::Null)
}

/// Equal as JSON, with numbers compared as f64 (`0` equals `0.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Why `cfg` cannot be exported to `spec` (each message names our key, its value and the
/// reason); empty when it can.
pub fn refusals(spec: &ArchSpec, cfg: &ExperimentConfig) -> Vec<String> {
    let ours = match serde_json::to_value(cfg) {
        Ok(v) => v,
        Err(e) => return vec![format!("serialising the config: {e}")],
    };
    let mut errs = Vec::new();
    let arch = spec.model_type;
    for f in spec.ours_fixed {
        let want = parse_fixed(f.json);
        let got = get_path(&ours, f.key).cloned().unwrap_or(Value::Null);
        if !same(&got, &want) {
            errs.push(format!(
                "{} ({}) cannot be exported to {arch}: {} (it needs {})",
                f.key,
                show(&got),
                f.why,
                show(&want)
            ));
        }
    }
    if cfg.moe.num_experts < 2 {
        errs.push(format!(
            "moe.num_experts ({}) cannot be exported to {arch}: it is an MoE architecture and \
             this is a dense model",
            cfg.moe.num_experts
        ));
    }
    match spec.routing {
        RoutingRule::Renormalized => {
            if cfg.moe.pre_softmax && !cfg.moe.renormalises_topk() {
                errs.push(format!(
                    "moe.pre_softmax (true) with moe.norm_topk_prob (false) cannot be exported \
                     to {arch}: its routing weights are renormalised to sum 1 over the top-k"
                ));
            }
        }
        RoutingRule::NormTopkKey => {}
    }
    match spec.layers {
        LayerRule::AllMoe => {}
        LayerRule::MlpOnlyLayers => {
            if !(0..cfg.model.num_layers).any(|i| cfg.moe.is_moe_layer(i)) {
                errs.push(format!(
                    "moe.first_dense_layers ({}) leaves no MoE block to export to {arch}",
                    cfg.moe.first_dense_layers
                ));
            }
        }
    }
    match spec.shared {
        SharedRule::None => {}
        SharedRule::OneGated => {
            if cfg.moe.num_shared_experts < 1 {
                errs.push(format!(
                    "moe.num_shared_experts (0) cannot be exported to {arch}: every MoE block \
                     has a shared expert (it needs >= 1)"
                ));
            }
        }
    }
    errs
}

/// Whether our routing renormalises the top-k weights to sum 1.
fn renormalises(cfg: &ExperimentConfig) -> bool {
    !cfg.moe.pre_softmax || cfg.moe.renormalises_topk()
}

/// The `config.json` of `cfg` for `spec`, with `dtype` (`float32` / `bfloat16`). Call
/// [`refusals`] first: this only translates.
pub fn export_config(spec: &ArchSpec, cfg: &ExperimentConfig, dtype: &str) -> Value {
    let mut resolved = cfg.clone();
    resolved.model.head_dim = Some(cfg.model.head_dim());
    let ours = serde_json::to_value(&resolved).unwrap_or(Value::Null);
    let top_k = cfg.moe.top_k.max(1) as f64;
    let mut out = json!({
        "architectures": [spec.class],
        "model_type": spec.model_type,
        "dtype": dtype,
        "use_cache": true,
        "bos_token_id": null,
        "eos_token_id": null,
        "pad_token_id": null,
    });
    for f in spec.hf_fixed {
        set_path(&mut out, f.key, parse_fixed(f.json));
    }
    for r in spec.config.iter().flat_map(|g| g.iter()) {
        let v = get_path(&ours, r.ours).cloned().unwrap_or(Value::Null);
        let v = match (r.conv, v.as_f64()) {
            (Conv::PerTopK, Some(x)) => json!(x / top_k),
            _ => v,
        };
        set_path(&mut out, r.hf, v);
    }
    if spec.routing == RoutingRule::NormTopkKey {
        set_path(&mut out, "norm_topk_prob", json!(renormalises(cfg)));
    }
    if spec.layers == LayerRule::MlpOnlyLayers {
        let dense: Vec<i64> = (0..cfg.model.num_layers)
            .filter(|&i| !cfg.moe.is_moe_layer(i))
            .collect();
        set_path(&mut out, "mlp_only_layers", json!(dense));
        set_path(&mut out, "decoder_sparse_step", json!(1));
    }
    if spec.shared == SharedRule::OneGated {
        set_path(
            &mut out,
            "shared_expert_intermediate_size",
            json!(cfg.moe.num_shared_experts * cfg.moe.shared_hidden()),
        );
    }
    out
}

/// `first_dense_layers` and `moe_every` giving exactly the MoE blocks `moe` of `layers`, if
/// any pair does.
fn layer_pattern(moe: &[bool]) -> Option<(i64, i64)> {
    let idx: Vec<i64> = (0..moe.len() as i64).filter(|&i| moe[i as usize]).collect();
    let first = *idx.first()?;
    let every = match idx.get(1) {
        Some(second) => second - first,
        None => moe.len() as i64 - first,
    };
    let probe = crate::config::ExperimentConfig::default().moe;
    let cfg = moe_model::config::MoeConfig {
        first_dense_layers: first,
        moe_every: every,
        ..probe
    };
    (0..moe.len() as i64)
        .all(|i| cfg.is_moe_layer(i) == moe[i as usize])
        .then_some((first, every))
}

/// Whether `v` can stand where our default `default` is (same JSON type; integers for
/// integers; anything where the default is null, i.e. an optional key).
fn type_fits(default: &Value, v: &Value) -> bool {
    match default {
        Value::Null => true,
        Value::Bool(_) => v.is_boolean(),
        Value::String(_) => v.is_string(),
        Value::Number(n) if n.is_f64() => v.is_number(),
        Value::Number(_) => v.is_i64() || v.is_u64(),
        _ => false,
    }
}

/// Our `model` and `moe` sections from a `config.json` of `spec`, every other section at its
/// default. Errors name each `config.json` key that is missing, mistyped, or has a value our
/// model does not compute.
pub fn import_config(
    spec: &ArchSpec,
    hf: &Value,
) -> std::result::Result<ExperimentConfig, Vec<String>> {
    let mut errs = Vec::new();
    let mut ours = serde_json::to_value(ExperimentConfig::default()).unwrap_or(Value::Null);
    let defaults = ours.clone();
    let top_k = get_path(hf, "num_experts_per_tok")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    for r in spec.config.iter().flat_map(|g| g.iter()) {
        let found = get_path(hf, r.hf).or_else(|| {
            (!r.legacy.is_empty())
                .then(|| get_path(hf, r.legacy))
                .flatten()
        });
        let default = get_path(&defaults, r.ours).cloned().unwrap_or(Value::Null);
        let Some(v) = found else {
            // Our optional keys (null by default, e.g. head_dim) may be absent there too.
            if !default.is_null() {
                errs.push(format!("missing field `{}`", r.hf));
            }
            continue;
        };
        let v = match (r.conv, v.as_f64()) {
            (Conv::PerTopK, Some(x)) => json!(x * top_k),
            _ => v.clone(),
        };
        // An explicit null head_dim means d_model / num_heads, as for us.
        if !type_fits(&default, &v) {
            errs.push(format!(
                "`{}` is {}, expected a value like {} (our {})",
                r.hf,
                show(&v),
                show(&default),
                r.ours
            ));
            continue;
        }
        set_path(&mut ours, r.ours, v);
    }
    for f in spec.hf_fixed {
        let want = parse_fixed(f.json);
        if let Some(got) = get_path(hf, f.key) {
            if !same(got, &want) {
                errs.push(format!(
                    "`{}` is {}: not supported, {} (it must be {})",
                    f.key,
                    show(got),
                    f.why,
                    show(&want)
                ));
            }
        }
    }
    for f in spec.ours_fixed {
        set_path(&mut ours, f.key, parse_fixed(f.json));
    }
    match spec.routing {
        RoutingRule::Renormalized => {
            set_path(&mut ours, "moe.pre_softmax", json!(false));
        }
        RoutingRule::NormTopkKey => match get_path(hf, "norm_topk_prob") {
            Some(Value::Bool(norm)) => set_path(&mut ours, "moe.pre_softmax", json!(!norm)),
            Some(v) => errs.push(format!(
                "`norm_topk_prob` is {}, expected true or false",
                show(v)
            )),
            None => errs.push("missing field `norm_topk_prob`".into()),
        },
    }
    if spec.layers == LayerRule::MlpOnlyLayers {
        import_layers(hf, &mut ours, &mut errs);
    }
    if spec.shared == SharedRule::OneGated {
        match get_path(hf, "shared_expert_intermediate_size").and_then(Value::as_i64) {
            Some(h) if h > 0 => {
                set_path(&mut ours, "moe.num_shared_experts", json!(1));
                set_path(&mut ours, "moe.shared_expert_hidden", json!(h));
            }
            Some(h) => errs.push(format!(
                "`shared_expert_intermediate_size` is {h}: it must be positive"
            )),
            None => errs.push(
                "missing field `shared_expert_intermediate_size` (a positive integer)".into(),
            ),
        }
    }
    if !errs.is_empty() {
        return Err(errs);
    }
    serde_json::from_value(ours).map_err(|e| vec![format!("translating the config: {e}")])
}

/// Our `first_dense_layers` / `moe_every` from `mlp_only_layers` and `decoder_sparse_step`.
fn import_layers(hf: &Value, ours: &mut Value, errs: &mut Vec<String>) {
    let n = get_path(hf, "num_hidden_layers")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let step = match get_path(hf, "decoder_sparse_step").and_then(Value::as_i64) {
        Some(s) if s > 0 => s,
        _ => {
            errs.push("missing field `decoder_sparse_step` (a positive integer)".into());
            return;
        }
    };
    let only: Vec<i64> = match get_path(hf, "mlp_only_layers").and_then(Value::as_array) {
        Some(a) => a.iter().filter_map(Value::as_i64).collect(),
        None => {
            errs.push("missing field `mlp_only_layers` (a list of block indices)".into());
            return;
        }
    };
    let moe: Vec<bool> = (0..n)
        .map(|i| !only.contains(&i) && (i + 1) % step == 0)
        .collect();
    match layer_pattern(&moe) {
        Some((first, every)) => {
            set_path(ours, "moe.first_dense_layers", json!(first));
            set_path(ours, "moe.moe_every", json!(every));
        }
        None => errs.push(format!(
            "`mlp_only_layers` ({only:?}) with `decoder_sparse_step` ({step}) make blocks {:?} \
             MoE blocks; moe.first_dense_layers and moe.moe_every cannot express that",
            (0..n).filter(|&i| moe[i as usize]).collect::<Vec<_>>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hf::arch::Arch;

    #[test]
    fn tables_hold_valid_json_and_known_keys() {
        let defaults = serde_json::to_value(ExperimentConfig::default()).unwrap();
        for a in Arch::ALL {
            let s = a.spec();
            for f in s.hf_fixed.iter().chain(s.ours_fixed) {
                assert!(serde_json::from_str::<Value>(f.json).is_ok(), "{}", f.json);
            }
            for f in s.ours_fixed {
                assert!(get_path(&defaults, f.key).is_some(), "{}", f.key);
            }
            for r in s.config.iter().flat_map(|g| g.iter()) {
                assert!(get_path(&defaults, r.ours).is_some(), "{}", r.ours);
            }
        }
    }

    /// Export then import gives back every mapped key (aux coefficient through `/k`, `*k`
    /// with k = 2: exact in binary).
    #[test]
    fn config_round_trip() {
        let mut cfg = ExperimentConfig::default();
        cfg.model.vocab_size = 300;
        cfg.model.head_dim = Some(48);
        cfg.model.rope_theta = 1e6;
        cfg.moe.aux_loss_coeff = 0.02;
        let spec = Arch::Mixtral.spec();
        assert!(refusals(spec, &cfg).is_empty());
        let hf = export_config(spec, &cfg, "float32");
        assert_eq!(hf["rope_parameters"]["rope_theta"], json!(1e6));
        assert_eq!(hf["router_aux_loss_coef"], json!(0.01));
        assert_eq!(hf["num_local_experts"], json!(8));
        let back = import_config(spec, &hf).unwrap();
        assert_eq!(back.model, cfg.model);
        assert_eq!(back.moe, cfg.moe);
    }

    /// Qwen's special keys both ways: dense blocks through `mlp_only_layers`, shared experts
    /// merged into one of width S*h, routing through `norm_topk_prob`.
    #[test]
    fn qwen_layers_shared_and_routing_round_trip() {
        let mut cfg = ExperimentConfig::default();
        cfg.model.num_layers = 6;
        cfg.model.qkv_bias = true;
        cfg.moe.first_dense_layers = 1;
        cfg.moe.moe_every = 2;
        cfg.moe.num_shared_experts = 2;
        cfg.moe.shared_expert_hidden = Some(64);
        cfg.moe.shared_expert_gate = true;
        cfg.moe.pre_softmax = true;
        let spec = Arch::Qwen2Moe.spec();
        assert!(
            refusals(spec, &cfg).is_empty(),
            "{:?}",
            refusals(spec, &cfg)
        );
        assert!(!refusals(Arch::Mixtral.spec(), &cfg).is_empty());
        assert!(!refusals(Arch::Qwen3Moe.spec(), &cfg).is_empty());
        let hf = export_config(spec, &cfg, "float32");
        assert_eq!(hf["mlp_only_layers"], json!([0, 2, 4]));
        assert_eq!(hf["decoder_sparse_step"], json!(1));
        assert_eq!(hf["shared_expert_intermediate_size"], json!(128));
        assert_eq!(hf["norm_topk_prob"], json!(false));
        assert_eq!(hf["qkv_bias"], json!(true));
        let back = import_config(spec, &hf).unwrap();
        assert_eq!((back.moe.first_dense_layers, back.moe.moe_every), (1, 2));
        assert_eq!(
            (back.moe.num_shared_experts, back.moe.shared_hidden()),
            (1, 128)
        );
        assert!(back.moe.pre_softmax && !back.moe.renormalises_topk());
        assert!(back.model.qkv_bias && back.moe.shared_expert_gate);
        // HF's own layout rule: every second block from block 1 is (1, 2) too.
        let mut hf2 = hf.clone();
        hf2["mlp_only_layers"] = json!([]);
        hf2["decoder_sparse_step"] = json!(2);
        let b2 = import_config(spec, &hf2).unwrap();
        assert_eq!((b2.moe.first_dense_layers, b2.moe.moe_every), (1, 2));
        // A pattern we cannot express is refused, naming the keys.
        hf2["mlp_only_layers"] = json!([1]);
        hf2["decoder_sparse_step"] = json!(1);
        let errs = import_config(spec, &hf2).unwrap_err();
        assert!(
            errs[0].starts_with(
                "`mlp_only_layers` ([1]) with `decoder_sparse_step` (1) make blocks [0, 2, 3, 4, 5]"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn refusals_name_the_key_and_why() {
        let mut cfg = ExperimentConfig::default();
        cfg.moe.route_scale = 2.5;
        cfg.moe.pre_softmax = true;
        let errs = refusals(Arch::Mixtral.spec(), &cfg);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("moe.route_scale (2.5) cannot be exported to mixtral"));
        assert!(errs[1].contains("moe.pre_softmax (true)"), "{errs:?}");
        // Model families no target computes: MLA attention, multi-token prediction, groups.
        let mut cfg = ExperimentConfig::default();
        cfg.model.attention.kind = moe_model::config::AttentionKind::Mla;
        cfg.model.mtp_depth = 1;
        cfg.moe.num_groups = Some(2);
        for a in Arch::ALL {
            let errs = refusals(a.spec(), &cfg);
            for key in [
                "model.attention.kind (mla)",
                "model.mtp_depth (1)",
                "moe.num_groups (2)",
            ] {
                assert!(errs.iter().any(|e| e.starts_with(key)), "{key}: {errs:?}");
            }
        }
    }

    #[test]
    fn import_names_missing_and_bad_fields() {
        let spec = Arch::Mixtral.spec();
        let mut hf = export_config(spec, &ExperimentConfig::default(), "float32");
        hf.as_object_mut().unwrap().remove("hidden_size");
        hf["hidden_act"] = json!("gelu");
        hf["num_local_experts"] = json!("eight");
        let errs = import_config(spec, &hf).unwrap_err();
        assert!(
            errs.iter().any(|e| e == "missing field `hidden_size`"),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.starts_with("`hidden_act` is gelu")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("`num_local_experts` is eight")),
            "{errs:?}"
        );
        // The older top-level rope_theta is read when rope_parameters is absent.
        let mut hf = export_config(spec, &ExperimentConfig::default(), "float32");
        hf.as_object_mut().unwrap().remove("rope_parameters");
        hf["rope_theta"] = json!(5e5);
        assert_eq!(import_config(spec, &hf).unwrap().model.rope_theta, 5e5);
    }
}
