//! Text-to-image generation (sd-scripts `gen_img.py` behaviour): samplers, prompt weighting
//! and long prompts, per-line prompt options, the txt2img pipeline with classifier-free
//! guidance, LoRA networks at inference, PNG output with generation metadata, and the sample
//! images train-network makes during training.
//!
//! - [`sampler`]: `ddim`, `lms`, `euler`, `euler_a`, `heun`, `dpm_2`, `dpm_2_a`,
//!   `dpmsolver`, `dpmsolver++` (and the `k_` aliases); `pndm` and `dpmsingle` are refused.
//! - [`prompt`]: `(word:1.2)` syntax, `--n/--w/--h/--s/--l/--d/--am/…` options, sample prompt
//!   files (.txt/.toml/.json).
//! - [`encode`]: weighted 77-token chunks through the text encoder(s).
//! - [`pipeline`]: seeded start noise, guidance, sampling loop, decoding.
//! - [`png`]: PNG files with `tEXt` metadata.
//!
//! # Source
//! `../shared/spec/generation.md`; training.md §12 for [`sample_images`].

pub mod dynamic;
pub mod encode;
pub mod pipeline;
pub mod png;
pub mod prompt;
pub mod sampler;

use std::path::{Path, PathBuf};

use sd_formats::keymap::Component;

use crate::loader::StableDiffusion;
use crate::lora::{ComponentLayers, LoraNetwork, LoraWeights};

pub use encode::{EmbNormalize, TextOptions};
pub use pipeline::{GenerationSettings, ImageSpec, SdxlSize, txt2img};
pub use prompt::{
    SamplePrompt, check_sample_prompts, parse_prompt_attention, parse_prompt_line,
    read_sample_prompts,
};
pub use sampler::{Sampler, SamplerConfig, SamplerKind};

/// Result type of the generation functions.
pub type Result<T> = std::result::Result<T, GenerateError>;

/// Errors of generation.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A setting, prompt file or input that cannot be used, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// A LoRA file could not be loaded or applied.
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
}

/// Python's `random.Random(seed)` (MT19937 seeded by `init_by_array` with the seed's 32-bit
/// words), for gen_img's seed generator: `randint(0, 2³²−1)` gives the same image seeds as
/// sd-scripts for the same `--seed`.
///
/// # Source
/// Matsumoto & Nishimura 1998 (MT19937, `init_by_array` of mt19937ar.c); CPython
/// `random_seed`, `getrandbits`, `_randbelow_with_getrandbits`.
#[derive(Clone)]
pub struct PyRandom {
    mt: Box<[u32; 624]>,
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish()
    }
}

