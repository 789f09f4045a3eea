//! Diffusers model folders: `model_index.json`, each component's `config.json` and the path of
//! its weight file. Reading tensors is [`crate`]'s tensor-file readers' job.
//!
//! Configs are kept as loose [`serde_json::Value`]s with typed accessors for the fields the
//! models need; an absent field gets the default of the diffusers / transformers class
//! (noted per accessor), a field of the wrong type is an error naming the file.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::family::{ModelFamily, PredictionType};
use crate::keymap::{Component, KeyMapError, Result};

/// Format of a component's weight file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// `.safetensors`.
    Safetensors,
    /// PyTorch pickle `.bin`.
    PickleBin,
}

/// A component's weight file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFile {
    /// Full path.
    pub path: PathBuf,
    /// File format.
    pub format: WeightFormat,
}

/// A Diffusers model folder.
#[derive(Debug, Clone)]
pub struct DiffusersModel {
    dir: PathBuf,
    model_index: Value,
    components: BTreeMap<String, (Option<String>, Option<String>)>,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|source| KeyMapError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| KeyMapError::Json {
        path: path.to_path_buf(),
        source,
    })
}

impl DiffusersModel {
    /// Opens a folder holding `model_index.json`.
    ///
    /// # Errors
    /// [`KeyMapError::MissingModelIndex`] when the file is absent, [`KeyMapError::Io`] /
    /// [`KeyMapError::Json`] when it cannot be read, [`KeyMapError::ConfigField`] when it is not
    /// a JSON object.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let index_path = dir.join("model_index.json");
        if !index_path.is_file() {
            return Err(KeyMapError::MissingModelIndex { dir });
        }
        let model_index = read_json(&index_path)?;
        let Some(obj) = model_index.as_object() else {
            return Err(KeyMapError::ConfigField {
                path: index_path,
                field: "(root)".to_string(),
                expected: "a JSON object".to_string(),
            });
        };
        // Components are `"name": [library, class]`; `[null, null]` marks an absent optional
        // component (e.g. `feature_extractor`).
        let components = obj
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .filter_map(|(k, v)| {
                let arr = v.as_array()?;
                let lib = arr.first()?.as_str().map(str::to_string);
                let class = arr.get(1)?.as_str().map(str::to_string);
                (lib.is_some() || class.is_some()).then(|| (k.clone(), (lib, class)))
            })
            .collect();
        Ok(Self {
            dir,
            model_index,
            components,
        })
    }

    /// The model folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Parsed `model_index.json`.
    pub fn model_index(&self) -> &Value {
        &self.model_index
    }

    /// Pipeline class (`_class_name`), e.g. `StableDiffusionXLPipeline`.
    pub fn class_name(&self) -> Option<&str> {
        self.model_index.get("_class_name")?.as_str()
    }

    /// Names of the components `model_index.json` lists with a class (`unet`, `scheduler`,
    /// `tokenizer`, ...), sorted.
    pub fn component_names(&self) -> impl Iterator<Item = &str> {
        self.components.keys().map(String::as_str)
    }

    /// Whether `model_index.json` lists the model component.
    pub fn has(&self, component: Component) -> bool {
        self.components.contains_key(component.name())
    }

    /// (library, class) of a component as listed in `model_index.json`, e.g.
    /// (`transformers`, `CLIPTextModelWithProjection`).
    pub fn component_class(&self, name: &str) -> Option<(Option<&str>, Option<&str>)> {
        self.components
            .get(name)
            .map(|(l, c)| (l.as_deref(), c.as_deref()))
    }

    /// Folder of a listed component.
    ///
    /// # Errors
    /// [`KeyMapError::MissingComponent`] when `model_index.json` does not list it or its folder
    /// does not exist.
    pub fn component_dir(&self, name: &str) -> Result<PathBuf> {
        if !self.components.contains_key(name) {
            return Err(KeyMapError::MissingComponent {
                dir: self.dir.clone(),
                component: name.to_string(),
                reason: "not listed in model_index.json".to_string(),
            });
        }
        let d = self.dir.join(name);
        if !d.is_dir() {
            return Err(KeyMapError::MissingComponent {
                dir: self.dir.clone(),
                component: name.to_string(),
                reason: format!("folder {} does not exist", d.display()),
            });
        }
        Ok(d)
    }

    fn config(&self, name: &str, file: &str) -> Result<Config> {
        let path = self.component_dir(name)?.join(file);
        if !path.is_file() {
            return Err(KeyMapError::MissingComponent {
                dir: self.dir.clone(),
                component: name.to_string(),
                reason: format!("{} does not exist", path.display()),
            });
        }
        let value = read_json(&path)?;
        Ok(Config { path, value })
    }

    /// `unet/config.json`.
    ///
    /// # Errors
    /// As [`DiffusersModel::component_dir`], plus read/parse errors.
    pub fn unet_config(&self) -> Result<UnetConfig> {
        self.config(Component::Unet.name(), "config.json")
            .map(UnetConfig)
    }

    /// `text_encoder/config.json` or `text_encoder_2/config.json`.
    ///
    /// # Errors
    /// As [`DiffusersModel::unet_config`].
    pub fn text_encoder_config(&self, component: Component) -> Result<TextEncoderConfig> {
        self.config(component.name(), "config.json")
            .map(TextEncoderConfig)
    }

    /// `vae/config.json`.
    ///
    /// # Errors
    /// As [`DiffusersModel::unet_config`].
    pub fn vae_config(&self) -> Result<VaeConfig> {
        self.config(Component::Vae.name(), "config.json")
            .map(VaeConfig)
    }

    /// `prediction_type` of `scheduler/scheduler_config.json`, if the scheduler and the field
    /// exist (`epsilon` or `v_prediction`).
    ///
    /// # Errors
    /// Read/parse errors of an existing scheduler config.
    pub fn scheduler_prediction_type(&self) -> Result<Option<PredictionType>> {
        let path = self.dir.join("scheduler").join("scheduler_config.json");
        if !path.is_file() {
            return Ok(None);
        }
        let v = read_json(&path)?;
        Ok(v.get("prediction_type")
            .and_then(Value::as_str)
            .and_then(PredictionType::parse))
    }

    /// Weight file of a component. Without `variant`, tries in order
    /// `diffusion_pytorch_model.safetensors`, `model.safetensors`, their `.fp16.safetensors`
    /// variants, then `diffusion_pytorch_model.bin`, `pytorch_model.bin` and their `.fp16.bin`
    /// variants. With `variant = Some("fp16")` the `.fp16.` names are tried first.
    ///
    /// # Errors
    /// [`KeyMapError::MissingComponent`], or [`KeyMapError::MissingWeights`] listing the names
    /// tried (sharded `*.index.json` weights are not supported).
    pub fn weights(&self, component: Component, variant: Option<&str>) -> Result<WeightFile> {
        let dir = self.component_dir(component.name())?;
        let mut names: Vec<(String, WeightFormat)> = Vec::new();
        let stems = ["diffusion_pytorch_model", "model"];
        let bin_stems = ["diffusion_pytorch_model", "pytorch_model"];
        let mut push = |v: Option<&str>| {
            let infix = v.map(|v| format!(".{v}")).unwrap_or_default();
            for s in stems {
                names.push((format!("{s}{infix}.safetensors"), WeightFormat::Safetensors));
            }
            for s in bin_stems {
                names.push((format!("{s}{infix}.bin"), WeightFormat::PickleBin));
            }
        };
        match variant {
            Some(v) => {
                push(Some(v));
                push(None);
            }
            None => {
                push(None);
                push(Some("fp16"));
            }
        }
        // Prefer safetensors of either variant over pickles.
        names.sort_by_key(|(_, f)| *f == WeightFormat::PickleBin);
        for (n, format) in &names {
            let path = dir.join(n);
            if path.is_file() {
                return Ok(WeightFile {
                    path,
                    format: *format,
                });
            }
        }
        Err(KeyMapError::MissingWeights {
            dir,
            tried: names.into_iter().map(|(n, _)| n).collect(),
        })
    }

    /// Detects the family: `_class_name` containing `XL` or a `text_encoder_2` component ->
    /// SDXL; otherwise the U-Net's `cross_attention_dim` 768 -> SD1 and 1024 -> SD2; for other
    /// widths (tiny test models), the text encoder's `hidden_act` (`quick_gelu` = CLIP ViT-L ->
    /// SD1, `gelu` = OpenCLIP -> SD2), then the U-Net's `use_linear_projection` (true -> SD2).
    ///
    /// # Errors
    /// [`KeyMapError::UnknownFamily`] when nothing decides, and config read errors.
    pub fn family(&self) -> Result<ModelFamily> {
        if self.class_name().is_some_and(|c| c.contains("XL")) || self.has(Component::TextEncoder2)
        {
            return Ok(ModelFamily::Sdxl);
        }
        let unet = if self.has(Component::Unet) {
            Some(self.unet_config()?)
        } else {
            None
        };
        match unet
            .as_ref()
            .map(UnetConfig::cross_attention_dim)
            .transpose()?
        {
            Some(768) => return Ok(ModelFamily::Sd1),
            Some(1024) => return Ok(ModelFamily::Sd2),
            Some(2048) => return Ok(ModelFamily::Sdxl),
            _ => {}
        }
        if self.has(Component::TextEncoder) {
            match self
                .text_encoder_config(Component::TextEncoder)?
                .hidden_act()?
                .as_str()
            {
                "quick_gelu" => return Ok(ModelFamily::Sd1),
                "gelu" => return Ok(ModelFamily::Sd2),
                _ => {}
            }
        }
        if let Some(u) = &unet {
            return Ok(if u.use_linear_projection()? {
                ModelFamily::Sd2
            } else {
                ModelFamily::Sd1
            });
        }
        Err(KeyMapError::UnknownFamily {
            path: self.dir.display().to_string(),
            reason: "no text_encoder_2, no unet config and no text-encoder hidden_act".to_string(),
        })
    }
}

