//! From parsed arguments to images: validate into a plain config, load the model and
//! networks, expand prompt lines into images (seeds, per-line options), batch, generate, save.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use sd_core::generate::dynamic::{expand_dynamic_prompt, has_dynamic_prompt};
use sd_core::generate::encode::{EmbNormalize, TextOptions};
use sd_core::generate::png::{encode_png, py_float, write_atomically};
use sd_core::generate::prompt::{PromptOptions, read_prompt_file};
use sd_core::generate::{
    GenerationSettings, ImageSpec, InferenceNetworks, PyRandom, Sampler, SamplerConfig,
    SamplerKind, SdxlSize, image_file_name, parse_prompt_line, timestamp_now, txt2img,
};
use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::schedule::PredictionType;
use sd_core::tensor::from_bytes;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, ToDiffusersOp, plan_to_diffusers};
use sd_formats::tensor_file::TensorFile;
use tch::{Device, Kind, Tensor};

use crate::args::Args;

/// One image waiting in the queue.
struct Job {
    spec: ImageSpec,
    settings: GenerationSettings,
    multipliers: Option<Vec<f64>>,
    options: PromptOptions,
    file_name: Option<String>,
}

fn device(args: &Args) -> anyhow::Result<Device> {
    Ok(match args.device.as_deref() {
        None => Device::cuda_if_available(),
        Some("cpu") => Device::Cpu,
        Some("cuda") => Device::Cuda(0),
        Some(d) => match d.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(n) => Device::Cuda(n),
            None => bail!("unknown --device \"{d}\": expected cpu, cuda or cuda:N"),
        },
    })
}

fn refuse_unsupported(args: &Args) -> anyhow::Result<()> {
    let unsupported = [
        (args.image_path.is_some(), "--image_path (img2img)"),
        (
            args.mask_path.is_some(),
            "--mask_path (inpainting / regional LoRA)",
        ),
        (args.highres_fix_scale.is_some(), "--highres_fix_scale"),
        (args.interactive, "--interactive"),
        (
            !args.textual_inversion_embeddings.is_empty(),
            "--textual_inversion_embeddings",
        ),
        (args.shuffle_prompts, "--shuffle_prompts"),
    ];
    for (given, name) in unsupported {
        if given {
            bail!("{name} is not supported by this port yet");
        }
    }
    for (given, name) in [
        (args.opt_channels_last, "--opt_channels_last"),
        (args.vae_slices.is_some(), "--vae_slices"),
        (args.vae_batch_size.is_some(), "--vae_batch_size"),
        (args.no_preview, "--no_preview"),
        (args.xformers, "--xformers"),
        (args.network_pre_calc, "--network_pre_calc"),
    ] {
        if given {
            tracing::warn!("{name} has no effect here (the images are the same)");
        }
    }
    Ok(())
}

/// Whether a single-file key belongs to a VAE (bare, as VAE files distributed alone name
/// them, or under a whole checkpoint's `first_stage_model.`).
fn ldm_vae_key(key: &str) -> Option<String> {
    if key.starts_with("first_stage_model.") {
        Some(key.to_owned())
    } else if ["encoder.", "decoder.", "quant_conv.", "post_quant_conv."]
        .iter()
        .any(|p| key.starts_with(p))
    {
        Some(format!("first_stage_model.{key}"))
    } else {
        None
    }
}

