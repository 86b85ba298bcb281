//! PyTorch's CUDA library loaded at run time, and the devices a test runs on.
//!
//! tch links only `libtorch_cpu` (the linker drops `libtorch_cuda`, which no symbol of ours
//! references). Loading `libtorch_cuda.so` at run time registers PyTorch's CUDA hooks, so one
//! binary, or one test executable, runs on a CPU-only machine (where the library or its CUDA
//! dependencies are missing and nothing is loaded) and sees the GPUs on a CUDA machine.
//! It also loads the NCCL that libtorch_cuda links (`libnccl.so.2` of the nvidia-nccl wheel),
//! which [`crate::nccl`] then finds by its soname.
//!
//! [`test_devices`] / [`test_device!`](crate::test_device) are candle's pattern: a test runs
//! on the CPU and, where CUDA is usable, on `cuda:0`. With `MOE_REQUIRE_CUDA=1` (set by
//! `scripts/gpu-check.sh`) a CUDA variant that cannot run fails instead of skipping, so a GPU
//! check cannot pass by running nothing.

use std::ffi::{CStr, CString};
use std::sync::OnceLock;
use tch::Device;

/// Loads libtorch_cuda once, from `MOE_LIBTORCH_LIB` (run time), the library search path
/// (the rpath of the libtorch this binary was built against, `LD_LIBRARY_PATH`), or the
/// build-time libtorch dir. Returns why it could not, if it could not (the loader's message
/// names the missing library, e.g. `libcublas.so.13: cannot open shared object file`).
pub fn load() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let mut candidates = vec!["libtorch_cuda.so".to_string()];
            if let Ok(dir) = std::env::var("MOE_LIBTORCH_LIB") {
                candidates.insert(0, format!("{dir}/libtorch_cuda.so"));
            }
            if let Some(dir) = option_env!("MOE_LIBTORCH_LIB") {
                candidates.push(format!("{dir}/libtorch_cuda.so"));
            }
            let mut errors: Vec<String> = Vec::new();
            for c in candidates {
                let Ok(name) = CString::new(c.clone()) else {
                    continue;
                };
                // SAFETY: a valid NUL-terminated path; the handle is intentionally never
                // closed (the library must stay loaded for the process's lifetime).
                let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                if !h.is_null() {
                    return Ok(());
                }
                // SAFETY: dlerror returns a thread-local C string or null.
                let err = unsafe { libc::dlerror() };
                let msg = if err.is_null() {
                    format!("{c}: not loadable")
                } else {
                    // SAFETY: a non-null dlerror result is a valid C string.
                    unsafe { CStr::from_ptr(err) }
                        .to_string_lossy()
                        .into_owned()
                };
                if !errors.contains(&msg) {
                    errors.push(msg);
                }
            }
            // The most specific message (a dependency that is missing) is usually the one
            // for an existing path: report all, most specific first.
            errors.sort_by_key(|m| m.contains("libtorch_cuda.so: cannot open"));
            Err(errors.join("; "))
        })
        .clone()
}

/// Number of CUDA devices torch can use after [`load`], and why there are none.
pub fn device_count() -> Result<usize, String> {
    let loaded = load();
    if tch::Cuda::is_available() {
        let n = tch::Cuda::device_count();
        if n > 0 {
            return Ok(n as usize);
        }
    }
    Err(match loaded {
        Err(e) => format!("libtorch_cuda could not be loaded: {e}"),
        Ok(()) => "libtorch_cuda loaded, but torch sees no CUDA device".into(),
    })
}

/// True when `MOE_REQUIRE_CUDA=1`: tests' CUDA variants must run (a GPU check).
pub fn cuda_required() -> bool {
    std::env::var("MOE_REQUIRE_CUDA").is_ok_and(|v| v == "1")
}

/// For tests: `cuda:0` when CUDA is usable, else `None` after printing why the CUDA variant
/// is skipped.
///
/// # Panics
/// When CUDA is not usable and `MOE_REQUIRE_CUDA=1`: a required GPU test fails, it does not
/// pass by skipping.
pub fn test_cuda_device() -> Option<Device> {
    match device_count() {
        Ok(_) => Some(Device::Cuda(0)),
        Err(why) if cuda_required() => {
            panic!("MOE_REQUIRE_CUDA=1 but CUDA is not usable: {why}")
        }
        Err(why) => {
            println!("skipped on cuda: {why}");
            None
        }
    }
}

/// For tests: the CPU, then `cuda:0` when CUDA is usable (see [`test_cuda_device`] for the
/// `MOE_REQUIRE_CUDA=1` rule).
pub fn test_devices() -> Vec<Device> {
    let mut d = vec![Device::Cpu];
    d.extend(test_cuda_device());
    d
}

/// Defines two tests from one `fn(Device)`: `$cpu` runs it on the CPU, `$cuda` on `cuda:0`
/// (skipped with a note where CUDA is not usable, failing instead under
/// `MOE_REQUIRE_CUDA=1`). Candle's `test_device!`.
///
/// ```ignore
/// fn grouped_matches(dev: Device) { ... }
/// moe_comm::test_device!(grouped_matches, grouped_matches_cpu, grouped_matches_cuda);
/// ```
#[macro_export]
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(::tch::Device::Cpu)
        }

        #[test]
        fn $cuda() {
            if let Some(dev) = $crate::cuda::test_cuda_device() {
                $body(dev)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On this machine the answer must be consistent: either CUDA is usable, or the reason
    /// names what failed; never a panic (unless a GPU check demanded CUDA).
    #[test]
    fn device_count_is_consistent() {
        match device_count() {
            Ok(n) => assert!(n > 0),
            Err(why) => {
                assert!(why.contains("libtorch_cuda"), "{why}");
                assert!(!cuda_required(), "MOE_REQUIRE_CUDA=1 but {why}");
                assert_eq!(test_devices(), vec![Device::Cpu]);
            }
        }
    }
}
