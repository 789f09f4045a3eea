//! sd-cli: what every tool binary shares and no library needs — logging set-up, the
//! `main` wrapper that turns errors into one line on stderr and an exit code, progress bars,
//! and helpers for sd-scripts' flag spellings. No libtorch.
//!
//! Exit codes (STYLE.md §5): 0 success, 1 failure (bad input, I/O, computation), 2 usage
//! error (clap's own code), 130 interrupted.

use std::process::ExitCode;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;

/// Exit code for a failure after the command line was accepted.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code for a command-line usage error (the same as clap's).
pub const EXIT_USAGE: u8 = 2;
/// Exit code after an interruption (SIGINT), as shells report it.
pub const EXIT_INTERRUPTED: u8 = 130;

/// `-v`/`-q` flags shared by every tool; flatten into a tool's `Args`.
#[derive(Debug, Clone, Default, Args)]
pub struct Verbosity {
    /// More log output on stderr (-v: debug, -vv: trace). RUST_LOG overrides.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only warnings and errors on stderr.
    #[arg(short = 'q', long = "quiet", global = true)]
    pub quiet: bool,
    /// Never draw progress bars (they are hidden anyway when stderr is not a terminal).
    #[arg(long = "no_progress", alias = "no-progress", global = true)]
    pub no_progress: bool,
}

impl Verbosity {
    fn default_filter(&self) -> &'static str {
        match (self.quiet, self.verbose) {
            (true, _) => "warn",
            (false, 0) => "info",
            (false, 1) => "debug",
            _ => "trace",
        }
    }
}

/// Installs the stderr log subscriber: level from `-v`/`-q`, `RUST_LOG` wins when set.
/// Lines are short (`LEVEL message`) since users read them in terminals and CI logs.
pub fn init_logging(v: &Verbosity) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(v.default_filter()));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Runs a tool's body and maps its result to the process exit code: `Ok(code)` is returned
/// as is; an error is printed as `error: <message with causes>` on stderr and gives exit 1.
pub fn run(body: impl FnOnce() -> anyhow::Result<ExitCode>) -> ExitCode {
    match body() {
        Ok(code) => code,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            report_error(&err);
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// A closed stdout (`tool | head`) ends a tool quietly, as Unix filters do.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Prints one error with its chain of causes (`a: b: c`) to stderr.
#[allow(clippy::print_stderr)]
pub fn report_error(err: &anyhow::Error) {
    eprintln!("error: {err:#}");
}

/// A progress bar over `len` items, hidden with `--no_progress` or when stderr is not a TTY.
pub fn progress_bar(len: u64, what: &str, v: &Verbosity) -> ProgressBar {
    if v.no_progress || v.quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
            .expect("static progress template is valid")
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// Parses sd-scripts' precision names (`float`/`fp32`, `fp16`, `bf16`) case-insensitively.
///
/// # Errors
/// Names the accepted values when `s` is none of them (for clap `value_parser`).
pub fn parse_precision(s: &str) -> Result<Precision, String> {
    match s.to_ascii_lowercase().as_str() {
        "float" | "fp32" | "float32" | "no" => Ok(Precision::F32),
        "fp16" | "float16" | "half" => Ok(Precision::F16),
        "bf16" | "bfloat16" => Ok(Precision::BF16),
        other => Err(format!(
            "unknown precision \"{other}\": expected float, fp16 or bf16"
        )),
    }
}

/// A floating-point precision as named on sd-scripts command lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 32-bit float (`float`, `fp32`).
    F32,
    /// IEEE half (`fp16`).
    F16,
    /// bfloat16 (`bf16`).
    BF16,
}

/// Runs the tool binary `tool` that lies next to this program with `leading` arguments in
/// front of this program's own: the body of the thin sd-scripts alias binaries
/// (`sdxl-train-network`, `sdxl-merge-lora`). On Unix this process is replaced (`exec`), so
/// signals (Ctrl-C) and the exit code are the tool's; elsewhere the tool's exit code is
/// passed on.
///
/// # Errors
/// Returns [`EXIT_FAILURE`] after one `error:` line on stderr when the tool cannot be
/// located or started.
pub fn run_alias(tool: &str, leading: &[&str]) -> ExitCode {
    let name = format!("{tool}{}", std::env::consts::EXE_SUFFIX);
    let exe = match std::env::current_exe() {
        Ok(p) => p.with_file_name(name),
        Err(e) => {
            report_error(&anyhow::anyhow!("cannot locate this program: {e}"));
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(leading).args(std::env::args_os().skip(1));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = cmd.exec();
        report_error(&anyhow::anyhow!("cannot run {}: {err}", exe.display()));
        ExitCode::from(EXIT_FAILURE)
    }
    #[cfg(not(unix))]
    match cmd.status() {
        Ok(s) => ExitCode::from(s.code().map_or(EXIT_FAILURE, |c| c.clamp(0, 255) as u8)),
        Err(e) => {
            report_error(&anyhow::anyhow!("cannot run {}: {e}", exe.display()));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_names() {
        assert_eq!(parse_precision("FP16"), Ok(Precision::F16));
        assert_eq!(parse_precision("float"), Ok(Precision::F32));
        assert_eq!(parse_precision("bf16"), Ok(Precision::BF16));
        assert!(
            parse_precision("int8")
                .unwrap_err()
                .contains("expected float, fp16 or bf16")
        );
    }
}
