//! The image autoencoder (`AutoencoderKL`): encoder to a diagonal Gaussian over latents,
//! decoder back to pixels, with Diffusers module paths as variable names
//! (`encoder.down_blocks.0.resnets.0.conv1.weight`, `decoder.mid_block.attentions.0.to_q.weight`).
//!
//! The per-family latent scaling (0.18215 for SD1.x/SD2.x, 0.13025 for SDXL) lives in
//! [`VaeConfig::scaling_factor`]; [`Vae::encode`] and [`Vae::decode`] do not apply it, as in
//! Diffusers (pipelines multiply after encoding and divide before decoding).

use std::path::Path as FsPath;

use serde_json::Value;
use tch::{Tensor, nn::Path};

use super::attention::{Attention, AttentionSettings};
use super::config::{ConfigError, Fields, read_json};
use super::layers::{Conv2d, GroupNorm};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};

/// GroupNorm epsilon of every VAE norm (Diffusers hard-codes 1e-6 in `Encoder`/`Decoder`).
const VAE_EPS: f64 = 1e-6;

/// Architecture of a [`Vae`] (the `AutoencoderKL` config keys SD uses).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Image channels in (3).
    pub in_channels: i64,
    /// Image channels out (3).
    pub out_channels: i64,
    /// Latent channels (4).
    pub latent_channels: i64,
    /// Channels per level (encoder order).
    pub block_out_channels: Vec<i64>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: i64,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// Latent scale: `latents = scaling_factor · sample` (SD 0.18215, SDXL 0.13025).
    pub scaling_factor: f64,
    /// `quant_conv` after the encoder.
    pub use_quant_conv: bool,
    /// `post_quant_conv` before the decoder.
    pub use_post_quant_conv: bool,
    /// Self-attention in both mid blocks.
    pub mid_block_add_attention: bool,
    /// Default image size in pixels.
    pub sample_size: i64,
}

impl VaeConfig {
    /// SD 1.x / 2.x VAE (`runwayml/stable-diffusion-v1-5` `vae/config.json`).
    pub fn sd() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            sample_size: 512,
        }
    }

    /// SDXL VAE: the SD architecture with scaling factor 0.13025.
    pub fn sdxl() -> Self {
        Self {
            scaling_factor: 0.13025,
            sample_size: 1024,
            ..Self::sd()
        }
    }

    /// Reads a Diffusers `vae/config.json`.
    ///
    /// # Errors
    /// As [`VaeConfig::from_json`], plus I/O and JSON errors naming the file.
    pub fn from_file(path: &FsPath) -> Result<Self, ConfigError> {
        Self::from_json(&read_json(path)?, &path.display().to_string())
    }

    /// Builds the config from a parsed Diffusers `AutoencoderKL` config (absent keys take
    /// Diffusers' defaults, except `scaling_factor`, which defaults to 0.18215).
    ///
    /// # Errors
    /// [`ConfigError::Field`] for a wrongly typed key, [`ConfigError::Unsupported`] for other
    /// block types, activations, `latents_mean`/`shift_factor` (SD3/Flux VAEs),
    /// [`ConfigError::Invalid`] from [`VaeConfig::validate`].
    pub fn from_json(value: &Value, source_name: &str) -> Result<Self, ConfigError> {
        let f = Fields { value, source_name };
        if !value.is_object() {
            return Err(f.err("(root)", "a JSON object", value));
        }
        f.expect_str("act_fn", &["silu"], true)?;
        for key in ["shift_factor", "latents_mean", "latents_std"] {
            if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                return Err(f.unsupported(key, v, "null"));
            }
        }
        let block_out_channels = if f.has("block_out_channels") {
            f.int_list("block_out_channels")?
        } else {
            vec![64]
        };
        let n = block_out_channels.len();
        for (key, allowed) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if f.has(key) {
                let types = f.str_list(key)?;
                if types.len() != n {
                    return Err(f.err(
                        key,
                        &format!("{n} block types (one per block_out_channels entry)"),
                        &value[key],
                    ));
                }
                if let Some(t) = types.iter().find(|t| *t != allowed) {
                    return Err(f.unsupported(key, &Value::from(t.as_str()), allowed));
                }
            }
        }
        let config = Self {
            in_channels: f.int("in_channels", 3)?,
            out_channels: f.int("out_channels", 3)?,
            latent_channels: f.int("latent_channels", 4)?,
            block_out_channels,
            layers_per_block: f.int("layers_per_block", 1)?,
            norm_num_groups: f.int("norm_num_groups", 32)?,
            scaling_factor: f.float("scaling_factor", 0.18215)?,
            use_quant_conv: f.bool("use_quant_conv", true)?,
            use_post_quant_conv: f.bool("use_post_quant_conv", true)?,
            mid_block_add_attention: f.bool("mid_block_add_attention", true)?,
            sample_size: f.int("sample_size", 32)?,
        };
        config.validate(source_name)?;
        Ok(config)
    }

    /// Checks channel counts against the group count.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] with the reason.
    pub fn validate(&self, source_name: &str) -> Result<(), ConfigError> {
        let bad = |reason: String| {
            Err(ConfigError::Invalid {
                source_name: source_name.to_owned(),
                reason,
            })
        };
        if self.block_out_channels.is_empty() {
            return bad("block_out_channels is empty".into());
        }
        if self.layers_per_block < 1 || self.norm_num_groups < 1 || self.latent_channels < 1 {
            return bad(
                "layers_per_block, norm_num_groups and latent_channels must be positive".into(),
            );
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c < 1 || c % self.norm_num_groups != 0 {
                return bad(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of {}",
                    self.norm_num_groups
                ));
            }
        }
        Ok(())
    }
}

