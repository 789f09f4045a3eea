//! Command line of `train-network`, spelled as sd-scripts' `train_network.py` /
//! `sdxl_train_network.py`: every option of the reference (spec training.md §13) with the
//! same underscore spelling and default, plus a kebab-case alias for each, and the
//! `--config_file` merge (CLI > file > default, see [`crate::config_file`]).
//!
//! Options that this port accepts but does not implement are hidden from `--help`; whether
//! they warn ("has no effect") or fail ("unsupported") is decided by the table in
//! [`crate::compat`]. This module only parses; [`crate::options`] validates.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args as ClapArgs, Command, CommandFactory, FromArgMatches, Parser};

use crate::compat::{self, Support};
use crate::config_file;

/// Train a LoRA (networks.lora) or DyLoRA (networks.dylora) network for Stable Diffusion
/// 1.x, 2.x or SDXL (sd-scripts train_network.py / sdxl_train_network.py).
///
/// Options use sd-scripts' spellings (`--network_dim 8`); each also has a kebab-case alias
/// (`--network-dim 8`). `accelerate launch ... train_network.py` command lines work after
/// dropping that prefix. Options given in `--config_file` act as defaults for the command
/// line. sd-scripts options that have no effect here or are unsupported are accepted but
/// hidden; see docs/train-network.md.
#[derive(Debug, Clone, Parser)]
#[command(name = "train-network", version, max_term_width = 100)]
pub struct Args {
    #[command(flatten, next_help_heading = "Model")]
    pub model: ModelArgs,
    #[command(flatten, next_help_heading = "Dataset")]
    pub dataset: DatasetArgs,
    #[command(flatten, next_help_heading = "Caching")]
    pub caching: CachingArgs,
    #[command(flatten, next_help_heading = "Network")]
    pub network: NetworkArgs,
    #[command(flatten, next_help_heading = "Optimisation")]
    pub optimization: OptimizationArgs,
    #[command(flatten, next_help_heading = "Diffusion and loss")]
    pub diffusion: DiffusionArgs,
    #[command(flatten, next_help_heading = "Output, saving and resuming")]
    pub output: OutputArgs,
    #[command(flatten, next_help_heading = "Sampling")]
    pub sampling: SamplingArgs,
    #[command(flatten, next_help_heading = "Logging")]
    pub logging: LoggingArgs,
    #[command(flatten, next_help_heading = "Configuration files")]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}

/// Base model selection and loading.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct ModelArgs {
    /// Base model: a .safetensors/.ckpt file or a Diffusers folder (required; no downloads).
    #[arg(long, value_name = "PATH")]
    pub pretrained_model_name_or_path: Option<PathBuf>,
    /// The base model is Stable Diffusion 2.x.
    #[arg(long)]
    pub v2: bool,
    /// Train with v-prediction (SD 2.x 768-v models).
    #[arg(long)]
    pub v_parameterization: bool,
    /// The base model is SDXL (what sdxl_train_network.py implies; not an sd-scripts option).
    #[arg(long)]
    pub sdxl: bool,
    /// VAE file or folder replacing the model's own.
    #[arg(long, value_name = "PATH")]
    pub vae: Option<PathBuf>,
    /// Keep the VAE in fp32 under mixed precision.
    #[arg(long)]
    pub no_half_vae: bool,
    /// Tokenizer cache folder (sd-scripts downloads tokenizers; this port never does).
    #[arg(long, value_name = "DIR")]
    pub tokenizer_cache_dir: Option<PathBuf>,
    /// Load models directly onto the GPU (memory placement only).
    #[arg(long)]
    pub lowram: bool,
    /// Do not empty the GPU cache while caching latents (memory only).
    #[arg(long)]
    pub highvram: bool,
    /// Store the frozen UNet and text encoders in float8.
    #[arg(long)]
    pub fp8_base: bool,
    /// Store the frozen UNet in float8.
    #[arg(long)]
    pub fp8_base_unet: bool,
    /// SDXL: read safetensors without mmap (loading mechanism only).
    #[arg(long)]
    pub disable_mmap_load_safetensors: bool,
}

