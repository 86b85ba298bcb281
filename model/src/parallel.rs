//! Where a model's MoE layers sit in expert parallelism, fixed once when the model is built.
//!
//! Megatron-Core's `MoELayer.__init__` builds its token dispatcher from the process groups and
//! keeps it; so does [`crate::moe_layer::MoeLayer`] here: the experts a layer holds and the
//! communication that reaches them come from this one value, and a forward takes neither.

use crate::dispatcher::Dispatcher;
use moe_comm::ProcessGroups;

/// How a model's MoE layers are placed and reach their experts.
#[derive(Debug, Clone)]
pub struct ExpertParallel {
    /// The dispatcher every MoE layer owns a clone of; its EP rank and size decide which
    /// global experts the layer holds (`ep_rank*E/P .. (ep_rank+1)*E/P`).
    pub(crate) dispatcher: Dispatcher,
    /// The router computes capacity per group of `N / capacity_groups` tokens: 1 in real runs;
    /// P in the single-process reference of an EP=P run (virtual debug ranks, EP-equivalence
    /// tests), which then drops exactly what P ranks would.
    pub(crate) capacity_groups: i64,
}

impl ExpertParallel {
    /// One process holding every expert: no communication.
    pub fn single() -> Self {
        Self::with_dispatcher(Dispatcher::local())
    }

    /// A rank of these process groups: experts sharded over `groups.ep` (exchanged by
    /// all-to-all when it has more than one rank), router statistics summed over
    /// `groups.world`.
    pub fn from_groups(groups: &ProcessGroups) -> Self {
        Self::with_dispatcher(Dispatcher::from_groups(groups))
    }

    /// EP shard `ep_rank` of `ep_size` without process groups: the parameters that rank holds
    /// (inspection, checkpoint tools); an MoE forward fails.
    pub fn detached(ep_rank: i64, ep_size: i64) -> Self {
        Self::with_dispatcher(Dispatcher::detached(ep_rank, ep_size))
    }

    /// Layers that dispatch with `dispatcher`, capacity over all of a rank's tokens.
    pub fn with_dispatcher(dispatcher: Dispatcher) -> Self {
        Self {
            dispatcher,
            capacity_groups: 1,
        }
    }

    /// The same placement with capacity computed per group of `N / groups` tokens (see
    /// [`ExpertParallel::capacity_groups`]).
    pub fn with_capacity_groups(mut self, groups: i64) -> Self {
        self.capacity_groups = groups;
        self
    }

    /// The dispatcher the MoE layers own.
    pub fn dispatcher(&self) -> &Dispatcher {
        &self.dispatcher
    }

    /// Capacity groups of the router (1 in real runs).
    pub fn capacity_groups(&self) -> i64 {
        self.capacity_groups
    }
}
