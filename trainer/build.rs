//! Compiles the multi-tensor optimizer shim (csrc/fused_optim.cpp: torch's fused AdamW and
//! foreach norms, which tch does not bind) against the libtorch torch-sys found, and embeds
//! libtorch's lib dir as an rpath of this package's tests and binaries, so they run without
//! LD_LIBRARY_PATH. torch-sys (a direct dependency, `links = "tch"`) exports it as
//! DEP_TCH_LIBTORCH_LIB. The flags are those of moe-comm's shim (comm/build.rs).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/fused_optim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        eprintln!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not export libtorch's lib dir");
        std::process::exit(1);
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
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
        .file("csrc/fused_optim.cpp")
        .compile("moe_trainer_shim");
}
