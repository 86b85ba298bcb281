//! Device discovery: `auto | cpu | cuda | cuda:N`, one GPU per rank of a node, and what to say
//! when a GPU is there but CUDA cannot be used.
//!
//! Torch's CUDA comes from loading libtorch_cuda at run time ([`moe_comm::cuda::load`]). The
//! NVIDIA driver is probed independently of torch ([`crate::gpu_driver`]), so a machine
//! with a GPU whose CUDA cannot load (a missing NVIDIA library, a driver too old for the CUDA
//! 13 build) says so instead of silently training on the CPU.

use crate::exit_code::BadInput;
use crate::gpu_driver::{self, DriverProbe};
use tch::Device;

/// `trainer.device`, parsed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spec {
    /// The rank's GPU if CUDA is usable, else the CPU (with a warning when a GPU is present).
    Auto,
    Cpu,
    /// GPU `local_rank` of this node; an error without a usable GPU.
    Cuda,
    /// GPU N; only for one rank per node.
    CudaIndex(usize),
}

/// Parses `trainer.device`.
pub fn parse_spec(spec: &str) -> Result<Spec, String> {
    match spec {
        "auto" => Ok(Spec::Auto),
        "cpu" => Ok(Spec::Cpu),
        "cuda" => Ok(Spec::Cuda),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Spec::CudaIndex)
            .ok_or_else(|| format!("trainer.device ({other:?}) must be auto, cpu, cuda or cuda:N")),
    }
}

/// What this machine offers: torch's CUDA devices (or why there are none) and the driver.
#[derive(Debug, Clone)]
pub struct Probe {
    pub torch: Result<usize, String>,
    pub driver: DriverProbe,
}

impl Probe {
    /// Probes the driver, then torch's CUDA. Under `auto`, a machine without any NVIDIA
    /// driver or device (no `libcuda.so.1`, nothing under /proc/driver/nvidia) does not load
    /// libtorch_cuda at all: torch's CUDA cannot run without the driver, and loading the
    /// library and its CUDA dependencies costs ~340 MiB of resident memory (measured on the
    /// quickstart: peak RSS 604 MiB under `auto` against 268 MiB under `cpu` before this).
    fn gather(spec: Spec) -> Self {
        let driver = gpu_driver::probe();
        let torch = match (&driver, spec) {
            (DriverProbe::Absent(why), Spec::Auto) => Err(format!(
                "libtorch_cuda not loaded: no NVIDIA driver ({why})"
            )),
            _ => moe_comm::cuda::device_count(),
        };
        Probe { torch, driver }
    }

    /// Why CUDA cannot be used, naming what is missing: the driver's view first (no driver,
    /// a driver too old), then torch's (the library that did not load).
    fn why_no_cuda(&self) -> String {
        let torch = self.torch.as_ref().err().cloned().unwrap_or_default();
        match self.driver.problem() {
            Some(p) => format!("{p}; {torch}"),
            None => torch,
        }
    }
}

/// The device of local rank `local_rank` of the `local_size` ranks on this node, and a
/// warning to print, if any. Pure: every fact about the machine comes in `probe`.
pub fn decide(
    spec: Spec,
    local_rank: usize,
    local_size: usize,
    probe: &Probe,
) -> Result<(Device, Option<String>), String> {
    if spec == Spec::Cpu {
        return Ok((Device::Cpu, None));
    }
    let count = *probe.torch.as_ref().unwrap_or(&0);
    if count == 0 {
        return match spec {
            Spec::Auto if probe.driver.has_gpu() => Ok((
                Device::Cpu,
                Some(format!(
                    "trainer.device auto: this machine has an NVIDIA GPU ({}) but CUDA cannot be \
                     used, so training runs on the CPU: {}",
                    probe.driver.summary(),
                    probe.why_no_cuda()
                )),
            )),
            Spec::Auto => Ok((Device::Cpu, None)),
            _ => Err(format!(
                "trainer.device is {} but CUDA cannot be used: {}",
                spec_name(spec),
                probe.why_no_cuda()
            )),
        };
    }
    match spec {
        Spec::CudaIndex(n) if n >= count => Err(format!(
            "trainer.device is cuda:{n} but this machine has {count} CUDA device(s) \
             (cuda:0..cuda:{})",
            count - 1
        )),
        Spec::CudaIndex(n) if local_size > 1 => Err(format!(
            "trainer.device cuda:{n} would put all {local_size} ranks of this node on one GPU; \
             use trainer.device cuda (rank i of a node takes cuda:i)"
        )),
        Spec::CudaIndex(n) => Ok((Device::Cuda(n), None)),
        _ if local_size > count => Err(format!(
            "{local_size} ranks run on this node but it has only {count} CUDA device(s): one \
             GPU per rank; start at most {count} ranks per node (mpirun --map-by ppr:{count}:node) \
             or use trainer.device cpu"
        )),
        _ => Ok((Device::Cuda(local_rank), None)),
    }
}