impl PyRandom {
    /// `random.Random(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut key: Vec<u32> = Vec::new();
        let mut s = seed;
        while s > 0 {
            key.push(s as u32);
            s >>= 32;
        }
        if key.is_empty() {
            key.push(0);
        }
        let mut mt = Box::new([0u32; 624]);
        mt[0] = 19_650_218;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..624.max(key.len()) {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..623 {
            mt[i] = (mt[i] ^ (mt[i - 1] ^ (mt[i - 1] >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= 624 {
                mt[0] = mt[623];
                i = 1;
            }
        }
        mt[0] = 0x8000_0000;
        Self { mt, index: 624 }
    }

    /// A seed from the clock and process id, for runs without `--seed`.
    pub fn from_entropy() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        Self::new(h.finish())
    }

    fn twist(&mut self) {
        let mt = &mut self.mt;
        for i in 0..624 {
            let y = (mt[i] & 0x8000_0000) | (mt[(i + 1) % 624] & 0x7fff_ffff);
            let mut v = mt[(i + 397) % 624] ^ (y >> 1);
            if y & 1 != 0 {
                v ^= 0x9908_b0df;
            }
            mt[i] = v;
        }
        self.index = 0;
    }

    /// The next tempered 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.mt[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for k ≤ 32: the top k bits of one output.
    fn getrandbits(&mut self, k: u32) -> u64 {
        if k == 0 {
            return 0;
        }
        u64::from(self.next_u32() >> (32 - k))
    }

    /// `_randbelow(n)` (CPython 3.11): k = bit length of n, k-bit draws rejected until below n.
    /// `n` in 1..=2³²−1.
    fn randbelow(&mut self, n: u64) -> u64 {
        let k = 64 - n.leading_zeros();
        loop {
            let r = self.getrandbits(k);
            if r < n {
                return r;
            }
        }
    }

    /// `randint(a, b)` for b − a < 2³² − 1 (one `_randbelow(b − a + 1)`, even when a = b).
    pub fn randint(&mut self, a: u64, b: u64) -> u64 {
        a + self.randbelow(b - a + 1)
    }

    /// The indices `random.sample(range(n), k)` picks, in order (CPython 3.11: a shrinking
    /// pool for small n, rejection of repeats otherwise). `k` ≤ `n`.
    pub fn sample_indices(&mut self, n: usize, k: usize) -> Vec<usize> {
        let mut setsize = 21usize;
        if k > 5 {
            // 4 ** ceil(log4(3k))
            let mut p = 1usize;
            while p < k * 3 {
                p *= 4;
            }
            setsize += p;
        }
        let mut out = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow((n - i) as u64) as usize;
                out.push(pool[j]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::new();
            for _ in 0..k {
                let mut j = self.randbelow(n as u64) as usize;
                while selected.contains(&j) {
                    j = self.randbelow(n as u64) as usize;
                }
                selected.insert(j);
                out.push(j);
            }
        }
        out
    }

    /// `randint(0, 2**32 - 1)`: 33-bit draws rejected until below 2³².
    pub fn randint_u32_range(&mut self) -> u64 {
        loop {
            let low = u64::from(self.next_u32());
            let high = u64::from(self.next_u32() >> 31);
            let r = low | (high << 32);
            if r < 1 << 32 {
                return r;
            }
        }
    }
}

/// `im_{YYYYmmddHHMMSS}_{index:03}_{seed}.png` (generation.md §8.1 rule 4, no highres fix).
pub fn image_file_name(timestamp: &str, index_in_batch: usize, seed: u64) -> String {
    format!("im_{timestamp}_{index_in_batch:03}_{seed}.png")
}

/// The local time as `YYYYmmddHHMMSS`.
pub fn timestamp_now() -> String {
    chrono::Local::now().format("%Y%m%d%H%M%S").to_string()
}

/// The layers of every component of `model` that LoRA networks attach to.
pub fn model_components(model: &StableDiffusion) -> Vec<ComponentLayers<'_>> {
    let mut c = vec![ComponentLayers {
        component: Component::Unet,
        layers: model.unet.lora_layers(),
    }];
    for slot in &model.text_encoders {
        c.push(ComponentLayers {
            component: slot.component,
            layers: slot.model.lora_layers(),
        });
    }
    c
}

/// LoRA networks loaded for inference (generation.md §7): merged ones are folded into the
/// weights; dynamic ones keep a default multiplier and take per-prompt `--am` values.
pub struct InferenceNetworks {
    dynamic: Vec<(LoraNetwork, f64)>,
    /// `(file, multiplier, merged)` of every network, in order (for metadata and logs).
    pub loaded: Vec<(PathBuf, f64, bool)>,
}

impl std::fmt::Debug for InferenceNetworks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InferenceNetworks")
            .field("loaded", &self.loaded)
            .finish()
    }
}

impl InferenceNetworks {
    /// Loads `files` with their default `multipliers` (one per file; missing ones are 1.0);
    /// the first `merge_count` are merged into the model, the rest applied dynamically.
    ///
    /// # Errors
    /// [`GenerateError::Lora`] naming the file (unreadable, another family, shape mismatch).
    pub fn load(
        model: &StableDiffusion,
        files: &[PathBuf],
        multipliers: &[f64],
        merge_count: usize,
    ) -> Result<Self> {
        let components = model_components(model);
        let mut dynamic = Vec::new();
        let mut loaded = Vec::new();
        for (i, file) in files.iter().enumerate() {
            let m = multipliers.get(i).copied().unwrap_or(1.0);
            let weights = LoraWeights::load(file, &Default::default())?;
            let (mut net, report) =
                LoraNetwork::from_weights(&weights, model.family, &components, m)?;
            if !report.unmatched.is_empty() {
                tracing::warn!(
                    "{}: {} module(s) match no layer of the model and are unused",
                    file.display(),
                    report.unmatched.len()
                );
            }
            let merge = i < merge_count;
            tracing::info!(
                "LoRA {}: {} module(s), multiplier {m}{}",
                file.display(),
                report.total(),
                if merge { ", merged" } else { "" }
            );
            if merge {
                net.merge();
            } else {
                net.apply();
                dynamic.push((net, m));
            }
            loaded.push((file.clone(), m, merge));
        }
        Ok(Self { dynamic, loaded })
    }

    /// Number of dynamic (not merged) networks: what `--am` values address.
    pub fn dynamic_count(&self) -> usize {
        self.dynamic.len()
    }

    /// Sets each dynamic network's multiplier: `values[i]` (the last value repeated when too
    /// few), or the defaults when `values` is `None` (§7.4). Returns the multipliers set.
    pub fn set_multipliers(&self, values: Option<&[f64]>) -> Vec<f64> {
        let mut set = Vec::new();
        for (i, (net, default)) in self.dynamic.iter().enumerate() {
            let m = match values {
                Some(v) if !v.is_empty() => v[i.min(v.len() - 1)],
                _ => *default,
            };
            net.set_multiplier(m);
            set.push(m);
        }
        set
    }
}

