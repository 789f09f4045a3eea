//! Merging LoRAs into a single-file checkpoint: W ← W + ratio · scale · (up ⊗ down).
//!
//! Works on the checkpoint's own keys (spec tools §1.2 "direct implementation on checkpoint
//! keys is equivalent"): each LoRA module is mapped to its single-file key and row block by
//! [`super::targets`], the checkpoint is streamed key by key from its memory map, and only
//! keys that receive a ΔW are decoded, summed in f32 and re-encoded; every other key is
//! copied byte for byte (same dtype, same bytes). SD1, SD2 (OpenCLIP `in_proj` q/k/v rows) and
//! SDXL (both text encoders) go through the same code.
//!
//! # Source
//! sd-scripts `networks/merge_lora.py` (`merge_to_sd_model`), `networks/sdxl_merge_lora.py`;
//! `../shared/spec/tools.md` §1.2, §2.2.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, KeyMap, normalize_ldm_key};
use tch::{Device, Kind, Tensor};

use super::source::{CheckpointSource, tensor_bytes};
use super::stream::{TensorSpec, write_streaming};
use super::targets::{Target, lora_targets};
use super::torch_save::{TorchTopLevel, write_torch_checkpoint};
use super::{MergeError, Result, preview};
use crate::lora::LoraWeights;
use crate::tensor::{from_bytes, kind_of};

/// One LoRA to merge: where it came from, its weight in the merge, its modules.
#[derive(Debug)]
pub struct LoraInput {
    /// The file (for messages and modelspec titles).
    pub path: PathBuf,
    /// Ratio (`--ratios`), any finite value; 0 skips the file.
    pub ratio: f64,
    /// The loaded modules (kohya names).
    pub weights: LoraWeights,
}

/// What one LoRA contributes to a checkpoint merge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyCounts {
    /// The LoRA file.
    pub path: PathBuf,
    /// Modules applied per component.
    pub applied: BTreeMap<Component, usize>,
    /// Module names with no tensor in the checkpoint, sorted.
    pub unmatched: Vec<String>,
}

#[derive(Debug, Clone)]
struct Delta {
    lora: usize,
    module: String,
    rows: Option<(usize, usize)>,
}

/// The checked plan of a checkpoint merge: which key receives which modules.
#[derive(Debug)]
pub struct CheckpointPlan {
    /// Family detected from the checkpoint's keys.
    pub family: ModelFamily,
    /// Per LoRA input: applied counts and unmatched modules.
    pub counts: Vec<ApplyCounts>,
    /// Keys of U-Net, text encoder(s) and VAE (those `--save_precision` converts).
    model_keys: Vec<bool>,
    deltas: HashMap<String, Vec<Delta>>,
}

impl CheckpointPlan {
    /// Number of checkpoint keys that receive at least one ΔW.
    pub fn modified_keys(&self) -> usize {
        self.deltas.len()
    }
}

fn shape_of(t: &Tensor) -> Vec<i64> {
    t.size()
}

/// Checks that `up ⊗ down` fits `target` rows `[h, …]` of a tensor of shape `full`; returns the
/// ΔW shape to add.
fn delta_shape(
    up: &Tensor,
    down: &Tensor,
    full: &[usize],
    rows: Option<usize>,
) -> std::result::Result<Vec<i64>, String> {
    let (us, ds) = (shape_of(up), shape_of(down));
    let out = rows.unwrap_or(*full.first().ok_or("a scalar target")?) as i64;
    let mut want: Vec<i64> = full.iter().map(|&d| d as i64).collect();
    want[0] = out;
    if us.len() < 2 || ds.len() < 2 {
        return Err(format!("up {us:?} / down {ds:?} are not matrices"));
    }
    if us[0] != out || us[2..].iter().any(|&d| d != 1) {
        return Err(format!("lora_up [{out}, r(, 1, 1)], found {us:?}"));
    }
    if want.len() < 2 || ds[1] != want[1] {
        return Err(format!(
            "lora_down with {} input features/channels (target {want:?}), found {ds:?}",
            want.get(1).copied().unwrap_or(0)
        ));
    }
    let down_kernel: Vec<i64> = if ds.len() == 4 {
        ds[2..].to_vec()
    } else {
        vec![1, 1]
    };
    let target_kernel: Vec<i64> = if want.len() == 4 {
        want[2..].to_vec()
    } else {
        vec![1, 1]
    };
    if down_kernel != target_kernel {
        return Err(format!(
            "lora_down kernel {target_kernel:?} (target {want:?}), found {ds:?}"
        ));
    }
    Ok(want)
}

