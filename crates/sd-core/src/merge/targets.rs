//! Which single-file tensor (and which row block of it) each LoRA module modifies.
//!
//! Built from the family's key table ([`KeyMap`]), never from string rewriting: every
//! U-Net / text-encoder weight entry of the table gives one LoRA name (prefix + module path
//! with `.` → `_`; Diffusers paths for SD1/SD2 U-Nets and all text encoders, single-file
//! paths for the SDXL U-Net, spec lora-format §4). OpenCLIP `in_proj_weight` entries
//! ([`Op::ConcatRows`]) give three names, one per row block (q, k, v).
//!
//! # Source
//! `../shared/spec/lora-format.md` §4, §8; checked against the full-size manifests
//! `tests/fixtures/manifests/<model>.lora_modules.tsv.gz` (`crates/sd-core/tests/merge_targets.rs`).

use std::collections::BTreeMap;

use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, KeyMap, Op};

use crate::lora::names::lora_prefix;

/// The tensor a LoRA module modifies in a single-file checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Single-file key in the key table's canonical spelling (see
    /// `sd_formats::keymap::normalize_ldm_key`).
    pub key: String,
    /// Diffusers component of the weight.
    pub component: Component,
    /// `Some((block, blocks))` when the module owns rows `block·h..(block+1)·h` of a tensor
    /// whose rows are `blocks` equal blocks (OpenCLIP `in_proj_weight`: q, k, v); `None` for
    /// the whole tensor.
    pub rows: Option<(usize, usize)>,
}

impl Target {
    /// The row range `[start, end)` inside a tensor with `rows` rows, or `None` for all rows
    /// or when `rows` is not divisible by the block count.
    pub fn row_range(&self, rows: usize) -> Option<(usize, usize)> {
        let (b, n) = self.rows?;
        if n == 0 || !rows.is_multiple_of(n) {
            return None;
        }
        let h = rows / n;
        Some((b * h, (b + 1) * h))
    }
}

/// LoRA module name → [`Target`] for every U-Net and text-encoder weight of `map`.
///
/// Names that two entries would share (impossible for the SD tables) are left out rather
/// than guessed.
pub fn lora_targets(map: &KeyMap) -> BTreeMap<String, Target> {
    let family = map.family();
    let mut out: BTreeMap<String, Target> = BTreeMap::new();
    let mut clashes = Vec::new();
    for e in map.entries() {
        if e.component == Component::Vae {
            continue;
        }
        let blocks = match e.op {
            Op::Copy => None,
            Op::ConcatRows => Some(e.diffusers_keys.len()),
            _ => continue,
        };
        let Ok(prefix) = lora_prefix(family, e.component) else {
            continue;
        };
        for (i, dk) in e.diffusers_keys.iter().enumerate() {
            let Some(path) = dk.strip_suffix(".weight") else {
                continue;
            };
            let named = if family == ModelFamily::Sdxl && e.component == Component::Unet {
                match e
                    .ldm_key
                    .strip_prefix("model.diffusion_model.")
                    .and_then(|k| k.strip_suffix(".weight"))
                {
                    Some(p) => p,
                    None => continue,
                }
            } else {
                path
            };
            let name = format!("{prefix}_{}", named.replace('.', "_"));
            let target = Target {
                key: e.ldm_key.clone(),
                component: e.component,
                rows: blocks.map(|n| (i, n)),
            };
            if out.insert(name.clone(), target).is_some() {
                clashes.push(name);
            }
        }
    }
    for name in clashes {
        tracing::debug!(%name, "LoRA name given by two table entries; left out");
        out.remove(&name);
    }
    out
}
