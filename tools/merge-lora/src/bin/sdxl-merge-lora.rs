//! `sdxl-merge-lora`: the name of sd-scripts' `networks/sdxl_merge_lora.py` as a thin alias. It
//! runs the `merge-lora` binary next to it with `--sdxl` in front of the given arguments (one
//! binary handles every family; `--sdxl` makes it refuse SD1/SD2 checkpoints and LoRAs, as the
//! SDXL script would). Exit codes are `merge-lora`'s.

use std::ffi::OsString;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let name = if cfg!(windows) {
        "merge-lora.exe"
    } else {
        "merge-lora"
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p.with_file_name(name),
        Err(e) => {
            report(&format!("cannot locate this program: {e}"));
            return ExitCode::from(1);
        }
    };
    let mut args: Vec<OsString> = vec!["--sdxl".into()];
    args.extend(std::env::args_os().skip(1));
    let mut cmd = Command::new(&exe);
    cmd.args(&args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Replaces this process: signals and the exit code are the tool's.
        let err = cmd.exec();
        report(&format!("cannot run {}: {err}", exe.display()));
        ExitCode::from(1)
    }
    #[cfg(not(unix))]
    match cmd.status() {
        Ok(s) => ExitCode::from(s.code().map_or(1, |c| c.clamp(0, 255) as u8)),
        Err(e) => {
            report(&format!("cannot run {}: {e}", exe.display()));
            ExitCode::from(1)
        }
    }
}

#[allow(clippy::print_stderr)]
fn report(message: &str) {
    eprintln!("error: {message}");
}
