//! Compiles the multi-tensor optimizer shim (csrc/fused_optim.cpp: torch's fused AdamW and
//! foreach norms, which tch does not bind) against the libtorch torch-sys found, and embeds
//! libtorch's lib dir as an rpath of this package's tests and binaries (see moe-build).

fn main() {
    let lib = moe_build::require_libtorch_lib();
    moe_build::rpath(&lib);
    moe_build::compile_shim(&lib, "csrc/fused_optim.cpp", "moe_trainer_shim");
}
