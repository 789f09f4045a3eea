//! Extraction of a LoRA from two checkpoints: ΔW = W_tuned − W_org per LoRA module,
//! approximated at rank k by a truncated SVD with the reference's quantile clamp.
//!
//! Steps (spec tools §4.2):
//! 1. [`plan_extraction`] reads only the headers: family of both files, the LoRA modules a
//!    network of rank `dim` (and `conv_dim`) would have (the same selection as training,
//!    [`crate::lora::names::select_modules`], on layers taken from the key table), and each
//!    module's key and shape in both files.
//! 2. [`max_differences`] streams every module's ΔW once from the memory-mapped inputs and
//!    returns max|ΔW| (and fails on NaN/Inf), so the caller can report the largest difference
//!    per component and decide whether the text encoders are extracted (`--min_diff`).
//! 3. [`extract_modules`] recomputes ΔW module by module and decomposes it
//!    ([`super::svd::decompose`] with LAPACK, or a randomised range finder followed by
//!    [`super::svd::decompose_factored`]); only one ΔW is alive at a time.
//!
//! # Source
//! sd-scripts `networks/extract_lora_from_models.py` (`svd`); `../shared/spec/tools.md` §4, §9.

use std::collections::{BTreeMap, HashMap};

use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, KeyMap, Op, normalize_ldm_key};
use sd_formats::tensor_file::TensorFile;
use tch::{Device, Kind, Tensor};

use super::svd::{decompose, decompose_factored};
use super::targets::lora_targets;
use super::{MergeError, Result, preview};
use crate::lora::names::{Layer, LayerKind, ModuleKind, NetworkOptions, select_modules};
use crate::lora::{LoraTensors, LoraWeights};
use crate::tensor::{from_bytes, kind_of};

/// One LoRA module to extract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractModule {
    /// kohya module name (`lora_unet_…`, `lora_te_…`).
    pub name: String,
    /// Component of the wrapped layer.
    pub component: Component,
    /// Key in the original file.
    pub org_key: String,
    /// Key in the tuned file.
    pub tuned_key: String,
    /// Row range `[start, end)` of the key's tensor (OpenCLIP q/k/v blocks); `None` = all rows.
    pub rows: Option<(usize, usize)>,
    /// ΔW shape: `[out, in]` or `[out, in, kh, kw]`.
    pub shape: Vec<i64>,
    /// Requested rank (`dim` or `conv_dim`; capped at min(in, out) by the decomposition).
    pub rank: usize,
}

/// The checked plan of an extraction (headers only).
#[derive(Debug, Clone)]
pub struct ExtractPlan {
    /// Family of both checkpoints.
    pub family: ModelFamily,
    /// Modules in the reference's creation order, text encoders first.
    pub modules: Vec<ExtractModule>,
}

impl ExtractPlan {
    /// Components that have modules, in order (U-Net, text encoder, text encoder 2).
    pub fn components(&self) -> Vec<Component> {
        let mut c: Vec<Component> = self.modules.iter().map(|m| m.component).collect();
        c.sort();
        c.dedup();
        c
    }
}

/// The family, and canonical key → file key, of one checkpoint.
fn file_keys(f: &TensorFile) -> Result<(ModelFamily, HashMap<String, String>)> {
    let path = f.path().display().to_string();
    let family = ModelFamily::detect_ldm(
        f.names()
            .iter()
            .filter_map(|n| f.info(n).map(|i| (n.as_str(), i.shape.as_slice()))),
        &path,
    )?;
    let keys = f
        .names()
        .iter()
        .map(|n| (normalize_ldm_key(family, n).into_owned(), n.clone()))
        .collect();
    Ok((family, keys))
}

