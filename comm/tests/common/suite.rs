//! One conformance suite for every `Communicator` backend (local, threads, mpi).
//!
//! Every rank builds its inputs from (rank, size) and checks its outputs against values
//! computed in closed form, exactly (all values are small integers or dyadic fractions, so
//! float sums are exact and any mismatch is a bug, hence tolerance 0).
//! Shared by `tests/conformance.rs` and `examples/mpi_conformance.rs` (through `#[path]`).

use moe_comm::Communicator;
use tch::{Device, Kind, Tensor};

type Check = std::result::Result<(), String>;

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Exact equality of shape, dtype and values.
fn expect_eq(what: &str, got: &Tensor, want: &Tensor) -> Check {
    if got.size() != want.size() || got.kind() != want.kind() {
        return Err(format!(
            "{what}: got {:?} {:?}, want {:?} {:?}",
            got.size(),
            got.kind(),
            want.size(),
            want.kind()
        ));
    }
    if !got.equal(want) {
        return Err(format!("{what}: values differ\n got {got}\nwant {want}"));
    }
    Ok(())
}

/// Rows of block (src -> dst): `n` rows, `cols` columns, value src*1000 + dst*100 + i*10 + c.
fn block(src: usize, dst: usize, n: i64, cols: i64, kind: Kind) -> Tensor {
    let i = Tensor::arange(n, (Kind::Double, Device::Cpu)).unsqueeze(1);
    let c = Tensor::arange(cols, (Kind::Double, Device::Cpu)).unsqueeze(0);
    (i * 10.0 + c + (src * 1000 + dst * 100) as f64).to_kind(kind)
}

/// The all-to-all where rank s sends `n(s, d)` rows to rank d; checks every received block.
fn check_a2a(
    comm: &mut dyn Communicator,
    what: &str,
    kind: Kind,
    cols: i64,
    n: impl Fn(usize, usize) -> i64,
    transposed_input: bool,
) -> Check {
    let (r, p) = (comm.rank(), comm.size());
    let send: Vec<i64> = (0..p).map(|d| n(r, d)).collect();
    let recv: Vec<i64> = (0..p).map(|s| n(s, r)).collect();
    let blocks: Vec<Tensor> = (0..p).map(|d| block(r, d, send[d], cols, kind)).collect();
    let mut x = Tensor::cat(&blocks, 0);
    if transposed_input {
        // Same values, non-contiguous layout.
        x = x.transpose(0, 1).contiguous().transpose(0, 1);
    }
    let y = comm.all_to_all(&x, &send, &recv).map_err(err(what))?;
    let want: Vec<Tensor> = (0..p).map(|s| block(s, r, recv[s], cols, kind)).collect();
    let want = Tensor::cat(&want, 0);
    expect_eq(what, &y, &want)?;
    // The output must be a copy: overwriting the input must not change it.
    let _ = x.fill_(-1.0);
    expect_eq(&format!("{what} (after overwriting the input)"), &y, &want)
}

fn check_a2a_large(comm: &mut dyn Communicator) -> Check {
    const ROWS: i64 = 4096;
    const COLS: i64 = 1024; // 4096 x 1024 f32 = 16 MiB sent by every rank
    let (r, p) = (comm.rank(), comm.size());
    let per = ROWS / p as i64;
    let n = |_s: usize, d: usize| {
        if d + 1 == p {
            ROWS - per * (p as i64 - 1)
        } else {
            per
        }
    };
    let fill = |s: usize, d: usize, rows: i64| {
        let b = Tensor::full([rows, COLS], (s * 8 + d) as f64, (Kind::Float, Device::Cpu));
        b.narrow(1, 0, 1)
            .copy_(&Tensor::arange(rows, (Kind::Float, Device::Cpu)).unsqueeze(1));
        b
    };
    let send: Vec<i64> = (0..p).map(|d| n(r, d)).collect();
    let recv: Vec<i64> = (0..p).map(|s| n(s, r)).collect();
    let x = Tensor::cat(&(0..p).map(|d| fill(r, d, send[d])).collect::<Vec<_>>(), 0);
    let y = comm
        .all_to_all(&x, &send, &recv)
        .map_err(err("a2a 16 MiB"))?;
    let want = Tensor::cat(&(0..p).map(|s| fill(s, r, recv[s])).collect::<Vec<_>>(), 0);
    expect_eq("a2a 16 MiB", &y, &want)
}

