//! A rough estimate of the device memory a LoRA training run needs, made before the first step
//! so that a run that cannot fit is reported up front (`train-network` logs the estimate at
//! info level and warns when it exceeds what the device has).
//!
//! The model (docs/performance.md, "Memory estimate"):
//! * **weights**: parameter count × bytes of the dtype each model is held in (U-Net and text
//!   encoders in the weight dtype, the VAE in its own, f32 with `--no_half_vae`);
//! * **LoRA**: its parameters and their gradients in the network dtype (f32, or half with
//!   `--full_fp16` / `--full_bf16`);
//! * **optimiser state** as this port stores it ([`optimizer_state_bytes`]): f32 moments, or
//!   u8 codes plus one f32 absmax per 256-value block for the 8-bit optimisers;
//! * **activations**: the values autograd keeps for backward, counted per U-Net block from its
//!   configuration ([`unet_activation_values`]) and, for trained text encoders, per encoder
//!   layer ([`text_encoder_activation_values`]), in the model's compute dtype, times the batch.
//!   With gradient checkpointing only the block inputs are kept, plus the internals of the
//!   largest block while it is recomputed.
//!
//! Not counted: the CUDA context and kernels' workspaces (≈ 0.3–1 GiB on a GPU), allocator
//! fragmentation, the latent cache (kept on the host here), transient copies while loading,
//! and attention matrices (SDPA's flash / memory-efficient kernels do not store them).

use tch::{Device, Kind};

use super::optim::{OptimizerConfig, OptimizerParams};
use crate::models::unet::{BlockKind, UnetConfig};

/// Values of one bitsandbytes-style quantisation block (see `optim8bit`).
const BLOCK_SIZE: u64 = 256;

/// Bytes per value of `kind` (1 for 8-bit and bool kinds, 8 for 64-bit ones).
pub fn kind_bytes(kind: Kind) -> u64 {
    match kind {
        Kind::Uint8 | Kind::Int8 | Kind::Bool => 1,
        Kind::Half | Kind::BFloat16 | Kind::Int16 => 2,
        Kind::Double | Kind::Int64 | Kind::ComplexFloat => 8,
        Kind::ComplexDouble => 16,
        _ => 4,
    }
}

/// What a run keeps on the training device, in bytes, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryEstimate {
    /// U-Net weights.
    pub unet: u64,
    /// Text encoder weights (all of them).
    pub text_encoders: u64,
    /// VAE weights.
    pub vae: u64,
    /// LoRA weights.
    pub lora: u64,
    /// LoRA gradients (same dtype as the weights).
    pub lora_grads: u64,
    /// Optimiser state.
    pub optimizer_state: u64,
    /// Activations kept for backward at the largest batch.
    pub activations: u64,
}

impl MemoryEstimate {
    /// The sum of all parts, in bytes.
    pub fn total(&self) -> u64 {
        self.unet
            + self.text_encoders
            + self.vae
            + self.lora
            + self.lora_grads
            + self.optimizer_state
            + self.activations
    }

    /// One line with every part in GiB, e.g.
    /// `8.12 GiB = weights 4.00 (U-Net 3.20, text encoders 0.46, VAE 0.31) + LoRA 0.05 + …`.
    pub fn summary(&self) -> String {
        format!(
            "{:.2} GiB = weights {:.2} (U-Net {:.2}, text encoders {:.2}, VAE {:.2}) + LoRA {:.3} + gradients {:.3} + optimizer state {:.3} + activations {:.2}",
            gib(self.total()),
            gib(self.unet + self.text_encoders + self.vae),
            gib(self.unet),
            gib(self.text_encoders),
            gib(self.vae),
            gib(self.lora),
            gib(self.lora_grads),
            gib(self.optimizer_state),
            gib(self.activations),
        )
    }
}