/// Replaces the model's VAE weights (generation.md §1.1 `--vae`): a Diffusers VAE folder
/// (`diffusion_pytorch_model.safetensors` or `.bin`, also under `vae/`), or one file
/// (.safetensors, .ckpt, .pt, .bin) with Diffusers-layout VAE keys, LDM-layout VAE keys
/// (`encoder.down.0.…`, as VAE files distributed alone name them) or a whole single-file
/// checkpoint (its `first_stage_model.` tensors are used).
fn load_vae(model: &StableDiffusion, path: &Path) -> anyhow::Result<()> {
    let file_path = if path.is_dir() {
        [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.bin",
            "vae/diffusion_pytorch_model.safetensors",
            "vae/diffusion_pytorch_model.bin",
        ]
        .iter()
        .map(|n| path.join(n))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "{}: no diffusion_pytorch_model.safetensors or .bin (expected a Diffusers VAE folder)",
                path.display()
            )
        })?
    } else {
        path.to_path_buf()
    };
    let shown = file_path.display().to_string();
    let file = TensorFile::open(&file_path).with_context(|| format!("reading VAE {shown}"))?;
    let read = |name: &str| -> anyhow::Result<Tensor> {
        let info = file
            .info(name)
            .with_context(|| format!("{shown}: no tensor info for {name}"))?;
        let data = file
            .data(name)
            .with_context(|| format!("reading {name} from {shown}"))?;
        from_bytes(
            &format!("{shown} key {name}"),
            info.dtype,
            &info.shape,
            data,
        )
        .map_err(anyhow::Error::msg)
    };
    let ldm_layout = file
        .names()
        .iter()
        .any(|k| k.starts_with("encoder.down.") || k.starts_with("first_stage_model."));
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    if ldm_layout {
        // Full single-file key -> name in this file, for the VAE's tensors only.
        let keys: HashMap<String, &String> = file
            .names()
            .iter()
            .filter_map(|k| ldm_vae_key(k).map(|full| (full, k)))
            .collect();
        let shapes: Vec<(&str, Vec<usize>)> = keys
            .iter()
            .map(|(full, orig)| {
                let shape = file.info(orig).map(|i| i.shape.clone()).unwrap_or_default();
                (full.as_str(), shape)
            })
            .collect();
        let plan = plan_to_diffusers(
            model.family,
            shapes.iter().map(|(k, s)| (*k, s.as_slice())),
            &shown,
        )
        .with_context(|| format!("mapping the LDM-layout VAE keys of {shown}"))?;
        let targets = plan.targets(Component::Vae);
        if targets.is_empty() {
            bail!("{shown}: no VAE tensors found");
        }
        for target in targets {
            let orig = keys
                .get(&target.ldm_key)
                .copied()
                .unwrap_or(&target.ldm_key);
            let src = read(orig)?;
            let shape: Vec<i64> = target.shape.iter().map(|&d| d as i64).collect();
            let t = match &target.op {
                ToDiffusersOp::Copy => src,
                ToDiffusersOp::Reshape => src.reshape(&shape),
                other => bail!("{shown}: unexpected VAE key conversion {other:?} for {orig}"),
            };
            tensors.insert(target.key.clone(), t);
        }
    } else {
        for name in file.names() {
            tensors.insert(name.clone(), read(name)?);
        }
    }
    let kind = model.vae_vs.kind();
    let device = model.vae_vs.device();
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| (k, v.to_device(device).to_kind(kind)))
        .collect();
    sd_core::weights::load_var_store(
        &model.vae_vs,
        tensors,
        &shown,
        &[],
        sd_core::weights::LoadOptions::default(),
    )
    .with_context(|| format!("loading VAE {shown}"))?;
    tracing::info!("VAE replaced from {shown}");
    Ok(())
}

fn prompt_lines(args: &Args) -> anyhow::Result<Vec<String>> {
    if let Some(file) = &args.from_file {
        let lines = read_prompt_file(file).context("reading --from_file")?;
        if lines.is_empty() {
            bail!("{}: no prompt line found", file.display());
        }
        Ok(lines)
    } else if let Some(p) = &args.prompt {
        Ok(vec![p.clone()])
    } else {
        bail!("no prompt: give --prompt or --from_file")
    }
}

