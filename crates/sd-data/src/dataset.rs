//! Dataset scan (spec training.md §2.5–§2.7, §3.3, §3.6): finds the images and captions of
//! every subset, reads image sizes, balances regularisation images, assigns buckets and
//! counts batches — all before any model is loaded. Every image and caption problem found
//! is collected and returned together ([`DatasetError::Scan`]), each naming its file.
//!
//! # Source
//! sd-scripts `library/train_util.py`: `DreamBoothDataset.__init__` (`load_dreambooth_dir`,
//! reg balancing), `FineTuningDataset.__init__`, `BaseDataset.make_buckets`, `glob_images`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::bucket::{BucketAssignment, BucketSelector, Resolution};
use crate::caption::{caption_candidates, read_caption_file};
use crate::config::{DatasetConfig, DatasetGroupConfig, DatasetKind, SubsetConfig};
use crate::dataset_error::{DatasetError, DatasetResult, Issue};
use crate::image_prep::{PrepOptions, decode_image};

/// Image file extensions of the DreamBooth scan, compared ASCII case-insensitively.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

/// Caption extensions probed when an image has no caption with the configured extension,
/// to point the user at a probably wrong `caption_extension`.
const OTHER_CAPTION_EXTENSIONS: &[&str] = &[".txt", ".caption"];

/// How to scan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanOptions {
    /// Folder that relative `image_dir` / `metadata_file` paths are joined onto (the
    /// process's working folder in the reference).
    pub base_dir: PathBuf,
    /// Fully decode every image (in parallel) instead of reading headers only, so truncated
    /// files are reported now rather than during training.
    pub verify_decode: bool,
}

/// One registered image of a dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ImageEntry {
    /// The image file.
    pub path: PathBuf,
    /// Its size in pixels (W, H), from the file header.
    pub size: Resolution,
    /// The caption before per-step processing (file, metadata, or `class_tokens`).
    pub caption: String,
    /// The caption file read, if any.
    pub caption_file: Option<PathBuf>,
    /// Index of its subset in [`DatasetConfig::subsets`].
    pub subset: usize,
    /// Regularisation image.
    pub is_reg: bool,
    /// Repeats per epoch (after regularisation balancing).
    pub num_repeats: u32,
    /// Bucket, resized size and aspect-ratio error.
    pub assignment: BucketAssignment,
}

/// One bucket of a dataset: its resolution and image indices, each repeated `num_repeats`
/// times consecutively (registration order).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Bucket {
    /// Bucket size (W, H).
    pub resolution: Resolution,
    /// Indices into [`ScannedDataset::images`], with repeats.
    pub images: Vec<usize>,
}

/// A scanned dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ScannedDataset {
    /// Its resolved configuration.
    pub config: DatasetConfig,
    /// Registered images: training images in subset and path order, then the regularisation
    /// images kept by the balancing.
    pub images: Vec<ImageEntry>,
    /// Σ images × num_repeats over non-regularisation subsets.
    pub num_train_images: u64,
    /// The same over regularisation subsets, before balancing.
    pub num_reg_images: u64,
    /// Non-empty buckets sorted by (width, height).
    pub buckets: Vec<Bucket>,
    /// Mean |ar_error| over registered images (repeats not counted).
    pub mean_ar_error: f64,
}

impl ScannedDataset {
    /// Batches per epoch: Σ over buckets of ⌈len / batch_size⌉ (spec §3.6).
    pub fn num_batches(&self) -> u64 {
        let bs = u64::from(self.config.batch_size.max(1));
        self.buckets
            .iter()
            .map(|b| (b.images.len() as u64).div_ceil(bs))
            .sum()
    }

    /// Preparation options of an image's subset.
    pub fn prep_options(&self, image: usize) -> PrepOptions {
        let s = &self.config.subsets[self.images[image].subset];
        PrepOptions {
            augment: s.augment,
            interpolation: s.resize_interpolation,
            alpha_mask: s.alpha_mask,
        }
    }

    /// Loss weight of an image: `prior_loss_weight` for regularisation images, else 1.
    pub fn loss_weight(&self, image: usize) -> f64 {
        if self.images[image].is_reg {
            self.config.prior_loss_weight
        } else {
            1.0
        }
    }

