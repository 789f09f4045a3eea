//! Loading a whole Stable Diffusion model — U-Net, text encoder(s), VAE, tokenizer(s) — from a
//! single-file checkpoint (LDM/SGM layout, `.safetensors` or `.ckpt`) or a Diffusers folder.
//!
//! Single files carry no architecture description. The configuration comes from, in order:
//! `ModelLoadOptions::config_dir` (a Diffusers folder whose `*/config.json` describe the file,
//! as the test fixtures do), the file's own `__metadata__` key [`CONFIG_METADATA_KEY`] (written
//! by this project for non-standard sizes such as the demo model), or the family's full-size
//! preset (SD1.5, SD2.1, SDXL base), as sd-scripts and diffusers do.
//!
//! Keys are mapped with `sd_formats::keymap` plans (every key accounted for; unknown keys are an
//! error listing them), tensors cast to the requested kind and moved to the device one at a
//! time, so peak host memory stays near one copy of the largest tensor beyond the model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sd_formats::diffusers::DiffusersModel;
use sd_formats::family::{ModelFamily, PredictionType as FilePrediction};
use sd_formats::keymap::{Component, ToDiffusersOp, plan_to_diffusers};
use sd_formats::tensor_file::TensorFile;
use serde_json::Value;
use tch::{Device, Kind, nn::VarStore};

use crate::models::text_encoder::{ClipTextConfig, ClipTextModel, IGNORED_KEYS};
use crate::models::unet::{Unet, UnetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::schedule::PredictionType;
use crate::tensor::from_bytes;
use crate::tokenizer::{ClipTokenizer, PadConvention};
use crate::weights::{LoadOptions, VarStoreFiller};

/// `__metadata__` key under which this project stores the Diffusers configs of a single-file
/// model of non-standard size: a JSON object `{"unet": {…}, "text_encoder": {…},
/// "text_encoder_2": {…}, "vae": {…}}` with each component's `config.json` content.
pub const CONFIG_METADATA_KEY: &str = "sd_lora_rs.configs";

/// Errors from loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the file or folder failed.
    #[error(transparent)]
    Format(#[from] sd_formats::error::Error),
    /// Key mapping or Diffusers folder problem.
    #[error(transparent)]
    KeyMap(#[from] sd_formats::keymap::KeyMapError),
    /// A configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::models::config::ConfigError),
    /// A text-encoder configuration or tokenizer problem.
    #[error(transparent)]
    TextEncoder(#[from] crate::models::text_encoder::TextEncoderError),
    /// The weights do not fit the model built from the configuration.
    #[error("{0}{hint}", hint = SIZE_HINT)]
    Weights(#[from] crate::weights::WeightsError),
    /// The tokenizer could not be built.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// Anything else, with its message.
    #[error("{0}")]
    Other(String),
}

const SIZE_HINT: &str = "\n(hint: a model of non-standard size needs its configuration: pass the Diffusers folder that describes it as the model config directory)";

/// How to load a model.
#[derive(Debug, Clone)]
pub struct ModelLoadOptions {
    /// Device for all components.
    pub device: Device,
    /// Kind of the U-Net and text-encoder weights (f32, f16, bf16).
    pub kind: Kind,
    /// Kind of the VAE weights (SDXL's VAE overflows in f16: keep it f32 unless asked).
    pub vae_kind: Kind,
    /// `--v2`: the file is SD2.x (a family check, since SD2 is also detected from the keys).
    pub v2: bool,
    /// `--v_parameterization`: the model predicts v (weights cannot tell).
    pub v_parameterization: bool,
    /// Diffusers folder whose configs describe a single file.
    pub config_dir: Option<PathBuf>,
}

impl Default for ModelLoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            kind: Kind::Float,
            vae_kind: Kind::Float,
            v2: false,
            v_parameterization: false,
            config_dir: None,
        }
    }
}

/// One text encoder with its variables and tokenizer.
pub struct TextEncoderSlot {
    /// The Diffusers component it came from (`text_encoder` or `text_encoder_2`).
    pub component: Component,
    /// The model.
    pub model: ClipTextModel,
    /// Its variables (Diffusers keys).
    pub vs: VarStore,
    /// The tokenizer, with the family's padding convention.
    pub tokenizer: ClipTokenizer,
}

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    /// SD1.x, SD2.x or SDXL.
    pub family: ModelFamily,
    /// ε or v prediction (from the options; weights cannot tell).
    pub prediction: PredictionType,
    /// The U-Net.
    pub unet: Unet,
    /// U-Net variables (Diffusers keys).
    pub unet_vs: VarStore,
    /// Text encoder(s): one for SD1/SD2, two for SDXL.
    pub text_encoders: Vec<TextEncoderSlot>,
    /// The VAE.
    pub vae: Vae,
    /// VAE variables.
    pub vae_vs: VarStore,
    /// Where the model was loaded from.
    pub source: PathBuf,
}

