//! The validated training configuration: [`TrainOptions`], built from the parsed
//! command line by [`TrainOptions::from_args`] with the start-up checks of spec training.md
//! §1.2 (errors and warnings as the reference chooses them), `--network_args` parsing
//! (§7.4), optimiser and scheduler checks (§9, §10). No clap types inside: this is what the
//! training loop takes.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{Context, bail};
use sd_core::train::{OptimizerConfig, SchedulerType, StepsSpec};
use sd_data::config::{DatasetArgs, DatasetGroupConfig, TrainingChecks};
use sd_data::image_prep::ResizeInterpolation;
use serde::Serialize;
use serde::ser::SerializeMap;

use crate::args::Args;

/// The model family being trained (selects §1.2's per-family rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Stable Diffusion 1.x.
    Sd1,
    /// Stable Diffusion 2.x (`--v2`).
    Sd2,
    /// SDXL (`--sdxl`).
    Sdxl,
}

/// Base model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelOptions {
    /// Family from `--v2` / `--sdxl`.
    pub family: Family,
    /// `--pretrained_model_name_or_path`.
    pub pretrained_model_name_or_path: PathBuf,
    /// `--v_parameterization`.
    pub v_parameterization: bool,
    /// `--vae`.
    pub vae: Option<PathBuf>,
    /// `--no_half_vae`.
    pub no_half_vae: bool,
    /// `--lowram` (only recorded as `ss_lowram`: models always load straight to the device).
    pub lowram: bool,
}

/// Dataset and caching options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetOptions {
    /// `--dataset_config`.
    pub dataset_config: Option<PathBuf>,
    /// The command-line dataset options, as the dataset library takes them.
    #[serde(serialize_with = "serialize_dataset_args")]
    pub args: DatasetArgs,
    /// `--cache_latents` (also set by `--cache_latents_to_disk`).
    pub cache_latents: bool,
    /// `--cache_latents_to_disk`.
    pub cache_latents_to_disk: bool,
    /// `--vae_batch_size`.
    pub vae_batch_size: u32,
    /// `--skip_cache_check`.
    pub skip_cache_check: bool,
    /// SDXL `--cache_text_encoder_outputs` (also set by `..._to_disk`).
    pub cache_text_encoder_outputs: bool,
    /// SDXL `--cache_text_encoder_outputs_to_disk`.
    pub cache_text_encoder_outputs_to_disk: bool,
    /// `--max_token_length`: None = 75 tokens, else 150 or 225.
    pub max_token_length: Option<u32>,
    /// `--weighted_captions`.
    pub weighted_captions: bool,
    /// `--debug_dataset`.
    pub debug_dataset: bool,
    /// `--validate_every_n_steps`.
    pub validate_every_n_steps: Option<u64>,
    /// `--validate_every_n_epochs`.
    pub validate_every_n_epochs: Option<u64>,
    /// `--max_validation_steps`.
    pub max_validation_steps: Option<u64>,
}

/// The network kind selected by `--network_module`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    /// `networks.lora`.
    Lora,
    /// `networks.dylora`.
    Dylora,
}

/// `--network_args` parsed into typed fields (spec §7.4, lora-format.md §7 for DyLoRA).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct NetworkArgs {
    /// `conv_dim`: rank of 3×3 conv LoRA (enables conv targets).
    pub conv_dim: Option<u32>,
    /// `conv_alpha` (1.0 when conv_dim is set without it; ignored by DyLoRA).
    pub conv_alpha: Option<f64>,
    /// `rank_dropout` (LoRA only).
    pub rank_dropout: Option<f64>,
    /// `module_dropout` (LoRA only).
    pub module_dropout: Option<f64>,
    /// `unit` (DyLoRA only; default 1).
    pub unit: Option<u32>,
    /// `block_dims`: comma list of ranks, 25 (SD) or 23 (SDXL) values.
    pub block_dims: Option<Vec<u32>>,
    /// `block_alphas`: comma list of alphas, same length.
    pub block_alphas: Option<Vec<f64>>,
    /// `conv_block_dims`.
    pub conv_block_dims: Option<Vec<u32>>,
    /// `conv_block_alphas`.
    pub conv_block_alphas: Option<Vec<f64>>,
    /// `down_lr_weight`: a comma list or a preset (`cosine`, `sine`, `linear`,
    /// `reverse_linear`, `zeros`, optionally `+base`), kept as text for the network.
    pub down_lr_weight: Option<String>,
    /// `mid_lr_weight`, as text.
    pub mid_lr_weight: Option<String>,
    /// `up_lr_weight`, as text.
    pub up_lr_weight: Option<String>,
    /// `block_lr_zero_threshold` (default 0).
    pub block_lr_zero_threshold: Option<f64>,
    /// `loraplus_lr_ratio`.
    pub loraplus_lr_ratio: Option<f64>,
    /// `loraplus_unet_lr_ratio`.
    pub loraplus_unet_lr_ratio: Option<f64>,
    /// `loraplus_text_encoder_lr_ratio`.
    pub loraplus_text_encoder_lr_ratio: Option<f64>,
}

/// The trained network.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetworkOptions {
    /// `--network_module` as given (stored as ss_network_module).
    pub module: String,
    /// Its kind.
    pub kind: NetworkKind,
    /// `--network_dim` (rank; 4 when unset).
    pub dim: u32,
    /// `--network_alpha` (default 1).
    pub alpha: f64,
    /// `--network_dropout`.
    pub dropout: Option<f64>,
    /// Typed `--network_args`.
    pub args: NetworkArgs,
    /// `--network_args` as a key → value map in the given order (for ss_network_args).
    pub args_map: serde_json::Map<String, serde_json::Value>,
    /// `--network_weights`.
    pub network_weights: Option<PathBuf>,
    /// `--dim_from_weights`.
    pub dim_from_weights: bool,
    /// Train the UNet LoRA (not `--network_train_text_encoder_only`).
    pub train_unet: bool,
    /// Train the text-encoder LoRA (not `--network_train_unet_only`).
    pub train_text_encoder: bool,
    /// `--base_weights` with their multipliers (1.0 where missing).
    pub base_weights: Vec<(PathBuf, f64)>,
    /// `--scale_weight_norms`.
    pub scale_weight_norms: Option<f64>,
    /// `--training_comment`.
    pub training_comment: Option<String>,
}

/// `--mixed_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    /// fp32 everywhere.
    No,
    /// fp16 weights and autocast.
    Fp16,
    /// bf16 weights and autocast.
    Bf16,
}

/// Optimiser, schedule, batches and precision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OptimizationOptions {
    /// Resolved `--optimizer_type` (legacy flags folded in; "AdamW" when empty).
    pub optimizer_type: String,
    /// `--optimizer_args` items (`key=value`), validated.
    pub optimizer_args: Vec<String>,
    /// `--learning_rate`.
    pub learning_rate: f64,
    /// `--unet_lr`.
    pub unet_lr: Option<f64>,
    /// First `--text_encoder_lr` value.
    pub text_encoder_lr: Option<f64>,
    /// `--max_grad_norm` (0: no clipping).
    pub max_grad_norm: f64,
    /// `--lr_scheduler`.
    pub lr_scheduler: String,
    /// `--lr_warmup_steps` as given (count, fraction or "N%").
    pub lr_warmup_steps: String,
    /// `--lr_decay_steps` as given.
    pub lr_decay_steps: String,
    /// `--lr_scheduler_num_cycles`.
    pub lr_scheduler_num_cycles: u64,
    /// `--lr_scheduler_power`.
    pub lr_scheduler_power: f64,
    /// `--lr_scheduler_timescale`.
    pub lr_scheduler_timescale: Option<u64>,
    /// `--lr_scheduler_min_lr_ratio`.
    pub lr_scheduler_min_lr_ratio: Option<f64>,
    /// `--train_batch_size`.
    pub train_batch_size: u32,
    /// `--gradient_accumulation_steps`.
    pub gradient_accumulation_steps: u32,
    /// `--max_train_steps`.
    pub max_train_steps: u64,
    /// `--max_train_epochs` (overrides max_train_steps once the epoch length is known).
    pub max_train_epochs: Option<u64>,
    /// `--seed`, or one drawn from [0, 2³²−1] at start-up (fix of oddity §15 #19).
    pub seed: u64,
    /// Whether `seed` was drawn.
    pub seed_drawn: bool,
    /// `--mixed_precision`.
    pub mixed_precision: MixedPrecision,
    /// `--full_fp16`.
    pub full_fp16: bool,
    /// `--full_bf16`.
    pub full_bf16: bool,
    /// `--gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// `--clip_skip` (SDXL: kept for metadata, ignored by text encoding).
    pub clip_skip: Option<u32>,
    /// `--max_data_loader_n_workers`.
    pub max_data_loader_n_workers: u32,
}

