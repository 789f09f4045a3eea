//! Aspect-ratio buckets: the bucket list, the choice of an image's bucket and its resized
//! size, and the SDXL crop conditioning (spec training.md §3.1–§3.4).
//!
//! All sizes are pixels, width first ([`Resolution`]). Aspect ratios are `width / height`
//! computed in f64, as the reference's Python floats.
//!
//! # Source
//! sd-scripts `library/model_util.py` `make_bucket_resolutions`, `library/train_util.py`
//! `BucketManager` (`select_bucket`, `round_to_steps`), `BaseDataset.adjust_min_max_bucket_reso_by_steps`
//! and `get_crop_ltrb`.

pub use crate::resize::Resolution;

/// Serialised as `[width, height]` (the `_wh` arrays of the reference's JSON).
impl serde::Serialize for Resolution {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        [self.width, self.height].serialize(serializer)
    }
}

/// Bucketing options of one dataset (spec §2.2), before or after [`BucketSettings::normalized`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BucketSettings {
    /// Training area `resolution` (W, H); its product is the bucket area budget.
    pub resolution: Resolution,
    /// `enable_bucket`: aspect-ratio bucketing on; off means the single bucket (W, H).
    pub enable_bucket: bool,
    /// `min_bucket_reso`: smallest bucket side in pixels (default 256).
    pub min_bucket_reso: u32,
    /// `max_bucket_reso`: largest bucket side in pixels (default 1024).
    pub max_bucket_reso: u32,
    /// `bucket_reso_steps`: bucket sides are multiples of this (default 64).
    pub bucket_reso_steps: u32,
    /// `bucket_no_upscale`: per-image buckets that never enlarge the image.
    pub bucket_no_upscale: bool,
}

impl BucketSettings {
    /// Defaults of sd-scripts for a given training resolution: bucketing off, 256..1024, step 64.
    pub fn new(resolution: Resolution) -> Self {
        Self {
            resolution,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
        }
    }

    /// Applies spec §3.1 when bucketing is on: `min_bucket_reso` is rounded down and
    /// `max_bucket_reso` up to multiples of `bucket_reso_steps` (each change is returned as a
    /// warning), then `min(W,H) ≥ min_bucket_reso` and `max(W,H) ≤ max_bucket_reso` are checked.
    /// With `bucket_no_upscale` a warning says that min/max are ignored.
    ///
    /// # Errors
    /// A message (expected vs found) when a side is 0, the step is 0, or the limits exclude the
    /// resolution.
    pub fn normalized(mut self) -> Result<(Self, Vec<String>), String> {
        let mut warnings = Vec::new();
        let Resolution { width, height } = self.resolution;
        if width == 0 || height == 0 {
            return Err(format!(
                "resolution must be positive, found {width}x{height}"
            ));
        }
        if !self.enable_bucket {
            return Ok((self, warnings));
        }
        let d = self.bucket_reso_steps;
        if d == 0 {
            return Err("bucket_reso_steps must be positive, found 0".to_owned());
        }
        let rem = self.min_bucket_reso % d;
        if rem != 0 {
            let new = self.min_bucket_reso - rem;
            warnings.push(format!(
                "min_bucket_reso {} is not divisible by bucket_reso_steps {d}: rounded down to {new}",
                self.min_bucket_reso
            ));
            self.min_bucket_reso = new;
        }
        let rem = self.max_bucket_reso % d;
        if rem != 0 {
            let new = self.max_bucket_reso + d - rem;
            warnings.push(format!(
                "max_bucket_reso {} is not divisible by bucket_reso_steps {d}: rounded up to {new}",
                self.max_bucket_reso
            ));
            self.max_bucket_reso = new;
        }
        if width.min(height) < self.min_bucket_reso {
            return Err(format!(
                "the smaller side of resolution {width}x{height} must be at least min_bucket_reso {}",
                self.min_bucket_reso
            ));
        }
        if width.max(height) > self.max_bucket_reso {
            return Err(format!(
                "the larger side of resolution {width}x{height} must be at most max_bucket_reso {}",
                self.max_bucket_reso
            ));
        }
        if self.bucket_no_upscale {
            warnings.push(
                "bucket_no_upscale: min_bucket_reso and max_bucket_reso are ignored".to_owned(),
            );
        }
        Ok((self, warnings))
    }
}

/// The predefined bucket list of normal mode (spec §3.2), sorted by (width, height).
///
/// With `max_area = W·H`, `d = divisible`: `(S, S)` with `S = ⌊√max_area / d⌋·d`, and for
/// `w = min_size, min_size + d, … ≤ max_size` the pair `(w, h)` and `(h, w)` with
/// `h = min(max_size, ⌊(max_area // w) / d⌋·d)` when `h ≥ min_size`.
/// (512, 512) with 256..1024 step 64 gives 17 buckets; (1024, 1024) gives 25.
///
/// `divisible` 0 is treated as 1.
pub fn make_bucket_resolutions(
    max_reso: Resolution,
    min_size: u32,
    max_size: u32,
    divisible: u32,
) -> Vec<Resolution> {
    let d = u64::from(divisible.max(1));
    let max_area = max_reso.pixels();
    let mut set = std::collections::BTreeSet::new();
    let side = ((max_area as f64).sqrt() / d as f64).floor() as u64 * d;
    set.insert((side, side));
    let (lo, hi) = (u64::from(min_size), u64::from(max_size));
    let mut w = lo;
    while w <= hi && w > 0 {
        let h = hi.min(max_area / w / d * d);
        if h >= lo {
            set.insert((w, h));
            set.insert((h, w));
        }
        w += d;
    }
    set.into_iter()
        .map(|(w, h)| Resolution::new(clamp_u32(w), clamp_u32(h)))
        .collect()
}

