//! The communicator conformance suite on the MPI backend. Checks its own results and
//! exits non-zero on failure; passes at any world size:
//!
//!     mpirun --oversubscribe -np 4 target/release/examples/mpi_conformance
//!
//! Then runs the differentiable all-to-all (forward and backward) over MPI.

#[path = "../tests/common/suite.rs"]
mod suite;

use moe_comm::mpi_backend::{is_under_mpirun, MpiRuntime};
use moe_comm::{autograd, shared};
use tch::{Device, Kind, Tensor};

/// Forward/backward of the differentiable all-to-all: rank r sends r+1+d rows to d, each
/// row tagged with its sender; the gradient of sum(y * 2) is 2 everywhere.
fn check_autograd(comm: &moe_comm::SharedComm, rank: usize, size: usize) -> Result<(), String> {
    let send: Vec<i64> = (0..size).map(|d| (rank + 1 + d) as i64 % 3).collect();
    let recv: Vec<i64> = (0..size).map(|s| (s + 1 + rank) as i64 % 3).collect();
    let rows: i64 = send.iter().sum();
    let x =
        Tensor::full([rows, 2], rank as f64, (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let y = autograd::all_to_all(comm, &x, send, recv.clone()).map_err(|e| e.to_string())?;
    let want: Vec<Tensor> = (0..size)
        .map(|s| Tensor::full([recv[s], 2], s as f64, (Kind::Float, Device::Cpu)))
        .collect();
    if !y.equal(&Tensor::cat(&want, 0)) {
        return Err(format!("autograd forward mismatch: {y}"));
    }
    (&y * 2.0)
        .sum(Kind::Float)
        .f_backward()
        .map_err(|e| e.to_string())?;
    if !x.grad().equal(&x.full_like(2.0)) {
        return Err(format!("autograd backward mismatch: {}", x.grad()));
    }
    Ok(())
}

fn main() {
    if !is_under_mpirun() {
        eprintln!("note: not started by mpirun; running as a world of one");
    }
    let rt = match MpiRuntime::init() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("MPI init failed: {e}");
            std::process::exit(2);
        }
    };
    let (rank, size) = (rt.world_rank(), rt.world_size());
    let mut world = rt.world();
    let mut result = suite::run(world.as_mut());
    if result.is_ok() {
        let world = shared(world);
        result = check_autograd(&world, rank, size);
    }
    match result {
        Ok(()) => println!(
            "rank {rank}/{size} (local {}/{}): all checks passed",
            rt.local_rank(),
            rt.local_size()
        ),
        Err(e) => {
            eprintln!("rank {rank}/{size}: FAILED: {e}");
            // Peers may be waiting in a collective: take the whole job down.
            rt.abort(1);
        }
    }
}