/// A parsed `config.json` with its path (for error messages).
#[derive(Debug, Clone)]
pub struct Config {
    path: PathBuf,
    value: Value,
}

impl Config {
    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole JSON value.
    pub fn value(&self) -> &Value {
        &self.value
    }

    fn err(&self, field: &str, expected: &str) -> KeyMapError {
        KeyMapError::ConfigField {
            path: self.path.clone(),
            field: field.to_string(),
            expected: expected.to_string(),
        }
    }

    /// The field, treating JSON `null` as absent.
    fn get(&self, field: &str) -> Option<&Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    /// Unsigned integer field (required).
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?
            .ok_or_else(|| self.err(field, "a non-negative integer"))
    }

    /// Unsigned integer field, `None` when absent or null.
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.err(field, "a non-negative integer")),
        }
    }

    /// Float field, `None` when absent or null.
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.err(field, "a number")),
        }
    }

    /// Bool field, `None` when absent or null.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| self.err(field, "true or false")),
        }
    }

    /// String field, `None` when absent or null.
    pub fn opt_str(&self, field: &str) -> Result<Option<String>> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_string()))
                .ok_or_else(|| self.err(field, "a string")),
        }
    }

    /// A field that is either one integer (repeated `levels` times) or a list of `levels`
    /// integers; `None` when absent.
    pub fn per_level(&self, field: &str, levels: usize) -> Result<Option<Vec<usize>>> {
        let expected = format!("an integer or a list of {levels} integers");
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let v: Option<Vec<usize>> = a
                    .iter()
                    .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                    .collect();
                match v {
                    Some(v) if v.len() == levels => Ok(Some(v)),
                    _ => Err(self.err(field, &expected)),
                }
            }
            Some(x) => x
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(|n| Some(vec![n; levels]))
                .ok_or_else(|| self.err(field, &expected)),
        }
    }

    /// List of unsigned integers (required).
    pub fn usize_list(&self, field: &str) -> Result<Vec<usize>> {
        let v = self.get(field).and_then(Value::as_array).and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<usize>>>()
        });
        v.ok_or_else(|| self.err(field, "a list of non-negative integers"))
    }
}

