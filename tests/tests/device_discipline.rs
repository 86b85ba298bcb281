//! Device and dtype discipline, checked on a CPU-only machine (DESIGN.md, testing pyramid).
//!
//! A GPU run fails the moment a host tensor reaches NCCL or a kernel, but on a CPU every
//! tensor is a host tensor, so running the suite cannot show such a mistake. Three checks
//! close that gap:
//! 1. a source check: files a rank runs every step create no host tensors and read nothing
//!    back except through `Placement::upload` / `moe_comm::host_read` (which counts reads),
//!    unless the line says why (`// host: ...`);
//! 2. strict communicators reject tensors of another device, as NCCL does;
//! 3. the trainer refuses communicators that move tensors of another device than its own.
//!
//! The step-statistics bug these were written for (the trainer all-reduced CPU tensors, which
//! NCCL rejects at step 1) fails check 1: `the_source_check_catches_host_step_statistics`.

use moe_comm::threads::threads_world_on;
use moe_comm::{set_strict, CommError, Communicator, LocalComm, ProcessGroups};
use moe_tests::{temp_dir, tiny_config};
use moe_trainer::train_loop::{train, RunOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Sources a rank runs on every step (forward, backward, dispatch, experts, the step's
/// statistics, gradient sync, the optimizer, evaluation, batch transfer) and the
/// communicators that carry its tensors.
const HOT_PATHS: &[&str] = &[
    "model/src",
    "trainer/src/train_loop.rs",
    "trainer/src/train_loop",
    "trainer/src/loss.rs",
    "trainer/src/distill.rs",
    "trainer/src/grad_sync.rs",
    "trainer/src/optim.rs",
    "trainer/src/inference.rs",
    "trainer/src/decode.rs",
    "trainer/src/data/prefetch.rs",
    "comm/src/lib.rs",
    "comm/src/local.rs",
    "comm/src/threads.rs",
    "comm/src/autograd.rs",
    "comm/src/groups.rs",
    "comm/src/nccl.rs",
];

/// What is refused on a hot path, and why.
const RULES: &[(&str, &str)] = &[
    (
        "from_slice(",
        "a host tensor: build it with Placement::upload (pinned, non-blocking on CUDA)",
    ),
    (
        "Device::Cpu",
        "the host device: take the device from the rank's Placement",
    ),
    (
        "double_value(",
        "an uncounted host read: use moe_comm::host_read",
    ),
    (
        "int64_value(",
        "an uncounted host read: use moe_comm::host_read",
    ),
    (
        "bool::try_from(",
        "an uncounted host read: use moe_comm::host_read",
    ),
    (
        "f64::try_from(&",
        "an uncounted host read: use moe_comm::host_read",
    ),
    (
        ">::try_from(",
        "an uncounted host read (Vec::try_from): use moe_comm::host_read",
    ),
    (
        ".f_nonzero()",
        "nonzero waits for the device to size its output: use nonzero_static",
    ),
];

/// The marker that allows a rule's pattern on its line or the line after: a reason must follow.
const ALLOW: &str = "// host:";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Rule violations in `text` (named `name`): `file:line: pattern: why`. Unit tests at the end
/// of a file (`#[cfg(test)]`) are not hot paths and are not checked.
fn violations(name: &str, text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut allowed_next = false;
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        let allowed = allowed_next || line.contains(ALLOW);
        allowed_next = line.trim_start().starts_with(ALLOW);
        if allowed {
            continue;
        }
        for (pattern, why) in RULES {
            if code.contains(pattern) {
                out.push(format!("{name}:{}: `{pattern}`: {why}", i + 1));
            }
        }
    }
    out
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .expect("read_dir")
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for e in entries {
            rust_files(&e, out);
        }
    } else if path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_path_buf());
    }
}

