//! The denoising U-Net (`UNet2DConditionModel`) of SD1.x, SD2.x and SDXL, with Diffusers
//! module paths as variable names (`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`).
//!
//! Family differences are configuration only: SD1.x projects in/out of the transformers with
//! 1×1 convolutions, SD2.x with linear layers (and upcasts attention), SDXL has three levels,
//! a transformer depth per level and the "text_time" added conditioning (pooled text
//! embedding plus sinusoidal embeddings of original size, crop coordinates and target size).

use std::path::Path as FsPath;

use serde_json::Value;
use tch::{Kind, Tensor, nn::Path};

use super::attention::{Transformer2DModel, TransformerSettings};
use super::config::{ConfigError, Fields, read_json};
use super::embeddings::{TimestepEmbedding, timestep_embedding};
use super::layers::{Conv2d, GroupNorm, LayerHandle, collect_layers};
use super::resnet::{Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};

/// Kind of one U-Net level's block (down or up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// `CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`: resnets interleaved with transformers.
    CrossAttn,
    /// `DownBlock2D` / `UpBlock2D`: resnets only.
    Plain,
}

/// SDXL's `addition_embed_type = "text_time"` conditioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// `addition_time_embed_dim`: sinusoidal width per time id (SDXL 256).
    pub time_embed_dim: i64,
    /// `projection_class_embeddings_input_dim`: pooled text width + 6 · `time_embed_dim`
    /// (SDXL 1280 + 1536 = 2816).
    pub projection_input_dim: i64,
}

/// Architecture of a [`Unet`]: the subset of Diffusers' `UNet2DConditionModel` config that
/// SD1.x, SD2.x and SDXL use. Lists have one entry per level (down order).
#[derive(Debug, Clone, PartialEq)]
pub struct UnetConfig {
    /// Latent channels in (4).
    pub in_channels: i64,
    /// Channels out (4).
    pub out_channels: i64,
    /// Channels per level.
    pub block_out_channels: Vec<i64>,
    /// Down block per level.
    pub down_blocks: Vec<BlockKind>,
    /// Up block per level, in up order (deepest first).
    pub up_blocks: Vec<BlockKind>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: i64,
    /// Attention heads per level. Diffusers configs name this `attention_head_dim` unless
    /// `num_attention_heads` is set (a historical misnomer kept by Diffusers).
    pub attention_heads: Vec<i64>,
    /// Transformer blocks per attention, per level (SDXL 1, 2, 10); the mid block uses the last.
    pub transformer_layers_per_block: Vec<i64>,
    /// Width of `encoder_hidden_states` (SD1 768, SD2 1024, SDXL 2048).
    pub cross_attention_dim: i64,
    /// Linear (true) or 1×1 conv (false) `proj_in`/`proj_out`.
    pub use_linear_projection: bool,
    /// Compute attention in f32 for low-precision weights (SD2.x).
    pub upcast_attention: bool,
    /// GroupNorm groups.
    pub norm_num_groups: i64,
    /// GroupNorm epsilon of resnets and `conv_norm_out`.
    pub norm_eps: f64,
    /// Timestep embedding order: `[cos, sin]` when true.
    pub flip_sin_to_cos: bool,
    /// Timestep embedding frequency shift.
    pub freq_shift: f64,
    /// Padding of the down-sampling convolutions (1).
    pub downsample_padding: i64,
    /// Output divisor of the mid block's resnets (1).
    pub mid_block_scale_factor: f64,
    /// SDXL added conditioning; `None` for SD1.x/SD2.x.
    pub addition: Option<TextTimeConfig>,
    /// Default latent size in latent cells (pixels / 8): 64, 96, 128.
    pub sample_size: i64,
}

