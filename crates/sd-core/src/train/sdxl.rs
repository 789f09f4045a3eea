//! The SDXL parts of the LoRA training step (sd-scripts `sdxl_train_network.py`): text
//! conditioning from both text encoders, the pooled embedding and size/crop ids of the U-Net's
//! added conditioning, and `--cache_text_encoder_outputs` (memory and disk).
//!
//! # Source
//! `../shared/spec/training.md` §4.3 (SDXL text encoding), §4.5 (caching text-encoder
//! outputs), §5.3 (latent cache file names), §6.5 (SDXL conditioning).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use ndarray_npy::{NpzReader, NpzWriter};
use sd_data::dataset::DatasetScan;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;
use tch::{Device, Kind, Tensor};

use super::trainer::{MixedPrecision, Result, TrainConfig, TrainError, TrainObserver};
use crate::loader::{StableDiffusion, TextEncoderSlot};
use crate::models::text_encoder::{OutputLayer, join_chunks};
use crate::models::unet::TextTimeCondition;

/// The SDXL text conditioning of a batch (or, without the batch axis, of one cached caption).
///
/// # Shapes
/// `hidden_state1` `[B, n·75+2, D₁]` (TE1 penultimate layer, no final LayerNorm; D₁ = 768 for
/// the real model), `hidden_state2` `[B, n·75+2, D₂]` (TE2 penultimate, no final LayerNorm;
/// D₂ = 1280), `pool2` `[B, P]` (TE2's projected pooled output of the first chunk; P = 1280).
/// n is the number of 75-token chunks (1, or 2/3 with `--max_token_length 150/225`).
#[derive(Debug)]
pub struct SdxlTextOutputs {
    /// Text encoder 1 states.
    pub hidden_state1: Tensor,
    /// Text encoder 2 states.
    pub hidden_state2: Tensor,
    /// Text encoder 2 pooled, projected embedding (`text_embeds`).
    pub pool2: Tensor,
}

impl SdxlTextOutputs {
    /// The U-Net context `concat(h₁, h₂)` on the feature axis, `[B, n·75+2, D₁+D₂]`.
    pub fn context(&self) -> Tensor {
        Tensor::cat(&[&self.hidden_state1, &self.hidden_state2], -1)
    }

    fn shallow_clone(&self) -> Self {
        Self {
            hidden_state1: self.hidden_state1.shallow_clone(),
            hidden_state2: self.hidden_state2.shallow_clone(),
            pool2: self.pool2.shallow_clone(),
        }
    }
}

fn slot(model: &StableDiffusion, component: Component) -> Result<&TextEncoderSlot> {
    model
        .text_encoders
        .iter()
        .find(|s| s.component == component)
        .ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: an SDXL model needs {} but it was not loaded",
                model.source.display(),
                component.name()
            ))
        })
}

/// Tokenises `captions` for one encoder: ids `[B·n, 77]` on `device` and n.
fn token_ids(
    slot: &TextEncoderSlot,
    captions: &[&str],
    max_token_length: Option<usize>,
    device: Device,
) -> Result<(Tensor, i64)> {
    let mut ids = Vec::new();
    let mut n_chunks = 1;
    for c in captions {
        let chunks = slot.tokenizer.tokenize_chunks(c, max_token_length)?;
        n_chunks = chunks.len() as i64;
        for ch in chunks {
            ids.extend(ch);
        }
    }
    Ok((
        Tensor::from_slice(&ids).view([-1, 77]).to_device(device),
        n_chunks,
    ))
}

