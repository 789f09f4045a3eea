//! safetensors files: a memory-mapped, validated reader and an atomic, verified writer.
//!
//! Layout (spec/lora-format.md §1.1): 8-byte little-endian header length N, N bytes of JSON
//! header (space-padded to a multiple of 8), then the tightly packed little-endian tensor data.
//! Opening parses and checks only the header (O(header)); tensor bytes are read on access.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

use crate::dtype::{self, Dtype};
use crate::error::{Error, Result};

/// Largest header accepted when reading and produced when writing: 100 000 000 bytes, the limit
/// of the Python and Rust `safetensors` packages (a larger header makes them refuse the file).
pub const HEADER_LIMIT: u64 = 100_000_000;

/// Dtype and shape of one stored tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first; empty for a 0-dimensional (scalar) tensor.
    pub shape: Vec<usize>,
}

impl TensorInfo {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Size of the contiguous data in bytes.
    pub fn byte_len(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

/// Maps `path` read-only after checking it is a non-empty regular file.
///
/// # Errors
/// [`Error::IsDirectory`], [`Error::EmptyFile`], [`Error::Io`].
#[allow(unsafe_code)]
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, "open", e))?;
    if meta.is_dir() {
        return Err(Error::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    if meta.len() == 0 {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let file = File::open(path).map_err(|e| Error::io(path, "open", e))?;
    // SAFETY: the mapping is read-only and private to this process. Another process truncating
    // or rewriting the file while it is mapped is outside what we can guard against (the same
    // contract as every mmap-based safetensors reader); our own writer never modifies a file in
    // place, it renames a new file over the old one, which leaves existing mappings intact.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "map", e))?;
    Ok(mmap)
}

#[derive(Debug, Clone)]
struct Entry {
    info: TensorInfo,
    begin: usize,
    end: usize,
}

/// A memory-mapped safetensors file with a validated header.
///
/// Invariants after [`SafetensorsFile::open`]: every tensor has a supported dtype, its byte range
/// lies inside the data section and has length `product(shape) * element size`, and the ranges
/// cover the data section exactly, without overlap or gap.
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
    metadata: BTreeMap<String, String>,
    names: Vec<String>,
    entries: HashMap<String, Entry>,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

impl SafetensorsFile {
    /// Opens and validates `path`, reading only the header.
    ///
    /// # Errors
    /// [`Error::IsDirectory`], [`Error::EmptyFile`], [`Error::Truncated`],
    /// [`Error::HeaderTooLarge`] (header over [`HEADER_LIMIT`]), [`Error::InvalidHeader`],
    /// [`Error::UnsupportedDtype`], [`Error::LengthMismatch`], [`Error::BadOffsets`], [`Error::Io`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mmap = map_file(path)?;
        Self::from_mmap(path, mmap)
    }

    /// Validates an already mapped file (see [`SafetensorsFile::open`]).
    pub(crate) fn from_mmap(path: &Path, mmap: Mmap) -> Result<Self> {
        let p = || path.to_path_buf();
        let file_len = mmap.len() as u64;
        if file_len < 8 {
            return Err(Error::Truncated {
                path: p(),
                what: "the 8-byte header length".into(),
                expected: 8,
                found: file_len,
            });
        }
        // Other formats would otherwise read as an absurd header length; name them instead.
        let other = if mmap.starts_with(crate::ckpt::ZIP_MAGIC) {
            Some("a zip archive (a PyTorch checkpoint?)".to_string())
        } else if crate::ckpt::looks_like_pickle(&mmap) {
            Some("a pickle (a PyTorch checkpoint?)".to_string())
        } else if crate::tensor_file::looks_like_text(&mmap) {
            Some(crate::tensor_file::describe_bytes(&mmap))
        } else {
            None
        };
        if let Some(found) = other {
            return Err(Error::InvalidHeader {
                path: p(),
                reason: format!("the file is {found}, not safetensors"),
            });
        }
        let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes checked above"));
        if n > HEADER_LIMIT {
            return Err(Error::HeaderTooLarge {
                path: p(),
                size: n,
                limit: HEADER_LIMIT,
            });
        }
        if 8 + n > file_len {
            return Err(Error::Truncated {
                path: p(),
                what: format!("the header of {n} bytes"),
                expected: 8 + n,
                found: file_len,
            });
        }
        let data_start = 8 + n as usize;
        let header = &mmap[8..data_start];
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
            .map_err(|e| Error::InvalidHeader {
                path: p(),
                reason: format!("expected a JSON object, {e}"),
            })?;
        let data_len = mmap.len() - data_start;

        let mut metadata = BTreeMap::new();
        let mut names = Vec::with_capacity(map.len());
        let mut entries = HashMap::with_capacity(map.len());
        for (key, value) in map {
            if key == "__metadata__" {
                let serde_json::Value::Object(m) = value else {
                    return Err(Error::InvalidHeader {
                        path: p(),
                        reason: format!(
                            "\"__metadata__\" must be an object of strings, found {value}"
                        ),
                    });
                };
                for (k, v) in m {
                    let serde_json::Value::String(s) = v else {
                        return Err(Error::InvalidHeader {
                            path: p(),
                            reason: format!(
                                "metadata value of \"{k}\" must be a string, found {v}"
                            ),
                        });
                    };
                    metadata.insert(k, s);
                }
                continue;
            }
            let raw: RawInfo = serde_json::from_value(value).map_err(|e| Error::InvalidHeader {
                path: p(),
                reason: format!(
                    "entry \"{key}\": expected {{\"dtype\": string, \"shape\": [non-negative integers], \"data_offsets\": [begin, end]}}, {e}"
                ),
            })?;
            let Some(dtype) = Dtype::from_safetensors_name(&raw.dtype) else {
                return Err(Error::UnsupportedDtype {
                    path: p(),
                    key,
                    dtype: raw.dtype,
                });
            };
            let shape: Vec<usize> = raw.shape.iter().map(|&d| d as usize).collect();
            let expected = raw
                .shape
                .iter()
                .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d));
            let (begin, end) = raw.data_offsets;
            if end < begin {
                return Err(Error::BadOffsets {
                    path: p(),
                    key,
                    reason: format!("end {end} is before begin {begin}"),
                });
            }
            if expected != Some(end - begin) {
                return Err(Error::LengthMismatch {
                    path: p(),
                    key,
                    shape,
                    dtype: dtype.safetensors_name().into(),
                    expected: expected.unwrap_or(u64::MAX),
                    found: end - begin,
                });
            }
            if end > data_len as u64 {
                return Err(Error::Truncated {
                    path: p(),
                    what: format!("the data of \"{key}\" at offsets {begin}..{end}"),
                    expected: data_start as u64 + end,
                    found: file_len,
                });
            }
            let info = TensorInfo { dtype, shape };
            names.push(key.clone());
            entries.insert(
                key,
                Entry {
                    info,
                    begin: begin as usize,
                    end: end as usize,
                },
            );
        }

        // The ranges must tile the data section: the safetensors packages refuse anything else.
        let mut order: Vec<&String> = names.iter().collect();
        order.sort_by_key(|k| (entries[*k].begin, entries[*k].end));
        let mut covered = 0usize;
        let mut prev: Option<&String> = None;
        for k in &order {
            let e = &entries[*k];
            if e.begin < covered {
                let prev = prev.expect("covered > 0 implies a previous tensor");
                let pe = &entries[prev];
                return Err(Error::BadOffsets {
                    path: p(),
                    key: (*k).clone(),
                    reason: format!(
                        "bytes {}..{} overlap \"{prev}\" at {}..{}",
                        e.begin, e.end, pe.begin, pe.end
                    ),
                });
            }
            if e.begin > covered {
                return Err(Error::BadOffsets {
                    path: p(),
                    key: (*k).clone(),
                    reason: format!(
                        "begins at {} but the previous tensor ends at {covered}: {} bytes of the data section belong to no tensor",
                        e.begin,
                        e.begin - covered
                    ),
                });
            }
            covered = e.end;
            prev = Some(k);
        }
        if covered != data_len {
            return Err(Error::BadOffsets {
                path: p(),
                key: prev.cloned().unwrap_or_default(),
                reason: format!(
                    "the tensors cover {covered} bytes but the data section has {data_len}: {} trailing bytes belong to no tensor",
                    data_len - covered
                ),
            });
        }
        tracing::debug!(path = %path.display(), tensors = names.len(), header_bytes = n, "opened safetensors");
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap,
            data_start,
            metadata,
            names,
            entries,
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map (empty when the header has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Tensor names in header order (for files we or the reference wrote, also data order).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Tensor names sorted by byte order.
    pub fn sorted_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.names.iter().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Dtype and shape of `name`, `None` when absent.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.entries.get(name).map(|e| &e.info)
    }

    /// Raw little-endian, row-major bytes of `name`, borrowed from the mapping (no copy).
    ///
    /// # Errors
    /// [`Error::MissingKey`].
    pub fn data(&self, name: &str) -> Result<&[u8]> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: name.to_string(),
        })?;
        Ok(&self.mmap[self.data_start + e.begin..self.data_start + e.end])
    }

    /// Elements of `name` converted to `f32` (see [`dtype::to_f32`]).
    ///
    /// # Errors
    /// [`Error::MissingKey`].
    pub fn to_f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        let d = self.data(name)?;
        Ok(dtype::to_f32(self.entries[name].info.dtype, d))
    }

    /// Whether `name` holds a NaN or an infinity (always `false` for integer dtypes).
    ///
    /// # Errors
    /// [`Error::MissingKey`].
    pub fn has_non_finite(&self, name: &str) -> Result<bool> {
        let d = self.data(name)?;
        Ok(dtype::has_non_finite(self.entries[name].info.dtype, d))
    }
}

