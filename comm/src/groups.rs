//! The process groups of expert-parallel training.
//!
//! World size W = EP x DP. Ranks are laid out EP-major: the EP group of rank r is the
//! `ep_size` consecutive ranks `(r / P) * P .. (r / P + 1) * P`, and rank r holds global
//! experts `(r % P) * E/P .. (r % P + 1) * E/P`. The expert-data-parallel group of r is the
//! W/P ranks that hold the same experts (`r % P` equal). Dense parameters are replicated on
//! all W ranks.

use crate::{shared, CommError, Communicator, Result, SharedComm};

/// World, EP and expert-data-parallel communicators of one rank.
pub struct ProcessGroups {
    /// All ranks: dense gradient sync, router statistics, metrics.
    pub world: SharedComm,
    /// The ranks that together hold all experts once: token all-to-all.
    pub ep: SharedComm,
    /// The ranks holding the same experts: expert gradient sync.
    pub expert_dp: SharedComm,
    /// World rank and size, EP rank and size (cached so no lock is needed to read them).
    pub world_rank: usize,
    pub world_size: usize,
    pub ep_rank: usize,
    pub ep_size: usize,
}

impl ProcessGroups {
    /// Splits `world` into EP groups of `ep_size` consecutive ranks and the matching
    /// expert-data-parallel groups. Collective over `world`.
    pub fn new(mut world: Box<dyn Communicator>, ep_size: usize) -> Result<Self> {
        let (rank, size) = (world.rank(), world.size());
        if ep_size == 0 || size % ep_size != 0 {
            return Err(CommError::InvalidArgument {
                op: "ProcessGroups::new",
                msg: format!(
                    "world size ({size}) must be divisible by parallel.ep_size ({ep_size})"
                ),
            });
        }
        let ep = world.split(rank / ep_size, rank)?;
        let expert_dp = world.split(rank % ep_size, rank)?;
        Ok(Self {
            world: shared(world),
            ep: shared(ep),
            expert_dp: shared(expert_dp),
            world_rank: rank,
            world_size: size,
            ep_rank: rank % ep_size,
            ep_size,
        })
    }

    /// A single process on `device`: every group is the local size-1 group.
    pub fn single(device: tch::Device) -> Self {
        let local = crate::LocalComm::on(device);
        Self {
            world: shared(Box::new(local)),
            ep: shared(Box::new(local)),
            expert_dp: shared(Box::new(local)),
            world_rank: 0,
            world_size: 1,
            ep_rank: 0,
            ep_size: 1,
        }
    }
}
