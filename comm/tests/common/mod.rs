//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod suite;

use moe_comm::Communicator;
use std::time::Duration;

/// Runs `f` on every rank of a `threads` world of `size` ranks (one thread each) and
/// returns the per-rank results in rank order.
pub fn on_threads<T: Send + 'static>(
    size: usize,
    timeout: Duration,
    f: impl Fn(Box<dyn Communicator>) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    tch::set_num_threads(1);
    let handles: Vec<_> = moe_comm::threads::threads_world(size, timeout)
        .into_iter()
        .map(|comm| {
            let f = f.clone();
            std::thread::spawn(move || f(comm))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}
