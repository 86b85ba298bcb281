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
