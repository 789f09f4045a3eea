//! From validated [`TrainOptions`] to a training run: dataset scan (every problem reported
//! before the model loads), `--debug_dataset`, the library configuration, progress, Ctrl-C.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use indicatif::ProgressBar;
use sd_core::lora::blockwise::{BlockArgs, BlockwiseOptions};
use sd_core::lora::{Dropouts, NetworkOptions as LoraNetworkOptions};
use sd_core::train::trainer::{
    self, HuberSchedule, LossType, MixedPrecision, StepReport, TrainConfig, TrainError,
    TrainObserver,
};
use sd_core::train::{OptimizerConfig, SchedulerConfig, StepsSpec};
use sd_data::caption::CaptionProgress;
use sd_data::dataset::{DatasetScan, ScanOptions, scan_datasets};
use sd_data::dataset_plan::plan_epoch;
use sd_data::debug_listing::debug_listing;
use sd_formats::dtype::Dtype;
use sd_formats::metadata::{PyValue, py_float_repr};
use serde_json::json;

use crate::options::{self, NetworkKind, SavePrecision, TrainOptions};

/// Scans the datasets, then trains (or lists one epoch with `--debug_dataset`).
///
/// # Errors
/// Dataset problems (all listed together), model/LoRA loading, training errors.
pub fn run(
    launch: &crate::distributed::Launch,
    options: &TrainOptions,
    datasets: &sd_data::config::DatasetGroupConfig,
    json_listing: bool,
    verbosity: &sd_cli::Verbosity,
) -> anyhow::Result<ExitCode> {
    let base_dir = std::env::current_dir().context("reading the working folder")?;
    let mut scan = scan_datasets(
        datasets,
        &ScanOptions {
            base_dir,
            verify_decode: !options.dataset.debug_dataset,
        },
    )
    .context("checking the dataset")?;
    for w in &scan.warnings {
        tracing::warn!("{}: {}", w.path.display(), w.reason);
    }
    let images: u64 = scan.datasets.iter().map(|d| d.num_train_images).sum();
    tracing::info!(
        "dataset: {} training images (with repeats), {} batches per epoch",
        images,
        scan.num_batches()
    );
    if scan.num_batches() == 0 {
        anyhow::bail!(
            "the dataset has no images to train on (check image_dir / --train_data_dir and num_repeats)"
        );
    }
    if options.dataset.debug_dataset {
        let plan = plan_epoch(&scan, options.optimization.seed, 1);
        let progress = CaptionProgress {
            epoch: 1,
            step: 0,
            max_train_steps: options.optimization.max_train_steps,
        };
        let listing = debug_listing(&scan, &plan, progress);
        #[allow(clippy::print_stdout)]
        if json_listing {
            println!("{}", serde_json::to_string_pretty(&listing)?);
        } else {
            print!("{}", listing.to_text());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = train_config(options, &scan)?;
    // Data-parallel worker: process group, device, global batch (docs/distributed.md).
    let group = crate::distributed::join(launch, &mut cfg, &mut scan)?;
    // The prompt file is checked now, not at the first sample (spec training.md §12.1).
    let sampling = match &options.sampling.sample_prompts {
        Some(path) => {
            let prompts = sd_core::generate::read_sample_prompts(path)
                .with_context(|| format!("--sample_prompts {}", path.display()))?;
            let sampler: sd_core::generate::SamplerKind = options
                .sampling
                .sampler
                .parse()
                .map_err(|e| anyhow::anyhow!("--sample_sampler: {e}"))?;
            // Per-prompt samplers and step counts (e.g. pndm needs 4 steps) fail now too.
            sd_core::generate::check_sample_prompts(&prompts, sampler)
                .with_context(|| format!("--sample_prompts {}", path.display()))?;
            tracing::info!("{} sample prompt(s) from {}", prompts.len(), path.display());
            Some(Sampling {
                prompts,
                sampler,
                out_dir: options.output.output_dir.join("sample"),
                output_name: options.output.output_name.clone(),
                clip_skip: cfg.clip_skip,
                zero_terminal_snr: cfg.zero_terminal_snr,
            })
        }
        None => {
            if cfg.sample_at_first
                || cfg.sample_every_n_steps.is_some()
                || cfg.sample_every_n_epochs.is_some()
            {
                tracing::warn!(
                    "sampling cadence given without --sample_prompts: no samples are made"
                );
            }
            None
        }
    };
    let interrupt = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupt.clone();
        // A second Ctrl-C while saving ends the process at once.
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(i32::from(sd_cli::EXIT_INTERRUPTED));
            }
        });
    }
    let mut observer = Progress {
        bar: None,
        verbosity: verbosity.clone(),
        sampling,
    };
    let mut worker = crate::distributed::Worker {
        rank: launch.rank(),
    };
    let reporter: &mut dyn TrainObserver = if launch.rank() == 0 {
        &mut observer
    } else {
        &mut worker
    };
    match trainer::train_distributed(&cfg, &scan, reporter, interrupt, group.as_ref()) {
        Ok(summary) => {
            if let Some(bar) = &observer.bar {
                bar.finish_and_clear();
            }
            tracing::info!(
                "done: {} steps, {} epochs, last epoch mean loss {:.6}{}; LoRA: {}",
                summary.steps,
                summary.epochs,
                summary.last_epoch_loss,
                if summary.skipped_steps > 0 {
                    format!(
                        " ({} steps skipped for fp16 overflow)",
                        summary.skipped_steps
                    )
                } else {
                    String::new()
                },
                summary.final_lora.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(TrainError::Interrupted { step, lora, state }) => {
            if let Some(bar) = &observer.bar {
                bar.abandon();
            }
            tracing::warn!(
                "interrupted at step {step}: saved {} and {} (continue with --resume {})",
                lora.display(),
                state.display(),
                state.display()
            );
            Ok(ExitCode::from(sd_cli::EXIT_INTERRUPTED))
        }
        Err(e) => Err(e.into()),
    }
}

/// Progress bar, log lines and sample images for a run.
struct Progress {
    bar: Option<ProgressBar>,
    verbosity: sd_cli::Verbosity,
    sampling: Option<Sampling>,
}

/// What `--sample_prompts` asks for.
struct Sampling {
    prompts: Vec<sd_core::generate::SamplePrompt>,
    sampler: sd_core::generate::SamplerKind,
    out_dir: std::path::PathBuf,
    output_name: Option<String>,
    clip_skip: Option<usize>,
    zero_terminal_snr: bool,
}

impl TrainObserver for Progress {
    fn start(&mut self, total: u64, start: u64) {
        let bar = sd_cli::progress_bar(total, "steps", &self.verbosity);
        bar.set_position(start);
        self.bar = Some(bar);
    }

    fn step(&mut self, r: &StepReport) {
        let lr = r.lrs.first().map_or(0.0, |(_, lr)| *lr);
        match &self.bar {
            Some(bar) if !bar.is_hidden() => {
                bar.set_position(r.step);
                bar.set_message(format!(
                    "epoch {} loss {:.4} avr_loss {:.4} lr {:.2e}",
                    r.epoch, r.loss, r.avg_loss, lr
                ));
            }
            _ => tracing::info!(
                "step {} epoch {} loss {:.6} avr_loss {:.6} lr {:.3e}",
                r.step,
                r.epoch,
                r.loss,
                r.avg_loss,
                lr
            ),
        }
    }

    fn sample(
        &mut self,
        model: &sd_core::loader::StableDiffusion,
        step: u64,
        epoch_end: Option<u64>,
    ) {
        let Some(s) = &self.sampling else { return };
        let opts = sd_core::generate::SampleOptions {
            sampler: s.sampler,
            out_dir: &s.out_dir,
            output_name: s.output_name.as_deref(),
            epoch: epoch_end.map(|e| e as usize),
            step: step as usize,
            clip_skip: s.clip_skip,
            zero_terminal_snr: s.zero_terminal_snr,
        };
        let result = sd_core::generate::sample_images(model, &s.prompts, &opts);
        let report = |m: String| match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{m}")),
            None => tracing::info!("{m}"),
        };
        match result {
            Ok(files) => report(format!(
                "wrote {} sample image(s) to {}",
                files.len(),
                s.out_dir.display()
            )),
            // A failed sample must not end hours of training: warn and go on.
            Err(e) => report(format!("sampling failed (training continues): {e}")),
        }
    }

    fn info(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{message}")),
            None => tracing::info!("{message}"),
        }
    }
}

