//! LoRA files at the key level: which trainer's key style a file uses, and how its keys group
//! into modules (down, up, alpha). No arithmetic here; see `sd-core` for applying and merging.
//!
//! # Source
//! `../shared/spec/lora-format.md` §2 (keys of one module), §10 (other trainers' formats).

use std::collections::BTreeMap;

/// The key convention of a LoRA file (spec §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KeyStyle {
    /// sd-scripts: `lora_unet_…`/`lora_te…_` names, `.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
    /// LyCORIS: kohya names, but algorithm keys (`hada_*`, `lokr_*`, `lora_mid`, `dora_scale`, …).
    Lycoris,
    /// Diffusers/PEFT: `unet.<path>.lora_A.weight`/`.lora_B.weight` (or the older
    /// `…to_q_lora.down.weight` / `…lora_linear_layer.down.weight` spelling).
    DiffusersPeft,
    /// ComfyUI-style: dotted LDM/SGM module paths (`diffusion_model.input_blocks.…`,
    /// `model.diffusion_model.…`, `text_encoders.…`) with LoRA suffixes.
    ComfyUi,
    /// None of the above.
    Unknown,
}

impl KeyStyle {
    /// Human-readable name for reports.
    pub fn describe(self) -> &'static str {
        match self {
            KeyStyle::Kohya => "kohya (sd-scripts)",
            KeyStyle::Lycoris => "LyCORIS",
            KeyStyle::DiffusersPeft => "Diffusers/PEFT",
            KeyStyle::ComfyUi => "ComfyUI-style (LDM paths)",
            KeyStyle::Unknown => "unknown",
        }
    }
}

/// Which tensor of a module a key holds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// Down projection ("A"), applied first: `[r, in]` or `[r, in, kh, kw]`.
    Down,
    /// Up projection ("B"): `[out, r]` or `[out, r, 1, 1]`.
    Up,
    /// Scalar alpha (scale = alpha / r).
    Alpha,
    /// A key of an algorithm we do not implement (LoHa, LoKr, Tucker `lora_mid`, DoRA, OFT, …);
    /// the suffix is kept for messages.
    Unsupported(String),
}

/// Suffixes of algorithm keys we recognise but do not implement (spec §10.2, §10.3).
const UNSUPPORTED_SUFFIXES: &[&str] = &[
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "lora_mid.weight",
    "dora_scale",
    "lora_magnitude_vector",
    "lora_magnitude_vector.weight",
    "oft_blocks",
    "oft_diag",
    "on_input",
    "w_norm",
    "b_norm",
    "diff",
    "diff_b",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
];

/// Splits one key into (module name as written, part, style hint). `None` when the key is
/// not a LoRA key at all.
pub fn split_key(key: &str) -> Option<(String, Part, KeyStyle)> {
    const KOHYA: &[(&str, Part)] = &[
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ];
    const PEFT: &[(&str, Part)] = &[
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        ("_lora.down.weight", Part::Down),
        ("_lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
    ];
    let dotted_ldm = |m: &str| {
        m.starts_with("diffusion_model.")
            || m.starts_with("model.diffusion_model.")
            || m.starts_with("text_encoders.")
            || m.starts_with("conditioner.")
            || m.starts_with("cond_stage_model.")
    };
    let kohya_name = |m: &str| m.starts_with("lora_unet_") || m.starts_with("lora_te");
    for (suffix, part) in KOHYA.iter().chain(PEFT) {
        if let Some(module) = key.strip_suffix(suffix) {
            let style = if kohya_name(module) && KOHYA.iter().any(|(s, _)| s == suffix) {
                KeyStyle::Kohya
            } else if dotted_ldm(module) {
                KeyStyle::ComfyUi
            } else if PEFT.iter().any(|(s, _)| s == suffix) {
                KeyStyle::DiffusersPeft
            } else if *part == Part::Alpha {
                // `unet.….alpha` in converted PEFT files, `diffusion_model.….alpha` in ComfyUI ones.
                KeyStyle::Unknown
            } else {
                KeyStyle::Unknown
            };
            return Some((module.to_owned(), part.clone(), style));
        }
    }
    for suffix in UNSUPPORTED_SUFFIXES {
        if let Some(module) = key.strip_suffix(suffix).and_then(|m| m.strip_suffix('.')) {
            let style = if kohya_name(module) {
                KeyStyle::Lycoris
            } else {
                KeyStyle::Unknown
            };
            return Some((
                module.to_owned(),
                Part::Unsupported((*suffix).to_owned()),
                style,
            ));
        }
    }
    None
}

/// Keys of one LoRA module, grouped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleKeys {
    /// Key of the down weight, if present.
    pub down: Option<String>,
    /// Key of the up weight, if present.
    pub up: Option<String>,
    /// Key of the alpha scalar, if present (absent means alpha = rank).
    pub alpha: Option<String>,
    /// Keys of algorithms we do not implement.
    pub unsupported: Vec<String>,
}

