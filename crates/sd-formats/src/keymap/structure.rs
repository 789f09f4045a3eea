//! Structural parameters of a model, read from its keys (never from hard-coded full-size
//! configs), so the same tables serve full-size models and the tiny test models.

use std::collections::BTreeSet;

use super::Component;
use super::error::{KeyMapError, Result};
use crate::family::ModelFamily;

/// Single-file prefix of the U-Net.
pub(crate) const LDM_UNET: &str = "model.diffusion_model.";
/// Single-file prefix of the VAE.
pub(crate) const LDM_VAE: &str = "first_stage_model.";

/// U-Net structure shared by the LDM/SGM and Diffusers layouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetStructure {
    /// Number of resolution levels (down blocks = up blocks): 4 for SD1/SD2, 3 for SDXL.
    pub levels: usize,
    /// ResNet blocks per down level (`layers_per_block`); up levels have one more.
    pub layers_per_block: usize,
    /// Transformer blocks per attention module at each down level; 0 = no attention there.
    pub down_depths: Vec<usize>,
    /// Transformer blocks of the mid-block attention; 0 = no mid attention.
    pub mid_depth: usize,
    /// Transformer blocks per attention module at each up level (index 0 = lowest
    /// resolution); 0 = no attention there.
    pub up_depths: Vec<usize>,
    /// SDXL's additional embedding (`label_emb.0` <-> `add_embedding`).
    pub add_embedding: bool,
}

/// Layout of a text encoder in the single file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderLayout {
    /// Hugging Face CLIP names under the prefix (`<prefix>text_model.…`): SD1, SDXL TE1.
    HfClip,
    /// OpenCLIP names (`token_embedding`, `transformer.resblocks.N.attn.in_proj_weight`, …):
    /// SD2, SDXL TE2.
    OpenClip,
}

/// Text-encoder structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextEncoderStructure {
    /// Diffusers component.
    pub component: Component,
    /// Single-file layout.
    pub layout: TextEncoderLayout,
    /// Single-file key prefix, e.g. `cond_stage_model.model.`.
    pub ldm_prefix: &'static str,
    /// Transformer layers in the single file (SD2: 24 resblocks).
    pub ldm_layers: usize,
    /// Transformer layers in Diffusers (SD2: 23; Diffusers does not keep the last resblock,
    /// which SD2 never runs). Equal to `ldm_layers` otherwise.
    pub diffusers_layers: usize,
}

/// VAE structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaeStructure {
    /// Number of resolution levels (4 for every SD VAE).
    pub levels: usize,
    /// ResNet blocks per encoder level; decoder levels have one more.
    pub layers_per_block: usize,
    /// Whether the mid blocks have an attention (`mid_block_add_attention`).
    pub mid_attention: bool,
}

/// Structure of every component present in a checkpoint. Absent components are `None` / not
/// listed, and the key table then has no entries for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStructure {
    /// U-Net, if present.
    pub unet: Option<UnetStructure>,
    /// Text encoders present, in component order.
    pub text_encoders: Vec<TextEncoderStructure>,
    /// VAE, if present.
    pub vae: Option<VaeStructure>,
}

/// (component, single-file layout, single-file prefix) of each text encoder of a family.
pub(crate) fn text_encoder_specs(
    family: ModelFamily,
) -> &'static [(Component, TextEncoderLayout, &'static str)] {
    match family {
        ModelFamily::Sd1 => &[(
            Component::TextEncoder,
            TextEncoderLayout::HfClip,
            "cond_stage_model.transformer.",
        )],
        ModelFamily::Sd2 => &[(
            Component::TextEncoder,
            TextEncoderLayout::OpenClip,
            "cond_stage_model.model.",
        )],
        ModelFamily::Sdxl => &[
            (
                Component::TextEncoder,
                TextEncoderLayout::HfClip,
                "conditioner.embedders.0.transformer.",
            ),
            (
                Component::TextEncoder2,
                TextEncoderLayout::OpenClip,
                "conditioner.embedders.1.model.",
            ),
        ],
    }
}