fn spec_name(spec: Spec) -> String {
    match spec {
        Spec::Auto => "auto".into(),
        Spec::Cpu => "cpu".into(),
        Spec::Cuda => "cuda".into(),
        Spec::CudaIndex(n) => format!("cuda:{n}"),
    }
}

/// Resolves the configured device of a rank with node-local index `local_rank` among
/// `local_size` ranks on this node. Prints a warning when `auto` falls back to the CPU on a
/// machine with an NVIDIA GPU. Errors are bad input (exit 2).
pub fn resolve_rank_device(
    spec: &str,
    local_rank: usize,
    local_size: usize,
) -> anyhow::Result<Device> {
    let spec = parse_spec(spec).map_err(BadInput)?;
    if spec == Spec::Cpu {
        return Ok(Device::Cpu);
    }
    let (device, warning) =
        decide(spec, local_rank, local_size, &Probe::gather(spec)).map_err(BadInput)?;
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    Ok(device)
}

/// Resolves the configured device of a single-process run (rank `local_rank`, usually 0).
pub fn resolve_device(spec: &str, local_rank: usize) -> anyhow::Result<Device> {
    resolve_rank_device(spec, local_rank, local_rank + 1)
}

/// Resolves a device that a command-line flag names (`moe bench layer --device`) by the
/// rules of `trainer.device`; errors name the flag, not the config key.
pub fn resolve_flag_device(flag: &str, spec: &str) -> anyhow::Result<Device> {
    resolve_device(spec, 0)
        .map_err(|e| BadInput(e.to_string().replace("trainer.device", flag)).into())
}