/// Checks both checkpoints' headers and lists the modules to extract.
///
/// `family` is the family the user asked for (`--v2`/`--sdxl`); `None` accepts the detected
/// one. Linear and 1×1 modules get rank `dim`; 3×3 convs (ResNet and sampler containers) are
/// included only with `conv_dim`, as in training.
///
/// # Errors
/// [`MergeError::Invalid`] when the two files are of different families, when the detected
/// family differs from `family`, when a module's tensor is missing from the tuned file, has a
/// different shape there, or is not a float tensor, and when no module is found;
/// [`MergeError::KeyMap`] when a file's keys fit no layout.
pub fn plan_extraction(
    org: &TensorFile,
    tuned: &TensorFile,
    family: Option<ModelFamily>,
    dim: usize,
    conv_dim: Option<usize>,
) -> Result<ExtractPlan> {
    let (opath, tpath) = (org.path().display(), tuned.path().display());
    if dim == 0 || conv_dim == Some(0) {
        return Err(MergeError::Invalid(
            "--dim and --conv_dim must be at least 1".into(),
        ));
    }
    let (of, okeys) = file_keys(org)?;
    let (tf, tkeys) = file_keys(tuned)?;
    if of != tf {
        return Err(MergeError::Invalid(format!(
            "{opath} is an {of} checkpoint but {tpath} is an {tf} checkpoint; nothing was written"
        )));
    }
    if let Some(f) = family
        && f != of
    {
        return Err(MergeError::Invalid(format!(
            "the flags ask for {f} but {opath} is an {of} checkpoint (drop --v2/--sdxl or give the right one); nothing was written"
        )));
    }
    let canon: Vec<&str> = okeys.keys().map(String::as_str).collect();
    let map = KeyMap::for_ldm_keys(of, canon.iter().copied(), &opath.to_string())?;
    let targets = lora_targets(&map);

    // Layers per component from the key table: Diffusers path + geometry from the file header.
    let mut layers: BTreeMap<Component, Vec<Layer>> = BTreeMap::new();
    for e in map.entries() {
        if e.component == Component::Vae || !matches!(e.op, Op::Copy | Op::ConcatRows) {
            continue;
        }
        let Some(info) = okeys.get(&e.ldm_key).and_then(|k| org.info(k)) else {
            continue;
        };
        let n = e.diffusers_keys.len().max(1);
        let s = &info.shape;
        if s.len() != 2 && s.len() != 4 || !s[0].is_multiple_of(n) {
            continue;
        }
        for dk in &e.diffusers_keys {
            let Some(path) = dk.strip_suffix(".weight") else {
                continue;
            };
            let out = s[0] / n;
            let kind = if s.len() == 2 {
                LayerKind::Linear {
                    in_features: s[1],
                    out_features: out,
                }
            } else {
                LayerKind::Conv2d {
                    in_channels: s[1],
                    out_channels: out,
                    kernel: [s[2], s[3]],
                    stride: [1, 1],
                    padding: [0, 0],
                }
            };
            layers.entry(e.component).or_default().push(Layer {
                path: path.to_owned(),
                kind,
            });
        }
    }
    let opts = NetworkOptions {
        network_dim: dim,
        network_alpha: dim as f32,
        conv_dim,
        conv_alpha: conv_dim.map(|c| c as f32),
    };
    let mut modules = Vec::new();
    let mut problems = Vec::new();
    // Text encoders first, then the U-Net (the reference's order).
    let mut order: Vec<Component> = layers.keys().copied().collect();
    order.sort_by_key(|c| (*c == Component::Unet, *c));
    for component in order {
        for spec in select_modules(of, component, &layers[&component], &opts)? {
            let Some(target) = targets.get(&spec.name) else {
                problems.push(format!("{}: no single-file key", spec.name));
                continue;
            };
            let ok = okeys
                .get(&target.key)
                .expect("targets come from the file's own keys");
            let Some(tk) = tkeys.get(&target.key) else {
                problems.push(format!(
                    "{}: {} missing from {tpath}",
                    spec.name, target.key
                ));
                continue;
            };
            let (oi, ti) = (
                org.info(ok).expect("key from the file"),
                tuned.info(tk).expect("key from the file"),
            );
            if oi.shape != ti.shape {
                problems.push(format!(
                    "{}: {ok} is {:?} in {opath} but {:?} in {tpath}",
                    spec.name, oi.shape, ti.shape
                ));
                continue;
            }
            if !oi.dtype.is_float() || !ti.dtype.is_float() {
                problems.push(format!(
                    "{}: {ok} is {} / {}, expected a float dtype",
                    spec.name, oi.dtype, ti.dtype
                ));
                continue;
            }
            let rows = target.rows.and_then(|_| target.row_range(oi.shape[0]));
            let mut shape: Vec<i64> = oi.shape.iter().map(|&d| d as i64).collect();
            if let Some((a, b)) = rows {
                shape[0] = (b - a) as i64;
            }
            modules.push(ExtractModule {
                name: spec.name.clone(),
                component,
                org_key: ok.clone(),
                tuned_key: tk.clone(),
                rows,
                shape,
                rank: spec.rank,
            });
        }
    }
    if !problems.is_empty() {
        return Err(MergeError::Invalid(format!(
            "{} module(s) cannot be extracted from {opath} and {tpath}: {}; nothing was written",
            problems.len(),
            preview(&problems, 6)
        )));
    }
    if modules.is_empty() {
        return Err(MergeError::Invalid(format!(
            "{opath} has no layer a LoRA module could wrap; nothing was written"
        )));
    }
    Ok(ExtractPlan {
        family: of,
        modules,
    })
}

