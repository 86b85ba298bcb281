//! The threads backend never hangs: a rank that leaves or stalls turns into an error on
//! its peers within the timeout.

mod common;

use moe_comm::CommError;
use std::time::{Duration, Instant};
use tch::Tensor;

/// Rank 2 drops its communicator (as a failed thread would); ranks 0 and 1 must get
/// PeerGone or Timeout, well before a generous deadline. The peer named may be rank 2 or
/// the other survivor, which may already have failed (and left) because of rank 2.
#[test]
fn dropped_rank_gives_peer_gone_not_a_hang() {
    let timeout = Duration::from_secs(5);
    let results = common::on_threads(3, timeout, move |mut comm| {
        if comm.rank() == 2 {
            drop(comm);
            return None;
        }
        let start = Instant::now();
        let x = Tensor::ones([3, 2], (tch::Kind::Float, tch::Device::Cpu));
        let res = comm.all_to_all(&x, &[1, 1, 1], &[1, 1, 1]);
        Some((res.map(|_| ()), start.elapsed()))
    });
    for (rank, r) in results.into_iter().enumerate().take(2) {
        let (res, elapsed) = r.unwrap();
        match res {
            Err(CommError::PeerGone { rank: peer, .. })
            | Err(CommError::Timeout { rank: peer, .. })
                if peer != rank => {}
            other => panic!("rank {rank}: expected PeerGone/Timeout, got {other:?}"),
        }
        assert!(
            elapsed < timeout + Duration::from_secs(2),
            "rank {rank} took {elapsed:?}"
        );
    }
}

/// Rank 1 stays alive but never joins the barrier: rank 0 gets a Timeout naming rank 1
/// after about the timeout.
#[test]
fn silent_rank_gives_timeout() {
    let timeout = Duration::from_millis(300);
    let results = common::on_threads(2, timeout, move |mut comm| {
        if comm.rank() == 1 {
            std::thread::sleep(Duration::from_secs(2));
            return None;
        }
        let start = Instant::now();
        Some((comm.barrier(), start.elapsed()))
    });
    let (res, elapsed) = results.into_iter().next().flatten().unwrap();
    assert!(
        matches!(
            res,
            Err(CommError::Timeout {
                rank: 1,
                op: "barrier",
                ..
            })
        ),
        "got {res:?}"
    );
    assert!(
        elapsed >= timeout && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
}

/// Ranks that call different collectives get an error, not each other's data.
#[test]
fn mismatched_collectives_are_reported() {
    let results = common::on_threads(2, Duration::from_secs(2), |mut comm| {
        let x = Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu));
        if comm.rank() == 0 {
            comm.all_reduce_sum(&x).map(|_| ())
        } else {
            comm.all_gather(&x).map(|_| ())
        }
    });
    for r in results {
        assert!(r.is_err(), "mismatched collectives must fail");
    }
}

/// Bad split arguments are rejected locally with InvalidArgument.
#[test]
fn bad_splits_are_rejected() {
    let mut comms = moe_comm::threads::threads_world(1, Duration::from_secs(1));
    let x = Tensor::ones([3, 2], (tch::Kind::Float, tch::Device::Cpu));
    let comm = &mut comms[0];
    for (send, recv) in [
        (vec![2], vec![3]),
        (vec![3, 0], vec![3]),
        (vec![-1], vec![3]),
    ] {
        let res = comm.all_to_all(&x, &send, &recv);
        assert!(
            matches!(res, Err(CommError::InvalidArgument { .. })),
            "{send:?} {res:?}"
        );
    }
}
