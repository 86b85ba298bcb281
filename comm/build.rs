//! Compiles the C++ autograd shim (csrc/autograd_shim.cpp) against the libtorch that
//! torch-sys found, and embeds libtorch's lib dir as an rpath of this package's tests and
//! examples (the library itself leaves the rpath to the final binary's crate; see moe-build).

fn main() {
    let lib = moe_build::require_libtorch_lib();
    moe_build::rpath(&lib);
    // The build-time libtorch dir, last resort of `cuda::load` for libtorch_cuda.
    println!("cargo:rustc-env=MOE_LIBTORCH_LIB={}", lib.display());
    moe_build::compile_shim(&lib, "csrc/autograd_shim.cpp", "moe_comm_shim");
}
