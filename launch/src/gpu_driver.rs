//! The NVIDIA driver, probed independently of torch: the kernel module's version
//! (`/proc/driver/nvidia/version`), its GPUs (`/proc/driver/nvidia/gpus`), and the driver API
//! of `libcuda.so.1` (`cuInit`, `cuDriverGetVersion`, `cuDeviceGetCount`, `cuDeviceGetName`).
//!
//! It tells "no GPU here" (train on the CPU, silently) from "a GPU whose CUDA cannot be used"
//! (say why), and names the GPU in the start-up line. torch 2.11.0's CUDA 13 build needs a
//! driver that supports CUDA 13.0: version 580 or newer.

use std::ffi::{c_char, c_int, CStr, CString};
use std::sync::OnceLock;

/// The CUDA version torch 2.11.0's wheel is built for, as `cuDriverGetVersion` reports it.
pub const REQUIRED_CUDA: i32 = 13000;
/// The first driver series that supports [`REQUIRED_CUDA`].
pub const REQUIRED_DRIVER: u32 = 580;

/// What the driver probe found.
#[derive(Debug, Clone, PartialEq)]
pub enum DriverProbe {
    /// No NVIDIA driver and no NVIDIA device: why (the loader's message for libcuda.so.1).
    Absent(String),
    /// An NVIDIA driver or device is there.
    Present(DriverInfo),
}

/// An NVIDIA driver that is at least partly there.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DriverInfo {
    /// The kernel module's version, e.g. `580.159.04` (absent where /proc does not show it).
    pub version: Option<String>,
    /// The CUDA version the driver supports, as `cuDriverGetVersion` (13000 = 13.0).
    pub cuda_version: Option<i32>,
    /// The GPUs' names, by CUDA ordinal (or from /proc when the driver API failed).
    pub gpus: Vec<String>,
    /// What failed: libcuda.so.1 not loadable, or `cuInit`'s error.
    pub error: Option<String>,
}

