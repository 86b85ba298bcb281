//! `moe slim` / `moe upcycle` under `mpirun -np N`: every process reads the checkpoint (any
//! EP size), the calibration batches are split over the processes and their statistics
//! summed with one MPI all-reduce, and process 0 alone writes and prints. Without a
//! calibration pass (upcycle, random or width-free slims) there is nothing to share: process
//! 0 does the work and the others exit at once, without starting MPI.

use moe_trainer::surgery::Share;
use tch::{Kind, Tensor};

/// This process's rank and the number of processes mpirun started (`(0, 1)` outside it).
pub fn launcher_share() -> (i64, i64) {
    match crate::world::launcher_processes() {
        Some(n) if n > 1 => (crate::world::launcher_rank(), n),
        _ => (0, 1),
    }
}

/// Runs `f` in this process: directly outside mpirun, or when `collective` is false on
/// rank 0 only (`Ok(None)` elsewhere); otherwise as one rank of an MPI job, with a [`Share`]
/// whose sum is an MPI all-reduce. A rank's error aborts the job with its exit code, so no
/// rank waits for a peer that failed (rank 0 has then dropped its staging directory:
/// nothing is written).
pub fn run_ranks<T>(
    cmd: &str,
    collective: bool,
    f: impl FnOnce(Option<Share>) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    let (rank, size) = launcher_share();
    if size == 1 {
        return f(None).map(Some);
    }
    if !collective {
        if rank != 0 {
            return Ok(None);
        }
        return f(None).map(Some);
    }
    let runtime = moe_comm::mpi_backend::MpiRuntime::init().map_err(|e| anyhow::anyhow!("{e}"))?;
    runtime.abort_on_panic();
    let mut world = runtime.world();
    let mut sum = |v: &mut [f64]| -> Result<(), String> {
        let summed = world
            .all_reduce_sum(&Tensor::from_slice(v).to_kind(Kind::Double))
            .map_err(|e| e.to_string())?;
        let out = Vec::<f64>::try_from(&summed).map_err(|e| e.to_string())?;
        v.copy_from_slice(&out);
        Ok(())
    };
    let share = Share {
        rank,
        size,
        sum_f64: &mut sum,
    };
    match f(Some(share)) {
        Ok(v) => Ok((rank == 0).then_some(v)),
        Err(e) => {
            let code = crate::exit_code::exit_code(&e);
            // Bad input fails alike on every rank: rank 0 says it once.
            if rank == 0 || code != 2 {
                eprintln!("error: moe {cmd}: rank {rank} of {size}: {e:#}");
            }
            runtime.abort(i32::from(code));
        }
    }
}