impl UnetConfig {
    /// SD 1.5 (`runwayml/stable-diffusion-v1-5` `unet/config.json`).
    pub fn sd15() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_blocks: vec![
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
                BlockKind::Plain,
            ],
            up_blocks: vec![
                BlockKind::Plain,
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
                BlockKind::CrossAttn,
            ],
            layers_per_block: 2,
            attention_heads: vec![8; 4],
            transformer_layers_per_block: vec![1; 4],
            cross_attention_dim: 768,
            use_linear_projection: false,
            upcast_attention: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            addition: None,
            sample_size: 64,
        }
    }

    /// SD 2.1 768-v (`stabilityai/stable-diffusion-2-1` `unet/config.json`): heads 5/10/20/20
    /// (head width 64), context 1024, linear projection, upcast attention.
    pub fn sd21() -> Self {
        Self {
            attention_heads: vec![5, 10, 20, 20],
            cross_attention_dim: 1024,
            use_linear_projection: true,
            upcast_attention: true,
            sample_size: 96,
            ..Self::sd15()
        }
    }

    /// SDXL base 1.0 (`stabilityai/stable-diffusion-xl-base-1.0` `unet/config.json`).
    pub fn sdxl() -> Self {
        Self {
            block_out_channels: vec![320, 640, 1280],
            down_blocks: vec![BlockKind::Plain, BlockKind::CrossAttn, BlockKind::CrossAttn],
            up_blocks: vec![BlockKind::CrossAttn, BlockKind::CrossAttn, BlockKind::Plain],
            attention_heads: vec![5, 10, 20],
            transformer_layers_per_block: vec![1, 2, 10],
            cross_attention_dim: 2048,
            use_linear_projection: true,
            upcast_attention: false,
            addition: Some(TextTimeConfig {
                time_embed_dim: 256,
                projection_input_dim: 2816,
            }),
            sample_size: 128,
            ..Self::sd15()
        }
    }

    /// Reads a Diffusers `unet/config.json`.
    ///
    /// # Errors
    /// As [`UnetConfig::from_json`], plus I/O and JSON errors naming the file.
    pub fn from_file(path: &FsPath) -> Result<Self, ConfigError> {
        Self::from_json(&read_json(path)?, &path.display().to_string())
    }

    /// Builds the config from a parsed Diffusers `UNet2DConditionModel` config; absent or null
    /// keys take Diffusers' defaults. `source_name` names the origin in errors.
    ///
    /// # Errors
    /// [`ConfigError::Field`] for a wrongly typed key, [`ConfigError::Unsupported`] for
    /// Diffusers features outside SD1.x/SD2.x/SDXL (class embeddings, other block types,
    /// `dual_cross_attention`, …), [`ConfigError::Invalid`] from [`UnetConfig::validate`].
    pub fn from_json(value: &Value, source_name: &str) -> Result<Self, ConfigError> {
        let f = Fields { value, source_name };
        if !value.is_object() {
            return Err(f.err("(root)", "a JSON object", value));
        }
        // Features these families never use: refuse rather than build a different model.
        f.expect_str("act_fn", &["silu"], true)?;
        f.expect_str("time_embedding_type", &["positional"], true)?;
        f.expect_str("mid_block_type", &["UNetMidBlock2DCrossAttn"], true)?;
        f.expect_str("resnet_time_scale_shift", &["default"], true)?;
        f.expect_str("attention_type", &["default"], true)?;
        for key in [
            "class_embed_type",
            "num_class_embeds",
            "encoder_hid_dim",
            "encoder_hid_dim_type",
            "time_cond_proj_dim",
            "time_embedding_dim",
            "time_embedding_act_fn",
            "timestep_post_act",
            "reverse_transformer_layers_per_block",
            "cross_attention_norm",
        ] {
            if let Some(v) = value.get(key).filter(|v| !v.is_null()) {
                return Err(f.unsupported(key, v, "null"));
            }
        }
        for key in [
            "center_input_sample",
            "dual_cross_attention",
            "only_cross_attention",
            "resnet_skip_time_act",
        ] {
            if f.bool(key, false)? {
                return Err(f.unsupported(key, &Value::Bool(true), "false"));
            }
        }
        for key in ["conv_in_kernel", "conv_out_kernel"] {
            let k = f.int(key, 3)?;
            if k != 3 {
                return Err(f.unsupported(key, &Value::from(k), "3"));
            }
        }
        let resnet_out_scale = f.float("resnet_out_scale_factor", 1.0)?;
        if resnet_out_scale != 1.0 {
            return Err(f.unsupported(
                "resnet_out_scale_factor",
                &Value::from(resnet_out_scale),
                "1.0",
            ));
        }

        let block_out_channels = if f.has("block_out_channels") {
            f.int_list("block_out_channels")?
        } else {
            vec![320, 640, 1280, 1280]
        };
        let n = block_out_channels.len();
        let kinds = |key: &str,
                     cross: &str,
                     plain: &str,
                     default: &[&str]|
         -> Result<Vec<BlockKind>, ConfigError> {
            let names = if f.has(key) {
                f.str_list(key)?
            } else {
                default.iter().map(|s| (*s).to_owned()).collect()
            };
            names
                .iter()
                .map(|s| match s.as_str() {
                    s if s == cross => Ok(BlockKind::CrossAttn),
                    s if s == plain => Ok(BlockKind::Plain),
                    other => {
                        Err(f.unsupported(key, &Value::from(other), &format!("{cross}, {plain}")))
                    }
                })
                .collect()
        };
        let down_blocks = kinds(
            "down_block_types",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
            &[
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
        )?;
        let up_blocks = kinds(
            "up_block_types",
            "CrossAttnUpBlock2D",
            "UpBlock2D",
            &[
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
        )?;
        let attention_heads = match f.int_or_list("num_attention_heads", n)? {
            Some(h) => h,
            None => f
                .int_or_list("attention_head_dim", n)?
                .unwrap_or_else(|| vec![8; n]),
        };
        let transformer_layers_per_block = f
            .int_or_list("transformer_layers_per_block", n)?
            .unwrap_or_else(|| vec![1; n]);
        let addition = match f.opt_str("addition_embed_type")? {
            None => None,
            Some("text_time") => {
                let need = |key: &str| {
                    f.opt_int(key)?.ok_or_else(|| {
                        f.err(
                            key,
                            "an integer (addition_embed_type is text_time)",
                            &Value::Null,
                        )
                    })
                };
                Some(TextTimeConfig {
                    time_embed_dim: need("addition_time_embed_dim")?,
                    projection_input_dim: need("projection_class_embeddings_input_dim")?,
                })
            }
            Some(other) => {
                return Err(f.unsupported(
                    "addition_embed_type",
                    &Value::from(other),
                    "text_time, null",
                ));
            }
        };
        let sample_size = match value.get("sample_size") {
            Some(Value::Array(a)) => a.first().and_then(Value::as_i64).unwrap_or(64),
            _ => f.int("sample_size", 64)?,
        };
        let config = Self {
            in_channels: f.int("in_channels", 4)?,
            out_channels: f.int("out_channels", 4)?,
            block_out_channels,
            down_blocks,
            up_blocks,
            layers_per_block: f.int("layers_per_block", 2)?,
            attention_heads,
            transformer_layers_per_block,
            cross_attention_dim: f.int("cross_attention_dim", 1280)?,
            use_linear_projection: f.bool("use_linear_projection", false)?,
            upcast_attention: f.bool("upcast_attention", false)?,
            norm_num_groups: f.int("norm_num_groups", 32)?,
            norm_eps: f.float("norm_eps", 1e-5)?,
            flip_sin_to_cos: f.bool("flip_sin_to_cos", true)?,
            freq_shift: f.float("freq_shift", 0.0)?,
            downsample_padding: f.int("downsample_padding", 1)?,
            mid_block_scale_factor: f.float("mid_block_scale_factor", 1.0)?,
            addition,
            sample_size,
        };
        config.validate(source_name)?;
        Ok(config)
    }

    /// Checks that the values fit together (list lengths, divisibility by groups and heads).
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
        let n = self.block_out_channels.len();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        for (what, len) in [
            ("down_block_types", self.down_blocks.len()),
            ("up_block_types", self.up_blocks.len()),
            ("attention heads", self.attention_heads.len()),
            (
                "transformer_layers_per_block",
                self.transformer_layers_per_block.len(),
            ),
        ] {
            if len != n {
                return bad(format!("{what} has {len} entries, block_out_channels {n}"));
            }
        }
        if self.layers_per_block < 1
            || self.norm_num_groups < 1
            || self.in_channels < 1
            || self.out_channels < 1
        {
            return bad(
                "layers_per_block, norm_num_groups and channel counts must be positive".into(),
            );
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let heads = self.attention_heads[i];
            if c < 1 || c % self.norm_num_groups != 0 {
                return bad(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of {}",
                    self.norm_num_groups
                ));
            }
            if heads < 1 || c % heads != 0 {
                return bad(format!(
                    "block_out_channels[{i}] = {c} is not divisible by {heads} attention heads"
                ));
            }
            if self.transformer_layers_per_block[i] < 1 {
                return bad(format!(
                    "transformer_layers_per_block[{i}] must be at least 1"
                ));
            }
        }
        if let Some(a) = self.addition
            && (a.time_embed_dim < 1 || a.projection_input_dim <= 6 * a.time_embed_dim)
        {
            return bad(format!(
                "projection_class_embeddings_input_dim {} leaves no room for the pooled text embedding next to 6 × {}",
                a.projection_input_dim, a.time_embed_dim
            ));
        }
        Ok(())
    }

    /// Width of the pooled text embedding SDXL feeds as `text_embeds`
    /// (`projection_input_dim − 6 · time_embed_dim`), `None` without added conditioning.
    pub fn text_embeds_dim(&self) -> Option<i64> {
        self.addition
            .map(|a| a.projection_input_dim - 6 * a.time_embed_dim)
    }
}

