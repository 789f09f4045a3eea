//! `merge-lora`: LoRAs into a checkpoint, or LoRA + LoRA (sd-scripts `merge_lora.py` and
//! `sdxl_merge_lora.py` in one tool; the family is detected). See docs/merge-lora.md.

mod args;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use sd_cli::Precision;
use sd_core::lora::{AlphaDtype, LoadOptions, LoraWeights, SaveOptions};
use sd_core::merge::checkpoint::{
    CheckpointWriteOptions, LoraInput, plan_checkpoint_merge, write_merged_checkpoint,
};
use sd_core::merge::lora_lora::{LoraMergeOptions, LoraSource, merge_loras};
use sd_core::merge::source::CheckpointSource;
use sd_core::merge::stream::TensorSpec;
use sd_core::merge::torch_save::{TorchTopLevel, write_torch_checkpoint};
use sd_core::merge::{input_title, is_same_file, now_iso, parse_device};
use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::metadata::{ModelSpecInput, PyValue, py_float_repr};
use sd_formats::tensor_file::TensorFile;

fn main() -> ExitCode {
    let args = args::Args::parse();
    sd_cli::init_logging(&args.verbosity);
    sd_cli::run(|| run(&args))
}

fn dtype_of(p: Precision) -> Dtype {
    match p {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
        Precision::BF16 => Dtype::BF16,
    }
}

fn run(args: &args::Args) -> anyhow::Result<ExitCode> {
    // 1. Validate the command line before reading anything large.
    if args.models.len() != args.ratios.len() {
        bail!(
            "{} models but {} ratios: give one ratio per model",
            args.models.len(),
            args.ratios.len()
        );
    }
    if let Some(r) = args.ratios.iter().find(|r| !r.is_finite()) {
        bail!("ratio {r} is not a finite number");
    }
    if args.sdxl && args.v2 {
        bail!("--v2 is not an option of sdxl-merge-lora (SDXL checkpoints only)");
    }
    if !args.lbws.is_empty() {
        bail!("--lbws (layer-block weights) is unsupported by this tool");
    }
    let ext = args
        .save_to
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    let torch_output = match ext.to_ascii_lowercase().as_str() {
        "safetensors" => false,
        "ckpt" | "pt" | "pth" | "bin" => true,
        _ => bail!(
            "--save_to {}: the extension decides the format: .safetensors, or .ckpt/.pt/.pth/.bin for a PyTorch (torch.save) file",
            args.save_to.display()
        ),
    };
    for input in args.models.iter().chain(args.sd_model.iter()) {
        if is_same_file(&args.save_to, input) {
            bail!(
                "--save_to {} is an input file; refusing to overwrite it",
                args.save_to.display()
            );
        }
    }
    let device = parse_device(&args.device)?;

    // 2. LoRAs (small): names, shapes and family are checked on load.
    let mut loras = Vec::with_capacity(args.models.len());
    for (path, &ratio) in args.models.iter().zip(&args.ratios) {
        let weights = LoraWeights::load(path, &LoadOptions::default())
            .with_context(|| format!("loading LoRA {}", path.display()))?;
        if args.sdxl
            && let Some(f) = weights.family
            && f != ModelFamily::Sdxl
        {
            bail!(
                "{} is a LoRA for {f}; sdxl-merge-lora merges SDXL LoRAs only (use merge-lora); nothing was written",
                path.display()
            );
        }
        loras.push(LoraInput {
            path: path.clone(),
            ratio,
            weights,
        });
    }
    match &args.sd_model {
        Some(model) => into_checkpoint(args, model, &loras, device, torch_output),
        None => lora_plus_lora(args, &loras, torch_output),
    }
}