/// Single-head self-attention over the pixels of a feature map, with its own GroupNorm and a
/// residual (`Attention(..., residual_connection=True, _from_deprecated_attn_block=True)`).
#[derive(Debug)]
struct SpatialAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl SpatialAttention {
    fn new(p: &Path, channels: i64, groups: i64) -> Self {
        Self {
            group_norm: GroupNorm::new(&(p / "group_norm"), groups, channels, VAE_EPS),
            attn: Attention::new(
                p,
                AttentionSettings {
                    query_dim: channels,
                    context_dim: None,
                    heads: 1,
                    dim_head: channels,
                    qkv_bias: true,
                    upcast: false,
                },
            ),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (n, c, h, w) = x.size4().expect("VAE attention input is [N, C, H, W]");
        // 1. GroupNorm on the map, then tokens [N, H·W, C]
        let t = self
            .group_norm
            .forward(x)
            .view([n, c, h * w])
            .transpose(1, 2);
        // 2. attention, back to [N, C, H, W], residual
        let out = self
            .attn
            .forward(&t, None)
            .transpose(1, 2)
            .reshape([n, c, h, w]);
        out + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention, resnet).
#[derive(Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<SpatialAttention>,
    resnet_1: ResnetBlock2D,
}

impl MidBlock {
    fn new(p: &Path, channels: i64, groups: i64, add_attention: bool) -> Self {
        let resnet = |j: i64| {
            ResnetBlock2D::new(&(p / "resnets" / j), vae_resnet(channels, channels, groups))
        };
        Self {
            resnet_0: resnet(0),
            attention: add_attention
                .then(|| SpatialAttention::new(&(p / "attentions" / 0), channels, groups)),
            resnet_1: resnet(1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnet_0.forward(x, None);
        if let Some(a) = &self.attention {
            h = a.forward(&h);
        }
        self.resnet_1.forward(&h, None)
    }
}

fn vae_resnet(in_channels: i64, out_channels: i64, groups: i64) -> ResnetSettings {
    ResnetSettings {
        in_channels,
        out_channels,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(p: &Path, c: &VaeConfig) -> Self {
        let ch = &c.block_out_channels;
        let n = ch.len();
        let mut out_ch = ch[0];
        let blocks = (0..n)
            .map(|i| {
                let bp = p / "down_blocks" / i;
                let in_ch = out_ch;
                out_ch = ch[i];
                let resnets = (0..c.layers_per_block)
                    .map(|j| {
                        ResnetBlock2D::new(
                            &(&bp / "resnets" / j),
                            vae_resnet(
                                if j == 0 { in_ch } else { out_ch },
                                out_ch,
                                c.norm_num_groups,
                            ),
                        )
                    })
                    .collect();
                let down = (i + 1 < n)
                    .then(|| Downsample2D::new(&(&bp / "downsamplers" / 0), out_ch, out_ch, 0));
                (resnets, down)
            })
            .collect();
        Self {
            conv_in: Conv2d::new(&(p / "conv_in"), c.in_channels, ch[0], 3, 1, 1),
            blocks,
            mid_block: MidBlock::new(
                &(p / "mid_block"),
                ch[n - 1],
                c.norm_num_groups,
                c.mid_block_add_attention,
            ),
            conv_norm_out: GroupNorm::new(
                &(p / "conv_norm_out"),
                c.norm_num_groups,
                ch[n - 1],
                VAE_EPS,
            ),
            conv_out: Conv2d::new(&(p / "conv_out"), ch[n - 1], 2 * c.latent_channels, 3, 1, 1),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        // 1. conv_in
        let mut h = self.conv_in.forward(x);
        // 2. down blocks
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(d) = down {
                h = d.forward(&h);
            }
        }
        // 3. mid block
        h = self.mid_block.forward(&h);
        // 4. post-process: mean and log-variance stacked on channels
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    blocks: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(p: &Path, c: &VaeConfig) -> Self {
        let rev: Vec<i64> = c.block_out_channels.iter().rev().copied().collect();
        let n = rev.len();
        let mut out_ch = rev[0];
        let blocks = (0..n)
            .map(|i| {
                let bp = p / "up_blocks" / i;
                let prev = out_ch;
                out_ch = rev[i];
                let resnets = (0..=c.layers_per_block)
                    .map(|j| {
                        ResnetBlock2D::new(
                            &(&bp / "resnets" / j),
                            vae_resnet(
                                if j == 0 { prev } else { out_ch },
                                out_ch,
                                c.norm_num_groups,
                            ),
                        )
                    })
                    .collect();
                let up =
                    (i + 1 < n).then(|| Upsample2D::new(&(&bp / "upsamplers" / 0), out_ch, out_ch));
                (resnets, up)
            })
            .collect();
        Self {
            conv_in: Conv2d::new(&(p / "conv_in"), c.latent_channels, rev[0], 3, 1, 1),
            mid_block: MidBlock::new(
                &(p / "mid_block"),
                rev[0],
                c.norm_num_groups,
                c.mid_block_add_attention,
            ),
            blocks,
            conv_norm_out: GroupNorm::new(
                &(p / "conv_norm_out"),
                c.norm_num_groups,
                rev[n - 1],
                VAE_EPS,
            ),
            conv_out: Conv2d::new(&(p / "conv_out"), rev[n - 1], c.out_channels, 3, 1, 1),
        }
    }

    fn forward(&self, z: &Tensor) -> Tensor {
        // 1. conv_in, 2. mid block
        let mut h = self.mid_block.forward(&self.conv_in.forward(z));
        // 3. up blocks
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(u) = up {
                h = u.forward(&h, None);
            }
        }
        // 4. post-process
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h).silu())
    }
}

/// The diagonal Gaussian the encoder outputs (`DiagonalGaussianDistribution`).
///
/// # Shapes
/// `mean`, `logvar` `[N, latent_channels, H/f, W/f]` with f = 2^(levels−1) (8 for SD).
#[derive(Debug)]
pub struct LatentDistribution {
    /// Mean (unscaled latents).
    pub mean: Tensor,
    /// Log-variance, clamped to [−30, 20] as Diffusers does.
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// Standard deviation `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// A sample `mean + std · noise` with caller-drawn `noise` (same shape) so that the random
    /// stream stays under the caller's control.
    pub fn sample_with(&self, noise: &Tensor) -> Tensor {
        &self.mean + self.std() * noise
    }
}

/// The VAE (`AutoencoderKL`).
///
/// # Source
/// diffusers 0.32 `models/autoencoders/autoencoder_kl.py`, `vae.py` (`Encoder`, `Decoder`).
#[derive(Debug)]
pub struct Vae {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl Vae {
    /// Builds `encoder.*`, `decoder.*`, `quant_conv`, `post_quant_conv` under `vs` with
    /// uninitialised variables of the var store's kind and device (fill them with
    /// [`crate::weights::load_var_store`]).
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when `config` fails [`VaeConfig::validate`].
    pub fn new(vs: &Path, config: &VaeConfig) -> Result<Self, ConfigError> {
        config.validate("VAE config")?;
        let l = config.latent_channels;
        Ok(Self {
            config: config.clone(),
            encoder: Encoder::new(&(vs / "encoder"), config),
            decoder: Decoder::new(&(vs / "decoder"), config),
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2d::new(&(vs / "quant_conv"), 2 * l, 2 * l, 1, 1, 0)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::new(&(vs / "post_quant_conv"), l, l, 1, 1, 0)),
        })
    }

    /// The configuration this VAE was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Encodes images into the latent distribution (unscaled; multiply a sample by
    /// [`VaeConfig::scaling_factor`] for the U-Net).
    ///
    /// # Shapes
    /// `image` `[N, in_channels, H, W]` in [−1, 1], weights' dtype →
    /// mean/logvar `[N, latent_channels, H/8, W/8]` (for the 4-level SD VAE).
    pub fn encode(&self, image: &Tensor) -> LatentDistribution {
        let h = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(q) => q.forward(&h),
            None => h,
        };
        let parts = moments.chunk(2, 1);
        LatentDistribution {
            mean: parts[0].shallow_clone(),
            logvar: parts[1].clamp(-30.0, 20.0),
        }
    }

    /// Decodes unscaled latents (divide U-Net latents by [`VaeConfig::scaling_factor`] first)
    /// into images in about [−1, 1] (not clamped).
    ///
    /// # Shapes
    /// `latents` `[N, latent_channels, h, w]` → `[N, out_channels, 8h, 8w]` (4-level VAE).
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let z = match &self.post_quant_conv {
            Some(q) => q.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&z)
    }
}