fn clamp_u32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Where one image goes: its bucket, the size it is resized to before cropping, and the
/// aspect-ratio error `bucket_ar − image_ar`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BucketAssignment {
    /// The bucket (final training size in pixels).
    pub bucket: Resolution,
    /// The size the image is resized to; at least the bucket in both sides (cover), the
    /// excess is cropped.
    pub resized: Resolution,
    /// `bucket.width / bucket.height − image_width / image_height`.
    pub ar_error: f64,
}

/// How images are assigned to buckets for one dataset (built from normalised [`BucketSettings`]).
#[derive(Debug, Clone, PartialEq)]
pub enum BucketSelector {
    /// Normal mode: the closest aspect ratio among the predefined list (spec §3.3).
    Predefined {
        /// Sorted bucket list from [`make_bucket_resolutions`].
        resos: Vec<Resolution>,
    },
    /// `bucket_no_upscale`: a per-image bucket no larger than the (down-scaled) image.
    NoUpscale {
        /// Area budget `W·H` in pixels.
        max_area: u64,
        /// `bucket_reso_steps`.
        steps: u32,
    },
    /// Bucketing off: every image is cover-resized and cropped to `resolution`.
    Disabled {
        /// The training resolution (W, H).
        resolution: Resolution,
    },
}

impl BucketSelector {
    /// The selector for normalised settings.
    pub fn new(settings: &BucketSettings) -> Self {
        if !settings.enable_bucket {
            Self::Disabled {
                resolution: settings.resolution,
            }
        } else if settings.bucket_no_upscale {
            Self::NoUpscale {
                max_area: settings.resolution.pixels(),
                steps: settings.bucket_reso_steps.max(1),
            }
        } else {
            Self::Predefined {
                resos: make_bucket_resolutions(
                    settings.resolution,
                    settings.min_bucket_reso,
                    settings.max_bucket_reso,
                    settings.bucket_reso_steps,
                ),
            }
        }
    }

    /// Chooses the bucket and the resized size of an image of `size` (spec §3.3).
    ///
    /// Normal mode: an exact match wins, else the first bucket with the smallest
    /// `|ar_bucket − ar|`; the image is scaled to cover it (`scale = bh/h` if `ar > ar_bucket`
    /// else `bw/w`), sides `int(side·scale + 0.5)`.
    ///
    /// # Compatibility
    /// With bucketing disabled the image is cover-resized and cropped like normal mode with
    /// the single bucket (W, H) — the reference's latent-caching behaviour (spec §15 #4) —
    /// instead of requiring the exact size. An image whose bucket would have a zero side
    /// (no-upscale mode, tiny images) is rejected instead of crashing later.
    ///
    /// # Errors
    /// A message when the image has a zero side or its bucket would be empty.
    pub fn select(&self, size: Resolution) -> Result<BucketAssignment, String> {
        let Resolution {
            width: w,
            height: h,
        } = size;
        if w == 0 || h == 0 {
            return Err(format!("image has no pixels ({w}x{h})"));
        }
        let ar = f64::from(w) / f64::from(h);
        let assignment = match self {
            Self::Predefined { resos } => {
                let bucket = if resos.contains(&size) {
                    size
                } else {
                    let mut best: Option<(f64, Resolution)> = None;
                    for &r in resos {
                        let err = (aspect(r) - ar).abs();
                        if best.is_none_or(|(e, _)| err < e) {
                            best = Some((err, r));
                        }
                    }
                    best.map(|(_, r)| r).ok_or("the bucket list is empty")?
                };
                cover(size, bucket)
            }
            Self::Disabled { resolution } => cover(size, *resolution),
            Self::NoUpscale { max_area, steps } => {
                let d = u64::from(*steps);
                let round = |x: f64| -> u64 {
                    let x = (x + 0.5).floor().max(0.0) as u64;
                    x - x % d
                };
                let resized = if size.pixels() > *max_area {
                    let area = *max_area as f64;
                    let rw = (area * ar).sqrt();
                    let rh = area / rw;
                    let bw1 = round(rw);
                    let bh1 = round(bw1 as f64 / ar);
                    let ar1 = if bh1 == 0 {
                        f64::INFINITY
                    } else {
                        bw1 as f64 / bh1 as f64
                    };
                    let bh2 = round(rh);
                    let bw2 = round(bh2 as f64 * ar);
                    let ar2 = if bh2 == 0 {
                        f64::INFINITY
                    } else {
                        bw2 as f64 / bh2 as f64
                    };
                    if (ar1 - ar).abs() < (ar2 - ar).abs() {
                        (bw1, (bw1 as f64 / ar + 0.5).floor() as u64)
                    } else {
                        ((bh2 as f64 * ar + 0.5).floor() as u64, bh2)
                    }
                } else {
                    (u64::from(w), u64::from(h))
                };
                let bucket = (resized.0 - resized.0 % d, resized.1 - resized.1 % d);
                BucketAssignment {
                    bucket: Resolution::new(clamp_u32(bucket.0), clamp_u32(bucket.1)),
                    resized: Resolution::new(clamp_u32(resized.0), clamp_u32(resized.1)),
                    ar_error: 0.0,
                }
            }
        };
        let b = assignment.bucket;
        if b.width == 0 || b.height == 0 {
            return Err(format!(
                "image {w}x{h} is too small: its bucket would be {}x{} (resized to {}x{})",
                b.width, b.height, assignment.resized.width, assignment.resized.height
            ));
        }
        if assignment.resized.width < b.width || assignment.resized.height < b.height {
            return Err(format!(
                "image {w}x{h} resized to {} does not cover its bucket {b}",
                assignment.resized
            ));
        }
        Ok(BucketAssignment {
            ar_error: aspect(b) - ar,
            ..assignment
        })
    }
}