/// Dataset options of the command line (the dataset TOML overrides them per dataset).
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct DatasetArgs {
    /// Dataset description (.toml or .json, training.md §2).
    #[arg(long, value_name = "PATH")]
    pub dataset_config: Option<PathBuf>,
    /// Folder of `N_name` sub-folders (DreamBooth) or images of --in_json.
    #[arg(long, value_name = "DIR")]
    pub train_data_dir: Option<PathBuf>,
    /// Folder of `N_name` regularisation sub-folders.
    #[arg(long, value_name = "DIR")]
    pub reg_data_dir: Option<PathBuf>,
    /// Fine-tuning metadata file (JSON).
    #[arg(long, value_name = "PATH")]
    pub in_json: Option<PathBuf>,
    /// Repeats of fine-tuning datasets.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub dataset_repeats: i64,
    /// Training resolution in pixels: "SIZE" or "WIDTH,HEIGHT".
    #[arg(long, value_name = "W,H")]
    pub resolution: Option<String>,
    /// Aspect-ratio bucketing.
    #[arg(long)]
    pub enable_bucket: bool,
    /// Smallest bucket side in pixels.
    #[arg(long, value_name = "PIXELS", default_value_t = 256)]
    pub min_bucket_reso: i64,
    /// Largest bucket side in pixels.
    #[arg(long, value_name = "PIXELS", default_value_t = 1024)]
    pub max_bucket_reso: i64,
    /// Bucket side granularity in pixels (divisible by 64 for SD, 32 for SDXL).
    #[arg(long, value_name = "PIXELS", default_value_t = 64)]
    pub bucket_reso_steps: i64,
    /// One bucket per image size, never upscaling.
    #[arg(long)]
    pub bucket_no_upscale: bool,
    /// Resampling filter: lanczos, nearest, bilinear, linear, bicubic, cubic or area
    /// (default: area when shrinking, Lanczos when enlarging).
    #[arg(long, value_name = "NAME")]
    pub resize_interpolation: Option<String>,
    /// Caption file extension.
    #[arg(long, value_name = "EXT", default_value = ".caption")]
    pub caption_extension: String,
    /// Misspelled alias of --caption_extension kept by sd-scripts; wins when given.
    #[arg(long, value_name = "EXT")]
    pub caption_extention: Option<String>,
    /// Shuffle the caption's tags.
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Tag separator.
    #[arg(long, value_name = "TEXT", default_value = ",")]
    pub caption_separator: String,
    /// Number of leading tags kept in place when shuffling.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub keep_tokens: i64,
    /// Separator between the fixed and the shuffled part of a caption.
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub keep_tokens_separator: String,
    /// Secondary separator, replaced by --caption_separator after shuffling.
    #[arg(long, value_name = "TEXT")]
    pub secondary_separator: Option<String>,
    /// `{a|b}` wildcards and multi-line captions.
    #[arg(long)]
    pub enable_wildcard: bool,
    /// Text put before every caption.
    #[arg(long, value_name = "TEXT")]
    pub caption_prefix: Option<String>,
    /// Text put after every caption.
    #[arg(long, value_name = "TEXT")]
    pub caption_suffix: Option<String>,
    /// Weak colour augmentation.
    #[arg(long)]
    pub color_aug: bool,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip_aug: bool,
    /// Random instead of centre crops.
    #[arg(long)]
    pub random_crop: bool,
    /// Face-centred crop augmentation range "MIN,MAX".
    #[arg(long, value_name = "MIN,MAX")]
    pub face_crop_aug_range: Option<String>,
    /// Tag count at step 0 of token warm-up.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub token_warmup_min: i64,
    /// Step at which all tags are used (< 1: fraction of max_train_steps).
    #[arg(long, value_name = "STEPS", default_value_t = 0.0)]
    pub token_warmup_step: f64,
    /// Probability that a whole caption is dropped.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub caption_dropout_rate: f64,
    /// Drop every caption in epochs that are multiples of N.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub caption_dropout_every_n_epochs: i64,
    /// Per-tag drop probability.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    pub caption_tag_dropout_rate: f64,
    /// Loss weight of regularisation images.
    #[arg(long, value_name = "W", default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    /// Use the PNG alpha channel as loss mask.
    #[arg(long)]
    pub alpha_mask: bool,
    /// Weight the loss with masks (conditioning_data_dir in the dataset config).
    #[arg(long)]
    pub masked_loss: bool,
    /// Mask folder (read by sd-scripts' ControlNet trainers only).
    #[arg(long, value_name = "DIR")]
    pub conditioning_data_dir: Option<PathBuf>,
    /// Cache image sizes and captions in metadata_cache.json (DreamBooth).
    #[arg(long)]
    pub cache_info: bool,
    /// Longest prompt in tokens: 75 (default), 150 or 225.
    #[arg(long, value_name = "N", value_parser = parse_max_token_length)]
    pub max_token_length: Option<i64>,
    /// `(text:1.2)` prompt weighting in captions.
    #[arg(long)]
    pub weighted_captions: bool,
    /// List one epoch (each image with its bucket, caption and repeat) without loading the
    /// model, then exit 0.
    #[arg(long)]
    pub debug_dataset: bool,
    /// With --debug_dataset: print the listing as JSON (for scripts).
    #[arg(long)]
    pub json: bool,
    /// Python dataset class `package.module.Class`.
    #[arg(long, value_name = "CLASS")]
    pub dataset_class: Option<String>,
    /// Fraction of the training images held out for validation.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub validation_split: f64,
    /// Seed of the validation split (default: --seed).
    #[arg(long, value_name = "SEED")]
    pub validation_seed: Option<i64>,
    /// Validate every N optimiser steps.
    #[arg(long, value_name = "N")]
    pub validate_every_n_steps: Option<i64>,
    /// Validate every N epochs (default: every epoch when a validation set exists).
    #[arg(long, value_name = "N")]
    pub validate_every_n_epochs: Option<i64>,
    /// Largest number of validation batches per run (default: all).
    #[arg(long, value_name = "N")]
    pub max_validation_steps: Option<i64>,
}