/// One tensor to write: name, dtype, shape and its raw little-endian row-major bytes.
#[derive(Debug, Clone)]
pub struct TensorToWrite<'a> {
    /// Key in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first (empty for a scalar).
    pub shape: Vec<usize>,
    /// `product(shape) * dtype.size()` bytes.
    pub data: Cow<'a, [u8]>,
}

impl<'a> TensorToWrite<'a> {
    /// Bundles the four parts of a tensor to write.
    pub fn new(
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<usize>,
        data: impl Into<Cow<'a, [u8]>>,
    ) -> Self {
        TensorToWrite {
            name: name.into(),
            dtype,
            shape,
            data: data.into(),
        }
    }
}

/// The serialized header of a file holding `tensors` and `metadata`, and the data order.
///
/// Returns the space-padded JSON header (length a multiple of 8, without the 8-byte length
/// prefix) and the indices of `tensors` in data order: dtype descending in the safetensors
/// crate's order, then name ascending, as the reference writer does. Metadata keys are sorted;
/// `__metadata__` is present iff `metadata` is `Some`.
///
/// # Errors
/// [`Error::DuplicateKey`], [`Error::InvalidHeader`] (a tensor named `__metadata__`),
/// [`Error::LengthMismatch`] (`data` length differs from `product(shape) * size`); `path` only
/// names the destination in these errors.
///
/// # Source
/// spec/lora-format.md §1.1.
pub fn serialize_header(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(Error::InvalidHeader {
                path: path.to_path_buf(),
                reason: "a tensor cannot be named \"__metadata__\"".into(),
            });
        }
        if !seen.insert(t.name.as_str()) {
            return Err(Error::DuplicateKey {
                path: path.to_path_buf(),
                key: t.name.clone(),
            });
        }
        let expected = t
            .shape
            .iter()
            .try_fold(t.dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
        if expected != Some(t.data.len() as u64) {
            return Err(Error::LengthMismatch {
                path: path.to_path_buf(),
                key: t.name.clone(),
                shape: t.shape.clone(),
                dtype: t.dtype.safetensors_name().into(),
                expected: expected.unwrap_or(u64::MAX),
                found: t.data.len() as u64,
            });
        }
    }
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| {
        let (ta, tb) = (&tensors[a], &tensors[b]);
        tb.dtype
            .safetensors_rank()
            .cmp(&ta.dtype.safetensors_rank())
            .then_with(|| ta.name.as_bytes().cmp(tb.name.as_bytes()))
    });

    let json_str = |s: &str| serde_json::to_string(s).expect("serializing a str cannot fail");
    let mut h = String::from("{");
    let mut first = true;
    if let Some(m) = metadata {
        h.push_str("\"__metadata__\":{");
        for (i, (k, v)) in m.iter().enumerate() {
            if i > 0 {
                h.push(',');
            }
            h.push_str(&json_str(k));
            h.push(':');
            h.push_str(&json_str(v));
        }
        h.push('}');
        first = false;
    }
    let mut offset = 0u64;
    for &i in &order {
        let t = &tensors[i];
        if !first {
            h.push(',');
        }
        first = false;
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        let end = offset + t.data.len() as u64;
        h.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json_str(&t.name),
            t.dtype.safetensors_name(),
            shape.join(",")
        ));
        offset = end;
    }
    h.push('}');
    let mut bytes = h.into_bytes();
    let padded = bytes.len().div_ceil(8) * 8;
    bytes.resize(padded, b' ');
    Ok((bytes, order))
}