/// Single-file layers that Diffusers drops at the end of a text encoder (SD2: 1).
fn dropped_layers(family: ModelFamily, component: Component) -> usize {
    match (family, component) {
        (ModelFamily::Sd2, Component::TextEncoder) => 1,
        _ => 0,
    }
}

/// Distinct integers that follow `prefix` in `keys` (the segment up to the next `.`).
fn indices_after<'a>(keys: impl IntoIterator<Item = &'a str>, prefix: &str) -> BTreeSet<usize> {
    keys.into_iter()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// Count = max index + 1 (0 when none).
fn count_after<'a>(keys: impl IntoIterator<Item = &'a str>, prefix: &str) -> usize {
    indices_after(keys, prefix).last().map_or(0, |&m| m + 1)
}

impl ModelStructure {
    /// Reads the structure from single-file keys (with their `model.diffusion_model.`,
    /// `cond_stage_model.`/`conditioner.embedders.N.` and `first_stage_model.` prefixes).
    ///
    /// # Errors
    /// [`KeyMapError::Structure`] when the U-Net block numbering does not fit any layout.
    pub fn from_ldm_keys<'a>(
        family: ModelFamily,
        keys: impl IntoIterator<Item = &'a str>,
        path: &str,
    ) -> Result<Self> {
        let keys: Vec<&str> = keys.into_iter().collect();
        let unet_keys: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(LDM_UNET))
            .collect();
        let unet = unet_from_ldm(&unet_keys, path)?;

        let mut text_encoders = Vec::new();
        for &(component, layout, prefix) in text_encoder_specs(family) {
            let te: Vec<&str> = keys.iter().filter_map(|k| k.strip_prefix(prefix)).collect();
            if te.is_empty() {
                continue;
            }
            let ldm_layers = match layout {
                TextEncoderLayout::HfClip => {
                    count_after(te.iter().copied(), "text_model.encoder.layers.")
                }
                TextEncoderLayout::OpenClip => {
                    count_after(te.iter().copied(), "transformer.resblocks.")
                }
            };
            let dropped = dropped_layers(family, component);
            if ldm_layers <= dropped {
                return Err(KeyMapError::Structure {
                    path: path.to_string(),
                    message: format!(
                        "{component} under {prefix:?} has {ldm_layers} transformer layers"
                    ),
                });
            }
            text_encoders.push(TextEncoderStructure {
                component,
                layout,
                ldm_prefix: prefix,
                ldm_layers,
                diffusers_layers: ldm_layers - dropped,
            });
        }

        let vae_keys: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(LDM_VAE))
            .collect();
        let vae = if vae_keys.iter().any(|k| k.starts_with("encoder.down.")) {
            Some(VaeStructure {
                levels: count_after(vae_keys.iter().copied(), "encoder.down."),
                layers_per_block: count_after(vae_keys.iter().copied(), "encoder.down.0.block."),
                mid_attention: vae_keys
                    .iter()
                    .any(|k| k.starts_with("encoder.mid.attn_1.")),
            })
        } else {
            None
        };
        Ok(Self {
            unet,
            text_encoders,
            vae,
        })
    }

    /// Reads the structure from Diffusers keys, given as (component, key) pairs.
    ///
    /// # Errors
    /// [`KeyMapError::Structure`] when a text encoder has no layers.
    pub fn from_diffusers_keys<'a>(
        family: ModelFamily,
        keys: impl IntoIterator<Item = (Component, &'a str)>,
        path: &str,
    ) -> Result<Self> {
        let mut per: [Vec<&str>; 4] = Default::default();
        for (c, k) in keys {
            per[c as usize].push(k);
        }
        let unet_keys = &per[Component::Unet as usize];
        let unet = if unet_keys.iter().any(|k| k.starts_with("down_blocks.")) {
            let u = unet_keys.iter().copied();
            let levels = count_after(u.clone(), "down_blocks.");
            Some(UnetStructure {
                levels,
                layers_per_block: count_after(u.clone(), "down_blocks.0.resnets."),
                down_depths: (0..levels)
                    .map(|i| {
                        count_after(
                            u.clone(),
                            &format!("down_blocks.{i}.attentions.0.transformer_blocks."),
                        )
                    })
                    .collect(),
                mid_depth: count_after(u.clone(), "mid_block.attentions.0.transformer_blocks."),
                up_depths: (0..levels)
                    .map(|i| {
                        count_after(
                            u.clone(),
                            &format!("up_blocks.{i}.attentions.0.transformer_blocks."),
                        )
                    })
                    .collect(),
                add_embedding: unet_keys.iter().any(|k| k.starts_with("add_embedding.")),
            })
        } else {
            None
        };

        let mut text_encoders = Vec::new();
        for &(component, layout, prefix) in text_encoder_specs(family) {
            let te = &per[component as usize];
            if te.is_empty() {
                continue;
            }
            let diffusers_layers = count_after(te.iter().copied(), "text_model.encoder.layers.");
            if diffusers_layers == 0 {
                return Err(KeyMapError::Structure {
                    path: path.to_string(),
                    message: format!("{component} has no text_model.encoder.layers.* keys"),
                });
            }
            text_encoders.push(TextEncoderStructure {
                component,
                layout,
                ldm_prefix: prefix,
                ldm_layers: diffusers_layers + dropped_layers(family, component),
                diffusers_layers,
            });
        }

        let vae_keys = &per[Component::Vae as usize];
        let vae = if vae_keys
            .iter()
            .any(|k| k.starts_with("encoder.down_blocks."))
        {
            let v = vae_keys.iter().copied();
            Some(VaeStructure {
                levels: count_after(v.clone(), "encoder.down_blocks."),
                layers_per_block: count_after(v.clone(), "encoder.down_blocks.0.resnets."),
                mid_attention: vae_keys
                    .iter()
                    .any(|k| k.starts_with("encoder.mid_block.attentions.0.")),
            })
        } else {
            None
        };
        Ok(Self {
            unet,
            text_encoders,
            vae,
        })
    }
}

