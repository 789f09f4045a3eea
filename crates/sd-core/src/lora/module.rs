//! One LoRA module: `lora_down`/`lora_up` tensors, alpha, multiplier and dropouts, with the
//! reference's initialisation, forward delta and weight delta.
//!
//! # Source
//! `../shared/spec/lora-format.md` §2 (shapes), §3 (maths); sd-scripts `networks/lora.py`
//! (`LoRAModule.__init__`, `forward`, `get_weight` / `merge_to`).

use std::path::PathBuf;

use tch::{Kind, Tensor, nn};

use super::names::{LayerKind, ModuleSpec};
use super::{LoraError, Result};

/// Training-time dropouts of a module (spec §3.2); all are ignored outside training.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Dropouts {
    /// Standard inverted dropout on the rank-dimensional hidden activation `down(x)`
    /// (`--network_dropout`).
    pub dropout: Option<f64>,
    /// Per-sample rank mask with keep probability `1 − p`; scale × `1/(1 − p)` (`rank_dropout`).
    pub rank_dropout: Option<f64>,
    /// Probability of skipping the whole module for one forward call (`module_dropout`).
    pub module_dropout: Option<f64>,
}

/// A LoRA module attached to one Linear or Conv2d layer.
///
/// Tensors are stored in the target's layout: Linear `down [r, in]`, `up [out, r]`; Conv2d
/// `down [r, in, kh, kw]`, `up [out, r, 1, 1]`.
#[derive(Debug)]
pub struct LoraModule {
    name: String,
    layer: LayerKind,
    /// Down projection ("A").
    pub lora_down: Tensor,
    /// Up projection ("B").
    pub lora_up: Tensor,
    rank: usize,
    alpha: f64,
    /// Strength when applied (1.0 in training).
    pub multiplier: f64,
    /// Training dropouts.
    pub dropouts: Dropouts,
}

fn shape_err(name: &str, expected: String, found: Vec<i64>) -> LoraError {
    LoraError::ShapeMismatch {
        path: PathBuf::from("<memory>"),
        key: name.to_owned(),
        expected,
        found,
    }
}