/// The device for humans: `cpu`, or `cuda:0 (NVIDIA H200, driver 580.159.04)`.
pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(i) => format!("cuda:{i}{}", gpu_driver::probe().describe_gpu(i)),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu_driver::DriverInfo;

    fn gpu_driver(version: &str, cuda: i32, gpus: usize) -> DriverProbe {
        DriverProbe::Present(DriverInfo {
            version: Some(version.into()),
            cuda_version: Some(cuda),
            gpus: vec!["NVIDIA H200".into(); gpus],
            error: None,
        })
    }

    fn probe(torch: Result<usize, &str>, driver: DriverProbe) -> Probe {
        Probe {
            torch: torch.map_err(String::from),
            driver,
        }
    }

    fn no_gpu() -> Probe {
        probe(
            Err("libtorch_cuda could not be loaded: libcudart.so.13: cannot open shared object file"),
            DriverProbe::Absent("libcuda.so.1: cannot open shared object file".into()),
        )
    }

    #[test]
    fn specs_parse_and_bad_ones_name_the_key() {
        assert_eq!(parse_spec("auto"), Ok(Spec::Auto));
        assert_eq!(parse_spec("cpu"), Ok(Spec::Cpu));
        assert_eq!(parse_spec("cuda"), Ok(Spec::Cuda));
        assert_eq!(parse_spec("cuda:3"), Ok(Spec::CudaIndex(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA"] {
            let e = parse_spec(bad).unwrap_err();
            assert!(e.contains("trainer.device") && e.contains(bad), "{e}");
        }
    }

    #[test]
    fn one_gpu_per_local_rank() {
        let p = probe(Ok(4), gpu_driver("580.159.04", 13000, 4));
        for r in 0..4 {
            assert_eq!(decide(Spec::Cuda, r, 4, &p), Ok((Device::Cuda(r), None)));
            assert_eq!(decide(Spec::Auto, r, 4, &p), Ok((Device::Cuda(r), None)));
        }
        assert_eq!(decide(Spec::Cpu, 1, 4, &p), Ok((Device::Cpu, None)));
    }

    #[test]
    fn more_ranks_than_gpus_is_an_error_naming_both_numbers() {
        let p = probe(Ok(2), gpu_driver("580.159.04", 13000, 2));
        for spec in [Spec::Cuda, Spec::Auto] {
            // Rank 0 of 3 would get a GPU of its own, but rank 2 would not: all ranks fail
            // alike, before anything starts.
            let e = decide(spec, 0, 3, &p).unwrap_err();
            assert!(
                e.contains("3 ranks") && e.contains("only 2 CUDA device"),
                "{e}"
            );
        }
    }

    #[test]
    fn cuda_index_is_checked_and_not_shared_by_ranks() {
        let p = probe(Ok(2), gpu_driver("580.159.04", 13000, 2));
        assert_eq!(
            decide(Spec::CudaIndex(1), 0, 1, &p),
            Ok((Device::Cuda(1), None))
        );
        let e = decide(Spec::CudaIndex(2), 0, 1, &p).unwrap_err();
        assert!(e.contains("cuda:2") && e.contains("2 CUDA device"), "{e}");
        let e = decide(Spec::CudaIndex(0), 0, 2, &p).unwrap_err();
        assert!(e.contains("all 2 ranks") && e.contains("one GPU"), "{e}");
    }

    #[test]
    fn auto_without_any_nvidia_device_is_the_cpu_silently() {
        assert_eq!(decide(Spec::Auto, 0, 1, &no_gpu()), Ok((Device::Cpu, None)));
    }

    #[test]
    fn cuda_without_a_gpu_names_what_is_missing() {
        let e = decide(Spec::Cuda, 0, 1, &no_gpu()).unwrap_err();
        assert!(
            e.starts_with("trainer.device is cuda but CUDA cannot be used"),
            "{e}"
        );
        assert!(
            e.contains("no NVIDIA driver") && e.contains("libcuda.so.1"),
            "{e}"
        );
        assert!(e.contains("libcudart.so.13"), "{e}");
        let e = decide(Spec::CudaIndex(0), 0, 1, &no_gpu()).unwrap_err();
        assert!(e.contains("cuda:0"), "{e}");
    }

    #[test]
    fn auto_with_a_gpu_but_an_old_driver_warns_and_uses_the_cpu() {
        let p = probe(
            Err("libtorch_cuda loaded, but torch sees no CUDA device"),
            gpu_driver("550.54.15", 12040, 1),
        );
        let (dev, warning) = decide(Spec::Auto, 0, 1, &p).unwrap();
        assert_eq!(dev, Device::Cpu);
        let w = warning.expect("a warning");
        for want in [
            "NVIDIA H200",
            "550.54.15",
            "CUDA 12.4",
            ">= 580",
            "on the CPU",
        ] {
            assert!(w.contains(want), "{want:?} missing from: {w}");
        }
        let e = decide(Spec::Cuda, 0, 1, &p).unwrap_err();
        assert!(e.contains("550.54.15") && e.contains(">= 580"), "{e}");
    }

    #[test]
    fn auto_with_a_gpu_but_missing_libraries_names_the_library() {
        let p = probe(
            Err("libtorch_cuda could not be loaded: libcublas.so.13: cannot open shared object file"),
            gpu_driver("580.159.04", 13000, 1),
        );
        let (dev, warning) = decide(Spec::Auto, 0, 1, &p).unwrap();
        assert_eq!(dev, Device::Cpu);
        let w = warning.unwrap();
        assert!(
            w.contains("libcublas.so.13") && !w.contains(">= 580"),
            "{w}"
        );
    }

    #[test]
    fn describe_the_cpu() {
        assert_eq!(describe(Device::Cpu), "cpu");
    }
}
