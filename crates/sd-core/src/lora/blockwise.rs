//! Block-wise learning-rate weights and block-wise ranks of a LoRA network (`network_args`
//! `down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`, `block_dims`,
//! `block_alphas`, `conv_block_dims`, `conv_block_alphas`).
//!
//! Pure functions over strings and [`ModuleSpec`]s: [`lr_weights`] builds the full per-block
//! weight vector (25 entries for SD1/SD2 indexed like [`block_index`], 23 for SDXL),
//! [`BlockRanks::new`] the per-block ranks and alphas, and [`select_block_modules`] the modules
//! of one component with those ranks (blocks of rank 0 or LR weight 0 get no module).
//!
//! # Source
//! `../shared/spec/lora-format.md` §5 (block indices), §6.1 (LR weights and presets), §6.2
//! (block dims); sd-scripts `networks/lora.py` (`get_block_lr_weight`, `get_block_dims_and_alphas`,
//! `remove_block_dims_and_alphas`, `LoRANetwork.create_modules`).

use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;

use super::names::{Layer, ModuleKind, ModuleSpec, NetworkOptions, block_index, select_modules};
use super::{LoraError, Result};

/// Number of blocks of the per-block lists: 25 (SD1/SD2, spec §5.1) or 23 (SDXL, §5.2).
pub fn num_blocks(family: ModelFamily) -> usize {
    if family == ModelFamily::Sdxl { 23 } else { 25 }
}

/// Down/up part length n (12 SD1/SD2, 9 SDXL) and mid length m (1 / 3) of the LR weights.
fn part_lengths(family: ModelFamily) -> (usize, usize) {
    if family == ModelFamily::Sdxl {
        (9, 3)
    } else {
        (12, 1)
    }
}

/// The names of the LR-weight presets (spec §6.1).
pub const PRESETS: [&str; 5] = ["sine", "cosine", "linear", "reverse_linear", "zeros"];

/// The `n` weights of a preset `name` or `name+offset` (spec §6.1), e.g. `cosine+.25`.
///
/// With i = 0..n−1: `sine` sin(π/2·i/(n−1)), `cosine` sin(π/2·(n−1−i)/(n−1)), `linear`
/// i/(n−1), `reverse_linear` (n−1−i)/(n−1), `zeros` 0; each plus the offset (text after the
/// first `+`, default 0).
///
/// # Errors
/// [`LoraError::Invalid`] for an unknown preset name or an offset that is no number (the
/// reference crashes on both, spec §6.1 [REF-BUG]).
pub fn preset(text: &str, n: usize) -> Result<Vec<f64>> {
    let (name, offset) = match text.split_once('+') {
        Some((name, off)) => {
            let off = off.trim().parse::<f64>().map_err(|_| {
                LoraError::Invalid(format!(
                    "LR weight preset \"{text}\": the offset after \"+\" must be a number, found \"{off}\""
                ))
            })?;
            (name.trim(), off)
        }
        None => (text.trim(), 0.0),
    };
    let last = n.saturating_sub(1).max(1) as f64;
    let f: fn(f64, f64) -> f64 = match name {
        // The reference's operation order: sin(π·(i/(n−1))/2), so values are bit-identical.
        "sine" => |i, l| (std::f64::consts::PI * (i / l) / 2.0).sin(),
        "cosine" => |i, l| (std::f64::consts::PI * ((l - i) / l) / 2.0).sin(),
        "linear" => |i, l| i / l,
        "reverse_linear" => |i, l| (l - i) / l,
        "zeros" => |_, _| 0.0,
        _ => {
            return Err(LoraError::Invalid(format!(
                "unknown LR weight preset \"{name}\" in \"{text}\": expected a comma-separated list of numbers or one of {}, optionally followed by +offset",
                PRESETS.join(", ")
            )));
        }
    };
    Ok((0..n).map(|i| f(i as f64, last) + offset).collect())
}

