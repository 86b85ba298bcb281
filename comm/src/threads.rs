//! In-process ranks: P communicators, one per thread, over crossbeam channels.
//!
//! Used by tests and by `--debug` mode to run the real dispatch and all-to-all code with
//! `parallel.ep_size = P` in one process. Every group is a full mesh with one unbounded
//! channel per ordered pair of ranks, so sends never block and a collective is "send to
//! everyone, then receive from everyone". `split` builds a fresh mesh for each new group
//! (through a registry shared by the world), so messages of different groups never mix.
//!
//! Nobody hangs: every receive waits at most the world's timeout
//! ([`CommError::Timeout`], naming the silent rank), and a peer whose communicator was
//! dropped (its thread returned or failed) disconnects its channels, which the others see
//! as [`CommError::PeerGone`].
//!
//! The all-to-all copies each row block exactly once: the sender posts a view of its
//! block, the receiver copies it into its own freshly allocated output, and the sender
//! returns only after every receiver acknowledged, so the caller may then modify its input
//! and the output never aliases it (MPI's `MPI_Alltoallv` semantics).

use crate::args::{check_all_to_all, invalid};
use crate::{check_device, CommError, Communicator, Result};
use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tch::{Device, Tensor};

/// What travels over a channel.
enum Payload {
    /// A (possibly shared-storage, detached) tensor the receiver copies or stacks.
    Tensor(Tensor),
    /// "I have finished reading the block you posted."
    Ack,
    /// `(color, key)` of a split.
    SplitKey(usize, usize),
}

/// One message, tagged with the collective it belongs to so that ranks calling different
/// collectives get an error instead of silently exchanging wrong data.
struct Msg {
    seq: u64,
    op: &'static str,
    payload: Payload,
}

/// One rank's ends of a mesh: `tx[p]` sends to peer p, `rx[p]` receives from peer p.
struct Endpoint {
    group_id: u64,
    tx: Vec<Sender<Msg>>,
    rx: Vec<Receiver<Msg>>,
}

/// Builds a mesh of `size` ranks; element r is rank r's endpoint.
fn mesh(group_id: u64, size: usize) -> Vec<Endpoint> {
    let mut tx: Vec<Vec<Sender<Msg>>> = (0..size).map(|_| Vec::with_capacity(size)).collect();
    let mut rx: Vec<Vec<Receiver<Msg>>> = (0..size).map(|_| Vec::with_capacity(size)).collect();
    // Channel (src -> dst) goes to tx[src][dst] and rx[dst][src]; iterating src outer and
    // dst inner pushes each vector in peer order.
    for tx_src in tx.iter_mut() {
        for rx_dst in rx.iter_mut() {
            let (s, r) = unbounded();
            tx_src.push(s);
            rx_dst.push(r);
        }
    }
    tx.into_iter()
        .zip(rx)
        .map(|(tx, rx)| Endpoint { group_id, tx, rx })
        .collect()
}

/// Meshes created by a split, waiting for their members to pick up their endpoints.
struct PendingSplit {
    endpoints: Vec<Option<Endpoint>>,
    remaining: usize,
}

/// Shared by all communicators of one world.
struct Registry {
    next_group_id: AtomicU64,
    /// Keyed by (parent group id, parent's split counter, color).
    pending: Mutex<HashMap<(u64, u64, usize), PendingSplit>>,
}

/// One rank of an in-process group.
pub struct ThreadComm {
    rank: usize,
    size: usize,
    ep: Endpoint,
    timeout: Duration,
    /// The device of the tensors the ranks exchange (strict mode checks it).
    device: Device,
    registry: Arc<Registry>,
    /// Collectives issued so far (message tag).
    seq: u64,
    /// Splits issued so far (identifies the split in the registry).
    splits: u64,
}

/// Creates `size` in-process ranks on the CPU; element r is rank r's world communicator.
/// Move each to its own thread. Every receive waits at most `timeout`.
pub fn threads_world(size: usize, timeout: Duration) -> Vec<Box<dyn Communicator>> {
    // host: the default is CPU ranks.
    threads_world_on(size, timeout, Device::Cpu)
}

