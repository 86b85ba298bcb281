//! What the start-up says about the device, and one rule for bf16: the real binary, as a user
//! types it, on this CPU-only machine.

mod e2e_support;

use e2e_support::{run, train_cmd};
use std::time::Duration;

#[test]
fn startup_line_names_parameters_device_precision_and_data() {
    let out = moe_tests::temp_dir("e2e-startup");
    let f = run(
        &mut train_cmd(
            "configs/quickstart.yaml",
            &out,
            &[
                "trainer.max_steps=1",
                "trainer.warmup_steps=1",
                "trainer.eval_every=0",
            ],
        ),
        Duration::from_secs(120),
    )
    .ok();
    let first = f.stdout.lines().next().unwrap_or_default();
    // The quickstart: 8 experts of 4 layers, 1.84M parameters of which 0.66M are active.
    for want in ["1.84M params (660.61K active)", "device cpu", "fp32"] {
        assert!(first.contains(want), "{want:?} missing from {first:?}");
    }
    let data = f
        .stdout
        .lines()
        .find(|l| l.starts_with("data: "))
        .unwrap_or_default();
    // 2,000,000 synthetic bytes split 90/10.
    assert!(
        data.contains("1800000 train / 200000 val tokens"),
        "{}",
        f.dump()
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bf16_on_a_device_that_resolves_to_the_cpu_is_refused() {
    let out = moe_tests::temp_dir("e2e-bf16-auto").join("run");
    let f = run(
        &mut train_cmd(
            "configs/quickstart.yaml",
            &out,
            &["trainer.device=auto", "trainer.precision=bf16"],
        ),
        Duration::from_secs(60),
    );
    assert_eq!(f.status.code(), Some(2), "{}", f.dump());
    assert!(
        f.stderr
            .contains("trainer.precision (bf16) needs a CUDA device, but trainer.device (auto)"),
        "{}",
        f.dump()
    );
    assert!(!out.exists(), "a refused run must write nothing");
}
