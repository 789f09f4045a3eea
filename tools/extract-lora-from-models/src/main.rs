//! `extract-lora-from-models`: approximate (tuned − original) by a LoRA (sd-scripts
//! `networks/extract_lora_from_models.py`). See docs/extract-lora-from-models.md.

mod args;

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use sd_cli::Precision;
use sd_core::lora::{AlphaDtype, SaveOptions};
use sd_core::merge::extract::{
    ExtractOptions, ExtractSvd, extract_modules, max_differences, plan_extraction,
};
use sd_core::merge::{is_same_file, now_iso, parse_device};
use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;
use sd_formats::metadata::{ModelSpecInput, PyValue};
use sd_formats::tensor_file::TensorFile;

fn main() -> ExitCode {
    let args = args::Args::parse();
    sd_cli::init_logging(&args.verbosity);
    sd_cli::run(|| run(&args))
}

fn dtype(p: Precision) -> Dtype {
    match p {
        Precision::F32 => Dtype::F32,
        Precision::F16 => Dtype::F16,
        Precision::BF16 => Dtype::BF16,
    }
}

fn component_name(c: Component) -> &'static str {
    match c {
        Component::Unet => "U-Net",
        Component::TextEncoder => "text encoder",
        Component::TextEncoder2 => "text encoder 2",
        Component::Vae => "VAE",
    }
}

