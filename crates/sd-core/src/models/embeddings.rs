//! Timestep embeddings of the U-Net: the sinusoidal projection (`Timesteps`) and the MLP
//! that follows it (`TimestepEmbedding`).

use tch::{Kind, Tensor, nn::Path};

use super::layers::Linear;

/// Sinusoidal embedding of (possibly fractional) timesteps, computed in f32.
///
/// `freqs[i] = exp(-ln(10000) · i / (dim/2 − freq_shift))` for `i < dim/2`; the embedding is
/// `[sin(t·freqs), cos(t·freqs)]`, or `[cos, sin]` when `flip_sin_to_cos`; an odd `dim` gets
/// one zero column appended.
///
/// # Shapes
/// `timesteps` `[N]` (any numeric kind; timesteps 0..1000, or SDXL's size/crop values in
/// pixels) → `[N, dim]` f32.
///
/// # Source
/// diffusers `embeddings.get_timestep_embedding` (max_period 10000, scale 1).
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: i64,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Tensor {
    let half = dim / 2;
    let exponent = Tensor::arange(half, (Kind::Float, timesteps.device())) * (-(10000f64.ln()));
    let exponent = exponent / (half as f64 - freq_shift);
    let freqs = exponent.exp();
    let args = timesteps.to_kind(Kind::Float).unsqueeze(-1) * freqs.unsqueeze(0);
    let (first, second) = if flip_sin_to_cos {
        (args.cos(), args.sin())
    } else {
        (args.sin(), args.cos())
    };
    let emb = Tensor::cat(&[first, second], -1);
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1, 0, 0])
    } else {
        emb
    }
}

/// `TimestepEmbedding`: `linear_2(silu(linear_1(x)))`.
///
/// # Shapes
/// `[N, in]` → `[N, out]`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    /// `in → out`.
    pub linear_1: Linear,
    /// `out → out`.
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// Creates `p.linear_1` and `p.linear_2`.
    pub fn new(p: &Path, in_features: i64, out_features: i64) -> Self {
        Self {
            linear_1: Linear::new(&(p / "linear_1"), in_features, out_features, true),
            linear_2: Linear::new(&(p / "linear_2"), out_features, out_features, true),
        }
    }

    /// Applies the MLP.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}
