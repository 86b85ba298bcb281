//! The token dispatcher: the only place the model communicates.
//!
//! torchtitan-style `dispatch(..) -> (rows, metadata)` / `combine(rows, metadata)` with no
//! state on `self`; the math of each half is Megatron-Core's (see [`super::permute`] and
//! [`super::alltoall`]).

use super::alltoall::{exchange, exchange_back, exchange_counts, Exchange};
use super::permute::{permute, permute_topk, unpermute, Permutation};
use crate::router::{Routing, TopK};
use crate::{ModelError, Result};
use moe_comm::{lock, ProcessGroups, SharedComm};
use tch::{Kind, Tensor};

/// How routed rows reach their experts. Each MoE layer owns one, built once from the process
/// groups (Megatron-Core's `MoELayer.token_dispatcher`), so the layer's expert placement and
/// its communication have one source of truth.
#[derive(Clone)]
pub struct Dispatcher {
    route: Route,
    /// All data-parallel ranks, over which router statistics are summed; `None` on a single
    /// rank.
    world: Option<SharedComm>,
    /// Size of `world` (1 without one), fixed at build time so no forward locks it to ask.
    world_size: i64,
}

#[derive(Clone)]
enum Route {
    /// Every expert is on this rank (EP size 1): permute and unpermute only, no exchange,
    /// whatever the number of data-parallel ranks.
    Local,
    /// Experts are sharded over an EP group of `ep_size` ranks; this rank holds global experts
    /// `ep_rank*E/P .. (ep_rank+1)*E/P`.
    AllToAll {
        ep: SharedComm,
        ep_rank: i64,
        ep_size: i64,
    },
    /// Shard `ep_rank` of `ep_size` built without process groups, for its parameters only
    /// (inspection, checkpoint tools): dispatching fails.
    Detached { ep_rank: i64, ep_size: i64 },
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.route {
            Route::Local => "Local",
            Route::AllToAll { .. } => "AllToAll",
            Route::Detached { .. } => "Detached",
        };
        f.debug_struct("Dispatcher")
            .field("route", &kind)
            .field("ep_rank", &self.ep_rank())
            .field("ep_size", &self.ep_size())
            .field("world_size", &self.world_size)
            .finish()
    }
}

