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
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set: this package must depend on torch-sys directly"
        );
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    // libtorch_cuda.so holds no symbol we reference, so the linker's --as-needed would drop it
    // and CUDA would never be found at run time: force it in when it can load. SD_LINK_CUDA=1
    // forces, =0 refuses; unset means "when libtorch_cuda.so and the CUDA libraries it needs
    // (cuBLAS, from the full torch install or a CUDA libtorch) are present". The slim set-up
    // has libtorch_cuda.so but not cuBLAS, and linking it there would fail at start-up.
    let lib_dir = std::path::Path::new(&lib);
    let has_cuda_torch = lib_dir.join("libtorch_cuda.so").exists();
    let cuda_libs_present = || {
        let candidates = [
            lib_dir.to_path_buf(),
            lib_dir.join("../../nvidia/cu13/lib"),
            lib_dir.join("../../nvidia/cublas/lib"),
        ];
        candidates.iter().any(|d| {
            std::fs::read_dir(d)
                .map(|entries| {
                    entries
                        .flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("libcublas.so"))
                })
                .unwrap_or(false)
        })
    };
    let want_cuda = match std::env::var("SD_LINK_CUDA").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        _ => has_cuda_torch && cuda_libs_present(),
    };
    if want_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
