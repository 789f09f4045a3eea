//! Model families (SD1.x, SD2.x, SDXL) detected from single-file keys, and the prediction
//! type, which weights cannot tell and which comes from flags and metadata.
//!
//! Detection from a Diffusers folder is [`crate::diffusers::DiffusersModel::family`].

use std::fmt;

use crate::keymap::{KeyMapError, Result};

/// Architecture family of a Stable Diffusion checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ModelFamily {
    /// SD 1.x: CLIP ViT-L/14 text encoder (HF layout `cond_stage_model.transformer.*`),
    /// context 768, 1x1-conv `proj_in`/`proj_out`.
    Sd1,
    /// SD 2.x (512-base ε and 768-v): OpenCLIP ViT-H/14 (`cond_stage_model.model.*`), context
    /// 1024, Linear `proj_in`/`proj_out`.
    Sd2,
    /// SDXL base: two text encoders (`conditioner.embedders.{0,1}.*`), `label_emb`, context 2048.
    Sdxl,
}

impl fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFamily::Sd1 => "SD1",
            ModelFamily::Sd2 => "SD2",
            ModelFamily::Sdxl => "SDXL",
        })
    }
}

impl ModelFamily {
    /// The family selected by sd-scripts' flags: `--sdxl` (SDXL scripts) or `--v2`, else SD1.
    ///
    /// # Errors
    /// [`KeyMapError::UnknownFamily`] when both are set (sd-scripts asserts on that).
    pub fn from_flags(v2: bool, sdxl: bool) -> Result<Self> {
        match (v2, sdxl) {
            (true, true) => Err(KeyMapError::UnknownFamily {
                path: "command line".to_string(),
                reason: "--v2 and --sdxl are mutually exclusive".to_string(),
            }),
            (_, true) => Ok(ModelFamily::Sdxl),
            (true, false) => Ok(ModelFamily::Sd2),
            (false, false) => Ok(ModelFamily::Sd1),
        }
    }

    /// Detects the family of a single-file (LDM/SGM) checkpoint from its (key, shape) list.
    ///
    /// Rules, first match wins:
    /// 1. `conditioner.embedders.*` or `model.diffusion_model.label_emb.*` -> SDXL;
    /// 2. `cond_stage_model.model.*` (OpenCLIP) -> SD2;
    /// 3. `cond_stage_model.transformer.*` (HF CLIP) -> SD1;
    /// 4. U-Net only: cross-attention context width (`attn2.to_k.weight` columns) 768 -> SD1,
    ///    1024 -> SD2, 2048 -> SDXL; otherwise `proj_in.weight` 2-D (Linear) -> SD2, 4-D
    ///    (1x1 conv) -> SD1.
    ///
    /// # Errors
    /// [`KeyMapError::UnknownFamily`] when no rule applies (e.g. a VAE-only file).
    pub fn detect_ldm<K, S>(tensors: impl IntoIterator<Item = (K, S)>, path: &str) -> Result<Self>
    where
        K: AsRef<str>,
        S: AsRef<[usize]>,
    {
        let mut context = None;
        let mut proj_in_rank = None;
        let (mut open_clip, mut hf_clip) = (false, false);
        for (k, s) in tensors {
            let k = k.as_ref();
            if k.starts_with("conditioner.embedders.")
                || k.starts_with("model.diffusion_model.label_emb.")
            {
                return Ok(ModelFamily::Sdxl);
            }
            open_clip |= k.starts_with("cond_stage_model.model.");
            hf_clip |= k.starts_with("cond_stage_model.transformer.");
            if let Some(u) = k.strip_prefix("model.diffusion_model.") {
                let s = s.as_ref();
                if context.is_none() && u.ends_with(".attn2.to_k.weight") && s.len() == 2 {
                    context = Some(s[1]);
                }
                if proj_in_rank.is_none() && u.ends_with(".proj_in.weight") {
                    proj_in_rank = Some(s.len());
                }
            }
        }
        if open_clip {
            return Ok(ModelFamily::Sd2);
        }
        if hf_clip {
            return Ok(ModelFamily::Sd1);
        }
        match (context, proj_in_rank) {
            (Some(768), _) => Ok(ModelFamily::Sd1),
            (Some(1024), _) => Ok(ModelFamily::Sd2),
            (Some(2048), _) => Ok(ModelFamily::Sdxl),
            (_, Some(2)) => Ok(ModelFamily::Sd2),
            (_, Some(4)) => Ok(ModelFamily::Sd1),
            _ => Err(KeyMapError::UnknownFamily {
                path: path.to_string(),
                reason: "no text-encoder keys (cond_stage_model.*, conditioner.embedders.*) and \
                         no U-Net attention keys (model.diffusion_model.*.attn2.to_k.weight, \
                         *.proj_in.weight)"
                    .to_string(),
            }),
        }
    }
}

/// What the U-Net predicts. Not visible in the weights: SD2 512-base (ε) and SD2 768-v (v) have
/// identical keys and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PredictionType {
    /// Noise ε (SD1, SD2 512-base, SDXL).
    Epsilon,
    /// Velocity v = α·ε − σ·x₀ (SD2 768-v).
    VPrediction,
}

