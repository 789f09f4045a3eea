//! Command line of `gen-img`: sd-scripts `gen_img.py` spellings (underscores; kebab-case
//! aliases), the same defaults.

use std::path::PathBuf;

use clap::Parser;

/// Text-to-image for SD 1.x / 2.x / SDXL with LoRA networks (sd-scripts gen_img.py).
#[derive(Debug, Parser)]
#[command(name = "gen-img", version, about, long_about = None)]
pub struct Args {
    /// Model: a single file (.safetensors/.ckpt) or a Diffusers folder.
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Diffusers folder whose configs describe a single file of non-standard size (ours).
    #[arg(long = "model_config_dir", alias = "model-config-dir")]
    pub model_config_dir: Option<PathBuf>,
    /// The model is SD 1.x (the default when nothing else is detected).
    #[arg(long)]
    pub v1: bool,
    /// The model is SD 2.x.
    #[arg(long)]
    pub v2: bool,
    /// The model is SDXL (also detected from the file).
    #[arg(long)]
    pub sdxl: bool,
    /// The model predicts v (SD 2.x 768-v).
    #[arg(long = "v_parameterization", alias = "v-parameterization")]
    pub v_parameterization: bool,
    /// Rescale the noise schedule to zero terminal SNR (every sampler).
    #[arg(long = "zero_terminal_snr", alias = "zero-terminal-snr")]
    pub zero_terminal_snr: bool,
    /// Replacement VAE: a Diffusers VAE folder or a Diffusers-layout VAE .safetensors.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// U-Net, text encoders and LoRA in float16.
    #[arg(long)]
    pub fp16: bool,
    /// U-Net, text encoders and LoRA in bfloat16.
    #[arg(long)]
    pub bf16: bool,
    /// Keep the VAE in float32 with --fp16/--bf16.
    #[arg(long = "no_half_vae", alias = "no-half-vae")]
    pub no_half_vae: bool,
    /// Attention backend (no effect: attention is always PyTorch's fused SDPA, numerically plain
    /// softmax attention).
    #[arg(long)]
    pub xformers: bool,
    /// Attention backend (no effect: SDPA is always used).
    #[arg(long)]
    pub sdpa: bool,
    /// Device: cpu, cuda or cuda:N (default: cuda when available, else cpu).
    #[arg(long)]
    pub device: Option<String>,

