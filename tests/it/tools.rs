//! Locating (and building once) the binaries of other workspace packages.
//!
//! `CARGO_BIN_EXE_*` only exists for a package's own binaries, so the e2e tests build the
//! tools with the cargo running them (same profile and target folder; a no-op when up to date).
//! `SD_TOOLS_DIR` overrides the folder and skips the build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Tools built for the e2e tests (one `cargo build` for all of them).
pub const TOOLS: &[&str] = &[
    "check-lora-weights",
    "merge-lora",
    "svd-merge-lora",
    "resize-images",
    "train-network",
    "gen-img",
];

/// `<target>/<profile>`, after building [`TOOLS`].
pub fn tools_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("SD_TOOLS_DIR") {
            return PathBuf::from(dir);
        }
        // The test runs from <target>/<profile>/deps/it-<hash>.
        let exe = std::env::current_exe().expect("the test executable has a path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir
            .parent()
            .expect("<target>/<profile> has a parent");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile folder name is UTF-8")
            .to_owned();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "--target-dir"])
            .arg(target_dir);
        for tool in TOOLS {
            cmd.args(["-p", tool]);
        }
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        let status = cmd.status().expect("running cargo build for the tools");
        assert!(status.success(), "cargo build of the tools failed");
        profile_dir
    })
}

/// Path of tool `name` (built by [`tools_dir`]).
pub fn tool(name: &str) -> PathBuf {
    tools_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// Path of tool `name` when its binary exists (tools still being written are skipped).
pub fn optional_tool(name: &str) -> Option<PathBuf> {
    let path = tool(name);
    path.is_file().then_some(path)
}
