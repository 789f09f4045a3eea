//! Dataset image resizing: the work behind the `resize-images` tool (sd-scripts
//! `tools/resize_images_to_resolution.py`, spec: shared/spec/tools.md §8).
//!
//! For every image of a source folder (not recursive) and every target area `WxH`:
//! 1. if the image has more pixels than `W·H`, scale it by `f = √(W·H / (w·h))` to
//!    `⌊w·f⌋ × ⌊h·f⌋`, keeping its aspect ratio (images are never enlarged);
//! 2. centre-crop both sides down to multiples of `divisible_by`;
//! 3. write `<stem>+<target text>.png` (or `.jpg`, quality 100).
//!
//! The source file itself is copied unchanged, and so is every non-image file (captions);
//! with `copy_associated_files` the files sharing an image's stem are also copied as
//! `<stem>+<target text>.<ext>`.
//!
//! # Compatibility
//! Fixes over the reference (shared/spec/tools.md §8.3): width and height are not swapped;
//! every target starts from the original image, not from the previous target's output;
//! image extensions match case-insensitively (`IMG_0001.JPG` is an image); two images with
//! one stem (`a.png`, `a.jpg`) get their file name as output stem (`a.png+512x512.png`)
//! instead of overwriting each other; a target that would crop an image to zero pixels is
//! reported for that image instead of crashing; unreadable images are reported and the
//! rest is still processed; associated files are those whose stem equals the image's stem
//! exactly (no glob). PNG output keeps transparency (alpha is dropped for JPEG, as the
//! reference does). EXIF orientation is not applied, as in the reference.
//!
//! Resampling uses `fast_image_resize` (see [`Interpolation`] for the filter chosen per
//! OpenCV method); decoding and encoding use `image`.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Permissions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use fast_image_resize as fir;
use image::{DynamicImage, ExtendedColorType, ImageEncoder};
use rayon::prelude::*;

use crate::{Error, Result};

/// File extensions treated as images, compared ASCII case-insensitively (the reference's
/// list, which it compared case-sensitively).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// sd-scripts' default `--max_resolution`.
pub const DEFAULT_MAX_RESOLUTION: &str = "512x512,384x384,256x256,128x128";

/// Whether `path` has an image extension ([`IMAGE_EXTENSIONS`], any letter case).
pub fn is_image_file(path: &Path) -> bool {
    path.extension().and_then(OsStr::to_str).is_some_and(|ext| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| known.eq_ignore_ascii_case(ext))
    })
}

/// A width and height in pixels, width first (as sd-scripts writes them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Resolution {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Resolution {
    /// Builds a resolution from width and height in pixels.
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height }
    }

    /// Number of pixels, `width · height`.
    pub fn pixels(self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

impl std::fmt::Display for Resolution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// One `--max_resolution` entry: an area budget `width · height` plus the text it was
/// written as, which becomes the output suffix (`cat+512x512.png`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The area as a resolution; only `width · height` matters for scaling.
    pub resolution: Resolution,
    /// The entry as given (trimmed), used verbatim in output names.
    pub label: String,
}

impl Target {
    /// Parses one `WxH` entry (surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`Error::InvalidResolution`] unless the text is two positive integers joined by `x`.
    pub fn parse(text: &str) -> Result<Self> {
        let label = text.trim();
        let invalid = |reason: &str| Error::InvalidResolution {
            text: label.to_owned(),
            reason: reason.to_owned(),
        };
        let (w, h) = label
            .split_once('x')
            .ok_or_else(|| invalid("expected WIDTHxHEIGHT, e.g. 512x512"))?;
        let parse = |s: &str| s.trim().parse::<u32>().ok().filter(|&v| v > 0);
        let (Some(width), Some(height)) = (parse(w), parse(h)) else {
            return Err(invalid("expected two positive integers, e.g. 512x512"));
        };
        Ok(Self {
            resolution: Resolution::new(width, height),
            label: label.to_owned(),
        })
    }
}

/// Parses a comma-separated `--max_resolution` list such as `512x512,384x384`.
///
/// # Errors
/// [`Error::InvalidResolution`] for the first bad entry (an empty entry included).
pub fn parse_targets(list: &str) -> Result<Vec<Target>> {
    list.split(',').map(Target::parse).collect()
}