/// Latent and text-encoder output caches.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct CachingArgs {
    /// Encode every image once and keep the latents in memory (no colour aug / random crop).
    #[arg(long)]
    pub cache_latents: bool,
    /// Cache latents in .npz files next to the images (implies --cache_latents).
    #[arg(long)]
    pub cache_latents_to_disk: bool,
    /// Batch size of latent caching.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub vae_batch_size: i64,
    /// Trust existing cache files without checking them.
    #[arg(long)]
    pub skip_cache_check: bool,
    /// SDXL: cache text-encoder outputs (needs --network_train_unet_only).
    #[arg(long)]
    pub cache_text_encoder_outputs: bool,
    /// SDXL: cache text-encoder outputs on disk (implies --cache_text_encoder_outputs).
    #[arg(long)]
    pub cache_text_encoder_outputs_to_disk: bool,
}

/// The trained network.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct NetworkArgs {
    /// Network to train: networks.lora or networks.dylora (required).
    #[arg(long, value_name = "MODULE")]
    pub network_module: Option<String>,
    /// Rank of the LoRA modules (default 4).
    #[arg(long, value_name = "RANK")]
    pub network_dim: Option<i64>,
    /// LoRA alpha; modules are scaled by alpha / rank.
    #[arg(long, value_name = "ALPHA", default_value_t = 1.0)]
    pub network_alpha: f64,
    /// Dropout probability of LoRA activations.
    #[arg(long, value_name = "P")]
    pub network_dropout: Option<f64>,
    /// Extra network options, e.g. "conv_dim=4" "conv_alpha=1" "rank_dropout=0.1".
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub network_args: Vec<String>,
    /// LoRA file to start from.
    #[arg(long, value_name = "PATH")]
    pub network_weights: Option<PathBuf>,
    /// Take ranks and alphas from --network_weights.
    #[arg(long)]
    pub dim_from_weights: bool,
    /// Train only the UNet LoRA.
    #[arg(long)]
    pub network_train_unet_only: bool,
    /// Train only the text-encoder LoRA.
    #[arg(long)]
    pub network_train_text_encoder_only: bool,
    /// LoRA files merged into the base model before training.
    #[arg(long, value_name = "PATH", num_args = 0..)]
    pub base_weights: Vec<PathBuf>,
    /// Multipliers of --base_weights (1.0 where missing).
    #[arg(long, value_name = "M", num_args = 0..)]
    pub base_weights_multiplier: Vec<f64>,
    /// Rescale LoRA weights whose norm exceeds this after each step.
    #[arg(long, value_name = "NORM")]
    pub scale_weight_norms: Option<f64>,
    /// Comment stored as ss_training_comment.
    #[arg(long, value_name = "TEXT")]
    pub training_comment: Option<String>,
}