/// Options of [`sample_images`].
#[derive(Debug, Clone)]
pub struct SampleOptions<'a> {
    /// `--sample_sampler` (a prompt's `--ss` overrides it).
    pub sampler: SamplerKind,
    /// Folder for the images (created if missing).
    pub out_dir: &'a Path,
    /// `--output_name` prefix.
    pub output_name: Option<&'a str>,
    /// `Some(epoch)` for epoch-end samples (`e{epoch:06}`), `None` for step samples.
    pub epoch: Option<usize>,
    /// Global step (used when `epoch` is `None`).
    pub step: usize,
    /// `--clip_skip`.
    pub clip_skip: Option<usize>,
    /// `--zero_terminal_snr`.
    pub zero_terminal_snr: bool,
}

/// Makes train-network's sample images (training.md §12.2) with the model as it is (LoRA
/// applied by the caller) and returns the written files.
///
/// Per prompt: scheduler from [`SamplerConfig::training_sample`]; SD prompts weighted with
/// up to 3 chunks and re-normalised, SDXL without re-normalisation; start noise from the
/// prompt's seed (or a random one); CFG with the negative prompt or "". Files are named
/// `{output_name_}{e{epoch:06} | {step:06}}_{index:02}_{YYYYmmddHHMMSS}{_seed}.png`.
///
/// # Compatibility
/// libtorch's global CPU generator is re-seeded afterwards from a value drawn from it before
/// sampling (tch cannot save and restore the generator state), so training randomness stays
/// deterministic for a given `--seed`, though not identical to a run without samples.
///
/// # Errors
/// [`GenerateError`] for bad sizes, samplers or unwritable folders.
pub fn sample_images(
    model: &StableDiffusion,
    prompts: &[SamplePrompt],
    opts: &SampleOptions<'_>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(opts.out_dir).map_err(|source| GenerateError::Io {
        path: opts.out_dir.to_owned(),
        source,
    })?;
    let resume = tch::Tensor::randint(
        i64::from(u32::MAX),
        [1],
        (tch::Kind::Int64, tch::Device::Cpu),
    )
    .int64_value(&[0]);
    let mut rng = PyRandom::from_entropy();
    let result = (|| {
        let mut written = Vec::new();
        for p in prompts {
            let kind = match &p.sampler {
                Some(name) => name.parse()?,
                None => opts.sampler,
            };
            let mut sampler = SamplerConfig::training_sample(kind, model.prediction);
            sampler.zero_terminal_snr = opts.zero_terminal_snr;
            let sdxl = model.family == sd_formats::family::ModelFamily::Sdxl;
            let (w, h) = if sdxl {
                (p.width / 32 * 32, p.height / 32 * 32)
            } else {
                (p.width, p.height)
            };
            let settings = GenerationSettings {
                width: w.max(64),
                height: h.max(64),
                steps: p.sample_steps,
                scale: p.scale,
                negative_scale: None,
                sampler,
                text: TextOptions {
                    clip_skip: opts.clip_skip,
                    max_embeddings_multiples: 3,
                    normalize: if sdxl {
                        EmbNormalize::None
                    } else {
                        EmbNormalize::Original
                    },
                },
                sdxl: SdxlSize::default(),
            };
            let seed = p.seed.unwrap_or_else(|| rng.randint_u32_range());
            let spec = ImageSpec {
                prompt: p.prompt.clone(),
                negative_prompt: p.negative_prompt.clone().unwrap_or_default(),
                seed,
            };
            let (_, images) = txt2img(
                model,
                std::slice::from_ref(&spec),
                &settings,
                &mut |_, _| {},
            )?;
            let when = match opts.epoch {
                Some(e) => format!("e{e:06}"),
                None => format!("{:06}", opts.step),
            };
            let prefix = opts
                .output_name
                .map(|n| format!("{n}_"))
                .unwrap_or_default();
            let seed_part = p.seed.map(|s| format!("_{s}")).unwrap_or_default();
            let name = format!(
                "{prefix}{when}_{:02}_{}{seed_part}.png",
                p.index,
                timestamp_now()
            );
            let path = opts.out_dir.join(name);
            let text = vec![
                ("prompt".to_owned(), p.prompt.clone()),
                ("negative-prompt".to_owned(), spec.negative_prompt.clone()),
                ("seed".to_owned(), seed.to_string()),
                ("sampler".to_owned(), kind.name().to_owned()),
                ("steps".to_owned(), p.sample_steps.to_string()),
                ("scale".to_owned(), png::py_float(p.scale)),
            ];
            let bytes = png::encode_png(
                &images[0],
                settings.width as u32,
                settings.height as u32,
                &text,
            )?;
            png::write_atomically(&path, &bytes)?;
            tracing::info!("sample image {}", path.display());
            written.push(path);
        }
        Ok(written)
    })();
    tch::manual_seed(resume);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(
            image_file_name("20240101120000", 3, 42),
            "im_20240101120000_003_42.png"
        );
    }
}
