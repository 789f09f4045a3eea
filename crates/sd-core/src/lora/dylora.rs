//! DyLoRA (`networks.dylora`): the per-forward rank draw and forward of training, and the
//! split of a DyLoRA file into fixed-rank LoRA files (`extract-lora-from-dylora`).
//!
//! A DyLoRA network is stored like a plain LoRA of its full rank R (spec §7): `lora_down`
//! `[R, in(, kh, kw)]`, `lora_up` `[out, R(, 1, 1)]`, so [`super::LoraNetwork`] keeps its
//! ordinary modules; during training each module's forward goes through [`forward_delta`]
//! with a slice start drawn by [`RankSampler`].
//!
//! # Source
//! `../shared/spec/lora-format.md` §7; `../shared/spec/tools.md` §5; sd-scripts
//! `networks/dylora.py` (`DyLoRAModule.forward`), `networks/extract_lora_from_dylora.py`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use sd_formats::dtype::Dtype;
use sd_formats::hashes::sshs_hashes;
use sd_formats::safetensors::{TensorToWrite, write_safetensors};
use sd_formats::tensor_file::TensorFile;
use tch::Tensor;

use super::module::LoraModule;
use super::names::LayerKind;
use super::{LoraError, Result};

/// Draws the trainable slice of each DyLoRA module forward call (spec §7): t uniform in
/// {0, …, R−1}, b = t − (t mod unit), so b ∈ {0, unit, …, R−unit} with probability unit/R each.
///
/// # Compatibility
/// The reference draws with Python's `random`; we use a ChaCha8 generator seeded from the
/// training seed, so the sequence of ranks differs but has the same distribution.
#[derive(Debug, Clone)]
pub struct RankSampler {
    unit: usize,
    rng: ChaCha8Rng,
}

impl RankSampler {
    /// A sampler for `unit` (≥ 1) seeded with `seed`.
    pub fn new(unit: usize, seed: u64) -> Self {
        RankSampler {
            unit: unit.max(1),
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The rank unit.
    pub fn unit(&self) -> usize {
        self.unit
    }

    /// Start b of the trainable slice `b .. b + unit` for a module of rank `rank`.
    pub fn draw(&mut self, rank: usize) -> usize {
        if rank <= self.unit {
            return 0;
        }
        let t = (self.rng.next_u64() % rank as u64) as usize;
        (t - t % self.unit).min(rank - self.unit)
    }
}

/// `t` with gradients only for `start .. start + len` along `dim` (the rest detached).
fn train_slice(t: &Tensor, dim: i64, start: i64, len: i64) -> Tensor {
    let total = t.size()[dim as usize];
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(t.narrow(dim, 0, start).detach());
    }
    parts.push(t.narrow(dim, start, len));
    if start + len < total {
        parts.push(t.narrow(dim, start + len, total - start - len).detach());
    }
    Tensor::cat(&parts, dim)
}

/// The DyLoRA training forward of one module: ΔY = up·down·x with **all** R ranks, only ranks
/// `b .. b+unit` receiving gradients, scaled by (alpha/R)·√(R/(b+unit)); the multiplier is not
/// applied (spec §7, as the reference).
///
/// # Shapes
/// As [`LoraModule::forward_delta`]: Linear `x [..., in]` → `[..., out]`; Conv2d
/// `x [B, in, H, W]` → `[B, out, H', W']` (1×1 convs are computed as convolutions, which equals
/// the reference's token-wise matrix product).
///
/// # Compatibility
/// Frozen ranks get a zero gradient instead of none, so optimisers with momentum or weight
/// decay still move them slightly between their trained steps (the reference's per-rank
/// parameters are skipped by the optimiser when frozen).
pub fn forward_delta(m: &LoraModule, x: &Tensor, b: usize, unit: usize) -> Tensor {
    let r = m.rank();
    let unit = unit.min(r).max(1);
    let b = b.min(r - unit);
    let down = train_slice(&m.lora_down, 0, b as i64, unit as i64);
    let up = train_slice(&m.lora_up, 1, b as i64, unit as i64);
    let lx = match m.layer() {
        LayerKind::Linear { .. } => x.linear(&down, None::<Tensor>).linear(&up, None::<Tensor>),
        LayerKind::Conv2d {
            stride, padding, ..
        } => x
            .conv2d(
                &down,
                None::<Tensor>,
                [stride[0] as i64, stride[1] as i64],
                [padding[0] as i64, padding[1] as i64],
                [1, 1],
                1,
            )
            .conv2d(&up, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1),
    };
    lx * (m.scale() * (r as f64 / (b + unit) as f64).sqrt())
}

/// One fixed-rank LoRA cut out of a DyLoRA file.
#[derive(Debug, Clone)]
pub struct DyloraSplit {
    /// Rank k of this split (a multiple of the unit, below the full rank).
    pub rank: usize,
    /// Tensors (name, dtype, shape, bytes): `lora_down` first k rows, `lora_up` first k
    /// columns, every other key unchanged.
    pub tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
    /// The input metadata with `ss_network_dim` = k and `ss_training_comment` =
    /// `split from DyLoRA, rank <R> to <k>; <original comment>` (without hashes).
    pub metadata: BTreeMap<String, String>,
}

/// The DyLoRA unit recorded in `ss_network_args` (`{"unit": "4"}`), if any.
pub fn unit_from_metadata(metadata: &BTreeMap<String, String>) -> Option<usize> {
    let args: serde_json::Value = serde_json::from_str(metadata.get("ss_network_args")?).ok()?;
    match args.get("unit")? {
        serde_json::Value::String(s) => s.trim().parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| usize::try_from(n).ok()),
        _ => None,
    }
}

