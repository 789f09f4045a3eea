//! Command line of `extract-lora-from-models` (sd-scripts
//! `networks/extract_lora_from_models.py`).

use std::path::PathBuf;

use clap::Parser;
use sd_cli::{Precision, parse_precision};

/// Approximate the difference of two checkpoints (tuned − original) by a LoRA, module by module.
///
/// Each LoRA module's ΔW = W_tuned − W_org is truncated to rank --dim (3×3 convs: --conv_dim)
/// by SVD; up/down are clamped at the --clamp_quantile quantile as the reference; alpha = rank.
/// The largest difference per component (U-Net, each text encoder) is printed with whether it
/// was extracted. See docs/extract-lora-from-models.md.
#[derive(Debug, Parser)]
#[command(name = "extract-lora-from-models", version)]
pub struct Args {
    /// Original (base) checkpoint, single file (.safetensors or .ckpt).
    #[arg(long = "model_org", alias = "model-org", required = true)]
    pub model_org: PathBuf,
    /// Fine-tuned checkpoint of the same model family.
    #[arg(long = "model_tuned", alias = "model-tuned", required = true)]
    pub model_tuned: PathBuf,
    /// Output LoRA (.safetensors); its directory is created when missing.
    #[arg(long = "save_to", alias = "save-to", required = true)]
    pub save_to: PathBuf,
    /// Rank of Linear and 1×1 conv modules (default 4).
    #[arg(long, default_value_t = 4)]
    pub dim: usize,
    /// Rank of 3×3 conv modules; when given, ResNet and sampler convs are extracted too.
    #[arg(long = "conv_dim", alias = "conv-dim")]
    pub conv_dim: Option<usize>,
    /// The models are SD 2.x (detected from the keys anyway; a disagreement is an error).
    #[arg(long)]
    pub v2: bool,
    /// The models are SDXL (detected from the keys anyway; a disagreement is an error).
    #[arg(long)]
    pub sdxl: bool,
    /// Metadata: v-prediction model (default: same as --v2, as the reference).
    #[arg(long = "v_parameterization", alias = "v-parameterization")]
    pub v_parameterization: bool,
    /// Metadata: prediction type, epsilon or v (overrides --v_parameterization; the reference
    /// cannot mark an SD2 model as epsilon).
    #[arg(long, value_parser = ["epsilon", "v"])]
    pub prediction: Option<String>,
    /// Round both models to this precision (float, fp16, bf16) before subtracting. Default:
    /// each file's own dtype.
    #[arg(long = "load_precision", alias = "load-precision", value_parser = parse_precision)]
    pub load_precision: Option<Precision>,
    /// Output dtype of all tensors, alpha included (float, fp16, bf16). Default: float.
    #[arg(long = "save_precision", alias = "save-precision", value_parser = parse_precision)]
    pub save_precision: Option<Precision>,
    /// Device of the subtraction and SVD: cpu or cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Quantile (0, 1] of the symmetric clamp of up/down (default 0.99); 1 disables it.
    #[arg(
        long = "clamp_quantile",
        alias = "clamp-quantile",
        default_value_t = 0.99
    )]
    pub clamp_quantile: f64,
    /// Text encoders are extracted when any of their modules differs by more than this
    /// (max |W_tuned − W_org|, default 0.01).
    #[arg(long = "min_diff", alias = "min-diff", default_value_t = 0.01)]
    pub min_diff: f64,
    /// Text encoders: `auto` (by --min_diff, as the reference), `include` or `exclude`.
    #[arg(long = "text_encoder", alias = "text-encoder", default_value = "auto", value_parser = ["auto", "include", "exclude"])]
    pub text_encoder: String,
    /// SVD route: `full` (LAPACK on each dense ΔW, as the reference: same singular-vector
    /// signs) or `randomized` (randomised range finder with oversampling and power
    /// iterations, much faster for large layers; the residual against ΔW is reported).
    #[arg(long = "svd_method", alias = "svd-method", default_value = "full", value_parser = ["full", "randomized"])]
    pub svd_method: String,
    /// Randomised SVD: subspace (power) iterations (default 2).
    #[arg(
        long = "svd_power_iters",
        alias = "svd-power-iters",
        default_value_t = 2
    )]
    pub svd_power_iters: usize,
    /// Randomised SVD: extra columns beyond the rank (default: the rank, at least 8).
    #[arg(long = "svd_oversample", alias = "svd-oversample")]
    pub svd_oversample: Option<usize>,
    /// Randomised SVD: seed of the random projection.
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
    /// Write no modelspec metadata.
    #[arg(long = "no_metadata", alias = "no-metadata")]
    pub no_metadata: bool,
    /// SDXL: device to load the original model on; no effect (weights are read from a memory
    /// map).
    #[arg(
        long = "load_original_model_to",
        alias = "load-original-model-to",
        hide = true
    )]
    pub load_original_model_to: Option<String>,
    /// SDXL: device to load the tuned model on; no effect.
    #[arg(
        long = "load_tuned_model_to",
        alias = "load-tuned-model-to",
        hide = true
    )]
    pub load_tuned_model_to: Option<String>,
    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}