/// `--loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean squared error.
    L2,
    /// Mean absolute error.
    L1,
    /// Pseudo-Huber.
    Huber,
    /// Smooth L1.
    SmoothL1,
}

/// `--huber_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HuberSchedule {
    /// c fixed.
    Constant,
    /// c decays exponentially with t.
    Exponential,
    /// c from the SNR.
    Snr,
}

/// Noise, timesteps and loss.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiffusionOptions {
    /// `--noise_offset`.
    pub noise_offset: Option<f64>,
    /// `--noise_offset_random_strength`.
    pub noise_offset_random_strength: bool,
    /// `--adaptive_noise_scale`.
    pub adaptive_noise_scale: Option<f64>,
    /// `--multires_noise_iterations`.
    pub multires_noise_iterations: Option<u32>,
    /// `--multires_noise_discount`.
    pub multires_noise_discount: f64,
    /// `--ip_noise_gamma`.
    pub ip_noise_gamma: Option<f64>,
    /// `--ip_noise_gamma_random_strength`.
    pub ip_noise_gamma_random_strength: bool,
    /// `--zero_terminal_snr`.
    pub zero_terminal_snr: bool,
    /// `--min_timestep` (default 0).
    pub min_timestep: u32,
    /// `--max_timestep`, exclusive (default 1000).
    pub max_timestep: u32,
    /// Whether either timestep bound was given (ModelSpec timestep_range).
    pub timestep_range_given: bool,
    /// `--loss_type`.
    pub loss_type: LossType,
    /// `--huber_schedule`.
    pub huber_schedule: HuberSchedule,
    /// `--huber_c`.
    pub huber_c: f64,
    /// `--huber_scale`.
    pub huber_scale: f64,
    /// `--min_snr_gamma`.
    pub min_snr_gamma: Option<f64>,
    /// `--scale_v_pred_loss_like_noise_pred`.
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// `--v_pred_like_loss`.
    pub v_pred_like_loss: Option<f64>,
    /// `--debiased_estimation_loss`.
    pub debiased_estimation_loss: bool,
}

/// ModelSpec metadata options (`--metadata_*`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MetadataOptions {
    /// `--metadata_title`.
    pub title: Option<String>,
    /// `--metadata_author`.
    pub author: Option<String>,
    /// `--metadata_description`.
    pub description: Option<String>,
    /// `--metadata_license`.
    pub license: Option<String>,
    /// `--metadata_tags`.
    pub tags: Option<String>,
    /// `--metadata_usage_hint`.
    pub usage_hint: Option<String>,
    /// `--metadata_thumbnail`.
    pub thumbnail: Option<String>,
    /// `--metadata_merged_from`.
    pub merged_from: Option<String>,
    /// `--metadata_trigger_phrase`.
    pub trigger_phrase: Option<String>,
    /// `--metadata_preprocessor`.
    pub preprocessor: Option<String>,
    /// `--metadata_is_negative_embedding`.
    pub is_negative_embedding: Option<String>,
}

/// `--save_precision`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SavePrecision {
    /// fp32.
    Float,
    /// fp16.
    Fp16,
    /// bf16.
    Bf16,
}

/// Saving and resuming.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputOptions {
    /// `--output_dir`.
    pub output_dir: PathBuf,
    /// `--output_name`.
    pub output_name: Option<String>,
    /// `--save_precision` (None: as trained).
    pub save_precision: Option<SavePrecision>,
    /// `--save_every_n_epochs`.
    pub save_every_n_epochs: Option<u64>,
    /// `--save_every_n_steps`.
    pub save_every_n_steps: Option<u64>,
    /// `--save_n_epoch_ratio`.
    pub save_n_epoch_ratio: Option<u64>,
    /// `--save_last_n_epochs`.
    pub save_last_n_epochs: Option<u64>,
    /// `--save_last_n_epochs_state`.
    pub save_last_n_epochs_state: Option<u64>,
    /// `--save_last_n_steps`.
    pub save_last_n_steps: Option<u64>,
    /// `--save_last_n_steps_state`.
    pub save_last_n_steps_state: Option<u64>,
    /// `--save_state`.
    pub save_state: bool,
    /// `--save_state_on_train_end`.
    pub save_state_on_train_end: bool,
    /// `--resume`.
    pub resume: Option<PathBuf>,
    /// `--initial_epoch` (1-based).
    pub initial_epoch: Option<u64>,
    /// `--initial_step`.
    pub initial_step: Option<u64>,
    /// `--skip_until_initial_step`.
    pub skip_until_initial_step: bool,
    /// `--no_metadata`.
    pub no_metadata: bool,
    /// `--metadata_*`.
    pub metadata: MetadataOptions,
}

/// Samples during training.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplingOptions {
    /// `--sample_prompts`.
    pub sample_prompts: Option<PathBuf>,
    /// `--sample_every_n_steps` (≤ 0 → None).
    pub every_n_steps: Option<u64>,
    /// `--sample_every_n_epochs` (≤ 0 → None).
    pub every_n_epochs: Option<u64>,
    /// `--sample_at_first`.
    pub at_first: bool,
    /// `--sample_sampler`.
    pub sampler: String,
}

/// Training logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoggingOptions {
    /// `--logging_dir`.
    pub logging_dir: Option<PathBuf>,
    /// `--log_prefix`.
    pub log_prefix: Option<String>,
    /// `--log_tracker_name` (default "network_train").
    pub log_tracker_name: String,
    /// `--log_config`.
    pub log_config: bool,
    /// `--console_log_level` (DEBUG, INFO, WARNING, ERROR, CRITICAL).
    pub console_log_level: Option<String>,
}

/// Everything a training run needs, validated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainOptions {
    /// Base model.
    pub model: ModelOptions,
    /// Data.
    pub dataset: DatasetOptions,
    /// Network.
    pub network: NetworkOptions,
    /// Optimisation.
    pub optimization: OptimizationOptions,
    /// Diffusion and loss.
    pub diffusion: DiffusionOptions,
    /// Output.
    pub output: OutputOptions,
    /// Sampling.
    pub sampling: SamplingOptions,
    /// Logging.
    pub logging: LoggingOptions,
}

/// [`TrainOptions`] plus the warnings found while validating (the caller logs them).
#[derive(Debug, Clone)]
pub struct Validated {
    /// The options.
    pub options: TrainOptions,
    /// User-actionable warnings, in the order found.
    pub warnings: Vec<String>,
}

fn non_negative(name: &str, v: i64) -> anyhow::Result<u64> {
    u64::try_from(v).map_err(|_| anyhow::anyhow!("--{name} must be >= 0, found {v}"))
}

fn positive_u32(name: &str, v: i64) -> anyhow::Result<u32> {
    u32::try_from(v)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| anyhow::anyhow!("--{name} must be a positive integer, found {v}"))
}

fn opt_non_negative(name: &str, v: Option<i64>) -> anyhow::Result<Option<u64>> {
    v.map(|v| non_negative(name, v)).transpose()
}

fn opt_positive(name: &str, v: Option<i64>) -> anyhow::Result<Option<u64>> {
    v.map(|v| {
        u64::try_from(v)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| anyhow::anyhow!("--{name} must be a positive integer, found {v}"))
    })
    .transpose()
}

fn probability(name: &str, v: f64) -> anyhow::Result<f64> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        bail!("--{name} must be in [0, 1], found {v}")
    }
}

/// A seed from [0, 2³²−1] without a RNG dependency: std's randomly keyed SipHash of the time.
fn draw_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish() & 0xFFFF_FFFF
}