/// `bytes` in GiB (2³⁰ bytes).
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// What [`estimate`] needs to know about a run.
#[derive(Debug, Clone)]
pub struct MemoryInputs<'a> {
    /// The U-Net's configuration (for the activation count).
    pub unet: &'a UnetConfig,
    /// U-Net parameter count.
    pub unet_params: u64,
    /// Dtype the U-Net is held and computes in (the weight dtype).
    pub unet_kind: Kind,
    /// Parameter count of all text encoders.
    pub text_encoder_params: u64,
    /// Their dtype.
    pub text_encoder_kind: Kind,
    /// VAE parameter count.
    pub vae_params: u64,
    /// VAE dtype.
    pub vae_kind: Kind,
    /// Shapes of the LoRA parameters (`lora_down`, `lora_up` of every module).
    pub lora_shapes: &'a [Vec<i64>],
    /// LoRA dtype (f32, or half with `--full_fp16` / `--full_bf16`).
    pub lora_kind: Kind,
    /// The optimiser.
    pub optimizer: &'a OptimizerConfig,
    /// Samples per step (the largest batch of any dataset).
    pub batch_size: u64,
    /// Latent height × width of the largest bucket, in latent cells (pixels / 8).
    pub latent_size: (u64, u64),
    /// `--gradient_checkpointing`.
    pub gradient_checkpointing: bool,
    /// Hidden size and layer count of every trained text encoder (empty when none is).
    pub trained_text_encoders: &'a [(u64, u64)],
    /// Tokens per caption the text encoders see (77 × chunks).
    pub text_tokens: u64,
}

/// Estimates the device memory of a run; see the module documentation for the model.
pub fn estimate(inputs: &MemoryInputs<'_>) -> MemoryEstimate {
    let lora_params: u64 = inputs.lora_shapes.iter().map(|s| numel(s)).sum();
    let act_bytes = kind_bytes(inputs.unet_kind);
    let (lh, lw) = inputs.latent_size;
    let unet_values = unet_activation_values(inputs.unet, lh, lw, inputs.gradient_checkpointing);
    let te_values: u64 = inputs
        .trained_text_encoders
        .iter()
        .map(|&(hidden, layers)| {
            text_encoder_activation_values(
                hidden,
                layers,
                inputs.text_tokens,
                inputs.gradient_checkpointing,
            )
        })
        .sum();
    MemoryEstimate {
        unet: inputs.unet_params * kind_bytes(inputs.unet_kind),
        text_encoders: inputs.text_encoder_params * kind_bytes(inputs.text_encoder_kind),
        vae: inputs.vae_params * kind_bytes(inputs.vae_kind),
        lora: lora_params * kind_bytes(inputs.lora_kind),
        lora_grads: lora_params * kind_bytes(inputs.lora_kind),
        optimizer_state: optimizer_state_bytes(inputs.optimizer, inputs.lora_shapes),
        activations: inputs.batch_size
            * (unet_values * act_bytes + te_values * kind_bytes(inputs.text_encoder_kind)),
    }
}

fn numel(shape: &[i64]) -> u64 {
    shape.iter().map(|&d| d.max(0) as u64).product()
}

/// Bytes of optimiser state for parameters of `shapes`, as this port stores it (f32 state
/// whatever the parameter dtype):
/// AdamW 8 B per value; Lion 4; SGD 4 with momentum, 0 without; Adafactor 4 per value with
/// `beta1`, plus row + column f32 vectors for ≥ 2-D parameters (one value per element for 1-D);
/// AdamW8bit / Lion8bit: per state ⌈n/256⌉·256 u8 codes + ⌈n/256⌉ f32 absmax for parameters of
/// at least `min_8bit_size` values, f32 state below (2 states for AdamW, 1 for Lion).
pub fn optimizer_state_bytes(optimizer: &OptimizerConfig, shapes: &[Vec<i64>]) -> u64 {
    let quantised = |n: u64, min: i64, states: u64| {
        if i64::try_from(n).unwrap_or(i64::MAX) >= min {
            let blocks = n.div_ceil(BLOCK_SIZE);
            states * (blocks * BLOCK_SIZE + blocks * 4)
        } else {
            states * 4 * n
        }
    };
    shapes
        .iter()
        .map(|shape| {
            let n = numel(shape);
            match &optimizer.params {
                OptimizerParams::AdamW(_) => 8 * n,
                OptimizerParams::Lion(_) => 4 * n,
                OptimizerParams::AdamW8bit(p) => quantised(n, p.min_8bit_size, 2),
                OptimizerParams::Lion8bit(p) => quantised(n, p.min_8bit_size, 1),
                OptimizerParams::Sgd(p) => {
                    if p.momentum == 0.0 {
                        0
                    } else {
                        4 * n
                    }
                }
                OptimizerParams::Adafactor(p) => {
                    let first = if p.beta1.is_some() { 4 * n } else { 0 };
                    let second = if shape.len() >= 2 {
                        let last = shape[shape.len() - 1].max(0) as u64;
                        let rows = numel(&shape[..shape.len() - 1]);
                        let cols = numel(&shape[..shape.len() - 2]) * last;
                        4 * (rows + cols)
                    } else {
                        4 * n
                    };
                    first + second
                }
            }
        })
        .sum()
}

