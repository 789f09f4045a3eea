//! Other trainers' LoRA module spellings → kohya (sd-scripts) module names.
//!
//! Handled (spec §10.3, §4.4): Diffusers/PEFT (`unet.<path>.lora_A.weight`, `text_encoder.…`,
//! `text_encoder_2.…`, raw `base_model.model.` dumps), the older Diffusers attention-processor
//! spelling (`…attn1.processor.to_q_lora.down.weight`, `…q_proj.lora_linear_layer.down.weight`,
//! `…proj_in.lora.down.weight`), ComfyUI-style dotted single-file paths
//! (`diffusion_model.input_blocks.…`, `text_encoders.clip_l.transformer.…`), and SDXL kohya
//! files with Diffusers-style U-Net names (`lora_unet_down_blocks_…`). Every U-Net path goes
//! through the key tables ([`UnetPathMap`]); names the tables do not know are reported, never
//! passed through.
//!
//! # Source
//! `../shared/spec/lora-format.md` §10; the pairings were checked against
//! `tests/fixtures/manifests/*.lora_spellings.tsv.gz` (produced by diffusers' converters).

use std::collections::HashMap;

use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;
use sd_formats::lora::KeyStyle;

use super::names::{UnetPathMap, lora_prefix};

/// Converts module names of one family to kohya names.
#[derive(Debug, Clone)]
pub struct NameConverter {
    family: ModelFamily,
    paths: UnetPathMap,
    /// Underscored Diffusers path → underscored SAI path (SDXL only).
    sdxl_underscored: HashMap<String, String>,
}

impl NameConverter {
    /// Builds the tables for `family` (SD1 and SD2 share all names).
    pub fn new(family: ModelFamily) -> Self {
        let paths = UnetPathMap::superset(family);
        let sdxl_underscored = if family == ModelFamily::Sdxl {
            paths
                .pairs()
                .map(|(d, l)| (d.replace('.', "_"), l.replace('.', "_")))
                .collect()
        } else {
            HashMap::new()
        };
        NameConverter {
            family,
            paths,
            sdxl_underscored,
        }
    }

    /// The family the converter was built for.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The kohya name of a module as written in a file (the key without its
    /// `.lora_down.weight`-style suffix, as [`sd_formats::lora::split_key`] returns it), or
    /// `None` when the name maps to no known layer.
    pub fn to_kohya(&self, module: &str, style: KeyStyle) -> Option<String> {
        if module.starts_with("lora_unet_") || module.starts_with("lora_te") {
            return self.kohya_to_kohya(module);
        }
        match style {
            KeyStyle::ComfyUi => self.comfyui(module),
            _ => self.diffusers(module).or_else(|| self.comfyui(module)),
        }
    }

    /// kohya names: SDXL U-Net names in Diffusers spelling become SAI names.
    fn kohya_to_kohya(&self, name: &str) -> Option<String> {
        if self.family == ModelFamily::Sdxl
            && let Some(rest) = name.strip_prefix("lora_unet_")
            && let Some(sai) = self.sdxl_underscored.get(rest)
        {
            return Some(format!("lora_unet_{sai}"));
        }
        Some(name.to_owned())
    }

    fn unet_name(&self, diffusers_path: &str) -> Option<String> {
        let path = if self.family == ModelFamily::Sdxl {
            self.paths.to_ldm(diffusers_path)?.to_owned()
        } else {
            // Only accept paths the table knows (so typos and foreign layers are reported).
            self.paths.to_ldm(diffusers_path)?;
            diffusers_path.to_owned()
        };
        Some(format!("lora_unet_{}", path.replace('.', "_")))
    }

    fn text_encoder_name(&self, component: Component, path: &str) -> Option<String> {
        let segs: Vec<&str> = path.split('.').collect();
        let ok = segs.len() == 6
            && segs[..3] == ["text_model", "encoder", "layers"]
            && segs[3].parse::<usize>().is_ok()
            && matches!(
                (segs[4], segs[5]),
                ("self_attn", "q_proj" | "k_proj" | "v_proj" | "out_proj") | ("mlp", "fc1" | "fc2")
            );
        if !ok {
            return None;
        }
        let prefix = lora_prefix(self.family, component).ok()?;
        Some(format!("{prefix}_{}", path.replace('.', "_")))
    }