/// Resampling filter, named after the OpenCV flag the reference used.
///
/// Mapping to `fast_image_resize` (chosen to be closest to OpenCV for downscaling, the only
/// direction this tool resizes):
///
/// | option | OpenCV / Pillow in the reference | here |
/// |---|---|---|
/// | `area` (default) | `INTER_AREA` (pixel-area average) | `Convolution` with a custom kernel giving each source pixel the fraction of it covered by the output pixel (the exact `INTER_AREA` weights), one axis per pass; fast_image_resize's own `Box` would count edge pixels fully or not at all (mean error ≈ 3/255 at scale 1.25) |
/// | `cubic` | `INTER_CUBIC` (4×4 taps, a = −0.75, no anti-aliasing) | `Interpolation` with a custom a = −0.75 cubic of support 2 (fixed taps, as OpenCV) |
/// | `lanczos4` | meant `INTER_LANCZOS4` (8×8 taps); the reference actually used Pillow's bicubic (bug) | `Interpolation` with a custom Lanczos a = 4 kernel (fixed taps, as OpenCV) |
/// | `linear` | `INTER_LINEAR` (2×2 taps) | `Interpolation(Bilinear)` |
/// | `nearest` | `INTER_NEAREST_EXACT` | `Nearest` |
/// | `box` | Pillow `BOX` | `Convolution(Box)` (the same formula as Pillow) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interpolation {
    /// Area average (OpenCV `INTER_AREA`); the default.
    #[default]
    Area,
    /// Bicubic interpolation (OpenCV `INTER_CUBIC`).
    Cubic,
    /// Lanczos interpolation over 8×8 pixels (OpenCV `INTER_LANCZOS4`).
    Lanczos4,
    /// Bilinear interpolation (OpenCV `INTER_LINEAR`).
    Linear,
    /// Nearest neighbour (OpenCV `INTER_NEAREST_EXACT`).
    Nearest,
    /// Box filter (Pillow `BOX`).
    Box,
}

impl Interpolation {
    /// Every accepted name, in help order.
    pub const NAMES: &'static [&'static str] =
        &["area", "cubic", "lanczos4", "linear", "nearest", "box"];

    /// The option name (`area`, `cubic`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Area => "area",
            Self::Cubic => "cubic",
            Self::Lanczos4 => "lanczos4",
            Self::Linear => "linear",
            Self::Nearest => "nearest",
            Self::Box => "box",
        }
    }

    fn algorithm(self) -> fir::ResizeAlg {
        use fir::{FilterType, ResizeAlg};
        match self {
            Self::Area => ResizeAlg::Convolution(FilterType::Custom(
                fir::Filter::new("OpenCV area", area_weight, 1.0)
                    .expect("support 1 is finite and positive"),
            )),
            Self::Box => ResizeAlg::Convolution(FilterType::Box),
            Self::Cubic => ResizeAlg::Interpolation(FilterType::Custom(
                fir::Filter::new("OpenCV cubic", opencv_cubic, 2.0)
                    .expect("support 2 is finite and positive"),
            )),
            Self::Lanczos4 => ResizeAlg::Interpolation(FilterType::Custom(
                fir::Filter::new("Lanczos4", lanczos4, 4.0)
                    .expect("support 4 is finite and positive"),
            )),
            Self::Linear => ResizeAlg::Interpolation(FilterType::Bilinear),
            Self::Nearest => ResizeAlg::Nearest,
        }
    }
}

