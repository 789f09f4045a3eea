//! The txt2img pipeline: start noise per seed, classifier-free guidance, the sampling loop,
//! SDXL size conditioning, and VAE decoding.
//!
//! # Source
//! generation.md §5.5 (noise), §6 (pipeline, guidance, SDXL vector, decoding); diffusers 0.32
//! `StableDiffusionPipeline.__call__` / `StableDiffusionXLPipeline.__call__` for the step order.

use sd_formats::family::ModelFamily;
use tch::{Device, Kind, Tensor};

use super::encode::{Conditioning, TextOptions, encode_texts};
use super::sampler::{Sampler, SamplerConfig};
use super::{GenerateError, Result};
use crate::loader::StableDiffusion;
use crate::models::unet::TextTimeCondition;

/// SDXL size and crop conditioning values as given (CLI or prompt); `None` = the defaults of
/// generation.md §6.5 (original = target size, negative original = original, crop 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SdxlSize {
    /// Original width in pixels.
    pub original_width: Option<i64>,
    /// Original height in pixels.
    pub original_height: Option<i64>,
    /// Original width for the negative prompt.
    pub original_width_negative: Option<i64>,
    /// Original height for the negative prompt.
    pub original_height_negative: Option<i64>,
    /// Crop top in pixels.
    pub crop_top: Option<i64>,
    /// Crop left in pixels.
    pub crop_left: Option<i64>,
}

/// Settings shared by the images of one batch (gen_img's "extended" parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationSettings {
    /// Width in pixels (a multiple of 8; of 32 for SDXL).
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Sampling steps.
    pub steps: usize,
    /// CFG scale; guidance is active when > 1.
    pub scale: f64,
    /// `--negative_scale`: three-way guidance with an empty prompt (§6.2).
    pub negative_scale: Option<f64>,
    /// The scheduler.
    pub sampler: SamplerConfig,
    /// Prompt encoding.
    pub text: TextOptions,
    /// SDXL conditioning values.
    pub sdxl: SdxlSize,
}

/// One image to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    /// Prompt (attention syntax allowed).
    pub prompt: String,
    /// Negative prompt ("" for none).
    pub negative_prompt: String,
    /// Seed of its start noise and sampler noise.
    pub seed: u64,
}

/// The start noise and the sampler noise of one image: after `torch.manual_seed(seed)` on the
/// CPU generator, `start` = `torch.randn(1, 4, h, w)` (what diffusers and sd-scripts draw for
/// that seed), then `draws` more tensors of the same shape, one `randn` each.
///
/// Uses (and leaves changed) libtorch's global CPU generator.
///
/// # Shapes
/// `latent_h`, `latent_w` in latent cells (pixels / 8) → `[1, 4, h, w]` f32 CPU, and `draws`
/// tensors of that shape.
pub fn seeded_noise(
    seed: u64,
    latent_h: i64,
    latent_w: i64,
    draws: usize,
) -> (Tensor, Vec<Tensor>) {
    tch::manual_seed(seed as i64);
    let opts = (Kind::Float, Device::Cpu);
    let start = Tensor::randn([1, 4, latent_h, latent_w], opts);
    let noises = (0..draws)
        .map(|_| Tensor::randn([1, 4, latent_h, latent_w], opts))
        .collect();
    (start, noises)
}

/// Classifier-free guidance around the U-Net for one batch.
pub struct Guidance<'a> {
    model: &'a StableDiffusion,
    /// Context rows: [negatives, prompts] (+ [empty prompts] with a negative scale); prompts
    /// only without CFG.
    context: Tensor,
    added: Option<TextTimeCondition>,
    scale: f64,
    negative_scale: Option<f64>,
    batch: i64,
}

impl std::fmt::Debug for Guidance<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guidance")
            .field("scale", &self.scale)
            .field("negative_scale", &self.negative_scale)
            .field("batch", &self.batch)
            .finish()
    }
}

fn cfg_active(scale: f64) -> bool {
    scale > 1.0
}