/// First `k` entries along dim 1 of a row-major tensor of `shape` (`[out, R, …]`).
fn first_columns(bytes: &[u8], shape: &[usize], elem: usize, k: usize) -> Vec<u8> {
    let outer = shape[0];
    let cols = shape[1];
    let inner: usize = shape[2..].iter().product::<usize>() * elem;
    let mut out = Vec::with_capacity(outer * k * inner);
    for o in 0..outer {
        let start = o * cols * inner;
        out.extend_from_slice(&bytes[start..start + k * inner]);
    }
    out
}

/// Cuts `file` into LoRAs of rank unit, 2·unit, … below the full rank R (the maximum
/// `lora_down` dim 0; spec tools.md §5.2). Tensors keep their dtype and exact values; alphas
/// are copied unchanged. A module whose own rank is below k keeps all its ranks.
///
/// # Errors
/// [`LoraError::Invalid`] for unit 0, a file without `lora_down` keys, a full rank that is no
/// multiple of `unit`, or a `lora_down`/`lora_up` tensor of fewer than 2 dimensions;
/// [`LoraError::Format`] when a tensor cannot be read.
pub fn split(file: &TensorFile, unit: usize) -> Result<Vec<DyloraSplit>> {
    let path = file.path().to_path_buf();
    if unit == 0 {
        return Err(LoraError::Invalid("--unit must be at least 1".into()));
    }
    let names = file.sorted_names();
    let mut full = 0usize;
    for name in &names {
        let info = file.info(name).expect("listed names have info");
        if name.contains("lora_down") || name.contains("lora_up") {
            if info.shape.len() < 2 {
                return Err(LoraError::ShapeMismatch {
                    path: path.clone(),
                    key: (*name).to_owned(),
                    expected: "at least 2 dimensions".into(),
                    found: info.shape.iter().map(|&d| d as i64).collect(),
                });
            }
            if name.contains("lora_down") {
                full = full.max(info.shape[0]);
            }
        }
    }
    if full == 0 {
        return Err(LoraError::Invalid(format!(
            "{}: no lora_down weights: not a DyLoRA/LoRA file",
            path.display()
        )));
    }
    if !full.is_multiple_of(unit) {
        tracing::warn!(
            "{}: the full rank {full} is no multiple of --unit {unit}",
            path.display()
        );
    }
    let comment = file
        .metadata()
        .get("ss_training_comment")
        .cloned()
        .unwrap_or_default();
    let mut out = Vec::new();
    let mut k = unit;
    while k < full {
        let mut tensors = Vec::with_capacity(names.len());
        for name in &names {
            let info = file.info(name).expect("listed names have info");
            let data = file.data(name)?;
            let elem = info.dtype.size();
            let mut shape = info.shape.clone();
            let bytes = if name.contains("lora_down") && shape[0] > k {
                let row: usize = shape[1..].iter().product::<usize>() * elem;
                shape[0] = k;
                data[..k * row].to_vec()
            } else if name.contains("lora_up") && shape[1] > k {
                let b = first_columns(data, &shape, elem, k);
                shape[1] = k;
                b
            } else {
                data.to_vec()
            };
            tensors.push(((*name).to_owned(), info.dtype, shape, bytes));
        }
        let mut metadata = file.metadata().clone();
        metadata.remove("sshs_model_hash");
        metadata.remove("sshs_legacy_hash");
        metadata.insert(
            "ss_training_comment".into(),
            format!("split from DyLoRA, rank {full} to {k}; {comment}"),
        );
        metadata.insert("ss_network_dim".into(), k.to_string());
        out.push(DyloraSplit {
            rank: k,
            tensors,
            metadata,
        });
        k += unit;
    }
    Ok(out)
}

