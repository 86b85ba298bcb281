//! Checkpoint round trips: EP=1, resharding EP=4 -> 2 -> 1 -> 4, the Python `safetensors`
//! package reading our files, and mismatch errors that name the tensor, shapes and file.
//! Values must come back bit-identical (tolerance 0): checkpoints copy float32 bytes.

mod checkpoint_util;

use checkpoint_util::*;
use moe_model::param::{Param, ParamKind};
use moe_trainer::checkpoint::{
    config_mismatch, find_latest_intact, load_for_rank, Checkpointer, ExpertSlot,
};
use std::process::Command;
use tch::Tensor;

#[test]
fn round_trip_at_ep1() {
    tch::set_num_threads(1);
    let dir = tmpdir("rt1");
    let mut ckpt = Checkpointer::new(&dir, 2, 0, 0, 1, 1).unwrap();
    let at = ckpt.save(snapshot(FX, 0, 1, 7)).unwrap();
    ckpt.wait().unwrap();
    assert_eq!(at, dir.join("step-00000007"));

    let (path, warnings) = find_latest_intact(&dir).unwrap().unwrap();
    assert_eq!(path, at);
    assert!(warnings.is_empty(), "{warnings:?}");
    let loaded = load_for_rank(&path, &slots(FX, 0, 1)).unwrap();
    assert_eq!((loaded.step, loaded.optim_step), (7, 6));
    assert_eq!(
        loaded.extra,
        serde_json::json!({ "rng": [1, 2, 3], "cursor": 70 })
    );
    assert_eq!(loaded.config_yaml, snapshot(FX, 0, 1, 7).config_yaml);
    assert_eq!(
        (loaded.manifest.world_size, loaded.manifest.ep_size),
        (1, 1)
    );
    assert_loaded_matches(&loaded, FX, 0, 1);

    // copy_into restores a zeroed model exactly.
    let (params, buffers, _) = rank_state(FX, 0, 1);
    let zeroed: Vec<Param> = params
        .iter()
        .map(|p| Param {
            name: p.name.clone(),
            tensor: p.tensor.zeros_like(),
            kind: p.kind,
            weight_decay: p.weight_decay,
        })
        .collect();
    let zero_bufs: Vec<(String, Tensor)> = buffers
        .iter()
        .map(|(n, t)| (n.clone(), t.zeros_like()))
        .collect();
    loaded.copy_into(&zeroed, &zero_bufs).unwrap();
    for (p, z) in params.iter().zip(&zeroed) {
        assert_same(&z.tensor, &p.tensor, &p.name);
    }
    for ((n, b), (_, z)) in buffers.iter().zip(&zero_bufs) {
        assert_same(z, b, n);
    }
}

#[test]
fn written_at_ep4_loads_at_ep2_ep1_and_back() {
    tch::set_num_threads(1);
    let dir = tmpdir("reshard");
    // EP=4 over a world of 8: ranks 4..7 are the second replica and write nothing.
    save_all_ranks(&dir, FX, 4, 8, 1, 5);
    let ep4 = dir.join("step-00000001");
    let m = moe_trainer::checkpoint::read_manifest(&ep4).unwrap();
    let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "dense.safetensors",
            "experts-r0.safetensors",
            "experts-r1.safetensors",
            "experts-r2.safetensors",
            "experts-r3.safetensors"
        ]
    );
    assert!(m.experts.iter().all(|e| e.num_experts == FX.e));
    assert_eq!(
        m.experts.len(),
        3 * EXPERT_PARAMS.len(),
        "params + exp_avg + exp_avg_sq"
    );

    for r in 0..2 {
        assert_loaded_matches(&load_for_rank(&ep4, &slots(FX, r, 2)).unwrap(), FX, r, 2);
    }
    assert_loaded_matches(&load_for_rank(&ep4, &slots(FX, 0, 1)).unwrap(), FX, 0, 1);

    // Write again at EP=2 and EP=1, each time checking every layout reads it back.
    save_all_ranks(&dir, FX, 2, 2, 2, 5);
    save_all_ranks(&dir, FX, 1, 1, 3, 5);
    for step in [2, 3] {
        let path = dir.join(format!("step-{step:08}"));
        for ep in [1, 2, 4] {
            for r in 0..ep {
                let loaded = load_for_rank(&path, &slots(FX, r, ep)).unwrap();
                assert_loaded_matches(&loaded, FX, r, ep);
            }
        }
    }
}

