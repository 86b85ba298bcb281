//! `moe bench a2a`: all-to-all throughput of the project's communicators.
//!
//! A message of B bytes is what each rank sends per all-to-all, split evenly over its P peers
//! (itself included), as float32 rows of 64 bytes; GB/s per rank is B / time (10^9 bytes).
//! Each repetition is preceded by an untimed barrier and timed alone; the table holds rank
//! 0's median.
//!
//! Under mpirun (`--backend mpi`) the same run also times a raw `MPI_Alltoallv` of the same
//! byte counts on plain byte buffers (the ceiling: no tensors, no checks), interleaved with
//! the project's MPI communicator, and then, on rank 0 alone while the other ranks wait in a
//! sleeping poll, the threads backend with the same number of ranks.

use super::median;
use super::report::{Report, Table};
use crate::cli::{BenchArgs, BenchBackend};
use crate::threads::set_threads;
use anyhow::{anyhow, bail};
use moe_comm::mpi_backend::{is_under_mpirun, MpiRuntime};
use moe_comm::threads::threads_world;
use moe_comm::Communicator;
use mpi::collective::CommunicatorCollectives;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::Count;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const ROW_BYTES: u64 = 64;
const ROW_FLOATS: i64 = (ROW_BYTES / 4) as i64;

/// Message sizes: `min`, 4x, 16x, ... up to `max`.
fn sizes(args: &BenchArgs) -> anyhow::Result<Vec<u64>> {
    if args.min_bytes == 0 || args.min_bytes > args.max_bytes {
        bail!("need 0 < --min-bytes <= --max-bytes");
    }
    let mut v = Vec::new();
    let mut b = args.min_bytes;
    while b <= args.max_bytes {
        v.push(b);
        b *= 4;
    }
    Ok(v)
}

/// Repetitions of one size: more for small messages, whose single timings are noisier.
fn reps(args: &BenchArgs, bytes: u64) -> u64 {
    let iters = args.iters.max(1);
    ((16u64 << 20) / bytes.max(1)).clamp(iters, 25 * iters)
}

/// Rows each rank sends to each peer for a `bytes` message among `p` ranks (at least one).
fn rows_per_peer(bytes: u64, p: usize) -> i64 {
    ((bytes / p as u64) / ROW_BYTES).max(1) as i64
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// The actual bytes sent for a nominal size (whole rows per peer).
fn sent_bytes(bytes: u64, p: usize) -> u64 {
    rows_per_peer(bytes, p) as u64 * ROW_BYTES * p as u64
}

/// Median seconds per all-to-all of `comm` for each size (this rank's view).
fn time_comm(
    comm: &mut dyn Communicator,
    sizes: &[u64],
    args: &BenchArgs,
) -> anyhow::Result<Vec<f64>> {
    let p = comm.size();
    let mut out = Vec::new();
    for &bytes in sizes {
        let rows = rows_per_peer(bytes, p);
        let splits = vec![rows; p];
        let x = Tensor::f_ones([rows * p as i64, ROW_FLOATS], (Kind::Float, Device::Cpu))?;
        let mut samples = Vec::new();
        for i in 0..args.warmup + reps(args, bytes) {
            comm.barrier()?;
            let t = Instant::now();
            let y = comm.all_to_all(&x, &splits, &splits)?;
            let s = t.elapsed().as_secs_f64();
            drop(y);
            if i >= args.warmup {
                samples.push(s);
            }
        }
        out.push(median(&samples));
    }
    Ok(out)
}

/// The threads backend with `p` in-process ranks; rank 0's medians.
fn time_threads(p: usize, sizes: &[u64], args: &BenchArgs) -> anyhow::Result<Vec<f64>> {
    let comms = threads_world(p, Duration::from_secs(120));
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    tch::set_num_threads(1);
                    time_comm(c.as_mut(), sizes, args)
                })
            })
            .collect();
        let mut rank0 = None;
        for (r, h) in handles.into_iter().enumerate() {
            let t = h
                .join()
                .map_err(|_| anyhow!("threads rank {r} panicked"))??;
            if r == 0 {
                rank0 = Some(t);
            }
        }
        rank0.ok_or_else(|| anyhow!("no ranks"))
    })
}

/// `moe bench a2a`; `None` on MPI ranks other than 0.
pub fn run(args: &BenchArgs) -> anyhow::Result<Option<Report>> {
    set_threads(1, 1);
    let sizes = sizes(args)?;
    match args.backend {
        BenchBackend::Threads => {
            let mut report = Report::new("moe bench a2a: all-to-all over the threads backend");
            let mut table = Table::new("All-to-all, threads backend (median GB/s per rank)", &[]);
            table.header = std::iter::once("message (per rank)".to_string())
                .chain(args.ranks.iter().map(|p| format!("{p} ranks: GB/s (us)")))
                .collect();
            let per_p = args
                .ranks
                .iter()
                .map(|&p| time_threads(p, &sizes, args))
                .collect::<anyhow::Result<Vec<_>>>()?;
            for (i, &b) in sizes.iter().enumerate() {
                let mut row = vec![human(b)];
                for (j, &p) in args.ranks.iter().enumerate() {
                    let s = per_p[j][i];
                    row.push(format!("{:.2} ({:.0})", gbps(sent_bytes(b, p), s), s * 1e6));
                }
                table.row(row);
            }
            report.tables.push(table);
            report.notes.push(format!(
                "B = bytes each rank sends per all-to-all (B/P to each peer, itself included); GB/s = B / median time; \
                 {} to {} repetitions per size after {} warmup",
                args.iters,
                25 * args.iters,
                args.warmup
            ));
            Ok(Some(report))
        }
        BenchBackend::Mpi => run_mpi(args, &sizes),
    }
}