impl<'a> Guidance<'a> {
    /// Encodes the prompts of `images` (and negatives when guidance is active) and builds the
    /// SDXL added conditioning.
    ///
    /// # Errors
    /// Tokenizer failures ([`GenerateError::Invalid`]).
    pub fn new(
        model: &'a StableDiffusion,
        images: &[ImageSpec],
        settings: &GenerationSettings,
    ) -> Result<Self> {
        let b = images.len();
        let cfg = cfg_active(settings.scale);
        let negative_scale = if cfg { settings.negative_scale } else { None };
        if !cfg && settings.negative_scale.is_some() {
            tracing::warn!("--negative_scale has no effect without guidance (scale ≤ 1)");
        }
        let mut texts: Vec<&str> = Vec::new();
        if cfg {
            texts.extend(images.iter().map(|i| i.negative_prompt.as_str()));
        }
        texts.extend(images.iter().map(|i| i.prompt.as_str()));
        if negative_scale.is_some() {
            texts.extend(std::iter::repeat_n("", b));
        }
        let Conditioning { context, pooled } = encode_texts(model, &texts, &settings.text)?;
        let added = match (model.family, pooled) {
            (ModelFamily::Sdxl, Some(pooled)) => {
                let s = settings.sdxl;
                let (h, w) = (settings.height, settings.width);
                let oh = s.original_height.unwrap_or(h);
                let ow = s.original_width.unwrap_or(w);
                let onh = s.original_height_negative.unwrap_or(oh);
                let onw = s.original_width_negative.unwrap_or(ow);
                let (ct, cl) = (s.crop_top.unwrap_or(0), s.crop_left.unwrap_or(0));
                let pos = [oh, ow, ct, cl, h, w];
                let neg = [onh, onw, ct, cl, h, w];
                let mut rows: Vec<f32> = Vec::new();
                if cfg {
                    for _ in 0..b {
                        rows.extend(neg.iter().map(|&v| v as f32));
                    }
                }
                for _ in 0..(texts.len() - if cfg { b } else { 0 }) {
                    rows.extend(pos.iter().map(|&v| v as f32));
                }
                let time_ids = Tensor::from_slice(&rows)
                    .view([texts.len() as i64, 6])
                    .to_device(pooled.device())
                    .to_kind(pooled.kind());
                Some(TextTimeCondition {
                    text_embeds: pooled,
                    time_ids,
                })
            }
            (ModelFamily::Sdxl, None) => {
                return Err(GenerateError::Invalid(
                    "SDXL model without a projected text encoder 2 output".to_owned(),
                ));
            }
            _ => None,
        };
        Ok(Self {
            model,
            context,
            added,
            scale: settings.scale,
            negative_scale,
            batch: b as i64,
        })
    }

    /// Builds guidance from precomputed context rows (for tests against goldens).
    ///
    /// # Shapes
    /// `context` [k·B, S, D] ordered as documented on the struct; `added` matching rows.
    pub fn from_context(
        model: &'a StableDiffusion,
        context: Tensor,
        added: Option<TextTimeCondition>,
        scale: f64,
        negative_scale: Option<f64>,
        batch: i64,
    ) -> Self {
        Self {
            model,
            context,
            added,
            scale,
            negative_scale,
            batch,
        }
    }

    /// The U-Net context rows.
    pub fn context(&self) -> &Tensor {
        &self.context
    }

    /// The guided model output for the scaled model input `x_in` at `timestep`.
    ///
    /// # Shapes
    /// `x_in` [B, 4, h, w] (f32 or the run dtype) → [B, 4, h, w] f32.
    pub fn predict(&self, x_in: &Tensor, timestep: f64) -> Tensor {
        let (guided, _, _) = self.predict_parts(x_in, timestep);
        guided
    }

    /// Like [`Guidance::predict`], also returning the unconditional (negative) and
    /// conditional outputs (`None` without guidance).
    pub fn predict_parts(&self, x_in: &Tensor, timestep: f64) -> (Tensor, Option<Tensor>, Tensor) {
        let kind = self.context.kind();
        let device = self.context.device();
        let copies = if !cfg_active(self.scale) {
            1
        } else if self.negative_scale.is_some() {
            3
        } else {
            2
        };
        let x = x_in.to_device(device).to_kind(kind);
        let input = if copies == 1 {
            x
        } else {
            Tensor::cat(&vec![&x; copies], 0)
        };
        let t = Tensor::from(timestep as f32).to_device(device);
        let out = tch::no_grad(|| {
            self.model
                .unet
                .forward(&input, &t, &self.context, self.added.as_ref())
        })
        .to_kind(Kind::Float);
        if copies == 1 {
            return (out.shallow_clone(), None, out);
        }
        let parts = out.split(self.batch, 0);
        let (uncond, cond) = (&parts[0], &parts[1]);
        let guided = match self.negative_scale {
            None => uncond + (cond - uncond) * self.scale,
            Some(n) => {
                let empty = &parts[2];
                empty + (cond - empty) * self.scale - (uncond - empty) * n
            }
        };
        (guided, Some(uncond.shallow_clone()), cond.shallow_clone())
    }
}

