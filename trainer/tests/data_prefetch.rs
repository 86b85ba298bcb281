//! The prefetcher delivers exactly the synchronous batches, in order, stops when dropped,
//! and reports data errors through `next` instead of panicking.

use moe_trainer::data::{synthetic, Batch, Dataset, Origin, Prefetcher, SamplerSpec, Split};
use std::sync::{mpsc, Arc};
use std::time::Duration;

fn dataset() -> Arc<Dataset> {
    Arc::new(Dataset::from_byte_corpus(
        Origin::Memory("syn".into()),
        synthetic::generate(30_000),
    ))
}

fn spec() -> SamplerSpec {
    SamplerSpec {
        seed: 7,
        seq_len: 16,
        batch_size: 2,
        world_size: 2,
        rank: 1,
        grad_accum: 2,
    }
}

fn same(a: &[Batch], b: &[Batch]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.inputs_bt.equal(&y.inputs_bt) && x.targets_bt.equal(&y.targets_bt))
}

#[test]
fn delivers_steps_in_order_then_errors() {
    tch::set_num_threads(1);
    let ds = dataset();
    let mut p = Prefetcher::new(ds.clone(), spec(), 3, 10, 2).unwrap();
    for want in 3..10u64 {
        assert_eq!(p.next_step(), want);
        let (step, micro) = p.next().unwrap();
        assert_eq!(step, want);
        assert_eq!(micro.len(), 2);
        assert!(same(
            &micro,
            &ds.batches(Split::Train, step, &spec()).unwrap()
        ));
    }
    let msg = p.next().unwrap_err().to_string();
    assert!(
        msg.contains("step 10 requested from a prefetcher of steps ..10"),
        "{msg}"
    );
}

/// A prefetcher started at step 5 (a resume) yields what steps 5.. of one started at 0 did.
#[test]
fn resume_mid_run_is_exact() {
    tch::set_num_threads(1);
    let ds = dataset();
    let mut full = Prefetcher::new(ds.clone(), spec(), 0, 8, 3).unwrap();
    let mut resumed = Prefetcher::new(ds, spec(), 5, 8, 3).unwrap();
    let all: Vec<_> = (0..8).map(|_| full.next().unwrap()).collect();
    for (step, micro) in &all[5..] {
        let (s, m) = resumed.next().unwrap();
        assert_eq!(s, *step);
        assert!(same(&m, micro));
    }
}

/// Dropping a prefetcher whose thread is blocked on a full channel, with practically
/// endless steps ahead, must return promptly (Drop joins the thread, so returning at all
/// proves the thread ended). 20 s is far beyond the milliseconds it takes.
#[test]
fn drop_stops_the_thread() {
    tch::set_num_threads(1);
    let mut p = Prefetcher::new(dataset(), spec(), 0, u64::MAX, 1).unwrap();
    assert_eq!(p.next().unwrap().0, 0);
    assert_eq!(p.next().unwrap().0, 1);
    std::thread::sleep(Duration::from_millis(50)); // let the thread fill the channel
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        drop(p);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("dropping the prefetcher did not stop its thread");
}

/// A window longer than the split: the thread sends the error and stops; `next` returns it,
/// then reports the stopped thread.
#[test]
fn errors_arrive_through_next() {
    tch::set_num_threads(1);
    let tiny = Arc::new(Dataset::from_byte_corpus(
        Origin::Memory("tiny".into()),
        vec![b'a'; 200],
    ));
    let long = SamplerSpec {
        seq_len: 300,
        ..spec()
    };
    let mut p = Prefetcher::new(tiny, long, 0, 5, 2).unwrap();
    let msg = p.next().unwrap_err().to_string();
    assert!(
        msg.contains("in-memory corpus tiny has 180 tokens in its training split"),
        "{msg}"
    );
    let msg = p.next().unwrap_err().to_string();
    assert!(
        msg.contains("prefetch thread stopped before step 0"),
        "{msg}"
    );
}

#[test]
fn invalid_spec_is_rejected_up_front() {
    let bad = SamplerSpec { rank: 2, ..spec() };
    let msg = Prefetcher::new(dataset(), bad, 0, 5, 2)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("rank (2) must be in 0..2"), "{msg}");
}