/// Optimiser, schedule, batches and precision.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct OptimizationArgs {
    /// Base learning rate.
    #[arg(long, value_name = "LR", default_value_t = 2e-6)]
    pub learning_rate: f64,
    /// Learning rate of the UNet LoRA (default: --learning_rate).
    #[arg(long, value_name = "LR")]
    pub unet_lr: Option<f64>,
    /// Learning rate of the text-encoder LoRA (only the first value is used).
    #[arg(long, value_name = "LR", num_args = 0..)]
    pub text_encoder_lr: Vec<f64>,
    /// Optimiser: AdamW (default), AdamW8bit, Lion, Lion8bit, SGDNesterov, Adafactor, ...
    #[arg(long, value_name = "NAME", default_value = "")]
    pub optimizer_type: String,
    /// Optimiser arguments, e.g. "weight_decay=0.1" "betas=0.9,0.99".
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub optimizer_args: Vec<String>,
    /// Legacy: same as --optimizer_type AdamW8bit.
    #[arg(long)]
    pub use_8bit_adam: bool,
    /// Legacy: same as --optimizer_type Lion.
    #[arg(long)]
    pub use_lion_optimizer: bool,
    /// Gradient clipping norm; 0 disables clipping.
    #[arg(long, value_name = "NORM", default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// LR schedule: constant, constant_with_warmup, linear, cosine, cosine_with_restarts,
    /// polynomial, inverse_sqrt, cosine_with_min_lr, warmup_stable_decay.
    #[arg(long, value_name = "NAME", default_value = "constant")]
    pub lr_scheduler: String,
    /// Warm-up steps: a count, a fraction (< 1) of the total or "N%".
    #[arg(long, value_name = "STEPS", default_value = "0")]
    pub lr_warmup_steps: String,
    /// Decay steps of warmup_stable_decay: a count, a fraction (< 1) or "N%".
    #[arg(long, value_name = "STEPS", default_value = "0")]
    pub lr_decay_steps: String,
    /// Restart cycles of cosine_with_restarts.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub lr_scheduler_num_cycles: i64,
    /// Power of the polynomial schedule.
    #[arg(long, value_name = "P", default_value_t = 1.0)]
    pub lr_scheduler_power: f64,
    /// Time scale of inverse_sqrt (default: the warm-up steps).
    #[arg(long, value_name = "STEPS")]
    pub lr_scheduler_timescale: Option<i64>,
    /// Floor of cosine_with_min_lr / warmup_stable_decay as a fraction of the lr.
    #[arg(long, value_name = "RATIO")]
    pub lr_scheduler_min_lr_ratio: Option<f64>,
    /// Custom torch.optim.lr_scheduler class.
    #[arg(long, value_name = "CLASS", default_value = "")]
    pub lr_scheduler_type: String,
    /// Arguments of --lr_scheduler_type.
    #[arg(long, value_name = "KEY=VALUE", num_args = 0..)]
    pub lr_scheduler_args: Vec<String>,
    /// Images per batch.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub train_batch_size: i64,
    /// Batches accumulated per optimiser step.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub gradient_accumulation_steps: i64,
    /// Optimiser steps to train.
    #[arg(long, value_name = "N", default_value_t = 1600)]
    pub max_train_steps: i64,
    /// Epochs to train (overrides --max_train_steps).
    #[arg(long, value_name = "N")]
    pub max_train_epochs: Option<i64>,
    /// Random seed (default: drawn at start and stored in the metadata).
    #[arg(long, value_name = "SEED")]
    pub seed: Option<i64>,
    /// Mixed precision: no, fp16 or bf16.
    #[arg(long, value_name = "MODE", default_value = "no", value_parser = ["no", "fp16", "bf16"])]
    pub mixed_precision: String,
    /// Keep the LoRA weights and gradients in fp16 (needs --mixed_precision fp16).
    #[arg(long)]
    pub full_fp16: bool,
    /// Keep the LoRA weights and gradients in bf16 (needs --mixed_precision bf16).
    #[arg(long)]
    pub full_bf16: bool,
    /// Recompute activations in backward to save memory.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Chunked attention (here: libtorch SDPA, numerically the same).
    #[arg(long)]
    pub mem_eff_attn: bool,
    /// xformers attention (here: libtorch SDPA, numerically the same).
    #[arg(long)]
    pub xformers: bool,
    /// PyTorch SDPA attention (always used here).
    #[arg(long)]
    pub sdpa: bool,
    /// Use the text encoder's N-th layer from the end (1 = last).
    #[arg(long, value_name = "N")]
    pub clip_skip: Option<i64>,
    /// Data-loading worker threads.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub max_data_loader_n_workers: i64,
    /// Keep data-loader workers between epochs (speed only).
    #[arg(long)]
    pub persistent_data_loader_workers: bool,
    /// Adafactor: fuse backward and optimiser step (unused by network trainers).
    #[arg(long)]
    pub fused_backward_pass: bool,
    /// Offload checkpointed activations to the CPU (memory only).
    #[arg(long)]
    pub cpu_offload_checkpointing: bool,
    /// torch.compile the models (speed only).
    #[arg(long)]
    pub torch_compile: bool,
    /// torch.compile backend.
    #[arg(long, value_name = "NAME", default_value = "inductor")]
    pub dynamo_backend: String,
    /// DDP timeout in minutes: a collective (or the rendezvous) waiting longer fails the run
    /// (default 30).
    #[arg(long, value_name = "MIN")]
    pub ddp_timeout: Option<i64>,
    /// Data-parallel training on N local processes (this binary re-run with torchrun's RANK,
    /// WORLD_SIZE, ... set); the batch size is per process (see docs/distributed.md).
    #[arg(long, value_name = "N")]
    pub num_processes: Option<usize>,
    /// c10d backend of data-parallel training: nccl (default on CUDA) or gloo (CPU, default
    /// without CUDA).
    #[arg(long, value_name = "NAME", value_parser = ["nccl", "gloo"])]
    pub ddp_backend: Option<String>,
    /// DDP gradient_as_bucket_view (multi-process only).
    #[arg(long)]
    pub ddp_gradient_as_bucket_view: bool,
    /// DDP static_graph (multi-process only).
    #[arg(long)]
    pub ddp_static_graph: bool,
    /// DeepSpeed training.
    #[arg(long)]
    pub deepspeed: bool,
    /// DeepSpeed ZeRO stage.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub zero_stage: i64,
    /// DeepSpeed optimiser offload device.
    #[arg(long, value_name = "DEVICE")]
    pub offload_optimizer_device: Option<String>,
    /// DeepSpeed optimiser NVMe path.
    #[arg(long, value_name = "PATH")]
    pub offload_optimizer_nvme_path: Option<String>,
    /// DeepSpeed parameter offload device.
    #[arg(long, value_name = "DEVICE")]
    pub offload_param_device: Option<String>,
    /// DeepSpeed parameter NVMe path.
    #[arg(long, value_name = "PATH")]
    pub offload_param_nvme_path: Option<String>,
    /// DeepSpeed zero.Init.
    #[arg(long)]
    pub zero3_init_flag: bool,
    /// DeepSpeed: save 16-bit weights with ZeRO-3.
    #[arg(long)]
    pub zero3_save_16bit_model: bool,
    /// DeepSpeed fp16 master weights.
    #[arg(long)]
    pub fp16_master_weights_and_gradients: bool,
}

