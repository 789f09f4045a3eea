//! Training-image preparation (spec training.md §3.4–§3.5): decode to 8-bit RGB, resize
//! into the bucket, crop (centre or random), colour augmentation, horizontal flip, and the
//! float CHW layout the VAE expects.
//!
//! Decoding rules:
//! * grayscale, grayscale+alpha, 16-bit and float images are converted to 8-bit RGB by the
//!   `image` crate (16-bit values are rounded, `v·255/65535`);
//! * images with an alpha channel are composited over [`ALPHA_BACKGROUND`] (white):
//!   `c' = round((c·a + 255·(255 − a)) / 255)`, so colours hidden under alpha 0 never leak
//!   into training. With `alpha_mask` the alpha channel is also returned as the loss mask.
//!
//! # Compatibility
//! The reference converts RGBA to RGB with PIL's `convert("RGB")`, which drops alpha and keeps
//! whatever RGB lies under transparent pixels (often black or garbage); compositing over white
//! is a deliberate fix. Resampling uses `fast_image_resize` (see [`ResizeInterpolation`]), so
//! pixels differ slightly from OpenCV/PIL.
//!
//! # Source
//! sd-scripts `library/train_util.py`: `load_image`, `trim_and_resize_if_required`,
//! `resize_image`, `ImageAugmentor.color_aug`, `BaseDataset.__getitem__`.

use std::path::Path;

use fast_image_resize as fir;
use rayon::prelude::*;

use crate::bucket::{BucketAssignment, CropLtrb, Resolution};
use crate::dataset_error::{DatasetError, DatasetResult, io_err};
use crate::dataset_rng::DataRng;

/// Background that transparent pixels are composited onto: white, 8-bit RGB.
pub const ALPHA_BACKGROUND: [u8; 3] = [255, 255, 255];

/// Augmentations of one subset (spec §3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct AugmentOptions {
    /// `color_aug`: with p = 0.33 a hue shift or the reference's "gamma" (spec §15 #3).
    pub color_aug: bool,
    /// `flip_aug`: horizontal flip with p = 0.5.
    pub flip_aug: bool,
    /// `random_crop`: uniform crop offsets instead of the centre.
    pub random_crop: bool,
}

/// `resize_interpolation` (spec §3.4). `None` in the config means automatic: [`Self::Area`]
/// when shrinking both sides, else [`Self::Lanczos`].
///
/// | name | reference | here (`fast_image_resize`) |
/// |---|---|---|
/// | `lanczos` | PIL `LANCZOS` (a = 3, anti-aliased) | `Convolution(Lanczos3)` |
/// | `nearest` | OpenCV `INTER_NEAREST_EXACT` | `Nearest` |
/// | `bilinear`, `linear` | OpenCV `INTER_LINEAR` | `Interpolation(Bilinear)` |
/// | `bicubic`, `cubic` | OpenCV `INTER_CUBIC` (a = −0.75) | `Interpolation` with an a = −0.75 cubic |
/// | `area` | OpenCV `INTER_AREA` | `Convolution(Box)` |
/// | `box` (TOML only) | PIL `BOX` | `Convolution(Box)` |
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ResizeInterpolation {
    /// PIL Lanczos.
    Lanczos,
    /// Nearest neighbour.
    Nearest,
    /// Bilinear.
    Bilinear,
    /// Bicubic.
    Bicubic,
    /// Pixel-area average.
    Area,
    /// Box filter.
    Box,
}

impl ResizeInterpolation {
    /// Parses a name; `box` only when `allow_box` (the TOML key accepts it, the CLI option not).
    ///
    /// # Errors
    /// A message listing the accepted names.
    pub fn parse(name: &str, allow_box: bool) -> Result<Self, String> {
        Ok(match name {
            "lanczos" => Self::Lanczos,
            "nearest" => Self::Nearest,
            "bilinear" | "linear" => Self::Bilinear,
            "bicubic" | "cubic" => Self::Bicubic,
            "area" => Self::Area,
            "box" if allow_box => Self::Box,
            other => {
                return Err(format!(
                    "unknown interpolation \"{other}\": expected one of lanczos, nearest, bilinear, linear, bicubic, cubic, area{}",
                    if allow_box { ", box" } else { "" }
                ));
            }
        })
    }