/// SDXL's added conditioning for one batch.
///
/// # Shapes
/// `text_embeds` `[N, text_embeds_dim]` (the projected pooled output of text encoder 2);
/// `time_ids` `[N, 6]` = original height, width, crop top, crop left, target height, width,
/// in pixels.
#[derive(Debug)]
pub struct TextTimeCondition {
    /// Pooled text embedding.
    pub text_embeds: Tensor,
    /// Size and crop conditioning.
    pub time_ids: Tensor,
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Transformer2DModel,
    resnet_1: ResnetBlock2D,
}

/// The U-Net (`UNet2DConditionModel`), predicting noise (ε) or velocity (v) from noisy
/// latents.
///
/// # Source
/// diffusers 0.32 `models/unets/unet_2d_condition.py` and `unet_2d_blocks.py`.
#[derive(Debug)]
pub struct Unet {
    config: UnetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_embedding: Option<TimestepEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    linear_layers: Vec<LayerHandle>,
    checkpointing: Option<super::checkpoint::Checkpointing>,
}

impl Unet {
    /// Builds the module tree under `vs` with uninitialised variables of the var store's kind
    /// and device (fill them with [`crate::weights::load_var_store`]). Variable names are the
    /// Diffusers state-dict keys relative to `vs`.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when `config` fails [`UnetConfig::validate`].
    pub fn new(vs: &Path, config: &UnetConfig) -> Result<Self, ConfigError> {
        let (unet, layers) = collect_layers(|| Self::build(vs, config));
        let mut unet = unet?;
        unet.linear_layers = layers;
        Ok(unet)
    }

