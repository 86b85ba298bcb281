//! MPI smoke test of the mpirun and multi-node harness (tests/tests/multinode.rs): every rank
//! all-reduces its rank and a 1M-element vector (beyond OpenMPI's eager limit, so the TCP
//! rendezvous path runs too), checks both sums, and prints one line with its host and its
//! node-local rank (the shared-memory split `moe` uses to pick `cuda:<local rank>`).
//! Exit status 1 when a sum is wrong, 2 when MPI cannot start.

use mpi::collective::SystemOperation;
use mpi::traits::*;
use std::process::ExitCode;

/// Elements of the large all-reduce.
const BIG: usize = 1 << 20;

fn main() -> ExitCode {
    let Some(universe) = mpi::initialize() else {
        eprintln!("mpi_hello: MPI_Init failed or MPI was already initialised");
        return ExitCode::from(2);
    };
    let world = universe.world();
    let (rank, size) = (i64::from(world.rank()), i64::from(world.size()));

    let mut rank_sum = 0i64;
    world.all_reduce_into(&rank, &mut rank_sum, SystemOperation::sum());
    // Integers in f64 are exact here: sums stay far below 2^53.
    let send = vec![(rank + 1) as f64; BIG];
    let mut recv = vec![0f64; BIG];
    world.all_reduce_into(&send[..], &mut recv[..], SystemOperation::sum());
    let want_big = (size * (size + 1) / 2) as f64;
    let big_ok = recv.iter().all(|&v| v == want_big);

    let node = world.split_shared(world.rank());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    println!(
        "mpi_hello rank={rank} size={size} rank_sum={rank_sum} big_ok={big_ok} host={} local_rank={} local_size={}",
        host.trim(),
        node.rank(),
        node.size()
    );
    if rank_sum != size * (size - 1) / 2 || !big_ok {
        eprintln!(
            "mpi_hello: rank {rank}: wrong all-reduce (rank_sum {rank_sum}, big_ok {big_ok})"
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
