//! Loading LoRA files into kohya-named modules, and saving kohya safetensors files.
//!
//! # Source
//! `../shared/spec/lora-format.md` §1 (container), §2 (keys, alpha dtypes), §9 (metadata,
//! hashes, modelspec), §10 (other trainers' formats); sd-scripts `networks/lora.py`
//! (`save_weights`), `library/train_util.py` (`precalculate_safetensors_hashes`).

use std::collections::BTreeMap;
use std::path::Path;

use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::hashes::{SshsHashes, sshs_hashes};
use sd_formats::lora::{KeyStyle, LoraLayout};
use sd_formats::metadata::{ModelSpecInput, PyValue, modelspec};
use sd_formats::safetensors::{
    HEADER_LIMIT, TensorToWrite, serialize_header, write_safetensors_with_limit,
};
use sd_formats::tensor_file::TensorFile;
use tch::{Kind, Tensor};

use super::convert::NameConverter;
use super::module::LoraModule;
use super::{LoraError, Result};

/// Tensors of one module, in the file's layout and dtype (on the CPU after loading).
#[derive(Debug)]
pub struct LoraTensors {
    /// `lora_down.weight`: `[r, in]` or `[r, in, kh, kw]`.
    pub down: Tensor,
    /// `lora_up.weight`: `[out, r]` or `[out, r, 1, 1]`.
    pub up: Tensor,
    /// Alpha as stored; `None` when the file has none (alpha = rank).
    pub alpha: Option<f64>,
    /// Dtype the alpha was stored in (for [`AlphaDtype::Keep`]).
    pub alpha_dtype: Option<Dtype>,
}

impl LoraTensors {
    /// Rank r (`down` dimension 0).
    pub fn rank(&self) -> usize {
        self.down.size().first().map_or(0, |&r| r as usize)
    }

    /// Effective alpha: the stored one, or the rank when absent or 0.
    pub fn effective_alpha(&self) -> f64 {
        match self.alpha {
            Some(a) if a != 0.0 => a,
            _ => self.rank() as f64,
        }
    }

    /// `effective_alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.effective_alpha() / self.rank().max(1) as f64
    }
}

/// A LoRA file's modules under kohya names, with its metadata.
#[derive(Debug, Default)]
pub struct LoraWeights {
    /// kohya module name → tensors.
    pub modules: BTreeMap<String, LoraTensors>,
    /// safetensors `__metadata__` (empty for pickles).
    pub metadata: BTreeMap<String, String>,
    /// Key style the file used.
    pub style: Option<KeyStyle>,
    /// Family used for name conversion (given or detected; SD1 stands for SD1 and SD2, whose
    /// names are identical).
    pub family: Option<ModelFamily>,
}

/// Options of [`LoraWeights::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Family for name conversion; `None` detects it (SDXL names, SDXL-only prefixes,
    /// a 2048-wide cross-attention, `ss_base_model_version`; else SD1/SD2).
    pub family: Option<ModelFamily>,
    /// Alpha for Diffusers/PEFT modules without an alpha key (`lora_alpha` of the
    /// `adapter_config.json`); overrides the metadata.
    pub peft_alpha: Option<f64>,
    /// Ignore keys that are no LoRA keys instead of failing.
    pub allow_stray_keys: bool,
}

fn algorithm_of(key: &str) -> &'static str {
    let suffix = key.rsplit('.').next().unwrap_or(key);
    if key.contains(".hada_") {
        "LoHa"
    } else if key.contains(".lokr_") {
        "LoKr"
    } else if key.ends_with(".lora_mid.weight") {
        "Tucker (lora_mid)"
    } else if key.ends_with(".dora_scale") || key.contains("lora_magnitude_vector") {
        "DoRA"
    } else if key.contains(".oft_") {
        "OFT"
    } else if suffix == "on_input" {
        "(IA)^3"
    } else if suffix == "w_norm" || suffix == "b_norm" {
        "norm"
    } else if suffix == "diff" || suffix == "diff_b" {
        "full diff"
    } else {
        "GLoRA"
    }
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Double => Dtype::F64,
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        _ => return None,
    })
}

