//! Device discovery: `auto | cpu | cuda | cuda:N`.
//!
//! tch links only `libtorch_cpu` (the linker drops `libtorch_cuda`, which no symbol of ours
//! references). Loading `libtorch_cuda.so` at run time registers PyTorch's CUDA hooks, so the
//! same binary runs on a CPU-only machine (where the library or its CUDA dependencies are
//! missing and nothing is loaded) and sees the GPUs on a CUDA machine.

use anyhow::{anyhow, bail};
use std::ffi::CString;
use tch::{Cuda, Device};

/// Loads libtorch_cuda once, from the rpath (the libtorch this binary was built against) or
/// `LD_LIBRARY_PATH`/`MOE_LIBTORCH_LIB`. Returns why it could not, if it could not.
pub fn load_cuda() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let mut candidates = vec!["libtorch_cuda.so".to_string()];
            if let Ok(dir) = std::env::var("MOE_LIBTORCH_LIB") {
                candidates.insert(0, format!("{dir}/libtorch_cuda.so"));
            }
            if let Some(dir) = option_env!("MOE_LIBTORCH_LIB") {
                candidates.push(format!("{dir}/libtorch_cuda.so"));
            }
            let mut last = String::new();
            for c in candidates {
                let Ok(name) = CString::new(c.clone()) else {
                    continue;
                };
                // SAFETY: a valid NUL-terminated path; the handle is intentionally never closed
                // (the library must stay loaded for the process's lifetime).
                let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if !h.is_null() {
                    return Ok(());
                }
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                last = if err.is_null() {
                    format!("{c}: not loadable")
                } else {
                    // SAFETY: non-null dlerror result is a valid C string.
                    unsafe { std::ffi::CStr::from_ptr(err) }
                        .to_string_lossy()
                        .into_owned()
                };
            }
            Err(last)
        })
        .clone()
}

/// Resolves the configured device for a rank with node-local index `local_rank`.
pub fn resolve_device(spec: &str, local_rank: usize) -> anyhow::Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let loaded = load_cuda();
    let count = if Cuda::is_available() {
        Cuda::device_count() as usize
    } else {
        0
    };
    match spec {
        "auto" if count == 0 => Ok(Device::Cpu),
        "auto" | "cuda" => {
            if count == 0 {
                bail!(
                    "trainer.device is cuda but no CUDA device is available ({})",
                    loaded
                        .err()
                        .unwrap_or_else(|| "libtorch_cuda loaded, no GPU found".into())
                );
            }
            Ok(Device::Cuda(local_rank % count))
        }
        other => {
            let n: usize = other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    anyhow!("trainer.device ({other:?}) must be auto, cpu, cuda or cuda:N")
                })?;
            if n >= count {
                bail!("trainer.device is {other} but only {count} CUDA device(s) are available");
            }
            Ok(Device::Cuda(n))
        }
    }
}
