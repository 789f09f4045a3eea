//! PyTorch checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`) read without executing anything.
//!
//! Format (torch >= 1.6 `torch.save`): a zip archive with `<archive>/data.pkl` (the pickled
//! object; tensors are `_rebuild_tensor_v2(storage, offset, size, stride, ...)` calls whose
//! storages are persistent ids `('storage', torch.<X>Storage, key, location, numel)`),
//! `<archive>/data/<key>` (raw little-endian storage bytes), `<archive>/byteorder`,
//! `<archive>/version`. The pickle is interpreted by [`crate::pickle`], which only builds data.
//!
//! The state dict is the top-level `state_dict` entry when it is a dict (Lightning/SD `.ckpt`),
//! else the top-level dict. Opening reads the zip directory and the pickle only; tensor bytes
//! of uncompressed (stored) entries are borrowed from the memory map, strided views and
//! compressed entries are materialised on first access and cached.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use memmap2::Mmap;
use zip::CompressionMethod;

use crate::dtype;
use crate::error::{Error, Result};
use crate::pickle::{self, Limits, Node, Pickle};
use crate::safetensors::{TensorInfo, map_file};

/// Where a storage's bytes are in the archive.
#[derive(Debug, Clone)]
struct StorageEntry {
    name: String,
    data_start: u64,
    size: u64,
    stored: bool,
}

#[derive(Debug)]
enum Source {
    /// Contiguous bytes inside an uncompressed entry: absolute byte range in the mapping.
    Slice { start: usize, end: usize },
    /// A strided view, or data inside a compressed entry: materialised on access.
    View {
        storage: String,
        offset: usize,
        stride: Vec<usize>,
    },
}

#[derive(Debug)]
struct CkptTensor {
    info: TensorInfo,
    source: Source,
    cache: OnceLock<Vec<u8>>,
}

/// A PyTorch zip checkpoint, opened without executing its pickle.
#[derive(Debug)]
pub struct CkptFile {
    path: PathBuf,
    mmap: Mmap,
    names: Vec<String>,
    tensors: HashMap<String, CkptTensor>,
    storages: HashMap<String, StorageEntry>,
    storage_cache: HashMap<String, OnceLock<Vec<u8>>>,
    ignored_globals: Vec<String>,
    metadata: BTreeMap<String, String>,
}

/// The first four bytes of a zip archive (local file header).
pub(crate) const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

