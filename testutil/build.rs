//! Embeds libtorch's lib dir as an rpath of this package's tests and binaries, so they run
//! without LD_LIBRARY_PATH. torch-sys (a direct dependency, `links = "tch"`) exports it as
//! DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
