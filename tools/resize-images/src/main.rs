//! `resize-images`: the dataset pre-processor (sd-scripts `resize_images_to_resolution.py`).
//! Parses flags, plans the outputs, runs them in parallel with a progress bar and lists
//! failures at the end. Exit codes: 0 all written, 1 some files failed, 2 usage error
//! (bad flags, DST_DIR = SRC_DIR).

mod args;

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use sd_data::resize;

use crate::args::Args;

fn main() -> ExitCode {
    let args = Args::parse();
    sd_cli::init_logging(&args.verbosity);
    sd_cli::run(|| body(args))
}

fn body(args: Args) -> anyhow::Result<ExitCode> {
    let verbosity = args.verbosity.clone();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(message) => return Ok(usage_error(anyhow::anyhow!(message))),
    };
    let plan = match resize::plan(&config.src_dir, &config.dst_dir, &config.resize) {
        Ok(p) => p,
        Err(e @ sd_data::Error::SameDirectory { .. }) => return Ok(usage_error(e.into())),
        Err(e) => return Err(e).with_context(|| format!("reading {}", config.src_dir.display())),
    };
    for group in &plan.disambiguated {
        let names: Vec<String> = group.iter().map(|p| p.display().to_string()).collect();
        tracing::warn!(
            "{} share a stem: their outputs are named after the whole file name (e.g. \"<name.ext>+{}\") so none overwrites another",
            names.join(", "),
            config
                .resize
                .targets
                .first()
                .map_or("WxH", |t| t.label.as_str())
        );
    }
    for path in &plan.skipped {
        tracing::debug!("skipped {} (not a file)", path.display());
    }
    tracing::info!(
        "resizing {} images ({} files to copy) from {} to {}",
        plan.images.len(),
        plan.copies.len(),
        config.src_dir.display(),
        config.dst_dir.display()
    );

    let bar = sd_cli::progress_bar(plan.work_items() as u64, "resizing", &verbosity);
    let dst_dir = config.dst_dir.clone();
    let run = || resize::execute(plan, &dst_dir, &config.resize, &|| bar.inc(1));
    let report = match config.workers {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .context("starting worker threads")?
            .install(run),
        None => run(),
    }
    .with_context(|| format!("writing to {}", dst_dir.display()))?;
    bar.finish_and_clear();

    tracing::info!(
        "{} images resized, {} files written to {}",
        report.images,
        report.written,
        dst_dir.display()
    );
    if report.failures.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    for failure in &report.failures {
        tracing::error!("{failure}");
    }
    tracing::error!(
        "{} files or outputs failed (listed above)",
        report.failures.len()
    );
    Ok(ExitCode::from(sd_cli::EXIT_FAILURE))
}

fn usage_error(err: anyhow::Error) -> ExitCode {
    sd_cli::report_error(&err);
    ExitCode::from(sd_cli::EXIT_USAGE)
}