/// `<save_to without extension>-<k as 4 digits>.<extension>` (spec tools.md §5.2 step 4).
pub fn split_path(save_to: &Path, rank: usize) -> PathBuf {
    let stem = save_to
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match save_to.extension() {
        Some(ext) => format!("{stem}-{rank:04}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{rank:04}"),
    };
    save_to.with_file_name(name)
}

impl DyloraSplit {
    /// Writes the split as safetensors with its own `sshs_model_hash` / `sshs_legacy_hash`
    /// (computed over this file's tensors; the reference stores the previous split's hashes,
    /// spec tools.md §5.3), atomically. Returns the metadata written.
    ///
    /// # Errors
    /// [`LoraError::Format`] when writing fails.
    pub fn save(&self, path: &Path) -> Result<BTreeMap<String, String>> {
        let tensors: Vec<TensorToWrite<'_>> = self
            .tensors
            .iter()
            .map(|(n, d, s, b)| {
                TensorToWrite::new(n.clone(), *d, s.clone(), Cow::from(b.as_slice()))
            })
            .collect();
        let mut metadata = self.metadata.clone();
        let hashes = sshs_hashes(path, &tensors, &metadata)?;
        metadata.insert("sshs_model_hash".into(), hashes.model_hash);
        metadata.insert("sshs_legacy_hash".into(), hashes.legacy_hash);
        write_safetensors(path, &tensors, Some(&metadata))?;
        Ok(metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_draws_multiples_of_unit() {
        let mut s = RankSampler::new(4, 7);
        let mut seen = [0usize; 16];
        for _ in 0..4000 {
            let b = s.draw(16);
            assert_eq!(b % 4, 0);
            seen[b] += 1;
        }
        for b in [0, 4, 8, 12] {
            assert!(seen[b] > 800, "slice {b} drawn {} times", seen[b]);
        }
    }

    #[test]
    fn split_names() {
        assert_eq!(
            split_path(Path::new("out/dy.safetensors"), 4),
            PathBuf::from("out/dy-0004.safetensors")
        );
    }

    #[test]
    fn columns() {
        // [2, 3, 1] of u8 elements: rows 0..2, columns 0..3
        let b = first_columns(&[1, 2, 3, 4, 5, 6], &[2, 3, 1], 1, 2);
        assert_eq!(b, vec![1, 2, 4, 5]);
    }
}