fn dtype_of(p: SavePrecision) -> Dtype {
    match p {
        SavePrecision::Float => Dtype::F32,
        SavePrecision::Fp16 => Dtype::F16,
        SavePrecision::Bf16 => Dtype::BF16,
    }
}

/// The library configuration of a run.
fn train_config(o: &TrainOptions, scan: &DatasetScan) -> anyhow::Result<TrainConfig> {
    let a = &o.network.args;
    let blockwise = BlockwiseOptions {
        ranks: BlockArgs {
            block_dims: a
                .block_dims
                .as_ref()
                .map(|v| v.iter().map(|&d| d as usize).collect()),
            block_alphas: a
                .block_alphas
                .as_ref()
                .map(|v| v.iter().map(|&x| x as f32).collect()),
            conv_block_dims: a
                .conv_block_dims
                .as_ref()
                .map(|v| v.iter().map(|&d| d as usize).collect()),
            conv_block_alphas: a
                .conv_block_alphas
                .as_ref()
                .map(|v| v.iter().map(|&x| x as f32).collect()),
        },
        down_lr_weight: a.down_lr_weight.clone(),
        mid_lr_weight: a.mid_lr_weight.clone(),
        up_lr_weight: a.up_lr_weight.clone(),
        block_lr_zero_threshold: a.block_lr_zero_threshold,
    };
    let dylora = o.network.kind == NetworkKind::Dylora;
    if dylora && !blockwise.is_empty() {
        anyhow::bail!(
            "networks.dylora has no block-wise options (block_dims, *_lr_weight) in sd-scripts; use networks.lora"
        );
    }
    if dylora && (a.rank_dropout.is_some() || a.module_dropout.is_some()) {
        anyhow::bail!("networks.dylora has no rank_dropout/module_dropout (as in sd-scripts)");
    }
    let blockwise_refused = [
        ("loraplus_lr_ratio", a.loraplus_lr_ratio.is_some()),
        ("loraplus_unet_lr_ratio", a.loraplus_unet_lr_ratio.is_some()),
        (
            "loraplus_text_encoder_lr_ratio",
            a.loraplus_text_encoder_lr_ratio.is_some(),
        ),
    ];
    let refused: Vec<&str> = blockwise_refused
        .iter()
        .filter(|(_, given)| *given)
        .map(|(k, _)| *k)
        .collect();
    if !refused.is_empty() {
        anyhow::bail!(
            "--network_args {} not implemented yet (LoRA+ learning-rate ratios)",
            refused.join(", ")
        );
    }
    if o.model.vae.is_some() {
        anyhow::bail!("--vae is not supported yet: the model's own VAE is used");
    }
    let opt = &o.optimization;
    let optimizer =
        OptimizerConfig::from_cli(Some(&opt.optimizer_type), &opt.optimizer_args, false, false)?;
    let scheduler = SchedulerConfig {
        kind: opt
            .lr_scheduler
            .parse()
            .map_err(|e: sd_core::train::OptimError| anyhow::anyhow!("--lr_scheduler: {e}"))?,
        warmup: StepsSpec::parse("--lr_warmup_steps", &opt.lr_warmup_steps)?,
        decay: StepsSpec::parse("--lr_decay_steps", &opt.lr_decay_steps)?,
        num_cycles: opt.lr_scheduler_num_cycles,
        power: opt.lr_scheduler_power,
        timescale: opt.lr_scheduler_timescale,
        min_lr_ratio: opt.lr_scheduler_min_lr_ratio,
        learning_rate: opt.learning_rate,
        max_train_steps: opt.max_train_steps,
        num_processes: 1,
    };
    let net = &o.network;
    let d = &o.diffusion;
    let dylora_unit = dylora.then(|| net.args.unit.unwrap_or(1) as usize);
    let network_options = LoraNetworkOptions {
        network_dim: net.dim as usize,
        network_alpha: net.alpha as f32,
        conv_dim: net.args.conv_dim.map(|c| c as usize),
        // DyLoRA's 3×3 modules use network_alpha (conv_alpha is ignored, spec §7).
        conv_alpha: if dylora {
            net.args.conv_dim.map(|_| net.alpha as f32)
        } else {
            net.args
                .conv_alpha
                .map(|a| a as f32)
                .or(net.args.conv_dim.map(|_| 1.0))
        },
    };
    let family = match o.model.family {
        options::Family::Sd1 => sd_formats::family::ModelFamily::Sd1,
        options::Family::Sd2 => sd_formats::family::ModelFamily::Sd2,
        options::Family::Sdxl => sd_formats::family::ModelFamily::Sdxl,
    };
    // Checked before any model is loaded: list lengths, presets, numbers.
    blockwise
        .resolve(family, &network_options)
        .context("--network_args")?;
    let mut metadata_extra = BTreeMap::new();
    let m = &o.output.metadata;
    for (k, v) in [
        ("title", &m.title),
        ("author", &m.author),
        ("description", &m.description),
        ("license", &m.license),
        ("tags", &m.tags),
        ("usage_hint", &m.usage_hint),
        ("thumbnail", &m.thumbnail),
        ("merged_from", &m.merged_from),
        ("trigger_phrase", &m.trigger_phrase),
        ("preprocessor", &m.preprocessor),
        ("is_negative_embedding", &m.is_negative_embedding),
    ] {
        if let Some(v) = v {
            metadata_extra.insert(k.to_owned(), v.clone());
        }
    }
    let resolution = scan.datasets.first().map(|d| {
        (
            d.config.buckets.resolution.width,
            d.config.buckets.resolution.height,
        )
    });
    Ok(TrainConfig {
        model: o.model.pretrained_model_name_or_path.clone(),
        model_config_dir: None,
        v2: o.model.family == options::Family::Sd2,
        v_parameterization: o.model.v_parameterization,
        sdxl: o.model.family == options::Family::Sdxl,
        device: tch::Device::cuda_if_available(),
        mixed_precision: match opt.mixed_precision {
            options::MixedPrecision::No => MixedPrecision::No,
            options::MixedPrecision::Fp16 => MixedPrecision::Fp16,
            options::MixedPrecision::Bf16 => MixedPrecision::Bf16,
        },
        no_half_vae: o.model.no_half_vae,
        gradient_checkpointing: opt.gradient_checkpointing,
        full_half: opt.full_fp16 || opt.full_bf16,
        lowram: o.model.lowram,
        network_module: net.module.clone(),
        network: network_options,
        dylora_unit,
        blockwise,
        network_dim_given: true,
        network_alpha_given: (net.alpha - 1.0).abs() > f64::EPSILON,
        dropouts: Dropouts {
            dropout: net.dropout,
            rank_dropout: net.args.rank_dropout,
            module_dropout: net.args.module_dropout,
        },
        network_args: net
            .args_map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                )
            })
            .collect(),
        network_weights: net.network_weights.clone(),
        train_unet: net.train_unet,
        train_text_encoder: net.train_text_encoder,
        optimizer,
        learning_rate: opt.learning_rate,
        unet_lr: opt.unet_lr,
        text_encoder_lr: opt.text_encoder_lr,
        scheduler,
        max_grad_norm: opt.max_grad_norm,
        gradient_accumulation_steps: u64::from(opt.gradient_accumulation_steps),
        max_train_steps: opt.max_train_steps,
        max_train_epochs: opt.max_train_epochs,
        seed: opt.seed,
        clip_skip: opt.clip_skip.map(|c| c as usize),
        max_token_length: o.dataset.max_token_length.map(|m| m as usize),
        noise_offset: d.noise_offset.unwrap_or(0.0),
        noise_offset_random_strength: d.noise_offset_random_strength,
        adaptive_noise_scale: d.adaptive_noise_scale,
        multires_noise_iterations: d.multires_noise_iterations.unwrap_or(0),
        multires_noise_discount: d.multires_noise_discount,
        ip_noise_gamma: d.ip_noise_gamma,
        ip_noise_gamma_random_strength: d.ip_noise_gamma_random_strength,
        min_timestep: i64::from(d.min_timestep),
        max_timestep: i64::from(d.max_timestep),
        zero_terminal_snr: d.zero_terminal_snr,
        loss_type: match d.loss_type {
            options::LossType::L2 => LossType::L2,
            options::LossType::L1 => LossType::L1,
            options::LossType::Huber => LossType::Huber,
            options::LossType::SmoothL1 => LossType::SmoothL1,
        },
        huber_schedule: match d.huber_schedule {
            options::HuberSchedule::Constant => HuberSchedule::Constant,
            options::HuberSchedule::Exponential => HuberSchedule::Exponential,
            options::HuberSchedule::Snr => HuberSchedule::Snr,
        },
        huber_c: d.huber_c,
        huber_scale: d.huber_scale,
        min_snr_gamma: d.min_snr_gamma,
        scale_v_pred_loss_like_noise_pred: d.scale_v_pred_loss_like_noise_pred,
        v_pred_like_loss: d.v_pred_like_loss,
        debiased_estimation_loss: d.debiased_estimation_loss,
        cache_latents: o.dataset.cache_latents,
        cache_latents_to_disk: o.dataset.cache_latents_to_disk,
        vae_batch_size: o.dataset.vae_batch_size.max(1) as usize,
        cache_text_encoder_outputs: o.dataset.cache_text_encoder_outputs,
        cache_text_encoder_outputs_to_disk: o.dataset.cache_text_encoder_outputs_to_disk,
        output_dir: o.output.output_dir.clone(),
        output_name: o.output.output_name.clone(),
        save_precision: o.output.save_precision.map(dtype_of),
        save_every_n_epochs: o.output.save_every_n_epochs,
        save_every_n_steps: o.output.save_every_n_steps,
        save_last_n_epochs: o.output.save_last_n_epochs,
        save_last_n_steps: o.output.save_last_n_steps,
        save_state: o.output.save_state,
        save_state_on_train_end: o.output.save_state_on_train_end,
        resume: o.output.resume.clone(),
        no_metadata: o.output.no_metadata,
        training_comment: net.training_comment.clone(),
        metadata_extra,
        logging_dir: o.logging.logging_dir.clone(),
        dataset_metadata: dataset_metadata(o, scan),
        resolution,
        sample_every_n_steps: o.sampling.every_n_steps,
        sample_every_n_epochs: o.sampling.every_n_epochs,
        sample_at_first: o.sampling.at_first,
    })
}

