//! The conformance suite (tests/common/suite.rs) on the local and threads backends.

mod common;

use moe_comm::LocalComm;
use std::time::Duration;

#[test]
fn local_backend_conforms() {
    let mut comm = LocalComm::default();
    common::suite::run(&mut comm).unwrap();
}

fn threads_conform(size: usize) {
    let results = common::on_threads(size, Duration::from_secs(60), |mut comm| {
        let rank = comm.rank();
        common::suite::run(comm.as_mut()).map_err(|e| format!("rank {rank}: {e}"))
    });
    for r in results {
        r.unwrap();
    }
}

#[test]
fn threads_backend_conforms_p1() {
    threads_conform(1);
}

#[test]
fn threads_backend_conforms_p2() {
    threads_conform(2);
}

#[test]
fn threads_backend_conforms_p3() {
    threads_conform(3);
}

#[test]
fn threads_backend_conforms_p4() {
    threads_conform(4);
}

#[test]
fn threads_large_outputs_reuse_the_receive_pool_only_once_released() {
    // Outputs of RECV_POOL_MIN_BYTES and more come from a per-rank pool block. An output the
    // caller still holds must never be handed out again; a released one must be.
    let rows = (moe_comm::threads::RECV_POOL_MIN_BYTES / 4 / 64) as i64; // f32 rows of 64
    let results = common::on_threads(2, Duration::from_secs(60), move |mut comm| {
        let rank = comm.rank() as f64;
        let mut exchange = |round: f64| {
            // Each rank sends half its rows to each peer; row values name round, sender, row.
            let x = (tch::Tensor::arange(rows * 64, (tch::Kind::Float, tch::Device::Cpu))
                .view([rows, 64])
                + (round * 10.0 + rank) * 1e7)
                .contiguous();
            comm.all_to_all(&x, &[rows / 2, rows / 2], &[rows / 2, rows / 2])
                .unwrap()
        };
        let want = |round: f64, me: f64| -> tch::Tensor {
            let block = |from: f64| {
                (tch::Tensor::arange(rows * 64, (tch::Kind::Float, tch::Device::Cpu))
                    .view([rows, 64])
                    + (round * 10.0 + from) * 1e7)
                    .narrow(0, (me as i64) * (rows / 2), rows / 2)
            };
            tch::Tensor::cat(&[block(0.0), block(1.0)], 0)
        };
        let a = exchange(1.0);
        let b = exchange(2.0); // `a` is held: `b` must be another block
        let (pa, pb) = (a.data_ptr(), b.data_ptr());
        assert_ne!(pa, pb, "a held output was handed out again");
        assert!(a.equal(&want(1.0, rank)), "the held output was overwritten");
        assert!(b.equal(&want(2.0, rank)));
        drop(a);
        drop(b);
        let c = exchange(3.0); // both released: `c` reuses the pool (b's block)
        assert_eq!(c.data_ptr(), pb, "a released pool block was not reused");
        assert!(c.equal(&want(3.0, rank)));
        // A view of the output keeps its block referenced, like the output itself.
        let view = c.narrow(0, 1, 2);
        drop(c);
        let d = exchange(4.0);
        assert_ne!(
            d.data_ptr(),
            pb,
            "a block a view still references was handed out"
        );
        assert!(d.equal(&want(4.0, rank)));
        drop(view);
    });
    assert_eq!(results.len(), 2);
}
