//! `gen-img`: text-to-image for SD 1.x / 2.x / SDXL with LoRA networks (sd-scripts
//! `gen_img.py`). Parses the command line, then calls `run::run`.

mod args;
mod run;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    sd_cli::init_logging(&args.verbosity);
    sd_cli::run(|| run::run(&args))
}