/// Runs the sampling loop from start noise N(0, I) (multiplied by the sampler's
/// `init_noise_sigma` here) and returns the final latents.
///
/// `noise` hands the ancestral samplers one N(0, I) batch per request; `progress(call, total)`
/// is called after each U-Net call.
///
/// # Shapes
/// `start` [B, 4, h, w] → [B, 4, h, w] f32.
pub fn denoise(
    guidance: &Guidance<'_>,
    sampler: &mut Sampler,
    start: &Tensor,
    noise: &mut dyn FnMut() -> Tensor,
    progress: &mut dyn FnMut(usize, usize),
) -> Tensor {
    let device = guidance.context.device();
    let mut x = start.to_device(device).to_kind(Kind::Float) * sampler.init_noise_sigma();
    let total = sampler.num_calls();
    for call in 0..total {
        let x_in = sampler.scale_model_input(&x, call);
        let out = guidance.predict(&x_in, sampler.timestep(call));
        x = sampler.step(call, &out, &x, &mut *noise);
        progress(call + 1, total);
    }
    x
}

/// VAE decoding of final latents: `vae.decode(latents / scaling_factor)`, in the VAE's
/// dtype, returned as f32 in about [−1, 1].
///
/// # Shapes
/// `latents` [B, 4, h, w] → [B, 3, 8h, 8w] f32.
pub fn decode_latents(model: &StableDiffusion, latents: &Tensor) -> Tensor {
    let kind = model.vae_vs.kind();
    let device = model.vae_vs.device();
    let z = (latents.to_kind(Kind::Float) / model.latent_scale())
        .to_device(device)
        .to_kind(kind);
    tch::no_grad(|| model.vae.decode(&z)).to_kind(Kind::Float)
}

/// Converts decoded images to 8-bit RGB: clamp(x/2 + 0.5, 0, 1)·255, rounded (§6.6).
///
/// # Shapes
/// `decoded` [B, 3, H, W] → B buffers of H·W·3 bytes (row-major, RGB interleaved).
pub fn to_rgb8(decoded: &Tensor) -> Vec<Vec<u8>> {
    let img = (decoded.to_kind(Kind::Float) / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
    let img = img
        .round()
        .to_kind(Kind::Uint8)
        .permute([0, 2, 3, 1])
        .contiguous()
        .to_device(Device::Cpu);
    let b = img.size()[0];
    (0..b)
        .map(|i| Vec::<u8>::try_from(img.get(i).view([-1])).expect("u8 tensor converts"))
        .collect()
}

/// Checks width and height: positive multiples of 8 (of 32 for SDXL, §13 #13).
///
/// # Errors
/// [`GenerateError::Invalid`] naming the size.
pub fn check_size(family: ModelFamily, width: i64, height: i64) -> Result<()> {
    let m = if family == ModelFamily::Sdxl { 32 } else { 8 };
    if width <= 0 || height <= 0 || width % m != 0 || height % m != 0 {
        return Err(GenerateError::Invalid(format!(
            "image size {width}×{height}: width and height must be positive multiples of {m}{}",
            if m == 32 { " for SDXL" } else { "" }
        )));
    }
    Ok(())
}

/// Generates one batch: per-image seeded noise, guidance, sampling, decoding.
///
/// Returns the final latents [B, 4, h, w] and the images as 8-bit RGB buffers.
///
/// # Errors
/// [`GenerateError::Invalid`] for bad sizes, sampler settings or prompts.
pub fn txt2img(
    model: &StableDiffusion,
    images: &[ImageSpec],
    settings: &GenerationSettings,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(Tensor, Vec<Vec<u8>>)> {
    if images.is_empty() {
        return Ok((Tensor::zeros([0], (Kind::Float, Device::Cpu)), Vec::new()));
    }
    check_size(model.family, settings.width, settings.height)?;
    let mut sampler = Sampler::new(settings.sampler, settings.steps)?;
    let (lh, lw) = (settings.height / 8, settings.width / 8);
    let draws = if settings.sampler.kind.is_ancestral() {
        settings.steps * settings.sampler.kind.noises_per_step()
    } else {
        0
    };
    let mut starts = Vec::new();
    let mut streams = Vec::new();
    for img in images {
        let (s, n) = seeded_noise(img.seed, lh, lw, draws);
        starts.push(s);
        streams.push(n);
    }
    let start = Tensor::cat(&starts, 0);
    let guidance = Guidance::new(model, images, settings)?;
    let mut drawn = 0usize;
    let mut noise = || {
        let parts: Vec<Tensor> = streams
            .iter()
            .map(|s| {
                s.get(drawn).map_or_else(
                    // More draws than reserved cannot happen for the implemented samplers;
                    // fall back to fresh noise rather than fail mid-run.
                    || Tensor::randn([1, 4, lh, lw], (Kind::Float, Device::Cpu)),
                    Tensor::shallow_clone,
                )
            })
            .collect();
        drawn += 1;
        Tensor::cat(&parts, 0)
    };
    let latents = denoise(&guidance, &mut sampler, &start, &mut noise, progress);
    let decoded = decode_latents(model, &latents);
    Ok((latents, to_rgb8(&decoded)))
}
