//! A streaming writer of PyTorch zip checkpoints (what `torch.save` writes), for `.ckpt`/`.pt`
//! output of the merge tools.
//!
//! Layout (torch ≥ 1.6 zip serialization): a zip archive of stored (uncompressed) entries
//! under one top folder, `archive/`: `data.pkl` (a protocol-2 pickle of the object: a dict of
//! tensors, each `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False,
//! OrderedDict())` whose storage is the persistent id `('storage', torch.<X>Storage, '<i>',
//! 'cpu', numel)`), `data/<i>` (each tensor's little-endian bytes, aligned to 64 bytes as torch
//! aligns them, so `torch.load(mmap=True)` works), `byteorder` (`little`), `version` (`3`).
//! Zip64 records are used where offsets pass 4 GiB.
//!
//! The pickle only needs names, dtypes and shapes, so it is written first; tensor bytes are
//! then asked for one at a time (peak memory stays near one tensor). Atomic like
//! [`super::stream::write_streaming`]: temporary file in the target folder, fsync, re-read with
//! our own checkpoint reader and checked, rename.
//!
//! # Source
//! The format as read by `crates/sd-formats/src/ckpt.rs`; sd-scripts writes
//! `torch.save({"state_dict": sd, "epoch": e, "global_step": s})` for checkpoints
//! (`library/model_util.py save_stable_diffusion_checkpoint`) and `torch.save(sd)` for LoRAs
//! (spec tools §1.2 step 4, §1.3 step 7).

use std::borrow::Cow;
use std::io::Write;
use std::path::{Path, PathBuf};

use sd_formats::ckpt::CkptFile;
use sd_formats::dtype::Dtype;
use zip::CompressionMethod;
use zip::write::{SimpleFileOptions, ZipWriter};

use super::stream::TensorSpec;
use super::{MergeError, Result};

/// The object pickled into `data.pkl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorchTopLevel {
    /// `{"state_dict": {tensors}, "epoch": e, "global_step": s}` (a Stable Diffusion `.ckpt`).
    StateDict {
        /// `epoch` value.
        epoch: i64,
        /// `global_step` value.
        global_step: i64,
    },
    /// `{tensors}` (what `torch.save(state_dict)` writes, e.g. a LoRA `.pt`).
    Tensors,
}

/// `torch.<X>Storage` class name of a dtype.
fn storage_class(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "FloatStorage",
        Dtype::F16 => "HalfStorage",
        Dtype::BF16 => "BFloat16Storage",
        Dtype::F64 => "DoubleStorage",
        Dtype::I64 => "LongStorage",
        Dtype::I32 => "IntStorage",
        Dtype::I16 => "ShortStorage",
        Dtype::I8 => "CharStorage",
        Dtype::U8 => "ByteStorage",
        Dtype::Bool => "BoolStorage",
    }
}

/// A minimal protocol-2 pickle writer (no memo: every global is written out in full).
struct Pickler(Vec<u8>);

impl Pickler {
    fn op(&mut self, b: u8) {
        self.0.push(b);
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.0.push(b'K');
            self.0.push(v as u8);
        } else if i32::try_from(v).is_ok() {
            self.0.push(b'J');
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: length byte, little-endian two's complement.
            self.0.push(0x8a);
            self.0.push(8);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn tuple(&mut self, items: &[i64]) {
        match items.len() {
            0 => self.op(b')'),
            n => {
                if n > 3 {
                    self.op(b'(');
                }
                for &i in items {
                    self.int(i);
                }
                self.op(match n {
                    1 => 0x85,
                    2 => 0x86,
                    3 => 0x87,
                    _ => b't',
                });
            }
        }
    }
    fn tensor(&mut self, storage_key: usize, spec: &TensorSpec, class: &str) {
        let size: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
        let mut stride = vec![1i64; size.len()];
        for i in (0..size.len().saturating_sub(1)).rev() {
            stride[i] = stride[i + 1] * size[i + 1].max(1);
        }
        let numel: i64 = size.iter().product();
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b'('); // args
        self.op(b'('); // persistent id tuple
        self.str("storage");
        self.global("torch", class);
        self.str(&storage_key.to_string());
        self.str("cpu");
        self.int(numel);
        self.op(b't');
        self.op(b'Q'); // BINPERSID
        self.int(0); // storage offset
        self.tuple(&size);
        self.tuple(&stride);
        self.op(0x89); // requires_grad = False
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R'); // OrderedDict()
        self.op(b't');
        self.op(b'R'); // _rebuild_tensor_v2(...)
    }
    fn tensor_dict(&mut self, specs: &[TensorSpec], classes: &[&str]) {
        self.op(b'}');
        if specs.is_empty() {
            return;
        }
        self.op(b'(');
        for (i, s) in specs.iter().enumerate() {
            self.str(&s.name);
            self.tensor(i, s, classes[i]);
        }
        self.op(b'u'); // SETITEMS
    }
}

