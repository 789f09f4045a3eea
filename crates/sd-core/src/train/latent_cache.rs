//! `--cache_latents_to_disk` files: numpy `.npz` beside each image, in sd-scripts' layout so
//! caches are interchangeable (spec training.md §5.3).
//!
//! File name `<image without extension>_<W:04>x<H:04>_sd.npz` (W×H = the original image size).
//! Arrays: `latents` f32 `[4, h, w]` (unscaled), `original_size` `[w₀, h₀]`, `crop_ltrb`
//! `[l, t, r, b]`, `latents_flipped` with flip_aug.
//!
//! # Compatibility
//! A file whose latent shape does not match the current bucket is regenerated (the reference
//! reuses it and trains on wrong-shaped latents, spec §5.3 "Oddity").

use std::fs::File;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array3};
use ndarray_npy::{NpzReader, NpzWriter};
use sd_data::bucket::{BucketAssignment, CropLtrb};
use sd_data::resize::Resolution;
use tch::{Kind, Tensor};

use super::trainer::TrainError;

/// The cache file of an image of `size` (W, H).
pub fn cache_path(image: &Path, size: Resolution) -> PathBuf {
    let stem = image.with_extension("");
    PathBuf::from(format!(
        "{}_{:04}x{:04}_sd.npz",
        stem.display(),
        size.width,
        size.height
    ))
}

/// What a valid cache file holds.
pub struct CacheEntry {
    latents: Tensor,
    flipped: Option<Tensor>,
    original_size: (u32, u32),
    crop_ltrb: CropLtrb,
}

impl CacheEntry {
    pub(super) fn into_cached(
        self,
        assignment: &BucketAssignment,
    ) -> super::trainer::CachedLatents {
        super::trainer::CachedLatents {
            normal: self.latents,
            flipped: self.flipped,
            original_size: self.original_size,
            crop_top_left: self.crop_ltrb.crop_top_left(assignment.bucket.width, false),
            crop_top_left_flipped: self.crop_ltrb.crop_top_left(assignment.bucket.width, true),
        }
    }
}

fn to_tensor(a: Array3<f32>) -> Tensor {
    let shape: Vec<i64> = a.shape().iter().map(|&d| d as i64).collect();
    let data: Vec<f32> = a.into_iter().collect();
    Tensor::from_slice(&data).view(shape.as_slice())
}

/// Reads `path` when it exists, holds `latents` of the bucket's latent shape (and
/// `latents_flipped` when `need_flipped`); `None` means "regenerate".
pub fn read(path: &Path, bucket: Resolution, need_flipped: bool) -> Option<CacheEntry> {
    let mut npz = NpzReader::new(File::open(path).ok()?).ok()?;
    let names = npz.names().ok()?;
    let has = |n: &str| names.iter().any(|x| x == n || x == &format!("{n}.npy"));
    let latents: Array3<f32> = npz
        .by_name("latents")
        .or_else(|_| npz.by_name("latents.npy"))
        .ok()?;
    let expected = [4, (bucket.height / 8) as usize, (bucket.width / 8) as usize];
    if latents.shape() != expected {
        tracing::warn!(
            "{}: cached latents {:?} do not match the bucket {}x{}: regenerating",
            path.display(),
            latents.shape(),
            bucket.width,
            bucket.height
        );
        return None;
    }
    let flipped = if need_flipped {
        if !has("latents_flipped") {
            return None;
        }
        let f: Array3<f32> = npz
            .by_name("latents_flipped")
            .or_else(|_| npz.by_name("latents_flipped.npy"))
            .ok()?;
        Some(to_tensor(f))
    } else {
        None
    };
    let size: Array1<i64> = npz
        .by_name("original_size")
        .or_else(|_| npz.by_name("original_size.npy"))
        .ok()?;
    let ltrb: Array1<f64> = npz
        .by_name::<ndarray::OwnedRepr<f64>, ndarray::Ix1>("crop_ltrb")
        .or_else(|_| npz.by_name("crop_ltrb.npy"))
        .ok()?;
    if size.len() != 2 || ltrb.len() != 4 {
        return None;
    }
    Some(CacheEntry {
        latents: to_tensor(latents),
        flipped,
        original_size: (size[0] as u32, size[1] as u32),
        crop_ltrb: CropLtrb {
            left: ltrb[0],
            top: ltrb[1],
            right: ltrb[2],
            bottom: ltrb[3],
        },
    })
}

fn to_array(t: &Tensor) -> Result<Array3<f32>, TrainError> {
    let size = t.size();
    let shape = (size[0] as usize, size[1] as usize, size[2] as usize);
    let data = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1]))
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    Array3::from_shape_vec(shape, data).map_err(|e| TrainError::Invalid(e.to_string()))
}

/// Writes a cache file (temporary file, then rename).
///
/// # Errors
/// [`TrainError::Io`] naming the file.
pub fn write(
    path: &Path,
    latents: &Tensor,
    flipped: Option<&Tensor>,
    original_size: (u32, u32),
    crop: CropLtrb,
) -> Result<(), TrainError> {
    let io = |source: std::io::Error| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let npz_err =
        |e: ndarray_npy::WriteNpzError| TrainError::Invalid(format!("{}: {e}", path.display()));
    {
        let mut npz = NpzWriter::new(tmp.as_file());
        npz.add_array("latents", &to_array(latents)?)
            .map_err(npz_err)?;
        npz.add_array(
            "original_size",
            &Array1::from(vec![i64::from(original_size.0), i64::from(original_size.1)]),
        )
        .map_err(npz_err)?;
        npz.add_array(
            "crop_ltrb",
            &Array1::from(vec![crop.left, crop.top, crop.right, crop.bottom]),
        )
        .map_err(npz_err)?;
        if let Some(f) = flipped {
            npz.add_array("latents_flipped", &to_array(f)?)
                .map_err(npz_err)?;
        }
        npz.finish().map_err(npz_err)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}