/// Family detection from names, shapes and metadata (spec §10; SD1 and SD2 names are equal).
fn detect_family(file: &TensorFile, layout: &LoraLayout) -> ModelFamily {
    let sdxl_name = layout.modules.keys().any(|m| {
        m.starts_with("lora_te1_")
            || m.starts_with("lora_te2_")
            || m.starts_with("lora_unet_input_blocks_")
            || m.starts_with("lora_unet_middle_block_")
            || m.starts_with("lora_unet_output_blocks_")
            || m.starts_with("text_encoder_2.")
            || m.starts_with("text_encoders.clip_g.")
            || m.starts_with("conditioner.")
    });
    let wide_context = layout.modules.iter().any(|(m, k)| {
        (m.ends_with("attn2_to_k") || m.ends_with("attn2.to_k") || m.ends_with("to_k_lora"))
            && k.down
                .as_deref()
                .and_then(|d| file.info(d))
                .is_some_and(|i| i.shape.get(1) == Some(&2048))
    });
    let meta_sdxl = file
        .metadata()
        .get("ss_base_model_version")
        .is_some_and(|v| v.starts_with("sdxl"));
    if sdxl_name || wide_context || meta_sdxl {
        ModelFamily::Sdxl
    } else if file.metadata().get("ss_v2").is_some_and(|v| v == "True") {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    }
}

/// PEFT `lora_alpha` from metadata: a plain `lora_alpha` entry, or the `lora_alpha` field of
/// a `_lora_adapter_metadata` / `lora_adapter_metadata` JSON object.
fn metadata_peft_alpha(meta: &BTreeMap<String, String>) -> Option<f64> {
    if let Some(v) = meta.get("lora_alpha").and_then(|v| v.trim().parse().ok()) {
        return Some(v);
    }
    for key in ["_lora_adapter_metadata", "lora_adapter_metadata"] {
        if let Some(v) = meta.get(key)
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(v)
            && let Some(a) = json.get("lora_alpha").and_then(serde_json::Value::as_f64)
        {
            return Some(a);
        }
    }
    None
}

impl LoraWeights {
    /// Loads a LoRA file (safetensors or PyTorch checkpoint, by content) and converts every
    /// module to its kohya name.
    ///
    /// Accepts kohya files (SDXL U-Net names in SAI or Diffusers spelling), Diffusers/PEFT and
    /// the older Diffusers spelling (alpha from `.alpha` keys, [`LoadOptions::peft_alpha`] or
    /// metadata `lora_alpha`, else absent = rank), and ComfyUI-style single-file paths. Alphas
    /// may be any float dtype or integer, 0-d or `[1]`. kohya files never take alpha from
    /// metadata (like every other loader, an absent alpha means alpha = rank).
    ///
    /// # Errors
    /// [`LoraError::UnsupportedAlgorithm`] for LoHa/LoKr/Tucker/DoRA/OFT/… keys (the whole file
    /// is refused, naming the keys); [`LoraError::Unmapped`] for stray keys (unless allowed) and
    /// names no table knows; [`LoraError::MissingPart`]; [`LoraError::DuplicateModule`];
    /// [`LoraError::ShapeMismatch`] (up/down ranks differ, alpha not a scalar);
    /// [`LoraError::UnsupportedDtype`]; [`LoraError::Format`] for unreadable files.
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let path = path.as_ref();
        let _span = tracing::info_span!("load_lora", path = %path.display()).entered();
        let file = TensorFile::open(path)?;
        let layout = LoraLayout::from_keys(file.names().iter().map(String::as_str));
        let p = || path.to_path_buf();

        let unsupported: Vec<String> = layout
            .unsupported_keys()
            .into_iter()
            .map(str::to_owned)
            .collect();
        if !unsupported.is_empty() {
            let mut algorithms: Vec<String> = unsupported
                .iter()
                .map(|k| algorithm_of(k).to_owned())
                .collect();
            algorithms.sort();
            algorithms.dedup();
            return Err(LoraError::UnsupportedAlgorithm {
                path: p(),
                algorithms,
                keys: unsupported,
            });
        }
        if !layout.stray_keys.is_empty() && !opts.allow_stray_keys {
            let mut keys = layout.stray_keys.clone();
            keys.sort();
            return Err(LoraError::Unmapped {
                path: p(),
                what: "keys are no LoRA keys (lora_down/lora_up/alpha, lora_A/lora_B)",
                keys,
            });
        }

