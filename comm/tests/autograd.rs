//! The differentiable all-to-all: forward equals the plain exchange, and the gradient of
//! `sum(w * y)` with respect to x equals w sent back along the reverse exchange, exactly
//! (the backward only moves values, so tolerance 0).

mod common;

use moe_comm::{autograd, shared, Communicator};
use std::sync::Arc;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const COLS: i64 = 3;

/// Rows rank s sends to rank d (uneven, with zero blocks).
fn n(s: usize, d: usize) -> i64 {
    ((2 * s + d) % 3) as i64
}

/// A value per (rank holding the row, peer, row in block, column): distinct for every
/// entry and exact in f32.
fn tag(owner: usize, peer: usize, rows: i64, bias: f64) -> Tensor {
    let i = Tensor::arange(rows, (Kind::Double, Device::Cpu)).unsqueeze(1);
    let c = Tensor::arange(COLS, (Kind::Double, Device::Cpu)).unsqueeze(0);
    (i * 4.0 + c * 0.25 + (owner * 100 + peer * 10) as f64 + bias).to_kind(Kind::Float)
}

fn forward_backward(comm: Box<dyn Communicator>) -> Result<(), String> {
    let (r, p) = (comm.rank(), comm.size());
    let comm = shared(comm);
    let send: Vec<i64> = (0..p).map(|d| n(r, d)).collect();
    let recv: Vec<i64> = (0..p).map(|s| n(s, r)).collect();
    let x = Tensor::cat(
        &(0..p).map(|d| tag(r, d, send[d], 0.0)).collect::<Vec<_>>(),
        0,
    )
    .set_requires_grad(true);
    let y =
        autograd::all_to_all(&comm, &x, send.clone(), recv.clone()).map_err(|e| e.to_string())?;
    // Forward: the block from s is what s tagged for us.
    let want_y = Tensor::cat(
        &(0..p).map(|s| tag(s, r, recv[s], 0.0)).collect::<Vec<_>>(),
        0,
    );
    if !y.equal(&want_y) || !y.requires_grad() {
        return Err(format!("rank {r}: forward mismatch {y} vs {want_y}"));
    }
    // w on rank r for the rows received from s: tag(r, s, ., 0.5).
    let w = Tensor::cat(
        &(0..p).map(|s| tag(r, s, recv[s], 0.5)).collect::<Vec<_>>(),
        0,
    );
    let loss = (&w * &y).sum(Kind::Float);
    loss.f_backward()
        .map_err(|e| format!("rank {r}: backward: {e}"))?;
    // d loss / d x for rows sent to d is d's w for rows received from r: tag(d, r, ., 0.5).
    let want_g = Tensor::cat(
        &(0..p).map(|d| tag(d, r, send[d], 0.5)).collect::<Vec<_>>(),
        0,
    );
    let g = x.grad();
    if !g.equal(&want_g) {
        return Err(format!("rank {r}: grad mismatch\n got {g}\nwant {want_g}"));
    }
    // The autograd node holds a clone of the communicator until the graph is freed.
    drop((loss, y));
    if Arc::strong_count(&comm) != 1 {
        return Err(format!(
            "rank {r}: graph state leaked ({} refs)",
            Arc::strong_count(&comm)
        ));
    }
    Ok(())
}

#[test]
fn autograd_all_to_all_p2() {
    for r in common::on_threads(2, Duration::from_secs(30), forward_backward) {
        r.unwrap();
    }
}

#[test]
fn autograd_all_to_all_p4() {
    for r in common::on_threads(4, Duration::from_secs(30), forward_backward) {
        r.unwrap();
    }
}

/// Without requires_grad no graph is built and the state is freed at once.
#[test]
fn no_graph_frees_state() {
    let comm = shared(Box::new(moe_comm::LocalComm::default()));
    let x = Tensor::ones([2, 2], (Kind::Float, Device::Cpu));
    let y = autograd::all_to_all(&comm, &x, vec![2], vec![2]).unwrap();
    assert!(y.equal(&x) && !y.requires_grad());
    assert_eq!(Arc::strong_count(&comm), 1);
}

/// Errors of the forward come back as Err, not as a panic or abort.
#[test]
fn forward_error_is_returned() {
    let comm = shared(Box::new(moe_comm::LocalComm::default()));
    let x = Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let res = autograd::all_to_all(&comm, &x, vec![3], vec![3]);
    let msg = res.expect_err("bad splits must fail").to_string();
    assert!(msg.contains("send"), "{msg}");
    assert_eq!(Arc::strong_count(&comm), 1);
}

/// A peer that leaves between forward and backward makes the backward fail with an error
/// naming it (through the C++ shim's exception and tch's f_backward), not hang.
#[test]
fn backward_error_is_returned() {
    let results = common::on_threads(2, Duration::from_secs(5), |comm| {
        let r = comm.rank();
        let comm = shared(comm);
        let x = Tensor::ones([2, 1], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let y = autograd::all_to_all(&comm, &x, vec![1, 1], vec![1, 1]).unwrap();
        if r == 1 {
            return None; // drops y's graph and the communicator
        }
        // Let rank 1 leave first so the error is deterministic.
        std::thread::sleep(Duration::from_millis(200));
        Some(y.sum(Kind::Float).f_backward().map_err(|e| e.to_string()))
    });
    let res = results.into_iter().next().flatten().unwrap();
    let msg = res.expect_err("backward must fail when a peer is gone");
    assert!(
        msg.contains("peer rank 1 is gone") && msg.contains("backward"),
        "{msg}"
    );
}
