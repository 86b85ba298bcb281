//! The token dispatcher: the only place the model communicates.
//!
//! torchtitan-style `dispatch(..) -> (rows, metadata)` / `combine(rows, metadata)` with no
//! state on `self`; the math of each half is Megatron-Core's (see [`super::permute`] and
//! [`super::alltoall`]).

use super::alltoall::{exchange, exchange_back, exchange_counts, Exchange};
use super::permute::{permute, unpermute, Permutation};
use crate::router::Routing;
use crate::{ModelError, Result};
use moe_comm::{lock, ProcessGroups, SharedComm};
use tch::{Kind, Tensor};

/// How routed rows reach their experts.
pub enum Dispatcher {
    /// Every expert is on this rank (EP = 1): permute and unpermute only.
    Local,
    /// Experts are sharded over an EP group of `ep_size` ranks; this rank holds global experts
    /// `ep_rank*E/P .. (ep_rank+1)*E/P`. `world` spans all data-parallel ranks (router
    /// statistics).
    AllToAll {
        ep: SharedComm,
        world: SharedComm,
        ep_rank: i64,
        ep_size: i64,
    },
}

/// What [`Dispatcher::combine`] needs to undo a [`Dispatcher::dispatch`].
#[derive(Debug)]
pub struct DispatchMeta {
    perm: Permutation,
    out_kind: Kind,
    exchange: Option<Exchange>,
}

impl DispatchMeta {
    /// Rows per GLOBAL expert that this rank sent (its kept assignments, expert-major).
    pub fn sent_per_expert(&self) -> &[i64] {
        &self.perm.counts_e
    }

    /// The token of each row this rank sent, i64 `[M]` (expert-major, by token within an expert).
    pub fn token_index(&self) -> &Tensor {
        &self.perm.token_idx_m
    }
}

impl Dispatcher {
    /// The dispatcher of these process groups: all-to-all over `groups.ep` (statistics over
    /// `groups.world`), or [`Dispatcher::Local`] for a single rank.
    pub fn from_groups(groups: &ProcessGroups) -> Self {
        if groups.world_size == 1 {
            Dispatcher::Local
        } else {
            Dispatcher::AllToAll {
                ep: groups.ep.clone(),
                world: groups.world.clone(),
                ep_rank: groups.ep_rank as i64,
                ep_size: groups.ep_size as i64,
            }
        }
    }

    /// Sends each kept assignment's row to the rank holding its expert. Returns rows
    /// grouped by LOCAL expert, contiguous (expert-major), and the metadata to combine.
    ///
    /// # Shapes
    /// `x_nd [N, d]` -> `x_md [M, d]` (M = rows this rank's experts serve), rows per local
    /// expert `[E/P]`.
    pub fn dispatch(
        &self,
        x_nd: &Tensor,
        routing: &Routing,
        num_experts: i64,
    ) -> Result<(Tensor, Vec<i64>, DispatchMeta)> {
        self.dispatch_counted(
            x_nd,
            &routing.probs_ne,
            &routing.routing_map_ne,
            &routing.tokens_per_expert_e,
            num_experts,
        )
    }

    /// [`Dispatcher::dispatch`] from the two routing tensors alone (tests build them by hand).
    ///
    /// # Shapes
    /// `x_nd [N, d]`, `probs_ne f32 [N, E]`, `routing_map_ne bool [N, E]` -> as `dispatch`.
    pub fn dispatch_map(
        &self,
        x_nd: &Tensor,
        probs_ne: &Tensor,
        routing_map_ne: &Tensor,
        num_experts: i64,
    ) -> Result<(Tensor, Vec<i64>, DispatchMeta)> {
        let counts_e = routing_map_ne.f_sum_dim_intlist(0, false, Kind::Int64)?;
        self.dispatch_counted(x_nd, probs_ne, routing_map_ne, &counts_e, num_experts)
    }