/// Noise, timesteps and loss.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct DiffusionArgs {
    /// Noise offset strength (about 0.1).
    #[arg(long, value_name = "F")]
    pub noise_offset: Option<f64>,
    /// Random noise-offset strength in [0, --noise_offset].
    #[arg(long)]
    pub noise_offset_random_strength: bool,
    /// Add |mean latent| × this to the noise offset (needs --noise_offset).
    #[arg(long, value_name = "F")]
    pub adaptive_noise_scale: Option<f64>,
    /// Multi-resolution noise iterations (about 6-10).
    #[arg(long, value_name = "N")]
    pub multires_noise_iterations: Option<i64>,
    /// Multi-resolution noise discount.
    #[arg(long, value_name = "F", default_value_t = 0.3)]
    pub multires_noise_discount: f64,
    /// Input perturbation noise strength (about 0.1).
    #[arg(long, value_name = "F")]
    pub ip_noise_gamma: Option<f64>,
    /// Random input-perturbation strength in [0, --ip_noise_gamma].
    #[arg(long)]
    pub ip_noise_gamma_random_strength: bool,
    /// Rescale the noise schedule to zero terminal SNR.
    #[arg(long)]
    pub zero_terminal_snr: bool,
    /// Smallest training timestep (0..999, default 0).
    #[arg(long, value_name = "T")]
    pub min_timestep: Option<i64>,
    /// Largest training timestep, exclusive (1..1000, default 1000).
    #[arg(long, value_name = "T")]
    pub max_timestep: Option<i64>,
    /// Loss: l2 (default), l1, huber or smooth_l1.
    #[arg(long, value_name = "TYPE", default_value = "l2", value_parser = ["l1", "l2", "huber", "smooth_l1"])]
    pub loss_type: String,
    /// Huber c schedule: constant, exponential or snr.
    #[arg(long, value_name = "NAME", default_value = "snr", value_parser = ["constant", "exponential", "snr"])]
    pub huber_schedule: String,
    /// Huber c.
    #[arg(long, value_name = "C", default_value_t = 0.1)]
    pub huber_c: f64,
    /// Huber scale.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    pub huber_scale: f64,
    /// Min-SNR weighting gamma (about 5).
    #[arg(long, value_name = "GAMMA")]
    pub min_snr_gamma: Option<f64>,
    /// Scale the v-prediction loss like noise prediction (needs --v_parameterization).
    #[arg(long)]
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// Add a v-prediction-like loss with this weight (not with --v_parameterization).
    #[arg(long, value_name = "W")]
    pub v_pred_like_loss: Option<f64>,
    /// Debiased estimation loss weighting.
    #[arg(long)]
    pub debiased_estimation_loss: bool,
}

/// Where and when the network is written, and resuming.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct OutputArgs {
    /// Output folder (created when missing).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Base file name of the saved networks (default: "last", "epoch", "at").
    #[arg(long, value_name = "NAME")]
    pub output_name: Option<String>,
    /// File format: safetensors, ckpt or pt.
    #[arg(long, value_name = "FORMAT", default_value = "safetensors", value_parser = ["safetensors", "ckpt", "pt"])]
    pub save_model_as: String,
    /// Precision of the saved weights: float, fp16 or bf16 (default: as trained).
    #[arg(long, value_name = "PRECISION", value_parser = ["float", "fp16", "bf16"])]
    pub save_precision: Option<String>,
    /// Save every N epochs.
    #[arg(long, value_name = "N")]
    pub save_every_n_epochs: Option<i64>,
    /// Save every N optimiser steps.
    #[arg(long, value_name = "N")]
    pub save_every_n_steps: Option<i64>,
    /// Save about N times over the run (sets --save_every_n_epochs).
    #[arg(long, value_name = "N")]
    pub save_n_epoch_ratio: Option<i64>,
    /// Keep only the last N epoch saves.
    #[arg(long, value_name = "N")]
    pub save_last_n_epochs: Option<i64>,
    /// Keep only the last N epoch states (default: --save_last_n_epochs).
    #[arg(long, value_name = "N")]
    pub save_last_n_epochs_state: Option<i64>,
    /// Remove step saves older than N steps.
    #[arg(long, value_name = "N")]
    pub save_last_n_steps: Option<i64>,
    /// Remove step states older than N steps (default: --save_last_n_steps).
    #[arg(long, value_name = "N")]
    pub save_last_n_steps_state: Option<i64>,
    /// Also save the training state (optimiser, scheduler, RNG) with each save.
    #[arg(long)]
    pub save_state: bool,
    /// Save the training state at the end.
    #[arg(long)]
    pub save_state_on_train_end: bool,
    /// Resume from a saved state folder.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Start at this epoch (1 = first).
    #[arg(long, value_name = "N")]
    pub initial_epoch: Option<i64>,
    /// Start at this optimiser step (wins over --initial_epoch).
    #[arg(long, value_name = "N")]
    pub initial_step: Option<i64>,
    /// Consume and discard batches until the initial step.
    #[arg(long)]
    pub skip_until_initial_step: bool,
    /// Store only the minimal ss_* metadata.
    #[arg(long)]
    pub no_metadata: bool,
    /// ModelSpec title (default: --output_name).
    #[arg(long, value_name = "TEXT")]
    pub metadata_title: Option<String>,
    /// ModelSpec author.
    #[arg(long, value_name = "TEXT")]
    pub metadata_author: Option<String>,
    /// ModelSpec description.
    #[arg(long, value_name = "TEXT")]
    pub metadata_description: Option<String>,
    /// ModelSpec license.
    #[arg(long, value_name = "TEXT")]
    pub metadata_license: Option<String>,
    /// ModelSpec tags, comma-separated.
    #[arg(long, value_name = "TEXT")]
    pub metadata_tags: Option<String>,
    /// ModelSpec usage hint.
    #[arg(long, value_name = "TEXT")]
    pub metadata_usage_hint: Option<String>,
    /// ModelSpec thumbnail (data URL or image file).
    #[arg(long, value_name = "TEXT")]
    pub metadata_thumbnail: Option<String>,
    /// ModelSpec merged_from.
    #[arg(long, value_name = "TEXT")]
    pub metadata_merged_from: Option<String>,
    /// ModelSpec trigger phrase.
    #[arg(long, value_name = "TEXT")]
    pub metadata_trigger_phrase: Option<String>,
    /// ModelSpec preprocessor.
    #[arg(long, value_name = "TEXT")]
    pub metadata_preprocessor: Option<String>,
    /// ModelSpec is_negative_embedding.
    #[arg(long, value_name = "TEXT")]
    pub metadata_is_negative_embedding: Option<String>,
    /// Hugging Face upload repository.
    #[arg(long, value_name = "REPO")]
    pub huggingface_repo_id: Option<String>,
    /// Hugging Face repository type.
    #[arg(long, value_name = "TYPE")]
    pub huggingface_repo_type: Option<String>,
    /// Hugging Face path in the repository.
    #[arg(long, value_name = "PATH")]
    pub huggingface_path_in_repo: Option<String>,
    /// Hugging Face token.
    #[arg(long, value_name = "TOKEN")]
    pub huggingface_token: Option<String>,
    /// Hugging Face repository visibility.
    #[arg(long, value_name = "VISIBILITY")]
    pub huggingface_repo_visibility: Option<String>,
    /// Upload states to Hugging Face.
    #[arg(long)]
    pub save_state_to_huggingface: bool,
    /// --resume names a Hugging Face repository.
    #[arg(long)]
    pub resume_from_huggingface: bool,
    /// Upload asynchronously.
    #[arg(long)]
    pub async_upload: bool,
}