/// Values kept for backward by one `ResnetBlock2D` (in → out channels at `cells` positions):
/// GroupNorm 1 input and output, SiLU output (conv 1 input), conv 1 output + time embedding
/// (GroupNorm 2 input), its output and the SiLU output (conv 2 input).
fn resnet_values(c_in: u64, c_out: u64, cells: u64) -> u64 {
    (3 * c_in + 3 * c_out) * cells
}

/// Values kept by one `Transformer2DModel` of `depth` `BasicTransformerBlock`s at `c` channels:
/// GroupNorm input/output, `proj_in` output, `proj_out` input (4 × c); per block: LayerNorm
/// input/output ×3 (6), q, k, v and the attention output of self-attention (4), q and output of
/// cross-attention (2), GEGLU projection (8), GELU output (4), gated product (4), together 28 × c.
fn transformer_values(c: u64, depth: u64, cells: u64) -> u64 {
    (4 + 28 * depth) * c * cells
}

/// Activation values (per sample) the U-Net keeps for backward at `latent_height` ×
/// `latent_width` latent cells, following the block structure of `config` (diffusers'
/// `UNet2DConditionModel`: per level `layers_per_block` resnets, each followed by a transformer
/// on cross-attention levels, a down-sampling conv; the mid block; up levels with one more
/// resnet taking the skip connections, and an up-sampling conv). With `checkpointing`, every
/// resnet and transformer keeps only its input, plus the internals of the largest block while
/// it is recomputed. Counts are a rough model (docs/performance.md, "Memory estimate").
pub fn unet_activation_values(
    config: &UnetConfig,
    latent_height: u64,
    latent_width: u64,
    checkpointing: bool,
) -> u64 {
    let channels: Vec<u64> = config
        .block_out_channels
        .iter()
        .map(|&c| c.max(0) as u64)
        .collect();
    let levels = channels.len();
    if levels == 0 {
        return 0;
    }
    let depth_at = |level: usize| {
        config
            .transformer_layers_per_block
            .get(level)
            .or(config.transformer_layers_per_block.last())
            .map_or(1, |&d| d.max(0) as u64)
    };
    let layers = config.layers_per_block.max(0) as u64;
    let cells0 = latent_height * latent_width;
    let cells_at = |level: usize| cells0 >> (2 * level as u32);

    // (values kept without checkpointing, values kept with it) per checkpointed block, and the
    // values of the parts that are never checkpointed (convs in/out, samplers).
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    let mut plain = 0u64;
    let c0 = channels[0];
    // conv_in output is the first resnet's input (counted there); conv_out: GroupNorm in/out,
    // SiLU output.
    plain += 3 * c0 * cells0;

    // Down path: the skip connections' channels, in push order.
    let mut skips: Vec<u64> = vec![c0];
    let mut c_prev = c0;
    for (level, &c) in channels.iter().enumerate() {
        let n = cells_at(level);
        for _ in 0..layers {
            blocks.push((resnet_values(c_prev, c, n), c_prev * n));
            if config.down_blocks.get(level) == Some(&BlockKind::CrossAttn) {
                blocks.push((transformer_values(c, depth_at(level), n), c * n));
            }
            skips.push(c);
            c_prev = c;
        }
        if level + 1 < levels {
            plain += c * n; // down-sampling conv input
            skips.push(c);
        }
    }
    // Mid block: resnet, transformer, resnet at the deepest level.
    let deepest = levels - 1;
    let (c_mid, n_mid) = (channels[deepest], cells_at(deepest));
    blocks.push((resnet_values(c_mid, c_mid, n_mid), c_mid * n_mid));
    blocks.push((
        transformer_values(c_mid, depth_at(deepest), n_mid),
        c_mid * n_mid,
    ));
    blocks.push((resnet_values(c_mid, c_mid, n_mid), c_mid * n_mid));

    // Up path, deepest level first; each resnet takes the previous output plus one skip.
    let mut c_prev = c_mid;
    for (up, level) in (0..levels).rev().enumerate() {
        let c = channels[level];
        let n = cells_at(level);
        for _ in 0..=layers {
            let skip = skips.pop().unwrap_or(c);
            let c_in = c_prev + skip;
            blocks.push((resnet_values(c_in, c, n), c_in * n));
            if config.up_blocks.get(up) == Some(&BlockKind::CrossAttn) {
                blocks.push((transformer_values(c, depth_at(level), n), c * n));
            }
            c_prev = c;
        }
        if level > 0 {
            plain += c * cells_at(level - 1); // up-sampling conv input, at the finer level
        }
    }

    if checkpointing {
        let inputs: u64 = blocks.iter().map(|b| b.1).sum();
        let largest = blocks.iter().map(|b| b.0).max().unwrap_or(0);
        plain + inputs + largest
    } else {
        plain + blocks.iter().map(|b| b.0).sum::<u64>()
    }
}