    /// A summary in the shape of `tests/fixtures/train-images/dataset.expected.json`.
    pub fn summary(&self) -> DatasetSummary {
        DatasetSummary {
            dataset_class: self.config.kind.class_name().to_owned(),
            num_train_images: self.num_train_images,
            num_reg_images: self.num_reg_images,
            bucket_counts_with_repeats: self
                .buckets
                .iter()
                .map(|b| (b.resolution.to_string(), b.images.len() as u64))
                .collect(),
            num_batches_per_epoch: self.num_batches(),
            images: self
                .images
                .iter()
                .map(|e| ImageSummary {
                    image: e
                        .path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    size_wh: [e.size.width, e.size.height],
                    bucket_reso_wh: [e.assignment.bucket.width, e.assignment.bucket.height],
                    resized_size_wh: [e.assignment.resized.width, e.assignment.resized.height],
                    num_repeats: e.num_repeats,
                    caption: e.caption.clone(),
                })
                .collect(),
        }
    }
}

/// Dataset summary: counts, buckets and per-image assignment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatasetSummary {
    /// `DreamBoothDataset` or `FineTuningDataset`.
    pub dataset_class: String,
    /// Training images with repeats.
    pub num_train_images: u64,
    /// Regularisation images with repeats, before balancing.
    pub num_reg_images: u64,
    /// `"WxH"` → images with repeats.
    pub bucket_counts_with_repeats: BTreeMap<String, u64>,
    /// Batches per epoch.
    pub num_batches_per_epoch: u64,
    /// Registered images in order.
    pub images: Vec<ImageSummary>,
}

/// One image in a [`DatasetSummary`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ImageSummary {
    /// File name.
    pub image: String,
    /// Original (W, H).
    pub size_wh: [u32; 2],
    /// Bucket (W, H).
    pub bucket_reso_wh: [u32; 2],
    /// Resized size before cropping (W, H).
    pub resized_size_wh: [u32; 2],
    /// Repeats per epoch.
    pub num_repeats: u32,
    /// Caption before processing.
    pub caption: String,
}

/// The result of scanning every dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DatasetScan {
    /// Datasets in config order.
    pub datasets: Vec<ScannedDataset>,
    /// Warnings about files (odd captions, probable wrong caption extension, missing captions).
    pub warnings: Vec<Issue>,
}

impl DatasetScan {
    /// Batches per epoch over all datasets (their sum; each dataset has its own batch size).
    pub fn num_batches(&self) -> u64 {
        self.datasets.iter().map(ScannedDataset::num_batches).sum()
    }
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (any letter case).
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|k| k.eq_ignore_ascii_case(e)))
}

/// Images directly inside `dir`, sorted by path.
///
/// # Errors
/// [`Issue`] when the folder cannot be listed.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, Issue> {
    let entries = std::fs::read_dir(dir).map_err(|e| Issue {
        path: dir.to_path_buf(),
        reason: format!("cannot list image folder: {e}"),
    })?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_image_path(p))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// A candidate image before size reading and bucketing.
struct Found {
    path: PathBuf,
    caption: String,
    caption_file: Option<PathBuf>,
    size: Option<Resolution>,
}