/// How the rank-k factors of ΔW are computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExtractSvd {
    /// LAPACK SVD of the dense ΔW (the reference's route and singular-vector signs).
    Full,
    /// Randomised range finder (Halko, Martinsson, Tropp 2011, alg. 4.4): Q spans
    /// ΔW·Ω (Ω Gaussian `[in, k + oversample]`) refined by `power_iters` subspace iterations;
    /// then the exact SVD of Q·(QᵀΔW). O(in·out·(k + oversample)) per iteration instead of
    /// O(in·out·min(in, out)); falls back to [`ExtractSvd::Full`] when k + oversample ≥
    /// min(out, in·kh·kw).
    Randomized {
        /// Extra columns of Ω beyond k.
        oversample: usize,
        /// Subspace (power) iterations.
        power_iters: usize,
        /// Seed of Ω (libtorch's global generator is reseeded with it).
        seed: i64,
    },
}

/// Options of [`extract_modules`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// `--clamp_quantile` (the reference: 0.99); `None` disables the clamp.
    pub clamp_quantile: Option<f64>,
    /// Device of the subtraction and SVD (results return to the CPU).
    pub device: Device,
    /// `--load_precision`: both weights are rounded to it before subtracting.
    pub load_kind: Option<Kind>,
    /// SVD route.
    pub svd: ExtractSvd,
}

/// ΔW = W_tuned − W_org of one module in f32 on `device` (rounded to `load_kind` first).
///
/// # Errors
/// [`MergeError::Format`] when a file cannot be read; [`MergeError::Invalid`] for dtypes
/// libtorch cannot hold.
pub fn module_delta(
    org: &TensorFile,
    tuned: &TensorFile,
    m: &ExtractModule,
    load_kind: Option<Kind>,
    device: Device,
) -> Result<Tensor> {
    let load = |f: &TensorFile, key: &str| -> Result<Tensor> {
        let info = f.info(key).ok_or_else(|| {
            MergeError::Invalid(format!("{}: key \"{key}\" vanished", f.path().display()))
        })?;
        let t =
            from_bytes(key, info.dtype, &info.shape, f.data(key)?).map_err(MergeError::Invalid)?;
        let t = match m.rows {
            Some((a, b)) => t.narrow(0, a as i64, (b - a) as i64),
            None => t,
        };
        let t = t.to_device(device);
        let t = match load_kind {
            Some(k) => t.to_kind(k),
            None => t,
        };
        Ok(t.to_kind(Kind::Float))
    };
    let d = load(tuned, &m.tuned_key)? - load(org, &m.org_key)?;
    Ok(d.reshape(m.shape.as_slice()))
}