/// Activation values (per sample) a trained CLIP text encoder keeps: per layer about 16 ×
/// `hidden` per token (LayerNorm inputs/outputs, q, k, v, attention output, MLP 4× expansion
/// before and after the activation), `tokens` tokens. With checkpointing each layer keeps its
/// input, plus one layer's internals.
pub fn text_encoder_activation_values(
    hidden: u64,
    layers: u64,
    tokens: u64,
    checkpointing: bool,
) -> u64 {
    let per_layer = 16 * hidden * tokens;
    if checkpointing {
        layers * hidden * tokens + per_layer
    } else {
        layers * per_layer
    }
}

/// Memory the training device offers, in bytes, and where the figure comes from.
///
/// * CUDA: the device's total memory (`cudaMemGetInfo` through `tch_ext::cuda_memory_info`);
///   `None` when the CUDA runtime cannot be queried.
/// * CPU: `MemAvailable` of `/proc/meminfo` plus this process's resident set (`VmRSS` of
///   `/proc/self/status`), because the models are already loaded when the estimate is made;
///   `None` where `/proc` is missing.
pub fn device_memory(device: Device) -> Option<(u64, &'static str)> {
    match device {
        Device::Cuda(index) => tch_ext::cuda_memory_info(index).map(|(_, total)| (total, "total")),
        Device::Cpu => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
            let status = std::fs::read_to_string("/proc/self/status").ok()?;
            let available = proc_kib(&meminfo, "MemAvailable:")?;
            let rss = proc_kib(&status, "VmRSS:").unwrap_or(0);
            Some((
                (available + rss) * 1024,
                "available (MemAvailable + this process)",
            ))
        }
        _ => None,
    }
}