fn scan_dreambooth(
    subset: &SubsetConfig,
    dir: &Path,
    issues: &mut Vec<Issue>,
    warnings: &mut Vec<Issue>,
) -> Vec<Found> {
    let images = match list_images(dir) {
        Ok(i) => i,
        Err(issue) => {
            issues.push(issue);
            return Vec::new();
        }
    };
    if images.is_empty() {
        warnings.push(Issue {
            path: dir.to_path_buf(),
            reason: "no images found, subset ignored".to_owned(),
        });
    }
    let mut other_ext: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut no_caption = Vec::new();
    let mut found = Vec::new();
    for path in images {
        let candidates = caption_candidates(&path, &subset.caption_extension);
        let existing = candidates.into_iter().find(|c| c.is_file());
        let (caption, caption_file) = match existing {
            Some(file) => match read_caption_file(&file, subset.caption.enable_wildcard) {
                Ok(c) => {
                    warnings.extend(c.warnings.into_iter().map(|w| Issue {
                        path: file.clone(),
                        reason: w,
                    }));
                    (c.caption, Some(file))
                }
                Err(reason) => {
                    issues.push(Issue { path: file, reason });
                    continue;
                }
            },
            None => {
                for ext in OTHER_CAPTION_EXTENSIONS
                    .iter()
                    .filter(|e| **e != subset.caption_extension)
                {
                    let other =
                        PathBuf::from(format!("{}{ext}", path.with_extension("").display()));
                    if other.is_file() {
                        other_ext.entry((*ext).to_owned()).or_default().push(other);
                        break;
                    }
                }
                if subset.class_tokens.is_none() {
                    no_caption.push(path.clone());
                }
                (subset.class_tokens.clone().unwrap_or_default(), None)
            }
        };
        found.push(Found {
            path,
            caption,
            caption_file,
            size: None,
        });
    }
    for (ext, files) in other_ext {
        let shown: Vec<String> = files
            .iter()
            .take(5)
            .map(|f| f.display().to_string())
            .collect();
        warnings.push(Issue {
            path: dir.to_path_buf(),
            reason: format!(
                "{} image(s) have no \"{}\" caption but a \"{ext}\" file beside them ({}{}): set caption_extension = \"{ext}\" \
                 (there is no fallback; these images use {})",
                files.len(),
                subset.caption_extension,
                shown.join(", "),
                if files.len() > 5 { ", …" } else { "" },
                subset.class_tokens.as_deref().map_or("an empty caption".to_owned(), |t| format!("class_tokens \"{t}\"")),
            ),
        });
    }
    if !no_caption.is_empty() {
        warnings.push(Issue {
            path: dir.to_path_buf(),
            reason: format!(
                "{} image(s) have neither a \"{}\" caption file nor class_tokens: their caption is empty",
                no_caption.len(),
                subset.caption_extension
            ),
        });
    }
    found
}