fn check_reductions(comm: &mut dyn Communicator) -> Check {
    let (r, p) = (comm.rank() as f64, comm.size() as f64);
    let frac = Tensor::from_slice(&[0.0f32, 0.5, 0.25]);
    let x = &frac + (r + 1.0);
    let y = comm.all_reduce_sum(&x).map_err(err("all_reduce f32"))?;
    expect_eq("all_reduce f32", &y, &(&frac * p + p * (p + 1.0) / 2.0))?;
    expect_eq("all_reduce leaves its input", &x, &(&frac + (r + 1.0)))?;

    let ri = comm.rank() as i64;
    let pi = comm.size() as i64;
    let y = comm
        .all_reduce_sum(&Tensor::from_slice(&[ri, ri * ri]))
        .map_err(err("all_reduce i64"))?;
    let sq: i64 = (0..pi).map(|k| k * k).sum();
    expect_eq(
        "all_reduce i64",
        &y,
        &Tensor::from_slice(&[pi * (pi - 1) / 2, sq]),
    )?;

    let y = comm
        .all_reduce_sum(&Tensor::from_slice(&[r * 0.125]).reshape([1, 1]))
        .map_err(err("all_reduce f64"))?;
    let want = Tensor::from_slice(&[0.125 * p * (p - 1.0) / 2.0]).reshape([1, 1]);
    expect_eq("all_reduce f64", &y, &want)?;

    let y = comm
        .all_gather(&Tensor::from_slice(&[r as f32, -(r as f32)]))
        .map_err(err("all_gather"))?;
    let want: Vec<Tensor> = (0..pi)
        .map(|k| Tensor::from_slice(&[k as f32, -(k as f32)]))
        .collect();
    expect_eq("all_gather", &y, &Tensor::stack(&want, 0))?;

    let root = comm.size() - 1;
    let payload = Tensor::arange(4, (Kind::Int64, Device::Cpu)).reshape([2, 2]) + 100;
    let x = if comm.rank() == root {
        payload.copy()
    } else {
        payload.zeros_like()
    };
    let y = comm.broadcast(&x, root).map_err(err("broadcast"))?;
    expect_eq("broadcast", &y, &payload)?;

    comm.barrier().map_err(err("barrier"))
}

fn check_split(comm: &mut dyn Communicator) -> Check {
    let (r, p) = (comm.rank(), comm.size());
    // Colors by parity; keys reverse the order, so new ranks count down the parent ranks.
    let mut sub = comm.split(r % 2, p - r).map_err(err("split"))?;
    let mut members: Vec<usize> = (0..p).filter(|k| k % 2 == r % 2).collect();
    members.reverse();
    let want_rank = members.iter().position(|&k| k == r).unwrap_or(usize::MAX);
    if sub.size() != members.len() || sub.rank() != want_rank {
        return Err(format!(
            "split: rank {r} got ({}, {}) want ({want_rank}, {})",
            sub.rank(),
            sub.size(),
            members.len()
        ));
    }
    let y = sub
        .all_reduce_sum(&Tensor::from_slice(&[r as f64]))
        .map_err(err("split all_reduce"))?;
    let want = members.iter().sum::<usize>() as f64;
    expect_eq("split all_reduce", &y, &Tensor::from_slice(&[want]))?;
    // One row per peer carrying the parent rank: the result lists the members in new order.
    let q = sub.size();
    let x = Tensor::full([q as i64, 1], r as i64, (Kind::Int64, Device::Cpu));
    let ones = vec![1i64; q];
    let y = sub
        .all_to_all(&x, &ones, &ones)
        .map_err(err("split all_to_all"))?;
    let want: Vec<i64> = members.iter().map(|&k| k as i64).collect();
    expect_eq(
        "split all_to_all",
        &y,
        &Tensor::from_slice(&want).reshape([q as i64, 1]),
    )?;
    // Parent and child stay independent: interleave collectives on both.
    comm.barrier().map_err(err("parent barrier after split"))?;
    let single = sub.split(sub.rank(), 0).map_err(err("nested split"))?;
    if single.size() != 1 || single.rank() != 0 {
        return Err(format!(
            "nested split: ({}, {})",
            single.rank(),
            single.size()
        ));
    }
    sub.barrier().map_err(err("child barrier"))
}

/// Runs every check on this rank; all ranks of `comm` must call it together.
pub fn run(comm: &mut dyn Communicator) -> Check {
    let n_uneven = |s: usize, d: usize| ((s + 2 * d) % 3) as i64; // includes zero blocks
    check_a2a(comm, "a2a uneven f32", Kind::Float, 3, n_uneven, false)?;
    check_a2a(
        comm,
        "a2a non-contiguous input",
        Kind::Float,
        3,
        n_uneven,
        true,
    )?;
    let silent_rank0 = |s: usize, d: usize| if s == 0 { 0 } else { (s + d) as i64 };
    check_a2a(
        comm,
        "a2a i64, rank 0 sends nothing",
        Kind::Int64,
        2,
        silent_rank0,
        false,
    )?;
    check_a2a(comm, "a2a all empty", Kind::Float, 4, |_, _| 0, false)?;
    check_a2a(
        comm,
        "a2a bf16",
        Kind::BFloat16,
        2,
        |s, d| (s * d % 2) as i64 + 1,
        false,
    )?;
    check_a2a_large(comm)?;
    check_reductions(comm)?;
    check_split(comm)?;
    comm.barrier().map_err(err("final barrier"))
}