#[test]
fn python_safetensors_reads_the_files() {
    tch::set_num_threads(1);
    let dir = tmpdir("py");
    save_all_ranks(&dir, FX, 2, 2, 4, 1);
    let ckpt = dir.join("step-00000004");
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/bin/python");
    let script = "import json, sys\n\
                  from safetensors.numpy import load_file\n\
                  d = load_file(sys.argv[1])\n\
                  print(json.dumps({k: [list(v.shape), str(v.dtype), float(v.ravel()[-1])] \
                  for k, v in d.items()}))";
    let run = |file: &str| -> serde_json::Value {
        let out = Command::new(python)
            .arg("-c")
            .arg(script)
            .arg(ckpt.join(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    // Last element of each tensor. Both sides are float32 values; serde_json's f64 parsing
    // may be off by an ulp of f64, so compare after rounding back to f32 (exact there).
    let last = |t: &Tensor| t.reshape([-1]).double_value(&[t.numel() as i64 - 1]) as f32;
    let f32_of = |v: &serde_json::Value| v.as_f64().unwrap() as f32;

    let dense = run("dense.safetensors");
    let (params, buffers, optim) = rank_state(FX, 1, 2);
    let mut want = 0;
    for (name, t) in params
        .iter()
        .filter(|p| p.kind == ParamKind::Dense)
        .map(|p| (p.name.clone(), &p.tensor))
        .chain(buffers.iter().map(|(n, t)| (n.clone(), t)))
    {
        let got = &dense[&name];
        assert_eq!(got[0], serde_json::json!(t.size()), "{name}");
        assert_eq!(got[1], "float32", "{name}");
        assert_eq!(f32_of(&got[2]), last(t), "{name}");
        want += 1;
    }
    for (name, t) in optim.iter().filter(|(n, _)| !n.contains(".experts.")) {
        let got = &dense[&format!("optim.{name}")];
        assert_eq!(got[0], serde_json::json!(t.size()), "{name}");
        assert_eq!(f32_of(&got[2]), last(t), "{name}");
        want += 1;
    }
    assert_eq!(dense.as_object().unwrap().len(), want);

    // Rank 1 of EP=2 holds global experts 4..8, one tensor per expert.
    let experts = run("experts-r1.safetensors");
    assert_eq!(experts.as_object().unwrap().len(), 3 * 3 * 4);
    let w_gate = params.iter().find(|p| p.name == EXPERT_PARAMS[0]).unwrap();
    for (i, g) in (4..8).enumerate() {
        let got = &experts[&format!("layers.1.moe.experts.{g}.w_gate")];
        assert_eq!(got[0], serde_json::json!([FX.d, FX.h]));
        assert_eq!(f32_of(&got[2]), last(&w_gate.tensor.get(i as i64)));
        let got = &experts[&format!("optim.layers.1.moe.experts.{g}.w_down.exp_avg_sq")];
        assert_eq!(got[0], serde_json::json!([FX.h, FX.d]));
    }
}

#[test]
fn mismatches_name_tensor_shapes_and_file() {
    tch::set_num_threads(1);
    let dir = tmpdir("mismatch");
    let mut ckpt = Checkpointer::new(&dir, 1, 0, 0, 1, 1).unwrap();
    let path = ckpt.save(snapshot(FX, 0, 1, 1)).unwrap();
    ckpt.wait().unwrap();

    // A model with d = 4 instead of 8 (same experts count).
    let small = Fx { d: 4, ..FX };
    let loaded = load_for_rank(&path, &slots(small, 0, 1)).unwrap();
    let (params, mut buffers, _) = rank_state(small, 0, 1);
    // The expert-bias buffer has the same shape in both: it must still not be written.
    buffers[0].1 = buffers[0].1.zeros_like();
    let err = loaded.copy_into(&params, &buffers).unwrap_err().to_string();
    let dense = path.join("dense.safetensors");
    assert!(
        err.contains(&format!(
            "layers.0.attn.wq: checkpoint [8, 8], model [4, 4] in {}",
            dense.display()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "layers.1.moe.experts.w_gate: checkpoint [8, 8, 12], model [8, 4, 12] in {}",
            path.join("experts-r0.safetensors").display()
        )),
        "{err}"
    );
    // Nothing was copied: every check runs before any write.
    assert_eq!(
        buffers[0].1.abs().sum(tch::Kind::Float).double_value(&[]),
        0.0
    );

    // A different number of experts.
    let more = Fx { e: 16, ..FX };
    let err = load_for_rank(&path, &slots(more, 0, 1))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("num_experts differs: checkpoint 8, model 16"),
        "{err}"
    );
    assert!(err.contains("manifest.json"), "{err}");

    // A parameter the checkpoint lacks, and one the model lacks.
    let (mut params, buffers, _) = rank_state(FX, 0, 1);
    params.push(Param {
        name: "layers.2.attn.wq".into(),
        tensor: Tensor::zeros([8, 8], (tch::Kind::Float, tch::Device::Cpu)),
        kind: ParamKind::Dense,
        weight_decay: true,
    });
    params.retain(|p| p.name != "embed.weight");
    let err = loaded.copy_into(&params, &buffers).unwrap_err().to_string();
    assert!(err.contains("missing tensor layers.2.attn.wq"), "{err}");
    assert!(err.contains("unexpected tensor embed.weight in"), "{err}");
    assert!(
        err.contains("optimizer state embed.weight.exp_avg in"),
        "{err}"
    );

    let missing_slot = ExpertSlot {
        name: "layers.9.moe.experts.w_up".into(),
        first_global: 0,
        num_local: 8,
        num_experts: 8,
    };
    let err = load_for_rank(&path, &[missing_slot])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing tensor layers.9.moe.experts.w_up"),
        "{err}"
    );

    let diff = config_mismatch(&loaded.config_yaml, &snapshot(more, 0, 1, 1).config_yaml);
    assert_eq!(
        diff,
        ["line 4: checkpoint `  num_experts: 8`, now `  num_experts: 16`"]
    );
}