impl LoraModule {
    /// Creates a freshly initialised module as trainable variables of `root` named
    /// `<spec.name>.lora_down.weight` and `<spec.name>.lora_up.weight` (the file keys), in f32 on
    /// the var store's device.
    ///
    /// Initialisation (spec §3.1): down Kaiming-uniform with a = √5, i.e. U(−b, b) with
    /// b = 1/√fan_in (fan_in = in·kh·kw), drawn with one `uniform_` call from the global
    /// generator as PyTorch does; up zeros, so ΔW = 0.
    pub fn init(root: &nn::Path, spec: &ModuleSpec) -> Self {
        let down_shape: Vec<i64> = spec.down_shape().iter().map(|&d| d as i64).collect();
        let up_shape: Vec<i64> = spec.up_shape().iter().map(|&d| d as i64).collect();
        let fan_in: i64 = down_shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f64).sqrt();
        let module = root / spec.name.as_str();
        let init = tch::no_grad(|| {
            Tensor::empty(&down_shape, (Kind::Float, root.device())).uniform_(-bound, bound)
        });
        let lora_down = (&module / "lora_down").var_copy("weight", &init);
        let lora_up = (&module / "lora_up").zeros("weight", &up_shape);
        LoraModule {
            name: spec.name.clone(),
            layer: spec.layer,
            lora_down,
            lora_up,
            rank: spec.rank,
            alpha: f64::from(spec.alpha),
            multiplier: 1.0,
            dropouts: Dropouts::default(),
        }
    }

    /// Wraps loaded tensors for the layer `layer`, checking shapes.
    ///
    /// Accepts the 4-D `[r, in, 1, 1]` / `[out, r, 1, 1]` pair for a Linear target and the 2-D
    /// pair for a 1×1 conv target (SD2 `proj_in`/`proj_out`, spec §2), reshaping to the target's
    /// layout. `alpha` `None` or 0 means alpha = rank. Tensors keep their dtype and device.
    ///
    /// # Errors
    /// [`LoraError::ShapeMismatch`] (named by `name`) when the shapes do not fit the layer.
    pub fn from_tensors(
        name: &str,
        layer: LayerKind,
        down: Tensor,
        up: Tensor,
        alpha: Option<f64>,
    ) -> Result<Self> {
        let ds = down.size();
        let us = up.size();
        let (in_dim, out_dim) = (layer.in_dim() as i64, layer.out_dim() as i64);
        let rank = *ds
            .first()
            .ok_or_else(|| shape_err(name, "a 2-D or 4-D lora_down".into(), ds.clone()))?;
        let (down, up) = match layer {
            LayerKind::Linear { .. } => {
                let down_ok = ds == [rank, in_dim] || ds == [rank, in_dim, 1, 1];
                let up_ok = us == [out_dim, rank] || us == [out_dim, rank, 1, 1];
                if !down_ok || !up_ok {
                    return Err(shape_err(
                        name,
                        format!(
                            "lora_down [r, {in_dim}] and lora_up [{out_dim}, r] (or with trailing 1×1), found lora_up {us:?} and lora_down"
                        ),
                        ds,
                    ));
                }
                (down.reshape([rank, in_dim]), up.reshape([out_dim, rank]))
            }
            LayerKind::Conv2d { kernel, .. } => {
                let (kh, kw) = (kernel[0] as i64, kernel[1] as i64);
                let down_ok =
                    ds == [rank, in_dim, kh, kw] || (kernel == [1, 1] && ds == [rank, in_dim]);
                let up_ok = us == [out_dim, rank, 1, 1] || us == [out_dim, rank];
                if !down_ok || !up_ok {
                    return Err(shape_err(
                        name,
                        format!(
                            "lora_down [r, {in_dim}, {kh}, {kw}] and lora_up [{out_dim}, r, 1, 1], found lora_up {us:?} and lora_down"
                        ),
                        ds,
                    ));
                }
                (
                    down.reshape([rank, in_dim, kh, kw]),
                    up.reshape([out_dim, rank, 1, 1]),
                )
            }
        };
        let rank = usize::try_from(rank).unwrap_or(0);
        if rank == 0 {
            return Err(shape_err(name, "a rank of at least 1".into(), ds));
        }
        let alpha = match alpha {
            Some(a) if a != 0.0 => a,
            _ => rank as f64,
        };
        Ok(LoraModule {
            name: name.to_owned(),
            layer,
            lora_down: down,
            lora_up: up,
            rank,
            alpha,
            multiplier: 1.0,
            dropouts: Dropouts::default(),
        })
    }

    /// Module name (`lora_unet_…`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Geometry of the wrapped layer.
    pub fn layer(&self) -> LayerKind {
        self.layer
    }

    /// Rank r.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Alpha (never 0: a 0/absent alpha was replaced by the rank).
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The LoRA branch output `multiplier · scale · up(down(x))` to add to the layer's output,
    /// or `None` when module dropout skipped the module for this call (training only).
    ///
    /// # Shapes
    /// Linear: `x [..., in]` → `[..., out]`. Conv2d: `x [B, in, H, W]` → `[B, out, H', W']`; the
    /// down conv uses the layer's kernel, stride and padding, the up conv is 1×1.
    ///
    /// Training (`train = true`), in the reference's order (spec §3.2): 1. module dropout
    /// (`rand(1) < p` skips, on the CPU generator); 2. dropout on `down(x)`; 3. rank dropout:
    /// mask `rand(B, r) > p` broadcast over tokens (3-D) or positions (4-D), scale × 1/(1 − p).
    pub fn forward_delta(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        // 1. module dropout
        if train && let Some(p) = self.dropouts.module_dropout {
            let draw = Tensor::rand([1], (Kind::Float, tch::Device::Cpu)).double_value(&[0]);
            if draw < p {
                return None;
            }
        }
        // 2. down projection
        let mut lx = match self.layer {
            LayerKind::Linear { .. } => x.linear(&self.lora_down, None::<Tensor>),
            LayerKind::Conv2d {
                stride, padding, ..
            } => x.conv2d(
                &self.lora_down,
                None::<Tensor>,
                [stride[0] as i64, stride[1] as i64],
                [padding[0] as i64, padding[1] as i64],
                [1, 1],
                1,
            ),
        };
        // 3. neuron dropout
        if train && let Some(p) = self.dropouts.dropout {
            lx = lx.dropout(p, true);
        }
        // 4. rank dropout
        let mut scale = self.scale();
        if train && let Some(p) = self.dropouts.rank_dropout {
            let batch = lx.size()[0];
            let mut mask = Tensor::rand([batch, self.rank as i64], (Kind::Float, lx.device()))
                .gt(p)
                .to_kind(lx.kind());
            match lx.dim() {
                3 => mask = mask.unsqueeze(1),
                4 => mask = mask.unsqueeze(-1).unsqueeze(-1),
                _ => {}
            }
            lx *= mask;
            scale *= 1.0 / (1.0 - p);
        }
        // 5. up projection, multiplier and scale
        let up = match self.layer {
            LayerKind::Linear { .. } => lx.linear(&self.lora_up, None::<Tensor>),
            LayerKind::Conv2d { .. } => {
                lx.conv2d(&self.lora_up, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            }
        };
        Some(up * (self.multiplier * scale))
    }

    /// ΔW = scale · up ⊗ down in f32 whatever the storage dtype (multiplier not applied).
    ///
    /// # Shapes
    /// Linear `[out, in]` = `up @ down`; conv `[out, in, kh, kw]` =
    /// `(up.reshape(out, r) @ down.reshape(r, in·kh·kw)).reshape(out, in, kh, kw)`, which covers
    /// 1×1 and 3×3 (spec §3.3).
    pub fn delta_weight(&self) -> Tensor {
        let down = self.lora_down.to_kind(Kind::Float);
        let up = self.lora_up.to_kind(Kind::Float);
        let r = self.rank as i64;
        let w = match self.layer {
            LayerKind::Linear { .. } => up.mm(&down),
            LayerKind::Conv2d {
                in_channels,
                out_channels,
                kernel,
                ..
            } => up
                .reshape([out_channels as i64, r])
                .mm(&down.reshape([r, -1]))
                .reshape([
                    out_channels as i64,
                    in_channels as i64,
                    kernel[0] as i64,
                    kernel[1] as i64,
                ]),
        };
        w * self.scale()
    }
}