    fn algorithm(self) -> fir::ResizeAlg {
        use fir::{FilterType, ResizeAlg};
        match self {
            Self::Lanczos => ResizeAlg::Convolution(FilterType::Lanczos3),
            Self::Nearest => ResizeAlg::Nearest,
            Self::Bilinear => ResizeAlg::Interpolation(FilterType::Bilinear),
            Self::Bicubic => ResizeAlg::Interpolation(FilterType::Custom(
                fir::Filter::new("cubic a=-0.75", keys_cubic, 2.0)
                    .expect("support 2 is finite and positive"),
            )),
            Self::Area | Self::Box => ResizeAlg::Convolution(FilterType::Box),
        }
    }
}

/// Keys' cubic convolution kernel with a = −0.75 (the coefficients of OpenCV `INTER_CUBIC`).
fn keys_cubic(x: f64) -> f64 {
    const A: f64 = -0.75;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// An 8-bit RGB image, interleaved rows, top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Size in pixels.
    pub size: Resolution,
    /// `width · height · 3` bytes.
    pub data: Vec<u8>,
}

/// A decoded image: RGB (alpha composited) and, when asked for, its alpha channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedImage {
    /// The composited RGB pixels.
    pub rgb: RgbImage,
    /// `width · height` alpha bytes when `keep_alpha` was asked and the image has alpha.
    pub alpha: Option<Vec<u8>>,
}

/// Decodes an image file to 8-bit RGB (see the module docs for the conversion rules).
///
/// # Errors
/// [`DatasetError::Io`] when the file cannot be opened, [`DatasetError::Decode`] when it is
/// not a decodable image.
pub fn decode_image(path: &Path, keep_alpha: bool) -> DatasetResult<DecodedImage> {
    let img = image::ImageReader::open(path)
        .map_err(io_err("reading", path))?
        .with_guessed_format()
        .map_err(io_err("reading", path))?
        .decode()
        .map_err(|source| DatasetError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(from_dynamic(img, keep_alpha))
}

/// Converts a decoded `image` value (any colour type) like [`decode_image`].
pub fn from_dynamic(img: image::DynamicImage, keep_alpha: bool) -> DecodedImage {
    let size = Resolution::new(img.width(), img.height());
    if !img.color().has_alpha() {
        return DecodedImage {
            rgb: RgbImage {
                size,
                data: img.to_rgb8().into_raw(),
            },
            alpha: None,
        };
    }
    let rgba = img.to_rgba8().into_raw();
    let mut data = Vec::with_capacity(rgba.len() / 4 * 3);
    let mut alpha = Vec::with_capacity(if keep_alpha { rgba.len() / 4 } else { 0 });
    for px in rgba.chunks_exact(4) {
        let a = u32::from(px[3]);
        for c in 0..3 {
            let v = (u32::from(px[c]) * a + u32::from(ALPHA_BACKGROUND[c]) * (255 - a) + 127) / 255;
            data.push(v as u8);
        }
        if keep_alpha {
            alpha.push(px[3]);
        }
    }
    DecodedImage {
        rgb: RgbImage { size, data },
        alpha: keep_alpha.then_some(alpha),
    }
}

fn resample(
    src: &[u8],
    from: Resolution,
    to: Resolution,
    channels: usize,
    alg: fir::ResizeAlg,
    path: &Path,
) -> DatasetResult<Vec<u8>> {
    let pixel = if channels == 1 {
        fir::PixelType::U8
    } else {
        fir::PixelType::U8x3
    };
    let err = |e: String| DatasetError::Resize {
        path: path.to_path_buf(),
        message: e,
    };
    let view = fir::images::ImageRef::new(from.width, from.height, src, pixel)
        .map_err(|e| err(e.to_string()))?;
    let mut dst = fir::images::Image::new(to.width, to.height, pixel);
    fir::Resizer::new()
        .resize(&view, &mut dst, &fir::ResizeOptions::new().resize_alg(alg))
        .map_err(|e| err(e.to_string()))?;
    Ok(dst.into_vec())
}

fn crop(src: &[u8], width: u32, channels: usize, left: u32, top: u32, size: Resolution) -> Vec<u8> {
    let row = width as usize * channels;
    let (x0, w) = (left as usize * channels, size.width as usize * channels);
    (top as usize..top as usize + size.height as usize)
        .flat_map(|y| &src[y * row + x0..y * row + x0 + w])
        .copied()
        .collect()
}

fn flip_rows(data: &mut [u8], width: u32, channels: usize) {
    let row = width as usize * channels;
    if row == 0 {
        return;
    }
    for line in data.chunks_exact_mut(row) {
        let n = width as usize;
        for x in 0..n / 2 {
            for c in 0..channels {
                line.swap(x * channels + c, (n - 1 - x) * channels + c);
            }
        }
    }
}

/// Options for [`prepare_image`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrepOptions {
    /// Augmentations.
    pub augment: AugmentOptions,
    /// Interpolation; `None` = automatic (area when shrinking both sides, else Lanczos).
    pub interpolation: Option<ResizeInterpolation>,
    /// Return the alpha channel as the loss mask (`alpha_mask`).
    pub alpha_mask: bool,
}