/// A LoRA file's keys grouped by module, with the detected style.
#[derive(Debug, Clone, Default)]
pub struct LoraLayout {
    /// Module name (as written in the file) → its keys, sorted by name.
    pub modules: BTreeMap<String, ModuleKeys>,
    /// Keys that are no LoRA key at all.
    pub stray_keys: Vec<String>,
    /// Every style seen, with the number of keys in it.
    pub styles: BTreeMap<KeyStyle, usize>,
}

impl LoraLayout {
    /// Groups `keys` into modules.
    pub fn from_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = LoraLayout::default();
        for key in keys {
            let Some((module, part, style)) = split_key(key) else {
                out.stray_keys.push(key.to_owned());
                continue;
            };
            *out.styles.entry(style).or_default() += 1;
            let entry = out.modules.entry(module).or_default();
            match part {
                Part::Down => entry.down = Some(key.to_owned()),
                Part::Up => entry.up = Some(key.to_owned()),
                Part::Alpha => entry.alpha = Some(key.to_owned()),
                Part::Unsupported(_) => entry.unsupported.push(key.to_owned()),
            }
        }
        out
    }

    /// The file's overall style: LyCORIS wins when any algorithm key is present, otherwise the
    /// style of most keys (alpha keys, which every style shares, do not vote).
    pub fn style(&self) -> KeyStyle {
        if self.styles.contains_key(&KeyStyle::Lycoris)
            || self.modules.values().any(|m| !m.unsupported.is_empty())
        {
            return KeyStyle::Lycoris;
        }
        self.styles
            .iter()
            .filter(|(s, _)| **s != KeyStyle::Unknown)
            .max_by_key(|(_, n)| **n)
            .map(|(s, _)| *s)
            .unwrap_or(KeyStyle::Unknown)
    }

    /// Keys of algorithms we do not implement, across all modules (sorted).
    pub fn unsupported_keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self
            .modules
            .values()
            .flat_map(|m| m.unsupported.iter().map(String::as_str))
            .collect();
        keys.sort_unstable();
        keys
    }
}

/// kohya module-name prefixes only SD1.x/SD2.x LoRAs use (Diffusers block paths, one text
/// encoder).
const SD1_ONLY_PREFIXES: &[&str] = &[
    "lora_te_",
    "lora_unet_down_blocks_",
    "lora_unet_mid_block_",
    "lora_unet_up_blocks_",
];

/// kohya module-name prefixes only SDXL LoRAs use (LDM block paths, two text encoders).
const SDXL_ONLY_PREFIXES: &[&str] = &[
    "lora_te1_",
    "lora_te2_",
    "lora_unet_input_blocks_",
    "lora_unet_middle_block_",
    "lora_unet_output_blocks_",
];