impl PredictionType {
    /// Name used by `modelspec.prediction_type`: `epsilon` or `v`.
    pub fn modelspec_name(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v",
        }
    }

    /// Parses a modelspec (`epsilon`, `v`) or Diffusers scheduler (`epsilon`, `v_prediction`)
    /// name; `None` for anything else (e.g. `sample`, which no SD checkpoint uses).
    pub fn parse(name: &str) -> Option<Self> {
        match name.trim() {
            "epsilon" => Some(PredictionType::Epsilon),
            "v" | "v_prediction" => Some(PredictionType::VPrediction),
            _ => None,
        }
    }

    /// The prediction type a safetensors `__metadata__` map states, if any:
    /// `modelspec.prediction_type` (`epsilon`/`v`), else `modelspec.architecture` ending in
    /// `-v` (`stable-diffusion-v2-768-v`) -> v, other architectures -> ε.
    pub fn from_metadata<'a>(
        metadata: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> Option<Self> {
        let mut arch = None;
        for (k, v) in metadata {
            match k.as_str() {
                "modelspec.prediction_type" => {
                    if let Some(p) = Self::parse(v) {
                        return Some(p);
                    }
                }
                "modelspec.architecture" => arch = Some(v.as_str()),
                _ => {}
            }
        }
        let arch = arch?.trim_end_matches("/lora");
        Some(if arch.ends_with("-v") {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        })
    }
}

/// Outcome of [`resolve_prediction_type`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PredictionResolution {
    /// The prediction type to use.
    pub prediction: PredictionType,
    /// What the file's metadata (or a Diffusers scheduler config) says, if anything.
    pub stated: Option<PredictionType>,
    /// `stated` is known and differs from `prediction`: the caller should warn.
    pub disagrees: bool,
}

/// Chooses the prediction type as sd-scripts does: `--v_parameterization` means v, its absence
/// means ε; `--v2` alone does not imply v (SD2 512-base is ε). `stated` is what the model's
/// metadata ([`PredictionType::from_metadata`]) or scheduler config says; it never overrides
/// the flags, but a disagreement is reported so the caller can warn (STYLE §5).
///
/// # Compatibility
/// sd-scripts ignores metadata entirely here; we only add the warning.
pub fn resolve_prediction_type(
    v_parameterization: bool,
    stated: Option<PredictionType>,
) -> PredictionResolution {
    let prediction = if v_parameterization {
        PredictionType::VPrediction
    } else {
        PredictionType::Epsilon
    };
    PredictionResolution {
        prediction,
        stated,
        disagrees: stated.is_some_and(|s| s != prediction),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn prediction_from_metadata() {
        assert_eq!(
            PredictionType::from_metadata(&meta(&[("modelspec.prediction_type", "v")])),
            Some(PredictionType::VPrediction)
        );
        assert_eq!(
            PredictionType::from_metadata(&meta(&[
                ("modelspec.prediction_type", "epsilon"),
                ("modelspec.architecture", "stable-diffusion-v2-768-v"),
            ])),
            Some(PredictionType::Epsilon)
        );
        assert_eq!(
            PredictionType::from_metadata(&meta(&[(
                "modelspec.architecture",
                "stable-diffusion-v2-768-v/lora"
            )])),
            Some(PredictionType::VPrediction)
        );
        assert_eq!(
            PredictionType::from_metadata(&meta(&[(
                "modelspec.architecture",
                "stable-diffusion-xl-v1-base"
            )])),
            Some(PredictionType::Epsilon)
        );
        assert_eq!(
            PredictionType::from_metadata(&meta(&[("ss_v2", "True")])),
            None
        );
    }

    #[test]
    fn flags_win_and_disagreement_is_reported() {
        let r = resolve_prediction_type(false, Some(PredictionType::VPrediction));
        assert_eq!(r.prediction, PredictionType::Epsilon);
        assert!(r.disagrees);
        let r = resolve_prediction_type(true, Some(PredictionType::VPrediction));
        assert_eq!(r.prediction, PredictionType::VPrediction);
        assert!(!r.disagrees);
        let r = resolve_prediction_type(true, None);
        assert_eq!(r.prediction, PredictionType::VPrediction);
        assert!(!r.disagrees);
    }

    #[test]
    fn family_flags() {
        assert_eq!(
            ModelFamily::from_flags(false, false).ok(),
            Some(ModelFamily::Sd1)
        );
        assert_eq!(
            ModelFamily::from_flags(true, false).ok(),
            Some(ModelFamily::Sd2)
        );
        assert_eq!(
            ModelFamily::from_flags(false, true).ok(),
            Some(ModelFamily::Sdxl)
        );
        assert!(ModelFamily::from_flags(true, true).is_err());
    }

    #[test]
    fn unet_only_detection() {
        let k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
        let p = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
        let detect = |ctx: usize, proj: &[usize]| {
            ModelFamily::detect_ldm([(k, vec![320, ctx]), (p, proj.to_vec())], "t").ok()
        };
        assert_eq!(detect(768, &[320, 320, 1, 1]), Some(ModelFamily::Sd1));
        assert_eq!(detect(1024, &[320, 320]), Some(ModelFamily::Sd2));
        assert_eq!(detect(2048, &[320, 320]), Some(ModelFamily::Sdxl));
        assert_eq!(detect(16, &[32, 32]), Some(ModelFamily::Sd2));
        assert_eq!(detect(32, &[32, 32, 1, 1]), Some(ModelFamily::Sd1));
        let vae_only = ModelFamily::detect_ldm(
            [(
                "first_stage_model.encoder.conv_in.weight",
                vec![128, 3, 3, 3],
            )],
            "vae.safetensors",
        );
        assert!(matches!(vae_only, Err(KeyMapError::UnknownFamily { .. })));
    }
}
