//! The LoRA training loop of `train-network` (sd-scripts `train_network.py`): latents, text
//! conditioning, the noise/timestep/loss step, gradient accumulation, optimiser and scheduler
//! steps, saving on the reference's cadence, training state and exact resume.
//!
//! # Determinism
//! Every random draw of a micro-batch (VAE sampling when latents are not cached, noise, noise
//! offset, timesteps, LoRA dropouts) comes from libtorch's global generator re-seeded with
//! `mix(seed, epoch, batch)` before the micro-batch; data order and caption randomness come from
//! the dataset plan (seeded per epoch) and per-sample seeds. A run resumed from a saved state
//! therefore sees exactly the batches and draws an uninterrupted run would (on CPU, bitwise).
//!
//! # Source
//! `../shared/spec/training.md` §5 (latents), §6 (the step), §7.5 (parameter groups), §10
//! (schedulers), §11 (steps, epochs, saving, metadata, state and resume).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{SystemTime, UNIX_EPOCH};

use sd_data::caption::{CaptionProgress, process_caption};
use sd_data::dataset::DatasetScan;
use sd_data::dataset_plan::{EpochPlan, plan_epoch};
use sd_data::dataset_rng::DataRng;
use sd_data::image_prep::{LoadRequest, PreparedImage, load_parallel};
use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;
use sd_formats::metadata::{ModelSpecInput, PyValue, iso_date_utc, py_float_repr};
use tch::{Device, Kind, Tensor};

use super::{
    GradScaler, LrScheduler, Optimizer, OptimizerConfig, ParamGroup, SchedulerConfig,
    clip_grad_norm,
};
use crate::loader::{ModelLoadOptions, StableDiffusion};
use crate::lora::{
    ComponentLayers, Dropouts, LoraNetwork, LoraWeights, NetworkOptions, SaveOptions,
};
use crate::models::text_encoder::{OutputLayer, join_chunks};
use crate::schedule::{NoiseSchedule, PredictionType};

mod distributed;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Loading the model failed.
    #[error(transparent)]
    Load(#[from] crate::loader::LoadError),
    /// Building, loading or saving the LoRA network failed.
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    /// Optimiser or scheduler problem.
    #[error(transparent)]
    Optim(#[from] super::OptimError),
    /// Tokenisation problem.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// Image loading problem (file named in the message).
    #[error(transparent)]
    Data(#[from] sd_data::dataset_error::DatasetError),
    /// File-system problem, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Non-finite latents, a bad state folder, an invalid setting.
    #[error("{0}")]
    Invalid(String),
    /// A collective of data-parallel training failed (a rank died, a timeout).
    #[error(transparent)]
    Distributed(#[from] sd_dist::Error),
    /// The run was interrupted (Ctrl-C); the LoRA and the state were saved.
    #[error("interrupted at step {step}: saved {lora} and the state {state}")]
    Interrupted {
        /// Optimiser steps done.
        step: u64,
        /// The LoRA written.
        lora: PathBuf,
        /// The state folder written.
        state: PathBuf,
    },
}

/// Result of training functions.
pub type Result<T> = std::result::Result<T, TrainError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loss function (`--loss_type`, spec §6.6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossType {
    /// `(p − y)²` (default).
    L2,
    /// `|p − y|`.
    L1,
    /// `2c(√((p−y)² + c²) − c)` with the Huber schedule's c.
    Huber,
    /// `2(√((p−y)² + c²) − c)`.
    SmoothL1,
}

/// `--huber_schedule` (spec §6.6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HuberSchedule {
    /// c = huber_c · huber_scale.
    Constant,
    /// c = exp(−α t) · huber_scale, α = −ln(huber_c)/1000.
    Exponential,
    /// c = (1 − huber_c)/(1 + σ_t)² + huber_c.
    Snr,
}

/// Mixed precision of the frozen models (`--mixed_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MixedPrecision {
    /// Everything in f32 (`no`).
    No,
    /// Frozen weights in f16, dynamic loss scaling.
    Fp16,
    /// Frozen weights in bf16.
    Bf16,
}

impl MixedPrecision {
    fn kind(self) -> Kind {
        match self {
            MixedPrecision::No => Kind::Float,
            MixedPrecision::Fp16 => Kind::Half,
            MixedPrecision::Bf16 => Kind::BFloat16,
        }
    }

    /// sd-scripts' spelling (`no`, `fp16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Fp16 => "fp16",
            MixedPrecision::Bf16 => "bf16",
        }
    }
}

/// Everything a training run needs besides the dataset (a validated, plain configuration; the
/// `train-network` tool builds it from sd-scripts' options).
#[derive(Debug, Clone)]
pub struct TrainConfig {
    // --- model
    /// `--pretrained_model_name_or_path`: single file or Diffusers folder.
    pub model: PathBuf,
    /// Diffusers folder describing a non-standard-size single file.
    pub model_config_dir: Option<PathBuf>,
    /// `--v2`.
    pub v2: bool,
    /// `--v_parameterization`.
    pub v_parameterization: bool,
    /// `--sdxl`: the user declares an SDXL model (checked against the checkpoint, whose
    /// family decides).
    pub sdxl: bool,
    /// Device.
    pub device: Device,
    /// `--mixed_precision`.
    pub mixed_precision: MixedPrecision,
    /// `--no_half_vae`: keep the VAE in f32 (it always is when mixed precision is off).
    pub no_half_vae: bool,
    /// `--gradient_checkpointing`: every U-Net block (and text-encoder layer when it is
    /// trained) is recomputed during backward instead of keeping its activations
    /// ([`crate::models::checkpoint`]); same gradients, less memory, about one extra forward.
    pub gradient_checkpointing: bool,
    /// `--full_fp16` / `--full_bf16`: the LoRA weights, and so their gradients, are cast to the
    /// mixed-precision type too (`mixed_precision` must be `Fp16` / `Bf16`: [`train`] refuses
    /// `No`). The fp16 loss scaler still runs; the optimiser keeps f32 state and updates
    /// half-precision weights through an f32 copy (docs/optimizers.md).
    pub full_half: bool,
    /// `--lowram`: recorded as `ss_lowram`. Models are always loaded straight to the device
    /// (docs/performance.md, "Loading and --lowram"), so it changes nothing else.
    pub lowram: bool,
    // --- network
    /// `networks.lora` or `networks.dylora` (recorded in metadata).
    pub network_module: String,
    /// Ranks and alphas.
    pub network: NetworkOptions,
    /// Whether `--network_dim` was given (the reference writes `None` otherwise).
    pub network_dim_given: bool,
    /// Whether `--network_alpha` was given as a float (`1.0`) rather than left at the integer
    /// default (`1`); affects `ss_network_alpha` only.
    pub network_alpha_given: bool,
    /// `--network_dropout`, `rank_dropout`, `module_dropout`.
    pub dropouts: Dropouts,
    /// `--network_args` as given (key, value), for `ss_network_args`.
    pub network_args: Vec<(String, String)>,
    /// `--network_weights`: start from these weights.
    pub network_weights: Option<PathBuf>,
    /// `networks.dylora` `unit` (`None` for plain LoRA): every module forward trains a random
    /// rank slice (spec lora-format.md §7).
    pub dylora_unit: Option<usize>,
    /// Block-wise ranks and learning-rate weights (spec lora-format.md §6.1, §6.2).
    pub blockwise: crate::lora::blockwise::BlockwiseOptions,
    /// Train the U-Net LoRA (false with `--network_train_text_encoder_only`).
    pub train_unet: bool,
    /// Train the text-encoder LoRA (false with `--network_train_unet_only`).
    pub train_text_encoder: bool,
    // --- optimisation
    /// The optimiser.
    pub optimizer: OptimizerConfig,
    /// `--learning_rate`.
    pub learning_rate: f64,
    /// `--unet_lr`.
    pub unet_lr: Option<f64>,
    /// `--text_encoder_lr` (first value).
    pub text_encoder_lr: Option<f64>,
    /// Scheduler settings (`max_train_steps` is filled in by the run).
    pub scheduler: SchedulerConfig,
    /// `--max_grad_norm` (0 disables clipping).
    pub max_grad_norm: f64,
    /// `--gradient_accumulation_steps`.
    pub gradient_accumulation_steps: u64,
    /// `--max_train_steps` (1600).
    pub max_train_steps: u64,
    /// `--max_train_epochs` (overrides the steps).
    pub max_train_epochs: Option<u64>,
    /// `--seed` (a random one is drawn by the tool when absent).
    pub seed: u64,
    /// `--clip_skip`.
    pub clip_skip: Option<usize>,
    /// `--max_token_length` (None, 150, 225).
    pub max_token_length: Option<usize>,
    // --- diffusion
    /// `--noise_offset`.
    pub noise_offset: f64,
    /// `--noise_offset_random_strength`.
    pub noise_offset_random_strength: bool,
    /// `--adaptive_noise_scale`.
    pub adaptive_noise_scale: Option<f64>,
    /// `--multires_noise_iterations`.
    pub multires_noise_iterations: u32,
    /// `--multires_noise_discount`.
    pub multires_noise_discount: f64,
    /// `--ip_noise_gamma`.
    pub ip_noise_gamma: Option<f64>,
    /// `--ip_noise_gamma_random_strength`.
    pub ip_noise_gamma_random_strength: bool,
    /// `--min_timestep`.
    pub min_timestep: i64,
    /// `--max_timestep`.
    pub max_timestep: i64,
    /// `--zero_terminal_snr`.
    pub zero_terminal_snr: bool,
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
    // --- latents
    /// `--cache_latents`.
    pub cache_latents: bool,
    /// `--cache_latents_to_disk`.
    pub cache_latents_to_disk: bool,
    /// `--vae_batch_size`.
    pub vae_batch_size: usize,
    /// `--cache_text_encoder_outputs` (SDXL, text encoders not trained; spec §4.5).
    pub cache_text_encoder_outputs: bool,
    /// `--cache_text_encoder_outputs_to_disk` (`<image>_te_outputs.npz`).
    pub cache_text_encoder_outputs_to_disk: bool,
    // --- output
    /// `--output_dir`.
    pub output_dir: PathBuf,
    /// `--output_name`.
    pub output_name: Option<String>,
    /// `--save_precision` (None keeps f32).
    pub save_precision: Option<Dtype>,
    /// `--save_every_n_epochs`.
    pub save_every_n_epochs: Option<u64>,
    /// `--save_every_n_steps`.
    pub save_every_n_steps: Option<u64>,
    /// `--save_last_n_epochs`.
    pub save_last_n_epochs: Option<u64>,
    /// `--save_last_n_steps`.
    pub save_last_n_steps: Option<u64>,
    /// `--save_state`.
    pub save_state: bool,
    /// `--save_state_on_train_end`.
    pub save_state_on_train_end: bool,
    /// `--resume`: a state folder.
    pub resume: Option<PathBuf>,
    /// `--no_metadata`.
    pub no_metadata: bool,
    /// `--training_comment`.
    pub training_comment: Option<String>,
    /// `--metadata_title`, `--metadata_author`, … (without the prefix).
    pub metadata_extra: BTreeMap<String, String>,
    /// `--logging_dir`: a JSONL log of every step is written there, and TensorBoard event
    /// files (`loss/current`, `loss/average`, `lr/<group>` per step) into
    /// `<logging_dir>/<YYYYmmddHHMMSS>/network_train/`.
    pub logging_dir: Option<PathBuf>,
    /// Dataset metadata (`ss_datasets`, `ss_tag_frequency`, …) computed by the tool.
    pub dataset_metadata: BTreeMap<String, String>,
    /// Training resolution (W, H) for `modelspec.resolution`.
    pub resolution: Option<(u32, u32)>,
    /// `--sample_every_n_steps` (ignored when `sample_every_n_epochs` is set).
    pub sample_every_n_steps: Option<u64>,
    /// `--sample_every_n_epochs`.
    pub sample_every_n_epochs: Option<u64>,
    /// `--sample_at_first`: samples before the first step.
    pub sample_at_first: bool,
}