impl FromStr for Interpolation {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "area" => Ok(Self::Area),
            "cubic" => Ok(Self::Cubic),
            "lanczos4" | "lanczos" => Ok(Self::Lanczos4),
            "linear" => Ok(Self::Linear),
            "nearest" => Ok(Self::Nearest),
            "box" => Ok(Self::Box),
            other => Err(format!(
                "unknown interpolation \"{other}\": expected one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

thread_local! {
    /// Scale (source pixels per output pixel, at least 1) of the axis being resampled with
    /// [`area_weight`]; set by [`resample`] before each single-axis pass.
    static AREA_SCALE: Cell<f64> = const { Cell::new(1.0) };
}

/// Weight of a source pixel for OpenCV's `INTER_AREA`: the length of its overlap with the
/// output pixel's footprint. `u` is the distance between the two pixel centres in output
/// pixels (fast_image_resize divides by the scale `s`), so with `d = u·s` in source pixels
/// the weight is `|[d − ½, d + ½] ∩ [−s/2, s/2]|`, a trapezoid reaching at most `s/2 + ½`
/// ≤ `s` = support 1 × s. The scale comes from [`AREA_SCALE`] because the kernel is a plain
/// `fn`; each pass resamples one axis only so that one scale applies.
///
/// # Source
/// OpenCV `imgproc/src/resize.cpp`, `computeResizeAreaTab` (area coverage weights).
fn area_weight(u: f64) -> f64 {
    let s = AREA_SCALE.with(Cell::get);
    let d = u * s;
    ((d + 0.5).min(s / 2.0) - (d - 0.5).max(-s / 2.0)).max(0.0)
}

/// Keys' cubic convolution kernel with a = −0.75, the coefficients OpenCV's `INTER_CUBIC` uses
/// (OpenCV `imgproc/src/resize.cpp`, `interpolateCubic`).
fn opencv_cubic(x: f64) -> f64 {
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

/// Lanczos kernel with a = 4 (`sinc(x)·sinc(x/4)` for |x| < 4), as OpenCV's `INTER_LANCZOS4`.
fn lanczos4(x: f64) -> f64 {
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let px = std::f64::consts::PI * x;
            px.sin() / px
        }
    }
    if x.abs() < 4.0 {
        sinc(x) * sinc(x / 4.0)
    } else {
        0.0
    }
}

/// Output file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// JPEG at quality 100 (sd-scripts' default); alpha is dropped.
    #[default]
    Jpeg,
    /// PNG (`--save_as_png`); transparency is kept.
    Png,
}

impl OutputFormat {
    /// The extension written, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Self::Jpeg => "jpg",
            Self::Png => "png",
        }
    }
}

/// What to produce; built by the tool from its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeConfig {
    /// Area targets, in output order.
    pub targets: Vec<Target>,
    /// Final width and height are cropped down to multiples of this (0 is treated as 1).
    pub divisible_by: u32,
    /// Resampling filter.
    pub interpolation: Interpolation,
    /// Output format.
    pub format: OutputFormat,
    /// Also copy same-stem non-image files as `<stem>+<target>.<ext>`.
    pub copy_associated_files: bool,
}

/// Sizes for one image and one target: first scaled, then centre-cropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizePlan {
    /// Size after scaling (equal to the source when it already fits the area).
    pub scaled: Resolution,
    /// Final size after the centre crop to multiples of `divisible_by`.
    pub cropped: Resolution,
    /// Left edge of the crop in the scaled image, `⌊(scaled.width − cropped.width) / 2⌋`.
    pub left: u32,
    /// Top edge of the crop in the scaled image, `⌊(scaled.height − cropped.height) / 2⌋`.
    pub top: u32,
}

impl SizePlan {
    /// Whether the final image would have no pixels (a side of 0).
    pub fn is_empty(&self) -> bool {
        self.cropped.width == 0 || self.cropped.height == 0
    }
}

/// Computes the scaled and cropped size of a `source` image for `target`.
///
/// `f = √(target pixels / source pixels)` when the source has more pixels than the target,
/// else no scaling; scaled sides are `⌊side · f⌋` in f64 (as the reference's Python floats);
/// then each side is floored to a multiple of `divisible_by` (0 counts as 1). Example:
/// 3000×2000 with `1280x1280` and 32 → scaled 1567×1045, cropped 1536×1024.
///
/// # Source
/// sd-scripts `tools/resize_images_to_resolution.py`, `resize_images`, with the width/height
/// swap fixed (spec §8.3).
pub fn plan_size(source: Resolution, target: &Target, divisible_by: u32) -> SizePlan {
    let current = source.pixels();
    let max = target.resolution.pixels();
    let scaled = if current > max {
        let f = (max as f64 / current as f64).sqrt();
        // Truncation is the floor here: both factors are positive and below u32::MAX.
        Resolution::new(
            (f64::from(source.width) * f) as u32,
            (f64::from(source.height) * f) as u32,
        )
    } else {
        source
    };
    let d = divisible_by.max(1);
    let cropped = Resolution::new(scaled.width / d * d, scaled.height / d * d);
    SizePlan {
        scaled,
        cropped,
        left: (scaled.width - cropped.width) / 2,
        top: (scaled.height - cropped.height) / 2,
    }
}