impl StableDiffusion {
    /// Loads a single file or a Diffusers folder (chosen by whether `path` is a directory).
    ///
    /// # Errors
    /// [`LoadError`] naming the file and the key or setting at fault.
    pub fn load(path: &Path, opts: &ModelLoadOptions) -> Result<Self, LoadError> {
        if path.is_dir() {
            load_diffusers(path, opts)
        } else {
            load_single_file(path, opts)
        }
    }

    /// The latent scale of the VAE (0.18215 SD1/SD2, 0.13025 SDXL, or the config's value).
    pub fn latent_scale(&self) -> f64 {
        self.vae.config().scaling_factor
    }
}

/// The configs of one model.
struct Configs {
    unet: UnetConfig,
    text_encoders: Vec<(Component, ClipTextConfig)>,
    vae: VaeConfig,
}

fn preset_configs(family: ModelFamily) -> Configs {
    match family {
        ModelFamily::Sd1 => Configs {
            unet: UnetConfig::sd15(),
            text_encoders: vec![(Component::TextEncoder, ClipTextConfig::clip_vit_l14())],
            vae: VaeConfig::sd(),
        },
        ModelFamily::Sd2 => Configs {
            unet: UnetConfig::sd21(),
            text_encoders: vec![(Component::TextEncoder, ClipTextConfig::open_clip_vit_h14())],
            vae: VaeConfig::sd(),
        },
        ModelFamily::Sdxl => Configs {
            unet: UnetConfig::sdxl(),
            text_encoders: vec![
                (Component::TextEncoder, ClipTextConfig::clip_vit_l14()),
                (
                    Component::TextEncoder2,
                    ClipTextConfig::open_clip_vit_bigg14(),
                ),
            ],
            vae: VaeConfig::sdxl(),
        },
    }
}

fn text_components(family: ModelFamily) -> &'static [Component] {
    match family {
        ModelFamily::Sdxl => &[Component::TextEncoder, Component::TextEncoder2],
        _ => &[Component::TextEncoder],
    }
}

fn configs_from_json(
    family: ModelFamily,
    values: &HashMap<Component, (Value, String)>,
) -> Result<Configs, LoadError> {
    let get = |c: Component| {
        values
            .get(&c)
            .ok_or_else(|| LoadError::Other(format!("no {} configuration found", c.name())))
    };
    let (unet_json, unet_src) = get(Component::Unet)?;
    let (vae_json, vae_src) = get(Component::Vae)?;
    let mut text_encoders = Vec::new();
    for &c in text_components(family) {
        let (json, src) = get(c)?;
        let cfg = ClipTextConfig::from_json_value(json, src)?;
        text_encoders.push((c, cfg));
    }
    Ok(Configs {
        unet: UnetConfig::from_json(unet_json, unet_src)?,
        text_encoders,
        vae: VaeConfig::from_json(vae_json, vae_src)?,
    })
}