/// Encodes captions with both SDXL text encoders (training.md §4.3 "SDXL"): the penultimate
/// hidden state of each without final LayerNorm, rebuilt to `n·75+2` positions, and TE2's
/// projected pooled output of the first chunk. `--clip_skip` does not apply. Gradients flow
/// when the caller has not disabled them (text-encoder LoRA training).
///
/// # Shapes
/// `captions` B strings → [`SdxlTextOutputs`] with batch axis, f32-or-weight dtype, on `device`.
///
/// # Errors
/// Tokenizer errors (`--max_token_length` other than 150/225); a model without TE2's projection.
pub fn encode_captions(
    model: &StableDiffusion,
    captions: &[&str],
    max_token_length: Option<usize>,
    device: Device,
) -> Result<SdxlTextOutputs> {
    let te1 = slot(model, Component::TextEncoder)?;
    let te2 = slot(model, Component::TextEncoder2)?;
    let (ids1, n) = token_ids(te1, captions, max_token_length, device)?;
    let out1 = te1.model.forward(&ids1);
    let hidden_state1 = join_chunks(&out1.select(OutputLayer::PenultimateRaw, &te1.model), n);
    drop(out1);
    let (ids2, n2) = token_ids(te2, captions, max_token_length, device)?;
    let out2 = te2.model.forward(&ids2);
    let hidden_state2 = join_chunks(&out2.select(OutputLayer::PenultimateRaw, &te2.model), n2);
    let pooled = out2.text_embeds.ok_or_else(|| {
        TrainError::Invalid(format!(
            "{}: SDXL text encoder 2 has no text_projection (needed for the pooled embedding)",
            model.source.display()
        ))
    })?;
    let b = captions.len() as i64;
    let pool2 = pooled.view([b, n2, -1]).select(1, 0);
    Ok(SdxlTextOutputs {
        hidden_state1,
        hidden_state2,
        pool2,
    })
}

/// SDXL's added conditioning (training.md §6.5): `text_embeds` = the pooled embedding in
/// `kind`, `time_ids` = `[h₀, w₀, top, left, h, w]` per sample (pixels; the U-Net embeds each
/// with its 256-wide sinusoid, cos first).
///
/// # Shapes
/// `pool2` `[B, P]`, `size_cond` B rows → `text_embeds` `[B, P]`, `time_ids` `[B, 6]` f32.
pub fn added_condition(
    pool2: &Tensor,
    size_cond: &[[f64; 6]],
    kind: Kind,
    device: Device,
) -> TextTimeCondition {
    let ids: Vec<f32> = size_cond
        .iter()
        .flat_map(|s| s.iter().map(|&v| v as f32))
        .collect();
    TextTimeCondition {
        text_embeds: pool2.to_device(device).to_kind(kind),
        time_ids: Tensor::from_slice(&ids)
            .view([size_cond.len() as i64, 6])
            .to_device(device),
    }
}

/// The `--cache_text_encoder_outputs_to_disk` file of an image:
/// `<image path without extension>_te_outputs.npz` (training.md §4.5).
pub fn te_cache_path(image: &Path) -> PathBuf {
    PathBuf::from(format!(
        "{}_te_outputs.npz",
        image.with_extension("").display()
    ))
}

/// The SDXL name of a latent cache file: sd-scripts writes `…_<W>x<H>_sdxl.npz` for SDXL where
/// SD uses `…_sd.npz` (training.md §5.3).
pub fn latent_cache_path(sd_path: PathBuf) -> PathBuf {
    let s = sd_path.to_string_lossy();
    match s.strip_suffix("_sd.npz") {
        Some(stem) => PathBuf::from(format!("{stem}_sdxl.npz")),
        None => sd_path,
    }
}

fn read_array2(npz: &mut NpzReader<File>, name: &str) -> Option<Array2<f32>> {
    npz.by_name(name)
        .or_else(|_| npz.by_name(&format!("{name}.npy")))
        .ok()
}

