//! Token dispatch: permute kept assignments by expert, exchange them over the EP group, and
//! combine the expert outputs back (Megatron-Core's token dispatchers; DESIGN.md steps 4-7).

mod alltoall;
mod permute;
mod token_dispatcher;

pub use permute::{permute, unpermute, Permutation};
pub use token_dispatcher::{DispatchMeta, Dispatcher};