impl CkptFile {
    /// Opens a checkpoint: reads the zip directory and interprets `data.pkl`.
    ///
    /// # Errors
    /// [`Error::IsDirectory`], [`Error::EmptyFile`], [`Error::Checkpoint`] (not a zip, no
    /// `data.pkl`, missing storage entries, views past the end of their storage),
    /// [`Error::Pickle`], [`Error::NoTensors`] (e.g. a pickle that only calls `os.system`),
    /// [`Error::UnsupportedDtype`], [`Error::Unsupported`] (big-endian files, the pre-1.6
    /// non-zip format), [`Error::Io`].
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mmap = map_file(path)?;
        Self::from_mmap(path, mmap)
    }

    pub(crate) fn from_mmap(path: &Path, mmap: Mmap) -> Result<Self> {
        let (pk, refs, storages) = if mmap.starts_with(ZIP_MAGIC) {
            read_zip(path, &mmap)?
        } else {
            read_legacy(path, &mmap)?
        };
        let p = || path.to_path_buf();
        let ck = |reason: String| Error::Checkpoint {
            path: path.to_path_buf(),
            reason,
        };
        let names: Vec<String> = refs.iter().map(|(n, _)| n.clone()).collect();
        let mut tensors = HashMap::with_capacity(names.len());
        for (key, t) in refs {
            let Some(dtype) = t.storage.dtype else {
                return Err(Error::UnsupportedDtype {
                    path: p(),
                    key,
                    dtype: t.storage.type_name.clone(),
                });
            };
            let entry = &storages[&t.storage.key];
            let es = dtype.size() as u64;
            let numel: Option<u64> = t
                .shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            // Last element's index + 1 (0 for an empty tensor).
            let extent = if numel == Some(0) {
                Some(0)
            } else {
                t.shape
                    .iter()
                    .zip(&t.stride)
                    .try_fold(t.offset, |a, (&d, &s)| {
                        a.checked_add((d as u64 - 1).checked_mul(s as u64)?)
                    })
                    .and_then(|last| last.checked_add(1))
            };
            let (Some(numel), Some(extent)) = (numel, extent) else {
                return Err(ck(format!(
                    "tensor \"{key}\" has an impossible size {:?}",
                    t.shape
                )));
            };
            if extent.checked_mul(es).is_none_or(|b| b > entry.size) {
                return Err(ck(format!(
                    "tensor \"{key}\" (shape {:?}, stride {:?}, offset {}) needs {} bytes of storage {} but it holds {} bytes",
                    t.shape,
                    t.stride,
                    t.offset,
                    extent.saturating_mul(es),
                    entry.name,
                    entry.size
                )));
            }
            let contiguous = is_contiguous(&t.shape, &t.stride);
            let source = if contiguous && entry.stored {
                let start = (entry.data_start + t.offset * es) as usize;
                Source::Slice {
                    start,
                    end: start + (numel * es) as usize,
                }
            } else {
                Source::View {
                    storage: t.storage.key.clone(),
                    offset: t.offset as usize,
                    stride: t.stride.clone(),
                }
            };
            tensors.insert(
                key,
                CkptTensor {
                    info: TensorInfo {
                        dtype,
                        shape: t.shape.clone(),
                    },
                    source,
                    cache: OnceLock::new(),
                },
            );
        }
        let storage_cache = storages
            .keys()
            .map(|k| (k.clone(), OnceLock::new()))
            .collect();
        let ignored_globals: Vec<String> = pk.ignored_globals.iter().cloned().collect();
        if !ignored_globals.is_empty() {
            tracing::debug!(path = %path.display(), globals = ?ignored_globals, "ignored pickle globals");
        }
        tracing::debug!(path = %path.display(), tensors = names.len(), "opened checkpoint");
        Ok(CkptFile {
            path: p(),
            mmap,
            names,
            tensors,
            storages,
            storage_cache,
            ignored_globals,
            metadata: BTreeMap::new(),
        })
    }

    /// The file this was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Always empty: pickled checkpoints carry no safetensors-style metadata.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// Tensor names of the state dict, in pickle (insertion) order.
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

    /// Whether the state dict holds no tensors (never true after a successful open).
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Dtype and shape of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name).map(|t| &t.info)
    }

    /// `module.name` of every global the pickle referenced that this reader ignored (sorted),
    /// e.g. Lightning callback classes, `_codecs.encode`, `posix.system`.
    pub fn ignored_globals(&self) -> &[String] {
        &self.ignored_globals
    }

    /// Contiguous little-endian row-major bytes of `name`: borrowed from the mapping for
    /// contiguous tensors in uncompressed entries (the torch default), else materialised once.
    ///
    /// # Errors
    /// [`Error::MissingKey`], [`Error::Checkpoint`] when a compressed entry cannot be inflated.
    pub fn data(&self, name: &str) -> Result<&[u8]> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingKey {
            path: self.path.clone(),
            key: name.to_string(),
        })?;
        match &t.source {
            Source::Slice { start, end } => Ok(&self.mmap[*start..*end]),
            Source::View {
                storage,
                offset,
                stride,
            } => {
                if let Some(v) = t.cache.get() {
                    return Ok(v);
                }
                let bytes = self.storage_bytes(storage)?;
                let v = gather(bytes, t.info.dtype.size(), *offset, &t.info.shape, stride);
                let _ = t.cache.set(v);
                Ok(t.cache.get().expect("cache set just above"))
            }
        }
    }

    /// Elements of `name` converted to `f32` (see [`dtype::to_f32`]).
    ///
    /// # Errors
    /// As [`CkptFile::data`].
    pub fn to_f32_vec(&self, name: &str) -> Result<Vec<f32>> {
        let d = self.data(name)?;
        Ok(dtype::to_f32(self.tensors[name].info.dtype, d))
    }

    /// Whether `name` holds a NaN or an infinity (always `false` for integer dtypes).
    ///
    /// # Errors
    /// As [`CkptFile::data`].
    pub fn has_non_finite(&self, name: &str) -> Result<bool> {
        let d = self.data(name)?;
        Ok(dtype::has_non_finite(self.tensors[name].info.dtype, d))
    }

    fn storage_bytes(&self, key: &str) -> Result<&[u8]> {
        let e = &self.storages[key];
        if e.stored {
            let start = e.data_start as usize;
            return Ok(&self.mmap[start..start + e.size as usize]);
        }
        let cache = &self.storage_cache[key];
        if let Some(v) = cache.get() {
            return Ok(v);
        }
        let ck = |reason: String| Error::Checkpoint {
            path: self.path.clone(),
            reason,
        };
        let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&self.mmap[..]))
            .map_err(|err| ck(format!("cannot reopen the zip archive: {err}")))?;
        let f = zip
            .by_name(&e.name)
            .map_err(|err| ck(format!("cannot read entry {}: {err}", e.name)))?;
        let mut buf = Vec::with_capacity(e.size as usize);
        f.take(e.size)
            .read_to_end(&mut buf)
            .map_err(|err| ck(format!("cannot inflate entry {}: {err}", e.name)))?;
        if buf.len() as u64 != e.size {
            return Err(ck(format!(
                "entry {} inflates to {} bytes, expected {}",
                e.name,
                buf.len(),
                e.size
            )));
        }
        let _ = cache.set(buf);
        Ok(cache.get().expect("cache set just above"))
    }
}