    /// Every Linear and Conv2d layer in creation order, with paths relative to `vs` (what LoRA
    /// networks attach to; see [`super::layers::collect_layers`]).
    pub fn lora_layers(&self) -> &[LayerHandle] {
        &self.linear_layers
    }

    fn build(vs: &Path, config: &UnetConfig) -> Result<Self, ConfigError> {
        config.validate("U-Net config")?;
        let c = config;
        let ch = &c.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let resnet = |p: &Path, in_channels, out_channels| {
            ResnetBlock2D::new(
                p,
                ResnetSettings {
                    in_channels,
                    out_channels,
                    temb_channels: Some(temb),
                    groups: c.norm_num_groups,
                    eps: c.norm_eps,
                    output_scale_factor: 1.0,
                },
            )
        };
        let transformer = |p: &Path, channels, heads, depth| {
            Transformer2DModel::new(
                p,
                TransformerSettings {
                    channels,
                    heads,
                    depth,
                    context_dim: c.cross_attention_dim,
                    groups: c.norm_num_groups,
                    use_linear_projection: c.use_linear_projection,
                    upcast_attention: c.upcast_attention,
                },
            )
        };

        let conv_in = Conv2d::new(&(vs / "conv_in"), c.in_channels, ch[0], 3, 1, 1);
        let time_embedding = TimestepEmbedding::new(&(vs / "time_embedding"), ch[0], temb);
        let add_embedding = c
            .addition
            .map(|a| TimestepEmbedding::new(&(vs / "add_embedding"), a.projection_input_dim, temb));

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, kind) in c.down_blocks.iter().enumerate() {
            let p = vs / "down_blocks" / i;
            let in_ch = out_ch;
            out_ch = ch[i];
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    resnet(
                        &(&p / "resnets" / j),
                        if j == 0 { in_ch } else { out_ch },
                        out_ch,
                    )
                })
                .collect();
            let attentions = match kind {
                BlockKind::CrossAttn => (0..c.layers_per_block)
                    .map(|j| {
                        transformer(
                            &(&p / "attentions" / j),
                            out_ch,
                            c.attention_heads[i],
                            c.transformer_layers_per_block[i],
                        )
                    })
                    .collect(),
                BlockKind::Plain => Vec::new(),
            };
            let downsampler = (i + 1 < n).then(|| {
                Downsample2D::new(
                    &(&p / "downsamplers" / 0),
                    out_ch,
                    out_ch,
                    c.downsample_padding,
                )
            });
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mid = vs / "mid_block";
        let last = ch[n - 1];
        let mid_resnet = |j: i64| {
            ResnetBlock2D::new(
                &(&mid / "resnets" / j),
                ResnetSettings {
                    in_channels: last,
                    out_channels: last,
                    temb_channels: Some(temb),
                    groups: c.norm_num_groups,
                    eps: c.norm_eps,
                    output_scale_factor: c.mid_block_scale_factor,
                },
            )
        };
        let mid_block = MidBlock {
            resnet_0: mid_resnet(0),
            attention: transformer(
                &(&mid / "attentions" / 0),
                last,
                c.attention_heads[n - 1],
                c.transformer_layers_per_block[n - 1],
            ),
            resnet_1: mid_resnet(1),
        };

        let mut up_blocks = Vec::with_capacity(n);
        let rev: Vec<i64> = ch.iter().rev().copied().collect();
        let mut out_ch = rev[0];
        for (i, kind) in c.up_blocks.iter().enumerate() {
            let p = vs / "up_blocks" / i;
            let level = n - 1 - i;
            let prev_out = out_ch;
            out_ch = rev[i];
            let in_ch = rev[(i + 1).min(n - 1)];
            let layers = c.layers_per_block + 1;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { in_ch } else { out_ch };
                    let res_in = if j == 0 { prev_out } else { out_ch };
                    resnet(&(&p / "resnets" / j), res_in + skip, out_ch)
                })
                .collect();
            let attentions = match kind {
                BlockKind::CrossAttn => (0..layers)
                    .map(|j| {
                        transformer(
                            &(&p / "attentions" / j),
                            out_ch,
                            c.attention_heads[level],
                            c.transformer_layers_per_block[level],
                        )
                    })
                    .collect(),
                BlockKind::Plain => Vec::new(),
            };
            let upsampler =
                (i + 1 < n).then(|| Upsample2D::new(&(&p / "upsamplers" / 0), out_ch, out_ch));
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: config.clone(),
            conv_in,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                &(vs / "conv_norm_out"),
                c.norm_num_groups,
                ch[0],
                c.norm_eps,
            ),
            conv_out: Conv2d::new(&(vs / "conv_out"), ch[0], c.out_channels, 3, 1, 1),
            linear_layers: Vec::new(),
            checkpointing: None,
        })
    }

    /// Gradient checkpointing of every ResnetBlock2D and Transformer2DModel
    /// (`--gradient_checkpointing`, as Diffusers' `enable_gradient_checkpointing`): `Some` with
    /// the trainable tensors the blocks use (the LoRA weights on the U-Net), `None` to turn it
    /// off. Outputs and gradients are unchanged; backward recomputes each block.
    pub fn set_gradient_checkpointing(
        &mut self,
        checkpointing: Option<super::checkpoint::Checkpointing>,
    ) {
        self.checkpointing = checkpointing;
    }

    /// `resnet(x, emb)`, checkpointed when enabled.
    fn resnet(&self, block: &ResnetBlock2D, x: &Tensor, emb: &Tensor) -> Tensor {
        match &self.checkpointing {
            Some(c) => {
                let block = block.shallow_copy();
                c.run(move |i| block.forward(&i[0], Some(&i[1])), &[x, emb])
            }
            None => block.forward(x, Some(emb)),
        }
    }

    /// `attn(x, context)`, checkpointed when enabled.
    fn attention(&self, block: &Transformer2DModel, x: &Tensor, ctx: &Tensor) -> Tensor {
        match &self.checkpointing {
            Some(c) => {
                let block = block.shallow_copy();
                c.run(move |i| block.forward(&i[0], &i[1]), &[x, ctx])
            }
            None => block.forward(x, ctx),
        }
    }

    /// The configuration this U-Net was built from.
    pub fn config(&self) -> &UnetConfig {
        &self.config
    }

    /// Predicts noise (ε) or velocity (v, SD2.x-v) for `sample` at `timestep`.
    ///
    /// Runs in the weights' dtype: `sample`, `encoder_hidden_states` and the added
    /// conditioning must already have it (the timestep embedding is computed in f32 and cast,
    /// as Diffusers does).
    ///
    /// # Shapes
    /// `sample` `[N, in_channels, h, w]` latents (h, w in latent cells = pixels / 8);
    /// `timestep` `[]`, `[1]` or `[N]`, integer or float, 0..1000;
    /// `encoder_hidden_states` `[N, S, cross_attention_dim]`;
    /// `added` required for SDXL (see [`TextTimeCondition`]), ignored otherwise
    /// → `[N, out_channels, h, w]`.
    ///
    /// # Panics
    /// When an SDXL U-Net gets no `added` conditioning, or on shape mismatches (caller bugs).
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&TextTimeCondition>,
    ) -> Tensor {
        let n = sample.size()[0];
        let kind = sample.kind();
        let ctx = encoder_hidden_states;

        // 1. time: sinusoidal projection (f32) → sample dtype → MLP
        let timesteps = timestep.reshape([-1]).expand([n], false);
        let t_emb = timestep_embedding(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )
        .to_kind(kind);
        let emb = self.time_embedding.forward(&t_emb);
        // 1b. SDXL text_time: [text_embeds, sinusoid(time_ids) flattened] → add_embedding
        let emb = if let (Some(add_embedding), Some(a)) =
            (&self.add_embedding, self.config.addition)
        {
            let cond = added
                .expect("an SDXL U-Net (addition_embed_type text_time) needs TextTimeCondition");
            let time_embeds = timestep_embedding(
                &cond.time_ids.reshape([-1]),
                a.time_embed_dim,
                self.config.flip_sin_to_cos,
                self.config.freq_shift,
            )
            .reshape([cond.text_embeds.size()[0], -1]);
            let add_embeds = Tensor::cat(&[cond.text_embeds.to_kind(Kind::Float), time_embeds], -1)
                .to_kind(emb.kind());
            emb + add_embedding.forward(&add_embeds)
        } else {
            emb
        };

        // 2. pre-process
        let mut h = self.conv_in.forward(sample);

        // 3. down
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = self.resnet(resnet, &h, &emb);
                if let Some(attn) = block.attentions.get(j) {
                    h = self.attention(attn, &h, ctx);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h);
                skips.push(h.shallow_clone());
            }
        }

        // 4. mid
        h = self.resnet(&self.mid_block.resnet_0, &h, &emb);
        h = self.attention(&self.mid_block.attention, &h, ctx);
        h = self.resnet(&self.mid_block.resnet_1, &h, &emb);

        // 5. up: each resnet takes the latest skip, concatenated on channels
        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up resnet by construction");
                h = self.resnet(resnet, &Tensor::cat(&[&h, &skip], 1), &emb);
                if let Some(attn) = block.attentions.get(j) {
                    h = self.attention(attn, &h, ctx);
                }
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the next skip's size (equals ×2 when sizes are even).
                let size = skips.last().map(|s| {
                    let s = s.size();
                    [s[2], s[3]]
                });
                h = up.forward(&h, size);
            }
        }

        // 6. post-process
        let h = self.conv_norm_out.forward(&h).silu();
        self.conv_out.forward(&h)
    }
}