impl TrainOptions {
    /// Validates the parsed arguments (`given`: ids given explicitly, from
    /// [`crate::args::Parsed::given`]) into options plus warnings.
    ///
    /// Applies spec §1.2 (implications, errors, warnings), §7.4 (network), §9 (optimiser),
    /// §10 (scheduler) and the range checks of each option. Dataset-file checks that need
    /// the resolved datasets are in [`TrainOptions::resolve_datasets`].
    ///
    /// # Errors
    /// The first invalid option or combination, naming the option(s).
    pub fn from_args(args: &Args, given: &BTreeSet<String>) -> anyhow::Result<Validated> {
        let mut warnings = Vec::new();
        let m = &args.model;
        let family = match (m.sdxl, m.v2) {
            (true, true) => bail!("--v2 cannot be used with SDXL (--sdxl)"),
            (true, false) => Family::Sdxl,
            (false, true) => Family::Sd2,
            (false, false) => Family::Sd1,
        };
        let sdxl = family == Family::Sdxl;
        let Some(pretrained) = m.pretrained_model_name_or_path.clone() else {
            bail!("--pretrained_model_name_or_path is required")
        };
        if m.v_parameterization && !m.v2 {
            warnings.push(
                "--v_parameterization is meant for SD 2.x (--v2), not SD 1.x or SDXL".to_owned(),
            );
        }
        let model = ModelOptions {
            family,
            pretrained_model_name_or_path: pretrained,
            v_parameterization: m.v_parameterization,
            vae: m.vae.clone(),
            no_half_vae: m.no_half_vae,
            lowram: m.lowram,
        };

        let dataset = dataset_options(args, sdxl, &mut warnings)?;
        let network = network_options(args, family, &mut warnings)?;
        if sdxl && dataset.cache_text_encoder_outputs && network.train_text_encoder {
            bail!(
                "--cache_text_encoder_outputs requires --network_train_unet_only (cached outputs cannot train the text encoders)"
            );
        }
        let optimization = optimization_options(args, family, &mut warnings)?;
        let diffusion = diffusion_options(args, &mut warnings)?;
        let output = output_options(args)?;
        let sampling = sampling_options(args, &mut warnings);
        let l = &args.logging;
        let logging = LoggingOptions {
            logging_dir: l.logging_dir.clone(),
            log_prefix: l.log_prefix.clone(),
            log_tracker_name: l
                .log_tracker_name
                .clone()
                .unwrap_or_else(|| "network_train".to_owned()),
            log_config: l.log_config,
            console_log_level: l.console_log_level.clone(),
        };
        if matches!(l.log_with.as_deref(), Some("tensorboard")) && l.logging_dir.is_none() {
            bail!("--log_with tensorboard requires --logging_dir");
        }
        let _ = given;
        Ok(Validated {
            options: TrainOptions {
                model,
                dataset,
                network,
                optimization,
                diffusion,
                output,
                sampling,
                logging,
            },
            warnings,
        })
    }

    /// The dataset checks of spec §1.2 for this run: bucket step divisor (64 SD, 32 SDXL),
    /// `--cache_latents` and `--cache_text_encoder_outputs` restrictions.
    pub fn dataset_checks(&self) -> TrainingChecks {
        TrainingChecks {
            bucket_step_divisor: if self.model.family == Family::Sdxl {
                32
            } else {
                64
            },
            cache_latents: self.dataset.cache_latents,
            cache_text_encoder_outputs: self.dataset.cache_text_encoder_outputs,
        }
    }

    /// Resolves the datasets (`--dataset_config`, or the command-line folders) and applies
    /// [`TrainOptions::dataset_checks`]. Reads the dataset file or scans the folders.
    ///
    /// # Errors
    /// Dataset errors from sd-data (naming file, table and key) and §1.2 violations.
    pub fn resolve_datasets(&self) -> anyhow::Result<DatasetGroupConfig> {
        let d = &self.dataset;
        let config = match &d.dataset_config {
            Some(path) => sd_data::config::load_dataset_config(path, &d.args)
                .with_context(|| format!("dataset config {}", path.display()))?,
            None => sd_data::config::config_from_args(&d.args)
                .context("dataset from command-line options")?,
        };
        config.check_for_training(self.dataset_checks())?;
        Ok(config)
    }

    /// The options as TOML (`--print_config`).
    ///
    /// # Errors
    /// Only if serialisation fails (a non-finite float cannot occur after validation).
    pub fn to_toml(&self) -> anyhow::Result<String> {
        toml::to_string(self).context("formatting the options as TOML")
    }
}

fn dataset_options(
    args: &Args,
    sdxl: bool,
    warnings: &mut Vec<String>,
) -> anyhow::Result<DatasetOptions> {
    let d = &args.dataset;
    let c = &args.caching;
    let resolution = d
        .resolution
        .as_deref()
        .map(sd_data::config::parse_resolution_arg)
        .transpose()?;
    let resize_interpolation = d
        .resize_interpolation
        .as_deref()
        .map(|s| ResizeInterpolation::parse(s, false))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--resize_interpolation: {e}"))?;
    let face_crop_aug_range = d
        .face_crop_aug_range
        .as_deref()
        .map(|s| -> anyhow::Result<(f64, f64)> {
            let parts: Vec<f64> = s
                .split(',')
                .map(|p| p.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|_| {
                    anyhow::anyhow!("--face_crop_aug_range: expected \"MIN,MAX\", found \"{s}\"")
                })?;
            match parts.as_slice() {
                [a, b] => Ok((*a, *b)),
                _ => bail!("--face_crop_aug_range: expected \"MIN,MAX\", found \"{s}\""),
            }
        })
        .transpose()?;
    let dataset_args = DatasetArgs {
        train_data_dir: d.train_data_dir.clone(),
        reg_data_dir: d.reg_data_dir.clone(),
        in_json: d.in_json.clone(),
        dataset_repeats: d.dataset_repeats,
        train_batch_size: args.optimization.train_batch_size,
        resolution,
        enable_bucket: d.enable_bucket,
        min_bucket_reso: d.min_bucket_reso,
        max_bucket_reso: d.max_bucket_reso,
        bucket_reso_steps: d.bucket_reso_steps,
        bucket_no_upscale: d.bucket_no_upscale,
        caption_extension: d.caption_extension.clone(),
        caption_extention: d.caption_extention.clone(),
        shuffle_caption: d.shuffle_caption,
        caption_separator: d.caption_separator.clone(),
        keep_tokens: d.keep_tokens,
        keep_tokens_separator: d.keep_tokens_separator.clone(),
        secondary_separator: d.secondary_separator.clone(),
        enable_wildcard: d.enable_wildcard,
        caption_prefix: d.caption_prefix.clone(),
        caption_suffix: d.caption_suffix.clone(),
        color_aug: d.color_aug,
        flip_aug: d.flip_aug,
        random_crop: d.random_crop,
        face_crop_aug_range,
        token_warmup_min: d.token_warmup_min,
        token_warmup_step: d.token_warmup_step,
        caption_dropout_rate: probability("caption_dropout_rate", d.caption_dropout_rate)?,
        caption_dropout_every_n_epochs: d.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate: probability(
            "caption_tag_dropout_rate",
            d.caption_tag_dropout_rate,
        )?,
        alpha_mask: d.alpha_mask,
        masked_loss: d.masked_loss,
        resize_interpolation,
        validation_split: probability("validation_split", d.validation_split)?,
        validation_seed: d.validation_seed,
        prior_loss_weight: d.prior_loss_weight,
    };
    if d.dataset_config.is_none() && d.train_data_dir.is_none() {
        bail!("no training data: give --dataset_config or --train_data_dir");
    }

    // §1.2 implications.
    let mut cache_latents = c.cache_latents;
    if c.cache_latents_to_disk && !cache_latents {
        cache_latents = true;
        warnings.push(
            "--cache_latents_to_disk is given, so --cache_latents is turned on too".to_owned(),
        );
    }
    let mut cache_te = c.cache_text_encoder_outputs;
    if (c.cache_text_encoder_outputs || c.cache_text_encoder_outputs_to_disk) && !sdxl {
        bail!("--cache_text_encoder_outputs is only available for SDXL (--sdxl)");
    }
    if c.cache_text_encoder_outputs_to_disk && !cache_te {
        cache_te = true;
        warnings.push(
            "--cache_text_encoder_outputs_to_disk is given, so --cache_text_encoder_outputs is turned on too"
                .to_owned(),
        );
    }
    // Without a dataset file the command-line values are the final ones: check them now.
    // With one, the TOML may override them per dataset: resolve_datasets() checks.
    if d.dataset_config.is_none() {
        let divisor = if sdxl { 32 } else { 64 };
        if d.bucket_reso_steps <= 0 || d.bucket_reso_steps % divisor != 0 {
            bail!(
                "--bucket_reso_steps must be divisible by {divisor} for {}, found {}",
                if sdxl { "SDXL" } else { "SD 1.x/2.x" },
                d.bucket_reso_steps
            );
        }
        if cache_latents && (d.color_aug || d.random_crop) {
            bail!("--cache_latents cannot be used with --color_aug or --random_crop");
        }
        if cache_te
            && (d.caption_dropout_rate > 0.0
                || d.shuffle_caption
                || d.token_warmup_step > 0.0
                || d.caption_tag_dropout_rate > 0.0)
        {
            bail!(
                "--cache_text_encoder_outputs cannot be used with --caption_dropout_rate, --shuffle_caption, --token_warmup_step or --caption_tag_dropout_rate"
            );
        }
    }
    let max_token_length = match d.max_token_length {
        None | Some(75) => None,
        Some(n @ (150 | 225)) => Some(n as u32),
        Some(n) => bail!("--max_token_length must be 75, 150 or 225, found {n}"),
    };
    Ok(DatasetOptions {
        dataset_config: d.dataset_config.clone(),
        args: dataset_args,
        cache_latents,
        cache_latents_to_disk: c.cache_latents_to_disk,
        vae_batch_size: positive_u32("vae_batch_size", c.vae_batch_size)?,
        skip_cache_check: c.skip_cache_check,
        cache_text_encoder_outputs: cache_te,
        cache_text_encoder_outputs_to_disk: c.cache_text_encoder_outputs_to_disk,
        max_token_length,
        weighted_captions: d.weighted_captions,
        debug_dataset: d.debug_dataset,
        validate_every_n_steps: opt_positive("validate_every_n_steps", d.validate_every_n_steps)?,
        validate_every_n_epochs: opt_positive(
            "validate_every_n_epochs",
            d.validate_every_n_epochs,
        )?,
        max_validation_steps: opt_positive("max_validation_steps", d.max_validation_steps)?,
    })
}

