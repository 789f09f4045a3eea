//! The checkpoint a merge reads: a single file, or a Diffusers folder seen as the single file
//! it converts to.
//!
//! A Diffusers folder is presented under its single-file (LDM/SGM) keys through the key
//! table's [`plan_to_ldm`]: each single-file tensor is built on demand from the components'
//! memory-mapped weight files (`Copy`/`Reshape` borrow the bytes, q/k/v rows are concatenated,
//! `text_projection` is transposed), so a merge from a folder streams like one from a file and
//! writes what sd-scripts writes for a checkpoint: one single file.
//!
//! # Source
//! `../shared/spec/tools.md` §1.2 step 4 (single-file output), `../shared/spec/lora-format.md`
//! §8 (key tables and their Diffusers → single-file fallbacks).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use sd_formats::diffusers::DiffusersModel;
use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, ConstantShape, LdmFallback, ToLdmOp, ToLdmPlan, plan_to_ldm};
use sd_formats::safetensors::TensorInfo;
use sd_formats::tensor_file::TensorFile;

use super::{MergeError, Result};
use crate::tensor::{dtype_of, from_bytes, kind_of};

/// A checkpoint to merge into, under single-file keys.
#[derive(Debug)]
pub struct CheckpointSource {
    path: PathBuf,
    names: Vec<String>,
    infos: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    kind: SourceKind,
    empty: BTreeMap<String, String>,
}

#[derive(Debug)]
enum SourceKind {
    File(TensorFile),
    Diffusers {
        family: ModelFamily,
        files: BTreeMap<Component, TensorFile>,
        ops: Vec<ToLdmOp>,
        components: Vec<Component>,
    },
}

