//! Host reads are counted, not guessed (DESIGN.md, device discipline): one MoE layer forward
//! reads the host once — the rows per expert its dispatcher sends and receives — whatever the
//! routing (dropless, capacity dropping, padding) and whether the experts are local or spread
//! over an EP group. Every other value stays on the device until the trainer's one read per
//! step. A read added anywhere in the layer (`host_read`) fails this test; reads that bypass
//! `host_read` are caught by the source check in tests/tests/device_discipline.rs.

use moe_comm::threads::threads_world;
use moe_comm::{host_reads, ProcessGroups};
use moe_model::config::{DropPolicy, ExpertImpl, ModelConfig, MoeConfig};
use moe_model::moe_layer::{MoeForward, MoeLayer};
use moe_model::{ExpertParallel, ParamBuilder};
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
fn reads_of_one_forward(layer: &MoeLayer) -> u64 {
    tch::manual_seed(5);
    let x = Tensor::randn([16, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let ctx = MoeForward {
        train: true,
        seq_len: 4,
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
        let par = ExpertParallel::single();
        let layer = MoeLayer::new(
            &model,
            &moe,
            &ParamBuilder::new(3, Device::Cpu).pp("layers.0.moe"),
            &par,
        )
        .unwrap();
        assert_eq!(
            reads_of_one_forward(&layer),
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
                let par = ExpertParallel::from_groups(&groups);
                assert_eq!(par.dispatcher().ep_rank(), rank as i64);
                let (model, moe) = configs(Some(1.0), false);
                let layer = MoeLayer::new(
                    &model,
                    &moe,
                    &ParamBuilder::new(3, Device::Cpu).pp("layers.0.moe"),
                    &par,
                )
                .unwrap();
                reads_of_one_forward(&layer)
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), 1, "rank {rank}");
    }
}

/// Pure data parallelism (two ranks, EP size 1): every expert is local, so the layer takes the
/// local path (no all-to-all, not even of size 1) and still reads the host once; its router
/// statistics are summed over both ranks (16 tokens x top-2 each, dropless).
#[test]
fn data_parallel_ranks_dispatch_locally_with_one_host_read() {
    let p = 2usize;
    let handles: Vec<_> = threads_world(p, Duration::from_secs(60))
        .into_iter()
        .map(|comm| {
            std::thread::spawn(move || {
                tch::set_num_threads(1);
                let groups = ProcessGroups::new(comm, 1).unwrap();
                let par = ExpertParallel::from_groups(&groups);
                assert!(par.dispatcher().is_local());
                assert_eq!(par.dispatcher().world_size(), 2);
                let (model, moe) = configs(None, false);
                let layer = MoeLayer::new(
                    &model,
                    &moe,
                    &ParamBuilder::new(3, Device::Cpu).pp("layers.0.moe"),
                    &par,
                )
                .unwrap();
                let reads = reads_of_one_forward(&layer);
                let x = Tensor::ones([16, 8], (Kind::Float, Device::Cpu));
                let ctx = MoeForward {
                    train: false,
                    seq_len: 4,
                    jitter_seed: 0,
                    compute_kind: Kind::Float,
                };
                let (_, stats) = layer.forward(&x, &ctx).unwrap();
                (reads, stats.load_e.sum(Kind::Float).double_value(&[]))
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        let (reads, load) = h.join().unwrap();
        assert_eq!(reads, 1, "rank {rank}");
        assert_eq!(
            load,
            (2 * 16 * 2) as f64,
            "rank {rank}: load summed over both ranks"
        );
    }
}