/// Reads a text-encoder cache file when it holds `hidden_state1` `[seq, d1]`,
/// `hidden_state2` `[seq, d2]` and `pool2` `[p]` of the expected sizes; `None` means
/// "regenerate" (a missing, foreign or stale file).
///
/// # Compatibility
/// sd-scripts only checks that the three keys exist; the sizes are checked here too, so a file
/// written with another `--max_token_length` or model is regenerated, not misused.
pub fn read_te_cache(path: &Path, seq: i64, d1: i64, d2: i64, p: i64) -> Option<SdxlTextOutputs> {
    let mut npz = NpzReader::new(File::open(path).ok()?).ok()?;
    let h1 = read_array2(&mut npz, "hidden_state1")?;
    let h2 = read_array2(&mut npz, "hidden_state2")?;
    let pool: Array1<f32> = npz
        .by_name("pool2")
        .or_else(|_| npz.by_name("pool2.npy"))
        .ok()?;
    let as_i64 = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
    if as_i64(h1.shape()) != [seq, d1] || as_i64(h2.shape()) != [seq, d2] || pool.len() as i64 != p
    {
        tracing::warn!(
            "{}: cached text-encoder outputs have other sizes than this model and --max_token_length give: regenerating",
            path.display()
        );
        return None;
    }
    let t2 = |a: Array2<f32>| {
        let (r, c) = a.dim();
        let data: Vec<f32> = a.into_iter().collect();
        Tensor::from_slice(&data).view([r as i64, c as i64])
    };
    let data: Vec<f32> = pool.into_iter().collect();
    Some(SdxlTextOutputs {
        hidden_state1: t2(h1),
        hidden_state2: t2(h2),
        pool2: Tensor::from_slice(&data),
    })
}

fn to_array2(t: &Tensor) -> Result<Array2<f32>> {
    let (r, c) = t
        .size2()
        .map_err(|e| TrainError::Invalid(format!("text-encoder output is not 2-D: {e}")))?;
    let data = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1]))
        .map_err(|e| TrainError::Invalid(e.to_string()))?;
    Array2::from_shape_vec((r as usize, c as usize), data)
        .map_err(|e| TrainError::Invalid(e.to_string()))
}

