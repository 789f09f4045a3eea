//! Parameterised primitives shared by the U-Net, the VAE and the text encoders: `Linear`,
//! `Conv2d`, `GroupNorm`, `LayerNorm`, each owning its variables in a `tch::nn::VarStore`
//! under the Diffusers names `weight` / `bias`.
//!
//! Variables are created **uninitialised** (`Tensor::empty`) with the var store's kind and
//! device, and registered as *not trainable*: a model is built once and then filled by
//! [`crate::weights::load_var_store`], so there is no random initialisation to pay for, the
//! weights go straight to the target device and dtype, and untouched pages of a model that is
//! only inspected (name/shape checks) are never resident. Frozen base weights are what LoRA
//! training wants; `VarStore::trainable_variables` therefore stays empty for these models.

use tch::{Tensor, nn::Path};

/// Registers an uninitialised, non-trainable variable `name` of `shape` under `p`, with the
/// var store's kind and device.
pub fn param(p: &Path, name: &str, shape: &[i64]) -> Tensor {
    p.add(name, Tensor::empty(shape, (p.kind(), p.device())), false)
}

/// `torch.nn.Linear`: `y = x · Wᵀ + b`.
///
/// # Shapes
/// weight `[out, in]`, bias `[out]`; input `[…, in]` → output `[…, out]`.
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, absent for `bias=False` layers (attention q/k/v in the U-Net).
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Creates `p.weight` `[out, in]` and, when `bias`, `p.bias` `[out]`.
    pub fn new(p: &Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        let weight = param(p, "weight", &[out_features, in_features]);
        let bias = bias.then(|| param(p, "bias", &[out_features]));
        Self { weight, bias }
    }

    /// Applies the layer to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// `torch.nn.Conv2d` with square kernel, stride and padding, dilation 1, groups 1.
///
/// # Shapes
/// weight `[out, in, k, k]`, bias `[out]`; input `[N, in, H, W]` → `[N, out, H', W']`.
#[derive(Debug)]
pub struct Conv2d {
    /// `[out, in, k, k]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// Stride in both directions.
    pub stride: i64,
    /// Zero padding on every side.
    pub padding: i64,
}

impl Conv2d {
    /// Creates `p.weight` `[out, in, kernel, kernel]` and `p.bias` `[out]`.
    pub fn new(
        p: &Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        let weight = param(p, "weight", &[out_channels, in_channels, kernel, kernel]);
        let bias = Some(param(p, "bias", &[out_channels]));
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }

    /// Convolves `x` `[N, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        )
    }
}

/// `torch.nn.GroupNorm` with affine weight and bias.
///
/// # Shapes
/// weight, bias `[C]`; input `[N, C, …]`.
#[derive(Debug)]
pub struct GroupNorm {
    /// `[C]`.
    pub weight: Tensor,
    /// `[C]`.
    pub bias: Tensor,
    /// Number of groups (divides C).
    pub groups: i64,
    /// Added to the variance.
    pub eps: f64,
}

impl GroupNorm {
    /// Creates `p.weight` and `p.bias`, both `[channels]`.
    pub fn new(p: &Path, groups: i64, channels: i64, eps: f64) -> Self {
        Self {
            weight: param(p, "weight", &[channels]),
            bias: param(p, "bias", &[channels]),
            groups,
            eps,
        }
    }

    /// Normalises `x` `[N, C, …]` per group of channels.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// `torch.nn.LayerNorm` over the last dimension, with affine weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    /// `[D]`.
    pub weight: Tensor,
    /// `[D]`.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Creates `p.weight` and `p.bias`, both `[dim]`.
    pub fn new(p: &Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: param(p, "weight", &[dim]),
            bias: param(p, "bias", &[dim]),
            eps,
        }
    }

    /// Normalises the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = self.weight.size()[0];
        x.layer_norm([dim], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}
