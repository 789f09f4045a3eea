//! Command line of `merge-lora` (sd-scripts `networks/merge_lora.py` and
//! `networks/sdxl_merge_lora.py`).

use std::path::PathBuf;

use clap::Parser;
use sd_cli::{Precision, parse_precision};

/// Merge LoRAs into a checkpoint (SD1, SD2 or SDXL, detected), or LoRAs with each other.
///
/// With --sd_model each LoRA's ΔW (times its ratio) is added to the checkpoint's weights; keys
/// no LoRA touches are copied unchanged. Without --sd_model the LoRAs are merged into one LoRA
/// whose ΔW is Σ ratio·ΔW (exact with --concat). See docs/merge-lora.md.
#[derive(Debug, Parser)]
#[command(name = "merge-lora", version)]
pub struct Args {
    /// Checkpoint to merge into (.safetensors or .ckpt single file, or a Diffusers folder;
    /// the output is a single file); absent: merge LoRAs with each other.
    #[arg(long = "sd_model", alias = "sd-model")]
    pub sd_model: Option<PathBuf>,
    /// Output file: .safetensors, or .ckpt/.pt/.pth/.bin for a PyTorch (torch.save) file.
    #[arg(long = "save_to", alias = "save-to", required = true)]
    pub save_to: PathBuf,
    /// LoRA files, applied in order.
    #[arg(long, num_args = 1.., required = true)]
    pub models: Vec<PathBuf>,
    /// One ratio per model (negative subtracts, 0 removes).
    #[arg(long, num_args = 1.., required = true, allow_negative_numbers = true)]
    pub ratios: Vec<f64>,
    /// The checkpoint is SD 2.x (detected from its keys anyway; a disagreement is warned about).
    #[arg(long)]
    pub v2: bool,
    /// Output dtype (float, fp16, bf16). Default: each tensor keeps its input dtype (a fp16
    /// LoRA stays fp16; untouched checkpoint keys are copied byte for byte).
    #[arg(long = "save_precision", alias = "save-precision", value_parser = parse_precision)]
    pub save_precision: Option<Precision>,
    /// Precision the LoRA factors are rounded to before multiplying (float, fp16, bf16);
    /// products and sums are always computed in f32. Default: float.
    #[arg(long, value_parser = parse_precision, default_value = "float")]
    pub precision: Precision,
    /// Write no modelspec metadata (checkpoint: no metadata at all).
    #[arg(long = "no_metadata", alias = "no-metadata")]
    pub no_metadata: bool,
    /// LoRA + LoRA: concatenate ranks (exact merge) instead of adding factors.
    #[arg(long)]
    pub concat: bool,
    /// LoRA + LoRA: randomly permute each module's rank dimension (ΔW unchanged).
    #[arg(long)]
    pub shuffle: bool,
    /// Seed of --shuffle (default: random).
    #[arg(long)]
    pub seed: Option<i64>,
    /// LoRA + LoRA: reproduce sd-scripts' numbers (each factor scaled by the ratio, so its
    /// effect is squared; --concat halves each part), for byte-compatible tensors.
    #[arg(long = "reference_compatible", alias = "reference-compatible")]
    pub reference_compatible: bool,
    /// Device for the arithmetic: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The inputs must be SDXL (set by the `sdxl-merge-lora` alias): SD1/SD2 checkpoints and
    /// LoRAs are refused, as sd-scripts' `sdxl_merge_lora.py` cannot load them.
    #[arg(long, hide = true)]
    pub sdxl: bool,
    /// sd-scripts' layer-block weights (SDXL script); not supported.
    #[arg(long, num_args = 0.., hide = true)]
    pub lbws: Vec<String>,
    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}