/// Writes one image's cached outputs (no batch axis) to `path` in sd-scripts' layout
/// (temporary file, then rename).
///
/// # Errors
/// [`TrainError::Io`] naming the file.
pub fn write_te_cache(path: &Path, outputs: &SdxlTextOutputs) -> Result<()> {
    let io = |source: std::io::Error| TrainError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    let npz_err =
        |e: ndarray_npy::WriteNpzError| TrainError::Invalid(format!("{}: {e}", path.display()));
    {
        let mut npz = NpzWriter::new(tmp.as_file());
        npz.add_array("hidden_state1", &to_array2(&outputs.hidden_state1)?)
            .map_err(npz_err)?;
        npz.add_array("hidden_state2", &to_array2(&outputs.hidden_state2)?)
            .map_err(npz_err)?;
        let pool = Vec::<f32>::try_from(outputs.pool2.to_kind(Kind::Float).contiguous())
            .map_err(|e| TrainError::Invalid(e.to_string()))?;
        npz.add_array("pool2", &Array1::from(pool))
            .map_err(npz_err)?;
        npz.finish().map_err(npz_err)?;
    }
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Text-encoder outputs cached per image (`--cache_text_encoder_outputs`), keyed by
/// (dataset index, image index); each entry without batch axis, f32 on the CPU.
#[derive(Debug, Default)]
pub struct TextOutputCache {
    entries: HashMap<(usize, usize), SdxlTextOutputs>,
}

impl TextOutputCache {
    /// Encodes the raw caption of every image of `scan` once (training.md §4.5), in batches of
    /// the dataset's batch size, without gradients; with `to_disk`, valid
    /// `<image>_te_outputs.npz` files are reused and new ones written. Returns the cache and the
    /// number of files reused.
    ///
    /// # Compatibility
    /// As in sd-scripts, the raw caption is used: caption prefix/suffix, wildcards and
    /// secondary separators do not apply to cached outputs.
    ///
    /// # Errors
    /// Tokenizer errors; [`TrainError::Io`] when a cache file cannot be written.
    pub fn build(
        model: &StableDiffusion,
        scan: &DatasetScan,
        max_token_length: Option<usize>,
        device: Device,
        to_disk: bool,
    ) -> Result<(Self, usize)> {
        let te1 = slot(model, Component::TextEncoder)?;
        let te2 = slot(model, Component::TextEncoder2)?;
        let n = max_token_length.map_or(1, |m| (m / 75) as i64);
        let seq = n * 75 + 2;
        let d1 = te1.model.token_embedding.size()[1];
        let d2 = te2.model.token_embedding.size()[1];
        let p = te2
            .model
            .text_projection
            .as_ref()
            .map_or(d2, |l| l.weight.size()[0]);
        let mut cache = Self::default();
        let mut reused = 0;
        for (di, ds) in scan.datasets.iter().enumerate() {
            let mut todo: Vec<usize> = Vec::new();
            for (ii, entry) in ds.images.iter().enumerate() {
                if to_disk {
                    let path = te_cache_path(&entry.path);
                    if let Some(c) = read_te_cache(&path, seq, d1, d2, p) {
                        cache.entries.insert((di, ii), c);
                        reused += 1;
                        continue;
                    }
                }
                todo.push(ii);
            }
            for chunk in todo.chunks(ds.config.batch_size.max(1) as usize) {
                let captions: Vec<&str> = chunk
                    .iter()
                    .map(|&ii| ds.images[ii].caption.as_str())
                    .collect();
                let out =
                    tch::no_grad(|| encode_captions(model, &captions, max_token_length, device))?;
                for (row, &ii) in chunk.iter().enumerate() {
                    let row = row as i64;
                    let one = SdxlTextOutputs {
                        hidden_state1: out
                            .hidden_state1
                            .get(row)
                            .to_kind(Kind::Float)
                            .to_device(Device::Cpu),
                        hidden_state2: out
                            .hidden_state2
                            .get(row)
                            .to_kind(Kind::Float)
                            .to_device(Device::Cpu),
                        pool2: out
                            .pool2
                            .get(row)
                            .to_kind(Kind::Float)
                            .to_device(Device::Cpu),
                    };
                    if to_disk {
                        write_te_cache(&te_cache_path(&ds.images[ii].path), &one)?;
                    }
                    cache.entries.insert((di, ii), one);
                }
            }
        }
        Ok((cache, reused))
    }

    /// Number of cached images.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The cached outputs of a batch, stacked with a batch axis and moved to `device`.
    ///
    /// # Errors
    /// [`TrainError::Invalid`] when an image was not cached (a bug of the caller).
    pub fn batch(&self, keys: &[(usize, usize)], device: Device) -> Result<SdxlTextOutputs> {
        let mut parts = Vec::with_capacity(keys.len());
        for k in keys {
            let e = self.entries.get(k).ok_or_else(|| {
                TrainError::Invalid(format!(
                    "text-encoder outputs of image {} of dataset {} were not cached",
                    k.1, k.0
                ))
            })?;
            parts.push(e.shallow_clone());
        }
        let stack = |f: fn(&SdxlTextOutputs) -> &Tensor| {
            Tensor::stack(&parts.iter().map(f).collect::<Vec<_>>(), 0).to_device(device)
        };
        Ok(SdxlTextOutputs {
            hidden_state1: stack(|o| &o.hidden_state1),
            hidden_state2: stack(|o| &o.hidden_state2),
            pool2: stack(|o| &o.pool2),
        })
    }
}

/// Checks the loaded model's family against the SDXL options of `cfg` and applies the SDXL
/// VAE guard: with `--mixed_precision fp16` and no `--no_half_vae`, the SDXL VAE is moved to
/// f32 (it overflows in fp16, giving NaN latents); latents are checked for NaN/Inf anyway.
///
/// # Compatibility
/// sd-scripts runs the SDXL VAE in fp16 there and replaces NaN latents by zeros with a warning;
/// this port keeps the VAE in f32 instead (bf16 VAEs are kept as asked).
///
/// # Errors
/// `--sdxl` with a non-SDXL checkpoint; `--cache_text_encoder_outputs` with a non-SDXL model or
/// while training a text encoder; `--v2` with SDXL.
pub(super) fn check_family(
    cfg: &TrainConfig,
    model: &mut StableDiffusion,
    observer: &mut dyn TrainObserver,
) -> Result<()> {
    let sdxl = model.family == ModelFamily::Sdxl;
    let path = cfg.model.display();
    if cfg.sdxl && !sdxl {
        return Err(TrainError::Invalid(format!(
            "--sdxl is given but {path} is not an SDXL checkpoint (found {:?})",
            model.family
        )));
    }
    if !sdxl {
        if cfg.cache_text_encoder_outputs {
            return Err(TrainError::Invalid(format!(
                "--cache_text_encoder_outputs is only available for SDXL; {path} is {:?}",
                model.family
            )));
        }
        return Ok(());
    }
    if !cfg.sdxl {
        observer.info(&format!(
            "{path} is an SDXL checkpoint: training SDXL (as sdxl_train_network.py; pass --sdxl to make the SDXL option checks apply)"
        ));
    }
    if cfg.v2 {
        return Err(TrainError::Invalid(format!(
            "--v2 cannot be used with SDXL ({path} is an SDXL checkpoint)"
        )));
    }
    if cfg.cache_text_encoder_outputs && cfg.train_text_encoder {
        return Err(TrainError::Invalid(
            "--cache_text_encoder_outputs requires --network_train_unet_only (cached outputs cannot train the text encoders)".into(),
        ));
    }
    if cfg.clip_skip.is_some() {
        observer
            .info("--clip_skip has no effect on SDXL (both encoders use their penultimate layer)");
    }
    if cfg.mixed_precision == MixedPrecision::Fp16
        && !cfg.no_half_vae
        && model.vae_vs.kind() == Kind::Half
    {
        model.vae_vs.set_kind(Kind::Float);
        observer.info("SDXL's VAE overflows in fp16: it is kept in f32 (as with --no_half_vae)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_file_names_follow_the_reference() {
        assert_eq!(
            te_cache_path(Path::new("/d/10_tok/a.b.png")),
            PathBuf::from("/d/10_tok/a.b_te_outputs.npz")
        );
        assert_eq!(
            latent_cache_path(PathBuf::from("/d/a_0064x0048_sd.npz")),
            PathBuf::from("/d/a_0064x0048_sdxl.npz")
        );
    }

    #[test]
    fn te_cache_round_trips_and_rejects_other_sizes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x_te_outputs.npz");
        let o = SdxlTextOutputs {
            hidden_state1: Tensor::arange(77 * 4, (Kind::Float, Device::Cpu)).view([77, 4]),
            hidden_state2: Tensor::arange(77 * 6, (Kind::Float, Device::Cpu)).view([77, 6]) * 0.5,
            pool2: Tensor::from_slice(&[1.0f32, -2.0, 3.5, 4.0, 5.0, 6.0]),
        };
        write_te_cache(&path, &o).expect("writes");
        let r = read_te_cache(&path, 77, 4, 6, 6).expect("valid");
        assert!(r.hidden_state1.equal(&o.hidden_state1));
        assert!(r.hidden_state2.equal(&o.hidden_state2));
        assert!(r.pool2.equal(&o.pool2));
        assert_eq!(
            o.context().size(),
            vec![77, 10],
            "context is h1 ++ h2 on features"
        );
        assert!(read_te_cache(&path, 152, 4, 6, 6).is_none(), "other length");
        assert!(read_te_cache(&path, 77, 8, 6, 6).is_none(), "other width");
    }

    #[test]
    fn added_condition_rows_are_the_size_ids() {
        let a = added_condition(
            &Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            &[
                [48.0, 64.0, 0.0, 8.0, 64.0, 64.0],
                [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            ],
            Kind::Half,
            Device::Cpu,
        );
        assert_eq!(a.text_embeds.kind(), Kind::Half);
        assert_eq!(
            Vec::<f32>::try_from(a.time_ids.view([-1])).expect("f32"),
            vec![
                48.0, 64.0, 0.0, 8.0, 64.0, 64.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0
            ]
        );
    }
}