fn run_mpi(args: &BenchArgs, sizes: &[u64]) -> anyhow::Result<Option<Report>> {
    if !is_under_mpirun() {
        return Err(crate::exit_code::BadInput(
            "`moe bench a2a --backend mpi` must run under mpirun, e.g. \
             mpirun --allow-run-as-root --oversubscribe -np 2 target/release/moe bench a2a --backend mpi"
                .into(),
        )
        .into());
    }
    let runtime = MpiRuntime::init().map_err(|e| anyhow!("{e}"))?;
    let mut comm = runtime.world();
    let raw = SimpleCommunicator::world().duplicate();
    let (rank, p) = (runtime.world_rank(), runtime.world_size());
    let mut moe_s = Vec::new();
    let mut raw_s = Vec::new();
    for &bytes in sizes {
        let rows = rows_per_peer(bytes, p);
        let splits = vec![rows; p];
        let x = Tensor::f_ones([rows * p as i64, ROW_FLOATS], (Kind::Float, Device::Cpu))?;
        let peer_bytes = Count::try_from(rows as u64 * ROW_BYTES)?;
        let counts: Vec<Count> = vec![peer_bytes; p];
        let displs: Vec<Count> = (0..p as Count).map(|i| i * peer_bytes).collect();
        let sbuf = vec![1u8; (peer_bytes as usize) * p];
        let mut rbuf = vec![0u8; (peer_bytes as usize) * p];
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for i in 0..args.warmup + reps(args, bytes) {
            comm.barrier()?;
            let t = Instant::now();
            let y = comm.all_to_all(&x, &splits, &splits)?;
            let s_moe = t.elapsed().as_secs_f64();
            drop(y);
            raw.barrier();
            let t = Instant::now();
            {
                let send = Partition::new(&sbuf[..], &counts[..], &displs[..]);
                let mut recv = PartitionMut::new(&mut rbuf[..], &counts[..], &displs[..]);
                raw.all_to_all_varcount_into(&send, &mut recv);
            }
            let s_raw = t.elapsed().as_secs_f64();
            if i >= args.warmup {
                a.push(s_moe);
                b.push(s_raw);
            }
        }
        moe_s.push(median(&a));
        raw_s.push(median(&b));
    }
    // Rank 0 alone runs the threads backend at the same rank count; the others wait without
    // spinning (a blocking MPI barrier busy-polls and would steal rank 0's cores).
    let threads_s = if rank == 0 {
        let t = time_threads(p, sizes, args);
        let req = raw.immediate_barrier();
        req.wait();
        Some(t?)
    } else {
        let mut req = raw.immediate_barrier();
        loop {
            match req.test() {
                Ok(_) => break,
                Err(r) => {
                    req = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        None
    };
    drop(comm);
    drop(raw);
    drop(runtime);
    let Some(threads_s) = threads_s else {
        return Ok(None);
    };

    let mut report = Report::new(&format!("moe bench a2a: all-to-all over mpi, {p} ranks"));
    let mut table = Table::new(
        &format!("All-to-all, {p} ranks (median GB/s per rank, rank 0; time in us)"),
        &[
            "message (per rank)",
            "moe mpi",
            "raw MPI_Alltoallv",
            "mpi / raw",
            "target (>= 1 MiB)",
            "moe threads",
            "threads / raw",
            "target",
        ],
    );
    let mut misses = Vec::new();
    for (i, &bytes) in sizes.iter().enumerate() {
        let sent = sent_bytes(bytes, p);
        let (m, r, t) = (
            gbps(sent, moe_s[i]),
            gbps(sent, raw_s[i]),
            gbps(sent, threads_s[i]),
        );
        let big = bytes >= 1 << 20;
        let mpi_ok = m / r >= 0.9;
        let thr_ok = t >= r;
        if big && !mpi_ok {
            misses.push(format!("mpi {} at {:.2} of raw", human(bytes), m / r));
        }
        if big && !thr_ok {
            misses.push(format!("threads {} at {:.2} of raw", human(bytes), t / r));
        }
        let verdict = |ok: bool| {
            if !big {
                "-"
            } else if ok {
                "met"
            } else {
                "MISSED"
            }
        };
        table.row(vec![
            human(bytes),
            format!("{m:.2} ({:.0})", moe_s[i] * 1e6),
            format!("{r:.2} ({:.0})", raw_s[i] * 1e6),
            format!("{:.2}", m / r),
            format!(">= 0.9 {}", verdict(mpi_ok)),
            format!("{t:.2} ({:.0})", threads_s[i] * 1e6),
            format!("{:.2}", t / r),
            format!(">= 1.0 {}", verdict(thr_ok)),
        ]);
    }
    report.tables.push(table);
    report.notes.push(format!(
        "B = bytes each rank sends per all-to-all (B/P to each peer, itself included); GB/s = B / median time; \
         moe mpi and raw MPI_Alltoallv interleaved repetition by repetition; threads backend timed afterwards in \
         rank 0's process with {p} in-process ranks while the other MPI ranks sleep; torch threads 1"
    ));
    if misses.is_empty() {
        report.notes.push("targets at >= 1 MiB: all met".into());
    } else {
        report
            .notes
            .push(format!("targets missed: {}", misses.join("; ")));
    }
    Ok(Some(report))
}
