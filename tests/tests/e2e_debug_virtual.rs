//! Debug mode's virtual ranks (`parallel.debug_ranks: virtual`, the default on a GPU, where
//! in-process rank threads would deadlock on the device's single autograd worker thread)
//! train exactly like the threads ranks: the same command with `debug_ranks=threads` and
//! `debug_ranks=virtual` logs the same losses, dropped fractions and gradient norms, with
//! capacity dropping (debug.yaml's capacity factor 1.25 drops assignments).
//!
//! Tolerance 1e-5 relative, the EP-equivalence bound of DESIGN.md: the two runs sum the same
//! numbers in different orders (all-reduce and all-to-all vs one batch).

mod e2e_support;

use e2e_support::{metrics, run, train_cmd};
use moe_testutil::{assert_close, Tol};
use std::time::Duration;

fn debug_run(ranks: &str) -> (String, Vec<moe_trainer::metrics::TrainRecord>) {
    let out = moe_tests::temp_dir(&format!("e2e-debug-{ranks}"));
    let sets = [
        "trainer.max_steps=4".to_string(),
        "trainer.warmup_steps=1".into(),
        "trainer.eval_every=0".into(),
        format!("parallel.debug_ranks={ranks}"),
    ];
    let f = run(
        train_cmd("configs/debug.yaml", &out, &sets).arg("--debug"),
        Duration::from_secs(120),
    )
    .ok();
    let (records, _) = metrics(&out);
    let _ = std::fs::remove_dir_all(&out);
    (f.stdout, records)
}

#[test]
fn virtual_debug_ranks_equal_threads_ranks() {
    let (threads_out, threads) = debug_run("threads");
    let (virtual_out, virt) = debug_run("virtual");
    assert!(
        threads_out.contains("debug mode: 2 expert-parallel rank(s)"),
        "{threads_out}"
    );
    assert!(
        virtual_out.contains("debug mode: 2 virtual expert-parallel rank(s)"),
        "{virtual_out}"
    );
    assert_eq!(threads.len(), 4);
    assert_eq!(virt.len(), 4);
    assert!(
        threads.iter().any(|r| r.dropped_frac > 0.0),
        "the comparison must include dropped assignments"
    );
    for (a, b) in threads.iter().zip(&virt) {
        assert_eq!(a.step, b.step);
        assert_close(
            &format!("step {} loss", a.step),
            &a.loss,
            &b.loss,
            Tol::Rel(1e-5),
        );
        assert_close(
            &format!("step {} grad_norm", a.step),
            &a.grad_norm,
            &b.grad_norm,
            Tol::Rel(1e-5),
        );
        assert_close(
            &format!("step {} dropped_frac", a.step),
            &a.dropped_frac,
            &b.dropped_frac,
            Tol::Rel(1e-9),
        );
    }
}