/// What a run reports to its caller while it goes (progress bar, logging).
pub trait TrainObserver {
    /// Called once before the first step: total optimiser steps and the step training starts at.
    fn start(&mut self, _total_steps: u64, _start_step: u64) {}
    /// Called after every optimiser step.
    fn step(&mut self, _report: &StepReport) {}
    /// A line of information (a stage, a saved file).
    fn info(&mut self, _message: &str) {}
    /// Called when samples are due (spec training.md §11.2): after optimiser step `step`, or at
    /// the end of epoch `epoch_end` (1-based). The network is applied at its training strength
    /// with dropouts off, under no-grad; the tool generates and writes the images.
    fn sample(&mut self, _model: &StableDiffusion, _step: u64, _epoch_end: Option<u64>) {}
}

/// An observer that reports nothing.
pub struct Quiet;
impl TrainObserver for Quiet {}

/// One optimiser step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    /// Optimiser steps done (1-based after this step).
    pub step: u64,
    /// Epoch, 1-based.
    pub epoch: u64,
    /// Mean loss of this step's micro-batches.
    pub loss: f64,
    /// Running mean of the loss over the current epoch.
    pub avg_loss: f64,
    /// Learning rate of every parameter group, by group name.
    pub lrs: Vec<(String, f64)>,
    /// Whether the step was skipped (fp16 overflow).
    pub skipped: bool,
}

/// Summary of a finished run.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimiser steps done.
    pub steps: u64,
    /// Epochs run.
    pub epochs: u64,
    /// The final LoRA file.
    pub final_lora: PathBuf,
    /// Mean loss of the last epoch.
    pub last_epoch_loss: f64,
    /// Loss of the first step (for "the loss falls" checks).
    pub first_loss: Option<f64>,
    /// Steps skipped because of fp16 overflow.
    pub skipped_steps: u64,
}

/// Training progress stored in a state folder (`train_state.json`).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
struct TrainState {
    /// Epochs fully done (0-based index of the epoch in progress).
    current_epoch: u64,
    /// Optimiser steps done.
    current_step: u64,
    /// Micro-batches of the current epoch already consumed.
    batches_done_in_epoch: u64,
    /// The run's seed (a resumed run must use the same data order).
    seed: u64,
}

/// Derives the seed of one micro-batch's random draws (splitmix64 of the three numbers).
fn mix_seed(seed: u64, epoch: u64, batch: u64) -> i64 {
    let mut z = seed
        ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ batch.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64 & i64::MAX
}

/// Step arithmetic of spec §11.1 for one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// Micro-batches per epoch (N).
    pub batches_per_epoch: u64,
    /// Optimiser steps per epoch (U = ⌈N / G⌉).
    pub steps_per_epoch: u64,
    /// Total optimiser steps.
    pub max_train_steps: u64,
    /// Epochs needed (⌈max_train_steps / U⌉).
    pub num_epochs: u64,
}

impl StepPlan {
    /// `max_train_epochs` overrides `max_train_steps` (spec §11.1).
    pub fn new(
        batches_per_epoch: u64,
        accumulation: u64,
        max_train_steps: u64,
        max_train_epochs: Option<u64>,
    ) -> Self {
        let g = accumulation.max(1);
        let u = batches_per_epoch.div_ceil(g).max(1);
        let max_train_steps = max_train_epochs.map_or(max_train_steps, |e| e * u);
        Self {
            batches_per_epoch,
            steps_per_epoch: u,
            max_train_steps,
            num_epochs: max_train_steps.div_ceil(u),
        }
    }
}

/// A batch ready for the step: scaled latents, captions, loss weights.
struct Batch {
    /// `[B, 4, h, w]` scaled latents (f32, on the device).
    latents: Tensor,
    captions: Vec<String>,
    loss_weights: Vec<f64>,
    /// SDXL size conditioning: (original h, w, crop top, left, target h, w) per sample.
    size_cond: Vec<[f64; 6]>,
    /// (dataset, image) of every sample (text-encoder output cache lookups).
    keys: Vec<(usize, usize)>,
    /// Seed of every sample's random draws (VAE sampling, noise, timesteps).
    seeds: Vec<i64>,
    /// This rank's share of the global micro-batch's samples (1 on one process).
    share: f64,
}

/// Cached (unscaled) latents of one image: normal and flipped, `[4, h, w]` f32 on the CPU.
pub(super) struct CachedLatents {
    pub(super) normal: Tensor,
    pub(super) flipped: Option<Tensor>,
    pub(super) original_size: (u32, u32),
    pub(super) crop_top_left: (u32, u32),
    pub(super) crop_top_left_flipped: (u32, u32),
}

/// The running state of one training run.
struct Run<'a> {
    cfg: &'a TrainConfig,
    scan: &'a DatasetScan,
    model: StableDiffusion,
    network: LoraNetwork,
    optimizer: Box<dyn Optimizer>,
    scheduler: LrScheduler,
    scaler: Option<GradScaler>,
    base_lrs: Vec<f64>,
    group_names: Vec<String>,
    noise: NoiseSchedule,
    plan: StepPlan,
    cache: HashMap<(usize, usize), CachedLatents>,
    te_cache: Option<super::sdxl::TextOutputCache>,
    session_id: u64,
    started_at: f64,
    log: Option<std::fs::File>,
    tensorboard: Option<super::tensorboard::EventWriter>,
    interrupt: Arc<AtomicBool>,
    /// Data-parallel process group (world size > 1), see `distributed.rs`.
    dist: Option<&'a sd_dist::ProcessGroup>,
    /// Some rank was interrupted (agreed on at the last optimiser step).
    dist_stop: bool,
}