/// One image ready for the VAE.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PreparedImage {
    /// `3 · H · W` f32 values, channel-major (CHW, RGB), `(v/255 − 0.5)/0.5` in [−1, 1]
    /// (computed in f32 as torchvision's `ToTensor` + `Normalize([0.5], [0.5])`).
    #[serde(skip)]
    pub data: Vec<f32>,
    /// `[3, H, W]` = `[3, bucket.height, bucket.width]`.
    pub shape: [usize; 3],
    /// Size of the file before any resize (W, H).
    pub original_size: Resolution,
    /// The bucket (= the output size, W, H).
    pub bucket: Resolution,
    /// Size after resizing, before cropping (W, H).
    pub resized: Resolution,
    /// (left, top) of the crop window in the resized image, pixels.
    pub crop_offset: (u32, u32),
    /// The reference's SDXL crop box (letterbox convention, spec §15 #2).
    pub crop_ltrb: CropLtrb,
    /// SDXL `crop_top_left` = (top, left), adjusted for the flip.
    pub crop_top_left: (u32, u32),
    /// Whether the image was flipped horizontally.
    pub flipped: bool,
    /// `H · W` mask in [0, 1] (alpha/255) when `alpha_mask` is on; ones for opaque images.
    #[serde(skip)]
    pub alpha_mask: Option<Vec<f32>>,
}

/// Loads `path` and prepares it for `assignment`, drawing from `rng` in this order: crop
/// offsets (x then y, with `random_crop`), colour augmentation, flip.
///
/// # Errors
/// Decode/I/O errors, and those of [`prepare_decoded`]. The decoded size is not compared
/// with the size recorded at scan time: the image is resized from whatever size it has.
pub fn prepare_image(
    path: &Path,
    assignment: &BucketAssignment,
    opts: &PrepOptions,
    rng: &mut DataRng,
) -> DatasetResult<PreparedImage> {
    let decoded = decode_image(path, opts.alpha_mask)?;
    prepare_decoded(decoded, path, assignment, opts, rng)
}