/// One image to decode and the outputs to write from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageJob {
    /// The source image.
    pub source: PathBuf,
    /// One output per target (fewer when an output name was taken by another input).
    pub outputs: Vec<ImageOutput>,
}

/// One resized output of an [`ImageJob`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageOutput {
    /// The target it is made for.
    pub target: Target,
    /// Where it is written.
    pub path: PathBuf,
}

/// A file copied unchanged (the original image, a caption, an associated file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyJob {
    /// The source file.
    pub source: PathBuf,
    /// Where it is written.
    pub dest: PathBuf,
}

/// Everything one run will write, decided before any work so that name clashes are known
/// up front.
#[derive(Debug, Default)]
pub struct Plan {
    /// Images to resize, in file-name order.
    pub images: Vec<ImageJob>,
    /// Files to copy unchanged.
    pub copies: Vec<CopyJob>,
    /// Outputs not written because another input writes the same name
    /// ([`Error::OutputConflict`]).
    pub conflicts: Vec<Error>,
    /// Groups of images that share a stem and were given their file name as output stem.
    pub disambiguated: Vec<Vec<PathBuf>>,
    /// Entries of the source folder that are neither files nor links to files (skipped).
    pub skipped: Vec<PathBuf>,
}

impl Plan {
    /// Number of units of work [`execute`] reports progress for (images plus copies).
    pub fn work_items(&self) -> usize {
        self.images.len() + self.copies.len()
    }
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn name_with(stem: &OsStr, suffix: &str) -> OsString {
    let mut name = stem.to_os_string();
    name.push(suffix);
    name
}

/// Lists `src_dir` and decides every output in `dst_dir` (nothing is written).
///
/// Files are taken in file-name order. Unchanged copies (every source file, images
/// included) keep their names; resized images are `<stem>+<label>.<ext>`; with
/// `copy_associated_files`, each non-image file whose stem equals an image's stem is also
/// copied as `<stem>+<label>.<its ext>`. Images sharing a stem use their whole file name as
/// stem. Any output name still claimed twice is kept for the first claimant (unchanged copies
/// first) and listed in [`Plan::conflicts`] for the others.
///
/// # Errors
/// [`Error::Io`] when the source folder cannot be listed; [`Error::SameDirectory`] when
/// `dst_dir` is `src_dir` (after resolving links), since outputs could then replace inputs.
pub fn plan(src_dir: &Path, dst_dir: &Path, config: &ResizeConfig) -> Result<Plan> {
    if dst_dir.exists() {
        let src = fs::canonicalize(src_dir).map_err(io_err("resolving", src_dir))?;
        let dst = fs::canonicalize(dst_dir).map_err(io_err("resolving", dst_dir))?;
        if src == dst {
            return Err(Error::SameDirectory {
                src: src_dir.to_path_buf(),
                dst: dst_dir.to_path_buf(),
            });
        }
    }
    let mut files = Vec::new();
    let mut plan = Plan::default();
    for entry in fs::read_dir(src_dir).map_err(io_err("listing", src_dir))? {
        let entry = entry.map_err(io_err("listing", src_dir))?;
        let path = entry.path();
        // fs::metadata follows links, so a link to a file counts as that file.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => files.push(entry.file_name()),
            _ => plan.skipped.push(path),
        }
    }
    files.sort();
    plan.skipped.sort();

    let (images, others): (Vec<&OsString>, Vec<&OsString>) = files
        .iter()
        .partition(|name| is_image_file(Path::new(name)));
    let stem_of = |name: &OsStr| Path::new(name).file_stem().unwrap_or(name).to_os_string();

