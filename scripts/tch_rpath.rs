//! Shared build script for every package that links libtorch through `tch`.
//!
//! torch-sys (`links = "tch"`) exports the libtorch library directory to packages that depend
//! on it directly, as `DEP_TCH_LIBTORCH_LIB`. We add it as an rpath so that binaries, unit
//! tests, integration tests and doctests run without `LD_LIBRARY_PATH`
//! (see docs/architecture.md, "libtorch").

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=SD_LINK_CUDA");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: this package must depend on torch-sys directly");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // libtorch_cuda.so holds no symbol we reference, so the linker's --as-needed would drop it
    // and CUDA would never be found at run time. Keep it when present, unless the user opts
    // out (SD_LINK_CUDA=0) to save ~1 s of start-up on CPU-only machines.
    let want_cuda = std::env::var("SD_LINK_CUDA").map(|v| v != "0").unwrap_or(true);
    if want_cuda && std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