fn run(args: &args::Args) -> anyhow::Result<ExitCode> {
    // 1. Options, before touching any file.
    if args.v2 && args.sdxl {
        bail!("--v2 and --sdxl are mutually exclusive");
    }
    if args.dim == 0 || args.conv_dim == Some(0) {
        bail!("--dim and --conv_dim must be at least 1");
    }
    if !(args.clamp_quantile > 0.0 && args.clamp_quantile <= 1.0) {
        bail!("--clamp_quantile {} is outside (0, 1]", args.clamp_quantile);
    }
    if !args.min_diff.is_finite() || args.min_diff < 0.0 {
        bail!("--min_diff {} must be a finite number ≥ 0", args.min_diff);
    }
    let ext = args
        .save_to
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    if !ext.eq_ignore_ascii_case("safetensors") {
        bail!(
            "--save_to {}: only .safetensors output is supported",
            args.save_to.display()
        );
    }
    for input in [&args.model_org, &args.model_tuned] {
        if is_same_file(&args.save_to, input) {
            bail!(
                "--save_to {} is an input file; refusing to overwrite it",
                args.save_to.display()
            );
        }
    }
    if args.load_original_model_to.is_some() || args.load_tuned_model_to.is_some() {
        tracing::warn!(
            "--load_original_model_to / --load_tuned_model_to have no effect: weights are read from memory maps"
        );
    }
    let device = parse_device(&args.device)?;
    let flags_family = (args.v2 || args.sdxl)
        .then(|| ModelFamily::from_flags(args.v2, args.sdxl))
        .transpose()?;

    // 2. Headers: family, modules, shapes.
    let org = TensorFile::open(&args.model_org)
        .with_context(|| format!("opening {}", args.model_org.display()))?;
    let tuned = TensorFile::open(&args.model_tuned)
        .with_context(|| format!("opening {}", args.model_tuned.display()))?;
    let plan = plan_extraction(&org, &tuned, flags_family, args.dim, args.conv_dim)
        .context("checking the models")?;
    let family = plan.family;
    tracing::info!(
        "{family} models, {} LoRA module(s) (dim {}, conv_dim {})",
        plan.modules.len(),
        args.dim,
        args.conv_dim.map_or("none".to_string(), |c| c.to_string())
    );

    // 3. max |ΔW| per module (streamed), then the text-encoder decision.
    let load_kind = args
        .load_precision
        .and_then(|p| sd_core::merge::extract::load_kind(dtype(p)));
    let bar = sd_cli::progress_bar(plan.modules.len() as u64, "difference", &args.verbosity);
    let diffs = max_differences(&org, &tuned, &plan, load_kind, &mut |d, _| {
        bar.set_position(d as u64)
    })
    .context("comparing the models")?;
    bar.finish_and_clear();
    let mut per_component: BTreeMap<Component, (usize, f64, usize)> = BTreeMap::new();
    for (m, &d) in plan.modules.iter().zip(&diffs) {
        let e = per_component.entry(m.component).or_insert((0, 0.0, 0));
        e.0 += 1;
        e.1 = e.1.max(d);
        if d <= args.min_diff {
            e.2 += 1;
            tracing::debug!("{}: max |ΔW| {d:.3e} ≤ --min_diff", m.name);
        }
    }
    let te_max = per_component
        .iter()
        .filter(|(c, _)| **c != Component::Unet)
        .map(|(_, v)| v.1)
        .fold(0.0f64, f64::max);
    let te_extracted = match args.text_encoder.as_str() {
        "include" => true,
        "exclude" => false,
        _ => te_max > args.min_diff,
    };
    let extracted = |c: Component| c == Component::Unet || te_extracted;
    for (&c, &(n, max, small)) in &per_component {
        let why = match (c, args.text_encoder.as_str()) {
            (Component::Unet, _) => "always".to_string(),
            (_, "include") => "--text_encoder include".to_string(),
            (_, "exclude") => "--text_encoder exclude".to_string(),
            _ => format!(
                "text encoders' max {te_max:.4e} {} --min_diff {}",
                if te_extracted { ">" } else { "≤" },
                args.min_diff
            ),
        };
        tracing::info!(
            "{}: max |W_tuned − W_org| = {max:.4e} over {n} module(s) ({small} ≤ --min_diff): {} ({why})",
            component_name(c),
            if extracted(c) {
                "extracted"
            } else {
                "NOT extracted"
            }
        );
    }
    if !te_extracted && args.text_encoder == "auto" && per_component.len() > 1 {
        tracing::warn!(
            "text encoder is the same (max difference {te_max:.4e} ≤ --min_diff {}): extracting the U-Net only; --text_encoder include forces it",
            args.min_diff
        );
    }
    if let Some(&(_, max, _)) = per_component.get(&Component::Unet)
        && max <= args.min_diff
    {
        tracing::warn!(
            "the U-Nets differ by at most {max:.4e} (≤ --min_diff): the extracted LoRA will be (nearly) zero"
        );
    }
    let selected: Vec<bool> = plan
        .modules
        .iter()
        .map(|m| extracted(m.component))
        .collect();

    // 4. Decompose module by module.
    let svd = if args.svd_method == "randomized" {
        ExtractSvd::Randomized {
            oversample: args.svd_oversample.unwrap_or(args.dim.max(8)),
            power_iters: args.svd_power_iters,
            seed: args.seed,
        }
    } else {
        ExtractSvd::Full
    };
    let opts = ExtractOptions {
        clamp_quantile: (args.clamp_quantile < 1.0).then_some(args.clamp_quantile),
        device,
        load_kind,
        svd,
    };
    let total = selected.iter().filter(|&&s| s).count();
    let bar = sd_cli::progress_bar(total as u64, "extract", &args.verbosity);
    let result = extract_modules(&org, &tuned, &plan, &selected, &opts, &mut |d, _| {
        bar.set_position(d as u64)
    })
    .context("extracting")?;
    bar.finish_and_clear();
    let mut counts: BTreeMap<Component, usize> = BTreeMap::new();
    for (m, s) in plan.modules.iter().zip(&selected) {
        if *s {
            *counts.entry(m.component).or_default() += 1;
        }
    }
    let counts_text: Vec<String> = counts
        .iter()
        .map(|(c, n)| format!("{}: {n}", component_name(*c)))
        .collect();
    tracing::info!(
        "extracted modules per component: {}",
        counts_text.join(", ")
    );
    let mut res: Vec<f64> = result.residuals.values().copied().collect();
    res.sort_by(f64::total_cmp);
    if let (Some(&max), Some(&med)) = (res.last(), res.get(res.len() / 2)) {
        tracing::info!(
            "rank-{} residual ‖ΔW − up·down‖/‖ΔW‖: median {med:.4}, max {max:.4}",
            args.dim
        );
    }

    // 5. Metadata (spec tools §4.2 step 8) and output.
    let v_param = match args.prediction.as_deref() {
        Some(p) => p == "v",
        None => args.v_parameterization || family == ModelFamily::Sd2,
    };
    let base_version = match family {
        ModelFamily::Sd1 if v_param => "sd_v1_v",
        ModelFamily::Sd1 => "sd_v1",
        ModelFamily::Sd2 if v_param => "sd_v2_v",
        ModelFamily::Sd2 => "sd_v2",
        ModelFamily::Sdxl => "sdxl_base_v1-0",
    };
    let mut meta = BTreeMap::new();
    let py_bool = |b: bool| if b { "True" } else { "False" }.to_string();
    meta.insert("ss_v2".to_string(), py_bool(family == ModelFamily::Sd2));
    meta.insert(
        "ss_base_model_version".to_string(),
        base_version.to_string(),
    );
    meta.insert("ss_network_module".to_string(), "networks.lora".to_string());
    meta.insert("ss_network_dim".to_string(), args.dim.to_string());
    meta.insert(
        "ss_network_alpha".to_string(),
        PyValue::Float(args.dim as f64).json_dumps(),
    );
    let net_args = match args.conv_dim {
        Some(c) => PyValue::Dict(vec![
            (PyValue::Str("conv_dim".into()), PyValue::Str(c.to_string())),
            (
                PyValue::Str("conv_alpha".into()),
                PyValue::Str(PyValue::Float(c as f64).json_dumps()),
            ),
        ]),
        None => PyValue::Dict(vec![]),
    };
    meta.insert("ss_network_args".to_string(), net_args.json_dumps());
    let modelspec = (!args.no_metadata).then(|| ModelSpecInput {
        family,
        v_parameterization: v_param,
        lora: true,
        title: args
            .save_to
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        resolution: None,
        date: now_iso(),
        extra: BTreeMap::new(),
    });
    let save = SaveOptions {
        dtype: Some(args.save_precision.map_or(Dtype::F32, dtype)),
        alpha_dtype: AlphaDtype::Weights,
        metadata: meta,
        modelspec,
        ..Default::default()
    };
    result
        .weights
        .save(&args.save_to, &save)
        .with_context(|| format!("writing {}", args.save_to.display()))?;
    tracing::info!(
        "wrote {} ({} modules)",
        args.save_to.display(),
        result.weights.modules.len()
    );
    Ok(ExitCode::SUCCESS)
}