/// Writes a safetensors file atomically, with the reader's [`HEADER_LIMIT`].
///
/// See [`write_safetensors_with_limit`].
pub fn write_safetensors(
    path: impl AsRef<Path>,
    tensors: &[TensorToWrite<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    write_safetensors_with_limit(path, tensors, metadata, HEADER_LIMIT)
}

/// Writes `tensors` and `metadata` to `path` without ever leaving a partial file there.
///
/// Steps: build the header and refuse (before creating any file) when it exceeds
/// `header_limit` bytes; write to a temporary file in the destination directory (created when
/// missing); fsync; re-open it with [`SafetensorsFile`] and check tensor count, names, dtypes,
/// shapes, byte lengths and metadata; rename it over `path`. `header_limit` lower than
/// [`HEADER_LIMIT`] is for tests and for callers wanting a tighter bound.
///
/// # Errors
/// [`Error::HeaderTooLargeToWrite`] (trim the metadata, e.g. `ss_tag_frequency`),
/// [`Error::IsDirectory`], the errors of [`serialize_header`], [`Error::WriteVerify`],
/// [`Error::Io`].
pub fn write_safetensors_with_limit(
    path: impl AsRef<Path>,
    tensors: &[TensorToWrite<'_>],
    metadata: Option<&BTreeMap<String, String>>,
    header_limit: u64,
) -> Result<()> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(Error::IsDirectory {
            path: path.to_path_buf(),
        });
    }
    let (header, order) = serialize_header(path, tensors, metadata)?;
    let limit = header_limit.min(HEADER_LIMIT);
    if header.len() as u64 > limit {
        return Err(Error::HeaderTooLargeToWrite {
            path: path.to_path_buf(),
            size: header.len() as u64,
            limit,
        });
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create directory", e))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let prefix = format!(".{file_name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // Temporary files are private (0600) by default; the result is an ordinary output file.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
    let mut tmp = builder
        .tempfile_in(&dir)
        .map_err(|e| Error::io(&dir, "create a temporary file in", e))?;
    {
        let tmp_path = tmp.path().to_path_buf();
        let wio = |e| Error::io(&tmp_path, "write", e);
        let mut w = std::io::BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(wio)?;
        w.write_all(&header).map_err(wio)?;
        for &i in &order {
            w.write_all(&tensors[i].data).map_err(wio)?;
        }
        w.flush().map_err(wio)?;
        drop(w);
        tmp.as_file()
            .sync_all()
            .map_err(|e| Error::io(&tmp_path, "sync", e))?;
    }
    verify_written(path, tmp.path(), tensors, metadata)?;
    tmp.persist(path)
        .map_err(|e| Error::io(path, "rename the temporary file to", e.error))?;
    // Make the rename durable; failure here is harmless for correctness, so it is only logged.
    if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "directory fsync failed");
    }
    tracing::debug!(path = %path.display(), tensors = tensors.len(), "wrote safetensors");
    Ok(())
}

fn verify_written(
    dest: &Path,
    tmp: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let bad = |reason: String| Error::WriteVerify {
        path: dest.to_path_buf(),
        reason,
    };
    let f = SafetensorsFile::open(tmp).map_err(|e| bad(e.to_string()))?;
    if f.len() != tensors.len() {
        return Err(bad(format!(
            "expected {} tensors, found {}",
            tensors.len(),
            f.len()
        )));
    }
    for t in tensors {
        let Some(info) = f.info(&t.name) else {
            return Err(bad(format!("tensor \"{}\" is missing", t.name)));
        };
        if info.dtype != t.dtype || info.shape != t.shape {
            return Err(bad(format!(
                "tensor \"{}\": expected {} {:?}, found {} {:?}",
                t.name, t.dtype, t.shape, info.dtype, info.shape
            )));
        }
        let n = f.data(&t.name)?.len();
        if n != t.data.len() {
            return Err(bad(format!(
                "tensor \"{}\": expected {} bytes, found {n}",
                t.name,
                t.data.len()
            )));
        }
    }
    let empty = BTreeMap::new();
    if f.metadata() != metadata.unwrap_or(&empty) {
        return Err(bad("metadata differs".into()));
    }
    Ok(())
}
