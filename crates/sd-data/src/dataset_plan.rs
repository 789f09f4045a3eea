//! Epoch planning (spec training.md §3.6): which images form which batch, in which order,
//! for one epoch — deterministic for a given seed and epoch.
//!
//! Procedure for epoch `e` (1-based) with seed `s`, using [`DataRng`]`::new(s, e)`:
//! 1. for each dataset (config order), for each bucket (sorted by resolution): shuffle the
//!    bucket's image list (repeats included), then cut it into batches of the dataset's
//!    `batch_size` (the last one may be smaller; batches never mix buckets);
//! 2. shuffle the list of all batches of all datasets (the data loader's permutation);
//! 3. give every sample, in final order, a 64-bit seed (`next_u64`) for its private
//!    augmentation RNG (stream 0: crop, colour, flip) and caption RNG (stream 1: dropout,
//!    wildcards, shuffle, tag dropout).
//!
//! # Compatibility
//! The reference re-seeds Python's `random` with (dataset_seed + epoch), shuffles the
//! (bucket, batch) list, then each bucket, and the torch data loader permutes the batches
//! again; step 2 stands for both permutations. Counts and batch composition rules are the
//! same; the concrete orders cannot match any Python run.

use crate::bucket::Resolution;
use crate::dataset::DatasetScan;
use crate::dataset_rng::DataRng;

/// One sample of a planned batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PlannedSample {
    /// Index into the dataset's [`crate::dataset::ScannedDataset::images`].
    pub image: usize,
    /// Seed of the sample's private RNGs (stream 0: image, stream 1: caption).
    pub seed: u64,
}

/// One batch: samples of one bucket of one dataset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PlannedBatch {
    /// Index of the dataset in [`DatasetScan::datasets`].
    pub dataset: usize,
    /// The bucket (W, H) every sample is prepared at.
    pub bucket: Resolution,
    /// The samples, at most the dataset's `batch_size`.
    pub samples: Vec<PlannedSample>,
}

/// The batches of one epoch in training order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EpochPlan {
    /// Epoch, 1-based.
    pub epoch: u32,
    /// The seed the plan was made with.
    pub seed: u64,
    /// Batches in order; their count is [`DatasetScan::num_batches`].
    pub batches: Vec<PlannedBatch>,
}

/// Plans epoch `epoch` (1-based) of `scan` with `seed` (see the module docs).
pub fn plan_epoch(scan: &DatasetScan, seed: u64, epoch: u32) -> EpochPlan {
    let mut rng = DataRng::new(seed, u64::from(epoch));
    let mut batches = Vec::new();
    for (di, ds) in scan.datasets.iter().enumerate() {
        let bs = ds.config.batch_size.max(1) as usize;
        for bucket in &ds.buckets {
            let mut order = bucket.images.clone();
            rng.shuffle(&mut order);
            for chunk in order.chunks(bs) {
                batches.push(PlannedBatch {
                    dataset: di,
                    bucket: bucket.resolution,
                    samples: chunk
                        .iter()
                        .map(|&image| PlannedSample { image, seed: 0 })
                        .collect(),
                });
            }
        }
    }
    rng.shuffle(&mut batches);
    for batch in &mut batches {
        for s in &mut batch.samples {
            s.seed = rng.next_u64();
        }
    }
    EpochPlan {
        epoch,
        seed,
        batches,
    }
}