fn configs_from_dir(family: ModelFamily, dir: &Path) -> Result<Configs, LoadError> {
    let model = DiffusersModel::open(dir)?;
    let mut values = HashMap::new();
    for c in [Component::Unet, Component::Vae]
        .iter()
        .chain(text_components(family))
    {
        let path = model.component_dir(c.name())?.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| LoadError::Other(format!("reading {}: {e}", path.display())))?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| LoadError::Other(format!("{}: invalid JSON: {e}", path.display())))?;
        values.insert(*c, (json, path.display().to_string()));
    }
    configs_from_json(family, &values)
}

fn configs_from_metadata(
    family: ModelFamily,
    path: &Path,
    text: &str,
) -> Result<Configs, LoadError> {
    let all: Value = serde_json::from_str(text).map_err(|e| {
        LoadError::Other(format!(
            "{}: metadata {CONFIG_METADATA_KEY} is not JSON: {e}",
            path.display()
        ))
    })?;
    let mut values = HashMap::new();
    for c in [Component::Unet, Component::Vae]
        .iter()
        .chain(text_components(family))
    {
        if let Some(v) = all.get(c.name()) {
            values.insert(
                *c,
                (
                    v.clone(),
                    format!(
                        "{} metadata {CONFIG_METADATA_KEY}.{}",
                        path.display(),
                        c.name()
                    ),
                ),
            );
        }
    }
    configs_from_json(family, &values)
}

fn prediction(opts: &ModelLoadOptions, stated: Option<FilePrediction>) -> PredictionType {
    let _ = stated; // sd-scripts follows the flags; metadata disagreement is reported by tools.
    if opts.v_parameterization {
        PredictionType::VPrediction
    } else {
        PredictionType::Epsilon
    }
}

fn pad_convention(family: ModelFamily, component: Component) -> PadConvention {
    match (family, component) {
        (ModelFamily::Sd1, _) | (ModelFamily::Sdxl, Component::TextEncoder) => {
            PadConvention::EndOfText
        }
        (ModelFamily::Sd2, _) => PadConvention::ExclamationSpecial,
        (ModelFamily::Sdxl, _) => PadConvention::Zero,
    }
}

fn new_var_store(device: Device, kind: Kind) -> VarStore {
    let mut vs = VarStore::new(device);
    vs.set_kind(kind); // no variables yet: only sets the default kind of new ones
    vs
}

/// Builds every component from `configs` and fills its variables with
/// `fill(component, var_store, ignored_keys)`, which streams the component's tensors into them
/// one at a time ([`VarStoreFiller`]): the variables are created on the device in their dtype
/// and each file tensor is read, converted and copied straight into its variable, so no second
/// copy of a component exists at any time (docs/performance.md, "Loading and --lowram").
fn build(
    family: ModelFamily,
    configs: Configs,
    opts: &ModelLoadOptions,
    source: &Path,
    mut fill: impl FnMut(Component, &VarStore, &[&str]) -> Result<(), LoadError>,
    tokenizer_dir: impl Fn(Component) -> Option<PathBuf>,
) -> Result<StableDiffusion, LoadError> {
    let unet_vs = new_var_store(opts.device, opts.kind);
    let unet = Unet::new(&unet_vs.root(), &configs.unet)?;
    fill(Component::Unet, &unet_vs, &[])?;

    let mut text_encoders = Vec::new();
    for (component, cfg) in &configs.text_encoders {
        let vs = new_var_store(opts.device, opts.kind);
        let model = ClipTextModel::new_with_kind(&vs.root(), cfg, opts.kind);
        fill(*component, &vs, IGNORED_KEYS)?;
        let pad = pad_convention(family, *component);
        let tokenizer =
            ClipTokenizer::from_dir_or_shipped(tokenizer_dir(*component).as_deref(), pad)?;
        text_encoders.push(TextEncoderSlot {
            component: *component,
            model,
            vs,
            tokenizer,
        });
    }

    let vae_vs = new_var_store(opts.device, opts.vae_kind);
    let vae = Vae::new(&vae_vs.root(), &configs.vae)?;
    fill(Component::Vae, &vae_vs, &[])?;

    Ok(StableDiffusion {
        family,
        prediction: prediction(opts, None),
        unet,
        unet_vs,
        text_encoders,
        vae,
        vae_vs,
        source: source.to_path_buf(),
    })
}