/// ΔW = ratio · scale · up ⊗ down in f32, shaped `shape` (Linear, 1×1 and k×k kernels; 4-D
/// LoRA tensors on a 2-D weight are squeezed, 2-D ones on a 1×1 conv unsqueezed).
///
/// `factor_kind` is the precision the factors are rounded to first (`--precision`); the
/// product and the sum are always f32.
pub fn delta_weight(
    up: &Tensor,
    down: &Tensor,
    ratio: f64,
    scale: f64,
    shape: &[i64],
    factor_kind: Kind,
    device: Device,
) -> Tensor {
    let r = down.size()[0];
    let up = up
        .to_device(device)
        .to_kind(factor_kind)
        .to_kind(Kind::Float)
        .reshape([-1, r]);
    let down = down
        .to_device(device)
        .to_kind(factor_kind)
        .to_kind(Kind::Float)
        .reshape([r, -1]);
    (up.mm(&down) * ratio * scale).reshape(shape)
}

/// `w2 ← w2 + coefficient · up ⊗ down` in place, one GEMM (`addmm_`), for `w2` an f32
/// `[out, in·k·k]` matrix (or a row block of one) on `device`.
///
/// `factor_kind` is the precision the factors are rounded to first (`--precision`); the
/// product and the sum are f32. The coefficient (ratio · scale) is applied to the small `up`
/// factor before the product, so no full-size temporary is made.
///
/// # Shapes
/// `w2`: `[out, in·k·k]` f32; `up`: `[out, r]` or `[out, r, 1, 1]`; `down`: `[r, in(, k, k)]`.
pub fn add_delta_(
    w2: &mut Tensor,
    up: &Tensor,
    down: &Tensor,
    coefficient: f64,
    factor_kind: Kind,
    device: Device,
) {
    let r = down.size()[0];
    let up = up
        .to_device(device)
        .to_kind(factor_kind)
        .to_kind(Kind::Float)
        .reshape([-1, r])
        * coefficient;
    let down = down
        .to_device(device)
        .to_kind(factor_kind)
        .to_kind(Kind::Float)
        .reshape([r, -1]);
    let _ = w2.addmm_(&up, &down);
}