        let style = layout.style();
        let family = opts.family.unwrap_or_else(|| detect_family(&file, &layout));
        let converter = NameConverter::new(family);
        let peft_alpha = opts
            .peft_alpha
            .or_else(|| metadata_peft_alpha(file.metadata()));

        let mut modules: BTreeMap<String, LoraTensors> = BTreeMap::new();
        let mut spelled: BTreeMap<String, String> = BTreeMap::new();
        let mut unmapped = Vec::new();
        for (module, keys) in &layout.modules {
            let module_style = if module.starts_with("lora_unet_") || module.starts_with("lora_te")
            {
                KeyStyle::Kohya
            } else {
                style
            };
            let Some(name) = converter.to_kohya(module, module_style) else {
                unmapped.push(module.clone());
                continue;
            };
            let (Some(down_key), Some(up_key)) = (&keys.down, &keys.up) else {
                return Err(LoraError::MissingPart {
                    path: p(),
                    module: module.clone(),
                    part: if keys.down.is_none() { "down" } else { "up" },
                });
            };
            let down = read_weight(&file, down_key)?;
            let up = read_weight(&file, up_key)?;
            let ds = down.size();
            let us = up.size();
            if ds.len() < 2 || us.len() < 2 || us[1] != ds[0] {
                return Err(LoraError::ShapeMismatch {
                    path: p(),
                    key: up_key.clone(),
                    expected: format!(
                        "lora_up [out, r] or [out, r, 1, 1] with r = {} (lora_down {ds:?})",
                        ds.first().copied().unwrap_or(0)
                    ),
                    found: us,
                });
            }
            let (alpha, alpha_dtype) = match &keys.alpha {
                Some(k) => {
                    let (a, d) = read_alpha(&file, k)?;
                    (Some(a), Some(d))
                }
                None if module_style != KeyStyle::Kohya => (peft_alpha, None),
                None => (None, None),
            };
            if let Some(first) = spelled.insert(name.clone(), module.clone()) {
                return Err(LoraError::DuplicateModule {
                    path: p(),
                    module: name,
                    first,
                    second: module.clone(),
                });
            }
            tracing::debug!(module = %module, name = %name, "LoRA module");
            modules.insert(
                name,
                LoraTensors {
                    down,
                    up,
                    alpha,
                    alpha_dtype,
                },
            );
        }
        if !unmapped.is_empty() {
            return Err(LoraError::Unmapped {
                path: p(),
                what: "module names match no layer of the family's key tables",
                keys: unmapped,
            });
        }
        tracing::info!(path = %path.display(), modules = modules.len(), style = style.describe(), %family, "loaded LoRA");
        Ok(LoraWeights {
            modules,
            metadata: file.metadata().clone(),
            style: Some(style),
            family: Some(family),
        })
    }

    /// Collects modules (e.g. a trained network) under their names; tensors are shallow
    /// copies (detached).
    pub fn from_modules<'a>(modules: impl IntoIterator<Item = &'a LoraModule>) -> Self {
        let modules = modules
            .into_iter()
            .map(|m| {
                (
                    m.name().to_owned(),
                    LoraTensors {
                        down: m.lora_down.detach(),
                        up: m.lora_up.detach(),
                        alpha: Some(m.alpha()),
                        alpha_dtype: None,
                    },
                )
            })
            .collect();
        LoraWeights {
            modules,
            ..Default::default()
        }
    }

    /// Saves as a kohya safetensors file; see [`SaveOptions`]. Returns the `sshs_*` hashes
    /// written and whether `ss_tag_frequency` had to be trimmed.
    ///
    /// Keys: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` (always
    /// written, 0-d). Metadata: `opts.metadata`, plus modelspec keys when
    /// `opts.modelspec` is given, plus `sshs_model_hash` / `sshs_legacy_hash` computed over the
    /// exact tensors written (spec §9.3). Written atomically (temporary file, verify, rename).
    ///
    /// # Errors
    /// [`LoraError::UnsupportedDtype`] for a weight dtype that cannot be written,
    /// [`LoraError::Format`] for write failures or a header still over the limit after trimming
    /// `ss_tag_frequency`.
    pub fn save(&self, path: impl AsRef<Path>, opts: &SaveOptions) -> Result<SaveReport> {
        let path = path.as_ref();
        let _span = tracing::info_span!("save_lora", path = %path.display()).entered();
        let mut names: Vec<String> = Vec::with_capacity(self.modules.len() * 3);
        let mut blobs: Vec<(Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(names.capacity());
        for (name, t) in &self.modules {
            for (suffix, tensor) in [("lora_down.weight", &t.down), ("lora_up.weight", &t.up)] {
                let key = format!("{name}.{suffix}");
                let tensor = match opts.dtype {
                    Some(d) => {
                        tensor.to_kind(kind_of(d).ok_or_else(|| LoraError::UnsupportedDtype {
                            path: path.to_path_buf(),
                            key: key.clone(),
                            dtype: d.to_string(),
                            expected: "F32, F16, BF16 or F64",
                        })?)
                    }
                    None => tensor.shallow_clone(),
                };
                let blob = tensor_bytes(&tensor).ok_or_else(|| LoraError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    dtype: format!("{:?}", tensor.kind()),
                    expected: "F32, F16, BF16 or F64",
                })?;
                names.push(key);
                blobs.push(blob);
            }
            let weight_dtype = opts
                .dtype
                .or_else(|| dtype_of(t.down.kind()))
                .unwrap_or(Dtype::F32);
            let alpha = t.effective_alpha();
            let alpha_dtype = match opts.alpha_dtype {
                AlphaDtype::F32 => Dtype::F32,
                AlphaDtype::Weights => weight_dtype,
                AlphaDtype::I64 if alpha.fract() == 0.0 => Dtype::I64,
                AlphaDtype::I64 => Dtype::F32,
                AlphaDtype::Keep => t.alpha_dtype.unwrap_or(Dtype::F32),
            };
            names.push(format!("{name}.alpha"));
            blobs.push((alpha_dtype, vec![], alpha_bytes(alpha, alpha_dtype)));
        }
        let tensors: Vec<TensorToWrite<'_>> = names
            .iter()
            .zip(&blobs)
            .map(|(n, (d, s, b))| TensorToWrite::new(n.clone(), *d, s.clone(), b.as_slice()))
            .collect();

        let mut metadata = opts.metadata.clone();
        if let Some(spec) = &opts.modelspec {
            metadata.extend(modelspec(spec));
        }
        // Placeholders of the final length so the size check counts the hashes.
        metadata.insert("sshs_model_hash".into(), "0".repeat(64));
        metadata.insert("sshs_legacy_hash".into(), "0".repeat(8));
        let trimmed = fit_header(path, &tensors, &mut metadata, opts.header_limit)?;
        metadata.remove("sshs_model_hash");
        metadata.remove("sshs_legacy_hash");
        let hashes = sshs_hashes(path, &tensors, &metadata)?;
        metadata.insert("sshs_model_hash".into(), hashes.model_hash.clone());
        metadata.insert("sshs_legacy_hash".into(), hashes.legacy_hash.clone());
        write_safetensors_with_limit(path, &tensors, Some(&metadata), opts.header_limit)?;
        tracing::info!(path = %path.display(), modules = self.modules.len(), "saved LoRA");
        Ok(SaveReport {
            hashes,
            tag_frequency_trimmed: trimmed,
        })
    }
}