fn scan_metadata(subset: &SubsetConfig, base: &Path, issues: &mut Vec<Issue>) -> Vec<Found> {
    let meta_path = base.join(
        subset
            .metadata_file
            .as_deref()
            .expect("fine-tuning subsets have metadata_file"),
    );
    let image_dir = subset.image_dir.as_ref().map(|d| base.join(d));
    let text = match std::fs::read_to_string(&meta_path) {
        Ok(t) => t,
        Err(e) => {
            issues.push(Issue {
                path: meta_path,
                reason: format!("cannot read metadata file: {e}"),
            });
            return Vec::new();
        }
    };
    let is_jsonl = meta_path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    let mut records: Vec<(String, serde_json::Value)> = Vec::new();
    if is_jsonl {
        for (n, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            match serde_json::from_str::<serde_json::Value>(line) {
                Ok(v) => match v.get("image_path").and_then(|p| p.as_str()) {
                    Some(p) => records.push((p.to_owned(), v.clone())),
                    None => issues.push(Issue {
                        path: meta_path.clone(),
                        reason: format!(
                            "line {}: expected an object with a string \"image_path\"",
                            n + 1
                        ),
                    }),
                },
                Err(e) => issues.push(Issue {
                    path: meta_path.clone(),
                    reason: format!("line {}: invalid JSON: {e}", n + 1),
                }),
            }
        }
    } else {
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(serde_json::Value::Object(map)) => records.extend(map),
            Ok(_) => issues.push(Issue {
                path: meta_path.clone(),
                reason: "expected a JSON object of image entries".to_owned(),
            }),
            Err(e) => issues.push(Issue {
                path: meta_path.clone(),
                reason: format!("invalid JSON: {e}"),
            }),
        }
    }
    let sep = &subset.caption.caption_separator;
    let mut found = Vec::new();
    for (key, entry) in records {
        let key_path = PathBuf::from(&key);
        let mut path = if key_path.is_absolute() {
            key_path
        } else if let Some(dir) = &image_dir {
            dir.join(&key_path)
        } else {
            issues.push(Issue {
                path: meta_path.clone(),
                reason: format!("entry \"{key}\" is relative but the subset has no image_dir"),
            });
            continue;
        };
        if path.extension().is_none() && !path.is_file() {
            // Old metadata stores bare stems (spec §15 #22): probe the image extensions.
            if let Some(p) = IMAGE_EXTENSIONS
                .iter()
                .flat_map(|e| [e.to_string(), e.to_ascii_uppercase()])
                .map(|e| path.with_extension(e))
                .find(|p| p.is_file())
            {
                path = p;
            }
        }
        let caption = entry
            .get("caption")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_owned();
        let tags = entry.get("tags").and_then(|t| t.as_str()).unwrap_or("");
        let caption = if subset.caption.enable_wildcard {
            if tags.is_empty() {
                caption
            } else {
                let tags = tags.replace('\n', sep);
                caption
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| format!("{l}{sep}{tags}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        } else if tags.is_empty() {
            caption
        } else if caption.is_empty() {
            tags.to_owned()
        } else {
            format!("{caption}{sep}{tags}")
        };
        let size = entry
            .get("image_size")
            .and_then(|s| s.as_array())
            .and_then(|a| match a.as_slice() {
                [w, h] => Some(Resolution::new(
                    u32::try_from(w.as_u64()?).ok()?,
                    u32::try_from(h.as_u64()?).ok()?,
                )),
                _ => None,
            });
        found.push(Found {
            path,
            caption,
            caption_file: None,
            size,
        });
    }
    found
}

/// Scans every dataset of `group`.
///
/// # Errors
/// [`DatasetError::Scan`] listing every problem (unreadable folders, images or caption files,
/// empty caption files, images too small for a bucket, bad metadata) when there is at least
/// one.
pub fn scan_datasets(group: &DatasetGroupConfig, opts: &ScanOptions) -> DatasetResult<DatasetScan> {
    let mut issues = Vec::new();
    let mut warnings = Vec::new();
    let mut datasets = Vec::new();
    for config in &group.datasets {
        // 1. find images and captions, per subset
        let mut per_subset: Vec<Vec<Found>> = Vec::new();
        for subset in &config.subsets {
            let found = match config.kind {
                DatasetKind::DreamBooth => {
                    let dir = opts
                        .base_dir
                        .join(subset.image_dir.as_deref().unwrap_or(Path::new("")));
                    scan_dreambooth(subset, &dir, &mut issues, &mut warnings)
                }
                DatasetKind::FineTuning => scan_metadata(subset, &opts.base_dir, &mut issues),
            };
            per_subset.push(found);
        }
        // 2. sizes (headers, or full decodes), in parallel
        let sizes: Vec<Vec<Result<Resolution, Issue>>> = per_subset
            .iter()
            .map(|found| {
                found
                    .par_iter()
                    .map(|f| read_size(&f.path, f.size, opts.verify_decode))
                    .collect()
            })
            .collect();
        // 3. register images: train subsets first, reg images balanced afterwards
        let selector = BucketSelector::new(&config.buckets);
        let mut images = Vec::new();
        let (mut num_train, mut num_reg) = (0u64, 0u64);
        let mut reg_pending: Vec<(usize, Found, Resolution)> = Vec::new();
        for (si, (found, sizes)) in per_subset.into_iter().zip(sizes).enumerate() {
            let subset = &config.subsets[si];
            let repeats = u32::try_from(subset.num_repeats.max(1)).unwrap_or(u32::MAX);
            for (f, size) in found.into_iter().zip(sizes) {
                let size = match size {
                    Ok(s) => s,
                    Err(issue) => {
                        issues.push(issue);
                        continue;
                    }
                };
                if subset.is_reg {
                    num_reg += u64::from(repeats);
                    reg_pending.push((si, f, size));
                } else {
                    num_train += u64::from(repeats);
                    images.push(entry(f, size, si, false, repeats));
                }
            }
        }
        // Balancing (spec §2.6): register reg images in order until their repeats reach the
        // training count; later rounds add one repeat per image.
        let mut reg_entries: Vec<ImageEntry> = Vec::new();
        let mut n = 0u64;
        let mut first = true;
        'outer: while n < num_train && !reg_pending.is_empty() {
            for (i, (si, f, size)) in reg_pending.iter().enumerate() {
                if first {
                    let repeats =
                        u32::try_from(config.subsets[*si].num_repeats.max(1)).unwrap_or(u32::MAX);
                    reg_entries.push(entry(
                        Found {
                            path: f.path.clone(),
                            caption: f.caption.clone(),
                            caption_file: f.caption_file.clone(),
                            size: None,
                        },
                        *size,
                        *si,
                        true,
                        repeats,
                    ));
                    n += u64::from(repeats);
                } else {
                    reg_entries[i].num_repeats += 1;
                    n += 1;
                }
                if n >= num_train {
                    break 'outer;
                }
            }
            first = false;
        }
        images.extend(reg_entries);
        // 4. buckets
        let mut by_bucket: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
        let mut ar_sum = 0.0;
        let mut kept = Vec::with_capacity(images.len());
        for mut e in images {
            match selector.select(e.size) {
                Ok(a) => {
                    e.assignment = a;
                    ar_sum += a.ar_error.abs();
                    let idx = kept.len();
                    by_bucket
                        .entry((a.bucket.width, a.bucket.height))
                        .or_default()
                        .extend(std::iter::repeat_n(idx, e.num_repeats as usize));
                    kept.push(e);
                }
                Err(reason) => issues.push(Issue {
                    path: e.path.clone(),
                    reason,
                }),
            }
        }
        let buckets = by_bucket
            .into_iter()
            .map(|((w, h), images)| Bucket {
                resolution: Resolution::new(w, h),
                images,
            })
            .collect();
        let mean_ar_error = if kept.is_empty() {
            0.0
        } else {
            ar_sum / kept.len() as f64
        };
        datasets.push(ScannedDataset {
            config: config.clone(),
            images: kept,
            num_train_images: num_train,
            num_reg_images: num_reg,
            buckets,
            mean_ar_error,
        });
    }
    if !issues.is_empty() {
        return Err(DatasetError::Scan { issues });
    }
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(DatasetScan { datasets, warnings })
}

