//! Command line of `extract-lora-from-dylora` (sd-scripts
//! `networks/extract_lora_from_dylora.py`).

use std::path::PathBuf;

use clap::Parser;

/// Cut fixed-rank LoRA files (rank unit, 2·unit, … below the full rank) out of a DyLoRA file.
///
/// Each output is `<save_to stem>-<rank, 4 digits>.safetensors` with its own metadata
/// (ss_network_dim, sshs_* hashes). See docs/extract-lora-from-dylora.md.
#[derive(Debug, Parser)]
#[command(name = "extract-lora-from-dylora", version)]
pub struct Args {
    /// DyLoRA file (.safetensors or a PyTorch .pt/.ckpt).
    #[arg(long, required = true)]
    pub model: PathBuf,
    /// Base output name (.safetensors); the rank is appended to the stem.
    #[arg(long = "save_to", alias = "save-to", required = true)]
    pub save_to: PathBuf,
    /// Rank step; should equal the training `unit` (default: `unit` of ss_network_args).
    #[arg(long)]
    pub unit: Option<usize>,
    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}