    let mut by_stem: HashMap<OsString, Vec<&OsString>> = HashMap::new();
    for name in &images {
        by_stem.entry(stem_of(name)).or_default().push(name);
    }
    let mut others_by_stem: HashMap<OsString, Vec<&OsString>> = HashMap::new();
    if config.copy_associated_files {
        for name in &others {
            others_by_stem.entry(stem_of(name)).or_default().push(name);
        }
    }

    // Claims on output names, in priority order: unchanged copies, then per image its
    // resized outputs and associated copies.
    let mut claimed: HashMap<OsString, PathBuf> = HashMap::new();
    let mut claim = |name: &OsStr, source: &Path, conflicts: &mut Vec<Error>| -> bool {
        if let Some(first) = claimed.get(name) {
            conflicts.push(Error::OutputConflict {
                output: dst_dir.join(name),
                first: first.clone(),
                second: source.to_path_buf(),
            });
            false
        } else {
            claimed.insert(name.to_os_string(), source.to_path_buf());
            true
        }
    };

    for name in &files {
        let source = src_dir.join(name);
        if claim(name, &source, &mut plan.conflicts) {
            plan.copies.push(CopyJob {
                source,
                dest: dst_dir.join(name),
            });
        }
    }

    let mut groups: Vec<Vec<PathBuf>> = Vec::new();
    for name in &images {
        let source = src_dir.join(name);
        let stem = stem_of(name);
        let shared = by_stem.get(&stem).is_some_and(|g| g.len() > 1);
        let out_stem = if shared {
            (*name).clone()
        } else {
            stem.clone()
        };
        if shared
            && by_stem
                .get(&stem)
                .and_then(|g| g.first())
                .is_some_and(|first| *first == *name)
        {
            groups.push(by_stem[&stem].iter().map(|n| src_dir.join(n)).collect());
        }
        let mut outputs = Vec::new();
        for target in &config.targets {
            let out_name = name_with(
                &out_stem,
                &format!("+{}.{}", target.label, config.format.extension()),
            );
            if claim(&out_name, &source, &mut plan.conflicts) {
                outputs.push(ImageOutput {
                    target: target.clone(),
                    path: dst_dir.join(out_name),
                });
            }
            for other in others_by_stem.get(&stem).into_iter().flatten() {
                let ext = Path::new(other)
                    .extension()
                    .map(|e| e.to_string_lossy().into_owned());
                let suffix = match ext {
                    Some(ext) => format!("+{}.{ext}", target.label),
                    None => format!("+{}", target.label),
                };
                let other_source = src_dir.join(other);
                let dest_name = name_with(&out_stem, &suffix);
                if claim(&dest_name, &other_source, &mut plan.conflicts) {
                    plan.copies.push(CopyJob {
                        source: other_source,
                        dest: dst_dir.join(dest_name),
                    });
                }
            }
        }
        plan.images.push(ImageJob { source, outputs });
    }
    plan.disambiguated = groups;
    Ok(plan)
}

/// What [`execute`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// Images decoded successfully.
    pub images: usize,
    /// Files written (resized images and copies).
    pub written: usize,
    /// Everything that failed, in plan order: planning conflicts, unreadable images, zero-size
    /// crops, write errors.
    pub failures: Vec<Error>,
}

/// Runs a [`Plan`] in parallel on the current rayon pool, creating `dst_dir` first; calls
/// `progress` once per finished image or copy. A failing file never stops the others.
///
/// # Errors
/// [`Error::Io`] only when `dst_dir` cannot be created; per-file errors go to
/// [`Report::failures`].
pub fn execute(
    plan: Plan,
    dst_dir: &Path,
    config: &ResizeConfig,
    progress: &(dyn Fn() + Sync),
) -> Result<Report> {
    fs::create_dir_all(dst_dir).map_err(io_err("creating", dst_dir))?;
    let image_results: Vec<(bool, usize, Vec<Error>)> = plan
        .images
        .par_iter()
        .map(|job| {
            let result = process_image(job, config);
            progress();
            result
        })
        .collect();
    let copy_results: Vec<Option<Error>> = plan
        .copies
        .par_iter()
        .map(|job| {
            let result = copy_file(&job.source, &job.dest).err();
            progress();
            result
        })
        .collect();
    let mut report = Report {
        failures: plan.conflicts,
        ..Report::default()
    };
    for (decoded, written, errors) in image_results {
        report.images += usize::from(decoded);
        report.written += written;
        report.failures.extend(errors);
    }
    for error in copy_results {
        match error {
            Some(e) => report.failures.push(e),
            None => report.written += 1,
        }
    }
    Ok(report)
}