/// Sample images during training.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct SamplingArgs {
    /// Prompt file (.txt, .toml or .json).
    #[arg(long, value_name = "PATH")]
    pub sample_prompts: Option<PathBuf>,
    /// Sample every N optimiser steps (≤ 0: never).
    #[arg(long, value_name = "N")]
    pub sample_every_n_steps: Option<i64>,
    /// Sample every N epochs (≤ 0: never; overrides the step setting).
    #[arg(long, value_name = "N")]
    pub sample_every_n_epochs: Option<i64>,
    /// Sample before training.
    #[arg(long)]
    pub sample_at_first: bool,
    /// Sampler of the samples.
    #[arg(long, value_name = "NAME", default_value = "ddim", value_parser = [
        "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
        "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
    ])]
    pub sample_sampler: String,
}

/// Training logs.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct LoggingArgs {
    /// Log folder; enables logging into DIR/{log_prefix}{timestamp}.
    #[arg(long, value_name = "DIR")]
    pub logging_dir: Option<PathBuf>,
    /// Logger: tensorboard, wandb or all (default tensorboard with --logging_dir).
    #[arg(long, value_name = "NAME", value_parser = ["tensorboard", "wandb", "all"])]
    pub log_with: Option<String>,
    /// Prefix of the log folder name.
    #[arg(long, value_name = "TEXT")]
    pub log_prefix: Option<String>,
    /// Tracker (project) name (default network_train).
    #[arg(long, value_name = "NAME")]
    pub log_tracker_name: Option<String>,
    /// Tracker configuration file (accelerate init_kwargs).
    #[arg(long, value_name = "PATH")]
    pub log_tracker_config: Option<String>,
    /// wandb run name.
    #[arg(long, value_name = "NAME")]
    pub wandb_run_name: Option<String>,
    /// wandb API key.
    #[arg(long, value_name = "KEY")]
    pub wandb_api_key: Option<String>,
    /// Store the options (without secrets and paths) in the log.
    #[arg(long)]
    pub log_config: bool,
    /// Console log level: DEBUG, INFO, WARNING, ERROR or CRITICAL.
    #[arg(long, value_name = "LEVEL", value_parser = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])]
    pub console_log_level: Option<String>,
    /// Also write the console log to this file.
    #[arg(long, value_name = "PATH")]
    pub console_log_file: Option<PathBuf>,
    /// Plain console log lines.
    #[arg(long)]
    pub console_log_simple: bool,
}

/// `--config_file`, `--output_config`, `--print_config`.
#[derive(Debug, Clone, ClapArgs)]
#[command(rename_all = "snake_case")]
pub struct ConfigArgs {
    /// TOML file of options (".toml" appended when missing); the command line wins.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<String>,
    /// Write the options that differ from the defaults to --config_file, then exit.
    #[arg(long)]
    pub output_config: bool,
    /// Print the validated options as TOML on stdout, then exit (not an sd-scripts option).
    #[arg(long)]
    pub print_config: bool,
}