    /// One prompt line (per-line options allowed: --n, --w, --h, --s, --l, --d, --am, …).
    #[arg(long)]
    pub prompt: Option<String>,
    /// File with one prompt line per line (# comments and empty lines skipped).
    #[arg(long = "from_file", alias = "from-file")]
    pub from_file: Option<PathBuf>,
    /// Images per prompt line.
    #[arg(
        long = "images_per_prompt",
        alias = "images-per-prompt",
        default_value_t = 1
    )]
    pub images_per_prompt: usize,
    /// Repeat the whole prompt list N times.
    #[arg(long = "n_iter", alias = "n-iter", default_value_t = 1)]
    pub n_iter: usize,
    /// U-Net batch size (consecutive images with equal settings are batched).
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 1)]
    pub batch_size: usize,
    /// Seed of the seed generator (Python random.Random semantics, as sd-scripts).
    #[arg(long)]
    pub seed: Option<u64>,
    /// One seed per iteration for every image without its own --d seed.
    #[arg(long = "iter_same_seed", alias = "iter-same-seed")]
    pub iter_same_seed: bool,

    /// Sampler: ddim, pndm, lms, euler, euler_a, heun, dpm_2, dpm_2_a, dpmsolver,
    /// dpmsolver++, dpmsingle (k_lms, k_euler, k_euler_a, k_dpm_2, k_dpm_2_a aliases).
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    /// Sampling steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (guidance is on when > 1).
    #[arg(long, default_value_t = 7.5)]
    pub scale: f64,
    /// Weight of the negative prompt against an empty prompt (three-way guidance).
    #[arg(long = "negative_scale", alias = "negative-scale")]
    pub negative_scale: Option<f64>,
    /// Image width in pixels (default 512; 1024 for SDXL).
    #[arg(long = "W")]
    pub width: Option<i64>,
    /// Image height in pixels (default 512; 1024 for SDXL).
    #[arg(long = "H")]
    pub height: Option<i64>,
    /// Text-encoder layer from the end (SD1/SD2: 1 = last; SDXL: 2).
    #[arg(long = "clip_skip", alias = "clip-skip")]
    pub clip_skip: Option<usize>,
    /// Prompt capacity in multiples of 75 tokens (1 when unset).
    #[arg(long = "max_embeddings_multiples", alias = "max-embeddings-multiples")]
    pub max_embeddings_multiples: Option<usize>,
    /// Prompt-weight normalisation: original, abs or none.
    #[arg(
        long = "emb_normalize_mode",
        alias = "emb-normalize-mode",
        default_value = "original"
    )]
    pub emb_normalize_mode: String,

    /// SDXL original width (size conditioning).
    #[arg(long = "original_width")]
    pub original_width: Option<i64>,
    /// SDXL original height.
    #[arg(long = "original_height")]
    pub original_height: Option<i64>,
    /// SDXL original width for the negative prompt.
    #[arg(long = "original_width_negative")]
    pub original_width_negative: Option<i64>,
    /// SDXL original height for the negative prompt.
    #[arg(long = "original_height_negative")]
    pub original_height_negative: Option<i64>,
    /// SDXL crop top.
    #[arg(long = "crop_top")]
    pub crop_top: Option<i64>,
    /// SDXL crop left.
    #[arg(long = "crop_left")]
    pub crop_left: Option<i64>,

    /// Network module per network (only networks.lora).
    #[arg(long = "network_module", alias = "network-module", num_args = 1..)]
    pub network_module: Vec<String>,
    /// LoRA weights file per network.
    #[arg(long = "network_weights", alias = "network-weights", num_args = 1..)]
    pub network_weights: Vec<PathBuf>,
    /// Default multiplier per network (1.0 each).
    #[arg(long = "network_mul", alias = "network-mul", num_args = 1..)]
    pub network_mul: Vec<f64>,
    /// Network arguments (accepted; no effect at inference).
    #[arg(long = "network_args", alias = "network-args", num_args = 1..)]
    pub network_args: Vec<String>,
    /// Merge all networks into the weights (faster; --am has no effect).
    #[arg(long = "network_merge", alias = "network-merge")]
    pub network_merge: bool,
    /// Merge the first N networks; apply the rest dynamically.
    #[arg(long = "network_merge_n_models", alias = "network-merge-n-models")]
    pub network_merge_n_models: Option<usize>,
    /// Fold dynamic networks into the weights per batch (no effect: same images).
    #[arg(long = "network_pre_calc", alias = "network-pre-calc")]
    pub network_pre_calc: bool,
    /// Print each network file's metadata.
    #[arg(long = "network_show_meta", alias = "network-show-meta")]
    pub network_show_meta: bool,

    /// Output folder (created if missing).
    #[arg(long, default_value = "outputs")]
    pub outdir: PathBuf,
    /// Name files im_{prefix}{n:06d}.png (counting across iterations).
    #[arg(long = "sequential_file_name", alias = "sequential-file-name")]
    pub sequential_file_name: bool,
    /// Print one JSON line per image on stdout.
    #[arg(long)]
    pub json: bool,

    /// sd-scripts options this port does not implement (refused with a message).
    #[arg(long = "image_path", hide = true)]
    pub image_path: Option<PathBuf>,
    /// See `image_path`.
    #[arg(long = "mask_path", hide = true)]
    pub mask_path: Option<PathBuf>,
    /// See `image_path`.
    #[arg(long = "highres_fix_scale", hide = true)]
    pub highres_fix_scale: Option<f64>,
    /// See `image_path`.
    #[arg(long, hide = true)]
    pub interactive: bool,
    /// See `image_path`.
    #[arg(long = "textual_inversion_embeddings", hide = true, num_args = 1..)]
    pub textual_inversion_embeddings: Vec<PathBuf>,
    /// See `image_path`.
    #[arg(long = "shuffle_prompts", hide = true)]
    pub shuffle_prompts: bool,
    /// Performance-only sd-scripts options (no effect here).
    #[arg(long = "opt_channels_last", hide = true)]
    pub opt_channels_last: bool,
    /// See `opt_channels_last`.
    #[arg(long = "vae_slices", hide = true)]
    pub vae_slices: Option<usize>,
    /// See `opt_channels_last`.
    #[arg(long = "vae_batch_size", hide = true)]
    pub vae_batch_size: Option<f64>,
    /// See `opt_channels_last`.
    #[arg(long = "no_preview", hide = true)]
    pub no_preview: bool,

    /// Logging and progress.
    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}