/// [`prepare_image`] on an already decoded image; `path` is only used in messages.
///
/// # Errors
/// [`DatasetError::InvalidImage`] when `assignment.resized` does not cover the bucket;
/// [`DatasetError::Resize`] from the resampler.
pub fn prepare_decoded(
    decoded: DecodedImage,
    path: &Path,
    assignment: &BucketAssignment,
    opts: &PrepOptions,
    rng: &mut DataRng,
) -> DatasetResult<PreparedImage> {
    let original = decoded.rgb.size;
    let (bucket, resized) = (assignment.bucket, assignment.resized);
    if resized.width < bucket.width
        || resized.height < bucket.height
        || bucket.width == 0
        || bucket.height == 0
    {
        return Err(DatasetError::InvalidImage {
            path: path.to_path_buf(),
            reason: format!("resized size {resized} does not cover bucket {bucket}"),
        });
    }
    // 2. resize
    let (mut rgb, mut alpha) = (decoded.rgb.data, decoded.alpha);
    if resized != original {
        let interpolation = opts.interpolation.unwrap_or(
            if original.width >= resized.width && original.height >= resized.height {
                ResizeInterpolation::Area
            } else {
                ResizeInterpolation::Lanczos
            },
        );
        let alg = interpolation.algorithm();
        rgb = resample(&rgb, original, resized, 3, alg, path)?;
        if let Some(a) = &alpha {
            alpha = Some(resample(a, original, resized, 1, alg, path)?);
        }
    }
    // 3. crop
    let trim_x = resized.width - bucket.width;
    let trim_y = resized.height - bucket.height;
    let (left, top) = if opts.augment.random_crop {
        let l = rng.inclusive(trim_x);
        (l, rng.inclusive(trim_y))
    } else {
        (trim_x / 2, trim_y / 2)
    };
    if trim_x > 0 || trim_y > 0 {
        rgb = crop(&rgb, resized.width, 3, left, top, bucket);
        alpha = alpha.map(|a| crop(&a, resized.width, 1, left, top, bucket));
    }
    // 5. crop box for SDXL (from sizes only)
    let crop_ltrb = CropLtrb::new(bucket, original);
    // colour augmentation, then flip
    if opts.augment.color_aug {
        color_augment(&mut rgb, rng);
    }
    let flipped = opts.augment.flip_aug && rng.uniform() < 0.5;
    if flipped {
        flip_rows(&mut rgb, bucket.width, 3);
        if let Some(a) = alpha.as_mut() {
            flip_rows(a, bucket.width, 1);
        }
    }
    let alpha_mask = opts.alpha_mask.then(|| match &alpha {
        Some(a) => a.iter().map(|&v| f32::from(v) / 255.0).collect(),
        None => vec![1.0; bucket.pixels() as usize],
    });
    Ok(PreparedImage {
        data: to_chw(&rgb, bucket),
        shape: [3, bucket.height as usize, bucket.width as usize],
        original_size: original,
        bucket,
        resized,
        crop_offset: (left, top),
        crop_ltrb,
        crop_top_left: crop_ltrb.crop_top_left(bucket.width, flipped),
        flipped,
        alpha_mask,
    })
}

/// Interleaved RGB8 → planar CHW f32 in [−1, 1]: `(v/255 − 0.5)/0.5` in f32.
pub fn to_chw(rgb: &[u8], size: Resolution) -> Vec<f32> {
    let n = size.pixels() as usize;
    let mut out = vec![0f32; 3 * n];
    for (i, px) in rgb.chunks_exact(3).take(n).enumerate() {
        for c in 0..3 {
            out[c * n + i] = (f32::from(px[c]) / 255.0 - 0.5) / 0.5;
        }
    }
    out
}

/// The reference's colour augmentation (spec §3.5): with p = 0.33 (draw `u ≤ 0.33`), then
/// 50/50 (draw `> 0.5`: hue), either a hue shift by U(−8, 8) OpenCV hue units (2° each) or
/// `v ← trunc(clip(v^g, 0, 255))` with g ~ U(0.95, 1.05) on unnormalised values (oddity
/// §15 #3, kept for compatibility).
///
/// # Compatibility
/// The HSV round trip is computed in floating point, not with OpenCV's fixed-point tables,
/// and in true RGB order (the reference feeds RGB to a BGR conversion, mirroring the hue axis;
/// with a symmetric shift distribution the effect is the same in distribution).
pub fn color_augment(rgb: &mut [u8], rng: &mut DataRng) {
    if rng.uniform() > 0.33 {
        return;
    }
    if rng.uniform() > 0.5 {
        let mut shift = rng.uniform_range(-8.0, 8.0);
        if shift < 0.0 {
            shift += 180.0;
        }
        for px in rgb.chunks_exact_mut(3) {
            let (h, s, v) = rgb_to_hsv8(px[0], px[1], px[2]);
            let h = ((f64::from(h) + shift) % 180.0) as u8;
            let (r, g, b) = hsv8_to_rgb(h, s, v);
            px.copy_from_slice(&[r, g, b]);
        }
    } else {
        let gamma = rng.uniform_range(0.95, 1.05);
        for v in rgb.iter_mut() {
            *v = f64::from(*v).powf(gamma).clamp(0.0, 255.0) as u8;
        }
    }
}