/// Number of blocks of `block_dims` / `block_alphas`: 25 for SD, 23 for SDXL (§7.4).
pub fn num_blocks(family: Family) -> usize {
    if family == Family::Sdxl { 23 } else { 25 }
}

/// Keys accepted in `--network_args` for each network kind.
const LORA_KEYS: &[&str] = &[
    "conv_dim",
    "conv_alpha",
    "rank_dropout",
    "module_dropout",
    "block_dims",
    "block_alphas",
    "conv_block_dims",
    "conv_block_alphas",
    "down_lr_weight",
    "mid_lr_weight",
    "up_lr_weight",
    "block_lr_zero_threshold",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "dropout",
];
const DYLORA_KEYS: &[&str] = &[
    "unit",
    "conv_dim",
    "conv_alpha",
    "loraplus_lr_ratio",
    "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio",
    "dropout",
];

const LR_WEIGHT_PRESETS: &[&str] = &["cosine", "sine", "linear", "reverse_linear", "zeros"];

/// Parses `--network_args` items (`key=value`, split at the first "=") for `kind` and
/// `family` (spec §7.4).
///
/// # Errors
/// An item without "=", a repeated key, an unknown key (listing the accepted ones), a value
/// of the wrong type, a dropout outside [0, 1], or a block list of the wrong length.
pub fn parse_network_args(
    items: &[String],
    kind: NetworkKind,
    family: Family,
) -> anyhow::Result<(NetworkArgs, serde_json::Map<String, serde_json::Value>)> {
    let mut out = NetworkArgs::default();
    let mut map = serde_json::Map::new();
    let accepted = match kind {
        NetworkKind::Lora => LORA_KEYS,
        NetworkKind::Dylora => DYLORA_KEYS,
    };
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            bail!("--network_args item \"{item}\": expected KEY=VALUE");
        };
        let (key, value) = (key.trim(), value.trim());
        if !accepted.contains(&key) {
            bail!(
                "--network_args: unknown key \"{key}\" for {} (accepted: {})",
                match kind {
                    NetworkKind::Lora => "networks.lora",
                    NetworkKind::Dylora => "networks.dylora",
                },
                accepted.join(", ")
            );
        }
        if map
            .insert(key.to_owned(), serde_json::Value::String(value.to_owned()))
            .is_some()
        {
            bail!("--network_args: key \"{key}\" is given twice");
        }
        let bad = |expected: &str| {
            anyhow::anyhow!("--network_args {key}: expected {expected}, found \"{value}\"")
        };
        let float = || value.parse::<f64>().ok().filter(|v| v.is_finite());
        let uint = || value.parse::<u32>().ok();
        let prob = || {
            float()
                .filter(|v| (0.0..=1.0).contains(v))
                .ok_or_else(|| bad("a number in [0, 1]"))
        };
        let list = |expected_len: usize| -> anyhow::Result<Vec<&str>> {
            let parts: Vec<&str> = value.split(',').map(str::trim).collect();
            if parts.len() != expected_len {
                bail!(
                    "--network_args {key}: expected {expected_len} comma-separated values for this model, found {}",
                    parts.len()
                );
            }
            Ok(parts)
        };
        let n = num_blocks(family);
        match key {
            "conv_dim" => out.conv_dim = Some(uint().ok_or_else(|| bad("a non-negative integer"))?),
            "conv_alpha" => out.conv_alpha = Some(float().ok_or_else(|| bad("a number"))?),
            "rank_dropout" => out.rank_dropout = Some(prob()?),
            "module_dropout" => out.module_dropout = Some(prob()?),
            "unit" => {
                out.unit = Some(
                    uint()
                        .filter(|&u| u > 0)
                        .ok_or_else(|| bad("a positive integer"))?,
                )
            }
            "block_dims" | "conv_block_dims" => {
                let dims = list(n)?
                    .into_iter()
                    .map(|p| {
                        p.parse::<u32>()
                            .map_err(|_| bad("comma-separated integers"))
                    })
                    .collect::<anyhow::Result<Vec<u32>>>()?;
                if key == "block_dims" {
                    out.block_dims = Some(dims);
                } else {
                    out.conv_block_dims = Some(dims);
                }
            }
            "block_alphas" | "conv_block_alphas" => {
                let alphas = list(n)?
                    .into_iter()
                    .map(|p| p.parse::<f64>().map_err(|_| bad("comma-separated numbers")))
                    .collect::<anyhow::Result<Vec<f64>>>()?;
                if key == "block_alphas" {
                    out.block_alphas = Some(alphas);
                } else {
                    out.conv_block_alphas = Some(alphas);
                }
            }
            "down_lr_weight" | "mid_lr_weight" | "up_lr_weight" => {
                let preset = value.split('+').next().unwrap_or_default();
                let is_preset = key != "mid_lr_weight" && LR_WEIGHT_PRESETS.contains(&preset);
                if is_preset {
                    if let Some(base) = value.split_once('+').map(|(_, b)| b) {
                        base.trim()
                            .parse::<f64>()
                            .map_err(|_| bad("PRESET or PRESET+BASE with a number BASE"))?;
                    }
                } else {
                    // Empty items are 0 (§7.4).
                    for p in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        p.parse::<f64>().map_err(|_| {
                            bad("comma-separated numbers or a preset (cosine, sine, linear, reverse_linear, zeros)")
                        })?;
                    }
                }
                let text = Some(value.to_owned());
                match key {
                    "down_lr_weight" => out.down_lr_weight = text,
                    "mid_lr_weight" => out.mid_lr_weight = text,
                    _ => out.up_lr_weight = text,
                }
            }
            "block_lr_zero_threshold" => {
                out.block_lr_zero_threshold = Some(float().ok_or_else(|| bad("a number"))?)
            }
            "loraplus_lr_ratio" => {
                out.loraplus_lr_ratio = Some(float().ok_or_else(|| bad("a number"))?)
            }
            "loraplus_unet_lr_ratio" => {
                out.loraplus_unet_lr_ratio = Some(float().ok_or_else(|| bad("a number"))?)
            }
            "loraplus_text_encoder_lr_ratio" => {
                out.loraplus_text_encoder_lr_ratio = Some(float().ok_or_else(|| bad("a number"))?)
            }
            // Set from --network_dropout by sd-scripts and unused by the networks.
            "dropout" => {
                prob()?;
            }
            _ => unreachable!("key checked against the accepted list"),
        }
    }
    if out.block_alphas.is_some() && out.block_dims.is_none() {
        bail!("--network_args block_alphas needs block_dims");
    }
    if out.conv_block_alphas.is_some() && out.conv_block_dims.is_none() {
        bail!("--network_args conv_block_alphas needs conv_block_dims");
    }
    Ok((out, map))
}

