//! `svd-merge-lora`: exact merge of LoRAs, re-approximated at a new rank (sd-scripts
//! `networks/svd_merge_lora.py`). See docs/svd-merge-lora.md.

mod args;

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use sd_cli::Precision;
use sd_core::lora::{AlphaDtype, LoadOptions, LoraWeights, SaveOptions};
use sd_core::merge::svd::{SvdMergeOptions, SvdMethod, SvdSource, svd_merge};
use sd_core::merge::{input_title, is_same_file, now_iso, parse_device};
use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::metadata::{ModelSpecInput, PyValue};

fn main() -> ExitCode {
    let args = args::Args::parse();
    sd_cli::init_logging(&args.verbosity);
    sd_cli::run(|| run(&args))
}

fn run(args: &args::Args) -> anyhow::Result<ExitCode> {
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
    let conv_rank = args.new_conv_rank.unwrap_or(args.new_rank);
    if args.new_rank == 0 || conv_rank == 0 {
        bail!("--new_rank and --new_conv_rank must be at least 1");
    }
    if !args.lbws.is_empty() {
        bail!("--lbws (layer-block weights) is unsupported by this tool");
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
    for input in &args.models {
        if is_same_file(&args.save_to, input) {
            bail!(
                "--save_to {} is an input file; refusing to overwrite it",
                args.save_to.display()
            );
        }
    }
    let device = parse_device(&args.device)?;
    if args.precision != Precision::F32 {
        tracing::warn!("--precision has no effect: sums and SVD are computed in f32");
    }

    let mut loaded = Vec::with_capacity(args.models.len());
    for path in &args.models {
        let w = LoraWeights::load(path, &LoadOptions::default())
            .with_context(|| format!("loading LoRA {}", path.display()))?;
        tracing::info!("{}: {} module(s)", path.display(), w.modules.len());
        loaded.push(w);
    }
    check_inputs(&args.models, &loaded)?;
    let sdxl: Vec<bool> = loaded
        .iter()
        .map(|w| w.family == Some(ModelFamily::Sdxl))
        .collect();
    let sources: Vec<SvdSource<'_>> = args
        .models
        .iter()
        .zip(&args.ratios)
        .zip(&loaded)
        .map(|((p, &ratio), w)| SvdSource {
            path: p.clone(),
            ratio,
            weights: w,
        })
        .collect();
    let method = if args.svd_method == "full" {
        SvdMethod::Full
    } else {
        SvdMethod::Factored
    };
    let opts = SvdMergeOptions {
        new_rank: args.new_rank,
        new_conv_rank: conv_rank,
        device,
        clamp_quantile: Some(0.99),
        method,
    };
    let total: usize = loaded.iter().map(|w| w.modules.len()).sum();
    let bar = sd_cli::progress_bar(total as u64, "svd-merge", &args.verbosity);
    let merged = svd_merge(&sources, &opts, &mut |d, n| {
        bar.set_length(n as u64);
        bar.set_position(d as u64);
    })
    .context("merging")?;
    bar.finish_and_clear();
    let capped = merged
        .modules
        .iter()
        .filter(|(_, t)| {
            let conv = t.down.size().len() == 4 && t.down.size()[2..] != [1, 1];
            t.rank() < if conv { conv_rank } else { args.new_rank }
        })
        .count();
    if capped > 0 {
        tracing::info!(
            "{capped} module(s) have fewer dimensions than the requested rank and got min(in, out)"
        );
    }

    let dtype = match args.save_precision {
        Some(Precision::F32) => Dtype::F32,
        Some(Precision::F16) => Dtype::F16,
        Some(Precision::BF16) => Dtype::BF16,
        None => loaded
            .iter()
            .find_map(|w| w.modules.values().next())
            .and_then(|t| sd_core::tensor::dtype_of(t.down.kind()))
            .unwrap_or(Dtype::F32),
    };
    tracing::info!(
        "output dtype: {dtype}{}",
        if args.save_precision.is_some() {
            " (--save_precision)"
        } else {
            " (from the inputs)"
        }
    );
    let mut meta = BTreeMap::new();
    meta.insert("ss_network_module".to_string(), "networks.lora".to_string());
    meta.insert("ss_network_dim".to_string(), args.new_rank.to_string());
    meta.insert("ss_network_alpha".to_string(), args.new_rank.to_string());
    meta.insert(
        "ss_network_args".to_string(),
        PyValue::Dict(vec![
            (
                PyValue::Str("conv_dim".into()),
                PyValue::Int(conv_rank as i64),
            ),
            (
                PyValue::Str("conv_alpha".into()),
                PyValue::Int(conv_rank as i64),
            ),
        ])
        .json_dumps(),
    );
    for key in ["ss_v2", "ss_base_model_version"] {
        if let Some(v) = loaded.iter().find_map(|w| w.metadata.get(key)) {
            meta.insert(key.to_string(), v.clone());
        }
    }
    let is_sdxl = sdxl[0]
        || meta
            .get("ss_base_model_version")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("sdxl"));
    let v2 = meta.get("ss_v2").is_some_and(|v| v == "True");
    let family = if is_sdxl {
        ModelFamily::Sdxl
    } else if v2 {
        ModelFamily::Sd2
    } else {
        ModelFamily::Sd1
    };
    let modelspec = (!args.no_metadata).then(|| ModelSpecInput {
        family,
        v_parameterization: v2 && !is_sdxl,
        lora: true,
        title: args
            .save_to
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        resolution: None,
        date: now_iso(),
        extra: BTreeMap::from([(
            "merged_from".to_string(),
            args.models
                .iter()
                .zip(&loaded)
                .map(|(p, w)| input_title(p, &w.metadata))
                .collect::<Vec<_>>()
                .join(", "),
        )]),
    });
    let save = SaveOptions {
        dtype: Some(dtype),
        alpha_dtype: AlphaDtype::I64,
        metadata: meta,
        modelspec,
        ..Default::default()
    };
    merged
        .save(&args.save_to, &save)
        .with_context(|| format!("writing {}", args.save_to.display()))?;
    tracing::info!(
        "wrote {} ({} modules)",
        args.save_to.display(),
        merged.modules.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// Refuses inputs whose merge would be meaningless (issue 12): a file with no LoRA module, a
/// file whose module names mix SD1/SD2 and SDXL, and inputs for different families (SDXL vs
/// SD1/SD2). A single input of any one family is fine (re-approximation at a new rank).
fn check_inputs(paths: &[std::path::PathBuf], loaded: &[LoraWeights]) -> anyhow::Result<()> {
    use sd_formats::lora::family_name_evidence;
    for (path, w) in paths.iter().zip(loaded) {
        if w.modules.is_empty() {
            bail!(
                "{}: no LoRA module found (expected keys ending in .lora_down.weight/.lora_up.weight or .lora_A.weight/.lora_B.weight); nothing was written",
                path.display()
            );
        }
        if let (Some(sd1), Some(sdxl)) = family_name_evidence(w.modules.keys().map(String::as_str))
        {
            bail!(
                "{}: module names mix model families: {sd1} is an SD1.x/SD2.x name, {sdxl} an SDXL name; nothing was written",
                path.display()
            );
        }
    }
    let is_sdxl = |w: &LoraWeights| w.family == Some(ModelFamily::Sdxl);
    // A module name that shows the family: a family-only prefix when there is one.
    let example = |w: &LoraWeights| -> String {
        let (sd1, sdxl) = family_name_evidence(w.modules.keys().map(String::as_str));
        let name = if is_sdxl(w) { sdxl } else { sd1 };
        name.or_else(|| w.modules.keys().next().map(String::as_str))
            .unwrap_or_default()
            .to_owned()
    };
    let first = &loaded[0];
    if let Some(i) = loaded.iter().position(|w| is_sdxl(w) != is_sdxl(first)) {
        let family = |w: &LoraWeights| if is_sdxl(w) { "SDXL" } else { "SD1.x/SD2.x" };
        bail!(
            "the inputs are LoRAs for different model families: {} is for {} (module {}), {} is for {} (module {}); nothing was written",
            paths[0].display(),
            family(first),
            example(first),
            paths[i].display(),
            family(&loaded[i]),
            example(&loaded[i])
        );
    }
    Ok(())
}