fn load_single_file(path: &Path, opts: &ModelLoadOptions) -> Result<StableDiffusion, LoadError> {
    let file = TensorFile::open(path)?;
    let keys: Vec<(String, Vec<usize>)> = file
        .names()
        .iter()
        .map(|n| {
            (
                n.clone(),
                file.info(n).map(|i| i.shape.clone()).unwrap_or_default(),
            )
        })
        .collect();
    let path_str = path.display().to_string();
    let family = ModelFamily::detect_ldm(
        keys.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        &path_str,
    )?;
    if opts.v2 && family != ModelFamily::Sd2 {
        return Err(LoadError::Other(format!(
            "{}: --v2 was given but the file is {family:?} by its keys",
            path.display()
        )));
    }
    let plan = plan_to_diffusers(
        family,
        keys.iter().map(|(k, s)| (k.as_str(), s.as_slice())),
        &path_str,
    )?;
    let configs = match (&opts.config_dir, file.metadata().get(CONFIG_METADATA_KEY)) {
        (Some(dir), _) => configs_from_dir(family, dir)?,
        (None, Some(text)) => configs_from_metadata(family, path, text)?,
        (None, None) => preset_configs(family),
    };
    let fill = |component: Component, vs: &VarStore, ignore: &[&str]| {
        let mut filler =
            VarStoreFiller::new(vs, &format!("{} ({})", path.display(), component.name()));
        for target in plan.targets(component) {
            let info = file.info(&target.ldm_key).ok_or_else(|| {
                LoadError::Other(format!(
                    "{}: planned key {} is missing",
                    path.display(),
                    target.ldm_key
                ))
            })?;
            let what = format!("{} key {}", path.display(), target.ldm_key);
            let src = from_bytes(&what, info.dtype, &info.shape, file.data(&target.ldm_key)?)
                .map_err(LoadError::Other)?;
            let shape: Vec<i64> = target.shape.iter().map(|&d| d as i64).collect();
            let t = match &target.op {
                ToDiffusersOp::Copy => src,
                ToDiffusersOp::Reshape => src.reshape(&shape),
                ToDiffusersOp::Transpose => src.tr().contiguous(),
                ToDiffusersOp::Rows { start, end } => src
                    .narrow(0, *start as i64, (*end - *start) as i64)
                    .contiguous(),
            };
            filler.put(&target.key, &t)?;
        }
        Ok(filler.finish(ignore, LoadOptions::default())?)
    };
    build(family, configs, opts, path, fill, |_| None)
}

fn load_diffusers(dir: &Path, opts: &ModelLoadOptions) -> Result<StableDiffusion, LoadError> {
    let model = DiffusersModel::open(dir)?;
    let family = model.family()?;
    let configs = configs_from_dir(family, opts.config_dir.as_deref().unwrap_or(dir))?;
    let fill = |component: Component, vs: &VarStore, ignore: &[&str]| {
        let weights = model.weights(component, None)?;
        let file = TensorFile::open(&weights.path)?;
        let mut filler = VarStoreFiller::new(vs, &weights.path.display().to_string());
        for name in file.names() {
            let info = file.info(name).ok_or_else(|| {
                LoadError::Other(format!("{}: no info for {name}", weights.path.display()))
            })?;
            let what = format!("{} key {name}", weights.path.display());
            let t = from_bytes(&what, info.dtype, &info.shape, file.data(name)?)
                .map_err(LoadError::Other)?;
            filler.put(name, &t)?;
        }
        Ok(filler.finish(ignore, LoadOptions::default())?)
    };
    let tokenizer_dir = |c: Component| {
        let name = if c == Component::TextEncoder2 {
            "tokenizer_2"
        } else {
            "tokenizer"
        };
        let d = dir.join(name);
        d.join("vocab.json").is_file().then_some(d)
    };
    build(family, configs, opts, dir, fill, tokenizer_dir)
}