impl CheckpointSource {
    /// Opens a single file (`.safetensors` or `.ckpt`) or, when `path` is a directory, a
    /// Diffusers folder (U-Net, text encoder(s) and VAE; each component's safetensors or
    /// `.bin` weights).
    ///
    /// # Errors
    /// The readers' errors; [`MergeError::KeyMap`] when the folder's keys do not fit the
    /// family's key table; [`MergeError::Invalid`] for a folder whose q/k/v parts have
    /// different dtypes.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            let f = TensorFile::open(path)?;
            let names = f.names().to_vec();
            let infos = names
                .iter()
                .map(|n| f.info(n).expect("names come from the file").clone())
                .collect();
            return Ok(Self::new(path, names, infos, SourceKind::File(f)));
        }
        let model = DiffusersModel::open(path)?;
        let family = model.family()?;
        let mut files = BTreeMap::new();
        for c in [
            Component::Unet,
            Component::TextEncoder,
            Component::TextEncoder2,
            Component::Vae,
        ] {
            if model.has(c) {
                let w = model.weights(c, None)?;
                files.insert(c, TensorFile::open(&w.path)?);
            }
        }
        let keys: Vec<(Component, &str, &[usize])> = files
            .iter()
            .flat_map(|(c, f)| {
                f.names().iter().map(move |n| {
                    let i = f.info(n).expect("names come from the file");
                    (*c, n.as_str(), i.shape.as_slice())
                })
            })
            .collect();
        let plan: ToLdmPlan = plan_to_ldm(family, keys, &path.display().to_string())?;
        let mut names = Vec::new();
        let mut infos = Vec::new();
        let mut ops = Vec::new();
        let mut components = Vec::new();
        for t in plan.targets {
            let f = &files[&t.component];
            let sources: Vec<&String> = match &t.op {
                ToLdmOp::Copy { key } | ToLdmOp::Reshape { key } | ToLdmOp::Transpose { key } => {
                    vec![key]
                }
                ToLdmOp::ConcatRows { keys } => keys.iter().collect(),
                ToLdmOp::LdmOnly {
                    fallback: LdmFallback::CopyOf(keys),
                } => keys.iter().collect(),
                ToLdmOp::LdmOnly {
                    fallback: LdmFallback::Constant { .. },
                } => vec![],
                // No reference checkpoint: the key is left out (sd-scripts does the same).
                ToLdmOp::LdmOnly { .. } => continue,
            };
            let dtypes: Vec<Dtype> = sources
                .iter()
                .map(|k| f.info(k).expect("the plan names present keys").dtype)
                .collect();
            let dtype = match dtypes.first() {
                Some(&d) => {
                    if dtypes.iter().any(|&e| e != d) {
                        return Err(MergeError::Invalid(format!(
                            "{}: the parts of {} have different dtypes {dtypes:?}",
                            path.display(),
                            t.key
                        )));
                    }
                    d
                }
                // Constants take the dtype of the component's first floating tensor.
                None => f
                    .names()
                    .iter()
                    .filter_map(|n| f.info(n))
                    .map(|i| i.dtype)
                    .find(|d| d.is_float())
                    .unwrap_or(Dtype::F32),
            };
            names.push(t.key);
            infos.push(TensorInfo {
                dtype,
                shape: t.shape,
            });
            ops.push(t.op);
            components.push(t.component);
        }
        Ok(Self::new(
            path,
            names,
            infos,
            SourceKind::Diffusers {
                family,
                files,
                ops,
                components,
            },
        ))
    }

    fn new(path: &Path, names: Vec<String>, infos: Vec<TensorInfo>, kind: SourceKind) -> Self {
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Self {
            path: path.to_path_buf(),
            names,
            infos,
            index,
            kind,
            empty: BTreeMap::new(),
        }
    }

    /// The file or folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether this is a Diffusers folder.
    pub fn is_diffusers(&self) -> bool {
        matches!(self.kind, SourceKind::Diffusers { .. })
    }

    /// The family read from the folder's configs (`None` for a single file: its keys decide).
    pub fn diffusers_family(&self) -> Option<ModelFamily> {
        match &self.kind {
            SourceKind::Diffusers { family, .. } => Some(*family),
            SourceKind::File(_) => None,
        }
    }

    /// The model family: a folder's from its configs, a single file's from its keys and
    /// shapes ([`ModelFamily::detect_ldm`]).
    ///
    /// # Errors
    /// [`MergeError::KeyMap`] when the keys fit no family.
    pub fn family(&self) -> Result<ModelFamily> {
        if let Some(f) = self.diffusers_family() {
            return Ok(f);
        }
        Ok(ModelFamily::detect_ldm(
            self.names
                .iter()
                .zip(&self.infos)
                .map(|(n, i)| (n.as_str(), i.shape.as_slice())),
            &self.path.display().to_string(),
        )?)
    }

    /// The underlying single file, if this is one.
    pub fn file(&self) -> Option<&TensorFile> {
        match &self.kind {
            SourceKind::File(f) => Some(f),
            SourceKind::Diffusers { .. } => None,
        }
    }

    /// Single-file keys, in file order (a folder: the key table's order).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.infos[i])
    }

    /// The file's own metadata (a folder: none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        match &self.kind {
            SourceKind::File(f) => f.metadata(),
            SourceKind::Diffusers { .. } => &self.empty,
        }
    }

    /// Raw little-endian bytes of `name` in its [`Self::info`] dtype and shape (borrowed from
    /// the map where the data is stored as is).
    ///
    /// # Errors
    /// [`MergeError::Invalid`] for an unknown name or a dtype libtorch cannot convert; the
    /// readers' errors.
    pub fn data(&self, name: &str) -> Result<Cow<'_, [u8]>> {
        let Some(&i) = self.index.get(name) else {
            return Err(MergeError::Invalid(format!(
                "{}: no tensor \"{name}\"",
                self.path.display()
            )));
        };
        let (files, ops, components) = match &self.kind {
            SourceKind::File(f) => return Ok(Cow::Borrowed(f.data(name)?)),
            SourceKind::Diffusers {
                files,
                ops,
                components,
                ..
            } => (files, ops, components),
        };
        let f = &files[&components[i]];
        let info = &self.infos[i];
        let concat = |keys: &[String]| -> Result<Cow<'_, [u8]>> {
            let mut out = Vec::with_capacity(info.numel() * info.dtype.size());
            for k in keys {
                out.extend_from_slice(f.data(k)?);
            }
            Ok(Cow::Owned(out))
        };
        match &ops[i] {
            ToLdmOp::Copy { key } | ToLdmOp::Reshape { key } => Ok(Cow::Borrowed(f.data(key)?)),
            ToLdmOp::ConcatRows { keys } => concat(keys),
            ToLdmOp::LdmOnly {
                fallback: LdmFallback::CopyOf(keys),
            } => concat(keys),
            ToLdmOp::Transpose { key } => {
                let src = f.info(key).expect("the plan names present keys");
                let t = from_bytes(key, src.dtype, &src.shape, f.data(key)?)
                    .map_err(MergeError::Invalid)?;
                Ok(Cow::Owned(tensor_bytes(&t.tr())))
            }
            ToLdmOp::LdmOnly {
                fallback: LdmFallback::Constant { value, shape },
            } => {
                let kind = kind_of(info.dtype).ok_or_else(|| {
                    MergeError::Invalid(format!("{name}: dtype {} has no kind", info.dtype))
                })?;
                let dims: Vec<i64> = match shape {
                    ConstantShape::Scalar => vec![],
                    ConstantShape::SquareHidden => info.shape.iter().map(|&d| d as i64).collect(),
                };
                let t =
                    tch::Tensor::full(dims.as_slice(), f64::from(*value), (kind, tch::Device::Cpu));
                Ok(Cow::Owned(tensor_bytes(&t)))
            }
            ToLdmOp::LdmOnly { .. } => Err(MergeError::Invalid(format!(
                "{}: \"{name}\" has no data in a Diffusers folder",
                self.path.display()
            ))),
        }
    }
}

/// Contiguous CPU bytes of `t` in its own dtype.
pub(crate) fn tensor_bytes(t: &tch::Tensor) -> Vec<u8> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let size = dtype_of(t.kind()).map_or(4, Dtype::size);
    let mut bytes = vec![0u8; numel * size];
    t.copy_data_u8(&mut bytes, numel);
    bytes
}