fn base_settings(
    args: &Args,
    family: ModelFamily,
    prediction: PredictionType,
) -> anyhow::Result<GenerationSettings> {
    let kind: SamplerKind = args.sampler.parse()?;
    let mut sampler = SamplerConfig::gen_img(kind, prediction);
    sampler.zero_terminal_snr = args.zero_terminal_snr;
    let default_size = if family == ModelFamily::Sdxl {
        1024
    } else {
        512
    };
    let normalize = match args.emb_normalize_mode.as_str() {
        "original" => EmbNormalize::Original,
        "abs" => EmbNormalize::Abs,
        "none" => EmbNormalize::None,
        other => bail!("unknown --emb_normalize_mode \"{other}\": expected original, abs or none"),
    };
    if args.max_embeddings_multiples == Some(0) {
        bail!("--max_embeddings_multiples must be at least 1");
    }
    Ok(GenerationSettings {
        width: args.width.unwrap_or(default_size),
        height: args.height.unwrap_or(default_size),
        steps: args.steps,
        scale: args.scale,
        negative_scale: args.negative_scale,
        sampler,
        text: TextOptions {
            clip_skip: args.clip_skip,
            max_embeddings_multiples: args.max_embeddings_multiples.unwrap_or(1),
            normalize,
        },
        sdxl: SdxlSize {
            original_width: args.original_width,
            original_height: args.original_height,
            original_width_negative: args.original_width_negative,
            original_height_negative: args.original_height_negative,
            crop_top: args.crop_top,
            crop_left: args.crop_left,
        },
    })
}

fn line_settings(base: &GenerationSettings, o: &PromptOptions) -> GenerationSettings {
    let mut s = base.clone();
    s.width = o.width.unwrap_or(s.width);
    s.height = o.height.unwrap_or(s.height);
    s.steps = o.steps.unwrap_or(s.steps);
    s.scale = o.scale.unwrap_or(s.scale);
    if let Some(n) = o.negative_scale {
        s.negative_scale = n;
    }
    let x = &mut s.sdxl;
    x.original_width = o.original_width.or(x.original_width);
    x.original_height = o.original_height.or(x.original_height);
    x.original_width_negative = o.original_width_negative.or(x.original_width_negative);
    x.original_height_negative = o.original_height_negative.or(x.original_height_negative);
    x.crop_top = o.crop_top.or(x.crop_top);
    x.crop_left = o.crop_left.or(x.crop_left);
    s
}

/// Expands prompt lines into jobs with seeds (generation.md §5.3).
fn jobs(args: &Args, lines: &[String], base: &GenerationSettings) -> Vec<Job> {
    let single = lines.len() == 1 && args.images_per_prompt == 1 && args.n_iter == 1;
    let mut rng = args.seed.map_or_else(PyRandom::from_entropy, PyRandom::new);
    let mut out = Vec::new();
    for _ in 0..args.n_iter.max(1) {
        let iter_seed = args.iter_same_seed.then(|| rng.randint_u32_range());
        for line in lines {
            let o = parse_prompt_line(line);
            if has_dynamic_prompt(&o.raw_prompt) {
                // §5.4: one seed per image (--d first, then the seed generator), variant i
                // resolved with seed i; the variants' own options are parsed per variant.
                let mut seeds = o.seeds.clone().unwrap_or_default();
                seeds.truncate(args.images_per_prompt.max(1));
                while seeds.len() < args.images_per_prompt.max(1) {
                    seeds.push(match (iter_seed, single, args.seed) {
                        (Some(s), _, _) => s,
                        (None, true, Some(s)) => s,
                        _ => rng.randint_u32_range(),
                    });
                }
                for (variant, seed) in expand_dynamic_prompt(&o.raw_prompt, &seeds) {
                    let v = parse_prompt_line(&variant);
                    out.push(Job {
                        spec: ImageSpec {
                            prompt: v.prompt.clone(),
                            negative_prompt: v.negative_prompt.clone().unwrap_or_default(),
                            seed,
                        },
                        settings: line_settings(base, &v),
                        multipliers: v.network_multipliers.clone(),
                        options: v.clone(),
                        file_name: v.file_name.clone(),
                    });
                }
                continue;
            }
            let settings = line_settings(base, &o);
            let mut line_seeds = o.seeds.clone().unwrap_or_default().into_iter();
            let mut prev: Option<u64> = None;
            for _ in 0..args.images_per_prompt.max(1) {
                let seed = if o.seeds.is_some() {
                    line_seeds.next().or(prev).unwrap_or(0)
                } else if let Some(s) = iter_seed {
                    s
                } else if let (true, Some(s)) = (single, args.seed) {
                    // §13 #2: the single image uses --seed itself.
                    s
                } else {
                    rng.randint_u32_range()
                };
                prev = Some(seed);
                out.push(Job {
                    spec: ImageSpec {
                        prompt: o.prompt.clone(),
                        negative_prompt: o.negative_prompt.clone().unwrap_or_default(),
                        seed,
                    },
                    settings: settings.clone(),
                    multipliers: o.network_multipliers.clone(),
                    options: o.clone(),
                    file_name: o.file_name.clone(),
                });
            }
        }
    }
    out
}