type Parts = (
    Pickle,
    Vec<(String, pickle::TensorRef)>,
    HashMap<String, StorageEntry>,
);

/// The pickle, state-dict tensors and storage locations of a zip checkpoint.
fn read_zip(path: &Path, mmap: &[u8]) -> Result<Parts> {
    let p = || path.to_path_buf();
    let ck = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(mmap)).map_err(|e| {
        ck(format!(
            "not a readable zip archive ({e}); the file may be truncated"
        ))
    })?;
    let pkl_name = zip
        .file_names()
        .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
        .min_by_key(|n| n.len())
        .map(str::to_string);
    let Some(pkl_name) = pkl_name else {
        let mut names: Vec<&str> = zip.file_names().take(5).collect();
        names.sort_unstable();
        return Err(ck(format!(
            "no data.pkl entry in the zip (found {} entries: {}{}); not a file written by torch.save",
            zip.len(),
            names.join(", "),
            if zip.len() > 5 { ", ..." } else { "" }
        )));
    };
    let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();

    let read_entry = |zip: &mut zip::ZipArchive<std::io::Cursor<&[u8]>>,
                      name: &str,
                      max: u64|
     -> Result<Vec<u8>> {
        let mut f = zip
            .by_name(name)
            .map_err(|e| ck(format!("cannot read entry {name}: {e}")))?;
        if f.size() > max {
            return Err(ck(format!(
                "entry {name} of {} bytes is over the {max}-byte limit",
                f.size()
            )));
        }
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| ck(format!("cannot read entry {name}: {e}")))?;
        Ok(buf)
    };
    let byteorder_name = format!("{prefix}byteorder");
    if zip.index_for_name(&byteorder_name).is_some() {
        let b = read_entry(&mut zip, &byteorder_name, 16)?;
        if b.trim_ascii() == b"big" {
            return Err(Error::Unsupported {
                path: p(),
                what: "a big-endian checkpoint (byteorder \"big\")".into(),
            });
        }
    }
    let limits = Limits::default();
    let pkl = read_entry(&mut zip, &pkl_name, limits.max_bytes as u64)?;
    let pk = pickle::load(&pkl, limits).map_err(|e| Error::Pickle {
        path: p(),
        offset: e.offset,
        reason: format!("{} (in {pkl_name})", e.reason),
    })?;

    let refs = collect_state_dict(path, &pk)?;
    let mut storages: HashMap<String, StorageEntry> = HashMap::new();
    for (key, t) in &refs {
        if !storages.contains_key(&t.storage.key) {
            let name = format!("{prefix}data/{}", t.storage.key);
            let Some(idx) = zip.index_for_name(&name) else {
                return Err(ck(format!(
                    "tensor \"{key}\" refers to storage entry {name}, which is missing from the archive"
                )));
            };
            let f = zip
                .by_index_raw(idx)
                .map_err(|e| ck(format!("cannot read entry {name}: {e}")))?;
            let entry = StorageEntry {
                name: name.clone(),
                data_start: f.data_start(),
                size: f.size(),
                stored: f.compression() == CompressionMethod::Stored,
            };
            // Deflate expands at most ~1032:1; a larger claim is a zip bomb or corruption.
            if !entry.stored && entry.size > f.compressed_size().saturating_mul(1100) {
                return Err(ck(format!(
                    "entry {name} claims {} bytes from {} compressed bytes",
                    entry.size,
                    f.compressed_size()
                )));
            }
            if entry.stored && entry.data_start.saturating_add(entry.size) > mmap.len() as u64 {
                return Err(Error::Truncated {
                    path: p(),
                    what: format!("the data of entry {name}"),
                    expected: entry.data_start.saturating_add(entry.size),
                    found: mmap.len() as u64,
                });
            }
            storages.insert(t.storage.key.clone(), entry);
        }
    }
    Ok((pk, refs, storages))
}