/// Trains a LoRA on `scan` with `cfg`, reporting to `observer`. `interrupt` is polled after
/// every micro-batch: when set, the LoRA and the state are saved and
/// [`TrainError::Interrupted`] is returned.
///
/// # Errors
/// [`TrainError`] naming the file, option or image at fault.
pub fn train(
    cfg: &TrainConfig,
    scan: &DatasetScan,
    observer: &mut dyn TrainObserver,
    interrupt: Arc<AtomicBool>,
) -> Result<TrainSummary> {
    train_distributed(cfg, scan, observer, interrupt, None)
}

/// [`train`] as one rank of a data-parallel run (docs/distributed.md). `scan`'s batch sizes
/// are the GLOBAL batch (per-rank batch × world size): every rank plans the same epochs and
/// takes its slice of each micro-batch; LoRA gradients are summed over the ranks before each
/// optimiser step; only rank 0 writes the LoRA, states, logs and samples. `None` or a world
/// of 1 is a plain run.
///
/// # Errors
/// As [`train`], and [`TrainError::Distributed`] when a collective fails (a rank died or the
/// group's timeout passed).
pub fn train_distributed(
    cfg: &TrainConfig,
    scan: &DatasetScan,
    observer: &mut dyn TrainObserver,
    interrupt: Arc<AtomicBool>,
    dist: Option<&sd_dist::ProcessGroup>,
) -> Result<TrainSummary> {
    let dist = dist.filter(|d| d.world_size() > 1);
    let mut run = Run::new(cfg, scan, interrupt, observer, dist)?;
    run.train(observer)
}

impl<'a> Run<'a> {
    fn new(
        cfg: &'a TrainConfig,
        scan: &'a DatasetScan,
        interrupt: Arc<AtomicBool>,
        observer: &mut dyn TrainObserver,
        dist: Option<&'a sd_dist::ProcessGroup>,
    ) -> Result<Self> {
        let is_main = dist.is_none_or(|d| d.is_main());
        if !cfg.train_unet && !cfg.train_text_encoder {
            return Err(TrainError::Invalid(
                "nothing to train: both the U-Net and the text encoder are excluded".into(),
            ));
        }
        if cfg.full_half && cfg.mixed_precision == MixedPrecision::No {
            return Err(TrainError::Invalid(
                "--full_fp16 / --full_bf16 require --mixed_precision fp16 / bf16".into(),
            ));
        }
        let kind = cfg.mixed_precision.kind();
        let vae_kind = if cfg.no_half_vae { Kind::Float } else { kind };
        observer.info(&format!("loading model {}", cfg.model.display()));
        let opts = ModelLoadOptions {
            device: cfg.device,
            kind,
            vae_kind,
            v2: cfg.v2,
            v_parameterization: cfg.v_parameterization,
            config_dir: cfg.model_config_dir.clone(),
        };
        let mut model = StableDiffusion::load(&cfg.model, &opts)?;
        super::sdxl::check_family(cfg, &mut model, observer)?;
        tch::manual_seed(cfg.seed as i64);

        // The network: U-Net and/or text encoder(s), f32 weights.
        let mut components = Vec::new();
        if cfg.train_unet {
            components.push(ComponentLayers {
                component: Component::Unet,
                layers: model.unet.lora_layers(),
            });
        }
        if cfg.train_text_encoder {
            for slot in &model.text_encoders {
                components.push(ComponentLayers {
                    component: slot.component,
                    layers: slot.model.lora_layers(),
                });
            }
        }
        let (block_ranks, block_lr) = cfg.blockwise.resolve(model.family, &cfg.network)?;
        let mut network = LoraNetwork::create_with_blocks(
            model.family,
            &components,
            &cfg.network,
            block_ranks.as_ref(),
            cfg.dropouts,
            cfg.device,
        )?;
        drop(components);
        if let Some(unit) = cfg.dylora_unit {
            network.enable_dylora(unit, cfg.seed)?;
        }
        if let Some(path) = &cfg.network_weights {
            let weights = LoraWeights::load(path, &Default::default())?;
            let loaded = network.load_module_weights(&weights)?;
            observer.info(&format!(
                "--network_weights {}: loaded {loaded} of {} modules",
                path.display(),
                network.len()
            ));
        }
        if cfg.full_half {
            // sd-scripts: `network.to(weight_dtype)` (spec training.md §6.8).
            network.set_kind(kind);
        }
        network.apply();
        network.set_train(true);
        if cfg.gradient_checkpointing {
            // Each block's node gets its component's LoRA tensors (spec: issue 6).
            for (component, params) in network.parameters() {
                let c = crate::models::checkpoint::Checkpointing::new(params);
                if component == Component::Unet {
                    model.unet.set_gradient_checkpointing(Some(c));
                } else if let Some(slot) = model
                    .text_encoders
                    .iter_mut()
                    .find(|s| s.component == component)
                {
                    slot.model.set_gradient_checkpointing(Some(c));
                }
            }
        }
        observer.info(&format!(
            "LoRA network: {} modules ({})",
            network.len(),
            network
                .parameters()
                .iter()
                .map(|(c, p)| format!("{} {}", c.name(), p.len() / 2))
                .collect::<Vec<_>>()
                .join(", ")
        ));

        // Parameter groups (spec §7.5): text encoder first, then U-Net; a zero lr drops a group.
        let mut groups = Vec::new();
        let mut te_params = Vec::new();
        let mut unet_params = Vec::new();
        for (component, params) in network.parameters() {
            if component == Component::Unet {
                unet_params.extend(params)
            } else {
                te_params.extend(params)
            }
        }
        let relative_step = cfg.optimizer.relative_step();
        let te_lr = cfg.text_encoder_lr.unwrap_or(cfg.learning_rate);
        let unet_lr = cfg.unet_lr.unwrap_or(cfg.learning_rate);
        if !te_params.is_empty() && (te_lr != 0.0 || relative_step) {
            groups.push(ParamGroup::new(
                "textencoder",
                te_params,
                if relative_step {
                    cfg.learning_rate
                } else {
                    te_lr
                },
            ));
        }
        if let Some(weights) = block_lr.as_ref().filter(|_| !unet_params.is_empty()) {
            // One U-Net group per block with lr × block weight (sd-scripts
            // `prepare_optimizer_params` with block LR weights); zero-lr groups are dropped.
            for (block, params) in network.unet_parameters_by_block() {
                let w = usize::try_from(block)
                    .ok()
                    .and_then(|b| weights.get(b))
                    .copied()
                    .unwrap_or(1.0);
                let lr = if relative_step {
                    cfg.learning_rate
                } else {
                    unet_lr * w
                };
                if lr != 0.0 || relative_step {
                    groups.push(ParamGroup::new(format!("unet_block{block}"), params, lr));
                }
            }
        } else if !unet_params.is_empty() && (unet_lr != 0.0 || relative_step) {
            groups.push(ParamGroup::new(
                "unet",
                unet_params,
                if relative_step {
                    cfg.learning_rate
                } else {
                    unet_lr
                },
            ));
        }
        if groups.is_empty() {
            return Err(TrainError::Invalid(
                "every parameter group has a learning rate of 0: nothing would be trained".into(),
            ));
        }
        let base_lrs: Vec<f64> = groups.iter().map(|g| g.lr).collect();
        let group_names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        let optimizer = cfg.optimizer.build(groups);
        super::memory::report_for_run(cfg, scan, &model, &network);

        let plan = StepPlan::new(
            scan.num_batches(),
            cfg.gradient_accumulation_steps,
            cfg.max_train_steps,
            cfg.max_train_epochs,
        );
        let mut sched_cfg = cfg.scheduler.clone();
        sched_cfg.max_train_steps = plan.max_train_steps;
        sched_cfg.learning_rate = cfg.learning_rate;
        let scheduler = LrScheduler::new(&sched_cfg)?;
        let scaler =
            (cfg.mixed_precision == MixedPrecision::Fp16).then(|| GradScaler::new(cfg.device));
        let noise = if cfg.zero_terminal_snr {
            NoiseSchedule::stable_diffusion().with_zero_terminal_snr()
        } else {
            NoiseSchedule::stable_diffusion()
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let log = match cfg.logging_dir.as_ref().filter(|_| is_main) {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(io_err(dir))?;
                let path = dir.join(format!(
                    "{}-{}.jsonl",
                    cfg.output_name.as_deref().unwrap_or("train"),
                    now as u64
                ));
                Some(std::fs::File::create(&path).map_err(io_err(&path))?)
            }
            None => None,
        };
        // TensorBoard: `<logging_dir>/<YYYYmmddHHMMSS>/network_train/` (spec §12.4).
        let tensorboard = match cfg.logging_dir.as_ref().filter(|_| is_main) {
            Some(dir) => {
                let run_dir = dir
                    .join(chrono::Local::now().format("%Y%m%d%H%M%S").to_string())
                    .join("network_train");
                Some(
                    super::tensorboard::EventWriter::create(&run_dir, now)
                        .map_err(io_err(&run_dir))?,
                )
            }
            None => None,
        };
        Ok(Self {
            cfg,
            scan,
            model,
            network,
            optimizer,
            scheduler,
            scaler,
            base_lrs,
            group_names,
            noise,
            plan,
            cache: HashMap::new(),
            te_cache: None,
            session_id: u64::from(now.to_bits() as u32),
            started_at: now,
            log,
            tensorboard,
            interrupt,
            dist,
            dist_stop: false,
        })
    }