/// `13000` -> `13.0`.
pub fn cuda_version_text(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// The version in `/proc/driver/nvidia/version`'s first line:
/// `NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Tue ...` -> `580.159.04`
/// (also `... Open Kernel Module for x86_64  580.159.04  Release Build ...`).
pub fn parse_nvrm_version(text: &str) -> Option<String> {
    let line = text.lines().next()?;
    let rest = line.split("Kernel Module").nth(1)?;
    rest.split_whitespace()
        .find(|t| {
            t.contains('.')
                && t.starts_with(|c: char| c.is_ascii_digit())
                && t.chars().all(|c| c.is_ascii_digit() || c == '.')
        })
        .map(String::from)
}

/// The major number of a driver version string: `580.159.04` -> 580.
pub fn driver_major(version: &str) -> Option<u32> {
    version.split('.').next()?.trim().parse().ok()
}

impl DriverProbe {
    /// Whether an NVIDIA device is there (whatever its driver's state).
    pub fn has_gpu(&self) -> bool {
        matches!(self, DriverProbe::Present(d) if !d.gpus.is_empty())
    }

    /// Why the driver cannot run torch's CUDA 13 build, if it cannot.
    pub fn problem(&self) -> Option<String> {
        let d = match self {
            DriverProbe::Absent(why) => return Some(format!("no NVIDIA driver ({why})")),
            DriverProbe::Present(d) => d,
        };
        let old_major = d
            .version
            .as_deref()
            .and_then(driver_major)
            .filter(|&m| m < REQUIRED_DRIVER);
        let old_cuda = d.cuda_version.filter(|&v| v < REQUIRED_CUDA);
        if old_major.is_some() || old_cuda.is_some() {
            let version = d.version.as_deref().unwrap_or("(version unknown)");
            let supports = d
                .cuda_version
                .map(|v| format!(", which supports up to CUDA {}", cuda_version_text(v)))
                .unwrap_or_default();
            return Some(format!(
                "the NVIDIA driver {version}{supports} is too old: torch 2.11.0's CUDA {} build \
                 needs driver >= {REQUIRED_DRIVER}; upgrade the driver",
                cuda_version_text(REQUIRED_CUDA)
            ));
        }
        d.error.as_ref().map(|e| format!("NVIDIA driver: {e}"))
    }

    /// `NVIDIA H200, driver 580.159.04` (or `2 x NVIDIA H200, ...`), for messages.
    pub fn summary(&self) -> String {
        match self {
            DriverProbe::Absent(_) => "no NVIDIA driver".into(),
            DriverProbe::Present(d) => {
                let gpus = match d.gpus.as_slice() {
                    [] => "no GPU found".to_string(),
                    [one] => one.clone(),
                    [first, rest @ ..] if rest.iter().all(|g| g == first) => {
                        format!("{} x {first}", d.gpus.len())
                    }
                    all => all.join(", "),
                };
                format!("{gpus}{}", driver_text(d))
            }
        }
    }

    /// ` (NVIDIA H200, driver 580.159.04)` for CUDA ordinal `i`, or nothing when unknown.
    pub fn describe_gpu(&self, i: usize) -> String {
        match self {
            DriverProbe::Present(d) => match d.gpus.get(i) {
                Some(name) => format!(" ({name}{})", driver_text(d)),
                None => String::new(),
            },
            DriverProbe::Absent(_) => String::new(),
        }
    }
}

fn driver_text(d: &DriverInfo) -> String {
    match (&d.version, d.cuda_version) {
        (Some(v), _) => format!(", driver {v}"),
        (None, Some(c)) => format!(", driver for CUDA {}", cuda_version_text(c)),
        (None, None) => String::new(),
    }
}

/// Probes the driver once per process.
pub fn probe() -> DriverProbe {
    static PROBE: OnceLock<DriverProbe> = OnceLock::new();
    PROBE.get_or_init(probe_now).clone()
}

fn proc_gpus() -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc/driver/nvidia/gpus") else {
        return Vec::new();
    };
    let mut found: Vec<(String, String)> = dir
        .flatten()
        .map(|e| {
            let info = std::fs::read_to_string(e.path().join("information")).unwrap_or_default();
            let model = info
                .lines()
                .find_map(|l| l.strip_prefix("Model:"))
                .map(|m| m.trim().to_string())
                .unwrap_or_else(|| "NVIDIA GPU".into());
            (e.file_name().to_string_lossy().into_owned(), model)
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, m)| m).collect()
}

fn probe_now() -> DriverProbe {
    let version = std::fs::read_to_string("/proc/driver/nvidia/version")
        .ok()
        .and_then(|t| parse_nvrm_version(&t));
    let from_proc = proc_gpus();
    let mut info = DriverInfo {
        version,
        ..DriverInfo::default()
    };
    match driver_api() {
        Err(load_error) => {
            if from_proc.is_empty() && info.version.is_none() {
                return DriverProbe::Absent(load_error);
            }
            info.error = Some(load_error);
            info.gpus = from_proc;
        }
        Ok(api) => {
            info.cuda_version = api.cuda_version;
            info.error = api.error;
            info.gpus = if api.gpus.is_empty() {
                from_proc
            } else {
                api.gpus
            };
        }
    }
    DriverProbe::Present(info)
}

struct ApiView {
    cuda_version: Option<i32>,
    gpus: Vec<String>,
    error: Option<String>,
}

type CuInit = unsafe extern "C" fn(u32) -> c_int;
type CuIntOut = unsafe extern "C" fn(*mut c_int) -> c_int;
type CuDeviceGet = unsafe extern "C" fn(*mut c_int, c_int) -> c_int;
type CuDeviceGetName = unsafe extern "C" fn(*mut c_char, c_int, c_int) -> c_int;
type CuGetErrorName = unsafe extern "C" fn(c_int, *mut *const c_char) -> c_int;

