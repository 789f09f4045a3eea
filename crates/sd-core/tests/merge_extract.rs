//! `sd_core::merge::extract` against the reference's extraction golden
//! (`goldens/lora-tools/extract-sd15-dim4-conv2.*`, fixtures README §5f–h): tiny-sd15 as the
//! original, tiny-sd15 with the 54 overlay tensors as the tuned model, `--dim 4 --conv_dim 2`,
//! clamp quantile 0.99. ΔW = alpha/rank·up·down is compared relative to ‖ΔW‖ (≤ 2e-3; the
//! SVD signs are LAPACK's as in the reference).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sd_core::lora::{LoadOptions, LoraWeights};
use sd_core::merge::extract::{
    ExtractOptions, ExtractPlan, ExtractSvd, extract_modules, max_differences, plan_extraction,
};
use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;
use sd_formats::safetensors::{TensorToWrite, write_safetensors};
use sd_formats::tensor_file::TensorFile;
use sd_testutil::fixture;
use tch::{Device, Kind, Tensor};

/// Writes tiny-sd15 with the overlay's tensors replaced to `dir/tuned.safetensors`.
fn make_tuned(dir: &Path) -> std::path::PathBuf {
    let base = TensorFile::open(fixture("tiny-sd15.safetensors")).expect("base");
    let overlay =
        TensorFile::open(fixture("tiny-sd15-tuned.overlay.safetensors")).expect("overlay");
    assert_eq!(overlay.len(), 54);
    let mut tensors = Vec::new();
    for name in base.names() {
        let src = if overlay.info(name).is_some() {
            &overlay
        } else {
            &base
        };
        let info = src.info(name).expect("info");
        assert_eq!(info.shape, base.info(name).expect("info").shape, "{name}");
        tensors.push(TensorToWrite::new(
            name.clone(),
            info.dtype,
            info.shape.clone(),
            src.data(name).expect("data"),
        ));
    }
    for name in overlay.names() {
        assert!(base.info(name).is_some(), "overlay key {name} not in base");
    }
    let out = dir.join("tuned.safetensors");
    write_safetensors(&out, &tensors, None).expect("write tuned");
    out
}

fn product(up: &Tensor, down: &Tensor, scale: f64) -> Tensor {
    let k = down.size()[0];
    let up = up.to_kind(Kind::Float);
    let down = down.to_kind(Kind::Float);
    up.reshape([up.size()[0], k]).mm(&down.reshape([k, -1])) * scale
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).norm().double_value(&[]) / b.norm().double_value(&[]).max(1e-30)
}

struct Setup {
    _dir: tempfile::TempDir,
    org: TensorFile,
    tuned: TensorFile,
    plan: ExtractPlan,
}

fn setup() -> Setup {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let tuned_path = make_tuned(dir.path());
    let org = TensorFile::open(fixture("tiny-sd15.safetensors")).expect("org");
    let tuned = TensorFile::open(&tuned_path).expect("tuned");
    let plan = plan_extraction(&org, &tuned, None, 4, Some(2)).expect("plan");
    Setup {
        _dir: dir,
        org,
        tuned,
        plan,
    }
}

#[test]
fn plan_matches_reference_module_set_and_ranks() {
    let s = setup();
    assert_eq!(s.plan.family, ModelFamily::Sd1);
    let golden = LoraWeights::load(
        fixture("goldens/lora-tools/extract-sd15-dim4-conv2.safetensors"),
        &LoadOptions::default(),
    )
    .expect("golden");
    let ours: BTreeSet<&str> = s.plan.modules.iter().map(|m| m.name.as_str()).collect();
    let theirs: BTreeSet<&str> = golden.modules.keys().map(String::as_str).collect();
    assert_eq!(ours.len(), 348);
    assert_eq!(ours, theirs);
    for m in &s.plan.modules {
        let g = &golden.modules[&m.name];
        // Requested rank capped at min(in, out) = the golden's rank.
        let cap = (m.shape[0].min(m.shape[1])) as usize;
        assert_eq!(m.rank.min(cap), g.rank(), "{}", m.name);
        assert_eq!(g.effective_alpha(), g.rank() as f64, "{}", m.name);
    }
    let te = s
        .plan
        .modules
        .iter()
        .filter(|m| m.component == Component::TextEncoder)
        .count();
    assert_eq!(te, 72);
    // Text encoders first, as the reference.
    assert_eq!(s.plan.modules[0].component, Component::TextEncoder);
}