fn metadata(
    job: &Job,
    sampler: &str,
    family: ModelFamily,
    networks: &InferenceNetworks,
    multipliers: &[f64],
) -> Vec<(String, String)> {
    let s = &job.settings;
    let mut m = vec![
        ("prompt".to_owned(), job.spec.prompt.clone()),
        ("seed".to_owned(), job.spec.seed.to_string()),
        ("sampler".to_owned(), sampler.to_owned()),
        ("steps".to_owned(), s.steps.to_string()),
        ("scale".to_owned(), py_float(s.scale)),
        (
            "negative-prompt".to_owned(),
            job.spec.negative_prompt.clone(),
        ),
    ];
    if let Some(n) = s.negative_scale {
        m.push(("negative-scale".to_owned(), py_float(n)));
    }
    if let Some(c) = &job.options.clip_prompt {
        m.push(("clip-prompt".to_owned(), c.clone()));
    }
    m.push(("raw-prompt".to_owned(), job.options.raw_prompt.clone()));
    if family == ModelFamily::Sdxl {
        let v = |x: Option<i64>| x.map_or_else(|| "None".to_owned(), |v| v.to_string());
        let x = &s.sdxl;
        m.push(("original-height".to_owned(), v(x.original_height)));
        m.push(("original-width".to_owned(), v(x.original_width)));
        m.push((
            "original-height-negative".to_owned(),
            v(x.original_height_negative),
        ));
        m.push((
            "original-width-negative".to_owned(),
            v(x.original_width_negative),
        ));
        m.push(("crop-top".to_owned(), v(x.crop_top)));
        m.push(("crop-left".to_owned(), v(x.crop_left)));
    }
    if !networks.loaded.is_empty() {
        // Ours (sd-scripts writes none): each network's file name and multiplier.
        let mut dynamic = multipliers.iter();
        let list: Vec<String> = networks
            .loaded
            .iter()
            .map(|(path, m, merged)| {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let mul = if *merged {
                    *m
                } else {
                    dynamic.next().copied().unwrap_or(*m)
                };
                format!("{name}:{}", py_float(mul))
            })
            .collect();
        m.push(("lora".to_owned(), list.join(", ")));
    }
    m
}

