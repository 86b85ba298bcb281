//! `trainer.device: cuda` on a machine without a usable GPU fails at start-up with exit 2,
//! naming why CUDA cannot be used, and writes nothing. (On a machine with a usable GPU the
//! case cannot arise; the test then checks that the start-up line names the GPU instead.)

mod common;

use common::{moe, repo_root, Scratch};

#[test]
fn cuda_without_a_usable_gpu_exits_2_naming_why() {
    let s = Scratch::new("device-cuda");
    let out = format!("run.out_dir={}", s.out_dir().display());
    let config = repo_root().join("configs/quickstart.yaml");
    let args = [
        "train",
        "--config",
        config.to_str().unwrap(),
        "--set",
        "trainer.device=cuda",
        "--set",
        &out,
        "--set",
        "trainer.max_steps=2",
        "--set",
        "trainer.warmup_steps=1",
    ];
    let (code, stdout, stderr) = moe(&args);
    match moe_comm::cuda::device_count() {
        Err(why) => {
            assert_eq!(code, 2, "exit code; stdout: {stdout}\nstderr: {stderr}");
            assert!(
                stderr.starts_with("error: trainer.device is cuda but CUDA cannot be used: "),
                "{stderr}"
            );
            // The reason the library gives here is the one the binary gives.
            assert!(stderr.contains(&why), "{why:?} missing from: {stderr}");
            assert!(!s.out_dir().exists(), "out_dir was created");
        }
        Ok(_) => {
            assert_eq!(code, 0, "stderr: {stderr}");
            assert!(stdout.contains("device cuda:0 ("), "{stdout}");
        }
    }
}

/// `moe bench layer --device` errors name the flag the user typed, not a config key.
#[test]
fn bench_device_errors_name_the_flag() {
    let (code, _, stderr) = moe(&["bench", "layer", "--device", "gpu", "--iters", "1"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.starts_with("error: --device (\"gpu\") must be auto, cpu, cuda or cuda:N"),
        "{stderr}"
    );
    assert!(!stderr.contains("trainer.device"), "{stderr}");
    if moe_comm::cuda::device_count().is_err() {
        let (code, _, stderr) = moe(&["bench", "layer", "--device", "cuda", "--iters", "1"]);
        assert_eq!(code, 2, "{stderr}");
        assert!(
            stderr.starts_with("error: --device is cuda but CUDA cannot be used: "),
            "{stderr}"
        );
    }
}
