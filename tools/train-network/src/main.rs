//! `train-network`: LoRA training with sd-scripts' `train_network.py` /
//! `sdxl_train_network.py` command line. Parses (with `--config_file`), validates into
//! [`options::TrainOptions`], then trains. Exit codes: 0 ok, 1 failure, 2 usage error.

mod args;
mod compat;
mod config_file;
mod distributed;
mod options;
mod overwrite;
mod run;

use std::process::ExitCode;

use anyhow::Context;

use crate::args::CliError;
use crate::options::TrainOptions;

fn main() -> ExitCode {
    let parsed = match args::parse_from(std::env::args_os()) {
        Ok(p) => p,
        Err(CliError::Usage(e)) => e.exit(),
        Err(CliError::Config(e)) => {
            sd_cli::report_error(&e);
            return ExitCode::from(sd_cli::EXIT_FAILURE);
        }
    };
    let mut verbosity = parsed.args.verbosity.clone();
    // --console_log_level maps onto -v/-q (RUST_LOG still wins).
    match parsed.args.logging.console_log_level.as_deref() {
        Some("DEBUG") => verbosity.verbose = verbosity.verbose.max(1),
        Some("WARNING" | "ERROR" | "CRITICAL") => verbosity.quiet = true,
        _ => {}
    }
    sd_cli::init_logging(&verbosity);
    sd_cli::run(|| body(parsed))
}

fn body(parsed: args::Parsed) -> anyhow::Result<ExitCode> {
    if parsed.args.config.output_config {
        let path = parsed
            .config_file
            .as_ref()
            .context("--output_config needs --config_file to name the file to write")?;
        config_file::write_output_config(&args::command(), &parsed.matches, path)?;
        tracing::info!("saved options to {}", path.display());
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = &parsed.config_file {
        tracing::info!("options from {} (the command line wins)", path.display());
        tracing::debug!("keys taken from the config file: {:?}", parsed.from_file);
    }
    let launch = distributed::Launch::from_args(&parsed.args)?;
    // With --num_processes the workers print the warnings (once, on rank 0).
    let quiet_parent = launch.spawns();
    for warning in compat::check(&parsed.args, &parsed.given)? {
        if !quiet_parent {
            tracing::warn!("{warning}");
        }
    }
    let validated = TrainOptions::from_args(&parsed.args, &parsed.given)?;
    for warning in validated.warnings.iter().filter(|_| !quiet_parent) {
        tracing::warn!("{warning}");
    }
    let options = validated.options;
    if parsed.args.config.print_config {
        #[allow(clippy::print_stdout)]
        {
            print!("{}", options.to_toml()?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !options.dataset.debug_dataset {
        overwrite::refuse_outputs_over_inputs(&options)?;
    }
    let datasets = options.resolve_datasets()?;
    for warning in datasets.warnings.iter().filter(|_| !quiet_parent) {
        tracing::warn!("{warning}");
    }
    if quiet_parent && !options.dataset.debug_dataset {
        return distributed::spawn_local(&launch);
    }
    run::run(
        &launch,
        &options,
        &datasets,
        parsed.args.dataset.json,
        &parsed.args.verbosity,
    )
}