fn network_options(
    args: &Args,
    family: Family,
    warnings: &mut Vec<String>,
) -> anyhow::Result<NetworkOptions> {
    let n = &args.network;
    let Some(module) = n.network_module.clone() else {
        bail!("--network_module is required (networks.lora or networks.dylora)")
    };
    let kind = match module.as_str() {
        "networks.lora" => NetworkKind::Lora,
        "networks.dylora" => NetworkKind::Dylora,
        other => bail!(
            "unsupported --network_module \"{other}\": only networks.lora and networks.dylora are implemented"
        ),
    };
    let dim = match n.network_dim {
        None => 4,
        Some(d) => positive_u32("network_dim", d)?,
    };
    if !n.network_alpha.is_finite() || n.network_alpha < 0.0 {
        bail!("--network_alpha must be >= 0, found {}", n.network_alpha);
    }
    let dropout = n
        .network_dropout
        .map(|p| probability("network_dropout", p))
        .transpose()?;
    let (net_args, args_map) = parse_network_args(&n.network_args, kind, family)?;
    if kind == NetworkKind::Dylora {
        let unit = net_args.unit.unwrap_or(1);
        if dim % unit != 0 {
            bail!("networks.dylora: --network_dim {dim} must be a multiple of unit {unit}");
        }
        if let Some(cd) = net_args.conv_dim
            && cd != dim
        {
            bail!("networks.dylora: conv_dim ({cd}) must equal --network_dim ({dim})");
        }
        if net_args.conv_alpha.is_some() {
            warnings.push(
                "networks.dylora: conv_alpha has no effect (3x3 modules use --network_alpha, as in sd-scripts)"
                    .to_owned(),
            );
        }
        if dropout.is_some_and(|p| p > 0.0) {
            warnings.push("networks.dylora: --network_dropout has no effect".to_owned());
        }
    }
    if n.network_train_unet_only && n.network_train_text_encoder_only {
        bail!(
            "--network_train_unet_only and --network_train_text_encoder_only together leave nothing to train"
        );
    }
    if n.dim_from_weights && n.network_weights.is_none() {
        bail!("--dim_from_weights requires --network_weights");
    }
    if n.base_weights_multiplier.len() > n.base_weights.len() {
        bail!(
            "--base_weights_multiplier has {} values for {} --base_weights files",
            n.base_weights_multiplier.len(),
            n.base_weights.len()
        );
    }
    let base_weights = n
        .base_weights
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                p.clone(),
                n.base_weights_multiplier.get(i).copied().unwrap_or(1.0),
            )
        })
        .collect();
    if let Some(s) = n.scale_weight_norms
        && (s.is_nan() || s <= 0.0)
    {
        bail!("--scale_weight_norms must be > 0, found {s}");
    }
    Ok(NetworkOptions {
        module,
        kind,
        dim,
        alpha: n.network_alpha,
        dropout,
        args: net_args,
        args_map,
        network_weights: n.network_weights.clone(),
        dim_from_weights: n.dim_from_weights,
        train_unet: !n.network_train_text_encoder_only,
        train_text_encoder: !n.network_train_unet_only,
        base_weights,
        scale_weight_norms: n.scale_weight_norms,
        training_comment: n.training_comment.clone(),
    })
}

fn optimization_options(
    args: &Args,
    family: Family,
    warnings: &mut Vec<String>,
) -> anyhow::Result<OptimizationOptions> {
    let o = &args.optimization;
    let optimizer = OptimizerConfig::from_cli(
        Some(o.optimizer_type.as_str()),
        &o.optimizer_args,
        o.use_8bit_adam,
        o.use_lion_optimizer,
    )?;
    let optimizer_type = if o.use_8bit_adam {
        "AdamW8bit".to_owned()
    } else if o.use_lion_optimizer {
        "Lion".to_owned()
    } else if o.optimizer_type.trim().is_empty() {
        "AdamW".to_owned()
    } else {
        o.optimizer_type.trim().to_owned()
    };
    let _ = optimizer.warnings;

    for (name, lr) in [
        ("learning_rate", Some(o.learning_rate)),
        ("unet_lr", o.unet_lr),
    ]
    .into_iter()
    .chain(
        o.text_encoder_lr
            .iter()
            .map(|&v| ("text_encoder_lr", Some(v))),
    ) {
        if let Some(lr) = lr
            && !(lr.is_finite() && lr >= 0.0)
        {
            bail!("--{name} must be >= 0, found {lr}");
        }
    }
    if !(o.max_grad_norm.is_finite() && o.max_grad_norm >= 0.0) {
        bail!("--max_grad_norm must be >= 0, found {}", o.max_grad_norm);
    }

    // §10: scheduler name, warm-up/decay syntax, constant without warm-up.
    let kind = SchedulerType::from_str(&o.lr_scheduler)?;
    let warmup = StepsSpec::parse("--lr_warmup_steps", &o.lr_warmup_steps)?;
    StepsSpec::parse("--lr_decay_steps", &o.lr_decay_steps)?;
    if kind == SchedulerType::Constant && warmup.is_nonzero() {
        bail!(
            "--lr_scheduler constant does not use --lr_warmup_steps ({}); use constant_with_warmup",
            o.lr_warmup_steps
        );
    }
    if kind == SchedulerType::CosineWithMinLr && o.lr_scheduler_min_lr_ratio.is_none() {
        bail!("--lr_scheduler cosine_with_min_lr requires --lr_scheduler_min_lr_ratio");
    }

    let mixed_precision = match o.mixed_precision.as_str() {
        "fp16" => MixedPrecision::Fp16,
        "bf16" => MixedPrecision::Bf16,
        _ => MixedPrecision::No,
    };
    if o.full_fp16 && mixed_precision != MixedPrecision::Fp16 {
        bail!("--full_fp16 requires --mixed_precision fp16");
    }
    if o.full_bf16 && mixed_precision != MixedPrecision::Bf16 {
        bail!("--full_bf16 requires --mixed_precision bf16");
    }
    if o.full_fp16 && o.full_bf16 {
        bail!("--full_fp16 and --full_bf16 cannot be used together");
    }

    let clip_skip = o
        .clip_skip
        .map(|c| positive_u32("clip_skip", c))
        .transpose()?;
    if clip_skip.is_some() {
        match family {
            Family::Sd2 => warnings.push(
                "--clip_skip with --v2 is unexpected: SD 2.x models were not trained with it"
                    .to_owned(),
            ),
            Family::Sdxl => warnings.push(
                "--clip_skip is ignored by SDXL text encoding (it is still stored in the metadata)"
                    .to_owned(),
            ),
            Family::Sd1 => {}
        }
    }
    let (seed, seed_drawn) = match o.seed {
        Some(s) => (non_negative("seed", s)?, false),
        None => (draw_seed(), true),
    };
    Ok(OptimizationOptions {
        optimizer_type,
        optimizer_args: o.optimizer_args.clone(),
        learning_rate: o.learning_rate,
        unet_lr: o.unet_lr,
        text_encoder_lr: o.text_encoder_lr.first().copied(),
        max_grad_norm: o.max_grad_norm,
        lr_scheduler: o.lr_scheduler.clone(),
        lr_warmup_steps: o.lr_warmup_steps.clone(),
        lr_decay_steps: o.lr_decay_steps.clone(),
        lr_scheduler_num_cycles: opt_positive(
            "lr_scheduler_num_cycles",
            Some(o.lr_scheduler_num_cycles),
        )?
        .unwrap_or(1),
        lr_scheduler_power: o.lr_scheduler_power,
        lr_scheduler_timescale: opt_positive("lr_scheduler_timescale", o.lr_scheduler_timescale)?,
        lr_scheduler_min_lr_ratio: o.lr_scheduler_min_lr_ratio,
        train_batch_size: positive_u32("train_batch_size", o.train_batch_size)?,
        gradient_accumulation_steps: positive_u32(
            "gradient_accumulation_steps",
            o.gradient_accumulation_steps,
        )?,
        max_train_steps: opt_positive("max_train_steps", Some(o.max_train_steps))?.unwrap_or(1),
        max_train_epochs: opt_positive("max_train_epochs", o.max_train_epochs)?,
        seed,
        seed_drawn,
        mixed_precision,
        full_fp16: o.full_fp16,
        full_bf16: o.full_bf16,
        gradient_checkpointing: o.gradient_checkpointing,
        clip_skip,
        max_data_loader_n_workers: u32::try_from(o.max_data_loader_n_workers).map_err(|_| {
            anyhow::anyhow!(
                "--max_data_loader_n_workers must be >= 0, found {}",
                o.max_data_loader_n_workers
            )
        })?,
    })
}

