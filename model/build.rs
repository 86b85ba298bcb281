//! Embeds libtorch's lib dir as an rpath of this package's tests and binaries, so they run
//! without LD_LIBRARY_PATH (see moe-build).
fn main() {
    moe_build::rpath_to_libtorch();
}
