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

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use tch::{Kind, Tensor, nn::Path};

use crate::lora::names::{Layer, LayerKind};

/// Registers an uninitialised, non-trainable variable `name` of `shape` under `p`, with the
/// var store's kind and device.
pub fn param(p: &Path, name: &str, shape: &[i64]) -> Tensor {
    param_kind(p, name, shape, p.kind())
}

/// [`param`] with an explicit kind.
pub fn param_kind(p: &Path, name: &str, shape: &[i64], kind: Kind) -> Tensor {
    p.add(name, Tensor::empty(shape, (kind, p.device())), false)
}

/// Something that adds to a layer's output (a LoRA module): `delta(x)` is added to the base
/// layer's output for the same input `x`, or nothing when it returns `None` (e.g. a module
/// dropped for this call).
pub trait LayerAdapter: Send {
    /// The addition to the base output for input `x` (same shape as the base output).
    fn delta(&self, x: &Tensor) -> Option<Tensor>;
}

/// A shared, lockable adapter (the network that owns it keeps another handle to change its
/// multiplier or train it).
pub type SharedAdapter = Arc<Mutex<dyn LayerAdapter>>;

/// The adapters attached to one layer, shared between the layer and its [`LayerHandle`].
#[derive(Clone, Default)]
pub struct AdapterSlot(Arc<Mutex<Vec<SharedAdapter>>>);

impl std::fmt::Debug for AdapterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AdapterSlot({} adapters)", self.len())
    }
}

impl AdapterSlot {
    /// Attaches an adapter.
    pub fn push(&self, adapter: SharedAdapter) {
        self.0.lock().expect("adapter slot lock").push(adapter);
    }

    /// Detaches `adapter` (compared by identity); true when it was attached.
    pub fn remove(&self, adapter: &SharedAdapter) -> bool {
        let mut v = self.0.lock().expect("adapter slot lock");
        let before = v.len();
        v.retain(|a| !Arc::ptr_eq(a, adapter));
        v.len() != before
    }

    /// Number of attached adapters.
    pub fn len(&self) -> usize {
        self.0.lock().expect("adapter slot lock").len()
    }

    /// True when no adapter is attached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `base + Σ adapter.delta(x)`.
    fn apply(&self, x: &Tensor, base: Tensor) -> Tensor {
        let adapters = self.0.lock().expect("adapter slot lock");
        let mut out = base;
        for a in adapters.iter() {
            if let Some(d) = a.lock().expect("adapter lock").delta(x) {
                out += d;
            }
        }
        out
    }
}

/// A Linear or Conv2d layer of a built model, as seen from outside: its Diffusers module path
/// inside the component, geometry, weight (sharing storage with the model, so merging into it
/// changes the model) and adapter slot.
#[derive(Debug)]
pub struct LayerHandle {
    /// Module path inside the component, e.g. `down_blocks.0.attentions.0.proj_in`.
    pub path: String,
    /// Geometry.
    pub kind: LayerKind,
    /// The layer's weight (shallow clone of the model's variable).
    pub weight: Tensor,
    /// Adapters applied in the layer's forward.
    pub slot: AdapterSlot,
}

impl LayerHandle {
    /// The path and geometry, for LoRA module selection.
    pub fn layer(&self) -> Layer {
        Layer {
            path: self.path.clone(),
            kind: self.kind,
        }
    }
}

thread_local! {
    static COLLECTORS: RefCell<Vec<Vec<LayerHandle>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `build` and returns what it built together with every Linear and Conv2d layer created
/// during the call on this thread, in creation order (the reference's `named_modules` order for
/// modules built in forward order). Paths are relative to the var-store root. Nested calls
/// each get their own list.
pub fn collect_layers<T>(build: impl FnOnce() -> T) -> (T, Vec<LayerHandle>) {
    COLLECTORS.with(|c| c.borrow_mut().push(Vec::new()));
    let built = build();
    let layers = COLLECTORS
        .with(|c| c.borrow_mut().pop())
        .unwrap_or_default();
    (built, layers)
}

fn register(p: &Path, kind: LayerKind, weight: &Tensor, slot: &AdapterSlot) {
    COLLECTORS.with(|c| {
        if let Some(top) = c.borrow_mut().last_mut() {
            top.push(LayerHandle {
                path: p.components().collect::<Vec<_>>().join("."),
                kind,
                weight: weight.shallow_clone(),
                slot: slot.clone(),
            });
        }
    });
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
    /// Adapters (LoRA modules) added to the output.
    pub adapters: AdapterSlot,
}

impl Linear {
    /// Creates `p.weight` `[out, in]` and, when `bias`, `p.bias` `[out]`, with the var store's
    /// kind.
    pub fn new(p: &Path, in_features: i64, out_features: i64, bias: bool) -> Self {
        Self::with_kind(p, in_features, out_features, bias, p.kind())
    }

    /// [`Linear::new`] with an explicit kind.
    pub fn with_kind(
        p: &Path,
        in_features: i64,
        out_features: i64,
        bias: bool,
        kind: Kind,
    ) -> Self {
        let weight = param_kind(p, "weight", &[out_features, in_features], kind);
        let bias = bias.then(|| param_kind(p, "bias", &[out_features], kind));
        let adapters = AdapterSlot::default();
        let geometry = LayerKind::Linear {
            in_features: in_features as usize,
            out_features: out_features as usize,
        };
        register(p, geometry, &weight, &adapters);
        Self {
            weight,
            bias,
            adapters,
        }
    }

    /// Applies the layer (and any attached adapters) to the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = x.linear(&self.weight, self.bias.as_ref());
        if self.adapters.is_empty() {
            base
        } else {
            self.adapters.apply(x, base)
        }
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
    /// Adapters (LoRA modules) added to the output.
    pub adapters: AdapterSlot,
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
        let adapters = AdapterSlot::default();
        let (k, st, pd) = (kernel as usize, stride as usize, padding as usize);
        let geometry = LayerKind::Conv2d {
            in_channels: in_channels as usize,
            out_channels: out_channels as usize,
            kernel: [k, k],
            stride: [st, st],
            padding: [pd, pd],
        };
        register(p, geometry, &weight, &adapters);
        Self {
            weight,
            bias,
            stride,
            padding,
            adapters,
        }
    }

    /// Convolves `x` `[N, C, H, W]` (and adds any attached adapters).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let base = x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        );
        if self.adapters.is_empty() {
            base
        } else {
            self.adapters.apply(x, base)
        }
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