fn diffusion_options(args: &Args, warnings: &mut Vec<String>) -> anyhow::Result<DiffusionOptions> {
    let d = &args.diffusion;
    let v_param = args.model.v_parameterization;
    // §1.2 rules, with the reference's error/warning choice.
    if d.adaptive_noise_scale.is_some() && d.noise_offset.is_none() {
        bail!("--adaptive_noise_scale requires --noise_offset");
    }
    if d.scale_v_pred_loss_like_noise_pred && !v_param {
        bail!("--scale_v_pred_loss_like_noise_pred can only be used with --v_parameterization");
    }
    if d.v_pred_like_loss.is_some_and(|w| w != 0.0) && v_param {
        bail!("--v_pred_like_loss cannot be used with --v_parameterization");
    }
    if d.zero_terminal_snr && !v_param {
        warnings.push(
            "--zero_terminal_snr is given without --v_parameterization: training results will be unexpected"
                .to_owned(),
        );
    }
    let min_timestep = match d.min_timestep {
        None => 0,
        Some(t @ 0..=999) => t as u32,
        Some(t) => bail!("--min_timestep must be in 0..=999, found {t}"),
    };
    let max_timestep = match d.max_timestep {
        None => 1000,
        Some(t @ 1..=1000) => t as u32,
        Some(t) => bail!("--max_timestep must be in 1..=1000, found {t}"),
    };
    if min_timestep > max_timestep {
        bail!("--min_timestep ({min_timestep}) must not exceed --max_timestep ({max_timestep})");
    }
    let loss_type = match d.loss_type.as_str() {
        "l1" => LossType::L1,
        "huber" => LossType::Huber,
        "smooth_l1" => LossType::SmoothL1,
        _ => LossType::L2,
    };
    let huber_schedule = match d.huber_schedule.as_str() {
        "constant" => HuberSchedule::Constant,
        "exponential" => HuberSchedule::Exponential,
        _ => HuberSchedule::Snr,
    };
    let multires_noise_iterations = d
        .multires_noise_iterations
        .map(|n| positive_u32("multires_noise_iterations", n))
        .transpose()?;
    if let Some(g) = d.min_snr_gamma
        && (g.is_nan() || g <= 0.0)
    {
        bail!("--min_snr_gamma must be > 0, found {g}");
    }
    Ok(DiffusionOptions {
        noise_offset: d.noise_offset,
        noise_offset_random_strength: d.noise_offset_random_strength,
        adaptive_noise_scale: d.adaptive_noise_scale,
        multires_noise_iterations,
        multires_noise_discount: d.multires_noise_discount,
        ip_noise_gamma: d.ip_noise_gamma,
        ip_noise_gamma_random_strength: d.ip_noise_gamma_random_strength,
        zero_terminal_snr: d.zero_terminal_snr,
        min_timestep,
        max_timestep,
        timestep_range_given: d.min_timestep.is_some() || d.max_timestep.is_some(),
        loss_type,
        huber_schedule,
        huber_c: d.huber_c,
        huber_scale: d.huber_scale,
        min_snr_gamma: d.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred: d.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss: d.v_pred_like_loss,
        debiased_estimation_loss: d.debiased_estimation_loss,
    })
}

fn output_options(args: &Args) -> anyhow::Result<OutputOptions> {
    let o = &args.output;
    let Some(output_dir) = o.output_dir.clone() else {
        bail!("--output_dir is required")
    };
    if let Some(name) = &o.output_name
        && (name.is_empty() || name.contains(['/', '\\']) || Path::new(name).is_absolute())
    {
        bail!("--output_name must be a plain file name without folders, found \"{name}\"");
    }
    let save_precision = match o.save_precision.as_deref() {
        None => None,
        Some("fp16") => Some(SavePrecision::Fp16),
        Some("bf16") => Some(SavePrecision::Bf16),
        Some(_) => Some(SavePrecision::Float),
    };
    if o.initial_epoch.is_some_and(|e| e < 1) {
        bail!("--initial_epoch is 1-based and must be >= 1");
    }
    Ok(OutputOptions {
        output_dir,
        output_name: o.output_name.clone(),
        save_precision,
        save_every_n_epochs: opt_positive("save_every_n_epochs", o.save_every_n_epochs)?,
        save_every_n_steps: opt_positive("save_every_n_steps", o.save_every_n_steps)?,
        save_n_epoch_ratio: opt_positive("save_n_epoch_ratio", o.save_n_epoch_ratio)?,
        save_last_n_epochs: opt_positive("save_last_n_epochs", o.save_last_n_epochs)?,
        save_last_n_epochs_state: opt_positive(
            "save_last_n_epochs_state",
            o.save_last_n_epochs_state,
        )?,
        save_last_n_steps: opt_positive("save_last_n_steps", o.save_last_n_steps)?,
        save_last_n_steps_state: opt_positive(
            "save_last_n_steps_state",
            o.save_last_n_steps_state,
        )?,
        save_state: o.save_state,
        save_state_on_train_end: o.save_state_on_train_end,
        resume: o.resume.clone(),
        initial_epoch: opt_non_negative("initial_epoch", o.initial_epoch)?,
        initial_step: opt_non_negative("initial_step", o.initial_step)?,
        skip_until_initial_step: o.skip_until_initial_step,
        no_metadata: o.no_metadata,
        metadata: MetadataOptions {
            title: o.metadata_title.clone(),
            author: o.metadata_author.clone(),
            description: o.metadata_description.clone(),
            license: o.metadata_license.clone(),
            tags: o.metadata_tags.clone(),
            usage_hint: o.metadata_usage_hint.clone(),
            thumbnail: o.metadata_thumbnail.clone(),
            merged_from: o.metadata_merged_from.clone(),
            trigger_phrase: o.metadata_trigger_phrase.clone(),
            preprocessor: o.metadata_preprocessor.clone(),
            is_negative_embedding: o.metadata_is_negative_embedding.clone(),
        },
    })
}

fn sampling_options(args: &Args, warnings: &mut Vec<String>) -> SamplingOptions {
    let s = &args.sampling;
    // §1.2: values <= 0 mean "unset" (with the reference's warning).
    let mut positive = |name: &str, v: Option<i64>| match v {
        Some(n) if n <= 0 => {
            warnings.push(format!("--{name} is {n} (<= 0), so it is disabled"));
            None
        }
        Some(n) => Some(n as u64),
        None => None,
    };
    let every_n_steps = positive("sample_every_n_steps", s.sample_every_n_steps);
    let every_n_epochs = positive("sample_every_n_epochs", s.sample_every_n_epochs);
    SamplingOptions {
        sample_prompts: s.sample_prompts.clone(),
        every_n_steps,
        every_n_epochs,
        at_first: s.sample_at_first,
        sampler: s.sample_sampler.clone(),
    }
}