    fn train(&mut self, observer: &mut dyn TrainObserver) -> Result<TrainSummary> {
        let cfg = self.cfg;
        std::fs::create_dir_all(&cfg.output_dir).map_err(io_err(&cfg.output_dir))?;
        let mut state = TrainState {
            current_epoch: 0,
            current_step: 0,
            batches_done_in_epoch: 0,
            seed: cfg.seed,
        };
        if let Some(dir) = &cfg.resume {
            state = self.load_state(dir)?;
            observer.info(&format!(
                "resumed from {} at step {} (epoch {})",
                dir.display(),
                state.current_step,
                state.current_epoch + 1
            ));
        }
        self.broadcast_weights()?;
        if state.current_step >= self.plan.max_train_steps {
            return Err(TrainError::Invalid(format!(
                "the state is at step {} but --max_train_steps is {}: nothing left to train (max_train_steps/epochs always mean the total)",
                state.current_step, self.plan.max_train_steps
            )));
        }
        if cfg.cache_latents {
            self.cache_all_latents(observer)?;
        }
        if cfg.cache_text_encoder_outputs && self.model.family == ModelFamily::Sdxl {
            let (cache, reused) = super::sdxl::TextOutputCache::build(
                &self.model,
                self.scan,
                cfg.max_token_length,
                cfg.device,
                cfg.cache_text_encoder_outputs_to_disk,
            )?;
            observer.info(&format!(
                "cached text-encoder outputs of {} images ({reused} from disk)",
                cache.len()
            ));
            self.te_cache = Some(cache);
        }
        observer.start(self.plan.max_train_steps, state.current_step);
        if cfg.sample_at_first && state.current_step == 0 {
            self.sample(0, None, observer);
        }
        let g = cfg.gradient_accumulation_steps.max(1);
        let mut global_step = state.current_step;
        let mut first_loss = None;
        let mut last_epoch_loss = 0.0;
        let mut skipped_steps = 0;
        let mut epoch = state.current_epoch;
        'epochs: while epoch < self.plan.num_epochs {
            let plan: EpochPlan = plan_epoch(self.scan, cfg.seed, (epoch + 1) as u32);
            let n = plan.batches.len() as u64;
            let start_batch = if epoch == state.current_epoch {
                state.batches_done_in_epoch
            } else {
                0
            };
            let (mut epoch_loss_sum, mut epoch_loss_n) = (0.0, 0u64);
            let mut step_losses = Vec::new();
            for bi in start_batch..n {
                tch::manual_seed(mix_seed(cfg.seed, epoch, bi));
                // With a process group: this rank's slice (an empty slice adds nothing).
                let loss = match self.prepare_batch(&plan, bi as usize, epoch, global_step)? {
                    Some(batch) => self.forward_backward(&batch, g)?,
                    None => 0.0,
                };
                step_losses.push(loss);
                epoch_loss_sum += loss;
                epoch_loss_n += 1;
                let sync = (bi + 1) % g == 0 || bi + 1 == n;
                if sync {
                    if self.dist.is_some() {
                        let local: f64 = step_losses.iter().sum();
                        step_losses = self.reduce_gradients(&step_losses)?;
                        epoch_loss_sum += step_losses.iter().sum::<f64>() - local;
                    }
                    let skipped = self.optimizer_step()?;
                    skipped_steps += u64::from(skipped);
                    global_step += 1;
                    let loss_mean = step_losses.iter().sum::<f64>() / step_losses.len() as f64;
                    step_losses.clear();
                    first_loss.get_or_insert(loss_mean);
                    let lrs = self.scheduler.lrs(&self.base_lrs);
                    let report = StepReport {
                        step: global_step,
                        epoch: epoch + 1,
                        loss: loss_mean,
                        avg_loss: epoch_loss_sum / epoch_loss_n as f64,
                        lrs: self.group_names.iter().cloned().zip(lrs).collect(),
                        skipped,
                    };
                    self.log_step(&report);
                    observer.step(&report);
                    let state_now = TrainState {
                        current_epoch: epoch,
                        current_step: global_step,
                        batches_done_in_epoch: bi + 1,
                        seed: cfg.seed,
                    };
                    self.step_hooks(global_step, epoch, state_now, observer)?;
                    if global_step >= self.plan.max_train_steps {
                        last_epoch_loss = epoch_loss_sum / epoch_loss_n as f64;
                        epoch += 1;
                        self.epoch_end(epoch, global_step, observer)?;
                        break 'epochs;
                    }
                }
                if self.should_stop(sync) {
                    return Err(self.save_interrupted(global_step, epoch, bi + 1, sync)?);
                }
            }
            last_epoch_loss = epoch_loss_sum / epoch_loss_n.max(1) as f64;
            epoch += 1;
            self.epoch_end(epoch, global_step, observer)?;
        }
        // End of training (spec §11.2): state, then the final model.
        let name = cfg.output_name.clone().unwrap_or_else(|| "last".into());
        if cfg.save_state || cfg.save_state_on_train_end {
            let state = TrainState {
                current_epoch: epoch,
                current_step: global_step,
                batches_done_in_epoch: 0,
                seed: cfg.seed,
            };
            let dir = cfg.output_dir.join(format!("{name}-state"));
            self.save_state(&dir, state)?;
            observer.info(&format!("saved state {}", dir.display()));
        }
        let final_lora = cfg.output_dir.join(format!("{name}.safetensors"));
        self.save_lora(&final_lora, global_step, self.plan.num_epochs)?;
        observer.info(&format!("saved {}", final_lora.display()));
        Ok(TrainSummary {
            steps: global_step,
            epochs: epoch,
            final_lora,
            last_epoch_loss,
            first_loss,
            skipped_steps,
        })
    }

    // ----- data

    fn subset_caption_options(
        &self,
        dataset: usize,
        image: usize,
    ) -> &sd_data::caption::CaptionOptions {
        let ds = &self.scan.datasets[dataset];
        &ds.config.subsets[ds.images[image].subset].caption
    }

    /// Loads and encodes (or takes from the cache) one batch; processes its captions.
    fn prepare_batch(
        &mut self,
        plan: &EpochPlan,
        index: usize,
        epoch: u64,
        global_step: u64,
    ) -> Result<Option<Batch>> {
        let pb = &plan.batches[index];
        let ds = &self.scan.datasets[pb.dataset];
        let (samples, share) = self.shard(&pb.samples);
        if samples.is_empty() {
            return Ok(None);
        }
        let seeds: Vec<i64> = samples
            .iter()
            .map(|s| distributed::sample_draw_seed(s.seed, epoch))
            .collect();
        let scale = self.model.latent_scale();
        let mut captions = Vec::new();
        let mut loss_weights = Vec::new();
        let mut keys = Vec::new();
        let mut size_cond = Vec::new();
        let progress = CaptionProgress {
            epoch: (epoch + 1) as u32,
            step: global_step,
            max_train_steps: self.plan.max_train_steps,
        };
        for s in samples {
            let entry = &ds.images[s.image];
            let mut rng = DataRng::new(s.seed, 1);
            captions.push(process_caption(
                &entry.caption,
                self.subset_caption_options(pb.dataset, s.image),
                progress,
                &mut rng,
            ));
            loss_weights.push(ds.loss_weight(s.image));
            keys.push((pb.dataset, s.image));
        }
        let latents = if self.cfg.cache_latents {
            let mut parts = Vec::new();
            for s in samples {
                let c = &self.cache[&(pb.dataset, s.image)];
                // flip_aug with cached latents: the sample's own RNG decides, as the image path would.
                let flip = ds.prep_options(s.image).augment.flip_aug
                    && DataRng::new(s.seed, 2).uniform() < 0.5;
                let (lat, ctl) = match (&c.flipped, flip) {
                    (Some(f), true) => (f, c.crop_top_left_flipped),
                    _ => (&c.normal, c.crop_top_left),
                };
                parts.push(lat.shallow_clone());
                let (w0, h0) = c.original_size;
                size_cond.push([
                    f64::from(h0),
                    f64::from(w0),
                    f64::from(ctl.0),
                    f64::from(ctl.1),
                    f64::from(pb.bucket.height),
                    f64::from(pb.bucket.width),
                ]);
            }
            Tensor::stack(&parts, 0)
                .to_device(self.cfg.device)
                .to_kind(Kind::Float)
                * scale
        } else {
            let requests: Vec<LoadRequest> = samples
                .iter()
                .map(|s| LoadRequest {
                    path: ds.images[s.image].path.clone(),
                    assignment: ds.images[s.image].assignment,
                    options: ds.prep_options(s.image),
                    seed: s.seed,
                })
                .collect();
            let mut images = Vec::new();
            for r in load_parallel(&requests) {
                let img = r?;
                size_cond.push([
                    f64::from(img.original_size.height),
                    f64::from(img.original_size.width),
                    f64::from(img.crop_top_left.0),
                    f64::from(img.crop_top_left.1),
                    f64::from(img.bucket.height),
                    f64::from(img.bucket.width),
                ]);
                images.push(img);
            }
            let paths: Vec<&Path> = requests.iter().map(|r| r.path.as_path()).collect();
            self.encode_images(&images, &paths, Some(&seeds))?
                .to_kind(Kind::Float)
                * scale
        };
        Ok(Some(Batch {
            latents,
            captions,
            loss_weights,
            size_cond,
            keys,
            seeds,
            share,
        }))
    }

    /// VAE-encodes prepared images to unscaled latents `[B, 4, h, w]` (a random sample of
    /// the latent distribution, spec §5.1), in chunks of `--vae_batch_size`.
    /// `seeds` (one per image): draw each image's latent sample from its own seed.
    fn encode_images(
        &self,
        images: &[PreparedImage],
        paths: &[&Path],
        seeds: Option<&[i64]>,
    ) -> Result<Tensor> {
        let vae_kind = self.model.vae_vs.kind();
        let chunk = self.cfg.vae_batch_size.max(1);
        let mut out = Vec::new();
        for (ci, (imgs, names)) in images.chunks(chunk).zip(paths.chunks(chunk)).enumerate() {
            let pixels: Vec<Tensor> = imgs
                .iter()
                .map(|i| {
                    Tensor::from_slice(&i.data).view([3, i.shape[1] as i64, i.shape[2] as i64])
                })
                .collect();
            let x = Tensor::stack(&pixels, 0)
                .to_device(self.cfg.device)
                .to_kind(vae_kind);
            let lat = tch::no_grad(|| {
                let dist = self.model.vae.encode(&x);
                let eps = match seeds {
                    Some(s) => distributed::per_sample_randn(
                        &dist.mean,
                        &s[ci * chunk..(ci * chunk + imgs.len()).min(s.len())],
                    ),
                    None => dist.mean.randn_like(),
                };
                dist.sample_with(&eps)
            });
            let finite = lat.isfinite().all().int64_value(&[]) == 1;
            if !finite {
                return Err(TrainError::Invalid(format!(
                    "the VAE produced NaN/Inf latents for {} (a half-precision VAE overflowing? try --no_half_vae)",
                    names
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            out.push(lat);
        }
        Ok(Tensor::cat(&out, 0))
    }

    /// `--cache_latents` (spec §5.2): every image prepared without random augmentation and
    /// encoded once (and flipped with flip_aug), stored unscaled on the CPU; `--cache_latents_to_disk`
    /// keeps them in `<image>_<W>x<H>_sd.npz` beside the image and reuses valid files.
    fn cache_all_latents(&mut self, observer: &mut dyn TrainObserver) -> Result<()> {
        let mut count = 0usize;
        let mut index = 0u64;
        for (di, ds) in self.scan.datasets.iter().enumerate() {
            for (ii, entry) in ds.images.iter().enumerate() {
                // Each rank caches its share; the draws of an image follow its global index.
                index += 1;
                if !self.owns(index - 1) {
                    continue;
                }
                tch::manual_seed(mix_seed(self.cfg.seed, u64::MAX, index - 1));
                let mut opts = ds.prep_options(ii);
                let flip_aug = opts.augment.flip_aug;
                opts.augment.flip_aug = false;
                opts.augment.color_aug = false;
                opts.augment.random_crop = false;
                let disk = self
                    .cfg
                    .cache_latents_to_disk
                    .then(|| super::latent_cache::cache_path(&entry.path, entry.size))
                    .map(|p| {
                        if self.model.family == ModelFamily::Sdxl {
                            super::sdxl::latent_cache_path(p)
                        } else {
                            p
                        }
                    });
                if let Some(path) = &disk
                    && let Some(c) =
                        super::latent_cache::read(path, entry.assignment.bucket, flip_aug)
                {
                    self.cache
                        .insert((di, ii), c.into_cached(&entry.assignment));
                    count += 1;
                    continue;
                }
                let req = LoadRequest {
                    path: entry.path.clone(),
                    assignment: entry.assignment,
                    options: opts,
                    seed: 0,
                };
                let img = load_parallel(std::slice::from_ref(&req)).remove(0)?;
                let normal = self
                    .encode_images(std::slice::from_ref(&img), &[entry.path.as_path()], None)?
                    .squeeze_dim(0)
                    .to_kind(Kind::Float)
                    .to_device(Device::Cpu);
                let flipped = if flip_aug {
                    let mut f = img.clone();
                    flip_chw(&mut f);
                    Some(
                        self.encode_images(
                            std::slice::from_ref(&f),
                            &[entry.path.as_path()],
                            None,
                        )?
                        .squeeze_dim(0)
                        .to_kind(Kind::Float)
                        .to_device(Device::Cpu),
                    )
                } else {
                    None
                };
                let crop_ltrb = img.crop_ltrb;
                let cached = CachedLatents {
                    normal,
                    flipped,
                    original_size: (img.original_size.width, img.original_size.height),
                    crop_top_left: crop_ltrb.crop_top_left(img.bucket.width, false),
                    crop_top_left_flipped: crop_ltrb.crop_top_left(img.bucket.width, true),
                };
                if let Some(path) = &disk {
                    super::latent_cache::write(
                        path,
                        &cached.normal,
                        cached.flipped.as_ref(),
                        cached.original_size,
                        crop_ltrb,
                    )?;
                }
                self.cache.insert((di, ii), cached);
                count += 1;
            }
        }
        self.share_cached_latents()?;
        observer.info(&format!("cached latents of {count} images"));
        Ok(())
    }

    // ----- the step

    fn text_conditioning(&self, captions: &[String]) -> Result<Tensor> {
        let slot = &self.model.text_encoders[0];
        let mut ids = Vec::new();
        let mut n_chunks = 1;
        for c in captions {
            let chunks = slot
                .tokenizer
                .tokenize_chunks(c, self.cfg.max_token_length)?;
            n_chunks = chunks.len();
            for ch in chunks {
                ids.extend(ch);
            }
        }
        let ids = Tensor::from_slice(&ids)
            .view([-1, 77])
            .to_device(self.cfg.device);
        let layer = match self.cfg.clip_skip {
            Some(k) if k > 1 => OutputLayer::ClipSkip(k),
            _ => OutputLayer::Last,
        };
        let encode = || {
            let out = slot.model.forward(&ids);
            let states = out.select(layer, &slot.model);
            join_chunks(&states, n_chunks as i64)
        };
        Ok(if self.cfg.train_text_encoder {
            encode()
        } else {
            tch::no_grad(encode)
        })
    }

    /// Noise, timesteps, U-Net, loss and backward for one micro-batch; returns its loss.
    fn forward_backward(&mut self, batch: &Batch, accumulation: u64) -> Result<f64> {
        let cfg = self.cfg;
        let latents = &batch.latents;
        let (b, _, _, _) = latents
            .size4()
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let device = latents.device();
        // 1.–2. noise and timesteps, drawn sample by sample from each sample's seed (so they
        // do not depend on the batch or the world size; distributed.rs)
        let (noise, timesteps, input_noise) = self.draw_per_sample(latents, &batch.seeds);
        let noisy = self.noise.add_noise(latents, &input_noise, &timesteps);
        // 3. conditioning and U-Net
        let unet_kind = self.model.unet_vs.kind();
        let (context, added) = if self.model.family == ModelFamily::Sdxl {
            // SDXL (spec §4.3, §6.5): both encoders (or their cached outputs), pooled + size ids.
            let out = match &self.te_cache {
                Some(cache) => cache.batch(&batch.keys, device)?,
                None => {
                    let captions: Vec<&str> = batch.captions.iter().map(String::as_str).collect();
                    let encode = || {
                        super::sdxl::encode_captions(
                            &self.model,
                            &captions,
                            cfg.max_token_length,
                            device,
                        )
                    };
                    if cfg.train_text_encoder {
                        encode()?
                    } else {
                        tch::no_grad(encode)?
                    }
                }
            };
            let added =
                super::sdxl::added_condition(&out.pool2, &batch.size_cond, unet_kind, device);
            (out.context(), Some(added))
        } else {
            (self.text_conditioning(&batch.captions)?, None)
        };
        let pred = self
            .model
            .unet
            .forward(
                &noisy.to_kind(unet_kind),
                &timesteps,
                &context.to_kind(unet_kind),
                added.as_ref(),
            )
            .to_kind(Kind::Float);
        // 4. target
        let prediction = if cfg.v_parameterization {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        };
        let target = match prediction {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => self.noise.velocity(latents, &noise, &timesteps),
        };
        // 5. loss (spec §6.6)
        let elementwise = match cfg.loss_type {
            LossType::L2 => (&pred - &target).square(),
            LossType::L1 => (&pred - &target).abs(),
            LossType::Huber | LossType::SmoothL1 => {
                let c = self.huber_c(&timesteps).view([b, 1, 1, 1]);
                let d2 = (&pred - &target).square();
                let core = (d2 + c.square()).sqrt() - &c;
                if cfg.loss_type == LossType::Huber {
                    core * c * 2.0
                } else {
                    core * 2.0
                }
            }
        };
        let mut per_sample = elementwise.mean_dim([1i64, 2, 3].as_slice(), false, Kind::Float);
        let weights = Tensor::from_slice(&batch.loss_weights)
            .to_kind(Kind::Float)
            .to_device(device);
        per_sample *= weights;
        let snr = self
            .noise
            .snr()
            .to_device(device)
            .index_select(0, &timesteps)
            .to_kind(Kind::Float);
        if let Some(gamma) = cfg.min_snr_gamma {
            let min = snr.clamp_max(gamma);
            per_sample *= match prediction {
                PredictionType::Epsilon => &min / &snr,
                PredictionType::VPrediction => &min / (&snr + 1.0),
            };
        }
        let s = snr.clamp_max(1000.0);
        if cfg.scale_v_pred_loss_like_noise_pred {
            per_sample *= &s / (&s + 1.0);
        }
        if let Some(w) = cfg.v_pred_like_loss {
            let scale = &s / (&s + 1.0);
            per_sample = &per_sample + &per_sample / scale * w;
        }
        if cfg.debiased_estimation_loss {
            per_sample *= match prediction {
                PredictionType::Epsilon => s.rsqrt(),
                PredictionType::VPrediction => (s + 1.0).reciprocal(),
            };
        }
        let loss = per_sample.mean(Kind::Float);
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(TrainError::Invalid(format!(
                "the loss became {value} (diverged); lower the learning rate or use --max_grad_norm"
            )));
        }
        // 6. backward on loss / G
        // With a process group the loss counts by this rank's share of the global batch.
        let scaled = &loss * batch.share / accumulation as f64;
        match &self.scaler {
            Some(s) => s.scale_loss(&scaled).backward(),
            None => scaled.backward(),
        }
        Ok(value * batch.share)
    }

    /// Noise, timesteps and input noise of one sample (`latents` `[1, C, h, w]`), drawn from
    /// libtorch's global generator (seeded by the caller). Returns
    /// `(noise, timesteps [1] i64, input noise)`.
    fn draw_noise(&self, latents: &Tensor) -> (Tensor, Tensor, Tensor) {
        let cfg = self.cfg;
        let size = latents.size();
        let (b, c) = (size[0], size[1]);
        let device = latents.device();
        // 1. noise (spec §6.2)
        let mut noise = latents.randn_like();
        if cfg.noise_offset > 0.0 {
            let mut offset = cfg.noise_offset;
            if cfg.noise_offset_random_strength {
                offset *= Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]);
            }
            let per = Tensor::randn([b, c, 1, 1], (Kind::Float, device));
            let scale = match cfg.adaptive_noise_scale {
                Some(a) => (latents
                    .mean_dim([2i64, 3].as_slice(), true, Kind::Float)
                    .abs()
                    * a
                    + offset)
                    .clamp_min(0.0),
                None => Tensor::full([1], offset, (Kind::Float, device)),
            };
            noise += per * scale;
        }
        if cfg.multires_noise_iterations > 0 {
            noise = multires_noise(
                &noise,
                cfg.multires_noise_iterations,
                cfg.multires_noise_discount,
            );
        }
        // 2. timesteps
        let (min_t, max_t) = (cfg.min_timestep, cfg.max_timestep);
        let timesteps = if min_t >= max_t {
            Tensor::full([b], max_t, (Kind::Int64, device))
        } else {
            Tensor::randint_low(min_t, max_t, [b], (Kind::Int64, device))
        };
        let input_noise = match cfg.ip_noise_gamma {
            Some(gamma) => {
                let gamma = if cfg.ip_noise_gamma_random_strength {
                    Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]) * gamma
                } else {
                    gamma
                };
                &noise + latents.randn_like() * gamma
            }
            None => noise.shallow_clone(),
        };
        (noise, timesteps, input_noise)
    }

    fn huber_c(&self, timesteps: &Tensor) -> Tensor {
        let cfg = self.cfg;
        match cfg.huber_schedule {
            HuberSchedule::Constant => Tensor::full(
                timesteps.size(),
                cfg.huber_c * cfg.huber_scale,
                (Kind::Float, timesteps.device()),
            ),
            HuberSchedule::Exponential => {
                let alpha = -cfg.huber_c.ln() / 1000.0;
                (timesteps.to_kind(Kind::Float) * -alpha).exp() * cfg.huber_scale
            }
            HuberSchedule::Snr => {
                let ac = self
                    .noise
                    .alphas_cumprod()
                    .to_device(timesteps.device())
                    .index_select(0, timesteps)
                    .to_kind(Kind::Float);
                let sigma = ((ac.ones_like() - &ac) / &ac).sqrt();
                (sigma + 1.0).square().reciprocal() * (1.0 - cfg.huber_c) + cfg.huber_c
            }
        }
    }

    /// Clip, optimiser step, scheduler step, zero grads (spec §6.7). Returns whether the step
    /// was skipped for non-finite fp16 gradients.
    fn optimizer_step(&mut self) -> Result<bool> {
        let params: Vec<Tensor> = self
            .optimizer
            .groups()
            .iter()
            .flat_map(|g| g.params.iter().map(Tensor::shallow_clone))
            .collect();
        let found_inf = match &mut self.scaler {
            Some(s) => s.unscale(params.iter()),
            None => false,
        };
        if !found_inf {
            if self.cfg.max_grad_norm > 0.0 {
                clip_grad_norm(params.iter(), self.cfg.max_grad_norm);
            }
            let lrs = self.scheduler.lrs(&self.base_lrs);
            self.optimizer.step(&lrs)?;
            self.scheduler.step();
        }
        if let Some(s) = &mut self.scaler {
            s.update(found_inf);
        }
        self.optimizer.zero_grad();
        Ok(found_inf)
    }

    // ----- hooks, saving, state

    fn step_hooks(
        &mut self,
        step: u64,
        epoch: u64,
        state: TrainState,
        observer: &mut dyn TrainObserver,
    ) -> Result<()> {
        let cfg = self.cfg;
        if cfg.sample_every_n_epochs.is_none()
            && cfg
                .sample_every_n_steps
                .is_some_and(|n| n > 0 && step.is_multiple_of(n))
        {
            self.sample(step, None, observer);
        }
        if let Some(n) = cfg.save_every_n_steps.filter(|&n| n > 0)
            && step.is_multiple_of(n)
        {
            let name = cfg.output_name.clone().unwrap_or_else(|| "at".into());
            let path = cfg
                .output_dir
                .join(format!("{name}-step{step:08}.safetensors"));
            self.save_lora(&path, step, epoch)?;
            observer.info(&format!("saved {}", path.display()));
            if cfg.save_state {
                let dir = cfg.output_dir.join(format!("{name}-step{step:08}-state"));
                self.save_state(&dir, state)?;
            }
            if let Some(k) = cfg.save_last_n_steps {
                let rm = step as i64 - k as i64 - 1;
                let rm = rm - rm.rem_euclid(n as i64);
                if rm >= 0 {
                    let old = cfg
                        .output_dir
                        .join(format!("{name}-step{rm:08}.safetensors"));
                    let _ = std::fs::remove_file(old);
                    if rm > 0 {
                        let _ = std::fs::remove_dir_all(
                            cfg.output_dir.join(format!("{name}-step{rm:08}-state")),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    fn epoch_end(&mut self, epoch: u64, step: u64, observer: &mut dyn TrainObserver) -> Result<()> {
        let cfg = self.cfg;
        if let Some(n) = cfg.save_every_n_epochs.filter(|&n| n > 0)
            && epoch.is_multiple_of(n)
            && epoch < self.plan.num_epochs
        {
            let name = cfg.output_name.clone().unwrap_or_else(|| "epoch".into());
            let path = cfg
                .output_dir
                .join(format!("{name}-{epoch:06}.safetensors"));
            self.save_lora(&path, step, epoch)?;
            observer.info(&format!("saved {}", path.display()));
            if cfg.save_state {
                let state = TrainState {
                    current_epoch: epoch,
                    current_step: step,
                    batches_done_in_epoch: 0,
                    seed: cfg.seed,
                };
                self.save_state(
                    &cfg.output_dir.join(format!("{name}-{epoch:06}-state")),
                    state,
                )?;
            }
            if let Some(k) = cfg.save_last_n_epochs {
                let old = epoch as i64 - (n * k) as i64;
                if old > 0 {
                    let _ = std::fs::remove_file(
                        cfg.output_dir.join(format!("{name}-{old:06}.safetensors")),
                    );
                    let _ = std::fs::remove_dir_all(
                        cfg.output_dir.join(format!("{name}-{old:06}-state")),
                    );
                }
            }
        }
        if cfg
            .sample_every_n_epochs
            .is_some_and(|n| n > 0 && epoch.is_multiple_of(n))
        {
            self.sample(step, Some(epoch), observer);
        }
        Ok(())
    }

    /// Sampling hook: dropouts off, no gradients. The micro-batch RNG is re-seeded before every
    /// batch, so samples never change the training run.
    fn sample(&self, step: u64, epoch_end: Option<u64>, observer: &mut dyn TrainObserver) {
        if !self.is_main() {
            return;
        }
        self.network.set_train(false);
        tch::no_grad(|| observer.sample(&self.model, step, epoch_end));
        self.network.set_train(true);
    }

    fn save_interrupted(
        &mut self,
        step: u64,
        epoch: u64,
        batches_done: u64,
        at_sync: bool,
    ) -> Result<TrainError> {
        // Gradients of an unfinished accumulation group are discarded: the state resumes at
        // the group's first micro-batch.
        let g = self.cfg.gradient_accumulation_steps.max(1);
        let batches_done = if at_sync {
            batches_done
        } else {
            batches_done - (batches_done % g).max(1).min(batches_done)
        };
        self.optimizer.zero_grad();
        let name = self
            .cfg
            .output_name
            .clone()
            .unwrap_or_else(|| "last".into());
        let lora = self
            .cfg
            .output_dir
            .join(format!("{name}-interrupted.safetensors"));
        self.save_lora(&lora, step, epoch + 1)?;
        let state_dir = self
            .cfg
            .output_dir
            .join(format!("{name}-interrupted-state"));
        self.save_state(
            &state_dir,
            TrainState {
                current_epoch: epoch,
                current_step: step,
                batches_done_in_epoch: batches_done,
                seed: self.cfg.seed,
            },
        )?;
        Ok(TrainError::Interrupted {
            step,
            lora,
            state: state_dir,
        })
    }

    fn metadata(&self, step: u64, epoch: u64) -> BTreeMap<String, String> {
        let cfg = self.cfg;
        let family = self.model.family;
        let mut m = BTreeMap::new();
        let dim = if cfg.network_dim_given {
            PyValue::Int(cfg.network.network_dim as i64)
        } else {
            PyValue::None
        };
        let alpha = if cfg.network_alpha_given {
            PyValue::Float(f64::from(cfg.network.network_alpha))
        } else {
            PyValue::Int(cfg.network.network_alpha as i64)
        };
        let mut put = |k: &str, v: String| {
            m.insert(k.to_owned(), v);
        };
        put("ss_network_module", cfg.network_module.clone());
        put("ss_network_dim", dim.py_str());
        put("ss_network_alpha", alpha.py_str());
        put("ss_v2", PyValue::Bool(family == ModelFamily::Sd2).py_str());
        put(
            "ss_base_model_version",
            sd_formats::metadata::base_model_version(family, cfg.v_parameterization).into(),
        );
        if !cfg.network_args.is_empty() {
            let mut args: Vec<(PyValue, PyValue)> = cfg
                .network_args
                .iter()
                .map(|(k, v)| (PyValue::Str(k.clone()), PyValue::Str(v.clone())))
                .collect();
            if !cfg.network_args.iter().any(|(k, _)| k == "dropout") {
                args.push((
                    PyValue::Str("dropout".into()),
                    cfg.dropouts.dropout.map_or(PyValue::None, PyValue::Float),
                ));
            }
            put("ss_network_args", PyValue::Dict(args).json_dumps());
        }
        if cfg.no_metadata {
            return m;
        }
        let f = |x: f64| py_float_repr(x);
        let opt_f = |x: Option<f64>| x.map_or_else(|| "None".to_owned(), py_float_repr);
        let b = |x: bool| PyValue::Bool(x).py_str();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let images: u64 = self.scan.datasets.iter().map(|d| d.num_train_images).sum();
        let reg: u64 = self.scan.datasets.iter().map(|d| d.num_reg_images).sum();
        put("ss_session_id", self.session_id.to_string());
        put("ss_training_started_at", f(self.started_at));
        put("ss_training_finished_at", f(now));
        put(
            "ss_output_name",
            cfg.output_name.clone().unwrap_or_else(|| "None".into()),
        );
        put("ss_learning_rate", f(cfg.learning_rate));
        put("ss_text_encoder_lr", opt_f(cfg.text_encoder_lr));
        put("ss_unet_lr", opt_f(cfg.unet_lr));
        put("ss_num_train_images", images.to_string());
        put("ss_num_validation_images", "0".into());
        put("ss_num_reg_images", reg.to_string());
        put(
            "ss_num_batches_per_epoch",
            self.plan.batches_per_epoch.to_string(),
        );
        put("ss_num_epochs", self.plan.num_epochs.to_string());
        put("ss_gradient_checkpointing", b(cfg.gradient_checkpointing));
        put(
            "ss_gradient_accumulation_steps",
            cfg.gradient_accumulation_steps.to_string(),
        );
        put("ss_max_train_steps", self.plan.max_train_steps.to_string());
        put(
            "ss_lr_warmup_steps",
            self.scheduler.warmup_steps().to_string(),
        );
        put("ss_lr_scheduler", cfg.scheduler.kind.to_string());
        put("ss_network_dropout", opt_f(cfg.dropouts.dropout));
        put("ss_mixed_precision", cfg.mixed_precision.name().into());
        put(
            "ss_full_fp16",
            b(cfg.full_half && cfg.mixed_precision == MixedPrecision::Fp16),
        );
        put(
            "ss_clip_skip",
            cfg.clip_skip
                .map_or_else(|| "None".into(), |c| c.to_string()),
        );
        put(
            "ss_max_token_length",
            cfg.max_token_length
                .map_or_else(|| "None".into(), |c| c.to_string()),
        );
        put("ss_cache_latents", b(cfg.cache_latents));
        put("ss_seed", cfg.seed.to_string());
        put("ss_lowram", b(cfg.lowram));
        put(
            "ss_noise_offset",
            if cfg.noise_offset > 0.0 {
                f(cfg.noise_offset)
            } else {
                "None".into()
            },
        );
        put(
            "ss_multires_noise_iterations",
            if cfg.multires_noise_iterations > 0 {
                cfg.multires_noise_iterations.to_string()
            } else {
                "None".into()
            },
        );
        put("ss_multires_noise_discount", f(cfg.multires_noise_discount));
        put("ss_adaptive_noise_scale", opt_f(cfg.adaptive_noise_scale));
        put("ss_zero_terminal_snr", b(cfg.zero_terminal_snr));
        put(
            "ss_training_comment",
            cfg.training_comment
                .clone()
                .unwrap_or_else(|| "None".into()),
        );
        put(
            "ss_sd_scripts_commit_hash",
            sd_formats::metadata::implementation_version(),
        );
        put("ss_optimizer", self.optimizer.metadata_name());
        put("ss_max_grad_norm", f(cfg.max_grad_norm));
        put("ss_min_snr_gamma", opt_f(cfg.min_snr_gamma));
        put("ss_scale_weight_norms", "None".into());
        put("ss_ip_noise_gamma", opt_f(cfg.ip_noise_gamma));
        put("ss_debiased_estimation", b(cfg.debiased_estimation_loss));
        put(
            "ss_noise_offset_random_strength",
            b(cfg.noise_offset_random_strength),
        );
        put(
            "ss_ip_noise_gamma_random_strength",
            b(cfg.ip_noise_gamma_random_strength),
        );
        put(
            "ss_loss_type",
            match cfg.loss_type {
                LossType::L2 => "l2",
                LossType::L1 => "l1",
                LossType::Huber => "huber",
                LossType::SmoothL1 => "smooth_l1",
            }
            .into(),
        );
        put(
            "ss_huber_schedule",
            match cfg.huber_schedule {
                HuberSchedule::Constant => "constant",
                HuberSchedule::Exponential => "exponential",
                HuberSchedule::Snr => "snr",
            }
            .into(),
        );
        put("ss_huber_scale", f(cfg.huber_scale));
        put("ss_huber_c", f(cfg.huber_c));
        put("ss_fp8_base", b(false));
        put("ss_fp8_base_unet", b(false));
        put("ss_steps", step.to_string());
        put("ss_epoch", epoch.to_string());
        if cfg.model.exists() {
            put(
                "ss_sd_model_name",
                cfg.model
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            );
            if cfg.model.is_file()
                && let Ok((legacy, full)) = sd_formats::hashes::file_hashes(&cfg.model)
            {
                put("ss_sd_model_hash", legacy);
                put("ss_new_sd_model_hash", full);
            }
        }
        for (k, v) in &cfg.dataset_metadata {
            m.insert(k.clone(), v.clone());
        }
        m
    }

    fn save_lora(&self, path: &Path, step: u64, epoch: u64) -> Result<()> {
        if !self.is_main() {
            return Ok(());
        }
        let cfg = self.cfg;
        let weights = self.network.to_weights();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let title = cfg
            .metadata_extra
            .get("title")
            .cloned()
            .or_else(|| cfg.output_name.clone())
            .unwrap_or_else(|| format!("LoRA@{}", py_float_repr(self.started_at)));
        let mut extra: BTreeMap<String, String> = cfg
            .metadata_extra
            .iter()
            .filter(|(k, _)| k.as_str() != "title")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if let Some(c) = cfg.clip_skip {
            extra.insert("encoder_layer".into(), c.to_string());
        }
        if cfg.min_timestep != 0 || cfg.max_timestep != 1000 {
            extra.insert(
                "timestep_range".into(),
                format!("{},{}", cfg.min_timestep, cfg.max_timestep),
            );
        }
        let opts = SaveOptions {
            dtype: cfg.save_precision,
            metadata: self.metadata(step, epoch),
            modelspec: Some(ModelSpecInput {
                family: self.model.family,
                v_parameterization: cfg.v_parameterization,
                lora: true,
                title,
                resolution: cfg.resolution,
                date: iso_date_utc(now),
                extra,
            }),
            ..Default::default()
        };
        weights.save(path, &opts)?;
        Ok(())
    }

    fn save_state(&self, dir: &Path, state: TrainState) -> Result<()> {
        if !self.is_main() {
            return Ok(());
        }
        // Written into a temporary sibling folder, then renamed: an interrupted save never
        // leaves a partial state under the final name.
        let parent = dir.parent().unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".state-")
            .tempdir_in(parent)
            .map_err(io_err(parent))?;
        self.network.to_weights().save(
            tmp.path().join("network.safetensors"),
            &SaveOptions::default(),
        )?;
        let mut named: Vec<(String, Tensor)> = Vec::new();
        named.extend(
            self.optimizer
                .state_tensors()
                .into_iter()
                .map(|(k, t)| (format!("optimizer.{k}"), t)),
        );
        named.extend(
            self.scheduler
                .state_tensors()
                .into_iter()
                .map(|(k, t)| (format!("scheduler.{k}"), t)),
        );
        if let Some(s) = &self.scaler {
            named.extend(
                s.state_tensors()
                    .into_iter()
                    .map(|(k, t)| (format!("scaler.{k}"), t)),
            );
        }
        super::state_file::write(&tmp.path().join("optimizer.safetensors"), &named)?;
        let json =
            serde_json::to_string_pretty(&state).map_err(|e| TrainError::Invalid(e.to_string()))?;
        let state_path = tmp.path().join("train_state.json");
        std::fs::write(&state_path, json).map_err(io_err(&state_path))?;
        // Swapped in whole: `dir` always names a complete state (state_file::replace_dir).
        let kept = tmp.keep();
        super::state_file::replace_dir(&kept, dir).map_err(io_err(dir))?;
        Ok(())
    }

    fn load_state(&mut self, dir: &Path) -> Result<TrainState> {
        let state_path = dir.join("train_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(io_err(&state_path))?;
        let state: TrainState = serde_json::from_str(&text)
            .map_err(|e| TrainError::Invalid(format!("{}: {e}", state_path.display())))?;
        if state.seed != self.cfg.seed {
            return Err(TrainError::Invalid(format!(
                "{}: the state was saved by a run with --seed {}, this run has --seed {}: use the same seed to resume",
                state_path.display(),
                state.seed,
                self.cfg.seed
            )));
        }
        let weights = LoraWeights::load(dir.join("network.safetensors"), &Default::default())?;
        let loaded = self.network.load_module_weights(&weights)?;
        if loaded != self.network.len() {
            return Err(TrainError::Invalid(format!(
                "{}: the state holds {loaded} of the network's {} modules: the network options differ from the saved run",
                dir.display(),
                self.network.len()
            )));
        }
        let named = super::state_file::read(&dir.join("optimizer.safetensors"), self.cfg.device)?;
        let part = |prefix: &str| -> Vec<(String, Tensor)> {
            named
                .iter()
                .filter_map(|(k, t)| {
                    k.strip_prefix(prefix)
                        .map(|k| (k.to_owned(), t.shallow_clone()))
                })
                .collect()
        };
        self.optimizer.load_state_tensors(&part("optimizer."))?;
        self.scheduler.load_state_tensors(&part("scheduler."))?;
        if let Some(s) = &mut self.scaler {
            s.load_state_tensors(&part("scaler."))?;
        }
        Ok(state)
    }

    fn log_step(&mut self, report: &StepReport) {
        if let Some(f) = &mut self.log
            && let Ok(line) = serde_json::to_string(report)
        {
            use std::io::Write;
            let _ = writeln!(f, "{line}");
        }
        if let Some(tb) = &mut self.tensorboard {
            // Tags of spec §12.4: lr/<group name> gives lr/textencoder and lr/unet.
            let lr_tags: Vec<String> = report.lrs.iter().map(|(n, _)| format!("lr/{n}")).collect();
            let mut scalars = vec![
                ("loss/current", report.loss as f32),
                ("loss/average", report.avg_loss as f32),
            ];
            scalars.extend(
                lr_tags
                    .iter()
                    .zip(&report.lrs)
                    .map(|(t, (_, lr))| (t.as_str(), *lr as f32)),
            );
            let wall = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            if let Err(e) = tb.add_scalars(report.step as i64, wall, &scalars) {
                tracing::warn!("{}: {e}", tb.path().display());
            }
        }
    }
}

/// Flips a prepared image horizontally in place (CHW layout).
fn flip_chw(img: &mut PreparedImage) {
    let [c, h, w] = img.shape;
    for ch in 0..c {
        for y in 0..h {
            let row = &mut img.data[(ch * h + y) * w..(ch * h + y + 1) * w];
            row.reverse();
        }
    }
}

/// Multi-resolution noise (spec §6.2 step 3).
fn multires_noise(noise: &Tensor, iterations: u32, discount: f64) -> Tensor {
    let (b, c, h, w) = noise.size4().expect("latent noise is 4-D");
    let mut out = noise.shallow_clone();
    for i in 0..iterations {
        let r = Tensor::rand([1], (Kind::Float, Device::Cpu)).double_value(&[0]) * 2.0 + 2.0;
        let hp = ((h as f64 / r.powi(i as i32)) as i64).max(1);
        let wp = ((w as f64 / r.powi(i as i32)) as i64).max(1);
        let small = Tensor::randn([b, c, hp, wp], (Kind::Float, noise.device()));
        out += small.upsample_bilinear2d([h, w], false, None, None) * discount.powi(i as i32);
        if hp == 1 || wp == 1 {
            break;
        }
    }
    let std = out.std(true);
    out / std
}