/// Dtype of each written alpha (spec §2.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AlphaDtype {
    /// Always an F32 scalar (our default).
    ///
    /// # Compatibility
    /// sd-scripts writes I64 alphas for an integer `--network_alpha` (including the default 1)
    /// without `--save_precision`, and the weight dtype with it; readers treat all of them the
    /// same. Use [`AlphaDtype::reference`] for reference-identical files.
    #[default]
    F32,
    /// The weights' dtype (the reference with `--save_precision`).
    Weights,
    /// I64 when the alpha is integral, else F32 (the reference without `--save_precision`).
    I64,
    /// The dtype the alpha was loaded with (F32 when none), for byte-identical re-saves.
    Keep,
}

impl AlphaDtype {
    /// The reference's rule: the save precision when one is given, otherwise I64 for an alpha
    /// given as a Python int (the training default) and F32 for a float.
    pub fn reference(save_precision_given: bool, alpha_given_as_integer: bool) -> Self {
        match (save_precision_given, alpha_given_as_integer) {
            (true, _) => AlphaDtype::Weights,
            (false, true) => AlphaDtype::I64,
            (false, false) => AlphaDtype::F32,
        }
    }
}

/// Options of [`LoraWeights::save`].
#[derive(Debug, Clone)]
pub struct SaveOptions {
    /// Weight dtype (`--save_precision`); `None` keeps each tensor's dtype.
    pub dtype: Option<Dtype>,
    /// Alpha dtype rule.
    pub alpha_dtype: AlphaDtype,
    /// `ss_*` and other metadata (values already formatted, see `sd_formats::metadata`).
    pub metadata: BTreeMap<String, String>,
    /// modelspec keys to add (see `sd_formats::metadata::modelspec`).
    pub modelspec: Option<ModelSpecInput>,
    /// Header size cap in bytes (at most `HEADER_LIMIT`, 100 MB).
    pub header_limit: u64,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions {
            dtype: None,
            alpha_dtype: AlphaDtype::F32,
            metadata: BTreeMap::new(),
            modelspec: None,
            header_limit: HEADER_LIMIT,
        }
    }
}

