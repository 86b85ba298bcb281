//! Router: scores, deterministic top-k, capacity dropping and the router losses.
//!
//! Follows Megatron-Core's `moe_utils.topk_routing_with_score_function` (with
//! `group_limited_topk`, DeepSeek-V2/V3's device- and node-limited routing),
//! `compute_routing_scores_for_aux_loss` (softmax scores, or for sigmoid routing sigmoid scores
//! normalised over all E experts) and `switch_load_balancing_loss_func` (Switch Transformer,
//! Fedus et al. 2021; GShard, Lepikhin et al. 2020), the sequence-level loss of DeepSeek-V2
//! (`seq_aux_loss`), the z-loss of ST-MoE (Zoph et al. 2022) and DeepSeek-V3's aux-loss-free
//! bias balancing. The maths is written out in `shared/DESIGN.md`, "One training step on rank
//! r", step 2.
//!
//! Pure functions of tensors: no communicator. The global aux loss is split in two so that the
//! MoE layer can all-reduce the small statistics in between: [`route`] returns the local
//! [`AuxStats`], [`aux_loss`] turns the summed counts into this rank's share of the loss.
//!
//! Every floating kind works (the model passes f32 logits; the gradient tests use f64).

mod bias;
mod capacity;
mod losses;
mod route;
mod select;
mod topk_cpu;
mod traffic;

pub use bias::update_expert_bias;
pub use capacity::capacity;
pub use losses::{aux_loss, AuxStats};
pub use route::{route, RouterInput, Routing, TopK};
pub use traffic::{dispatch_traffic, DispatchTraffic};