/// max|ΔW| of every module of `plan` (same order), streamed from the inputs;
/// `progress(done, total)` after each module.
///
/// # Errors
/// [`MergeError::Invalid`] naming the modules whose weights hold NaN or Inf in either file;
/// errors of [`module_delta`].
pub fn max_differences(
    org: &TensorFile,
    tuned: &TensorFile,
    plan: &ExtractPlan,
    load_kind: Option<Kind>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<f64>> {
    let total = plan.modules.len();
    let mut out = Vec::with_capacity(total);
    let mut bad = Vec::new();
    for (i, m) in plan.modules.iter().enumerate() {
        let d = module_delta(org, tuned, m, load_kind, Device::Cpu)?;
        let max = d.abs().max().double_value(&[]);
        if !max.is_finite() {
            bad.push(m.name.clone());
        }
        out.push(max);
        progress(i + 1, total);
    }
    if !bad.is_empty() {
        return Err(MergeError::Invalid(format!(
            "{} module(s) hold NaN or Inf in {} or {}: {}; nothing was written",
            bad.len(),
            org.path().display(),
            tuned.path().display(),
            preview(&bad, 8)
        )));
    }
    Ok(out)
}

/// Rank-`rank` factors of `mat` `[out, n]` (f32) by the randomised route: returns `(q, b)`
/// with `q` `[out, l]` orthonormal and `b = qᵀ·mat` `[l, n]`, l = rank + oversample.
pub fn randomized_range(
    mat: &Tensor,
    rank: usize,
    oversample: usize,
    power_iters: usize,
) -> (Tensor, Tensor) {
    let n = mat.size()[1];
    let l = (rank + oversample) as i64;
    let omega = Tensor::randn([n, l], (Kind::Float, mat.device()));
    let orth = |t: &Tensor| Tensor::linalg_qr(t, "reduced").0;
    let mut q = orth(&mat.mm(&omega));
    let mt = mat.transpose(0, 1);
    for _ in 0..power_iters {
        let z = orth(&mt.mm(&q));
        q = orth(&mat.mm(&z));
    }
    let b = q.transpose(0, 1).mm(mat);
    (q, b)
}

/// What [`extract_modules`] produced.
#[derive(Debug)]
pub struct Extraction {
    /// The extracted modules (f32 on the CPU, alpha = rank, scale 1).
    pub weights: LoraWeights,
    /// Per extracted module: ‖ΔW − up·down‖_F / ‖ΔW‖_F (0 for an all-zero ΔW), computed after
    /// the clamp, in f32.
    pub residuals: BTreeMap<String, f64>,
}

/// Extracts the modules of `plan` for which `selected` is true; `progress(done, total)` after
/// each extracted module.
///
/// # Shapes
/// Output per module: `lora_down` `[k, in]` / `[k, in, kh, kw]`, `lora_up` `[out, k]` /
/// `[out, k, 1, 1]` in f32, k = min(rank, in, out) (in = channels, as the reference);
/// alpha = k.
///
/// # Errors
/// [`MergeError::Torch`] when an SVD fails; errors of [`module_delta`];
/// [`MergeError::Invalid`] when `selected` has the wrong length or selects nothing.
pub fn extract_modules(
    org: &TensorFile,
    tuned: &TensorFile,
    plan: &ExtractPlan,
    selected: &[bool],
    opts: &ExtractOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Extraction> {
    if selected.len() != plan.modules.len() {
        return Err(MergeError::Invalid(format!(
            "{} selection flags for {} modules",
            selected.len(),
            plan.modules.len()
        )));
    }
    let total = selected.iter().filter(|&&s| s).count();
    if total == 0 {
        return Err(MergeError::Invalid(
            "no module is selected for extraction; nothing was written".into(),
        ));
    }
    if let ExtractSvd::Randomized { seed, .. } = opts.svd {
        tch::manual_seed(seed);
    }
    let mut modules = BTreeMap::new();
    let mut residuals = BTreeMap::new();
    let mut done = 0;
    for (m, _) in plan.modules.iter().zip(selected).filter(|(_, s)| **s) {
        let delta = module_delta(org, tuned, m, opts.load_kind, opts.device)?;
        let mat = delta.reshape([m.shape[0], -1]);
        let (rows, cols) = (m.shape[0] as usize, mat.size()[1] as usize);
        let (up, down) = match opts.svd {
            ExtractSvd::Randomized {
                oversample,
                power_iters,
                ..
            } if m.rank + oversample < rows.min(cols) => {
                let (q, b) = randomized_range(&mat, m.rank, oversample, power_iters);
                decompose_factored(&m.name, &q, &b, &m.shape, m.rank, opts.clamp_quantile)?
            }
            _ => decompose(&m.name, &delta, m.rank, opts.clamp_quantile, opts.device)?,
        };
        let k = down.size()[0];
        let approx = up
            .reshape([m.shape[0], k])
            .to_device(opts.device)
            .mm(&down.reshape([k, -1]).to_device(opts.device));
        let norm = mat.norm().double_value(&[]);
        let res = if norm > 0.0 {
            (&mat - approx).norm().double_value(&[]) / norm
        } else {
            0.0
        };
        residuals.insert(m.name.clone(), res);
        modules.insert(
            m.name.clone(),
            LoraTensors {
                down,
                up,
                alpha: Some(k as f64),
                alpha_dtype: None,
            },
        );
        done += 1;
        progress(done, total);
    }
    Ok(Extraction {
        weights: LoraWeights {
            modules,
            family: Some(plan.family),
            ..Default::default()
        },
        residuals,
    })
}

/// Whether a module is a 3×3 conv (rank `conv_dim`).
pub fn is_conv(m: &ExtractModule) -> bool {
    m.shape.len() == 4 && m.shape[2..] != [1, 1]
}

/// Libtorch kind of a `--load_precision` dtype.
pub fn load_kind(dtype: sd_formats::dtype::Dtype) -> Option<Kind> {
    kind_of(dtype)
}

/// The module kind of a planned module (from its ΔW shape).
pub fn module_kind(m: &ExtractModule) -> ModuleKind {
    match m.shape.len() {
        4 if is_conv(m) => ModuleKind::Conv,
        4 => ModuleKind::Conv1x1,
        _ => ModuleKind::Linear,
    }
}