/// 8-bit HSV as OpenCV stores it: H in [0, 180) (degrees / 2), S and V in [0, 255].
fn rgb_to_hsv8(r: u8, g: u8, b: u8) -> (u8, u8, u8) {
    let (rf, gf, bf) = (f64::from(r), f64::from(g), f64::from(b));
    let max = rf.max(gf).max(bf);
    let min = rf.min(gf).min(bf);
    let diff = max - min;
    let s = if max > 0.0 {
        (255.0 * diff / max).round()
    } else {
        0.0
    };
    let mut h = if diff == 0.0 {
        0.0
    } else if max == rf {
        60.0 * (gf - bf) / diff
    } else if max == gf {
        120.0 + 60.0 * (bf - rf) / diff
    } else {
        240.0 + 60.0 * (rf - gf) / diff
    };
    if h < 0.0 {
        h += 360.0;
    }
    let h = (h / 2.0).round() % 180.0;
    (h as u8, s as u8, max as u8)
}

fn hsv8_to_rgb(h: u8, s: u8, v: u8) -> (u8, u8, u8) {
    let h = f64::from(h) * 2.0 / 60.0;
    let s = f64::from(s) / 255.0;
    let v = f64::from(v) / 255.0;
    let sector = h.floor();
    let f = h - sector;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match (sector as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    let to8 = |x: f64| (x * 255.0).round().clamp(0.0, 255.0) as u8;
    (to8(r), to8(g), to8(b))
}

/// One image to load on a worker thread.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRequest {
    /// The image file.
    pub path: std::path::PathBuf,
    /// Its bucket and resized size.
    pub assignment: BucketAssignment,
    /// Preparation options of its subset.
    pub options: PrepOptions,
    /// Seed of the sample's private [`DataRng`] (stream 0), from the epoch plan.
    pub seed: u64,
}

/// Prepares many images in parallel on the current rayon pool. Each request uses its own
/// RNG seeded from [`LoadRequest::seed`], so results do not depend on thread scheduling.
/// Results are in request order.
pub fn load_parallel(requests: &[LoadRequest]) -> Vec<DatasetResult<PreparedImage>> {
    requests
        .par_iter()
        .map(|r| {
            prepare_image(
                &r.path,
                &r.assignment,
                &r.options,
                &mut DataRng::new(r.seed, 0),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trip_is_close() {
        for &(r, g, b) in &[
            (255u8, 0u8, 0u8),
            (10, 200, 30),
            (128, 128, 128),
            (0, 0, 0),
            (12, 34, 250),
        ] {
            let (h, s, v) = rgb_to_hsv8(r, g, b);
            let (r2, g2, b2) = hsv8_to_rgb(h, s, v);
            for (a, b) in [(r, r2), (g, g2), (b, b2)] {
                assert!(
                    (i32::from(a) - i32::from(b)).abs() <= 4,
                    "{r},{g},{b} -> {r2},{g2},{b2}"
                );
            }
        }
    }

    #[test]
    fn chw_normalisation() {
        let v = to_chw(&[0, 128, 255, 255, 0, 0], Resolution::new(2, 1));
        assert_eq!(
            v,
            vec![-1.0, 1.0, (128.0f32 / 255.0 - 0.5) / 0.5, -1.0, 1.0, -1.0]
        );
    }

    #[test]
    fn flips_rows() {
        let mut d = vec![1, 2, 3, 4, 5, 6];
        flip_rows(&mut d, 3, 1);
        assert_eq!(d, vec![3, 2, 1, 6, 5, 4]);
    }
}