/// [`threads_world`] for ranks whose tensors live on `device`.
pub fn threads_world_on(
    size: usize,
    timeout: Duration,
    device: Device,
) -> Vec<Box<dyn Communicator>> {
    let registry = Arc::new(Registry {
        next_group_id: AtomicU64::new(1),
        pending: Mutex::new(HashMap::new()),
    });
    mesh(0, size)
        .into_iter()
        .enumerate()
        .map(|(rank, ep)| {
            Box::new(ThreadComm {
                rank,
                size,
                ep,
                timeout,
                device,
                registry: registry.clone(),
                seq: 0,
                splits: 0,
            }) as Box<dyn Communicator>
        })
        .collect()
}

fn gone(rank: usize) -> CommError {
    CommError::PeerGone {
        rank,
        cause: "its channel is disconnected: the rank dropped its communicator \
                (its thread returned or failed)"
            .into(),
    }
}

impl ThreadComm {
    /// Starts a collective: returns its sequence number.
    fn begin(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn send(&self, op: &'static str, seq: u64, peer: usize, payload: Payload) -> Result<()> {
        self.ep.tx[peer]
            .send(Msg { seq, op, payload })
            .map_err(|_| gone(peer))
    }

    fn recv(&self, op: &'static str, seq: u64, peer: usize) -> Result<Payload> {
        let msg = match self.ep.rx[peer].recv_timeout(self.timeout) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                return Err(CommError::Timeout {
                    op,
                    rank: peer,
                    secs: self.timeout.as_secs(),
                })
            }
            Err(RecvTimeoutError::Disconnected) => return Err(gone(peer)),
        };
        if msg.seq != seq || msg.op != op {
            return Err(invalid(
                op,
                format!(
                    "rank {} is in collective #{seq} ({op}) but rank {peer} sent for \
                     collective #{} ({}): ranks issued different collectives",
                    self.rank, msg.seq, msg.op
                ),
            ));
        }
        Ok(msg.payload)
    }

    fn recv_tensor(&self, op: &'static str, seq: u64, peer: usize) -> Result<Tensor> {
        match self.recv(op, seq, peer)? {
            Payload::Tensor(t) => Ok(t),
            _ => Err(invalid(
                op,
                format!("rank {peer} sent a non-tensor message"),
            )),
        }
    }

    fn recv_ack(&self, op: &'static str, seq: u64, peer: usize) -> Result<()> {
        match self.recv(op, seq, peer)? {
            Payload::Ack => Ok(()),
            _ => Err(invalid(
                op,
                format!("rank {peer} sent a message where an ack was due"),
            )),
        }
    }

    /// Sends a view of `t` to every rank (self included) and gathers every rank's
    /// tensor, in rank order. Ends with an ack round so that `t` is no longer read by
    /// anyone when this returns.
    fn exchange_views(&mut self, op: &'static str, t: &Tensor) -> Result<Vec<Tensor>> {
        check_device(op, "input", t, self.device)?;
        let seq = self.begin();
        let view = t.f_detach()?;
        for p in 0..self.size {
            self.send(op, seq, p, Payload::Tensor(view.shallow_clone()))?;
        }
        let mut got = Vec::with_capacity(self.size);
        for p in 0..self.size {
            // Copy now: after the ack round the sender may mutate its tensor.
            got.push(self.recv_tensor(op, seq, p)?.f_detach_copy()?);
        }
        self.ack_round(op, seq)?;
        Ok(got)
    }

    fn ack_round(&self, op: &'static str, seq: u64) -> Result<()> {
        for p in 0..self.size {
            self.send(op, seq, p, Payload::Ack)?;
        }
        for p in 0..self.size {
            self.recv_ack(op, seq, p)?;
        }
        Ok(())
    }
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "threads"
    }
    fn device(&self) -> Device {
        self.device
    }

    fn all_to_all(&mut self, input: &Tensor, send: &[i64], recv: &[i64]) -> Result<Tensor> {
        const OP: &str = "all_to_all";
        let shape = input.size();
        let (_, recv_total) = check_all_to_all(OP, &shape, send, recv, self.size)?;
        check_device(OP, "input", input, self.device)?;
        let seq = self.begin();
        let x = input.f_detach()?;
        let mut off = 0;
        for (p, &n) in send.iter().enumerate() {
            self.send(OP, seq, p, Payload::Tensor(x.f_narrow(0, off, n)?))?;
            off += n;
        }
        let mut out_shape = shape.clone();
        out_shape[0] = recv_total;
        let out = Tensor::f_empty(&out_shape, (input.kind(), input.device()))?;
        let mut off = 0;
        for (p, &n) in recv.iter().enumerate() {
            let block = self.recv_tensor(OP, seq, p)?;
            let bshape = block.size();
            if bshape.first() != Some(&n)
                || bshape[1..] != shape[1..]
                || block.kind() != input.kind()
            {
                return Err(invalid(
                    OP,
                    format!(
                        "rank {} expected {n} rows of {:?} {:?} from rank {p}, got {bshape:?} {:?}",
                        self.rank,
                        &shape[1..],
                        input.kind(),
                        block.kind()
                    ),
                ));
            }
            // The single copy of this block: straight into the output.
            out.f_narrow(0, off, n)?.f_copy_(&block)?;
            off += n;
        }
        self.ack_round(OP, seq)?;
        Ok(out)
    }

    fn all_reduce_sum(&mut self, input: &Tensor) -> Result<Tensor> {
        let all = self.exchange_views("all_reduce_sum", input)?;
        // The same summation order on every rank, so all ranks get bitwise-equal results.
        let mut it = all.into_iter();
        let mut acc = it
            .next()
            .ok_or_else(|| invalid("all_reduce_sum", "empty group".into()))?;
        for t in it {
            acc = acc.f_add(&t)?;
        }
        Ok(acc)
    }

    fn all_gather(&mut self, input: &Tensor) -> Result<Tensor> {
        let all = self.exchange_views("all_gather", input)?;
        let shape = input.size();
        if let Some((p, t)) = all.iter().enumerate().find(|(_, t)| t.size() != shape) {
            return Err(invalid(
                "all_gather",
                format!(
                    "rank {p} passed shape {:?}, rank {} {shape:?}",
                    t.size(),
                    self.rank
                ),
            ));
        }
        Ok(Tensor::f_stack(&all, 0)?)
    }

    fn broadcast(&mut self, input: &Tensor, root: usize) -> Result<Tensor> {
        const OP: &str = "broadcast";
        if root >= self.size {
            return Err(invalid(
                OP,
                format!("root {root} in a group of size {}", self.size),
            ));
        }
        check_device(OP, "input", input, self.device)?;
        let seq = self.begin();
        if self.rank == root {
            let view = input.f_detach()?;
            for p in 0..self.size {
                self.send(OP, seq, p, Payload::Tensor(view.shallow_clone()))?;
            }
        }
        let out = self.recv_tensor(OP, seq, root)?.f_detach_copy()?;
        self.ack_round(OP, seq)?;
        Ok(out)
    }

    fn barrier(&mut self) -> Result<()> {
        let seq = self.begin();
        self.ack_round("barrier", seq)
    }

    fn split(&mut self, color: usize, key: usize) -> Result<Box<dyn Communicator>> {
        const OP: &str = "split";
        let seq = self.begin();
        for p in 0..self.size {
            self.send(OP, seq, p, Payload::SplitKey(color, key))?;
        }
        let mut members = Vec::new(); // (key, parent rank) of this color
        for p in 0..self.size {
            match self.recv(OP, seq, p)? {
                Payload::SplitKey(c, k) if c == color => members.push((k, p)),
                Payload::SplitKey(..) => {}
                _ => return Err(invalid(OP, format!("rank {p} sent a non-split message"))),
            }
        }
        members.sort_unstable();
        let new_rank = members
            .iter()
            .position(|&(_, p)| p == self.rank)
            .ok_or_else(|| invalid(OP, "this rank is missing from its own color".into()))?;
        let new_size = members.len();
        self.splits += 1;
        let id = (self.ep.group_id, self.splits, color);
        let ep = {
            let mut pending = self
                .registry
                .pending
                .lock()
                .map_err(|_| CommError::Poisoned)?;
            let entry = pending.entry(id).or_insert_with(|| {
                let gid = self.registry.next_group_id.fetch_add(1, Ordering::Relaxed);
                PendingSplit {
                    endpoints: mesh(gid, new_size).into_iter().map(Some).collect(),
                    remaining: new_size,
                }
            });
            let ep = entry
                .endpoints
                .get_mut(new_rank)
                .and_then(Option::take)
                .ok_or_else(|| invalid(OP, format!("endpoint {new_rank} of {id:?} taken twice")))?;
            entry.remaining -= 1;
            if entry.remaining == 0 {
                pending.remove(&id);
            }
            ep
        };
        Ok(Box::new(ThreadComm {
            rank: new_rank,
            size: new_size,
            ep,
            timeout: self.timeout,
            device: self.device,
            registry: self.registry.clone(),
            seq: 0,
            splits: 0,
        }))
    }
}