fn aspect(r: Resolution) -> f64 {
    f64::from(r.width) / f64::from(r.height)
}

/// Cover-scaling of `size` into `bucket` (the normal-mode rule of spec §3.3 step 2).
fn cover(size: Resolution, bucket: Resolution) -> BucketAssignment {
    let (w, h) = (f64::from(size.width), f64::from(size.height));
    let scale = if w / h > aspect(bucket) {
        f64::from(bucket.height) / h
    } else {
        f64::from(bucket.width) / w
    };
    let side = |x: f64| clamp_u32((x * scale + 0.5).floor() as u64);
    BucketAssignment {
        bucket,
        resized: Resolution::new(side(w), side(h)),
        ar_error: 0.0,
    }
}

/// The SDXL crop box `crop_ltrb` (spec §3.4 step 5), in bucket pixels.
///
/// # Compatibility
/// Reproduces the reference exactly, including its oddity (spec §15 #2): the box describes a
/// letterbox ("fit inside") placement of the original image in the bucket, not the cover
/// crop actually applied, and ignores random crops.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CropLtrb {
    /// `⌊(bw − rw) / 2⌋`.
    pub left: f64,
    /// `⌊(bh − rh) / 2⌋`.
    pub top: f64,
    /// `left + rw`.
    pub right: f64,
    /// `top + rh`.
    pub bottom: f64,
}

impl CropLtrb {
    /// Computes the box from the bucket and the original image size (both W, H).
    pub fn new(bucket: Resolution, original: Resolution) -> Self {
        let (bw, bh) = (f64::from(bucket.width), f64::from(bucket.height));
        let image_ar = f64::from(original.width) / f64::from(original.height.max(1));
        let (rw, rh) = if bw / bh > image_ar {
            (bh * image_ar, bh)
        } else {
            (bw, bw / image_ar)
        };
        let left = ((bw - rw) / 2.0).floor();
        let top = ((bh - rh) / 2.0).floor();
        Self {
            left,
            top,
            right: left + rw,
            bottom: top + rh,
        }
    }

    /// SDXL `crop_top_left` = (int(top), int(left)); with `flipped`, left becomes
    /// `bucket_width − right` first (spec §3.5).
    pub fn crop_top_left(&self, bucket_width: u32, flipped: bool) -> (u32, u32) {
        let left = if flipped {
            f64::from(bucket_width) - self.right
        } else {
            self.left
        };
        (self.top.max(0.0) as u32, left.max(0.0) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(w: u32, h: u32) -> Resolution {
        Resolution::new(w, h)
    }

    #[test]
    fn normalisation_rounds_and_checks() {
        let s = BucketSettings {
            enable_bucket: true,
            min_bucket_reso: 300,
            max_bucket_reso: 1000,
            ..BucketSettings::new(r(512, 512))
        };
        let (n, w) = s.normalized().expect("valid");
        assert_eq!((n.min_bucket_reso, n.max_bucket_reso), (256, 1024));
        assert_eq!(w.len(), 2);
        let bad = BucketSettings {
            min_bucket_reso: 640,
            ..s
        };
        assert!(
            bad.normalized()
                .unwrap_err()
                .contains("min_bucket_reso 640")
        );
    }

    #[test]
    fn no_upscale_keeps_small_images() {
        let sel = BucketSelector::NoUpscale {
            max_area: 512 * 512,
            steps: 64,
        };
        let a = sel.select(r(300, 200)).expect("fits");
        assert_eq!(a.resized, r(300, 200));
        assert_eq!(a.bucket, r(256, 192));
        assert!(sel.select(r(50, 50)).unwrap_err().contains("too small"));
    }
}