/// Checks every LoRA against the checkpoint's header (family, names, shapes, finiteness)
/// before any heavy work, and plans which keys change.
///
/// # Errors
/// [`MergeError::Invalid`] when a LoRA is for another family (an SDXL LoRA into an SD1/SD2
/// checkpoint or the reverse), when a LoRA matches no module of the checkpoint, when modules
/// do not fit the target shapes (listing them: e.g. an SD1 LoRA into SD2), or when a LoRA
/// tensor holds NaN/Inf; [`MergeError::KeyMap`] when the checkpoint's keys fit no layout.
pub fn plan_checkpoint_merge(
    ckpt: &CheckpointSource,
    loras: &[LoraInput],
) -> Result<CheckpointPlan> {
    let cpath = ckpt.path().display().to_string();
    let family = ckpt.family()?;
    let normalized: Vec<String> = ckpt
        .names()
        .iter()
        .map(|n| normalize_ldm_key(family, n).into_owned())
        .collect();
    let map = KeyMap::for_ldm_keys(family, normalized.iter().map(String::as_str), &cpath)?;
    let by_norm: HashMap<&str, &str> = normalized
        .iter()
        .map(String::as_str)
        .zip(ckpt.names().iter().map(String::as_str))
        .collect();
    let targets = lora_targets(&map);
    let model_keys = normalized
        .iter()
        .map(|n| map.lookup_ldm(n).is_some())
        .collect();

    let mut deltas: HashMap<String, Vec<Delta>> = HashMap::new();
    let mut counts = Vec::with_capacity(loras.len());
    for (li, lora) in loras.iter().enumerate() {
        let lpath = lora.path.display();
        if let Some(lf) = lora.weights.family
            && (lf == ModelFamily::Sdxl) != (family == ModelFamily::Sdxl)
        {
            return Err(MergeError::Invalid(format!(
                "{lpath} is a LoRA for {lf} but {cpath} is an {family} checkpoint; nothing was written"
            )));
        }
        let mut c = ApplyCounts {
            path: lora.path.clone(),
            ..Default::default()
        };
        let mut misfits = Vec::new();
        let mut non_finite = Vec::new();
        for (name, t) in &lora.weights.modules {
            let Some((target, key)) = targets
                .get(name)
                .and_then(|t: &Target| by_norm.get(t.key.as_str()).map(|k| (t, *k)))
            else {
                c.unmatched.push(name.clone());
                continue;
            };
            let info = ckpt.info(key).expect("key comes from the file's own names");
            let rows = match target.rows {
                None => None,
                Some(_) => match info.shape.first().and_then(|&r| target.row_range(r)) {
                    Some((a, b)) => Some(b - a),
                    None => {
                        misfits.push(format!(
                            "{name}: {key} {:?} has no q/k/v row blocks",
                            info.shape
                        ));
                        continue;
                    }
                },
            };
            if let Err(e) = delta_shape(&t.up, &t.down, &info.shape, rows) {
                misfits.push(format!("{name} → {key} {:?}: expected {e}", info.shape));
                continue;
            }
            let finite = |x: &Tensor| x.isfinite().all().int64_value(&[]) != 0;
            if !finite(&t.up) || !finite(&t.down) || !t.effective_alpha().is_finite() {
                non_finite.push(name.clone());
                continue;
            }
            *c.applied.entry(target.component).or_default() += 1;
            if lora.ratio != 0.0 {
                deltas.entry(key.to_owned()).or_default().push(Delta {
                    lora: li,
                    module: name.clone(),
                    rows: target.rows,
                });
            }
        }
        if !non_finite.is_empty() {
            return Err(MergeError::Invalid(format!(
                "{lpath}: {} module(s) hold NaN or Inf: {}; nothing was written",
                non_finite.len(),
                preview(&non_finite, 8)
            )));
        }
        if !misfits.is_empty() {
            return Err(MergeError::Invalid(format!(
                "{lpath}: {} module(s) do not fit the shapes of {family} checkpoint {cpath} (a LoRA for another model?): {}; nothing was written",
                misfits.len(),
                preview(&misfits, 6)
            )));
        }
        if c.applied.is_empty() {
            return Err(MergeError::Invalid(format!(
                "{lpath}: none of its {} modules matches a layer of {family} checkpoint {cpath} (first unmatched: {}); nothing was written",
                lora.weights.modules.len(),
                preview(&c.unmatched, 4)
            )));
        }
        counts.push(c);
    }
    Ok(CheckpointPlan {
        family,
        counts,
        model_keys,
        deltas,
    })
}

/// Options of [`write_merged_checkpoint`].
#[derive(Debug, Clone)]
pub struct CheckpointWriteOptions {
    /// `--save_precision`: converts every floating U-Net/text-encoder/VAE tensor (as the
    /// reference); `None` keeps each tensor's own dtype (untouched keys byte-identical).
    pub save_dtype: Option<Dtype>,
    /// `--precision`: the LoRA factors are rounded to it; products and sums are f32.
    pub factor_kind: Kind,
    /// Where ΔW is computed.
    pub device: Device,
    /// Metadata to write; `None` writes none (a PyTorch checkpoint never has any).
    pub metadata: Option<BTreeMap<String, String>>,
    /// `None`: write safetensors; `Some(top)`: a PyTorch zip checkpoint (`.ckpt`) pickling
    /// `top` (sd-scripts: `{"state_dict", "epoch", "global_step"}`).
    pub torch: Option<TorchTopLevel>,
}