fn io<'p>(path: &'p Path, what: &'static str) -> impl FnOnce(std::io::Error) -> MergeError + 'p {
    move |source| MergeError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

fn zip_err(path: &Path) -> impl FnOnce(zip::result::ZipError) -> MergeError + '_ {
    move |e| MergeError::Io {
        path: path.to_path_buf(),
        what: "write zip archive",
        source: std::io::Error::other(e.to_string()),
    }
}

/// Writes `specs` as a PyTorch zip checkpoint at `path`, calling `produce(index)` for each
/// tensor's bytes (in `specs` order); returns the file size.
///
/// # Errors
/// [`MergeError::Invalid`] when `produce` returns a wrong byte count; errors of `produce`; [`MergeError::Io`];
/// [`MergeError::Format`] / [`MergeError::Invalid`] when the written file does not read back
/// with the same names, dtypes and shapes.
pub fn write_torch_checkpoint<'d>(
    path: &Path,
    specs: &[TensorSpec],
    top: TorchTopLevel,
    mut produce: impl FnMut(usize) -> Result<Cow<'d, [u8]>>,
) -> Result<u64> {
    let classes: Vec<&str> = specs.iter().map(|s| storage_class(s.dtype)).collect();
    let mut p = Pickler(vec![0x80, 2]);
    match top {
        TorchTopLevel::Tensors => p.tensor_dict(specs, &classes),
        TorchTopLevel::StateDict { epoch, global_step } => {
            p.op(b'}');
            p.op(b'(');
            p.str("state_dict");
            p.tensor_dict(specs, &classes);
            p.str("epoch");
            p.int(epoch);
            p.str("global_step");
            p.int(global_step);
            p.op(b'u');
        }
    }
    p.op(b'.');

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
    let size = {
        let buffered = std::io::BufWriter::with_capacity(4 << 20, tmp.as_file_mut());
        let mut zip = ZipWriter::new(buffered);
        let opts = SimpleFileOptions::default()
            .compression_method(CompressionMethod::Stored)
            .large_file(false);
        let ze = zip_err(&tmp_path);
        zip.start_file("archive/data.pkl", opts).map_err(ze)?;
        zip.write_all(&p.0).map_err(io(&tmp_path, "write"))?;
        zip.start_file("archive/byteorder", opts)
            .map_err(zip_err(&tmp_path))?;
        zip.write_all(b"little").map_err(io(&tmp_path, "write"))?;
        for (i, s) in specs.iter().enumerate() {
            let bytes = produce(i)?;
            if bytes.len() != s.byte_len() {
                return Err(MergeError::Invalid(format!(
                    "tensor \"{}\": expected {} bytes, produced {}",
                    s.name,
                    s.byte_len(),
                    bytes.len()
                )));
            }
            let o = opts
                .with_alignment(64)
                .large_file(bytes.len() as u64 >= u32::MAX as u64);
            zip.start_file(format!("archive/data/{i}"), o)
                .map_err(zip_err(&tmp_path))?;
            zip.write_all(&bytes).map_err(io(&tmp_path, "write"))?;
        }
        zip.start_file("archive/version", opts)
            .map_err(zip_err(&tmp_path))?;
        zip.write_all(b"3\n").map_err(io(&tmp_path, "write"))?;
        let mut buffered = zip.finish().map_err(zip_err(&tmp_path))?;
        buffered.flush().map_err(io(&tmp_path, "write"))?;
        drop(buffered);
        tmp.as_file()
            .metadata()
            .map_err(io(&tmp_path, "stat"))?
            .len()
    };
    tmp.as_file().sync_all().map_err(io(&tmp_path, "sync"))?;
    verify(path, &tmp_path, specs)?;
    tmp.persist(path).map_err(|e| MergeError::Io {
        path: path.to_path_buf(),
        what: "rename the temporary file to",
        source: e.error,
    })?;
    tracing::debug!(path = %path.display(), tensors = specs.len(), bytes = size, "wrote PyTorch checkpoint");
    Ok(size)
}

fn verify(dest: &Path, tmp: &Path, specs: &[TensorSpec]) -> Result<()> {
    let f = CkptFile::open(tmp)?;
    super::stream::check_written(dest, specs, f.len(), |name| f.info(name))
}
