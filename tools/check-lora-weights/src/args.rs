//! Command line of `check-lora-weights` (sd-scripts `networks/check_lora_weights.py`).

use std::path::PathBuf;

use clap::Parser;

/// Print per-module rank, alpha, scale, dtype and ‖up·down‖ of a LoRA file, then its metadata.
///
/// Reads .safetensors and PyTorch pickles (.pt/.ckpt/.bin, never executing them). The report is
/// printed in every case; the exit code is 1 when the file cannot be read, holds no LoRA
/// module, holds NaN/Inf values, mixes SD1/SD2 and SDXL module names, or has a module with a
/// PROBLEM (unsupported algorithm keys such as LoHa/LoKr, rank mismatch, missing half,
/// non-scalar alpha, non-float dtype); 2 for usage errors; 0 otherwise.
#[derive(Debug, Parser)]
#[command(name = "check-lora-weights", version)]
pub struct Args {
    /// LoRA file to inspect (.safetensors, else a PyTorch pickle).
    pub file: PathBuf,
    /// Also list every key that is not part of a LoRA module.
    #[arg(short = 's', long = "show_all_keys", alias = "show-all-keys")]
    pub show_all_keys: bool,
    /// Print one JSON document on stdout instead of text (for scripts).
    #[arg(long)]
    pub json: bool,
    /// Also print sd-scripts' per-tensor lines `<key>,<shape>,<mean |x|>,<min |x|>`.
    #[arg(long)]
    pub tensors: bool,
    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}
