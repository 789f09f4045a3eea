//! Which sd-scripts `train_network.py` / `sdxl_train_network.py` options this port
//! implements, as one table ([`OPTIONS`]). The same table hides options from `--help`
//! ([`crate::args::command`]), produces the "has no effect" warnings and "unsupported"
//! errors at start-up ([`check`]), and is rendered in docs/train-network.md.
//!
//! Rules (STYLE.md §5): an option whose result would be identical is accepted with a
//! warning; one whose result would differ is refused; nothing is silently ignored.

use std::collections::BTreeSet;

use crate::args::Args;

/// How this port treats one sd-scripts option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    /// Implemented by the option layer itself (parsing, config files, validation).
    Implemented,
    /// Accepted; the result is the same without it, so it only warns.
    NoEffect,
    /// Refused: the result would differ from sd-scripts'.
    Unsupported,
    /// Depends on the value; [`check`] decides (see the note).
    ByValue,
}

impl Support {
    /// The word used in docs/train-network.md.
    #[cfg(test)]
    pub fn label(self) -> &'static str {
        match self {
            Support::Implemented => "implemented",
            Support::NoEffect => "no effect",
            Support::Unsupported => "unsupported",
            Support::ByValue => "by value",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy)]
pub struct Compat {
    /// The sd-scripts option name without dashes (also the clap id and config-file key).
    pub option: &'static str,
    /// How it is treated.
    pub support: Support,
    /// Why, or what to use instead (shown in warnings and errors).
    pub note: &'static str,
}

const fn c(option: &'static str, support: Support, note: &'static str) -> Compat {
    Compat {
        option,
        support,
        note,
    }
}

use Support::{ByValue, Implemented, NoEffect, Unsupported};