/// `unet/config.json` (`UNet2DConditionModel`).
#[derive(Debug, Clone)]
pub struct UnetConfig(pub Config);

impl UnetConfig {
    /// Channels per level, e.g. `[320, 640, 1280, 1280]` (required).
    pub fn block_out_channels(&self) -> Result<Vec<usize>> {
        self.0.usize_list("block_out_channels")
    }

    /// ResNets per down level (default 2).
    pub fn layers_per_block(&self) -> Result<usize> {
        Ok(self.0.opt_usize("layers_per_block")?.unwrap_or(2))
    }

    /// Attention heads per level. diffusers' `attention_head_dim` is, for these models, the
    /// number of heads (a historical misnomer: SD1 `8`, SD2 `[5, 10, 20, 20]`); when
    /// `num_attention_heads` is set it wins. Default 8.
    pub fn attention_heads(&self) -> Result<Vec<usize>> {
        let levels = self.block_out_channels()?.len();
        if let Some(v) = self.0.per_level("num_attention_heads", levels)? {
            return Ok(v);
        }
        Ok(self
            .0
            .per_level("attention_head_dim", levels)?
            .unwrap_or_else(|| vec![8; levels]))
    }

    /// Raw `attention_head_dim` per level (default 8), as written in the config.
    pub fn attention_head_dim(&self) -> Result<Vec<usize>> {
        let levels = self.block_out_channels()?.len();
        Ok(self
            .0
            .per_level("attention_head_dim", levels)?
            .unwrap_or_else(|| vec![8; levels]))
    }

    /// Width of the text context (required): 768 SD1, 1024 SD2, 2048 SDXL.
    pub fn cross_attention_dim(&self) -> Result<usize> {
        self.0.usize("cross_attention_dim")
    }

