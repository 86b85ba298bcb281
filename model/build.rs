//! Compiles the dispatcher's CPU combine kernel (csrc/combine.cpp, a torch autograd function)
//! against the libtorch torch-sys found, and embeds libtorch's lib dir as an rpath of this
//! package's tests and binaries, so they run without LD_LIBRARY_PATH (see moe-build).
fn main() {
    let lib = moe_build::require_libtorch_lib();
    moe_build::rpath(&lib);
    moe_build::compile_shim(&lib, "csrc/combine.cpp", "moe_model_shim");
}
