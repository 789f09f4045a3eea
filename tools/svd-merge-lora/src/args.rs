//! Command line of `svd-merge-lora` (sd-scripts `networks/svd_merge_lora.py`).

use std::path::PathBuf;

use clap::Parser;
use sd_cli::{Precision, parse_precision};

/// Merge LoRAs exactly (Σ ratio·ΔW in f32), then re-approximate each module at a new rank by SVD.
///
/// Output alpha = rank (scale 1); up/down clamped at the 0.99 quantile as the reference. See
/// docs/svd-merge-lora.md.
#[derive(Debug, Parser)]
#[command(name = "svd-merge-lora", version)]
pub struct Args {
    /// LoRA files to merge.
    #[arg(long, num_args = 1.., required = true)]
    pub models: Vec<PathBuf>,
    /// One ratio per model (negative subtracts).
    #[arg(long, num_args = 1.., required = true, allow_negative_numbers = true)]
    pub ratios: Vec<f64>,
    /// Output file (.safetensors).
    #[arg(long = "save_to", alias = "save-to", required = true)]
    pub save_to: PathBuf,
    /// Output rank of Linear and 1×1 modules (default 4).
    #[arg(long = "new_rank", alias = "new-rank", default_value_t = 4)]
    pub new_rank: usize,
    /// Output rank of 3×3 conv modules (default: --new_rank).
    #[arg(long = "new_conv_rank", alias = "new-conv-rank")]
    pub new_conv_rank: Option<usize>,
    /// Output dtype (float, fp16, bf16). Default: the first input's weight dtype.
    #[arg(long = "save_precision", alias = "save-precision", value_parser = parse_precision)]
    pub save_precision: Option<Precision>,
    /// Accepted for compatibility: the sums and the SVD are always f32 (the reference fails
    /// in the SVD with fp16/bf16).
    #[arg(long, value_parser = parse_precision, default_value = "float")]
    pub precision: Precision,
    /// Device of the SVD: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// SVD route: `full` (LAPACK on the dense ΔW, as the reference: same singular-vector
    /// signs, so the same quantile clamp) or `factored` (exact SVD through the LoRA factors,
    /// much faster; the clamp may differ where signs differ).
    #[arg(long = "svd_method", alias = "svd-method", default_value = "full", value_parser = ["factored", "full"])]
    pub svd_method: String,
    /// Write no modelspec metadata.
    #[arg(long = "no_metadata", alias = "no-metadata")]
    pub no_metadata: bool,
    /// sd-scripts' layer-block weights; not supported.
    #[arg(long, num_args = 0.., hide = true)]
    pub lbws: Vec<String>,
    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}