/// Streams the merged checkpoint to `out` (safetensors, or a PyTorch checkpoint when
/// `opts.torch` is set); `progress(done, total)` is called after each key. Returns the bytes
/// written.
///
/// # Errors
/// [`MergeError::Invalid`] for a key whose dtype libtorch cannot hold; the writer's errors.
pub fn write_merged_checkpoint(
    ckpt: &CheckpointSource,
    plan: &CheckpointPlan,
    loras: &[LoraInput],
    out: &Path,
    opts: &CheckpointWriteOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<u64> {
    let names = ckpt.names();
    let mut out_dtypes = Vec::with_capacity(names.len());
    let mut specs = Vec::with_capacity(names.len());
    for (i, n) in names.iter().enumerate() {
        let info = ckpt.info(n).expect("names come from the file");
        let dtype = match opts.save_dtype {
            Some(d) if plan.model_keys[i] && info.dtype.is_float() => d,
            _ => info.dtype,
        };
        out_dtypes.push(dtype);
        specs.push(TensorSpec {
            name: n.clone(),
            dtype,
            shape: info.shape.clone(),
        });
    }
    let total = names.len();
    let mut done = 0usize;
    let produce = |i: usize| {
        let name = &names[i];
        let info = ckpt.info(name).expect("names come from the file");
        let data = ckpt.data(name)?;
        let out_dtype = out_dtypes[i];
        let result = match plan.deltas.get(name) {
            None if out_dtype == info.dtype => data,
            None => {
                let t = from_bytes(name, info.dtype, &info.shape, &data)
                    .map_err(MergeError::Invalid)?;
                let kind = kind_of(out_dtype).expect("float dtypes have kinds");
                Cow::Owned(tensor_bytes(&t.to_kind(kind)))
            }
            Some(list) => {
                let base = from_bytes(name, info.dtype, &info.shape, &data)
                    .map_err(MergeError::Invalid)?;
                let w = base.to_device(opts.device).to_kind(Kind::Float);
                // [out, in·k·k] view of W: each ΔW is added in place by one GEMM
                // (W ← W + (ratio·scale·up)·down), with no full-size temporaries.
                let rows_total = info.shape.first().copied().unwrap_or(1) as i64;
                let w2 = w.view([rows_total, -1]);
                for d in list {
                    let lora = &loras[d.lora];
                    let t = &lora.weights.modules[&d.module];
                    let range = d.rows.and_then(|_| {
                        Target {
                            key: String::new(),
                            component: Component::Unet,
                            rows: d.rows,
                        }
                        .row_range(info.shape[0])
                    });
                    let mut part = match range {
                        Some((a, b)) => w2.narrow(0, a as i64, (b - a) as i64),
                        None => w2.shallow_clone(),
                    };
                    add_delta_(
                        &mut part,
                        &t.up,
                        &t.down,
                        lora.ratio * t.scale(),
                        opts.factor_kind,
                        opts.device,
                    );
                }
                let kind = kind_of(out_dtype).ok_or_else(|| {
                    MergeError::Invalid(format!(
                        "{name}: dtype {out_dtype} cannot be computed with"
                    ))
                })?;
                Cow::Owned(tensor_bytes(&w.to_kind(kind)))
            }
        };
        done += 1;
        progress(done, total);
        Ok(result)
    };
    match opts.torch {
        None => write_streaming(out, &specs, opts.metadata.as_ref(), produce),
        Some(top) => write_torch_checkpoint(out, &specs, top, produce),
    }
}