/// Parses a comma-separated list of floats; empty items are 0.0 (spec §6.1).
fn float_list(key: &str, text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|s| {
            let s = s.trim();
            if s.is_empty() {
                Ok(0.0)
            } else {
                s.parse::<f64>().map_err(|_| {
                    LoraError::Invalid(format!("{key}: \"{s}\" is not a number (in \"{text}\")"))
                })
            }
        })
        .collect()
}

/// One part (`down`/`up`: list or preset; `mid`: list only), fixed to `len` entries.
fn part(key: &str, text: Option<&str>, len: usize, allow_preset: bool) -> Result<Vec<f64>> {
    let Some(text) = text else {
        return Ok(vec![1.0; len]);
    };
    let mut v = if text.contains(',') || !allow_preset {
        float_list(key, text)?
    } else {
        // A single number without a comma crashes the reference; treat it as "all blocks".
        match text.trim().parse::<f64>() {
            Ok(x) => vec![x; len],
            Err(_) => preset(text, len)?,
        }
    };
    if v.len() > len {
        tracing::warn!(
            "{key} has {} values, only the first {len} are used",
            v.len()
        );
    }
    v.resize(len, 1.0);
    Ok(v)
}

/// The full per-block LR weight vector, or `None` when none of the three parts is given.
///
/// SD1/SD2: `down(12) + mid(1) + up(12)` = 25 entries indexed like [`block_index`]; SDXL:
/// `[1] + down(9) + mid(3) + up(9) + [1]` = 23 entries. Parts not given are all 1.0; lists are
/// truncated or padded with 1.0; every weight ≤ `zero_threshold` (default 0) becomes 0.
///
/// # Errors
/// [`LoraError::Invalid`] for a value that is no number or an unknown preset.
pub fn lr_weights(
    family: ModelFamily,
    down: Option<&str>,
    mid: Option<&str>,
    up: Option<&str>,
    zero_threshold: Option<f64>,
) -> Result<Option<Vec<f64>>> {
    if down.is_none() && mid.is_none() && up.is_none() {
        return Ok(None);
    }
    let (n, m) = part_lengths(family);
    let down = part("down_lr_weight", down, n, true)?;
    let mid = part("mid_lr_weight", mid, m, false)?;
    let up = part("up_lr_weight", up, n, true)?;
    let mut all = Vec::with_capacity(num_blocks(family));
    if family == ModelFamily::Sdxl {
        all.push(1.0);
    }
    all.extend(down);
    all.extend(mid);
    all.extend(up);
    if family == ModelFamily::Sdxl {
        all.push(1.0);
    }
    let threshold = zero_threshold.unwrap_or(0.0);
    for w in &mut all {
        if *w <= threshold {
            *w = 0.0;
        }
    }
    Ok(Some(all))
}

/// Per-block ranks and alphas of the U-Net modules (spec §6.2).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockRanks {
    /// Rank of Linear / 1×1 modules per block (0 = no module).
    pub dims: Vec<usize>,
    /// Their alphas (0 = alpha equals rank).
    pub alphas: Vec<f32>,
    /// Rank and alpha of 3×3 conv modules per block; `None` = no 3×3 modules.
    pub conv: Option<(Vec<usize>, Vec<f32>)>,
}

/// The block-wise options as given in `network_args` (already split into numbers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockArgs {
    /// `block_dims`.
    pub block_dims: Option<Vec<usize>>,
    /// `block_alphas`.
    pub block_alphas: Option<Vec<f32>>,
    /// `conv_block_dims`.
    pub conv_block_dims: Option<Vec<usize>>,
    /// `conv_block_alphas`.
    pub conv_block_alphas: Option<Vec<f32>>,
}

impl BlockArgs {
    /// True when no block-wise rank option is given.
    pub fn is_empty(&self) -> bool {
        self.block_dims.is_none()
            && self.block_alphas.is_none()
            && self.conv_block_dims.is_none()
            && self.conv_block_alphas.is_none()
    }
}