/// What [`LoraWeights::save`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaveReport {
    /// The `sshs_*` values stored in the metadata.
    pub hashes: SshsHashes,
    /// Whether `ss_tag_frequency` was trimmed (or dropped) to keep the header under the cap.
    pub tag_frequency_trimmed: bool,
}

/// One `ss_tag_frequency` directory: name and (tag, count) pairs, most frequent first.
type TagDir = (String, Vec<(String, serde_json::Value)>);

/// Shrinks `ss_tag_frequency` (least frequent tags first, per directory) until the header fits
/// `limit`; drops the key when even no tags do not fit. Returns whether it changed anything.
fn fit_header(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: &mut BTreeMap<String, String>,
    limit: u64,
) -> Result<bool> {
    let limit = limit.min(HEADER_LIMIT);
    let size = |m: &BTreeMap<String, String>| -> Result<u64> {
        Ok(serialize_header(path, tensors, Some(m))?.0.len() as u64)
    };
    if size(metadata)? <= limit {
        return Ok(false);
    }
    let Some(original) = metadata.get("ss_tag_frequency").cloned() else {
        return Ok(false); // the writer reports the oversize header
    };
    let parsed: Option<Vec<TagDir>> = serde_json::from_str::<serde_json::Value>(&original)
        .ok()
        .and_then(|v| {
            v.as_object().map(|dirs| {
                dirs.iter()
                    .map(|(d, tags)| {
                        let mut tags: Vec<(String, serde_json::Value)> = tags
                            .as_object()
                            .map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                            .unwrap_or_default();
                        // Most frequent first; stable, so ties keep file order.
                        tags.sort_by(|a, b| {
                            let (x, y) = (a.1.as_f64().unwrap_or(0.0), b.1.as_f64().unwrap_or(0.0));
                            y.partial_cmp(&x).unwrap_or(std::cmp::Ordering::Equal)
                        });
                        (d.clone(), tags)
                    })
                    .collect()
            })
        });
    if let Some(dirs) = parsed {
        let most = dirs.iter().map(|(_, t)| t.len()).max().unwrap_or(0);
        let mut keep = most / 2;
        while keep > 0 {
            let value = PyValue::Dict(
                dirs.iter()
                    .map(|(d, tags)| {
                        (
                            PyValue::Str(d.clone()),
                            PyValue::Dict(
                                tags.iter()
                                    .take(keep)
                                    .map(|(k, v)| (PyValue::Str(k.clone()), json_to_py(v)))
                                    .collect(),
                            ),
                        )
                    })
                    .collect(),
            );
            metadata.insert("ss_tag_frequency".into(), value.json_dumps());
            if size(metadata)? <= limit {
                tracing::warn!(
                    path = %path.display(),
                    kept_tags_per_directory = keep,
                    "ss_tag_frequency trimmed to keep the safetensors header under {limit} bytes"
                );
                return Ok(true);
            }
            keep /= 2;
        }
    }
    metadata.remove("ss_tag_frequency");
    tracing::warn!(path = %path.display(), "ss_tag_frequency dropped to keep the safetensors header under {limit} bytes");
    Ok(true)
}