fn entry(f: Found, size: Resolution, subset: usize, is_reg: bool, num_repeats: u32) -> ImageEntry {
    ImageEntry {
        path: f.path,
        size,
        caption: f.caption,
        caption_file: f.caption_file,
        subset,
        is_reg,
        num_repeats,
        assignment: BucketAssignment {
            bucket: size,
            resized: size,
            ar_error: 0.0,
        },
    }
}

fn read_size(path: &Path, known: Option<Resolution>, verify: bool) -> Result<Resolution, Issue> {
    let issue = |reason: String| Issue {
        path: path.to_path_buf(),
        reason,
    };
    if !path.is_file() {
        return Err(issue("image file not found".to_owned()));
    }
    if verify {
        let decoded =
            decode_image(path, false).map_err(|e| issue(strip_path(&e.to_string(), path)))?;
        return Ok(decoded.rgb.size);
    }
    if let Some(s) = known {
        return Ok(s);
    }
    let (w, h) = image::ImageReader::open(path)
        .map_err(|e| issue(format!("cannot open image: {e}")))?
        .with_guessed_format()
        .map_err(|e| issue(format!("cannot read image: {e}")))?
        .into_dimensions()
        .map_err(|e| issue(format!("cannot read image header: {e}")))?;
    Ok(Resolution::new(w, h))
}

/// Removes the "… <path>: " prefix of an error message already attached to an issue's path.
fn strip_path(message: &str, path: &Path) -> String {
    let p = path.display().to_string();
    match message.find(&p) {
        Some(i) => message[i + p.len()..]
            .trim_start_matches(':')
            .trim()
            .to_owned(),
        None => message.to_owned(),
    }
}

/// Convenience: [`scan_datasets`] for one dataset config, returning its only dataset.
///
/// # Errors
/// As [`scan_datasets`].
pub fn scan_single(config: &DatasetConfig, opts: &ScanOptions) -> DatasetResult<ScannedDataset> {
    let group = DatasetGroupConfig {
        datasets: vec![config.clone()],
        warnings: Vec::new(),
    };
    let mut scan = scan_datasets(&group, opts)?;
    Ok(scan.datasets.remove(0))
}