/// Whether `stride` is the row-major stride of `shape` (dimensions of size 1 may have any stride).
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies a strided view out of `storage` into row-major order. Bounds were checked at open.
fn gather(storage: &[u8], es: usize, offset: usize, shape: &[usize], stride: &[usize]) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut out = Vec::with_capacity(numel * es);
    if numel == 0 {
        return out;
    }
    if shape.is_empty() {
        out.extend_from_slice(&storage[offset * es..(offset + 1) * es]);
        return out;
    }
    let nd = shape.len();
    let (inner, inner_stride) = (shape[nd - 1], stride[nd - 1]);
    let mut idx = vec![0usize; nd - 1];
    loop {
        let base = offset + idx.iter().zip(stride).map(|(&i, &s)| i * s).sum::<usize>();
        if inner_stride == 1 {
            out.extend_from_slice(&storage[base * es..(base + inner) * es]);
        } else {
            for j in 0..inner {
                let e = base + j * inner_stride;
                out.extend_from_slice(&storage[e * es..(e + 1) * es]);
            }
        }
        // Odometer over the outer dimensions.
        let mut d = nd - 1;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Finds the state dict and its tensors (insertion order; a repeated key keeps its first
/// position and its last value, as a Python dict does).
fn collect_state_dict(path: &Path, pk: &Pickle) -> Result<Vec<(String, pickle::TensorRef)>> {
    let root = pk.root;
    let mut dict_id = None;
    if let Node::Dict(items) = pk.node(root) {
        dict_id = Some(root);
        for (k, v) in items {
            if pk.as_str(*k) == Some("state_dict") && matches!(pk.node(*v), Node::Dict(_)) {
                dict_id = Some(*v);
            }
        }
    }
    let mut names = Vec::new();
    let mut map: HashMap<String, pickle::TensorRef> = HashMap::new();
    let mut skipped = 0usize;
    if let Some(id) = dict_id
        && let Node::Dict(items) = pk.node(id)
    {
        for (k, v) in items {
            match (pk.as_str(*k), pk.node(*v)) {
                (Some(key), Node::Tensor(t)) => {
                    if map.insert(key.to_string(), t.clone()).is_none() {
                        names.push(key.to_string());
                    }
                }
                _ => skipped += 1,
            }
        }
    }
    if skipped > 0 {
        tracing::debug!(path = %path.display(), skipped, "state dict entries that are not tensors were skipped");
    }
    if names.is_empty() {
        let found = if !pk.calls.is_empty() {
            let shown: Vec<String> = pk
                .calls
                .iter()
                .take(3)
                .map(|c| format!("a call to {c}"))
                .collect();
            let more = pk.calls.len().saturating_sub(3);
            let more = if more > 0 {
                format!(" and {more} more calls")
            } else {
                String::new()
            };
            format!("{}{more}", shown.join(", "))
        } else {
            let mut d = pk.describe(dict_id.unwrap_or(root));
            if let Some(o) = pk.objects.first() {
                d.push_str(&format!(" (and an object of class {o})"));
            }
            d
        };
        return Err(Error::NoTensors {
            path: path.to_path_buf(),
            found,
        });
    }
    Ok(names
        .into_iter()
        .map(|n| {
            let t = map[&n].clone();
            (n, t)
        })
        .collect())
}

/// The pickle, state-dict tensors and storage locations of a file in the legacy (torch < 1.6,
/// non-zip) format; a bare pickle without that header is refused with what it holds.
///
/// Layout (torch `serialization._legacy_load`): pickles of the magic number
/// 0x1950a86a20f9469cfc6c, the protocol version (1001), a sys-info dict and the object
/// (storages as persistent ids `('storage', type, key, location, numel, view_metadata)`), a
/// pickled list of storage keys, then per listed key an 8-byte little-endian element count
/// followed by the raw bytes.
fn read_legacy(path: &Path, mmap: &[u8]) -> Result<Parts> {
    const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let p = || path.to_path_buf();
    let ck = |reason: String| Error::Checkpoint {
        path: path.to_path_buf(),
        reason,
    };
    let limits = Limits::default();
    let load_at = |pos: usize, what: &str| -> Result<Pickle> {
        pickle::load(&mmap[pos.min(mmap.len())..], limits).map_err(|e| Error::Pickle {
            path: p(),
            offset: pos as u64 + e.offset,
            reason: format!("{} (in the {what})", e.reason),
        })
    };
    let first = load_at(0, "pickle")?;
    if !matches!(first.node(first.root), Node::BigInt(b) if b.as_slice() == LEGACY_MAGIC) {
        // A bare pickle: report what it holds; tensors need storages it cannot carry.
        collect_state_dict(path, &first)?;
        return Err(Error::Unsupported {
            path: p(),
            what: "a bare pickle with tensors but without the zip container".into(),
        });
    }
    let mut pos = first.consumed;
    let version = load_at(pos, "legacy protocol version")?;
    if !matches!(version.node(version.root), Node::Int(1001)) {
        return Err(Error::Unsupported {
            path: p(),
            what: format!(
                "legacy protocol version {} (expected 1001)",
                version.describe(version.root)
            ),
        });
    }
    pos += version.consumed;
    let sys_info = load_at(pos, "legacy sys_info")?;
    if let Node::Dict(items) = sys_info.node(sys_info.root)
        && items.iter().any(|(k, v)| {
            sys_info.as_str(*k) == Some("little_endian")
                && matches!(sys_info.node(*v), Node::Bool(false))
        })
    {
        return Err(Error::Unsupported {
            path: p(),
            what: "a big-endian legacy checkpoint".into(),
        });
    }
    pos += sys_info.consumed;
    let pk = load_at(pos, "legacy data pickle")?;
    pos += pk.consumed;
    let refs = collect_state_dict(path, &pk)?;
    let keys_pk = load_at(pos, "legacy storage key list")?;
    pos += keys_pk.consumed;
    let Node::List(keys) = keys_pk.node(keys_pk.root) else {
        return Err(ck(format!(
            "expected the list of storage keys after the data pickle, found {}",
            keys_pk.describe(keys_pk.root)
        )));
    };
    let kinds: HashMap<&str, &pickle::StorageRef> = pk
        .nodes
        .iter()
        .filter_map(|n| match n {
            Node::Storage(s) => Some((s.key.as_str(), s)),
            _ => None,
        })
        .collect();
    let mut storages = HashMap::new();
    for &k in keys {
        let Some(key) = keys_pk.as_str(k) else {
            return Err(ck("a storage key is not a string".into()));
        };
        let Some(s) = kinds.get(key) else {
            return Err(ck(format!(
                "storage {key} is listed but no tensor refers to it"
            )));
        };
        let Some(dtype) = s.dtype else {
            return Err(ck(format!(
                "storage {key} has the unsupported type {}",
                s.type_name
            )));
        };
        let Some(head) = mmap.get(pos..pos + 8) else {
            return Err(Error::Truncated {
                path: p(),
                what: format!("the size of storage {key}"),
                expected: pos as u64 + 8,
                found: mmap.len() as u64,
            });
        };
        let numel = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        let size = numel.saturating_mul(dtype.size() as u64);
        let data_start = pos as u64 + 8;
        if data_start.saturating_add(size) > mmap.len() as u64 {
            return Err(Error::Truncated {
                path: p(),
                what: format!("the data of storage {key}"),
                expected: data_start.saturating_add(size),
                found: mmap.len() as u64,
            });
        }
        storages.insert(
            key.to_string(),
            StorageEntry {
                name: key.to_string(),
                data_start,
                size,
                stored: true,
            },
        );
        pos = (data_start + size) as usize;
    }
    for (key, t) in &refs {
        if !storages.contains_key(&t.storage.key) {
            return Err(ck(format!(
                "tensor \"{key}\" refers to storage {}, which the file does not contain",
                t.storage.key
            )));
        }
    }
    Ok((pk, refs, storages))
}

/// Whether `bytes` start like a pickle stream (protocol 2+ header).
pub(crate) fn looks_like_pickle(bytes: &[u8]) -> bool {
    bytes.len() >= 2
        && bytes[0] == 0x80
        && (2..=5).contains(&bytes[1])
        && !looks_like_safetensors(bytes)
}

/// A safetensors file whose header length happens to start with the bytes of a pickle
/// protocol marker (`80 02..05`, i.e. a header of 640, 896, 1152 or 1408 bytes) is still a
/// safetensors file: its length fits the file and its JSON header starts right after it.
fn looks_like_safetensors(bytes: &[u8]) -> bool {
    let Some(len) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    else {
        return false;
    };
    len.checked_add(8)
        .is_some_and(|end| end <= bytes.len() as u64)
        && bytes.get(8) == Some(&b'{')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_header_of_640_bytes_is_not_a_pickle() {
        let mut bytes = 640u64.to_le_bytes().to_vec();
        assert_eq!(&bytes[..2], &[0x80, 0x02]);
        bytes.push(b'{');
        bytes.resize(8 + 640, b' ');
        assert!(!looks_like_pickle(&bytes));
        assert!(looks_like_pickle(&[0x80, 0x02, 0x7d, 0x71, 0x00, 0x2e]));
    }

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(is_contiguous(&[0, 3], &[7, 7]));
    }

    #[test]
    fn gather_transposed_and_offset() {
        // storage 0..6 as u8; view [3,2] with stride [1,3] = transpose of [[0,1,2],[3,4,5]]
        let s: Vec<u8> = (0..6).collect();
        assert_eq!(gather(&s, 1, 0, &[3, 2], &[1, 3]), vec![0, 3, 1, 4, 2, 5]);
        assert_eq!(gather(&s, 1, 2, &[2, 2], &[2, 1]), vec![2, 3, 4, 5]);
        assert_eq!(gather(&s, 1, 5, &[], &[]), vec![5]);
        // two-byte elements keep their byte order
        let s2: Vec<u8> = (0..8).collect();
        assert_eq!(gather(&s2, 2, 1, &[2], &[2]), vec![2, 3, 6, 7]);
    }
}