/// Writes [`DatasetArgs`] (which has no `Serialize`) as a table with the option names.
fn serialize_dataset_args<S: serde::Serializer>(
    a: &DatasetArgs,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut m = serializer.serialize_map(None)?;
    let path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    if let Some(p) = path(&a.train_data_dir) {
        m.serialize_entry("train_data_dir", &p)?;
    }
    if let Some(p) = path(&a.reg_data_dir) {
        m.serialize_entry("reg_data_dir", &p)?;
    }
    if let Some(p) = path(&a.in_json) {
        m.serialize_entry("in_json", &p)?;
    }
    m.serialize_entry("dataset_repeats", &a.dataset_repeats)?;
    m.serialize_entry("train_batch_size", &a.train_batch_size)?;
    if let Some(r) = a.resolution {
        m.serialize_entry("resolution", &[r.width, r.height])?;
    }
    m.serialize_entry("enable_bucket", &a.enable_bucket)?;
    m.serialize_entry("min_bucket_reso", &a.min_bucket_reso)?;
    m.serialize_entry("max_bucket_reso", &a.max_bucket_reso)?;
    m.serialize_entry("bucket_reso_steps", &a.bucket_reso_steps)?;
    m.serialize_entry("bucket_no_upscale", &a.bucket_no_upscale)?;
    m.serialize_entry("caption_extension", &a.caption_extension)?;
    if let Some(e) = &a.caption_extention {
        m.serialize_entry("caption_extention", e)?;
    }
    m.serialize_entry("shuffle_caption", &a.shuffle_caption)?;
    m.serialize_entry("caption_separator", &a.caption_separator)?;
    m.serialize_entry("keep_tokens", &a.keep_tokens)?;
    m.serialize_entry("keep_tokens_separator", &a.keep_tokens_separator)?;
    if let Some(s) = &a.secondary_separator {
        m.serialize_entry("secondary_separator", s)?;
    }
    m.serialize_entry("enable_wildcard", &a.enable_wildcard)?;
    if let Some(s) = &a.caption_prefix {
        m.serialize_entry("caption_prefix", s)?;
    }
    if let Some(s) = &a.caption_suffix {
        m.serialize_entry("caption_suffix", s)?;
    }
    m.serialize_entry("color_aug", &a.color_aug)?;
    m.serialize_entry("flip_aug", &a.flip_aug)?;
    m.serialize_entry("random_crop", &a.random_crop)?;
    if let Some((lo, hi)) = a.face_crop_aug_range {
        m.serialize_entry("face_crop_aug_range", &[lo, hi])?;
    }
    m.serialize_entry("token_warmup_min", &a.token_warmup_min)?;
    m.serialize_entry("token_warmup_step", &a.token_warmup_step)?;
    m.serialize_entry("caption_dropout_rate", &a.caption_dropout_rate)?;
    m.serialize_entry(
        "caption_dropout_every_n_epochs",
        &a.caption_dropout_every_n_epochs,
    )?;
    m.serialize_entry("caption_tag_dropout_rate", &a.caption_tag_dropout_rate)?;
    m.serialize_entry("alpha_mask", &a.alpha_mask)?;
    m.serialize_entry("masked_loss", &a.masked_loss)?;
    if let Some(i) = a.resize_interpolation {
        m.serialize_entry("resize_interpolation", &i)?;
    }
    m.serialize_entry("validation_split", &a.validation_split)?;
    if let Some(s) = a.validation_seed {
        m.serialize_entry("validation_seed", &s)?;
    }
    m.serialize_entry("prior_loss_weight", &a.prior_loss_weight)?;
    m.end()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse_from;

    const BASE: &[&str] = &[
        "train-network",
        "--pretrained_model_name_or_path=model.safetensors",
        "--dataset_config=data.toml",
        "--output_dir=out",
        "--network_module=networks.lora",
        "--seed=42",
    ];

    fn validate(extra: &[&str]) -> anyhow::Result<Validated> {
        let mut argv = BASE.to_vec();
        argv.extend_from_slice(extra);
        let p = parse_from(argv).expect("parses");
        TrainOptions::from_args(&p.args, &p.given)
    }

    fn error(extra: &[&str]) -> String {
        format!("{:#}", validate(extra).expect_err("expected an error"))
    }

    fn warnings(extra: &[&str]) -> Vec<String> {
        validate(extra).expect("valid").warnings
    }

    #[test]
    fn example_command_line_gives_expected_options() {
        let argv = [
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
        let p = parse_from(argv).expect("parses");
        let v = TrainOptions::from_args(&p.args, &p.given).expect("valid");
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
        let o = v.options;
        assert_eq!(
            o.model,
            ModelOptions {
                family: Family::Sd1,
                pretrained_model_name_or_path: "model.safetensors".into(),
                v_parameterization: false,
                vae: None,
                no_half_vae: false,
                lowram: false,
            }
        );
        assert_eq!(o.dataset.dataset_config, Some(PathBuf::from("data.toml")));
        assert_eq!(o.dataset.args, DatasetArgs::default());
        assert!(o.dataset.cache_latents && !o.dataset.cache_latents_to_disk);
        assert_eq!(o.dataset.max_token_length, None);
        assert_eq!(o.network.kind, NetworkKind::Lora);
        assert_eq!(o.network.module, "networks.lora");
        assert_eq!((o.network.dim, o.network.alpha), (4, 1.0));
        assert_eq!(o.network.args, NetworkArgs::default());
        assert!(o.network.train_unet && o.network.train_text_encoder);
        let opt = &o.optimization;
        assert_eq!(opt.optimizer_type, "AdamW8bit");
        assert_eq!(opt.learning_rate, 1e-4);
        assert_eq!(opt.max_train_steps, 400);
        assert_eq!(opt.mixed_precision, MixedPrecision::Fp16);
        assert!(opt.gradient_checkpointing && !opt.full_fp16);
        assert_eq!(
            (opt.train_batch_size, opt.gradient_accumulation_steps),
            (1, 1)
        );
        assert_eq!(opt.lr_scheduler, "constant");
        assert_eq!(opt.max_grad_norm, 1.0);
        assert_eq!(opt.max_data_loader_n_workers, 8);
        assert!(opt.seed_drawn && opt.seed <= u64::from(u32::MAX));
        assert_eq!(o.diffusion.loss_type, LossType::L2);
        assert_eq!(
            (o.diffusion.min_timestep, o.diffusion.max_timestep),
            (0, 1000)
        );
        assert_eq!(o.output.output_dir, PathBuf::from("out"));
        assert_eq!(o.output.output_name.as_deref(), Some("mylora"));
        assert_eq!(o.output.save_every_n_epochs, Some(1));
        assert_eq!(o.output.save_precision, None);
        assert_eq!(o.sampling.sampler, "ddim");
        assert_eq!(o.logging.log_tracker_name, "network_train");
        // --print_config output is TOML that parses back.
        let text = o.to_toml().expect("toml");
        let table: toml::Table = text.parse().expect("valid TOML");
        assert_eq!(table["network"]["kind"].as_str(), Some("lora"));
        assert_eq!(
            table["optimization"]["max_train_steps"].as_integer(),
            Some(400)
        );
    }

    #[test]
    fn cache_implications_warn() {
        let v = validate(&["--cache_latents_to_disk"]).expect("valid");
        assert!(v.options.dataset.cache_latents);
        assert_eq!(
            v.warnings,
            ["--cache_latents_to_disk is given, so --cache_latents is turned on too"]
        );
        let v = validate(&[
            "--sdxl",
            "--network_train_unet_only",
            "--cache_text_encoder_outputs_to_disk",
        ])
        .expect("valid");
        assert!(v.options.dataset.cache_text_encoder_outputs);
        assert_eq!(v.warnings.len(), 1);
        assert!(error(&["--cache_text_encoder_outputs"]).contains("only available for SDXL"));
    }

    #[test]
    fn noise_and_v_prediction_rules() {
        assert!(error(&["--adaptive_noise_scale=0.01"]).contains("requires --noise_offset"));
        assert!(validate(&["--adaptive_noise_scale=0.01", "--noise_offset=0.1"]).is_ok());
        assert!(
            error(&["--scale_v_pred_loss_like_noise_pred"])
                .contains("only be used with --v_parameterization")
        );
        assert!(
            error(&["--v2", "--v_parameterization", "--v_pred_like_loss=0.1"])
                .contains("cannot be used with --v_parameterization")
        );
        assert_eq!(
            warnings(&["--zero_terminal_snr"]),
            [
                "--zero_terminal_snr is given without --v_parameterization: training results will be unexpected"
            ]
        );
        assert!(warnings(&["--v2", "--v_parameterization", "--zero_terminal_snr"]).is_empty());
        assert_eq!(
            warnings(&["--v_parameterization"]),
            ["--v_parameterization is meant for SD 2.x (--v2), not SD 1.x or SDXL"]
        );
    }

    #[test]
    fn sample_cadence_at_or_below_zero_is_unset() {
        let v = validate(&["--sample_every_n_epochs=0", "--sample_every_n_steps=-5"]).expect("ok");
        assert_eq!(v.options.sampling.every_n_epochs, None);
        assert_eq!(v.options.sampling.every_n_steps, None);
        assert_eq!(
            v.warnings,
            [
                "--sample_every_n_steps is -5 (<= 0), so it is disabled",
                "--sample_every_n_epochs is 0 (<= 0), so it is disabled"
            ]
        );
        let v = validate(&["--sample_every_n_steps=100"]).expect("ok");
        assert_eq!(v.options.sampling.every_n_steps, Some(100));
    }

    #[test]
    fn family_rules() {
        assert_eq!(
            warnings(&["--v2", "--clip_skip=2"]),
            ["--clip_skip with --v2 is unexpected: SD 2.x models were not trained with it"]
        );
        assert!(warnings(&["--clip_skip=2"]).is_empty());
        assert!(error(&["--sdxl", "--v2"]).contains("--v2 cannot be used with SDXL"));
        let v = validate(&["--sdxl", "--clip_skip=2"]).expect("warning only");
        assert_eq!(v.options.optimization.clip_skip, Some(2));
        assert_eq!(v.options.model.family, Family::Sdxl);
        assert!(v.warnings[0].contains("ignored by SDXL"));
        assert!(
            error(&["--sdxl", "--cache_text_encoder_outputs"])
                .contains("requires --network_train_unet_only")
        );
    }

    fn cli_dataset(extra: &[&str]) -> anyhow::Result<Validated> {
        let mut argv = vec![
            "train-network",
            "--pretrained_model_name_or_path=m.safetensors",
            "--train_data_dir=imgs",
            "--resolution=512",
            "--output_dir=out",
            "--network_module=networks.lora",
            "--seed=1",
        ];
        argv.extend_from_slice(extra);
        let p = parse_from(argv).expect("parses");
        TrainOptions::from_args(&p.args, &p.given)
    }

    #[test]
    fn bucket_steps_and_cache_restrictions_on_command_line_datasets() {
        let e = format!(
            "{:#}",
            cli_dataset(&["--bucket_reso_steps=32"]).unwrap_err()
        );
        assert!(
            e.contains("divisible by 64 for SD 1.x/2.x, found 32"),
            "{e}"
        );
        assert!(cli_dataset(&["--bucket_reso_steps=32", "--sdxl"]).is_ok());
        let e = format!(
            "{:#}",
            cli_dataset(&["--sdxl", "--bucket_reso_steps=48"]).unwrap_err()
        );
        assert!(e.contains("divisible by 32 for SDXL"), "{e}");
        let e = format!(
            "{:#}",
            cli_dataset(&["--cache_latents", "--color_aug"]).unwrap_err()
        );
        assert!(
            e.contains("--cache_latents cannot be used with --color_aug"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            cli_dataset(&[
                "--sdxl",
                "--network_train_unet_only",
                "--cache_text_encoder_outputs",
                "--shuffle_caption"
            ])
            .unwrap_err()
        );
        assert!(e.contains("--shuffle_caption"), "{e}");
        let v = cli_dataset(&["--resolution=768,512"]).expect("valid");
        assert_eq!(
            v.options.dataset.args.resolution,
            Some(sd_data::bucket::Resolution::new(768, 512))
        );
        // The same checks are passed to the dataset library for dataset files.
        let checks = v.options.dataset_checks();
        assert_eq!(checks.bucket_step_divisor, 64);
    }

    #[test]
    fn full_precision_needs_matching_mixed_precision() {
        assert!(error(&["--full_fp16"]).contains("--full_fp16 requires --mixed_precision fp16"));
        assert!(
            error(&["--full_bf16", "--mixed_precision=fp16"])
                .contains("--full_bf16 requires --mixed_precision bf16")
        );
        assert!(validate(&["--full_bf16", "--mixed_precision=bf16"]).is_ok());
    }

    #[test]
    fn seed_is_kept_or_drawn() {
        let v = validate(&[]).expect("valid");
        assert_eq!(
            (
                v.options.optimization.seed,
                v.options.optimization.seed_drawn
            ),
            (42, false)
        );
    }

    #[test]
    fn optimizer_and_scheduler_checks() {
        assert!(error(&["--use_8bit_adam", "--optimizer_type=Lion"]).contains("conflicting"));
        assert!(error(&["--optimizer_type=NoSuchOpt"]).contains("NoSuchOpt"));
        assert!(error(&["--lr_warmup_steps=10"]).contains("constant does not use"));
        let v = validate(&["--lr_scheduler=cosine", "--lr_warmup_steps=5%"]).expect("valid");
        assert_eq!(v.options.optimization.lr_warmup_steps, "5%");
        assert!(error(&["--lr_scheduler=cosine", "--lr_warmup_steps=1.5"]).contains("integer"));
        assert!(error(&["--lr_scheduler=nope"]).contains("nope"));
        let v = validate(&["--use_lion_optimizer"]).expect("valid");
        assert_eq!(v.options.optimization.optimizer_type, "Lion");
        let v = validate(&["--text_encoder_lr", "5e-5", "1e-5"]).expect("valid");
        assert_eq!(v.options.optimization.text_encoder_lr, Some(5e-5));
    }

    #[test]
    fn required_options_and_modules() {
        let p = parse_from(["train-network"]).expect("parses");
        let e = TrainOptions::from_args(&p.args, &p.given)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--pretrained_model_name_or_path is required"),
            "{e}"
        );
        assert!(
            error(&["--network_module=networks.lora_fa"]).contains("unsupported --network_module")
        );
        let v = validate(&[
            "--network_module=networks.dylora",
            "--network_dim=8",
            "--network_args",
            "unit=4",
        ])
        .expect("valid");
        assert_eq!(v.options.network.kind, NetworkKind::Dylora);
        assert_eq!(v.options.network.args.unit, Some(4));
        assert!(
            error(&[
                "--network_module=networks.dylora",
                "--network_dim=6",
                "--network_args",
                "unit=4"
            ])
            .contains("multiple of unit 4")
        );
        assert!(
            error(&[
                "--network_train_unet_only",
                "--network_train_text_encoder_only"
            ])
            .contains("nothing to train")
        );
        let v = validate(&[
            "--base_weights",
            "a.safetensors",
            "b.safetensors",
            "--base_weights_multiplier",
            "0.5",
        ])
        .expect("valid");
        assert_eq!(
            v.options.network.base_weights,
            [
                (PathBuf::from("a.safetensors"), 0.5),
                (PathBuf::from("b.safetensors"), 1.0)
            ]
        );
        assert!(error(&["--max_train_steps=0"]).contains("--max_train_steps must be a positive"));
        assert!(error(&["--min_timestep=500", "--max_timestep=100"]).contains("must not exceed"));
    }

    fn net(items: &[&str]) -> anyhow::Result<NetworkArgs> {
        let items: Vec<String> = items.iter().map(|s| (*s).to_owned()).collect();
        parse_network_args(&items, NetworkKind::Lora, Family::Sd1).map(|(a, _)| a)
    }

    #[test]
    fn network_args_parse_into_typed_fields() {
        let items: Vec<String> = [
            "conv_dim=4",
            "conv_alpha=1",
            "rank_dropout=0.1",
            "module_dropout=0.2",
            "down_lr_weight=sine+0.5",
            "mid_lr_weight=2",
            "up_lr_weight=1,,0.5",
            "block_lr_zero_threshold=0.1",
            "loraplus_lr_ratio=16",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let (a, map) = parse_network_args(&items, NetworkKind::Lora, Family::Sd1).expect("ok");
        assert_eq!(
            a,
            NetworkArgs {
                conv_dim: Some(4),
                conv_alpha: Some(1.0),
                rank_dropout: Some(0.1),
                module_dropout: Some(0.2),
                down_lr_weight: Some("sine+0.5".into()),
                mid_lr_weight: Some("2".into()),
                up_lr_weight: Some("1,,0.5".into()),
                block_lr_zero_threshold: Some(0.1),
                loraplus_lr_ratio: Some(16.0),
                ..NetworkArgs::default()
            }
        );
        let keys: Vec<&str> = map.keys().map(String::as_str).collect();
        assert_eq!(
            keys[..3],
            ["conv_dim", "conv_alpha", "rank_dropout"],
            "given order kept"
        );
        assert_eq!(map["conv_dim"], serde_json::json!("4"));

        let dims = ["4"; 25].join(",");
        let alphas = ["2"; 25].join(",");
        let a = net(&[
            &format!("block_dims={dims}"),
            &format!("block_alphas={alphas}"),
        ])
        .expect("25 blocks for SD");
        assert_eq!(a.block_dims, Some(vec![4; 25]));
        assert_eq!(a.block_alphas, Some(vec![2.0; 25]));
        let sdxl_dims = vec![format!("block_dims={}", ["4"; 23].join(","))];
        assert!(parse_network_args(&sdxl_dims, NetworkKind::Lora, Family::Sdxl).is_ok());
    }

    #[test]
    fn network_args_bad_values() {
        let cases: &[(&[&str], &str)] = &[
            (&["conv_dim"], "expected KEY=VALUE"),
            (
                &["conv_dim=four"],
                "conv_dim: expected a non-negative integer, found \"four\"",
            ),
            (&["conv_alpha=x"], "conv_alpha: expected a number"),
            (
                &["rank_dropout=1.5"],
                "rank_dropout: expected a number in [0, 1]",
            ),
            (&["unit=2"], "unknown key \"unit\" for networks.lora"),
            (&["conv_dims=4"], "unknown key \"conv_dims\""),
            (&["conv_dim=4", "conv_dim=8"], "given twice"),
            (
                &["block_dims=4,4,4"],
                "expected 25 comma-separated values for this model, found 3",
            ),
            (&["down_lr_weight=sine+x"], "PRESET+BASE"),
            (&["up_lr_weight=1,a"], "comma-separated numbers or a preset"),
        ];
        for (items, needle) in cases {
            let e = net(items).unwrap_err().to_string();
            assert!(e.contains(needle), "{items:?}: {e}");
        }
        let dy = vec!["rank_dropout=0.1".to_owned()];
        let e = parse_network_args(&dy, NetworkKind::Dylora, Family::Sd1).unwrap_err();
        assert!(e.to_string().contains("for networks.dylora"), "{e}");
        let e = error(&[
            "--network_module=networks.dylora",
            "--network_args",
            "conv_dim=2",
        ]);
        assert!(
            e.contains("conv_dim (2) must equal --network_dim (4)"),
            "{e}"
        );
    }
}