/// The tool's body.
pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    refuse_unsupported(args)?;
    if args.fp16 && args.bf16 {
        bail!("--fp16 and --bf16 exclude each other");
    }
    if args.v2 && args.sdxl {
        bail!("--v2 and --sdxl exclude each other");
    }
    if args.batch_size == 0 {
        bail!("--batch_size must be at least 1");
    }
    for m in &args.network_module {
        if m != "networks.lora" {
            bail!("--network_module {m}: only networks.lora is supported");
        }
    }
    if !args.network_module.is_empty() && args.network_weights.len() < args.network_module.len() {
        bail!("No weight: --network_weights needs one file per --network_module");
    }
    let lines = prompt_lines(args)?;
    // The sampler and every line's step count are checked before the model loads.
    let kind: SamplerKind = args.sampler.parse()?;
    for line in &lines {
        let steps = parse_prompt_line(line).steps.unwrap_or(args.steps);
        Sampler::new(SamplerConfig::gen_img(kind, PredictionType::Epsilon), steps)
            .with_context(|| format!("prompt \"{line}\""))?;
    }
    let device = device(args)?;
    let kind = if args.fp16 {
        Kind::Half
    } else if args.bf16 {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let opts = ModelLoadOptions {
        device,
        kind,
        vae_kind: if args.no_half_vae { Kind::Float } else { kind },
        v2: args.v2,
        v_parameterization: args.v_parameterization,
        config_dir: args.model_config_dir.clone(),
    };
    let t0 = Instant::now();
    let model = StableDiffusion::load(&args.ckpt, &opts)
        .with_context(|| format!("loading model {}", args.ckpt.display()))?;
    if args.sdxl && model.family != ModelFamily::Sdxl {
        bail!(
            "--sdxl was given but {} is {:?}",
            args.ckpt.display(),
            model.family
        );
    }
    tracing::info!(
        "loaded {:?} model {} in {:.1} s",
        model.family,
        args.ckpt.display(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(vae) = &args.vae {
        load_vae(&model, vae)?;
    }
    if args.network_show_meta {
        for f in &args.network_weights {
            let file = sd_formats::tensor_file::TensorFile::open(f)
                .with_context(|| format!("reading LoRA {}", f.display()))?;
            tracing::info!("metadata of {}: {:?}", f.display(), file.metadata());
        }
    }
    let merge_count = if args.network_merge {
        args.network_weights.len()
    } else {
        args.network_merge_n_models.unwrap_or(0)
    };
    let networks = InferenceNetworks::load(
        &model,
        &args.network_weights,
        &args.network_mul,
        merge_count,
    )
    .context("loading LoRA networks")?;

    let base = base_settings(args, model.family, model.prediction)?;
    let sampler_name = args.sampler.clone();
    let all = jobs(args, &lines, &base);
    std::fs::create_dir_all(&args.outdir)
        .with_context(|| format!("creating {}", args.outdir.display()))?;

    // Batch consecutive jobs with equal settings and multipliers (§5.5).
    let mut batches: Vec<Vec<Job>> = Vec::new();
    for job in all {
        match batches.last_mut() {
            Some(b)
                if b.len() < args.batch_size
                    && b[0].settings == job.settings
                    && b[0].multipliers == job.multipliers =>
            {
                b.push(job);
            }
            _ => batches.push(vec![job]),
        }
    }
    let mut counter = 0usize;
    let mut stdout = std::io::stdout().lock();
    for batch in &batches {
        let multipliers = networks.set_multipliers(batch[0].multipliers.as_deref());
        let specs: Vec<ImageSpec> = batch.iter().map(|j| j.spec.clone()).collect();
        let settings = &batch[0].settings;
        let bar = sd_cli::progress_bar(0, "sampling", &args.verbosity);
        let started = Instant::now();
        let (_, images) = txt2img(&model, &specs, settings, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        })
        .with_context(|| format!("generating \"{}\"", batch[0].spec.prompt))?;
        bar.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64() / batch.len() as f64;
        let ts = timestamp_now();
        for (i, (job, rgb)) in batch.iter().zip(&images).enumerate() {
            counter += 1;
            let name = match &job.file_name {
                Some(n) => n.clone(),
                None if args.sequential_file_name => format!("im_{counter:06}.png"),
                None => image_file_name(&ts, i, job.spec.seed),
            };
            let path: PathBuf = args.outdir.join(&name);
            let text = metadata(job, &sampler_name, model.family, &networks, &multipliers);
            let bytes = encode_png(rgb, settings.width as u32, settings.height as u32, &text)?;
            write_atomically(&path, &bytes)
                .with_context(|| format!("writing {}", path.display()))?;
            tracing::info!("wrote {}", path.display());
            if args.json {
                let line = serde_json::json!({
                    "file": path.display().to_string(),
                    "prompt": job.spec.prompt,
                    "negative_prompt": job.spec.negative_prompt,
                    "seed": job.spec.seed,
                    "sampler": sampler_name,
                    "steps": settings.steps,
                    "scale": settings.scale,
                    "width": settings.width,
                    "height": settings.height,
                    "network_multipliers": multipliers,
                    "seconds": seconds,
                });
                use std::io::Write;
                writeln!(stdout, "{line}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