/// `ss_tag_frequency`, `ss_dataset_dirs`, `ss_bucket_info` and `ss_datasets` / the legacy
/// per-run dataset keys (spec training.md §11.3).
fn dataset_metadata(o: &TrainOptions, scan: &DatasetScan) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut tag_frequency = serde_json::Map::new();
    let mut dataset_dirs = serde_json::Map::new();
    let mut datasets_json = Vec::new();
    for ds in &scan.datasets {
        let mut subsets_json = Vec::new();
        for (si, subset) in ds.config.subsets.iter().enumerate() {
            let dir = subset.image_dir.as_ref().or(subset.metadata_file.as_ref());
            let name = dir.and_then(|p| p.file_name()).map_or_else(
                || format!("subset{si}"),
                |n| n.to_string_lossy().into_owned(),
            );
            let entries: Vec<_> = ds.images.iter().filter(|e| e.subset == si).collect();
            let mut tags: BTreeMap<String, u64> = BTreeMap::new();
            for e in &entries {
                for t in e.caption.split(',') {
                    let t = t.trim().to_lowercase();
                    if !t.is_empty() {
                        *tags.entry(t).or_default() += 1;
                    }
                }
            }
            let mut key = name.clone();
            let mut n = 2;
            while dataset_dirs.contains_key(&key) {
                key = format!("{name} ({n})");
                n += 1;
            }
            tag_frequency.insert(key.clone(), json!(tags));
            dataset_dirs.insert(
                key,
                json!({"n_repeats": subset.num_repeats, "img_count": entries.len()}),
            );
            subsets_json.push(json!({
                "img_count": entries.len(),
                "num_repeats": subset.num_repeats,
                "color_aug": subset.augment.color_aug,
                "flip_aug": subset.augment.flip_aug,
                "random_crop": subset.augment.random_crop,
                "shuffle_caption": subset.caption.shuffle_caption,
                "keep_tokens": subset.caption.keep_tokens,
                "image_dir": name,
                "class_tokens": subset.class_tokens,
                "is_reg": subset.is_reg,
            }));
        }
        let mut buckets = serde_json::Map::new();
        for (i, b) in ds.buckets.iter().enumerate() {
            buckets.insert(i.to_string(), json!({"resolution": [b.resolution.width, b.resolution.height], "count": b.images.len()}));
        }
        let bucket_info = json!({"buckets": buckets, "mean_img_ar_error": ds.mean_ar_error});
        let r = ds.config.buckets.resolution;
        datasets_json.push(json!({
            "is_dreambooth": ds.config.kind == sd_data::config::DatasetKind::DreamBooth,
            "batch_size_per_device": ds.config.batch_size,
            "num_train_images": ds.num_train_images,
            "num_reg_images": ds.num_reg_images,
            "resolution": [r.width, r.height],
            "enable_bucket": ds.config.buckets.enable_bucket,
            "min_bucket_reso": ds.config.buckets.min_bucket_reso,
            "max_bucket_reso": ds.config.buckets.max_bucket_reso,
            "bucket_info": bucket_info,
            "subsets": subsets_json,
        }));
        if o.dataset.dataset_config.is_none() {
            out.insert("ss_bucket_info".into(), bucket_info.to_string());
            out.insert(
                "ss_resolution".into(),
                format!("({}, {})", r.width, r.height),
            );
            out.insert(
                "ss_batch_size_per_device".into(),
                ds.config.batch_size.to_string(),
            );
            out.insert(
                "ss_total_batch_size".into(),
                (u64::from(ds.config.batch_size)
                    * u64::from(o.optimization.gradient_accumulation_steps))
                .to_string(),
            );
            out.insert(
                "ss_enable_bucket".into(),
                PyValue::Bool(ds.config.buckets.enable_bucket).py_str(),
            );
            out.insert(
                "ss_bucket_no_upscale".into(),
                PyValue::Bool(ds.config.buckets.bucket_no_upscale).py_str(),
            );
            out.insert(
                "ss_min_bucket_reso".into(),
                ds.config.buckets.min_bucket_reso.to_string(),
            );
            out.insert(
                "ss_max_bucket_reso".into(),
                ds.config.buckets.max_bucket_reso.to_string(),
            );
        }
    }
    if o.dataset.dataset_config.is_some() {
        out.insert(
            "ss_datasets".into(),
            serde_json::Value::Array(datasets_json).to_string(),
        );
    }
    out.insert(
        "ss_tag_frequency".into(),
        serde_json::Value::Object(tag_frequency).to_string(),
    );
    out.insert(
        "ss_dataset_dirs".into(),
        serde_json::Value::Object(dataset_dirs).to_string(),
    );
    out.insert(
        "ss_prior_loss_weight".into(),
        py_float_repr(
            scan.datasets
                .first()
                .map_or(1.0, |d| d.config.prior_loss_weight),
        ),
    );
    let first = scan.datasets.first().and_then(|d| d.config.subsets.first());
    if let Some(s) = first {
        out.insert(
            "ss_caption_dropout_rate".into(),
            py_float_repr(s.caption.caption_dropout_rate),
        );
        out.insert(
            "ss_caption_dropout_every_n_epochs".into(),
            s.caption.caption_dropout_every_n_epochs.to_string(),
        );
        out.insert(
            "ss_caption_tag_dropout_rate".into(),
            py_float_repr(s.caption.caption_tag_dropout_rate),
        );
    }
    out.insert("ss_face_crop_aug_range".into(), "None".into());
    out
}