fn check_len<T>(family: ModelFamily, key: &str, v: &[T]) -> Result<()> {
    let n = num_blocks(family);
    if v.len() != n {
        return Err(LoraError::Invalid(format!(
            "{key} needs exactly {n} values for {family} (blocks: {}), found {}",
            if n == 25 {
                "IN00..IN11, MID, OUT00..OUT11"
            } else {
                "time/label embedding, input_blocks 0..8, middle_block 0..2, output_blocks 0..8, out"
            },
            v.len()
        )));
    }
    Ok(())
}

impl BlockRanks {
    /// Block mode ranks, or `None` when neither `block_dims` nor any LR weight is given (then
    /// the network uses `network_dim` / `conv_dim` everywhere, spec §6.2).
    ///
    /// Missing `block_dims` → `network_dim` per block; missing `block_alphas` → `network_alpha`;
    /// `conv_block_dims` absent but `conv_dim` given → `conv_dim`/`conv_alpha` per block;
    /// missing `conv_block_alphas` → `conv_alpha` (1.0). A block whose LR weight is 0 gets rank
    /// 0 (no module) in both lists.
    ///
    /// # Errors
    /// [`LoraError::Invalid`] when a list does not have [`num_blocks`] entries.
    pub fn new(
        family: ModelFamily,
        opts: &NetworkOptions,
        args: &BlockArgs,
        lr_weights: Option<&[f64]>,
    ) -> Result<Option<Self>> {
        if args.block_dims.is_none() && lr_weights.is_none() {
            if !args.is_empty() {
                return Err(LoraError::Invalid(
                    "block_alphas, conv_block_dims and conv_block_alphas need block_dims (or a block LR weight)".into(),
                ));
            }
            return Ok(None);
        }
        let n = num_blocks(family);
        let dims = match &args.block_dims {
            Some(v) => {
                check_len(family, "block_dims", v)?;
                v.clone()
            }
            None => vec![opts.network_dim; n],
        };
        let alphas = match &args.block_alphas {
            Some(v) => {
                check_len(family, "block_alphas", v)?;
                v.clone()
            }
            None => vec![opts.network_alpha; n],
        };
        let conv_alpha = opts.conv_alpha.unwrap_or(1.0);
        let conv = match (&args.conv_block_dims, opts.conv_dim) {
            (Some(d), _) => {
                check_len(family, "conv_block_dims", d)?;
                let a = match &args.conv_block_alphas {
                    Some(a) => {
                        check_len(family, "conv_block_alphas", a)?;
                        a.clone()
                    }
                    None => vec![conv_alpha; n],
                };
                Some((d.clone(), a))
            }
            (None, Some(c)) => Some((vec![c; n], vec![conv_alpha; n])),
            (None, None) => None,
        };
        let mut out = BlockRanks { dims, alphas, conv };
        if let Some(w) = lr_weights {
            for (b, &w) in w.iter().enumerate().take(n) {
                if w == 0.0 {
                    out.dims[b] = 0;
                    if let Some((d, _)) = &mut out.conv {
                        d[b] = 0;
                    }
                }
            }
        }
        Ok(Some(out))
    }
}

/// All block-wise `network_args` of a training run, as given (the family decides the lengths,
/// so they are resolved once the model family is known).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BlockwiseOptions {
    /// `block_dims` & co.
    pub ranks: BlockArgs,
    /// `down_lr_weight` (list or preset).
    pub down_lr_weight: Option<String>,
    /// `mid_lr_weight` (list).
    pub mid_lr_weight: Option<String>,
    /// `up_lr_weight` (list or preset).
    pub up_lr_weight: Option<String>,
    /// `block_lr_zero_threshold` (default 0).
    pub block_lr_zero_threshold: Option<f64>,
}