/// Pixels in memory: 8-bit, interleaved, `channels` per pixel (3 = RGB, 4 = RGBA).
struct Pixels {
    size: Resolution,
    channels: usize,
    data: Vec<u8>,
}

/// Decodes `path` as RGB8, or RGBA8 when `keep_alpha` and some pixel is not fully opaque.
fn decode(path: &Path, keep_alpha: bool) -> Result<Pixels> {
    let decode_err = |source| Error::Decode {
        path: path.to_path_buf(),
        source,
    };
    let img: DynamicImage = image::ImageReader::open(path)
        .map_err(io_err("reading", path))?
        .with_guessed_format()
        .map_err(io_err("reading", path))?
        .decode()
        .map_err(decode_err)?;
    let size = Resolution::new(img.width(), img.height());
    if keep_alpha && img.color().has_alpha() {
        let rgba = img.to_rgba8().into_raw();
        if rgba.chunks_exact(4).any(|p| p[3] != u8::MAX) {
            return Ok(Pixels {
                size,
                channels: 4,
                data: rgba,
            });
        }
    }
    Ok(Pixels {
        size,
        channels: 3,
        data: img.to_rgb8().into_raw(),
    })
}

/// Scales `src` to `size` with `interpolation` (alpha is premultiplied during resampling).
fn resample(
    src: &Pixels,
    size: Resolution,
    interpolation: Interpolation,
    path: &Path,
) -> Result<Pixels> {
    let alg = interpolation.algorithm();
    if interpolation != Interpolation::Area {
        return resample_pass(src, size, alg, path);
    }
    // One axis per pass, so that `area_weight` sees that axis' scale.
    let mut horizontal = None;
    if size.width != src.size.width {
        AREA_SCALE.with(|s| s.set((f64::from(src.size.width) / f64::from(size.width)).max(1.0)));
        horizontal = Some(resample_pass(
            src,
            Resolution::new(size.width, src.size.height),
            alg,
            path,
        )?);
    }
    let wide = horizontal.as_ref().unwrap_or(src);
    if size.height == wide.size.height {
        return Ok(horizontal.unwrap_or_else(|| Pixels {
            size: src.size,
            channels: src.channels,
            data: src.data.clone(),
        }));
    }
    AREA_SCALE.with(|s| s.set((f64::from(wide.size.height) / f64::from(size.height)).max(1.0)));
    resample_pass(wide, size, alg, path)
}

/// One fast_image_resize call scaling `src` to `size` with `alg`.
fn resample_pass(
    src: &Pixels,
    size: Resolution,
    alg: fir::ResizeAlg,
    path: &Path,
) -> Result<Pixels> {
    let pixel_type = if src.channels == 4 {
        fir::PixelType::U8x4
    } else {
        fir::PixelType::U8x3
    };
    let resize_err = |message: String| Error::Resize {
        path: path.to_path_buf(),
        message,
    };
    let view = fir::images::ImageRef::new(src.size.width, src.size.height, &src.data, pixel_type)
        .map_err(|e| resize_err(e.to_string()))?;
    let mut dst = fir::images::Image::new(size.width, size.height, pixel_type);
    fir::Resizer::new()
        .resize(&view, &mut dst, &fir::ResizeOptions::new().resize_alg(alg))
        .map_err(|e| resize_err(e.to_string()))?;
    Ok(Pixels {
        size,
        channels: src.channels,
        data: dst.into_vec(),
    })
}

/// Copies the `plan.cropped` window at (`left`, `top`) out of `src`.
fn crop(src: &Pixels, plan: &SizePlan) -> Vec<u8> {
    let c = src.channels;
    let row = src.size.width as usize * c;
    let (x0, w) = (plan.left as usize * c, plan.cropped.width as usize * c);
    let top = plan.top as usize;
    (top..top + plan.cropped.height as usize)
        .flat_map(|y| &src.data[y * row + x0..y * row + x0 + w])
        .copied()
        .collect()
}