/// Every sd-scripts option accepted by `train-network` (spec training.md §13 and the
/// reference's parser), in the order of docs/train-network.md.
pub const OPTIONS: &[Compat] = &[
    // Model
    c(
        "pretrained_model_name_or_path",
        Implemented,
        "a local file or Diffusers folder; hub ids are refused (no downloads)",
    ),
    c("v2", Implemented, ""),
    c("v_parameterization", Implemented, ""),
    c(
        "vae",
        Unsupported,
        "not implemented yet: the model's own VAE is used",
    ),
    c("no_half_vae", Implemented, ""),
    c(
        "tokenizer_cache_dir",
        NoEffect,
        "tokenizers are read from the model; nothing is downloaded or cached",
    ),
    c(
        "lowram",
        NoEffect,
        "models are always loaded straight to the device; recorded as ss_lowram",
    ),
    c(
        "highvram",
        NoEffect,
        "only changes when the GPU cache is emptied",
    ),
    c(
        "fp8_base",
        Unsupported,
        "float8 base weights are not implemented; use --mixed_precision fp16/bf16",
    ),
    c(
        "fp8_base_unet",
        Unsupported,
        "float8 base weights are not implemented; use --mixed_precision fp16/bf16",
    ),
    c(
        "disable_mmap_load_safetensors",
        NoEffect,
        "only changes how safetensors files are read",
    ),
    // Dataset
    c(
        "dataset_config",
        Implemented,
        "read and checked by the dataset library (docs/dataset.md)",
    ),
    c("train_data_dir", Implemented, "dataset library"),
    c("reg_data_dir", Implemented, "dataset library"),
    c("in_json", Implemented, "dataset library"),
    c("dataset_repeats", Implemented, "dataset library"),
    c("resolution", Implemented, "dataset library"),
    c("enable_bucket", Implemented, "dataset library"),
    c("min_bucket_reso", Implemented, "dataset library"),
    c("max_bucket_reso", Implemented, "dataset library"),
    c("bucket_reso_steps", Implemented, "dataset library"),
    c("bucket_no_upscale", Implemented, "dataset library"),
    c("resize_interpolation", Implemented, "dataset library"),
    c("caption_extension", Implemented, "dataset library"),
    c(
        "caption_extention",
        Implemented,
        "misspelled alias; wins when given",
    ),
    c("shuffle_caption", Implemented, "dataset library"),
    c("caption_separator", Implemented, "dataset library"),
    c("keep_tokens", Implemented, "dataset library"),
    c("keep_tokens_separator", Implemented, "dataset library"),
    c("secondary_separator", Implemented, "dataset library"),
    c("enable_wildcard", Implemented, "dataset library"),
    c("caption_prefix", Implemented, "dataset library"),
    c("caption_suffix", Implemented, "dataset library"),
    c("color_aug", Implemented, "dataset library"),
    c("flip_aug", Implemented, "dataset library"),
    c("random_crop", Implemented, "dataset library"),
    c(
        "face_crop_aug_range",
        Unsupported,
        "face detection is not implemented",
    ),
    c("token_warmup_min", Implemented, "dataset library"),
    c("token_warmup_step", Implemented, "dataset library"),
    c("caption_dropout_rate", Implemented, "dataset library"),
    c(
        "caption_dropout_every_n_epochs",
        Implemented,
        "dataset library",
    ),
    c("caption_tag_dropout_rate", Implemented, "dataset library"),
    c("prior_loss_weight", Implemented, ""),
    c(
        "alpha_mask",
        Unsupported,
        "masked loss is not implemented yet",
    ),
    c(
        "masked_loss",
        Unsupported,
        "masked loss is not implemented yet",
    ),
    c(
        "conditioning_data_dir",
        NoEffect,
        "read only by sd-scripts' ControlNet trainers; set conditioning_data_dir in the dataset config",
    ),
    c("cache_info", Implemented, "dataset library"),
    c(
        "max_token_length",
        Implemented,
        "75 is accepted as the default",
    ),
    c(
        "weighted_captions",
        Unsupported,
        "caption weighting is not implemented yet",
    ),
    c("debug_dataset", Implemented, ""),
    c(
        "dataset_class",
        Unsupported,
        "Python dataset classes cannot be loaded; use --dataset_config",
    ),
    c("validation_split", Implemented, "dataset library"),
    c("validation_seed", Implemented, "dataset library"),
    c(
        "validate_every_n_steps",
        Unsupported,
        "validation is not implemented yet",
    ),
    c(
        "validate_every_n_epochs",
        Unsupported,
        "validation is not implemented yet",
    ),
    c(
        "max_validation_steps",
        Unsupported,
        "validation is not implemented yet",
    ),
    // Caching
    c("cache_latents", Implemented, ""),
    c(
        "cache_latents_to_disk",
        Implemented,
        "implies --cache_latents",
    ),
    c("vae_batch_size", Implemented, ""),
    c(
        "skip_cache_check",
        NoEffect,
        "cache files are always validated (cheap); the result is the same",
    ),
    c(
        "cache_text_encoder_outputs",
        Implemented,
        "SDXL with --network_train_unet_only; the raw caption is encoded once per image",
    ),
    c(
        "cache_text_encoder_outputs_to_disk",
        Implemented,
        "implies --cache_text_encoder_outputs; <image>_te_outputs.npz, sizes checked",
    ),
    // Network
    c(
        "network_module",
        Implemented,
        "networks.lora and networks.dylora (unit, conv_dim = network_dim; per-forward rank slice, see docs/lora.md)",
    ),
    c("network_dim", Implemented, ""),
    c("network_alpha", Implemented, ""),
    c("network_dropout", Implemented, ""),
    c(
        "network_args",
        Implemented,
        "conv_dim, conv_alpha, rank_dropout, module_dropout, unit (DyLoRA), block_dims/block_alphas/conv_block_dims/conv_block_alphas, down/mid/up_lr_weight, block_lr_zero_threshold; LoRA+ keys are refused; unknown keys are an error",
    ),
    c(
        "network_weights",
        Implemented,
        "names and shapes must match; an alpha that differs from --network_alpha is refused (the reference keeps the old scale)",
    ),
    c("dim_from_weights", Unsupported, "not implemented yet"),
    c("network_train_unet_only", Implemented, ""),
    c("network_train_text_encoder_only", Implemented, ""),
    c("base_weights", Unsupported, "not implemented yet"),
    c(
        "base_weights_multiplier",
        Unsupported,
        "not implemented yet",
    ),
    c("scale_weight_norms", Unsupported, "not implemented yet"),
    c("training_comment", Implemented, ""),
    // Optimisation
    c("learning_rate", Implemented, ""),
    c("unet_lr", Implemented, ""),
    c(
        "text_encoder_lr",
        Implemented,
        "only the first value is used, as in networks.lora",
    ),
    c(
        "optimizer_type",
        Implemented,
        "checked here; D-Adaptation, Prodigy, schedule-free and Python classes are refused",
    ),
    c("optimizer_args", Implemented, "checked here"),
    c("use_8bit_adam", Implemented, "= --optimizer_type AdamW8bit"),
    c("use_lion_optimizer", Implemented, "= --optimizer_type Lion"),
    c("max_grad_norm", Implemented, ""),
    c(
        "lr_scheduler",
        Implemented,
        "checked here; piecewise_constant is refused",
    ),
    c("lr_warmup_steps", Implemented, ""),
    c("lr_decay_steps", Implemented, ""),
    c("lr_scheduler_num_cycles", Implemented, ""),
    c("lr_scheduler_power", Implemented, ""),
    c("lr_scheduler_timescale", Implemented, ""),
    c("lr_scheduler_min_lr_ratio", Implemented, ""),
    c(
        "lr_scheduler_type",
        Unsupported,
        "custom torch.optim.lr_scheduler classes cannot be loaded; use --lr_scheduler",
    ),
    c(
        "lr_scheduler_args",
        Unsupported,
        "arguments of --lr_scheduler_type, which is unsupported",
    ),
    c("train_batch_size", Implemented, ""),
    c("gradient_accumulation_steps", Implemented, ""),
    c("max_train_steps", Implemented, ""),
    c("max_train_epochs", Implemented, ""),
    c("seed", Implemented, "drawn from [0, 2^32-1] when unset"),
    c("mixed_precision", Implemented, ""),
    c(
        "full_fp16",
        Implemented,
        "LoRA weights and gradients in fp16 (needs --mixed_precision fp16); f32 optimiser state",
    ),
    c(
        "full_bf16",
        Implemented,
        "LoRA weights and gradients in bf16 (needs --mixed_precision bf16); f32 optimiser state",
    ),
    c(
        "gradient_checkpointing",
        Implemented,
        "U-Net blocks (and trained text-encoder layers) recomputed in backward; same gradients",
    ),
    c(
        "mem_eff_attn",
        NoEffect,
        "attention always uses libtorch SDPA, numerically the same",
    ),
    c(
        "xformers",
        NoEffect,
        "attention always uses libtorch SDPA, numerically the same",
    ),
    c("sdpa", NoEffect, "attention always uses libtorch SDPA"),
    c("clip_skip", Implemented, ""),
    c(
        "max_data_loader_n_workers",
        NoEffect,
        "images are decoded on the rayon thread pool (all cores)",
    ),
    c(
        "persistent_data_loader_workers",
        NoEffect,
        "only changes the time between epochs",
    ),
    c(
        "fused_backward_pass",
        NoEffect,
        "unused by sd-scripts' network trainers",
    ),
    c(
        "cpu_offload_checkpointing",
        NoEffect,
        "only changes memory use",
    ),
    c("torch_compile", NoEffect, "only changes speed"),
    c("dynamo_backend", NoEffect, "only used with --torch_compile"),
    c(
        "ddp_timeout",
        Implemented,
        "minutes a collective or the rendezvous may wait (default 30); see docs/distributed.md",
    ),
    c(
        "ddp_gradient_as_bucket_view",
        NoEffect,
        "LoRA gradients are always all-reduced in one flat bucket",
    ),
    c(
        "ddp_static_graph",
        NoEffect,
        "a DDP speed hint; LoRA gradients are all-reduced by hand",
    ),
    c("deepspeed", Unsupported, "DeepSpeed is not available"),
    c(
        "zero_stage",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    c(
        "offload_optimizer_device",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    c(
        "offload_optimizer_nvme_path",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    c(
        "offload_param_device",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    c(
        "offload_param_nvme_path",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    c(
        "zero3_init_flag",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    c(
        "zero3_save_16bit_model",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    c(
        "fp16_master_weights_and_gradients",
        NoEffect,
        "DeepSpeed option; DeepSpeed is not available",
    ),
    // Diffusion
    c("noise_offset", Implemented, ""),
    c("noise_offset_random_strength", Implemented, ""),
    c("adaptive_noise_scale", Implemented, ""),
    c("multires_noise_iterations", Implemented, ""),
    c("multires_noise_discount", Implemented, ""),
    c("ip_noise_gamma", Implemented, ""),
    c("ip_noise_gamma_random_strength", Implemented, ""),
    c("zero_terminal_snr", Implemented, ""),
    c("min_timestep", Implemented, ""),
    c("max_timestep", Implemented, ""),
    c("loss_type", Implemented, ""),
    c("huber_schedule", Implemented, ""),
    c("huber_c", Implemented, ""),
    c("huber_scale", Implemented, ""),
    c("min_snr_gamma", Implemented, ""),
    c("scale_v_pred_loss_like_noise_pred", Implemented, ""),
    c("v_pred_like_loss", Implemented, ""),
    c("debiased_estimation_loss", Implemented, ""),
    // Output
    c("output_dir", Implemented, ""),
    c("output_name", Implemented, ""),
    c(
        "save_model_as",
        ByValue,
        "safetensors is planned; ckpt and pt (pickled torch files) are unsupported",
    ),
    c("save_precision", Implemented, ""),
    c("save_every_n_epochs", Implemented, ""),
    c("save_every_n_steps", Implemented, ""),
    c("save_n_epoch_ratio", Unsupported, "not implemented yet"),
    c("save_last_n_epochs", Implemented, ""),
    c(
        "save_last_n_epochs_state",
        Unsupported,
        "not implemented yet (states follow --save_last_n_epochs)",
    ),
    c("save_last_n_steps", Implemented, ""),
    c(
        "save_last_n_steps_state",
        Unsupported,
        "not implemented yet (states follow --save_last_n_steps)",
    ),
    c(
        "save_state",
        Implemented,
        "the state folder layout is this port's own, not Accelerate's",
    ),
    c("save_state_on_train_end", Implemented, ""),
    c(
        "resume",
        Implemented,
        "a state folder of this tool; resumes bitwise-exactly at the saved step",
    ),
    c(
        "initial_epoch",
        Unsupported,
        "not implemented yet; use --resume",
    ),
    c(
        "initial_step",
        Unsupported,
        "not implemented yet; use --resume",
    ),
    c(
        "skip_until_initial_step",
        Unsupported,
        "not implemented yet; --resume always continues exactly",
    ),
    c("no_metadata", Implemented, ""),
    c("metadata_title", Implemented, ""),
    c("metadata_author", Implemented, ""),
    c("metadata_description", Implemented, ""),
    c("metadata_license", Implemented, ""),
    c("metadata_tags", Implemented, ""),
    c("metadata_usage_hint", Implemented, ""),
    c("metadata_thumbnail", Implemented, ""),
    c("metadata_merged_from", Implemented, ""),
    c("metadata_trigger_phrase", Implemented, ""),
    c("metadata_preprocessor", Implemented, ""),
    c("metadata_is_negative_embedding", Implemented, ""),
    c(
        "huggingface_repo_id",
        Unsupported,
        "uploads are not implemented (no network access); upload the output yourself",
    ),
    c(
        "huggingface_repo_type",
        Unsupported,
        "uploads are not implemented",
    ),
    c(
        "huggingface_path_in_repo",
        Unsupported,
        "uploads are not implemented",
    ),
    c(
        "huggingface_token",
        Unsupported,
        "uploads are not implemented",
    ),
    c(
        "huggingface_repo_visibility",
        Unsupported,
        "uploads are not implemented",
    ),
    c(
        "save_state_to_huggingface",
        Unsupported,
        "uploads are not implemented",
    ),
    c(
        "resume_from_huggingface",
        Unsupported,
        "downloads are not implemented; pass a local --resume folder",
    ),
    c("async_upload", Unsupported, "uploads are not implemented"),
    // Sampling
    c(
        "sample_prompts",
        Implemented,
        ".txt, .toml or .json; checked when training starts; images in <output_dir>/sample",
    ),
    c("sample_every_n_steps", Implemented, ""),
    c("sample_every_n_epochs", Implemented, ""),
    c("sample_at_first", Implemented, ""),
    c("sample_sampler", Implemented, ""),
    // Logging
    c(
        "logging_dir",
        Implemented,
        "TensorBoard event files (loss/current, loss/average, lr/<group> per step) in <logging_dir>/<YYYYmmddHHMMSS>/network_train, and a JSONL log of every step (loss, lr per group)",
    ),
    c(
        "log_with",
        ByValue,
        "tensorboard (the default) is written; wandb and all are unsupported (no network access)",
    ),
    c("log_prefix", Unsupported, "not implemented yet"),
    c("log_tracker_name", Unsupported, "not implemented yet"),
    c(
        "log_tracker_config",
        Unsupported,
        "accelerate tracker configuration files are not read",
    ),
    c(
        "wandb_run_name",
        Unsupported,
        "wandb logging is not implemented",
    ),
    c(
        "wandb_api_key",
        NoEffect,
        "wandb logging is not implemented, so the key is never used",
    ),
    c("log_config", Unsupported, "not implemented yet"),
    c(
        "console_log_level",
        Implemented,
        "maps to the log level (RUST_LOG still wins)",
    ),
    c(
        "console_log_file",
        Unsupported,
        "logs go to stderr only; redirect it (2> train.log)",
    ),
    c(
        "console_log_simple",
        NoEffect,
        "console lines are always plain",
    ),
    // Config files
    c("config_file", Implemented, ""),
    c("output_config", Implemented, ""),
];

/// The row of `option` (snake_case, no dashes).
pub fn lookup(option: &str) -> Option<&'static Compat> {
    OPTIONS.iter().find(|c| c.option == option)
}

/// Applies the table to the options given explicitly (`given`, ids from
/// [`crate::args::Parsed::given`]): returns the "has no effect" warnings.
///
/// # Errors
/// One message listing every given option that is unsupported (with its reason), e.g.
/// `unsupported option --fp8_base: float8 base weights are not implemented; ...`.
pub fn check(args: &Args, given: &BTreeSet<String>) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let mut refused = Vec::new();
    for id in given {
        let Some(row) = lookup(id) else { continue };
        match row.support {
            Support::Implemented => {}
            Support::NoEffect => {
                warnings.push(format!("--{} has no effect: {}", row.option, row.note))
            }
            Support::Unsupported => {
                refused.push(format!("unsupported option --{}: {}", row.option, row.note))
            }
            Support::ByValue => {
                if let Some(msg) = by_value(args, row.option) {
                    refused.push(msg);
                }
            }
        }
    }
    if refused.is_empty() {
        Ok(warnings)
    } else {
        anyhow::bail!("{}", refused.join("; "))
    }
}

/// The refusal for a [`Support::ByValue`] option, if its value is unsupported.
fn by_value(args: &Args, option: &str) -> Option<String> {
    match option {
        "save_model_as" => match args.output.save_model_as.as_str() {
            "safetensors" => None,
            other => Some(format!(
                "unsupported option --save_model_as {other}: only safetensors is written (ckpt and pt are pickled torch files)"
            )),
        },
        "log_with" => match args.logging.log_with.as_deref() {
            None | Some("tensorboard") => None,
            Some(other) => Some(format!(
                "unsupported option --log_with {other}: wandb logging is not implemented (no network access); use tensorboard"
            )),
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{OWN_OPTIONS, command, parse_from};

    /// Every option named in spec training.md §13 (`--metadata_*` and `--huggingface_*`
    /// expanded to the reference's options).
    const SPEC_13: &[&str] = &[
        // Model
        "pretrained_model_name_or_path",
        "v2",
        "v_parameterization",
        "vae",
        "no_half_vae",
        "tokenizer_cache_dir",
        "lowram",
        "highvram",
        "fp8_base",
        "fp8_base_unet",
        "disable_mmap_load_safetensors",
        // Dataset
        "dataset_config",
        "train_data_dir",
        "reg_data_dir",
        "in_json",
        "dataset_repeats",
        "resolution",
        "enable_bucket",
        "min_bucket_reso",
        "max_bucket_reso",
        "bucket_reso_steps",
        "bucket_no_upscale",
        "resize_interpolation",
        "caption_extension",
        "shuffle_caption",
        "caption_separator",
        "keep_tokens",
        "keep_tokens_separator",
        "secondary_separator",
        "enable_wildcard",
        "caption_prefix",
        "caption_suffix",
        "color_aug",
        "flip_aug",
        "random_crop",
        "face_crop_aug_range",
        "token_warmup_min",
        "token_warmup_step",
        "caption_dropout_rate",
        "caption_dropout_every_n_epochs",
        "caption_tag_dropout_rate",
        "prior_loss_weight",
        "alpha_mask",
        "masked_loss",
        "cache_info",
        "max_token_length",
        "weighted_captions",
        "debug_dataset",
        "validation_split",
        "validation_seed",
        "validate_every_n_steps",
        "validate_every_n_epochs",
        "max_validation_steps",
        // Caching
        "cache_latents",
        "cache_latents_to_disk",
        "vae_batch_size",
        "skip_cache_check",
        "cache_text_encoder_outputs",
        "cache_text_encoder_outputs_to_disk",
        // Network
        "network_module",
        "network_dim",
        "network_alpha",
        "network_dropout",
        "network_args",
        "network_weights",
        "dim_from_weights",
        "network_train_unet_only",
        "network_train_text_encoder_only",
        "base_weights",
        "base_weights_multiplier",
        "scale_weight_norms",
        "training_comment",
        // Optimisation
        "learning_rate",
        "unet_lr",
        "text_encoder_lr",
        "optimizer_type",
        "optimizer_args",
        "use_8bit_adam",
        "use_lion_optimizer",
        "max_grad_norm",
        "lr_scheduler",
        "lr_warmup_steps",
        "lr_decay_steps",
        "lr_scheduler_num_cycles",
        "lr_scheduler_power",
        "lr_scheduler_timescale",
        "lr_scheduler_min_lr_ratio",
        "lr_scheduler_type",
        "lr_scheduler_args",
        "train_batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "max_train_epochs",
        "seed",
        "mixed_precision",
        "full_fp16",
        "full_bf16",
        "gradient_checkpointing",
        "mem_eff_attn",
        "xformers",
        "sdpa",
        "clip_skip",
        "max_data_loader_n_workers",
        "persistent_data_loader_workers",
        // Diffusion
        "noise_offset",
        "noise_offset_random_strength",
        "adaptive_noise_scale",
        "multires_noise_iterations",
        "multires_noise_discount",
        "ip_noise_gamma",
        "ip_noise_gamma_random_strength",
        "zero_terminal_snr",
        "min_timestep",
        "max_timestep",
        "loss_type",
        "huber_schedule",
        "huber_c",
        "huber_scale",
        "min_snr_gamma",
        "scale_v_pred_loss_like_noise_pred",
        "v_pred_like_loss",
        "debiased_estimation_loss",
        // Output
        "output_dir",
        "output_name",
        "save_model_as",
        "save_precision",
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_n_epoch_ratio",
        "save_last_n_epochs",
        "save_last_n_epochs_state",
        "save_last_n_steps",
        "save_last_n_steps_state",
        "save_state",
        "save_state_on_train_end",
        "resume",
        "initial_epoch",
        "initial_step",
        "skip_until_initial_step",
        "no_metadata",
        "metadata_title",
        "metadata_author",
        "metadata_description",
        "metadata_license",
        "metadata_tags",
        "metadata_usage_hint",
        "metadata_thumbnail",
        "metadata_merged_from",
        "metadata_trigger_phrase",
        "huggingface_repo_id",
        "huggingface_repo_type",
        "huggingface_path_in_repo",
        "huggingface_token",
        "huggingface_repo_visibility",
        // Sampling
        "sample_prompts",
        "sample_every_n_steps",
        "sample_every_n_epochs",
        "sample_at_first",
        "sample_sampler",
        // Logging
        "logging_dir",
        "log_with",
        "log_prefix",
        "log_tracker_name",
        "log_tracker_config",
        "wandb_run_name",
        "wandb_api_key",
        "log_config",
        "console_log_level",
        "console_log_file",
        "console_log_simple",
        // Config files
        "config_file",
        "output_config",
    ];

    #[test]
    fn every_spec_option_is_classified_and_accepted() {
        let cmd = command();
        for name in SPEC_13 {
            assert!(lookup(name).is_some(), "--{name} is not in compat::OPTIONS");
            let arg = cmd
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .unwrap_or_else(|| panic!("--{name} is not accepted by the parser"));
            assert_eq!(arg.get_id().as_str(), *name, "id of --{name}");
        }
    }

    #[test]
    fn table_and_parser_agree() {
        let cmd = command();
        let mut seen = BTreeSet::new();
        for row in OPTIONS {
            assert!(seen.insert(row.option), "--{} listed twice", row.option);
            assert!(
                cmd.get_arguments()
                    .any(|a| a.get_long() == Some(row.option)),
                "--{} is in the table but not accepted",
                row.option
            );
            if matches!(row.support, Support::NoEffect | Support::Unsupported) {
                assert!(!row.note.is_empty(), "--{} needs a reason", row.option);
            }
        }
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            assert!(
                lookup(long).is_some() || OWN_OPTIONS.contains(&long),
                "--{long} is accepted but not classified"
            );
        }
    }

    #[test]
    fn docs_table_matches() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/train-network.md");
        let text = std::fs::read_to_string(path).expect("docs/train-network.md exists");
        let rows: Vec<(String, String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("| `--"))
            .filter_map(|l| {
                let (name, rest) = l.split_once("` | ")?;
                let (status, note) = rest.trim_end_matches(" |").split_once(" | ")?;
                Some((name.to_owned(), status.to_owned(), note.trim().to_owned()))
            })
            .collect();
        let expected: Vec<(String, String, String)> = OPTIONS
            .iter()
            .map(|c| {
                (
                    c.option.to_owned(),
                    c.support.label().to_owned(),
                    c.note.to_owned(),
                )
            })
            .collect();
        assert_eq!(
            rows, expected,
            "docs/train-network.md table differs from compat::OPTIONS"
        );
    }

    fn check_line(extra: &[&str]) -> anyhow::Result<Vec<String>> {
        let mut argv = vec!["train-network"];
        argv.extend_from_slice(extra);
        let p = parse_from(argv).expect("parses");
        check(&p.args, &p.given)
    }

    #[test]
    fn unsupported_options_are_refused_by_name() {
        for (line, needle) in [
            (vec!["--fp8_base"], "unsupported option --fp8_base"),
            (
                vec!["--log_with", "wandb"],
                "unsupported option --log_with wandb",
            ),
            (
                vec!["--huggingface_repo_id", "me/x"],
                "unsupported option --huggingface_repo_id",
            ),
            (
                vec!["--save_model_as", "ckpt"],
                "unsupported option --save_model_as ckpt",
            ),
            (vec!["--deepspeed"], "unsupported option --deepspeed"),
            (
                vec!["--face_crop_aug_range", "2.0,4.0"],
                "unsupported option --face_crop_aug_range",
            ),
        ] {
            let err = check_line(&line).unwrap_err().to_string();
            assert!(err.contains(needle), "{line:?}: {err}");
        }
        // All refusals are reported together.
        let err = check_line(&["--fp8_base", "--async_upload"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--fp8_base") && err.contains("--async_upload"),
            "{err}"
        );
    }

    #[test]
    fn no_effect_options_warn() {
        let warnings = check_line(&[
            "--xformers",
            "--mem_eff_attn",
            "--highvram",
            "--log_with",
            "tensorboard",
        ])
        .expect("accepted");
        assert_eq!(
            warnings,
            [
                "--highvram has no effect: only changes when the GPU cache is emptied",
                "--mem_eff_attn has no effect: attention always uses libtorch SDPA, numerically the same",
                "--xformers has no effect: attention always uses libtorch SDPA, numerically the same",
            ]
        );
        assert!(
            check_line(&["--save_model_as", "safetensors"])
                .expect("ok")
                .is_empty()
        );
    }
}