/// The value in KiB of the `key` line (`MemAvailable:   123 kB`) of a `/proc` file.
fn proc_kib(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Estimates the memory of the run about to start (models loaded, network and optimiser
/// built), logs it at info level and warns when it exceeds what the device offers.
pub(crate) fn report_for_run(
    cfg: &super::trainer::TrainConfig,
    scan: &sd_data::dataset::DatasetScan,
    model: &crate::loader::StableDiffusion,
    network: &crate::lora::LoraNetwork,
) -> MemoryEstimate {
    let count = |vs: &tch::nn::VarStore| -> u64 {
        vs.variables()
            .values()
            .filter(|t| t.is_floating_point())
            .map(|t| t.numel() as u64)
            .sum()
    };
    let lora_shapes: Vec<Vec<i64>> = network
        .parameters()
        .iter()
        .flat_map(|(_, params)| params.iter().map(tch::Tensor::size))
        .collect();
    let lora_kind = network
        .parameters()
        .first()
        .and_then(|(_, p)| p.first().map(tch::Tensor::kind))
        .unwrap_or(Kind::Float);
    let trained: Vec<(u64, u64)> = if cfg.train_text_encoder {
        model
            .text_encoders
            .iter()
            .map(|s| {
                let hidden = s.model.token_embedding.size().get(1).copied().unwrap_or(0);
                (hidden.max(0) as u64, s.model.layers.len() as u64)
            })
            .collect()
    } else {
        Vec::new()
    };
    let (mut batch_size, mut latent_size) = (1u64, (0u64, 0u64));
    for ds in &scan.datasets {
        batch_size = batch_size.max(u64::from(ds.config.batch_size));
        let r = ds.config.buckets.resolution;
        let mut cells = (u64::from(r.height / 8), u64::from(r.width / 8));
        for b in &ds.buckets {
            let c = (
                u64::from(b.resolution.height / 8),
                u64::from(b.resolution.width / 8),
            );
            if c.0 * c.1 > cells.0 * cells.1 {
                cells = c;
            }
        }
        if cells.0 * cells.1 > latent_size.0 * latent_size.1 {
            latent_size = cells;
        }
    }
    let unet_kind = model
        .unet_vs
        .variables()
        .values()
        .find(|t| t.is_floating_point())
        .map_or(Kind::Float, tch::Tensor::kind);
    let te_kind = model
        .text_encoders
        .first()
        .and_then(|s| {
            s.vs.variables()
                .values()
                .find(|t| t.is_floating_point())
                .map(tch::Tensor::kind)
        })
        .unwrap_or(unet_kind);
    let vae_kind = model
        .vae_vs
        .variables()
        .values()
        .find(|t| t.is_floating_point())
        .map_or(Kind::Float, tch::Tensor::kind);
    let inputs = MemoryInputs {
        unet: model.unet.config(),
        unet_params: count(&model.unet_vs),
        unet_kind,
        text_encoder_params: model.text_encoders.iter().map(|s| count(&s.vs)).sum(),
        text_encoder_kind: te_kind,
        vae_params: count(&model.vae_vs),
        vae_kind,
        lora_shapes: &lora_shapes,
        lora_kind,
        optimizer: &cfg.optimizer,
        batch_size,
        latent_size,
        gradient_checkpointing: cfg.gradient_checkpointing,
        trained_text_encoders: &trained,
        text_tokens: cfg.max_token_length.map_or(77, |m| m as u64 + 2),
    };
    let est = estimate(&inputs);
    tracing::info!(
        "estimated {} memory for batch {batch_size} at {}x{} latents: {}",
        device_name(cfg.device),
        latent_size.1,
        latent_size.0,
        est.summary()
    );
    match device_memory(cfg.device) {
        Some((have, what)) if est.total() > have => tracing::warn!(
            "this run needs an estimated {:.2} GiB of {} memory, more than the {:.2} GiB {what}: expect an out-of-memory error or, with drivers that spill to shared memory, much slower steps (try --gradient_checkpointing, --mixed_precision, --optimizer_type AdamW8bit, --cache_latents or a smaller batch)",
            gib(est.total()),
            device_name(cfg.device),
            gib(have)
        ),
        Some((have, what)) => tracing::debug!("device memory: {:.2} GiB {what}", gib(have)),
        None => tracing::debug!(
            "device memory of {} unknown: the estimate is not compared",
            device_name(cfg.device)
        ),
    }
    est
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse() {
        let text = "MemTotal:       24576000 kB\nMemAvailable:   12345678 kB\n";
        assert_eq!(proc_kib(text, "MemAvailable:"), Some(12_345_678));
        assert_eq!(proc_kib(text, "VmRSS:"), None);
    }

    #[test]
    fn cpu_memory_is_reported_here() {
        let (bytes, what) = device_memory(Device::Cpu).expect("/proc on Linux");
        assert!(bytes > 1 << 28, "{bytes} bytes ({what})");
    }
}
