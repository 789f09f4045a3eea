//! A safetensors writer that pulls each tensor's bytes when it writes them.
//!
//! [`sd_formats::safetensors::write_safetensors`] needs every tensor in memory at once; merging
//! into a multi-GB checkpoint must not. This writer lays out the same header (same data
//! order, same format, via `serialize_header`), then asks a callback for one tensor at a time,
//! writes it and drops it. Atomic like the library writer: temporary file in the target
//! directory, fsync, header re-read and checked, rename.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use sd_formats::dtype::Dtype;
use sd_formats::safetensors::{HEADER_LIMIT, SafetensorsFile, TensorToWrite, serialize_header};

use super::{MergeError, Result};

/// Name, dtype and shape of one tensor to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Key in the file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of the tensor's data.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

fn io<'p>(path: &'p Path, what: &'static str) -> impl FnOnce(std::io::Error) -> MergeError + 'p {
    move |source| MergeError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Writes `specs` to `path` (safetensors), calling `produce(index)` for each tensor's bytes in
/// data order; returns the number of bytes written.
///
/// # Errors
/// [`MergeError::Invalid`] when `produce` returns a wrong byte count; errors of `produce`;
/// [`MergeError::Format`] for header problems (duplicate names, header over the limit) and the
/// verification; [`MergeError::Io`].
pub fn write_streaming<'d>(
    path: &Path,
    specs: &[TensorSpec],
    metadata: Option<&BTreeMap<String, String>>,
    mut produce: impl FnMut(usize) -> Result<Cow<'d, [u8]>>,
) -> Result<u64> {
    // Placeholder data only feeds the header's length checks: a calloc'd buffer that is never
    // touched costs no resident memory.
    let max = specs.iter().map(TensorSpec::byte_len).max().unwrap_or(0);
    let zeros = vec![0u8; max];
    let fake: Vec<TensorToWrite<'_>> = specs
        .iter()
        .map(|s| {
            TensorToWrite::new(
                s.name.clone(),
                s.dtype,
                s.shape.clone(),
                &zeros[..s.byte_len()],
            )
        })
        .collect();
    let (header, order) = serialize_header(path, &fake, metadata)?;
    drop(fake);
    drop(zeros);
    if header.len() as u64 > HEADER_LIMIT {
        return Err(MergeError::Invalid(format!(
            "{}: header of {} bytes exceeds the {HEADER_LIMIT}-byte limit",
            path.display(),
            header.len()
        )));
    }
    let dir: PathBuf = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir, "create directory"))?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{file_name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(io(&dir, "create a temporary file in"))?;
    let tmp_path = tmp.path().to_path_buf();
    let mut written = 0u64;
    {
        let mut w = std::io::BufWriter::with_capacity(4 << 20, tmp.as_file_mut());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io(&tmp_path, "write"))?;
        w.write_all(&header).map_err(io(&tmp_path, "write"))?;
        written += 8 + header.len() as u64;
        for &i in &order {
            let bytes = produce(i)?;
            if bytes.len() != specs[i].byte_len() {
                return Err(MergeError::Invalid(format!(
                    "tensor \"{}\": expected {} bytes, produced {}",
                    specs[i].name,
                    specs[i].byte_len(),
                    bytes.len()
                )));
            }
            w.write_all(&bytes).map_err(io(&tmp_path, "write"))?;
            written += bytes.len() as u64;
        }
        w.flush().map_err(io(&tmp_path, "write"))?;
    }
    tmp.as_file().sync_all().map_err(io(&tmp_path, "sync"))?;
    verify(path, &tmp_path, specs, metadata)?;
    tmp.persist(path).map_err(|e| MergeError::Io {
        path: path.to_path_buf(),
        what: "rename the temporary file to",
        source: e.error,
    })?;
    tracing::debug!(path = %path.display(), tensors = specs.len(), bytes = written, "wrote safetensors");
    Ok(written)
}

/// Checks that a file just written for `dest` holds exactly `specs` (count, names, dtypes and
/// shapes), given its tensor count and a lookup of its headers.
///
/// # Errors
/// [`MergeError::Invalid`] naming `dest` and the first difference.
pub(super) fn check_written<'a>(
    dest: &Path,
    specs: &[TensorSpec],
    count: usize,
    info: impl Fn(&str) -> Option<&'a sd_formats::safetensors::TensorInfo>,
) -> Result<()> {
    let bad = |reason: String| {
        MergeError::Invalid(format!(
            "{}: written file failed verification: {reason}",
            dest.display()
        ))
    };
    if count != specs.len() {
        return Err(bad(format!(
            "expected {} tensors, found {count}",
            specs.len()
        )));
    }
    for s in specs {
        match info(&s.name) {
            Some(i) if i.dtype == s.dtype && i.shape == s.shape => {}
            Some(i) => {
                return Err(bad(format!(
                    "\"{}\": expected {} {:?}, found {} {:?}",
                    s.name, s.dtype, s.shape, i.dtype, i.shape
                )));
            }
            None => return Err(bad(format!("\"{}\" is missing", s.name))),
        }
    }
    Ok(())
}

fn verify(
    dest: &Path,
    tmp: &Path,
    specs: &[TensorSpec],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let bad = |reason: String| {
        MergeError::Invalid(format!(
            "{}: written file failed verification: {reason}",
            dest.display()
        ))
    };
    let f = SafetensorsFile::open(tmp)?;
    check_written(dest, specs, f.len(), |name| f.info(name))?;
    let empty = BTreeMap::new();
    if f.metadata() != metadata.unwrap_or(&empty) {
        return Err(bad("metadata differs".into()));
    }
    Ok(())
}
