//! Compiles the C++ autograd shim (csrc/autograd_shim.cpp) against the libtorch that
//! torch-sys found; torch-sys (`links = "tch"`) passes its lib dir as DEP_TCH_LIBTORCH_LIB.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/autograd_shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = match std::env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => {
            // Without torch-sys's lib dir there is no libtorch to compile against; say how
            // to fix it rather than failing deep inside the C++ compiler.
            eprintln!(
                "DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not export libtorch's lib dir"
            );
            std::process::exit(1);
        }
    };
    // Our tests and examples run without LD_LIBRARY_PATH (the library itself leaves the
    // rpath to the final binary's crate).
    // (`rustc-link-arg` reaches only this package's own tests and examples, unit tests
    // included; `-tests` would miss the lib's unit-test binary.)
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The build-time libtorch dir, last resort of `cuda::load` for libtorch_cuda.
    println!("cargo:rustc-env=MOE_LIBTORCH_LIB={}", lib.display());
    let include = lib.join("..").join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
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
        .file("csrc/autograd_shim.cpp")
        .compile("moe_comm_shim");
}