    /// Transformer blocks per attention module per level (default 1).
    pub fn transformer_layers_per_block(&self) -> Result<Vec<usize>> {
        let levels = self.block_out_channels()?.len();
        Ok(self
            .0
            .per_level("transformer_layers_per_block", levels)?
            .unwrap_or_else(|| vec![1; levels]))
    }

    /// Linear (true) or 1x1-conv (false) `proj_in`/`proj_out` (default false).
    pub fn use_linear_projection(&self) -> Result<bool> {
        Ok(self.0.opt_bool("use_linear_projection")?.unwrap_or(false))
    }

    /// Attention computed in f32 (default false; SD2 768-v true).
    pub fn upcast_attention(&self) -> Result<bool> {
        Ok(self.0.opt_bool("upcast_attention")?.unwrap_or(false))
    }

    /// `text_time` for SDXL, `None` otherwise.
    pub fn addition_embed_type(&self) -> Result<Option<String>> {
        self.0.opt_str("addition_embed_type")
    }

    /// Width of SDXL's `add_embedding` input (2816 for SDXL base), `None` otherwise.
    pub fn projection_class_embeddings_input_dim(&self) -> Result<Option<usize>> {
        self.0.opt_usize("projection_class_embeddings_input_dim")
    }

    /// Width of each SDXL time-id embedding (256 for SDXL base), `None` otherwise.
    pub fn addition_time_embed_dim(&self) -> Result<Option<usize>> {
        self.0.opt_usize("addition_time_embed_dim")
    }

    /// Default latent size in latent cells (pixels / 8) (required).
    pub fn sample_size(&self) -> Result<usize> {
        self.0.usize("sample_size")
    }
}

/// `text_encoder*/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone)]
pub struct TextEncoderConfig(pub Config);

impl TextEncoderConfig {
    /// Width (default 512, as `CLIPTextConfig`).
    pub fn hidden_size(&self) -> Result<usize> {
        Ok(self.0.opt_usize("hidden_size")?.unwrap_or(512))
    }

    /// Transformer layers (default 12).
    pub fn num_hidden_layers(&self) -> Result<usize> {
        Ok(self.0.opt_usize("num_hidden_layers")?.unwrap_or(12))
    }

    /// Attention heads (default 8).
    pub fn num_attention_heads(&self) -> Result<usize> {
        Ok(self.0.opt_usize("num_attention_heads")?.unwrap_or(8))
    }

    /// MLP width (default 2048).
    pub fn intermediate_size(&self) -> Result<usize> {
        Ok(self.0.opt_usize("intermediate_size")?.unwrap_or(2048))
    }

    /// Activation: `quick_gelu` (CLIP ViT-L, the default) or `gelu` (OpenCLIP).
    pub fn hidden_act(&self) -> Result<String> {
        Ok(self
            .0
            .opt_str("hidden_act")?
            .unwrap_or_else(|| "quick_gelu".to_string()))
    }

    /// Output width of `text_projection` (default 512; used by SDXL TE2).
    pub fn projection_dim(&self) -> Result<usize> {
        Ok(self.0.opt_usize("projection_dim")?.unwrap_or(512))
    }

    /// Token positions (default 77).
    pub fn max_position_embeddings(&self) -> Result<usize> {
        Ok(self.0.opt_usize("max_position_embeddings")?.unwrap_or(77))
    }

    /// Vocabulary size (default 49408).
    pub fn vocab_size(&self) -> Result<usize> {
        Ok(self.0.opt_usize("vocab_size")?.unwrap_or(49408))
    }

    /// LayerNorm epsilon (default 1e-5).
    pub fn layer_norm_eps(&self) -> Result<f64> {
        Ok(self.0.opt_f64("layer_norm_eps")?.unwrap_or(1e-5))
    }
}

/// `vae/config.json` (`AutoencoderKL`).
#[derive(Debug, Clone)]
pub struct VaeConfig(pub Config);

impl VaeConfig {
    /// Latent channels (default 4).
    pub fn latent_channels(&self) -> Result<usize> {
        Ok(self.0.opt_usize("latent_channels")?.unwrap_or(4))
    }

    /// Latent scale: latents fed to the U-Net are `mean · scaling_factor` (default 0.18215;
    /// SDXL 0.13025).
    pub fn scaling_factor(&self) -> Result<f64> {
        Ok(self.0.opt_f64("scaling_factor")?.unwrap_or(0.18215))
    }

    /// Channels per level (required).
    pub fn block_out_channels(&self) -> Result<Vec<usize>> {
        self.0.usize_list("block_out_channels")
    }

    /// ResNets per encoder level (default 1, as `AutoencoderKL`; SD VAEs say 2).
    pub fn layers_per_block(&self) -> Result<usize> {
        Ok(self.0.opt_usize("layers_per_block")?.unwrap_or(1))
    }
}
