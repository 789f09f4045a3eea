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

/// Puts the complete folder `new` at `dir`, replacing any folder there, so that at every
/// moment `dir` names either the old or the new folder in full (a SIGKILL between the steps
/// never leaves `dir` missing).
///
/// On Linux the two are swapped in one `renameat2(RENAME_EXCHANGE)` call and the old folder
/// (then at `new`) is deleted; where the file system or OS lacks the exchange, the old folder
/// is moved to a hidden sibling first, `new` renamed in, and the old one deleted — `dir` is then
/// briefly missing, and the old state stays complete under `.<name>.old-*`.
///
/// # Errors
/// I/O errors of the renames or the deletion.
pub fn replace_dir(new: &Path, dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return std::fs::rename(new, dir);
    }
    #[cfg(target_os = "linux")]
    {
        if exchange(new, dir).is_ok() {
            return std::fs::remove_dir_all(new);
        }
    }
    let parent = dir.parent().unwrap_or(Path::new("."));
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".to_owned());
    let aside = tempfile::Builder::new()
        .prefix(&format!(".{name}.old-"))
        .tempdir_in(parent)?
        .keep();
    // `aside` exists as an empty folder; rename onto an empty folder replaces it on Unix.
    std::fs::rename(dir, &aside)?;
    std::fs::rename(new, dir)?;
    std::fs::remove_dir_all(&aside)
}

/// Swaps two paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`).
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let to_c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (ca, cb) = (to_c(a)?, to_c(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call;
    // AT_FDCWD makes relative paths resolve against the current directory, as std does.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::replace_dir;

    #[test]
    fn replace_dir_swaps_in_the_new_folder_and_removes_the_old() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("run-state");
        let new = tmp.path().join(".state-new");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("train_state.json"), "old").expect("write");
        std::fs::create_dir(&new).expect("mkdir");
        std::fs::write(new.join("train_state.json"), "new").expect("write");
        replace_dir(&new, &dir).expect("replace");
        assert_eq!(
            std::fs::read_to_string(dir.join("train_state.json")).expect("read"),
            "new"
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("run-state")]);
        // And into a missing destination.
        let other = tmp.path().join("second-state");
        std::fs::create_dir(&new).expect("mkdir");
        replace_dir(&new, &other).expect("rename");
        assert!(other.is_dir() && !new.exists());
    }
}