/// U-Net structure from LDM keys without the `model.diffusion_model.` prefix.
///
/// Numbering: `input_blocks.0` is `conv_in`; down level `i` resnet `j` is
/// `input_blocks.{(L+1)i + j + 1}`; the downsampler of level `i` is `input_blocks.{(L+1)(i+1)}.0.op`.
/// So the first `…op` block gives `L` and the highest input block `(L+1)·levels − 1`.
fn unet_from_ldm(keys: &[&str], path: &str) -> Result<Option<UnetStructure>> {
    let inputs = indices_after(keys.iter().copied(), "input_blocks.");
    let Some(&max_in) = inputs.last() else {
        return Ok(None);
    };
    let first_op = inputs
        .iter()
        .copied()
        .find(|n| keys.contains(&format!("input_blocks.{n}.0.op.weight").as_str()));
    let layers = match first_op {
        Some(n) if n >= 2 => n - 1,
        Some(n) => {
            return Err(KeyMapError::Structure {
                path: path.to_string(),
                message: format!("downsampler at input_blocks.{n}, expected index 2 or more"),
            });
        }
        None => max_in,
    };
    if layers == 0 || (max_in + 1) % (layers + 1) != 0 {
        return Err(KeyMapError::Structure {
            path: path.to_string(),
            message: format!(
                "input_blocks 0..={max_in} do not form levels of {layers} resnets plus a downsampler"
            ),
        });
    }
    let levels = (max_in + 1) / (layers + 1);
    let it = || keys.iter().copied();
    Ok(Some(UnetStructure {
        levels,
        layers_per_block: layers,
        down_depths: (0..levels)
            .map(|i| {
                let n = (layers + 1) * i + 1;
                count_after(it(), &format!("input_blocks.{n}.1.transformer_blocks."))
            })
            .collect(),
        mid_depth: count_after(it(), "middle_block.1.transformer_blocks."),
        up_depths: (0..levels)
            .map(|i| {
                let n = (layers + 1) * i;
                count_after(it(), &format!("output_blocks.{n}.1.transformer_blocks."))
            })
            .collect(),
        add_embedding: keys.iter().any(|k| k.starts_with("label_emb.")),
    }))
}