/// `--max_token_length`: 75 (the reference rejects it; accepted as the default, oddity
/// §15 #16), 150 or 225.
fn parse_max_token_length(s: &str) -> Result<i64, String> {
    match s.trim().parse::<i64>() {
        Ok(n @ (75 | 150 | 225)) => Ok(n),
        _ => Err(format!("expected 75, 150 or 225, found \"{s}\"")),
    }
}

/// Options of this tool that are not sd-scripts options (so not in [`crate::compat`]).
pub const OWN_OPTIONS: &[&str] = &[
    "sdxl",
    "print_config",
    "json",
    "verbose",
    "quiet",
    "no_progress",
    "num_processes",
    "ddp_backend",
];

/// The full clap command: [`Args`] plus a kebab-case alias for every underscore option,
/// negative numbers accepted as values, the last of repeated options winning, and the options that this port does not implement
/// hidden from `--help`.
pub fn command() -> Command {
    // As argparse: an option given twice keeps its last value.
    Args::command().args_override_self(true).mut_args(|arg| {
        let Some(long) = arg.get_long().map(str::to_owned) else {
            return arg;
        };
        let mut arg = arg;
        if arg.get_action().takes_values() {
            arg = arg.allow_negative_numbers(true);
        }
        let kebab = long.replace('_', "-");
        let has_alias = arg
            .get_all_aliases()
            .is_some_and(|all| all.contains(&kebab.as_str()));
        if kebab != long && !has_alias {
            // clap keeps `&'static str` names (its "string" feature is off): the alias
            // lives as long as the process, created once per option.
            arg = arg.alias(&*Box::leak(kebab.into_boxed_str()));
        }
        if compat::lookup(&long)
            .is_some_and(|c| matches!(c.support, Support::NoEffect | Support::Unsupported))
        {
            arg = arg.hide(true);
        }
        arg
    })
}

/// A parsed command line: the arguments (config-file values merged in), the options given
/// explicitly (on the command line or in the config file) and the config file read.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// All options.
    pub args: Args,
    /// Ids (snake_case names) of the options given on the command line or in the config file.
    pub given: BTreeSet<String>,
    /// Ids of the options whose value came from the config file.
    pub from_file: BTreeSet<String>,
    /// The config file that was read (".toml" appended), if any.
    pub config_file: Option<PathBuf>,
    /// clap's matches, for `--output_config`.
    pub matches: ArgMatches,
}

/// Why the command line could not be turned into [`Args`].
#[derive(Debug)]
pub enum CliError {
    /// A usage error (unknown flag, bad value): clap prints it and exits with 2. Also
    /// `--help` and `--version`, which exit with 0.
    Usage(clap::Error),
    /// The config file is missing, unreadable or invalid: exit 1.
    Config(anyhow::Error),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Usage(e) => write!(f, "{}", e.to_string().trim_end()),
            CliError::Config(e) => write!(f, "{e:#}"),
        }
    }
}

/// Ids of the options whose value comes from the command line in `matches`.
fn given_ids(cmd: &Command, matches: &ArgMatches) -> BTreeSet<String> {
    cmd.get_arguments()
        .map(|a| a.get_id().as_str())
        .filter(|id| matches.value_source(id) == Some(ValueSource::CommandLine))
        .map(str::to_owned)
        .collect()
}

