//! The bridge from `sd_formats` tensor bytes to `tch::Tensor`.

use sd_formats::dtype::Dtype;
use tch::{Device, Kind, Tensor};

/// The libtorch kind of a file dtype, `None` for dtypes libtorch cannot hold here.
pub fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F64 => Kind::Double,
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::Bool => Kind::Bool,
    })
}

/// The file dtype of a libtorch kind, `None` for kinds files do not store.
pub fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Double => Dtype::F64,
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::Bool,
        _ => return None,
    })
}

/// Copies little-endian tensor bytes into a CPU tensor of the file's dtype and `shape`.
///
/// # Errors
/// When the byte length does not match `shape` × element size (the readers validate this
/// already, so this is a second line of defence) — message names `what`.
pub fn from_bytes(
    what: &str,
    dtype: Dtype,
    shape: &[usize],
    bytes: &[u8],
) -> Result<Tensor, String> {
    let kind =
        kind_of(dtype).ok_or_else(|| format!("{what}: dtype {dtype:?} has no libtorch kind"))?;
    let numel: usize = shape.iter().product();
    if numel * dtype.size() != bytes.len() {
        return Err(format!(
            "{what}: {} bytes for shape {shape:?} of {dtype:?}",
            bytes.len()
        ));
    }
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    Tensor::f_from_data_size(bytes, &dims, kind).map_err(|e| format!("{what}: {e}"))
}

/// Moves `t` to `device` and, for floating-point tensors, casts it to `kind` in one pass.
pub fn to_device_kind(t: Tensor, device: Device, kind: Kind) -> Tensor {
    if t.is_floating_point() {
        t.to_device_(device, kind, false, false)
    } else {
        t.to_device(device)
    }
}