/// Decodes one image and writes its outputs. Returns (decoded, files written, failures).
fn process_image(job: &ImageJob, config: &ResizeConfig) -> (bool, usize, Vec<Error>) {
    let _span = tracing::debug_span!("resize", file = %job.source.display()).entered();
    let src = match decode(&job.source, config.format == OutputFormat::Png) {
        Ok(p) => p,
        Err(e) => return (false, 0, vec![e]),
    };
    let permissions = fs::metadata(&job.source).ok().map(|m| m.permissions());
    let mut written = 0;
    let mut errors = Vec::new();
    for output in &job.outputs {
        let size = plan_size(src.size, &output.target, config.divisible_by);
        if size.is_empty() {
            errors.push(Error::ZeroSize {
                path: job.source.clone(),
                target: output.target.label.clone(),
                width: size.cropped.width,
                height: size.cropped.height,
                divisible_by: config.divisible_by.max(1),
            });
            continue;
        }
        let result = (|| {
            let scaled;
            let base = if size.scaled == src.size {
                &src
            } else {
                scaled = resample(&src, size.scaled, config.interpolation, &job.source)?;
                &scaled
            };
            let pixels = if size.cropped == base.size {
                base.data.clone()
            } else {
                crop(base, &size)
            };
            let color = if src.channels == 4 {
                ExtendedColorType::Rgba8
            } else {
                ExtendedColorType::Rgb8
            };
            write_atomically(&output.path, permissions.clone(), |w| {
                let (width, height) = (size.cropped.width, size.cropped.height);
                match config.format {
                    OutputFormat::Png => image::codecs::png::PngEncoder::new(w)
                        .write_image(&pixels, width, height, color)
                        .map_err(|source| Error::Encode {
                            path: output.path.clone(),
                            source,
                        }),
                    OutputFormat::Jpeg => {
                        encode_jpeg(w, &pixels, size.cropped, src.channels, &output.path)
                    }
                }
            })
        })();
        match result {
            Ok(()) => {
                written += 1;
                tracing::debug!(
                    "resized {} {} -> {} {} (scaled {})",
                    job.source.display(),
                    src.size,
                    output.path.display(),
                    size.cropped,
                    size.scaled
                );
            }
            Err(e) => errors.push(e),
        }
    }
    (true, written, errors)
}

/// Writes 8-bit RGB (or RGBA, alpha dropped) pixels as a quality-100 JPEG with
/// `jpeg-encoder` (AVX2 when available; at quality ≥ 90 it keeps full-resolution chroma,
/// 4:4:4, where Pillow would subsample 4:2:0).
fn encode_jpeg(
    w: &mut impl Write,
    pixels: &[u8],
    size: Resolution,
    channels: usize,
    path: &Path,
) -> Result<()> {
    let err = |reason: String| Error::EncodeJpeg {
        path: path.to_path_buf(),
        reason,
    };
    let side = |v: u32| {
        u16::try_from(v).map_err(|_| {
            err(format!(
                "expected sides of at most 65535 pixels, found {size}"
            ))
        })
    };
    let (width, height) = (side(size.width)?, side(size.height)?);
    let color = if channels == 4 {
        jpeg_encoder::ColorType::Rgba
    } else {
        jpeg_encoder::ColorType::Rgb
    };
    jpeg_encoder::Encoder::new(w, 100)
        .encode(pixels, width, height, color)
        .map_err(|e| err(e.to_string()))
}

/// Copies `source` to `dest` through a temporary file in `dest`'s folder.
fn copy_file(source: &Path, dest: &Path) -> Result<()> {
    let mut input = File::open(source).map_err(io_err("reading", source))?;
    let permissions = input.metadata().ok().map(|m| m.permissions());
    write_atomically(dest, permissions, |w| {
        std::io::copy(&mut input, w).map_err(io_err("copying", source))?;
        Ok(())
    })?;
    tracing::debug!("copied {} -> {}", source.display(), dest.display());
    Ok(())
}