/// Parses `argv` (program name first) and merges `--config_file`: its values are parsed as
/// if they came before the command line, for the options the command line does not give.
/// With `--output_config` the file is not read (it is the output).
///
/// # Errors
/// [`CliError::Usage`] for clap errors on the command line; [`CliError::Config`] for a
/// missing or invalid config file (unknown key, wrong TOML type, a value clap rejects —
/// each naming the file and key).
pub fn parse_from<I, T>(argv: I) -> Result<Parsed, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let cmd = command();
    let first = cmd
        .clone()
        .try_get_matches_from(&argv)
        .map_err(CliError::Usage)?;
    let cli_given = given_ids(&cmd, &first);
    let config_name = first.get_one::<String>("config_file").cloned();
    let output_config = first.get_flag("output_config");
    let Some(config_name) = config_name.filter(|_| !output_config) else {
        let args = Args::from_arg_matches(&first).map_err(CliError::Usage)?;
        let config_file = first
            .get_one::<String>("config_file")
            .map(|s| config_file::config_path(s));
        return Ok(Parsed {
            args,
            given: cli_given,
            from_file: BTreeSet::new(),
            config_file,
            matches: first,
        });
    };

    let path = config_file::config_path(&config_name);
    let entries = config_file::read_flat(&path).map_err(CliError::Config)?;
    let file_argv =
        config_file::to_arguments(&cmd, &entries, &cli_given, &path).map_err(CliError::Config)?;
    let from_file: BTreeSet<String> = file_argv.ids.iter().cloned().collect();

    let mut merged = Vec::with_capacity(argv.len() + file_argv.tokens.len());
    merged.extend(argv.first().cloned());
    merged.extend(file_argv.tokens);
    merged.extend(argv.iter().skip(1).cloned());
    let matches = cmd.clone().try_get_matches_from(&merged).map_err(|e| {
        CliError::Config(anyhow::anyhow!(
            "config file {}: {}",
            path.display(),
            e.to_string().trim_end().trim_start_matches("error: ")
        ))
    })?;
    let args = Args::from_arg_matches(&matches).map_err(CliError::Usage)?;
    let given = given_ids(&cmd, &matches);
    Ok(Parsed {
        args,
        given,
        from_file,
        config_file: Some(path),
        matches,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command line of the brief (an `accelerate launch train_network.py` line with the
    /// prefix dropped).
    pub(crate) const EXAMPLE: &[&str] = &[
        "train-network",
        "--pretrained_model_name_or_path=model.safetensors",
        "--dataset_config=data.toml",
        "--output_dir=out",
        "--output_name=mylora",
        "--save_model_as=safetensors",
        "--prior_loss_weight=1.0",
        "--max_train_steps=400",
        "--learning_rate=1e-4",
        "--optimizer_type=AdamW8bit",
        "--xformers",
        "--mixed_precision=fp16",
        "--cache_latents",
        "--gradient_checkpointing",
        "--save_every_n_epochs=1",
        "--network_module=networks.lora",
    ];

    #[test]
    fn command_is_consistent() {
        command().debug_assert();
    }

    #[test]
    fn example_command_line_parses() {
        let p = parse_from(EXAMPLE).expect("parses");
        let a = &p.args;
        assert_eq!(
            a.model.pretrained_model_name_or_path,
            Some(PathBuf::from("model.safetensors"))
        );
        assert_eq!(a.optimization.max_train_steps, 400);
        assert_eq!(a.optimization.learning_rate, 1e-4);
        assert_eq!(a.optimization.optimizer_type, "AdamW8bit");
        assert!(a.optimization.xformers);
        assert_eq!(a.optimization.mixed_precision, "fp16");
        assert_eq!(a.output.save_every_n_epochs, Some(1));
        assert_eq!(a.network.network_module.as_deref(), Some("networks.lora"));
        let expected: BTreeSet<String> = [
            "pretrained_model_name_or_path",
            "dataset_config",
            "output_dir",
            "output_name",
            "save_model_as",
            "prior_loss_weight",
            "max_train_steps",
            "learning_rate",
            "optimizer_type",
            "xformers",
            "mixed_precision",
            "cache_latents",
            "gradient_checkpointing",
            "save_every_n_epochs",
            "network_module",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        assert_eq!(p.given, expected);
    }

    #[test]
    fn kebab_aliases_and_space_separated_lists() {
        let p = parse_from([
            "train-network",
            "--network-dim",
            "8",
            "--network_args",
            "conv_dim=4",
            "conv_alpha=1",
            "--optimizer-args",
            "weight_decay=0.1",
            "betas=0.9,0.99",
            "--text_encoder_lr",
            "5e-5",
            "1e-5",
            "--sample_every_n_steps",
            "-1",
        ])
        .expect("parses");
        assert_eq!(p.args.network.network_dim, Some(8));
        assert_eq!(p.args.network.network_args, ["conv_dim=4", "conv_alpha=1"]);
        assert_eq!(
            p.args.optimization.optimizer_args,
            ["weight_decay=0.1", "betas=0.9,0.99"]
        );
        assert_eq!(p.args.optimization.text_encoder_lr, [5e-5, 1e-5]);
        assert_eq!(p.args.sampling.sample_every_n_steps, Some(-1));
    }

    #[test]
    fn bad_choice_is_a_usage_error() {
        let err = parse_from(["train-network", "--mixed_precision", "fp8"]).unwrap_err();
        let CliError::Usage(e) = err else {
            panic!("expected a usage error")
        };
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--mixed_precision"));
        let err = parse_from(["train-network", "--max_token_length", "100"]).unwrap_err();
        assert!(err.to_string().contains("expected 75, 150 or 225"));
        let p = parse_from(["train-network", "--max_token_length", "75"]).expect("75 accepted");
        assert_eq!(p.args.dataset.max_token_length, Some(75));
    }

    #[test]
    fn help_lists_sd_scripts_spellings() {
        let help = command().render_long_help().to_string();
        for flag in [
            "--pretrained_model_name_or_path",
            "--network_module",
            "--network_dim",
            "--network_alpha",
            "--network_args",
            "--dataset_config",
            "--train_data_dir",
            "--output_dir",
            "--output_name",
            "--save_model_as",
            "--learning_rate",
            "--optimizer_type",
            "--lr_scheduler",
            "--mixed_precision",
            "--save_every_n_epochs",
            "--config_file",
        ] {
            assert!(help.contains(flag), "--help lacks {flag}");
        }
        // Kebab aliases are accepted but not shown; unsupported options are hidden.
        assert!(!help.contains("--network-dim <RANK>"));
        assert!(!help.contains("--fp8_base"));
        assert!(!help.contains("--huggingface_repo_id"));
    }
}
