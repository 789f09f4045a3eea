//! `check-lora-weights`: statistics of a LoRA file (sd-scripts `check_lora_weights.py`, with
//! the module count fixed, each key listed once, and rank/alpha/scale/norm per module).

mod args;
mod report;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

fn main() -> ExitCode {
    let args = args::Args::parse();
    sd_cli::init_logging(&args.verbosity);
    sd_cli::run(|| run(&args))
}

fn run(args: &args::Args) -> anyhow::Result<ExitCode> {
    let file = sd_formats::tensor_file::TensorFile::open(&args.file)
        .with_context(|| format!("reading LoRA {}", args.file.display()))?;
    for global in file.ignored_globals() {
        tracing::debug!(
            "{}: pickle global ignored (never executed): {global}",
            args.file.display()
        );
    }
    let report = report::Report::build(&file)
        .with_context(|| format!("checking LoRA {}", args.file.display()))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report.to_json(args.show_all_keys))?;
        writeln!(out)?;
    } else {
        report.write_text(&mut out, args.show_all_keys)?;
    }
    if args.tensors {
        report::write_reference_lines(&mut out, &file)?;
    }
    out.flush()?;
    if report.modules.is_empty() {
        anyhow::bail!(
            "{}: no LoRA module found (expected keys ending in .lora_down.weight/.lora_up.weight or .lora_A.weight/.lora_B.weight); {} other key(s)",
            args.file.display(),
            report.stray_keys.len()
        );
    }
    if !report.non_finite.is_empty() {
        anyhow::bail!(
            "{}: {} tensor(s) hold NaN or Inf values: {}",
            args.file.display(),
            report.non_finite.len(),
            report.non_finite.join(", ")
        );
    }
    if let (Some(sd1), Some(sdxl)) =
        sd_formats::lora::family_name_evidence(report.modules.iter().map(|m| m.name.as_str()))
    {
        anyhow::bail!(
            "{}: module names mix model families: {sd1} is an SD1.x/SD2.x name, {sdxl} an SDXL name",
            args.file.display()
        );
    }
    let with_problems: Vec<String> = report
        .modules
        .iter()
        .filter(|m| !m.problems.is_empty())
        .map(|m| format!("{} ({})", m.name, m.problems.join("; ")))
        .collect();
    if let Some(first) = with_problems.first() {
        anyhow::bail!(
            "{}: {} of {} module(s) cannot be used as LoRA modules (see the PROBLEM lines), first: {first}",
            args.file.display(),
            with_problems.len(),
            report.modules.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