    /// Diffusers/PEFT and the older attention-processor spelling.
    fn diffusers(&self, module: &str) -> Option<String> {
        let module = module.strip_prefix("base_model.model.").unwrap_or(module);
        let (component, path) = if let Some(p) = module.strip_prefix("unet.") {
            (Component::Unet, p)
        } else if let Some(p) = module.strip_prefix("text_encoder_2.") {
            (Component::TextEncoder2, p)
        } else if let Some(p) = module.strip_prefix("text_encoder.") {
            (Component::TextEncoder, p)
        } else if module.starts_with("text_model.") {
            (Component::TextEncoder, module)
        } else {
            (Component::Unet, module)
        };
        // Old spelling: `….processor.to_q` (from `to_q_lora`), text encoders `self_attn.to_k`.
        let mut segs: Vec<&str> = path.split('.').filter(|s| *s != "processor").collect();
        match component {
            Component::Unet => {
                if segs.last() == Some(&"to_out") {
                    segs.push("0");
                }
                self.unet_name(&segs.join("."))
            }
            _ => {
                if segs.len() >= 2 && segs[segs.len() - 2] == "self_attn" {
                    let last = segs.len() - 1;
                    segs[last] = match segs[last] {
                        "to_q" => "q_proj",
                        "to_k" => "k_proj",
                        "to_v" => "v_proj",
                        "to_out" => "out_proj",
                        other => other,
                    };
                }
                self.text_encoder_name(component, &segs.join("."))
            }
        }
    }

    /// ComfyUI-style dotted single-file paths.
    fn comfyui(&self, module: &str) -> Option<String> {
        if let Some(ldm) = module
            .strip_prefix("model.diffusion_model.")
            .or_else(|| module.strip_prefix("diffusion_model."))
        {
            let diffusers = self.paths.to_diffusers(ldm)?;
            return if self.family == ModelFamily::Sdxl {
                Some(format!("lora_unet_{}", ldm.replace('.', "_")))
            } else {
                Some(format!("lora_unet_{}", diffusers.replace('.', "_")))
            };
        }
        let te = |c: Component, p: &str| self.text_encoder_name(c, p);
        for (prefix, component) in [
            ("text_encoders.clip_l.transformer.", Component::TextEncoder),
            ("text_encoders.clip_h.transformer.", Component::TextEncoder),
            ("text_encoders.clip_g.transformer.", Component::TextEncoder2),
            ("cond_stage_model.transformer.", Component::TextEncoder),
            (
                "conditioner.embedders.0.transformer.",
                Component::TextEncoder,
            ),
            (
                "conditioner.embedders.1.transformer.",
                Component::TextEncoder2,
            ),
        ] {
            if let Some(p) = module.strip_prefix(prefix) {
                return te(component, p);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_spellings() {
        let c = NameConverter::new(ModelFamily::Sdxl);
        assert_eq!(
            c.to_kohya(
                "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_out.0",
                KeyStyle::DiffusersPeft
            )
            .as_deref(),
            Some("lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_out_0")
        );
        assert_eq!(
            c.to_kohya("lora_unet_up_blocks_0_upsamplers_0_conv", KeyStyle::Kohya)
                .as_deref(),
            Some("lora_unet_output_blocks_2_2_conv")
        );
        assert_eq!(
            c.to_kohya("diffusion_model.input_blocks.3.0.op", KeyStyle::ComfyUi)
                .as_deref(),
            Some("lora_unet_input_blocks_3_0_op")
        );
        assert_eq!(
            c.to_kohya(
                "text_encoder_2.text_model.encoder.layers.31.self_attn.to_out",
                KeyStyle::DiffusersPeft
            )
            .as_deref(),
            Some("lora_te2_text_model_encoder_layers_31_self_attn_out_proj")
        );
        assert_eq!(
            c.to_kohya("unet.nonsense.layer", KeyStyle::DiffusersPeft),
            None
        );
    }

    #[test]
    fn sd1_comfyui_maps_ldm_to_diffusers_names() {
        let c = NameConverter::new(ModelFamily::Sd1);
        assert_eq!(
            c.to_kohya("diffusion_model.output_blocks.2.1.conv", KeyStyle::ComfyUi)
                .as_deref(),
            Some("lora_unet_up_blocks_0_upsamplers_0_conv")
        );
        assert_eq!(
            c.to_kohya(
                "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
                KeyStyle::ComfyUi
            )
            .as_deref(),
            Some("lora_te_text_model_encoder_layers_0_mlp_fc1")
        );
    }
}