#[test]
fn max_differences_find_exactly_the_perturbed_modules() {
    let s = setup();
    let diffs = max_differences(&s.org, &s.tuned, &s.plan, None, &mut |_, _| {}).expect("diffs");
    let products = TensorFile::open(fixture(
        "goldens/lora-tools/extract-sd15-dim4-conv2.products.safetensors",
    ))
    .expect("products");
    let perturbed: BTreeSet<&str> = products.names().iter().map(String::as_str).collect();
    assert_eq!(perturbed.len(), 54);
    let changed: BTreeSet<&str> = s
        .plan
        .modules
        .iter()
        .zip(&diffs)
        .filter(|(_, d)| **d > 0.0)
        .map(|(m, _)| m.name.as_str())
        .collect();
    assert_eq!(changed, perturbed);
    let te_max = s
        .plan
        .modules
        .iter()
        .zip(&diffs)
        .filter(|(m, _)| m.component == Component::TextEncoder)
        .map(|(_, d)| *d)
        .fold(0.0, f64::max);
    assert!(te_max > 0.01, "TE max diff {te_max} must exceed min_diff");
}

#[test]
fn extraction_equals_reference_delta_per_module() {
    let s = setup();
    let all = vec![true; s.plan.modules.len()];
    let opts = ExtractOptions {
        clamp_quantile: Some(0.99),
        device: Device::Cpu,
        load_kind: None,
        svd: ExtractSvd::Full,
    };
    let out =
        extract_modules(&s.org, &s.tuned, &s.plan, &all, &opts, &mut |_, _| {}).expect("extract");
    assert_eq!(out.weights.modules.len(), 348);
    let golden = LoraWeights::load(
        fixture("goldens/lora-tools/extract-sd15-dim4-conv2.safetensors"),
        &LoadOptions::default(),
    )
    .expect("golden");
    let products = TensorFile::open(fixture(
        "goldens/lora-tools/extract-sd15-dim4-conv2.products.safetensors",
    ))
    .expect("products");
    let mut worst = (0.0f64, String::new());
    for (name, t) in &out.weights.modules {
        let g = &golden.modules[name];
        assert_eq!(t.down.size(), g.down.size(), "{name} down");
        assert_eq!(t.up.size(), g.up.size(), "{name} up");
        assert_eq!(t.effective_alpha(), g.effective_alpha(), "{name} alpha");
        // Round to the golden's fp16 storage before multiplying, as the golden's products.
        let ours = product(
            &t.up.to_kind(Kind::Half),
            &t.down.to_kind(Kind::Half),
            t.scale(),
        );
        let theirs_factors = product(&g.up, &g.down, g.scale());
        if products.info(name).is_none() {
            assert_eq!(ours.abs().max().double_value(&[]), 0.0, "{name} must be 0");
            assert_eq!(theirs_factors.abs().max().double_value(&[]), 0.0);
            continue;
        }
        let info = products.info(name).expect("info");
        let theirs = sd_core::tensor::from_bytes(
            name,
            info.dtype,
            &info.shape,
            products.data(name).expect("data"),
        )
        .expect("tensor")
        .to_kind(Kind::Float)
        .reshape([info.shape[0] as i64, -1]);
        let e = rel(&ours, &theirs).max(rel(&ours, &theirs_factors));
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    assert!(
        worst.0 <= 2e-3,
        "worst ‖ΔW − ΔW_ref‖/‖ΔW_ref‖ = {:.3e} at {}",
        worst.0,
        worst.1
    );
    // Residuals are reported for every module; unperturbed ones are exactly 0.
    assert_eq!(out.residuals.len(), 348);
}

#[test]
fn randomized_svd_matches_full_on_low_rank_plus_noise() {
    let s = setup();
    let selected: Vec<bool> = s
        .plan
        .modules
        .iter()
        .map(|m| m.name.contains("ff_net_2") || m.name.contains("q_proj"))
        .collect();
    let mk = |svd| ExtractOptions {
        clamp_quantile: None,
        device: Device::Cpu,
        load_kind: None,
        svd,
    };
    let full = extract_modules(
        &s.org,
        &s.tuned,
        &s.plan,
        &selected,
        &mk(ExtractSvd::Full),
        &mut |_, _| {},
    )
    .expect("full");
    let rnd = extract_modules(
        &s.org,
        &s.tuned,
        &s.plan,
        &selected,
        &mk(ExtractSvd::Randomized {
            oversample: 8,
            power_iters: 2,
            seed: 3,
        }),
        &mut |_, _| {},
    )
    .expect("randomized");
    let mut checked = BTreeMap::new();
    for (name, f) in &full.weights.modules {
        let r = &rnd.weights.modules[name];
        let (rf, rr) = (full.residuals[name], rnd.residuals[name]);
        // The randomised residual is never much worse than the optimal (Eckart–Young) one.
        assert!(rr <= rf * 1.01 + 1e-6, "{name}: residual {rr} vs full {rf}");
        let pf = product(&f.up, &f.down, 1.0);
        if pf.norm().double_value(&[]) > 0.0 {
            let e = rel(&product(&r.up, &r.down, 1.0), &pf);
            checked.insert(name.clone(), e);
        }
    }
    assert!(!checked.is_empty());
    let worst = checked.values().copied().fold(0.0, f64::max);
    assert!(worst < 2e-2, "randomised vs full rank-4 ΔW: {worst}");
}
