//! Token dispatch: permute kept assignments by expert, exchange them over the EP group, and
//! combine the expert outputs back (Megatron-Core's token dispatchers; DESIGN.md steps 4-7).

mod alltoall;
mod combine_cpu;
mod permute;
mod token_dispatcher;

pub use permute::{permute, permute_topk, unpermute, Permutation};
pub use token_dispatcher::{DispatchMeta, Dispatcher};
