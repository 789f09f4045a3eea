//! The data behind `--debug_dataset`: every sample of one epoch with its bucket, processed
//! caption and repeats, as a JSON-serialisable struct plus a plain-text formatter.
//!
//! Nothing here loads pixels; captions are processed exactly as training would process them
//! for that epoch (same per-sample seeds, stream 1).

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::bucket::Resolution;
use crate::caption::{CaptionProgress, process_caption};
use crate::dataset::DatasetScan;
use crate::dataset_plan::EpochPlan;
use crate::dataset_rng::DataRng;

/// One dataset's totals.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DebugDataset {
    /// Index in the config.
    pub index: usize,
    /// `DreamBoothDataset` or `FineTuningDataset`.
    pub class: String,
    /// Training images with repeats.
    pub num_train_images: u64,
    /// Regularisation images with repeats (before balancing).
    pub num_reg_images: u64,
    /// Batch size.
    pub batch_size: u32,
    /// Batches per epoch.
    pub num_batches: u64,
    /// (bucket, images with repeats) for each non-empty bucket.
    pub buckets: Vec<(Resolution, usize)>,
    /// Mean |aspect-ratio error|.
    pub mean_ar_error: f64,
}

/// One sample of the epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DebugSample {
    /// The image file.
    pub image: PathBuf,
    /// Original size (W, H).
    pub size: Resolution,
    /// Size after resizing, before cropping.
    pub resized: Resolution,
    /// The caption as processed for this epoch and step.
    pub caption: String,
    /// The caption before processing.
    pub raw_caption: String,
    /// Repeats per epoch of this image.
    pub num_repeats: u32,
    /// Regularisation image.
    pub is_reg: bool,
    /// Loss weight (`prior_loss_weight` for regularisation images).
    pub loss_weight: f64,
    /// Seed of the sample's private RNGs.
    pub seed: u64,
}

/// One batch of the epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DebugBatch {
    /// Position in the epoch, 0-based.
    pub index: usize,
    /// Dataset index.
    pub dataset: usize,
    /// Bucket (W, H).
    pub bucket: Resolution,
    /// Samples.
    pub samples: Vec<DebugSample>,
}

/// Everything `--debug_dataset` shows for one epoch.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DebugListing {
    /// Epoch, 1-based.
    pub epoch: u32,
    /// Seed of the epoch plan.
    pub seed: u64,
    /// Batches per epoch over all datasets.
    pub num_batches: u64,
    /// Per-dataset totals.
    pub datasets: Vec<DebugDataset>,
    /// Batches in training order.
    pub batches: Vec<DebugBatch>,
}

/// Builds the listing of `plan` (made from `scan`); captions are processed with
/// `progress` (its `epoch` should be `plan.epoch`).
pub fn debug_listing(
    scan: &DatasetScan,
    plan: &EpochPlan,
    progress: CaptionProgress,
) -> DebugListing {
    let datasets = scan
        .datasets
        .iter()
        .enumerate()
        .map(|(index, ds)| DebugDataset {
            index,
            class: ds.config.kind.class_name().to_owned(),
            num_train_images: ds.num_train_images,
            num_reg_images: ds.num_reg_images,
            batch_size: ds.config.batch_size,
            num_batches: ds.num_batches(),
            buckets: ds
                .buckets
                .iter()
                .map(|b| (b.resolution, b.images.len()))
                .collect(),
            mean_ar_error: ds.mean_ar_error,
        })
        .collect();
    let batches = plan
        .batches
        .iter()
        .enumerate()
        .map(|(index, b)| {
            let ds = &scan.datasets[b.dataset];
            DebugBatch {
                index,
                dataset: b.dataset,
                bucket: b.bucket,
                samples: b
                    .samples
                    .iter()
                    .map(|s| {
                        let e = &ds.images[s.image];
                        let opts = &ds.config.subsets[e.subset].caption;
                        let caption = process_caption(
                            &e.caption,
                            opts,
                            progress,
                            &mut DataRng::new(s.seed, 1),
                        );
                        DebugSample {
                            image: e.path.clone(),
                            size: e.size,
                            resized: e.assignment.resized,
                            caption,
                            raw_caption: e.caption.clone(),
                            num_repeats: e.num_repeats,
                            is_reg: e.is_reg,
                            loss_weight: ds.loss_weight(s.image),
                            seed: s.seed,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    DebugListing {
        epoch: plan.epoch,
        seed: plan.seed,
        num_batches: scan.num_batches(),
        datasets,
        batches,
    }
}

impl DebugListing {
    /// Plain text: a header per dataset, then one line per sample
    /// (`batch N bucket WxH | file | repeats | reg | caption`).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "epoch {} (seed {}): {} batches",
            self.epoch, self.seed, self.num_batches
        );
        for d in &self.datasets {
            let _ = writeln!(
                out,
                "dataset {} ({}): {} train images, {} reg images (with repeats), batch size {}, {} batches, mean ar error {:.4}",
                d.index,
                d.class,
                d.num_train_images,
                d.num_reg_images,
                d.batch_size,
                d.num_batches,
                d.mean_ar_error
            );
            for (bucket, count) in &d.buckets {
                let _ = writeln!(out, "  bucket {bucket}: {count}");
            }
        }
        for b in &self.batches {
            let _ = writeln!(
                out,
                "batch {} dataset {} bucket {}",
                b.index, b.dataset, b.bucket
            );
            for s in &b.samples {
                let _ = writeln!(
                    out,
                    "  {} | {} -> {} | repeats {}{} | {}",
                    s.image.display(),
                    s.size,
                    s.resized,
                    s.num_repeats,
                    if s.is_reg {
                        format!(" | reg (loss weight {})", s.loss_weight)
                    } else {
                        String::new()
                    },
                    s.caption
                );
            }
        }
        out
    }
}
