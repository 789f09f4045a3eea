//! One reader for both tensor file formats, chosen by content, not by extension.

use std::collections::BTreeMap;
use std::path::Path;

use crate::ckpt::{self, CkptFile, ZIP_MAGIC};
use crate::error::{Error, Result};
use crate::safetensors::{SafetensorsFile, TensorInfo, map_file};

/// The container format of an opened [`TensorFile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// safetensors.
    Safetensors,
    /// PyTorch zip checkpoint (`torch.save`).
    Checkpoint,
}

/// A safetensors file or a PyTorch checkpoint behind one read API.
#[derive(Debug)]
pub enum TensorFile {
    /// A safetensors file.
    Safetensors(SafetensorsFile),
    /// A PyTorch checkpoint.
    Checkpoint(CkptFile),
}

impl TensorFile {
    /// Opens `path`, detecting the format from its first bytes: a zip archive is a checkpoint, a
    /// pickle stream a (refused) bare pickle, text is refused, any other binary content is read
    /// as safetensors (so its header is validated and errors say what is wrong). The extension
    /// is ignored.
    ///
    /// # Errors
    /// [`Error::IsDirectory`] (with a hint for Diffusers folders), [`Error::EmptyFile`],
    /// [`Error::NotATensorFile`], and the errors of [`SafetensorsFile::open`] and
    /// [`CkptFile::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mmap = map_file(path)?;
        if mmap.starts_with(ZIP_MAGIC) || ckpt::looks_like_pickle(&mmap) {
            return Ok(TensorFile::Checkpoint(CkptFile::from_mmap(path, mmap)?));
        }
        // A safetensors file starts with a binary length (high bytes zero), so text is neither.
        if !looks_like_text(&mmap) {
            return Ok(TensorFile::Safetensors(SafetensorsFile::from_mmap(
                path, mmap,
            )?));
        }
        Err(Error::NotATensorFile {
            path: path.to_path_buf(),
            found: describe_bytes(&mmap),
        })
    }

    /// The detected format.
    pub fn format(&self) -> Format {
        match self {
            TensorFile::Safetensors(_) => Format::Safetensors,
            TensorFile::Checkpoint(_) => Format::Checkpoint,
        }
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        match self {
            TensorFile::Safetensors(f) => f.path(),
            TensorFile::Checkpoint(f) => f.path(),
        }
    }

    /// safetensors `__metadata__`; empty for checkpoints.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        match self {
            TensorFile::Safetensors(f) => f.metadata(),
            TensorFile::Checkpoint(f) => f.metadata(),
        }
    }

    /// Tensor names in file order (header order, or state-dict insertion order).
    pub fn names(&self) -> &[String] {
        match self {
            TensorFile::Safetensors(f) => f.names(),
            TensorFile::Checkpoint(f) => f.names(),
        }
    }

    /// Tensor names sorted by byte order.
    pub fn sorted_names(&self) -> Vec<&str> {
        match self {
            TensorFile::Safetensors(f) => f.sorted_names(),
            TensorFile::Checkpoint(f) => f.sorted_names(),
        }
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names().len()
    }

    /// Whether the file holds no tensors (a safetensors file may; a checkpoint never does).
    pub fn is_empty(&self) -> bool {
        self.names().is_empty()
    }

    /// Dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        match self {
            TensorFile::Safetensors(f) => f.info(name),
            TensorFile::Checkpoint(f) => f.info(name),
        }
    }

    /// Contiguous little-endian row-major bytes of `name`.
    ///
    /// # Errors
    /// [`Error::MissingKey`]; for checkpoints also the errors of [`CkptFile::data`].
    pub fn data(&self, name: &str) -> Result<&[u8]> {
        match self {
            TensorFile::Safetensors(f) => f.data(name),
            TensorFile::Checkpoint(f) => f.data(name),
        }
    }

    /// Elements of `name` as `f32` (see [`crate::dtype::to_f32`]).
    ///
    /// # Errors
    /// As [`TensorFile::data`].
    pub fn to_f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        match self {
            TensorFile::Safetensors(f) => f.to_f32_vec(name),
            TensorFile::Checkpoint(f) => f.to_f32_vec(name),
        }
    }

    /// Whether `name` holds a NaN or an infinity.
    ///
    /// # Errors
    /// As [`TensorFile::data`].
    pub fn has_non_finite(&self, name: &str) -> Result<bool> {
        match self {
            TensorFile::Safetensors(f) => f.has_non_finite(name),
            TensorFile::Checkpoint(f) => f.has_non_finite(name),
        }
    }

    /// Globals a checkpoint's pickle referenced that were ignored (see
    /// [`CkptFile::ignored_globals`]); empty for safetensors.
    pub fn ignored_globals(&self) -> &[String] {
        match self {
            TensorFile::Safetensors(_) => &[],
            TensorFile::Checkpoint(f) => f.ignored_globals(),
        }
    }
}

/// Whether the first bytes are printable UTF-8 text.
pub(crate) fn looks_like_text(bytes: &[u8]) -> bool {
    let head = &bytes[..bytes.len().min(512)];
    std::str::from_utf8(head).is_ok_and(|s| s.chars().all(|c| !c.is_control() || c.is_whitespace()))
}

/// A short description of what the first bytes of a file look like.
pub(crate) fn describe_bytes(bytes: &[u8]) -> String {
    if bytes.starts_with(b"\x89PNG") {
        return "a PNG image".into();
    }
    if bytes.starts_with(b"\xff\xd8\xff") {
        return "a JPEG image".into();
    }
    if bytes.starts_with(b"\x1f\x8b") {
        return "gzip data".into();
    }
    if looks_like_text(bytes) {
        let first: String = String::from_utf8_lossy(&bytes[..bytes.len().min(40)])
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        return format!("text starting with {first:?}");
    }
    let hex: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("binary data starting with bytes {}", hex.join(" "))
}