fn dl_error(what: &str) -> String {
    // SAFETY: dlerror returns a thread-local C string or null.
    let err = unsafe { libc::dlerror() };
    if err.is_null() {
        format!("{what}: not loadable")
    } else {
        // SAFETY: a non-null dlerror result is a valid C string.
        unsafe { CStr::from_ptr(err) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The driver API's view, or why libcuda.so.1 could not be loaded.
fn driver_api() -> Result<ApiView, String> {
    let name = CString::new("libcuda.so.1").map_err(|e| e.to_string())?;
    // SAFETY: a valid NUL-terminated name; the handle stays open for the process's lifetime
    // (torch uses the same library).
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if h.is_null() {
        return Err(dl_error("libcuda.so.1"));
    }
    let sym = |s: &str| -> Option<*mut libc::c_void> {
        let c = CString::new(s).ok()?;
        // SAFETY: `h` is a live handle and `c` a NUL-terminated symbol name.
        let p = unsafe { libc::dlsym(h, c.as_ptr()) };
        (!p.is_null()).then_some(p)
    };
    let (Some(init), Some(get_version), Some(get_count), Some(get), Some(get_name)) = (
        sym("cuInit"),
        sym("cuDriverGetVersion"),
        sym("cuDeviceGetCount"),
        sym("cuDeviceGet"),
        sym("cuDeviceGetName"),
    ) else {
        return Err("libcuda.so.1 lacks the driver API (cuInit, cuDeviceGetCount, ...)".into());
    };
    // SAFETY (all transmutes below): each pointer is the driver API function of that name,
    // read with its cuda.h signature (CUresult is an int, CUdevice an int).
    let (init, get_version, get_count, get, get_name) = unsafe {
        (
            std::mem::transmute::<*mut libc::c_void, CuInit>(init),
            std::mem::transmute::<*mut libc::c_void, CuIntOut>(get_version),
            std::mem::transmute::<*mut libc::c_void, CuIntOut>(get_count),
            std::mem::transmute::<*mut libc::c_void, CuDeviceGet>(get),
            std::mem::transmute::<*mut libc::c_void, CuDeviceGetName>(get_name),
        )
    };
    let error_name = |rc: c_int| -> String {
        let Some(f) = sym("cuGetErrorName") else {
            return format!("CUDA error {rc}");
        };
        // SAFETY: as above.
        let f = unsafe { std::mem::transmute::<*mut libc::c_void, CuGetErrorName>(f) };
        let mut p: *const c_char = std::ptr::null();
        // SAFETY: `p` is writable; on success it points to a static string.
        if unsafe { f(rc, &mut p) } == 0 && !p.is_null() {
            // SAFETY: a static NUL-terminated string from the driver.
            let n = unsafe { CStr::from_ptr(p) }.to_string_lossy();
            format!("{n} ({rc})")
        } else {
            format!("CUDA error {rc}")
        }
    };
    let mut view = ApiView {
        cuda_version: None,
        gpus: Vec::new(),
        error: None,
    };
    let mut v: c_int = 0;
    // SAFETY: `v` is writable; cuDriverGetVersion needs no cuInit.
    if unsafe { get_version(&mut v) } == 0 && v > 0 {
        view.cuda_version = Some(v);
    }
    // SAFETY: cuInit takes flags 0.
    let rc = unsafe { init(0) };
    if rc != 0 {
        view.error = Some(format!("cuInit failed: {}", error_name(rc)));
        return Ok(view);
    }
    let mut n: c_int = 0;
    // SAFETY: `n` is writable.
    let rc = unsafe { get_count(&mut n) };
    if rc != 0 {
        view.error = Some(format!("cuDeviceGetCount failed: {}", error_name(rc)));
        return Ok(view);
    }
    for ordinal in 0..n {
        let mut dev: c_int = 0;
        let mut buf = [0 as c_char; 256];
        // SAFETY: `dev` is writable; `buf` holds 256 bytes and the driver writes a
        // NUL-terminated name of at most that length.
        let name = unsafe {
            if get(&mut dev, ordinal) == 0 && get_name(buf.as_mut_ptr(), 256, dev) == 0 {
                CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
            } else {
                "NVIDIA GPU".into()
            }
        };
        view.gpus.push(name);
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvrm_version_is_parsed() {
        let t = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Tue Oct 21 2025\n\
                 GCC version:  gcc version 13.3.0\n";
        assert_eq!(parse_nvrm_version(t).as_deref(), Some("580.159.04"));
        let open = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.15  Release";
        assert_eq!(parse_nvrm_version(open).as_deref(), Some("550.54.15"));
        assert_eq!(parse_nvrm_version(""), None);
        assert_eq!(driver_major("580.159.04"), Some(580));
        assert_eq!(driver_major("550"), Some(550));
        assert_eq!(driver_major("x"), None);
        assert_eq!(cuda_version_text(13000), "13.0");
        assert_eq!(cuda_version_text(12040), "12.4");
    }

    fn present(version: Option<&str>, cuda: Option<i32>, error: Option<&str>) -> DriverProbe {
        DriverProbe::Present(DriverInfo {
            version: version.map(String::from),
            cuda_version: cuda,
            gpus: vec!["NVIDIA H200".into(), "NVIDIA H200".into()],
            error: error.map(String::from),
        })
    }

    #[test]
    fn an_old_driver_is_named_with_what_it_needs() {
        let p = present(Some("550.54.15"), Some(12040), None)
            .problem()
            .unwrap();
        assert!(p.contains("550.54.15") && p.contains("CUDA 12.4"), "{p}");
        assert!(p.contains(">= 580") && p.contains("CUDA 13.0"), "{p}");
        // Known by the CUDA version alone (no /proc, as under gVisor).
        let p = present(None, Some(12080), None).problem().unwrap();
        assert!(p.contains("12.8") && p.contains(">= 580"), "{p}");
        assert_eq!(
            present(Some("580.159.04"), Some(13000), None).problem(),
            None
        );
        let p = present(
            Some("580.159.04"),
            Some(13000),
            Some("cuInit failed: CUDA_ERROR_NO_DEVICE (100)"),
        )
        .problem()
        .unwrap();
        assert!(p.contains("CUDA_ERROR_NO_DEVICE"), "{p}");
        let absent = DriverProbe::Absent("libcuda.so.1: cannot open shared object file".into());
        assert!(!absent.has_gpu());
        assert!(absent
            .problem()
            .unwrap()
            .contains("no NVIDIA driver (libcuda.so.1"));
    }

    #[test]
    fn the_gpu_is_described_with_its_driver() {
        let p = present(Some("580.159.04"), Some(13000), None);
        assert!(p.has_gpu());
        assert_eq!(p.describe_gpu(1), " (NVIDIA H200, driver 580.159.04)");
        assert_eq!(p.describe_gpu(2), "");
        assert_eq!(p.summary(), "2 x NVIDIA H200, driver 580.159.04");
        let p = present(None, Some(13000), None);
        assert_eq!(p.describe_gpu(0), " (NVIDIA H200, driver for CUDA 13.0)");
    }

    /// On this machine: whatever the probe finds, it does not panic and is consistent; on a
    /// GPU check (`MOE_REQUIRE_CUDA=1`) it must find a GPU and a driver recent enough.
    #[test]
    fn the_probe_runs_here() {
        let p = probe();
        println!("driver here: {p:?}; cuda:0 is{}", p.describe_gpu(0));
        if moe_comm::cuda::cuda_required() {
            assert!(p.has_gpu(), "MOE_REQUIRE_CUDA=1 but no GPU found: {p:?}");
            assert_eq!(p.problem(), None);
        }
        match p {
            DriverProbe::Absent(why) => assert!(why.contains("libcuda"), "{why}"),
            DriverProbe::Present(d) => assert!(d.error.is_some() || !d.gpus.is_empty(), "{d:?}"),
        }
    }
}