fn into_checkpoint(
    args: &args::Args,
    model: &Path,
    loras: &[LoraInput],
    device: tch::Device,
    torch_output: bool,
) -> anyhow::Result<ExitCode> {
    if args.concat || args.shuffle || args.reference_compatible {
        tracing::warn!("--concat/--shuffle/--reference_compatible have no effect with --sd_model");
    }
    if device == tch::Device::Cpu && std::env::var_os("OMP_NUM_THREADS").is_none() {
        // Merging into a checkpoint is bound by memory bandwidth and I/O: a rank-r GEMM per
        // key is small, and libtorch's spinning worker threads cost more than they give on a
        // busy machine (measured on 2 cores: 37 s with 2 threads, 10 s with 1; see
        // docs/performance.md). OMP_NUM_THREADS overrides.
        tch::set_num_threads(1);
    }
    let ckpt = CheckpointSource::open(model)
        .with_context(|| format!("reading checkpoint {}", model.display()))?;
    if ckpt.is_diffusers() {
        tracing::info!(
            "{} is a Diffusers folder: the output is a single-file checkpoint (as sd-scripts writes)",
            model.display()
        );
    }
    if args.sdxl {
        let family = ckpt.family()?;
        if family != ModelFamily::Sdxl {
            bail!(
                "{} is an {family} checkpoint; sdxl-merge-lora merges into SDXL checkpoints only (use merge-lora); nothing was written",
                model.display(),
            );
        }
    }
    let plan = plan_checkpoint_merge(&ckpt, loras)
        .with_context(|| format!("checking LoRAs against {}", model.display()))?;
    if args.v2 != (plan.family == ModelFamily::Sd2) && plan.family != ModelFamily::Sdxl {
        tracing::warn!(
            "--v2 is {} but {} is an {} checkpoint (detected from its keys); using {}",
            if args.v2 { "set" } else { "not set" },
            model.display(),
            plan.family,
            plan.family
        );
    }
    for c in &plan.counts {
        let per: Vec<String> = c.applied.iter().map(|(k, n)| format!("{k} {n}")).collect();
        tracing::info!("{}: applied {}", c.path.display(), per.join(", "));
        if !c.unmatched.is_empty() {
            tracing::warn!(
                "{}: {} module(s) matched nothing in the checkpoint: {}",
                c.path.display(),
                c.unmatched.len(),
                c.unmatched.join(", ")
            );
        }
    }
    let save_dtype = args.save_precision.map(dtype_of);
    match save_dtype {
        Some(d) => tracing::info!(
            "output dtype: {d} for every U-Net/text-encoder/VAE tensor (--save_precision)"
        ),
        None => tracing::info!(
            "output dtype: each tensor keeps its input dtype; {} key(s) change, the rest are copied byte for byte",
            plan.modified_keys()
        ),
    }
    if torch_output {
        tracing::info!(
            "{}: PyTorch checkpoint {{\"state_dict\", \"epoch\": 0, \"global_step\": 0}} (it holds no metadata)",
            args.save_to.display()
        );
    }
    let metadata = if args.no_metadata || torch_output {
        None
    } else {
        let mut m: BTreeMap<String, String> = ckpt.metadata().clone();
        let v_param = plan.family == ModelFamily::Sd2;
        if v_param {
            tracing::warn!("SD2 checkpoint: modelspec assumes v-prediction (768-v)");
        }
        let mut titles = vec![input_title(model, ckpt.metadata())];
        titles.extend(
            loras
                .iter()
                .map(|l| input_title(&l.path, &l.weights.metadata)),
        );
        m.retain(|k, _| !k.starts_with("modelspec."));
        m.extend(sd_formats::metadata::modelspec(&ModelSpecInput {
            family: plan.family,
            v_parameterization: v_param,
            lora: false,
            title: stem(&args.save_to),
            resolution: None,
            date: now_iso(),
            extra: BTreeMap::from([("merged_from".to_string(), titles.join(", "))]),
        }));
        Some(m)
    };
    let opts = CheckpointWriteOptions {
        save_dtype,
        factor_kind: sd_core::tensor::kind_of(dtype_of(args.precision)).unwrap_or(tch::Kind::Float),
        device,
        metadata,
        torch: torch_output.then_some(TorchTopLevel::StateDict {
            epoch: 0,
            global_step: 0,
        }),
    };
    let bar = sd_cli::progress_bar(ckpt.len() as u64, "merging", &args.verbosity);
    let bytes = write_merged_checkpoint(&ckpt, &plan, loras, &args.save_to, &opts, &mut |d, _| {
        bar.set_position(d as u64)
    })
    .with_context(|| format!("writing {}", args.save_to.display()))?;
    bar.finish_and_clear();
    tracing::info!(
        "wrote {} ({} keys, {} bytes)",
        args.save_to.display(),
        ckpt.len(),
        bytes
    );
    Ok(ExitCode::SUCCESS)
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn lora_plus_lora(
    args: &args::Args,
    loras: &[LoraInput],
    torch_output: bool,
) -> anyhow::Result<ExitCode> {
    if args.v2 {
        tracing::warn!("--v2 has no effect without --sd_model (ss_v2 is carried from the inputs)");
    }
    // Issue 12: an empty LoRA or one whose names mix families would be merged silently.
    for l in loras {
        if l.weights.modules.is_empty() {
            bail!(
                "{}: no LoRA module found (expected keys ending in .lora_down.weight/.lora_up.weight or .lora_A.weight/.lora_B.weight); nothing was written",
                l.path.display()
            );
        }
        if let (Some(sd1), Some(sdxl)) =
            sd_formats::lora::family_name_evidence(l.weights.modules.keys().map(String::as_str))
        {
            bail!(
                "{}: module names mix model families: {sd1} is an SD1.x/SD2.x name, {sdxl} an SDXL name; nothing was written",
                l.path.display()
            );
        }
    }
    if let Some(f) = loras.iter().find_map(|l| {
        let fam = l.weights.family?;
        loras
            .iter()
            .find(|o| {
                o.weights
                    .family
                    .is_some_and(|g| (g == ModelFamily::Sdxl) != (fam == ModelFamily::Sdxl))
            })
            .map(|o| (l, o))
    }) {
        bail!(
            "{} and {} are LoRAs for different model families; nothing was written",
            f.0.path.display(),
            f.1.path.display()
        );
    }
    let shuffle_seed = args.shuffle.then(|| {
        args.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i64)
        })
    });
    let sources: Vec<LoraSource<'_>> = loras
        .iter()
        .map(|l| LoraSource {
            path: l.path.clone(),
            ratio: l.ratio,
            weights: &l.weights,
        })
        .collect();
    let opts = LoraMergeOptions {
        concat: args.concat,
        reference_compatible: args.reference_compatible,
        shuffle_seed,
        dtype: args.save_precision.map(dtype_of),
    };
    let merged = merge_loras(&sources, &opts).context("merging LoRAs")?;
    for (l, n) in loras.iter().zip(&merged.modules_per_input) {
        tracing::info!("{}: {n} module(s), ratio {}", l.path.display(), l.ratio);
    }
    if !args.concat && loras.len() > 1 {
        let errs: Vec<f64> = merged.relative_errors.values().copied().collect();
        let max = errs.iter().copied().fold(0.0, f64::max);
        let mean = errs.iter().sum::<f64>() / errs.len().max(1) as f64;
        tracing::warn!(
            "adding up and down factors separately is not the sum of the LoRAs: relative error of ΔW against Σ ratio·ΔW is {:.3} on average, {:.3} at most; use --concat for an exact merge",
            mean,
            max
        );
    }
    tracing::info!(
        "output dtype: {}{}",
        merged.dtype,
        if args.save_precision.is_some() {
            " (--save_precision)"
        } else {
            " (from the inputs)"
        }
    );

    // Metadata: minimum ss_* keys, ss_v2 / ss_base_model_version carried from the inputs.
    let mut meta = BTreeMap::new();
    meta.insert("ss_network_module".to_string(), "networks.lora".to_string());
    meta.insert(
        "ss_network_dim".to_string(),
        merged
            .network_dim
            .map_or("Dynamic".to_string(), |d| d.to_string()),
    );
    meta.insert(
        "ss_network_alpha".to_string(),
        match merged.network_alpha {
            None => "Dynamic".to_string(),
            Some((a, true)) if a.fract() == 0.0 => PyValue::Int(a as i64).py_str(),
            Some((a, _)) => py_float_repr(a),
        },
    );
    for key in ["ss_v2", "ss_base_model_version"] {
        if let Some(v) = loras.iter().find_map(|l| l.weights.metadata.get(key)) {
            meta.insert(key.to_string(), v.clone());
        }
    }
    let sdxl = args.sdxl
        || meta
            .get("ss_base_model_version")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("sdxl"))
        || loras
            .iter()
            .any(|l| l.weights.family == Some(ModelFamily::Sdxl));
    let v2 = meta.get("ss_v2").is_some_and(|v| v == "True");
    let family = if sdxl {
        ModelFamily::Sdxl
    } else if v2 {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    };
    let modelspec = (!args.no_metadata).then(|| {
        if v2 {
            tracing::warn!("SD2 LoRA: modelspec assumes v-prediction (768-v)");
        }
        let titles: Vec<String> = loras
            .iter()
            .map(|l| input_title(&l.path, &l.weights.metadata))
            .collect();
        ModelSpecInput {
            family,
            v_parameterization: v2,
            lora: true,
            title: stem(&args.save_to),
            resolution: None,
            date: now_iso(),
            extra: BTreeMap::from([("merged_from".to_string(), titles.join(", "))]),
        }
    });
    let save = SaveOptions {
        dtype: Some(merged.dtype),
        alpha_dtype: AlphaDtype::Weights,
        metadata: meta,
        modelspec,
        ..Default::default()
    };
    if torch_output {
        // Small file: save as safetensors next to the output, then re-write its tensors as a
        // PyTorch file (`torch.save(state_dict)`, as sd-scripts; no metadata).
        let dir = match args.save_to.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let tmp = tempfile::Builder::new()
            .suffix(".safetensors")
            .tempfile_in(&dir)
            .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
        merged
            .weights
            .save(tmp.path(), &save)
            .with_context(|| format!("writing {}", tmp.path().display()))?;
        let f = TensorFile::open(tmp.path())?;
        let specs: Vec<TensorSpec> = f
            .names()
            .iter()
            .map(|n| {
                let i = f.info(n).expect("names come from the file");
                TensorSpec {
                    name: n.clone(),
                    dtype: i.dtype,
                    shape: i.shape.clone(),
                }
            })
            .collect();
        write_torch_checkpoint(&args.save_to, &specs, TorchTopLevel::Tensors, |i| {
            Ok(std::borrow::Cow::Borrowed(f.data(&specs[i].name)?))
        })
        .with_context(|| format!("writing {}", args.save_to.display()))?;
        tracing::info!("PyTorch file: no metadata written");
    } else {
        merged
            .weights
            .save(&args.save_to, &save)
            .with_context(|| format!("writing {}", args.save_to.display()))?;
    }
    tracing::info!(
        "wrote {} ({} modules)",
        args.save_to.display(),
        merged.weights.modules.len()
    );
    Ok(ExitCode::SUCCESS)
}