/// Writes `dest` by filling a temporary file next to it and renaming it over `dest`, so a
/// reader never sees a half-written file and a link at `dest` is replaced, not followed.
fn write_atomically(
    dest: &Path,
    permissions: Option<Permissions>,
    fill: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
) -> Result<()> {
    let dir = dest
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".resize-images-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(io_err("creating a temporary file in", dir))?;
    {
        let mut writer = BufWriter::new(tmp.as_file_mut());
        fill(&mut writer)?;
        writer.flush().map_err(io_err("writing", dest))?;
    }
    if let Some(p) = permissions {
        tmp.as_file()
            .set_permissions(p)
            .map_err(io_err("setting permissions of", dest))?;
    }
    tmp.persist(dest).map_err(|e| Error::Io {
        action: "renaming into",
        path: dest.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        Target::parse(s).expect("valid target")
    }

    #[test]
    fn parses_targets() {
        let t = parse_targets(" 512x512, 384x256 ").expect("valid list");
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].resolution, Resolution::new(512, 512));
        assert_eq!(t[0].label, "512x512");
        assert_eq!(t[1].resolution, Resolution::new(384, 256));
        assert_eq!(t[1].label, "384x256");
        for bad in ["512", "0x512", "512x", "axb", "512x512,", "-1x4"] {
            let err = parse_targets(bad).expect_err(bad).to_string();
            assert!(err.starts_with("invalid resolution"), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_keep_width_and_height_apart() {
        // The example: the reference swapped width and height here.
        let p = plan_size(Resolution::new(3000, 2000), &target("1280x1280"), 32);
        assert_eq!(p.scaled, Resolution::new(1567, 1045));
        assert_eq!(p.cropped, Resolution::new(1536, 1024));
        assert_eq!((p.left, p.top), (15, 10));
        let p = plan_size(Resolution::new(2000, 3000), &target("1280x1280"), 32);
        assert_eq!(p.cropped, Resolution::new(1024, 1536));
        // spec §8.3: 200x100 at 64x64, divisible by 8 -> 88x40
        let p = plan_size(Resolution::new(200, 100), &target("64x64"), 8);
        assert_eq!(p.scaled, Resolution::new(90, 45));
        assert_eq!(p.cropped, Resolution::new(88, 40));
    }

    #[test]
    fn sizes_never_upscale_and_report_empty_crops() {
        let p = plan_size(Resolution::new(100, 50), &target("512x512"), 1);
        assert_eq!(p.scaled, Resolution::new(100, 50));
        assert_eq!(p.cropped, Resolution::new(100, 50));
        let p = plan_size(Resolution::new(100, 50), &target("512x512"), 64);
        assert_eq!(p.cropped, Resolution::new(64, 0));
        assert!(p.is_empty());
        let p = plan_size(Resolution::new(1, 5000), &target("64x64"), 1);
        assert_eq!(p.scaled, Resolution::new(0, 4525));
        assert!(p.is_empty());
    }

    #[test]
    fn image_extensions_ignore_case() {
        for name in ["IMG_0001.JPG", "a.png", "b.Jpeg", "c.WEBP", "d.bmp"] {
            assert!(is_image_file(Path::new(name)), "{name}");
        }
        for name in ["a.txt", "png", ".png", "a.gif", "a.png.txt"] {
            assert!(!is_image_file(Path::new(name)), "{name}");
        }
    }

    #[test]
    fn interpolation_names_round_trip() {
        for name in Interpolation::NAMES {
            assert_eq!(
                name.parse::<Interpolation>().expect("known name").name(),
                *name
            );
        }
        assert!(
            "bilinear"
                .parse::<Interpolation>()
                .unwrap_err()
                .contains("expected one of area")
        );
    }

    #[test]
    fn kernels_match_opencv_coefficients() {
        // OpenCV interpolateCubic(0.5): [-0.09375, 0.59375, 0.59375, -0.09375]
        assert!((opencv_cubic(1.5) + 0.09375).abs() < 1e-12);
        assert!((opencv_cubic(0.5) - 0.59375).abs() < 1e-12);
        assert_eq!(opencv_cubic(0.0), 1.0);
        assert_eq!(lanczos4(0.0), 1.0);
        assert!(lanczos4(2.0).abs() < 1e-12);
        assert_eq!(lanczos4(4.5), 0.0);
    }
}
