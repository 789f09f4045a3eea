//! Data-parallel hooks of the training loop (docs/distributed.md): one replica per process,
//! each rank takes its slice of every global micro-batch, LoRA gradients are summed over ranks
//! in one flat bucket before the optimiser step, and only rank 0 writes files.
//!
//! Exactness: every rank scales its micro-batch loss by its share of the global micro-batch
//! (`local samples / global samples`), so the summed gradient is the gradient of the global
//! batch mean, also when the last batch of a bucket splits unevenly. The random draws of a
//! sample (VAE sampling, noise, timesteps) are seeded from the sample itself, so 2 ranks ×
//! batch 1 train on the same numbers as 1 rank × batch 2 (LoRA dropouts excepted: they are
//! drawn inside the forward pass over the per-rank batch).

use sd_data::dataset_plan::PlannedSample;
use tch::{Device, Kind, Tensor};

use super::{CachedLatents, Result, Run, TrainError, mix_seed};

impl Run<'_> {
    /// Whether this process writes files (rank 0, or no process group).
    pub(super) fn is_main(&self) -> bool {
        self.dist.is_none_or(|d| d.is_main())
    }

    /// This rank's contiguous slice of a global micro-batch and its share of the samples.
    /// Rank r of W takes `[r·n/W, (r+1)·n/W)`: equal slices for a full batch, balanced ones
    /// (possibly empty) for a short last batch.
    pub(super) fn shard<'s>(&self, samples: &'s [PlannedSample]) -> (&'s [PlannedSample], f64) {
        let Some(d) = self.dist else {
            return (samples, 1.0);
        };
        let (n, w, r) = (samples.len(), d.world_size(), d.rank());
        let (lo, hi) = (r * n / w, (r + 1) * n / w);
        let share = if n == 0 {
            0.0
        } else {
            (hi - lo) as f64 / n as f64
        };
        (&samples[lo..hi], share)
    }

    /// Whether this rank encodes image `index` (global order over datasets) when caching latents.
    pub(super) fn owns(&self, index: u64) -> bool {
        self.dist
            .is_none_or(|d| index % d.world_size() as u64 == d.rank() as u64)
    }

    /// Every replica starts from rank 0's LoRA weights.
    pub(super) fn broadcast_weights(&mut self) -> Result<()> {
        let Some(d) = self.dist else {
            return Ok(());
        };
        let params = self.trainable();
        sd_dist::broadcast_params(d, &params, 0)?;
        Ok(())
    }

    fn trainable(&self) -> Vec<Tensor> {
        self.optimizer
            .groups()
            .iter()
            .flat_map(|g| g.params.iter().map(Tensor::shallow_clone))
            .collect()
    }

    /// Sums the LoRA gradients over the ranks (each rank's loss was pre-scaled by its share),
    /// together with this step's per-micro-batch loss contributions and the interrupt flag;
    /// returns the global mean loss of each micro-batch. A set interrupt flag on any rank
    /// makes every rank stop at this step.
    pub(super) fn reduce_gradients(&mut self, step_losses: &[f64]) -> Result<Vec<f64>> {
        let Some(d) = self.dist else {
            return Ok(step_losses.to_vec());
        };
        let params = self.trainable();
        // A rank whose slices were all empty (or a module unused this step) has no gradient
        // yet: give it zeros so every rank sends the same bucket layout.
        let missing: Vec<&Tensor> = params.iter().filter(|p| !p.grad().defined()).collect();
        if !missing.is_empty() {
            let zero = missing
                .iter()
                .map(|p| p.sum(Kind::Float) * 0.0)
                .reduce(|a, b| a + b)
                .expect("missing is not empty");
            zero.backward();
        }
        let mut extra = step_losses.to_vec();
        extra.push(f64::from(u8::from(
            self.interrupt.load(std::sync::atomic::Ordering::Relaxed),
        )));
        let mut reduced = sd_dist::all_reduce_grads(d, &params, &extra)?;
        let stop = reduced.pop().unwrap_or(0.0);
        self.dist_stop = stop > 0.0;
        Ok(reduced)
    }

    /// Whether to save and stop after this micro-batch: Ctrl-C on one process; with a process
    /// group only at optimiser steps, when any rank saw it (all ranks agree).
    pub(super) fn should_stop(&self, sync: bool) -> bool {
        if self.dist.is_some() {
            sync && self.dist_stop
        } else {
            self.interrupt.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// After each rank cached its share of the latents: every image's latents (normal,
    /// flipped, size conditioning) are broadcast from the rank that encoded them, so every
    /// rank holds the full cache.
    pub(super) fn share_cached_latents(&mut self) -> Result<()> {
        let Some(d) = self.dist else {
            return Ok(());
        };
        let device = if d.backend() == sd_dist::Backend::Nccl {
            self.cfg.device
        } else {
            Device::Cpu
        };
        let world = d.world_size() as u64;
        let mut index = 0u64;
        for (di, ds) in self.scan.datasets.iter().enumerate() {
            for (ii, entry) in ds.images.iter().enumerate() {
                let owner = (index % world) as usize;
                index += 1;
                let flip = ds.prep_options(ii).augment.flip_aug;
                let bucket = entry.assignment.bucket;
                let (h, w) = (i64::from(bucket.height / 8), i64::from(bucket.width / 8));
                let n = 4 * h * w;
                let len = n * (1 + i64::from(flip)) + 6;
                let buf = if owner == d.rank() {
                    let c = &self.cache[&(di, ii)];
                    let mut parts = vec![c.normal.reshape([-1])];
                    if flip {
                        let f = c.flipped.as_ref().ok_or_else(|| {
                            TrainError::Invalid(format!(
                                "cached latents of {} lack the flipped copy flip_aug needs",
                                entry.path.display()
                            ))
                        })?;
                        parts.push(f.reshape([-1]));
                    }
                    let meta = [
                        c.original_size.0,
                        c.original_size.1,
                        c.crop_top_left.0,
                        c.crop_top_left.1,
                        c.crop_top_left_flipped.0,
                        c.crop_top_left_flipped.1,
                    ]
                    .map(|v| v as f32);
                    parts.push(Tensor::from_slice(&meta));
                    let buf = Tensor::cat(&parts, 0).to_kind(Kind::Float);
                    if buf.numel() as i64 != len {
                        return Err(TrainError::Invalid(format!(
                            "cached latents of {} have {} values, expected {len} for bucket {}x{}",
                            entry.path.display(),
                            buf.numel(),
                            bucket.width,
                            bucket.height
                        )));
                    }
                    buf.to_device(device).contiguous()
                } else {
                    Tensor::zeros([len], (Kind::Float, device))
                };
                d.broadcast(&buf, owner)?;
                if owner != d.rank() {
                    let buf = buf.to_device(Device::Cpu);
                    let normal = buf.narrow(0, 0, n).view([4, h, w]);
                    let flipped = flip.then(|| buf.narrow(0, n, n).view([4, h, w]));
                    let meta = Vec::<f32>::try_from(&buf.narrow(0, len - 6, 6))
                        .map_err(|e: tch::TchError| TrainError::Invalid(e.to_string()))?;
                    let m: Vec<u32> = meta.iter().map(|&v| v.max(0.0) as u32).collect();
                    self.cache.insert(
                        (di, ii),
                        CachedLatents {
                            normal,
                            flipped,
                            original_size: (m[0], m[1]),
                            crop_top_left: (m[2], m[3]),
                            crop_top_left_flipped: (m[4], m[5]),
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Noise, timesteps and input noise drawn sample by sample, each from libtorch's generator
    /// seeded with the sample's own seed (`seeds[i]` for `latents[i]`).
    pub(super) fn draw_per_sample(
        &self,
        latents: &Tensor,
        seeds: &[i64],
    ) -> (Tensor, Tensor, Tensor) {
        let mut noise = Vec::with_capacity(seeds.len());
        let mut timesteps = Vec::with_capacity(seeds.len());
        let mut input_noise = Vec::with_capacity(seeds.len());
        for (i, &seed) in seeds.iter().enumerate() {
            tch::manual_seed(seed);
            let (n, t, x) = self.draw_noise(&latents.narrow(0, i as i64, 1));
            noise.push(n);
            timesteps.push(t);
            input_noise.push(x);
        }
        (
            Tensor::cat(&noise, 0),
            Tensor::cat(&timesteps, 0),
            Tensor::cat(&input_noise, 0),
        )
    }
}

/// Standard-normal noise shaped like `like` (`[B, …]`), row `i` drawn from a generator
/// seeded with `seeds[i]`.
pub(super) fn per_sample_randn(like: &Tensor, seeds: &[i64]) -> Tensor {
    let rows: Vec<Tensor> = seeds
        .iter()
        .enumerate()
        .map(|(i, &seed)| {
            tch::manual_seed(seed);
            like.narrow(0, i as i64, 1).randn_like()
        })
        .collect();
    Tensor::cat(&rows, 0)
}

/// The seed of sample draws: the plan's per-sample seed mixed with the epoch.
pub(super) fn sample_draw_seed(sample_seed: u64, epoch: u64) -> i64 {
    mix_seed(sample_seed, epoch, 0x5EED)
}