#[test]
fn hot_paths_create_no_host_tensors_and_read_back_only_counted() {
    let root = workspace();
    let mut files = Vec::new();
    for p in HOT_PATHS {
        let path = root.join(p);
        assert!(path.exists(), "hot path {} is missing", path.display());
        rust_files(&path, &mut files);
    }
    assert!(files.len() > 20, "only {} files checked", files.len());
    let found: Vec<String> = files
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).expect("read source");
            let name = f.strip_prefix(&root).unwrap_or(f).display().to_string();
            violations(&name, &text)
        })
        .collect();
    assert!(
        found.is_empty(),
        "host tensors or uncounted host reads on hot paths (mark a deliberate one with \
         `{ALLOW} <why>` on the line or the line above):\n{}",
        found.join("\n")
    );
}

/// The trainer's step statistics before the fix (trainer/src/train_loop.rs): a host tensor
/// handed to the world communicator, NCCL on GPUs.
const STEP_STATS_BUG: &str = r#"
impl StepStats {
    fn to_tensor(&self) -> Result<Tensor> {
        let v = [self.lm_loss, self.aux_loss, self.z_loss];
        Ok(Tensor::f_from_slice(&v)?)
    }
}
fn evaluate(&mut self) -> Result<f64> {
    let local = Tensor::f_from_slice(&[local])?;
    let summed = lock(&self.groups.world)?.all_reduce_sum(&local)?;
    Ok(summed.f_double_value(&[0])? / self.groups.world_size as f64)
}
"#;

#[test]
fn the_source_check_catches_host_step_statistics() {
    let found = violations("train_loop.rs", STEP_STATS_BUG);
    assert_eq!(found.len(), 3, "{found:#?}");
    assert!(
        found[0].starts_with("train_loop.rs:5: `from_slice(`"),
        "{found:#?}"
    );
    assert!(
        found[1].starts_with("train_loop.rs:9: `from_slice(`"),
        "{found:#?}"
    );
    assert!(found[2].contains("double_value("), "{found:#?}");
    // A deliberate, explained host tensor passes.
    let allowed = "// host: the NCCL unique id travels over the MPI bootstrap\nlet t = Tensor::from_slice(&id);\n";
    assert!(violations("nccl.rs", allowed).is_empty());
    // Unit tests are not hot paths.
    let tests = "#[cfg(test)]\nmod tests { fn f() { Tensor::from_slice(&[1]); } }\n";
    assert!(violations("x.rs", tests).is_empty());
}

fn is_device_error<T>(r: moe_comm::Result<T>) -> bool {
    matches!(r, Err(CommError::Device { .. }))
}

#[test]
fn strict_communicators_reject_tensors_of_another_device() {
    set_strict(true);
    let host = Tensor::ones([4], (Kind::Float, Device::Cpu));
    // A communicator of a GPU rank, handed a host tensor: what NCCL rejects, on the CPU.
    let mut local = LocalComm::on(Device::Cuda(0));
    assert!(is_device_error(local.all_reduce_sum(&host)));
    assert!(is_device_error(local.all_to_all(&host, &[4], &[4])));
    assert!(is_device_error(local.broadcast(&host, 0)));
    assert!(is_device_error(local.all_gather(&host)));
    let mut threads = threads_world_on(1, Duration::from_secs(5), Device::Cuda(0));
    assert!(is_device_error(threads[0].all_reduce_sum(&host)));
    assert!(is_device_error(threads[0].all_to_all(&host, &[4], &[4])));
    // The same calls on the device the communicator moves succeed.
    let mut cpu = LocalComm::on(Device::Cpu);
    assert!(cpu.all_reduce_sum(&host).is_ok());
    let mut threads = threads_world_on(1, Duration::from_secs(5), Device::Cpu);
    assert!(threads[0].all_reduce_sum(&host).is_ok());
}

#[test]
fn trainer_refuses_communicators_of_another_device() {
    let out = temp_dir("device-mismatch").join("run");
    let cfg = tiny_config(&out);
    let opts = RunOptions {
        quiet: true,
        ..RunOptions::default()
    };
    let err = match train(
        &cfg,
        ProcessGroups::single(Device::Cuda(0)),
        Device::Cpu,
        &opts,
    ) {
        Ok(_) => panic!("a CPU rank trained with CUDA communicators"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("world communicator") && err.contains("Cuda(0)") && err.contains("Cpu"),
        "{err}"
    );
    assert!(
        !out.exists(),
        "nothing may be written by a run refused at start-up"
    );
}