impl BlockwiseOptions {
    /// True when no block-wise option is given.
    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
            && self.down_lr_weight.is_none()
            && self.mid_lr_weight.is_none()
            && self.up_lr_weight.is_none()
    }

    /// The per-block ranks (for [`select_block_modules`]) and LR weights (for the optimiser's
    /// per-block parameter groups) of `family`; each `None` when not in use.
    ///
    /// # Errors
    /// The errors of [`lr_weights`] and [`BlockRanks::new`].
    pub fn resolve(
        &self,
        family: ModelFamily,
        opts: &NetworkOptions,
    ) -> Result<(Option<BlockRanks>, Option<Vec<f64>>)> {
        let weights = lr_weights(
            family,
            self.down_lr_weight.as_deref(),
            self.mid_lr_weight.as_deref(),
            self.up_lr_weight.as_deref(),
            self.block_lr_zero_threshold,
        )?;
        let ranks = BlockRanks::new(family, opts, &self.ranks, weights.as_deref())?;
        Ok((ranks, weights))
    }
}

/// The modules of one component in block mode: like [`select_modules`] (same targets, names
/// and order; ResNet/sampler containers are targeted when conv ranks exist), but every U-Net
/// module takes the rank and alpha of its block (Linear/1×1 from `dims`/`alphas`, 3×3 from
/// `conv`) and is left out when that rank is 0. Text-encoder modules keep `network_dim` /
/// `network_alpha`.
///
/// # Errors
/// The errors of [`select_modules`]; [`LoraError::Invalid`] for a U-Net module outside the
/// numbered blocks (not possible for the standard architectures).
pub fn select_block_modules(
    family: ModelFamily,
    component: Component,
    layers: &[Layer],
    opts: &NetworkOptions,
    blocks: &BlockRanks,
) -> Result<Vec<ModuleSpec>> {
    if component != Component::Unet {
        return select_modules(family, component, layers, opts);
    }
    // Select every candidate with rank 1, then assign the block ranks.
    let candidates = NetworkOptions {
        network_dim: 1,
        network_alpha: 1.0,
        conv_dim: blocks.conv.as_ref().map(|_| 1),
        conv_alpha: Some(1.0),
    };
    let mut out = Vec::new();
    for mut spec in select_modules(family, component, layers, &candidates)? {
        let b = usize::try_from(block_index(family, &spec.name))
            .ok()
            .filter(|&b| b < blocks.dims.len())
            .ok_or_else(|| {
                LoraError::Invalid(format!(
                    "U-Net module \"{}\" lies in no numbered block",
                    spec.name
                ))
            })?;
        let (rank, alpha) = match spec.kind() {
            ModuleKind::Linear | ModuleKind::Conv1x1 => (blocks.dims[b], blocks.alphas[b]),
            ModuleKind::Conv => match &blocks.conv {
                Some((d, a)) => (d[b], a[b]),
                None => continue,
            },
        };
        if rank == 0 {
            continue;
        }
        spec.rank = rank;
        spec.alpha = if alpha == 0.0 { rank as f32 } else { alpha };
        out.push(spec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_formulas() {
        let cos = preset("cosine", 12).expect("valid preset");
        assert!((cos[0] - 1.0).abs() < 1e-12 && cos[11].abs() < 1e-12);
        let lin = preset("linear+-0.5", 12).expect("valid preset");
        assert!((lin[0] + 0.5).abs() < 1e-12 && (lin[11] - 0.5).abs() < 1e-12);
        assert!(preset("cosin", 12).is_err());
        assert!(preset("sine+x", 12).is_err());
    }

    #[test]
    fn sdxl_vector_layout() {
        let w = lr_weights(ModelFamily::Sdxl, Some("zeros"), None, None, None)
            .expect("valid")
            .expect("given");
        assert_eq!(w.len(), 23);
        assert_eq!(w[0], 1.0);
        assert!(w[1..10].iter().all(|&x| x == 0.0));
        assert!(w[10..].iter().all(|&x| x == 1.0));
    }
}
