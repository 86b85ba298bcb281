//! Embeds libtorch's directory as the binary's rpath, so `moe` runs without LD_LIBRARY_PATH
//! (see moe-build).
fn main() {
    if let Some(lib) = moe_build::rpath_to_libtorch() {
        println!("cargo:rustc-env=MOE_LIBTORCH_LIB={}", lib.display());
    }
}