/// The first module name (in iteration order) that only an SD1.x/SD2.x LoRA has, and the first
/// that only an SDXL LoRA has, among kohya module names (`lora_te_…`, `lora_unet_input_blocks_…`).
///
/// Names of other styles (Diffusers, PEFT) match neither. Both `Some` means the names mix two
/// families: such a file cannot be applied to any one model.
pub fn family_name_evidence<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> (Option<&'a str>, Option<&'a str>) {
    let (mut sd1, mut sdxl) = (None, None);
    for name in names {
        if sd1.is_none() && SD1_ONLY_PREFIXES.iter().any(|p| name.starts_with(p)) {
            sd1 = Some(name);
        }
        if sdxl.is_none() && SDXL_ONLY_PREFIXES.iter().any(|p| name.starts_with(p)) {
            sdxl = Some(name);
        }
        if sd1.is_some() && sdxl.is_some() {
            break;
        }
    }
    (sd1, sdxl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_name_evidence_finds_one_name_of_each_family() {
        let sd1 = "lora_te_text_model_encoder_layers_0_mlp_fc1";
        let sdxl = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
        assert_eq!(
            family_name_evidence([sd1, sdxl, "lora_te1_x"]),
            (Some(sd1), Some(sdxl))
        );
        assert_eq!(family_name_evidence([sd1]), (Some(sd1), None));
        assert_eq!(
            family_name_evidence(["lora_te2_x", "unet.down_blocks.0.x"]),
            (None, Some("lora_te2_x"))
        );
        assert_eq!(family_name_evidence([]), (None, None));
    }

    #[test]
    fn kohya_keys_group_into_modules() {
        let layout = LoraLayout::from_keys([
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
        ]);
        assert_eq!(layout.modules.len(), 2);
        assert_eq!(layout.style(), KeyStyle::Kohya);
        let m = &layout.modules["lora_unet_down_blocks_0_attentions_0_proj_in"];
        assert_eq!(
            m.alpha.as_deref(),
            Some("lora_unet_down_blocks_0_attentions_0_proj_in.alpha")
        );
        assert!(
            layout.modules["lora_te_text_model_encoder_layers_0_mlp_fc1"]
                .alpha
                .is_none()
        );
    }

    #[test]
    fn peft_and_old_diffusers_spellings() {
        let layout = LoraLayout::from_keys([
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.down.weight",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k_lora.up.weight",
        ]);
        assert_eq!(layout.style(), KeyStyle::DiffusersPeft);
        assert_eq!(layout.modules.len(), 2);
        assert!(
            layout
                .modules
                .values()
                .all(|m| m.down.is_some() && m.up.is_some())
        );
    }

    #[test]
    fn lycoris_algorithms_are_recognised() {
        let layout = LoraLayout::from_keys([
            "lora_unet_conv_in.hada_w1_a",
            "lora_unet_conv_in.hada_w1_b",
            "lora_unet_conv_in.alpha",
            "lora_unet_x.lora_down.weight",
            "lora_unet_x.lora_up.weight",
            "lora_unet_x.dora_scale",
        ]);
        assert_eq!(layout.style(), KeyStyle::Lycoris);
        assert_eq!(
            layout.unsupported_keys(),
            vec![
                "lora_unet_conv_in.hada_w1_a",
                "lora_unet_conv_in.hada_w1_b",
                "lora_unet_x.dora_scale"
            ]
        );
    }

    #[test]
    fn comfyui_dotted_paths() {
        let layout = LoraLayout::from_keys([
            "diffusion_model.input_blocks.1.1.proj_in.lora_down.weight",
            "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight",
            "diffusion_model.input_blocks.1.1.proj_in.alpha",
        ]);
        assert_eq!(layout.style(), KeyStyle::ComfyUi);
        assert_eq!(layout.modules.len(), 1);
    }

    #[test]
    fn stray_keys_are_kept_apart() {
        let layout = LoraLayout::from_keys(["model.diffusion_model.out.2.weight"]);
        assert_eq!(
            layout.stray_keys,
            vec!["model.diffusion_model.out.2.weight"]
        );
        assert_eq!(layout.style(), KeyStyle::Unknown);
    }
}
