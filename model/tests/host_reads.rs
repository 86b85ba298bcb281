//! Host reads are counted, not guessed (DESIGN.md, device discipline): one MoE layer forward
//! reads the host once — the rows per expert its dispatcher sends and receives — whatever the
//! routing (dropless, capacity dropping, padding) and whether the experts are local or spread
//! over an EP group. Every other value stays on the device until the trainer's one read per
//! step. A read added anywhere in the layer (`host_read`) fails this test; reads that bypass
//! `host_read` are caught by the source check in tests/tests/device_discipline.rs.

use moe_comm::threads::threads_world;
use moe_comm::{host_reads, ProcessGroups};
use moe_model::config::{DropPolicy, ExpertImpl, ModelConfig, MoeConfig};
use moe_model::dispatcher::Dispatcher;
use moe_model::moe_layer::{MoeForward, MoeLayer};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn configs(capacity: Option<f64>, pad: bool) -> (ModelConfig, MoeConfig) {
    let model = ModelConfig {
        d_model: 8,
        num_layers: 2,
        ..Default::default()
    };
    let moe = MoeConfig {
        num_experts: 4,
        top_k: 2,
        expert_hidden: 8,
        num_shared_experts: 1,
        shared_expert_hidden: Some(4),
        capacity_factor: capacity,
        drop_policy: DropPolicy::Probs,
        pad_to_capacity: pad,
        expert_impl: ExpertImpl::Grouped,
        ..Default::default()
    };
    (model, moe)
}

/// Host reads made by one forward + backward of `layer` on 16 tokens.
fn reads_of_one_forward(layer: &MoeLayer, disp: &Dispatcher) -> u64 {
    tch::manual_seed(5);
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let ctx = MoeForward {
        train: true,
        seq_len: 4,
        capacity_groups: 1,
        dispatcher: disp,
        jitter_seed: 0,
        compute_kind: Kind::Float,
    };
    let before = host_reads();
    let (y, stats) = layer.forward(&x, &ctx).unwrap();
    (y.sum(Kind::Float) + stats.aux_loss + stats.z_loss).backward();
    host_reads() - before
}

#[test]
fn one_host_read_per_moe_layer_forward_on_one_rank() {
    for (capacity, pad) in [(None, false), (Some(1.0), false), (Some(1.0), true)] {
        let (model, moe) = configs(capacity, pad);
        let layer = MoeLayer::new(&model, &moe, "layers.0.moe", 0, 1, 3, Device::Cpu).unwrap();
        assert_eq!(
            reads_of_one_forward(&layer, &Dispatcher::Local),
            1,
            "capacity {capacity:?}, pad {pad}"
        );
    }
}

#[test]
fn one_host_read_per_moe_layer_forward_per_rank_at_ep2() {
    let p = 2usize;
    let handles: Vec<_> = threads_world(p, Duration::from_secs(60))
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let groups = ProcessGroups::new(comm, p).unwrap();
                let disp = Dispatcher::from_groups(&groups);
                let (model, moe) = configs(Some(1.0), false);
                let layer = MoeLayer::new(
                    &model,
                    &moe,
                    "layers.0.moe",
                    rank as i64,
                    p as i64,
                    3,
                    Device::Cpu,
                )
                .unwrap();
                reads_of_one_forward(&layer, &disp)
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), 1, "rank {rank}");
    }
}
