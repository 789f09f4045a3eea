//! Compiles `cpp/shim.cpp` (c10d process groups) against the headers of the libtorch torch-sys
//! links, when the backend headers are available, and tells the Rust side which backends it has:
//!
//! - Gloo (`cfg(sd_dist_gloo)`): libtorch ships c10d but not the gloo headers its
//!   `ProcessGroupGloo.hpp` includes; they come from Debian's `libgloo-dev` (`/usr/include/gloo`)
//!   or from `SD_GLOO_INCLUDE` (the folder that holds `gloo/`). Only c10d symbols of
//!   `libtorch_cpu.so` are referenced, so nothing links against the system libgloo.
//! - NCCL (`cfg(sd_dist_nccl)`): needs `libtorch_cuda.so` and the CUDA + NCCL headers
//!   (`nccl.h`, `cuda_runtime_api.h`, `crt/host_config.h`, `nv/target`, and the cuSPARSE,
//!   cuBLAS and cuSOLVER headers that `ATen/cuda/CUDAContext.h` includes), found in
//!   `SD_NCCL_INCLUDE` (folders separated by `:`) or in the `nvidia/*/include` folders of the
//!   torch wheel's site-packages.
//!
//! `SD_DIST_DISABLE=1` builds the stub. A shim that fails to compile is a warning, not an error:
//! the workspace always builds, and `ProcessGroup::init` says why distributed training is
//! unavailable.

use std::path::{Path, PathBuf};

fn main() {
    for v in [
        "DEP_TCH_LIBTORCH_LIB",
        "SD_GLOO_INCLUDE",
        "SD_NCCL_INCLUDE",
        "SD_DIST_DISABLE",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=cpp/shim.cpp");
    let disabled = std::env::var("SD_DIST_DISABLE").is_ok_and(|v| !v.is_empty() && v != "0");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        unavailable(
            "DEP_TCH_LIBTORCH_LIB is not set (torch-sys did not export the libtorch folder)",
        );
        return;
    };
    // This crate's own tests and examples link libtorch through tch even with the stub.
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if disabled {
        unavailable("it was built with SD_DIST_DISABLE set");
        return;
    }
    let lib = PathBuf::from(lib);
    let include = lib.join("../include");
    let gloo = gloo_include();
    let nccl = nccl_includes(&lib);
    let mut reasons = Vec::new();
    if gloo.is_none() {
        reasons.push(
            "no gloo headers (install libgloo-dev, or set SD_GLOO_INCLUDE to the folder holding gloo/)"
                .to_owned(),
        );
    }
    if nccl.is_none() {
        reasons.push("no CUDA/NCCL headers or libtorch_cuda (set SD_NCCL_INCLUDE)".to_owned());
    }
    // Try both backends, then each alone: a backend whose headers don't compile is dropped.
    let mut attempts: Vec<(bool, bool)> = Vec::new();
    if gloo.is_some() && nccl.is_some() {
        attempts.push((true, true));
    }
    if gloo.is_some() {
        attempts.push((true, false));
    }
    if nccl.is_some() {
        attempts.push((false, true));
    }
    for (with_gloo, with_nccl) in attempts {
        let mut b = cc::Build::new();
        b.cpp(true)
            .pic(true)
            .warnings(false)
            .cargo_warnings(false)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
            .define("USE_DISTRIBUTED", None)
            .file("cpp/shim.cpp");
        if with_gloo {
            b.define("USE_C10D_GLOO", None).define("SD_DIST_GLOO", None);
            if let Some(dir) = &gloo {
                b.include(dir);
            }
        }
        if with_nccl {
            b.define("USE_C10D_NCCL", None)
                .define("USE_CUDA", None)
                .define("SD_DIST_NCCL", None);
            for dir in nccl.iter().flatten() {
                b.include(dir);
            }
        }
        match b.try_compile("sddist") {
            Ok(()) => {
                println!("cargo:rustc-cfg=sd_dist_shim");
                println!("cargo:rustc-link-search=native={}", lib.display());
                if with_gloo {
                    println!("cargo:rustc-cfg=sd_dist_gloo");
                }
                if with_nccl {
                    println!("cargo:rustc-cfg=sd_dist_nccl");
                    println!("cargo:rustc-link-lib=dylib=torch_cuda");
                    println!("cargo:rustc-link-lib=dylib=c10_cuda");
                }
                println!("cargo:rustc-link-lib=dylib=torch_cpu");
                println!("cargo:rustc-link-lib=dylib=c10");
                let missing: Vec<&str> = [(!with_gloo, "gloo"), (!with_nccl, "nccl")]
                    .iter()
                    .filter(|(m, _)| *m)
                    .map(|(_, n)| *n)
                    .collect();
                println!(
                    "cargo:rustc-env=SD_DIST_MISSING={}",
                    if missing.is_empty() {
                        String::new()
                    } else {
                        format!("{}: {}", missing.join(", "), reasons.join("; "))
                    }
                );
                return;
            }
            Err(e) => {
                let what = match (with_gloo, with_nccl) {
                    (true, true) => "gloo+nccl",
                    (true, false) => "gloo",
                    _ => "nccl",
                };
                println!(
                    "cargo:warning=sd-dist: the {what} shim did not compile ({e}); trying without it"
                );
                reasons.push(format!("the {what} shim did not compile: {e}"));
            }
        }
    }
    unavailable(&reasons.join("; "));
}

fn unavailable(reason: &str) {
    println!(
        "cargo:rustc-env=SD_DIST_MISSING={}",
        reason.replace('\n', " ")
    );
    println!(
        "cargo:rustc-env=SD_DIST_UNAVAILABLE={}",
        reason.replace('\n', " ")
    );
}

/// The folder holding `gloo/` (its `ProcessGroupGloo.hpp` includes `<gloo/...>`).
fn gloo_include() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("SD_GLOO_INCLUDE") {
        let dir = PathBuf::from(dir);
        return dir.join("gloo/allreduce.h").is_file().then_some(dir);
    }
    let dir = PathBuf::from("/usr/include");
    dir.join("gloo/allreduce.h").is_file().then_some(dir)
}

/// Include folders that together hold the CUDA and NCCL headers, when libtorch_cuda exists.
fn nccl_includes(lib: &Path) -> Option<Vec<PathBuf>> {
    if !lib.join("libtorch_cuda.so").is_file() {
        return None;
    }
    let dirs: Vec<PathBuf> = match std::env::var("SD_NCCL_INCLUDE") {
        Ok(v) => v
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect(),
        Err(_) => {
            // The torch wheel's CUDA dependencies: site-packages/nvidia/<pkg>/include.
            let nvidia = lib.join("../../nvidia");
            std::fs::read_dir(&nvidia)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.path().join("include"))
                        .filter(|p| p.is_dir())
                        .collect()
                })
                .unwrap_or_default()
        }
    };
    // ProcessGroupNCCL.hpp reaches ATen/cuda/CUDAContext.h, which includes the cuSPARSE,
    // cuBLAS and cuSOLVER headers too (the full torch wheel install brings them).
    let needed = [
        "nccl.h",
        "cuda_runtime_api.h",
        "crt/host_config.h",
        "nv/target",
        "cusparse.h",
        "cublas_v2.h",
        "cusolverDn.h",
    ];
    needed
        .iter()
        .all(|h| dirs.iter().any(|d| d.join(h).exists()))
        .then_some(dirs)
}