    /// The dispatch, given the map's column sums `counts_e` (i64 `[E]`, on the device).
    ///
    /// The layer's one host read happens here: the rows this rank sends per expert and,
    /// with experts on other ranks, the rows it receives (exchanged on the device first), read
    /// together. Everything else (gathers, split sizes of the differentiable all-to-all,
    /// expert offsets) follows from those numbers without waiting on the device again.
    fn dispatch_counted(
        &self,
        x_nd: &Tensor,
        probs_ne: &Tensor,
        routing_map_ne: &Tensor,
        counts_e: &Tensor,
        num_experts: i64,
    ) -> Result<(Tensor, Vec<i64>, DispatchMeta)> {
        let map_e = routing_map_ne.size().get(1).copied().unwrap_or(-1);
        if map_e != num_experts || num_experts % self.ep_size() != 0 {
            return Err(ModelError::Invalid(format!(
                "dispatch: routing_map_ne has {map_e} experts, num_experts is {num_experts}, EP size {} \
                 (num_experts must match and be divisible by the EP size)",
                self.ep_size()
            )));
        }
        const OP: &str = "Dispatcher::dispatch";
        let device = x_nd.device();
        moe_comm::check_device(OP, "probs_ne", probs_ne, device)?;
        moe_comm::check_kind(OP, "probs_ne", probs_ne, Kind::Float)?;
        moe_comm::check_device(OP, "routing_map_ne", routing_map_ne, device)?;
        moe_comm::check_kind(OP, "routing_map_ne", routing_map_ne, Kind::Bool)?;
        moe_comm::check_device(OP, "counts_e", counts_e, device)?;
        let e = num_experts as usize;
        let (counts_host, recv_host) = match self {
            Dispatcher::Local => (moe_comm::host_read::<i64>(counts_e)?, Vec::new()),
            Dispatcher::AllToAll { ep, ep_size, .. } => {
                let recv_pl = exchange_counts(ep, *ep_size, counts_e)?;
                let both = moe_comm::host_read::<i64>(&Tensor::f_cat(
                    &[counts_e, &recv_pl.f_reshape([-1])?],
                    0,
                )?)?;
                (both[..e].to_vec(), both[e..].to_vec())
            }
        };
        let (x_md, perm) = permute(x_nd, probs_ne, routing_map_ne, &counts_host)?;
        let out_kind = x_nd.kind();
        match self {
            Dispatcher::Local => {
                let rows = perm.counts_e.clone();
                Ok((
                    x_md,
                    rows,
                    DispatchMeta {
                        perm,
                        out_kind,
                        exchange: None,
                    },
                ))
            }
            Dispatcher::AllToAll { ep, ep_size, .. } => {
                let (x_rd, rows_l, ex) = exchange(ep, *ep_size, &x_md, &perm.counts_e, &recv_host)?;
                Ok((
                    x_rd,
                    rows_l,
                    DispatchMeta {
                        perm,
                        out_kind,
                        exchange: Some(ex),
                    },
                ))
            }
        }
    }

    /// Inverse of dispatch: brings expert outputs back and combines
    /// `y_n = sum_k probs_{n,e} * out_{n,e}` in the dtype of `y_md`, then casts to the dtype of
    /// the dispatched `x_nd`. Differentiable wrt `y_md` and `probs_ne`.
    ///
    /// # Shapes
    /// `y_md [M, d]` (as returned by dispatch) -> `y_nd [N, d]`
    pub fn combine(&self, y_md: &Tensor, meta: DispatchMeta) -> Result<Tensor> {
        let DispatchMeta {
            perm,
            out_kind,
            exchange,
        } = meta;
        moe_comm::check_device(
            "Dispatcher::combine",
            "y_md",
            y_md,
            perm.token_idx_m.device(),
        )?;
        let y_sent_md = match (self, exchange) {
            (Dispatcher::Local, None) => y_md.shallow_clone(),
            (Dispatcher::AllToAll { ep, .. }, Some(ex)) => exchange_back(ep, y_md, ex)?,
            _ => {
                return Err(ModelError::Invalid(
                    "combine: the metadata comes from a different kind of dispatcher".into(),
                ))
            }
        };
        unpermute(&y_sent_md, &perm, out_kind)
    }

    /// Sums a small statistics tensor over all data-parallel ranks (world); a detached copy
    /// for Local. Not differentiable.
    pub fn all_reduce_stats(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.f_detach()?;
        match self {
            Dispatcher::Local => Ok(t.f_detach_copy()?),
            Dispatcher::AllToAll { world, .. } => Ok(lock(world)?.all_reduce_sum(&t)?),
        }
    }

    /// Number of data-parallel ranks the statistics are summed over.
    pub fn world_size(&self) -> i64 {
        match self {
            Dispatcher::Local => 1,
            // Reading the size from a poisoned lock is harmless: size never changes.
            Dispatcher::AllToAll { world, .. } => match world.lock() {
                Ok(c) => c.size() as i64,
                Err(poisoned) => poisoned.into_inner().size() as i64,
            },
        }
    }

    /// This rank's index in its EP group (0 for Local).
    pub fn ep_rank(&self) -> i64 {
        match self {
            Dispatcher::Local => 0,
            Dispatcher::AllToAll { ep_rank, .. } => *ep_rank,
        }
    }

    /// EP group size P (1 for Local).
    pub fn ep_size(&self) -> i64 {
        match self {
            Dispatcher::Local => 1,
            Dispatcher::AllToAll { ep_size, .. } => *ep_size,
        }
    }
}
