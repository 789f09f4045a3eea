//! Named tensors of a training state (optimiser, scheduler, loss scaler) in one safetensors
//! file, written atomically and read back to a device.

use std::path::Path;

use sd_formats::safetensors::{SafetensorsFile, TensorToWrite, write_safetensors};
use tch::{Device, Tensor};

use super::trainer::TrainError;
use crate::tensor::{dtype_of, from_bytes};

/// Writes `named` (any device and dtype the file format holds) to `path`.
///
/// # Errors
/// [`TrainError::Invalid`] for a dtype files cannot hold; I/O errors from the writer.
pub fn write(path: &Path, named: &[(String, Tensor)]) -> Result<(), TrainError> {
    let mut blobs = Vec::with_capacity(named.len());
    for (name, t) in named {
        let t = t.to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).ok_or_else(|| {
            TrainError::Invalid(format!(
                "state tensor {name}: kind {:?} cannot be saved",
                t.kind()
            ))
        })?;
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let numel = shape.iter().product::<usize>();
        let mut bytes = vec![0u8; numel * dtype.size()];
        t.copy_data_u8(&mut bytes, numel);
        blobs.push((name.clone(), dtype, shape, bytes));
    }
    let views: Vec<TensorToWrite<'_>> = blobs
        .iter()
        .map(|(n, d, s, b)| TensorToWrite::new(n.as_str(), *d, s.clone(), b.as_slice()))
        .collect();
    write_safetensors(path, &views, None).map_err(|e| TrainError::Invalid(e.to_string()))?;
    Ok(())
}

/// Reads every tensor of `path` onto `device`.
///
/// # Errors
/// [`TrainError::Invalid`] naming the file for unreadable or malformed files.
pub fn read(path: &Path, device: Device) -> Result<Vec<(String, Tensor)>, TrainError> {
    let file = SafetensorsFile::open(path).map_err(|e| TrainError::Invalid(e.to_string()))?;
    let mut out = Vec::new();
    for name in file.names() {
        let info = file.info(name).ok_or_else(|| {
            TrainError::Invalid(format!("{}: no info for {name}", path.display()))
        })?;
        let data = file
            .data(name)
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        let t = from_bytes(
            &format!("{} key {name}", path.display()),
            info.dtype,
            &info.shape,
            data,
        )
        .map_err(TrainError::Invalid)?;
        out.push((name.clone(), t.to_device(device)));
    }
    Ok(out)
}