fn json_to_py(v: &serde_json::Value) -> PyValue {
    match v {
        serde_json::Value::Null => PyValue::None,
        serde_json::Value::Bool(b) => PyValue::Bool(*b),
        serde_json::Value::Number(n) => match n.as_i64() {
            Some(i) => PyValue::Int(i),
            None => PyValue::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => PyValue::Str(s.clone()),
        serde_json::Value::Array(a) => PyValue::List(a.iter().map(json_to_py).collect()),
        serde_json::Value::Object(o) => PyValue::Dict(
            o.iter()
                .map(|(k, v)| (PyValue::Str(k.clone()), json_to_py(v)))
                .collect(),
        ),
    }
}

fn read_weight(file: &TensorFile, key: &str) -> Result<Tensor> {
    let info = file.info(key).ok_or_else(|| {
        LoraError::Format(sd_formats::error::Error::MissingKey {
            path: file.path().to_path_buf(),
            key: key.to_owned(),
        })
    })?;
    let kind = kind_of(info.dtype).ok_or_else(|| LoraError::UnsupportedDtype {
        path: file.path().to_path_buf(),
        key: key.to_owned(),
        dtype: info.dtype.to_string(),
        expected: "F32, F16, BF16 or F64",
    })?;
    let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
    let data = file.data(key)?;
    Ok(Tensor::from_data_size(data, &shape, kind))
}

fn read_alpha(file: &TensorFile, key: &str) -> Result<(f64, Dtype)> {
    let path = || file.path().to_path_buf();
    let info = file.info(key).ok_or_else(|| {
        LoraError::Format(sd_formats::error::Error::MissingKey {
            path: path(),
            key: key.to_owned(),
        })
    })?;
    if info.numel() != 1 || info.shape.len() > 1 {
        return Err(LoraError::ShapeMismatch {
            path: path(),
            key: key.to_owned(),
            expected: "a scalar ([] or [1])".into(),
            found: info.shape.iter().map(|&d| d as i64).collect(),
        });
    }
    let data = file.data(key)?;
    let value = match info.dtype {
        Dtype::F64 => f64::from_le_bytes(data.try_into().expect("one 8-byte element")),
        Dtype::I64 => i64::from_le_bytes(data.try_into().expect("one 8-byte element")) as f64,
        Dtype::Bool => {
            return Err(LoraError::UnsupportedDtype {
                path: path(),
                key: key.to_owned(),
                dtype: info.dtype.to_string(),
                expected: "a float or integer alpha",
            });
        }
        d => f64::from(sd_formats::dtype::to_f32(d, data)[0]),
    };
    if !value.is_finite() {
        return Err(LoraError::ShapeMismatch {
            path: path(),
            key: key.to_owned(),
            expected: format!("a finite alpha, found {value}; shape"),
            found: info.shape.iter().map(|&d| d as i64).collect(),
        });
    }
    Ok((value, info.dtype))
}

/// Contiguous little-endian bytes of a float tensor (moved to the CPU), with dtype and shape.
fn tensor_bytes(t: &Tensor) -> Option<(Dtype, Vec<usize>, Vec<u8>)> {
    let dtype = dtype_of(t.kind()).filter(|d| d.is_float())?;
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut bytes = vec![0u8; numel * dtype.size()];
    t.copy_data_u8(&mut bytes, numel);
    let shape = t.size().iter().map(|&d| d as usize).collect();
    Some((dtype, shape, bytes))
}

fn alpha_bytes(alpha: f64, dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F64 => alpha.to_le_bytes().to_vec(),
        Dtype::I64 => (alpha as i64).to_le_bytes().to_vec(),
        Dtype::F16 | Dtype::BF16 => {
            let kind = kind_of(dtype).expect("F16 and BF16 have a kind");
            let t = Tensor::from(alpha as f32).to_kind(kind);
            let mut b = vec![0u8; 2];
            t.copy_data_u8(&mut b, 1);
            b
        }
        _ => (alpha as f32).to_le_bytes().to_vec(),
    }
}