/// The assignments to dispatch, in one of the routing's two forms.
#[derive(Clone, Copy)]
enum Assigned<'a> {
    /// `probs_ne` f32 `[N, E]` and the bool `[N, E]` map of the rows to send.
    Map {
        probs_ne: &'a Tensor,
        routing_map_ne: &'a Tensor,
    },
    /// Each token's k experts, all sent.
    TopK(&'a TopK),
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
    /// One rank holding every expert: no communication at all.
    pub fn local() -> Self {
        Self {
            route: Route::Local,
            world: None,
            world_size: 1,
        }
    }

    /// The dispatcher of these process groups: all-to-all over `groups.ep` when the EP group
    /// has more than one rank, the local path otherwise (pure data parallelism does no
    /// exchange); router statistics are summed over `groups.world`.
    pub fn from_groups(groups: &ProcessGroups) -> Self {
        if groups.ep_size == 1 {
            Self {
                route: Route::Local,
                ..Self::world_of(groups)
            }
        } else {
            Self::all_to_all(groups)
        }
    }

    /// The all-to-all path over `groups.ep` even for an EP group of one rank (tests of the
    /// exchange itself).
    pub fn all_to_all(groups: &ProcessGroups) -> Self {
        Self {
            route: Route::AllToAll {
                ep: groups.ep.clone(),
                ep_rank: groups.ep_rank as i64,
                ep_size: groups.ep_size as i64,
            },
            ..Self::world_of(groups)
        }
    }

    /// Shard `ep_rank` of `ep_size` without process groups: a model built with it has the
    /// parameters that rank holds (inspection, checkpoint tools), and its MoE forward fails.
    pub fn detached(ep_rank: i64, ep_size: i64) -> Self {
        Self {
            route: Route::Detached { ep_rank, ep_size },
            world: None,
            world_size: 1,
        }
    }

    fn world_of(groups: &ProcessGroups) -> Self {
        Self {
            route: Route::Local,
            world: (groups.world_size > 1).then(|| groups.world.clone()),
            world_size: groups.world_size as i64,
        }
    }

    /// Whether rows stay on this rank (EP size 1): no exchange.
    pub fn is_local(&self) -> bool {
        matches!(self.route, Route::Local)
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
        let assigned = match &routing.topk {
            Some(topk) => Assigned::TopK(topk),
            None => Assigned::Map {
                probs_ne: &routing.probs_ne,
                routing_map_ne: &routing.routing_map_ne,
            },
        };
        self.dispatch_counted(x_nd, assigned, &routing.tokens_per_expert_e, num_experts)
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
        let assigned = Assigned::Map {
            probs_ne,
            routing_map_ne,
        };
        self.dispatch_counted(x_nd, assigned, &counts_e, num_experts)
    }

    /// [`Dispatcher::dispatch`] from the `[N, k]` form of a routing that keeps every token's k
    /// experts, and its rows per expert `tokens_per_expert_e` (i64 `[E]`, on the device).
    ///
    /// # Shapes
    /// `x_nd [N, d]`, `topk` `[N, k]`, `tokens_per_expert_e [E]` -> as `dispatch`.
    pub fn dispatch_topk(
        &self,
        x_nd: &Tensor,
        topk: &TopK,
        tokens_per_expert_e: &Tensor,
        num_experts: i64,
    ) -> Result<(Tensor, Vec<i64>, DispatchMeta)> {
        self.dispatch_counted(x_nd, Assigned::TopK(topk), tokens_per_expert_e, num_experts)
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
        assigned: Assigned,
        counts_e: &Tensor,
        num_experts: i64,
    ) -> Result<(Tensor, Vec<i64>, DispatchMeta)> {
        const OP: &str = "Dispatcher::dispatch";
        let device = x_nd.device();
        let map_e = match assigned {
            Assigned::Map {
                probs_ne,
                routing_map_ne,
            } => {
                moe_comm::check_device(OP, "probs_ne", probs_ne, device)?;
                moe_comm::check_kind(OP, "probs_ne", probs_ne, Kind::Float)?;
                moe_comm::check_device(OP, "routing_map_ne", routing_map_ne, device)?;
                moe_comm::check_kind(OP, "routing_map_ne", routing_map_ne, Kind::Bool)?;
                routing_map_ne.size().get(1).copied().unwrap_or(-1)
            }
            Assigned::TopK(topk) => {
                moe_comm::check_device(OP, "topk.idx_nk", &topk.idx_nk, device)?;
                moe_comm::check_kind(OP, "topk.idx_nk", &topk.idx_nk, Kind::Int64)?;
                moe_comm::check_device(OP, "topk.weights_nk", &topk.weights_nk, device)?;
                moe_comm::check_kind(OP, "topk.weights_nk", &topk.weights_nk, Kind::Float)?;
                counts_e.size().first().copied().unwrap_or(-1)
            }
        };
        if map_e != num_experts || num_experts % self.ep_size() != 0 {
            return Err(ModelError::Invalid(format!(
                "dispatch: the routing has {map_e} experts, num_experts is {num_experts}, EP size {} \
                 (num_experts must match and be divisible by the EP size)",
                self.ep_size()
            )));
        }
        moe_comm::check_device(OP, "counts_e", counts_e, device)?;
        let e = num_experts as usize;
        let (counts_host, recv_host) = match &self.route {
            Route::Local => (moe_comm::host_read::<i64>(counts_e)?, Vec::new()),
            Route::Detached { ep_rank, ep_size } => return Err(detached(*ep_rank, *ep_size)),
            Route::AllToAll { ep, ep_size, .. } => {
                let recv_pl = exchange_counts(ep, *ep_size, counts_e)?;
                let both = moe_comm::host_read::<i64>(&Tensor::f_cat(
                    &[counts_e, &recv_pl.f_reshape([-1])?],
                    0,
                )?)?;
                (both[..e].to_vec(), both[e..].to_vec())
            }
        };
        let (x_md, perm) = match assigned {
            Assigned::TopK(t) => permute_topk(x_nd, &t.idx_nk, &t.weights_nk, &counts_host)?,
            Assigned::Map {
                probs_ne,
                routing_map_ne,
            } => permute(x_nd, probs_ne, routing_map_ne, &counts_host)?,
        };
        let out_kind = x_nd.kind();
        match &self.route {
            Route::Local | Route::Detached { .. } => {
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
            Route::AllToAll { ep, ep_size, .. } => {
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
        let y_sent_md = match (&self.route, exchange) {
            (Route::Local, None) => y_md.shallow_clone(),
            (Route::AllToAll { ep, .. }, Some(ex)) => exchange_back(ep, y_md, ex)?,
            _ => {
                return Err(ModelError::Invalid(
                    "combine: the metadata comes from a different kind of dispatcher".into(),
                ))
            }
        };
        unpermute(&y_sent_md, &perm, out_kind)
    }

    /// Sums a small statistics tensor over all data-parallel ranks (world); a detached copy
    /// on a single rank. Not differentiable.
    pub fn all_reduce_stats(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.f_detach()?;
        match &self.world {
            None => Ok(t.f_detach_copy()?),
            Some(world) => Ok(lock(world)?.all_reduce_sum(&t)?),
        }
    }

    /// Number of data-parallel ranks the statistics are summed over.
    pub fn world_size(&self) -> i64 {
        self.world_size
    }

    /// This rank's index in its EP group (0 for the local path).
    pub fn ep_rank(&self) -> i64 {
        match self.route {
            Route::Local => 0,
            Route::AllToAll { ep_rank, .. } | Route::Detached { ep_rank, .. } => ep_rank,
        }
    }

    /// EP group size P (1 for the local path).
    pub fn ep_size(&self) -> i64 {
        match self.route {
            Route::Local => 1,
            Route::AllToAll { ep_size, .. } | Route::Detached { ep_size, .. } => ep_size,
        }
    }
}

fn detached(ep_rank: i64, ep_size: i64) -> ModelError {
    ModelError::Invalid(format!(
        "this model is EP shard {ep_rank} of {ep_size} built without process groups \
         (parameters only): build it from the run's process groups to run a forward"
    ))
}
