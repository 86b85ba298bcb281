//! What the moe crates' build scripts share, so the flags are written once.
//!
//! torch-sys (`links = "tch"`) exports libtorch's lib dir as `DEP_TCH_LIBTORCH_LIB` to the
//! crates that depend on it directly. Each of them embeds that dir as an rpath of its own
//! tests, examples and binaries (`rustc-link-arg` reaches only the package's own targets, unit
//! tests included), so they run without `LD_LIBRARY_PATH`; moe-comm and moe-trainer also
//! compile a C++ shim against libtorch's headers with the flags torch-sys itself uses.

use std::path::{Path, PathBuf};

/// libtorch's lib dir from torch-sys, or `None` when torch-sys did not export it. Also asks
/// cargo to rerun the build script when it changes.
pub fn libtorch_lib() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from)
}

/// [`libtorch_lib`], for a crate that cannot build without it (it compiles a shim): exits the
/// build script with a message that says what is missing, rather than failing deep inside
/// the C++ compiler.
pub fn require_libtorch_lib() -> PathBuf {
    libtorch_lib().unwrap_or_else(|| {
        eprintln!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not export libtorch's lib dir");
        std::process::exit(1);
    })
}

/// Embeds `lib` as an rpath of this package's tests, examples and binaries.
pub fn rpath(lib: &Path) {
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
}

/// The usual build script of a crate that links libtorch: the rpath, when torch-sys gave a
/// lib dir.
pub fn rpath_to_libtorch() -> Option<PathBuf> {
    let lib = libtorch_lib()?;
    rpath(&lib);
    Some(lib)
}

/// Compiles the C++ file `source` (relative to the crate) against the libtorch in `lib` into
/// the static library `name`, linked into the crate; `#include "moe_shim_guard.h"` finds the
/// shared exception guard (build-support/include).
pub fn compile_shim(lib: &Path, source: &str, name: &str) {
    println!("cargo:rerun-if-changed={source}");
    // include/moe_shim_guard.h: the exception guard every shim's entry points share.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("include");
    println!(
        "cargo:rerun-if-changed={}",
        shared.join("moe_shim_guard.h").display()
    );
    let include = lib.join("..").join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&shared)
        .include(&include)
        .include(
            include
                .join("torch")
                .join("csrc")
                .join("api")
                .join("include"),
        )
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(source)
        .compile(name);
}
