//! Embeds libtorch's directory as the binary's rpath, so `moe` runs without LD_LIBRARY_PATH.
//! torch-sys (our direct dependency, `links = "tch"`) hands its lib dir over as
//! DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        println!("cargo:rustc-env=MOE_LIBTORCH_LIB={lib}");
    }
}
