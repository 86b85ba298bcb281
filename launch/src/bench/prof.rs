//! temporary op profiling
use moe_model::config::MoeConfig;
use moe_model::router::{route, RouterInput};
use std::time::Instant;
use tch::{Device, Kind, Tensor};
fn t(name: &str, f: &dyn Fn() -> Tensor) {
    let _ = f();
    let mut v = vec![];
    for _ in 0..10 {
        let s = Instant::now();
        let _ = f();
        v.push(s.elapsed().as_secs_f64() * 1e3);
    }
    println!("{name}: {:.2} ms", super::median(&v));
}
pub fn prof() {
    tch::set_num_threads(1);
    let (n, e, k, d) = (4096i64, 256i64, 8i64, 256i64);
    let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu));
    let w = (Tensor::randn([d, e], (Kind::Float, Device::Cpu)) * 0.02).set_requires_grad(true);
    let l = x.matmul(&w);
    let cfg = MoeConfig { num_experts: e, top_k: k, ..MoeConfig::default() };
    t("matmul", &|| x.matmul(&w));
    t("topk", &|| l.topk(k, 1, true, false).1);
    t("route fwd", &|| {
        let r = route(&cfg, &RouterInput { logits_ne: &l, expert_bias_e: None, seq_len: n, capacity_groups: 1 }).unwrap();
        r.probs_ne
    });
    t("route fwd+bwd", &|| {
        let l = x.matmul(&w);
        let r = route(&cfg, &RouterInput { logits_ne: &l, expert_bias_e: None, seq_len: n, capacity_groups: 1 }).unwrap();
        let loss = r.probs_ne.sum(Kind::Float) + r.z_loss + r.aux_stats.probsum_e.sum(Kind::Float);
        loss.backward();
        loss
    });
    t("softmax", &|| l.softmax(1, Kind::Float));
    t("logsumexp", &|| l.logsumexp([1], false));
    let b = l.topk(k, 1, true, false).1;
    let m = Tensor::zeros([n, e], (Kind::Bool, Device::Cpu)).scatter_value(1, &b, 1);
    t("nonzero T", &|| m.transpose(0, 1).nonzero());
    t("nonzero_static", &|| m.nonzero_static(n * k, 0));
    let idx = b.flatten(0, 1).remainder(n);
    let xs = Tensor::randn([n * k, d], (Kind::Float, Device::Cpu));
    t("index_select", &|| x.index_select(0, &idx));
    t("index_add", &|| Tensor::zeros([n, d], (Kind::Float, Device::Cpu)).index_add(0, &idx, &xs));
    let idx_sorted = idx.sort(0, false).0;
    t("index_select sorted", &|| x.index_select(0, &idx_sorted));
    t("mul rows", &|| &xs * 2.0);
}
