//! Residual blocks and resamplers shared by the U-Net and the VAE.

use tch::{Tensor, nn::Path};

use super::layers::{Conv2d, GroupNorm};

/// Settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetSettings {
    /// Input channels.
    pub in_channels: i64,
    /// Output channels; a 1×1 `conv_shortcut` exists when they differ from the input's.
    pub out_channels: i64,
    /// Width of the time embedding (`None`: no `time_emb_proj`, as in the VAE).
    pub temb_channels: Option<i64>,
    /// GroupNorm groups (norm1 and norm2).
    pub groups: i64,
    /// GroupNorm epsilon (U-Net 1e-5 from `norm_eps`, VAE 1e-6).
    pub eps: f64,
    /// The output is divided by this (`mid_block_scale_factor`; 1 elsewhere).
    pub output_scale_factor: f64,
}

/// `ResnetBlock2D` with `time_embedding_norm="default"`, SiLU, no dropout at inference.
///
/// # Shapes
/// `x` `[N, in, H, W]`, `temb` `[N, temb_channels]` → `[N, out, H, W]`.
///
/// # Source
/// diffusers `models/resnet.py` `ResnetBlock2D.forward`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<super::layers::Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Creates `p.{norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut}`.
    pub fn new(p: &Path, s: ResnetSettings) -> Self {
        Self {
            norm1: GroupNorm::new(&(p / "norm1"), s.groups, s.in_channels, s.eps),
            conv1: Conv2d::new(&(p / "conv1"), s.in_channels, s.out_channels, 3, 1, 1),
            time_emb_proj: s.temb_channels.map(|t| {
                super::layers::Linear::new(&(p / "time_emb_proj"), t, s.out_channels, true)
            }),
            norm2: GroupNorm::new(&(p / "norm2"), s.groups, s.out_channels, s.eps),
            conv2: Conv2d::new(&(p / "conv2"), s.out_channels, s.out_channels, 3, 1, 1),
            conv_shortcut: (s.in_channels != s.out_channels).then(|| {
                Conv2d::new(
                    &(p / "conv_shortcut"),
                    s.in_channels,
                    s.out_channels,
                    1,
                    1,
                    0,
                )
            }),
            output_scale_factor: s.output_scale_factor,
        }
    }

    /// A copy sharing every tensor and adapter slot (for a gradient-checkpoint closure).
    pub(crate) fn shallow_copy(&self) -> Self {
        use super::checkpoint::{copy_conv, copy_group_norm, copy_linear};
        Self {
            norm1: copy_group_norm(&self.norm1),
            conv1: copy_conv(&self.conv1),
            time_emb_proj: self.time_emb_proj.as_ref().map(copy_linear),
            norm2: copy_group_norm(&self.norm2),
            conv2: copy_conv(&self.conv2),
            conv_shortcut: self.conv_shortcut.as_ref().map(copy_conv),
            output_scale_factor: self.output_scale_factor,
        }
    }

    /// Runs the block; `temb` is ignored when the block has no `time_emb_proj`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        // 1. norm1 → SiLU → conv1
        let h = self.conv1.forward(&self.norm1.forward(x).silu());
        // 2. add the projected time embedding per channel
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => h + proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1),
            _ => h,
        };
        // 3. norm2 → SiLU → (dropout) → conv2
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        // 4. shortcut and residual sum
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D` with a convolution: 3×3, stride 2.
///
/// `padding` 1 pads every side (U-Net); `padding` 0 first pads right and bottom by one
/// (VAE encoder), as Diffusers does.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    /// Creates `p.conv`.
    pub fn new(p: &Path, channels: i64, out_channels: i64, padding: i64) -> Self {
        Self {
            conv: Conv2d::new(&(p / "conv"), channels, out_channels, 3, 2, padding),
            asymmetric_pad: padding == 0,
        }
    }

    /// `[N, C, H, W]` → `[N, C', ⌈H/2⌉, ⌈W/2⌉]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.asymmetric_pad {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// `Upsample2D` with a convolution: nearest ×2 (or to `output_size`) then 3×3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Creates `p.conv`.
    pub fn new(p: &Path, channels: i64, out_channels: i64) -> Self {
        Self {
            conv: Conv2d::new(&(p / "conv"), channels, out_channels, 3, 1, 1),
        }
    }

    /// `[N, C, H, W]` → `[N, C', 2H, 2W]`, or `[N, C', h, w]` with `output_size = Some([h, w])`
    /// (the U-Net passes the skip connection's size so odd latent sizes line up).
    pub fn forward(&self, x: &Tensor, output_size: Option<[i64; 2]>) -> Tensor {
        let size = x.size();
        let out = output_size.unwrap_or([size[2] * 2, size[3] * 2]);
        // Diffusers upsamples bf16 in f32 (older kernels lacked bf16 nearest); same values.
        let up = x.upsample_nearest2d(out, None, None);
        self.conv.forward(&up)
    }
}
