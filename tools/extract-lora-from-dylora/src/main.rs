//! `extract-lora-from-dylora`: fixed-rank LoRAs from a DyLoRA file (sd-scripts
//! `networks/extract_lora_from_dylora.py`). See docs/extract-lora-from-dylora.md.

mod args;

use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use sd_core::lora::dylora::{split, split_path, unit_from_metadata};
use sd_formats::tensor_file::TensorFile;

fn main() -> ExitCode {
    let args = args::Args::parse();
    sd_cli::init_logging(&args.verbosity);
    sd_cli::run(|| run(&args))
}

fn run(args: &args::Args) -> anyhow::Result<ExitCode> {
    let ext = args
        .save_to
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase());
    if ext.as_deref() != Some("safetensors") {
        bail!(
            "--save_to {}: only .safetensors output is supported (PyTorch pickle output loses the metadata and is not written by this tool)",
            args.save_to.display()
        );
    }
    let file = TensorFile::open(&args.model)
        .with_context(|| format!("reading DyLoRA {}", args.model.display()))?;
    let unit = match args.unit {
        Some(u) => u,
        None => unit_from_metadata(file.metadata()).with_context(|| {
            format!(
                "{}: --unit not given and the file's ss_network_args has no \"unit\"",
                args.model.display()
            )
        })?,
    };
    if unit == 0 {
        bail!("--unit must be at least 1");
    }
    let splits =
        split(&file, unit).with_context(|| format!("splitting {}", args.model.display()))?;
    if splits.is_empty() {
        tracing::warn!(
            "{}: the full rank is not above --unit {unit}: nothing to write",
            args.model.display()
        );
    }
    for s in &splits {
        let path = split_path(&args.save_to, s.rank);
        if path.canonicalize().ok() == args.model.canonicalize().ok() && path.exists() {
            bail!("{}: refusing to overwrite the input file", path.display());
        }
        s.save(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!("rank {}: {}", s.rank, path.display());
    }
    Ok(ExitCode::SUCCESS)
}
