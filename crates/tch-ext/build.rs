//! Compiles `cpp/shim.cpp` against the libtorch headers of the libtorch that torch-sys links
//! (found through `DEP_TCH_LIBTORCH_LIB`, exported because torch-sys is a direct dependency),
//! then adds the same rpath as `scripts/tch_rpath.rs` so tests run without `LD_LIBRARY_PATH`.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=cpp/shim.cpp");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("torch-sys exports DEP_TCH_LIBTORCH_LIB to direct dependents");
    // The include folder sits beside lib/ both in a libtorch archive and in the torch wheel.
    let include = Path::new(&lib).join("../include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .file("cpp/shim.cpp")
        .compile("tchext");
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
}
