//! VAE parity with diffusers' `AutoencoderKL` on the tiny fixtures
//! (tests/fixtures/README.md §5a–c: `goldens/vae-*.safetensors`, tolerance 1e-4 / 1e-4).

use std::collections::HashMap;

use sd_core::models::vae::{Vae, VaeConfig};
use sd_core::weights::{LoadOptions, load_var_store};
use sd_testutil::{assert_close, fixture};
use tch::{Device, Kind, Tensor, nn::VarStore};

fn read(rel: &str) -> HashMap<String, Tensor> {
    let path = fixture(rel);
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32 tensor")
}

fn check_golden(model: &str, golden: &str, scaling_factor: f64) {
    tch::set_num_threads(1);
    let config = VaeConfig::from_file(&fixture(&format!("{model}/vae/config.json")))
        .expect("tiny config parses");
    assert_eq!(config.scaling_factor, scaling_factor);
    let vs = VarStore::new(Device::Cpu);
    let vae = Vae::new(&vs.root(), &config).expect("valid config");
    let rel = format!("{model}/vae/diffusion_pytorch_model.safetensors");
    load_var_store(&vs, read(&rel), &rel, &[], LoadOptions::default())
        .expect("weights match the model exactly");
    let g = read(&format!("goldens/{golden}.safetensors"));

    let (dist, decoded) = tch::no_grad(|| {
        let dist = vae.encode(&g["image"]);
        let decoded = vae.decode(&g["latent_mean"]);
        (dist, decoded)
    });
    let close = |what: &str, t: &Tensor, key: &str| {
        assert_eq!(t.size(), g[key].size(), "{golden} {what}");
        assert_close(
            &format!("{golden} {what}"),
            &values(t),
            &values(&g[key]),
            1e-4,
            1e-4,
        );
    };
    close("mean", &dist.mean, "latent_mean");
    close("logvar", &dist.logvar, "latent_logvar");
    close("std", &dist.std(), "latent_std");
    close("sample", &dist.sample_with(&g["noise"]), "latent_sample");
    close("decoded", &decoded, "decoded_from_mean");
}

#[test]
fn vae_sd15_matches_diffusers() {
    check_golden("tiny-sd15", "vae-sd15", 0.18215);
}

#[test]
fn vae_sd21v_matches_diffusers() {
    // The one tiny VAE with a channel change, so its nin/conv shortcuts are exercised.
    check_golden("tiny-sd21v", "vae-sd21v", 0.18215);
}

#[test]
fn vae_sdxl_matches_diffusers() {
    check_golden("tiny-sdxl", "vae-sdxl", 0.13025);
}

#[test]
fn presets_carry_the_family_scaling_factor() {
    assert_eq!(VaeConfig::sd().scaling_factor, 0.18215);
    assert_eq!(VaeConfig::sdxl().scaling_factor, 0.13025);
}

#[test]
fn other_block_types_are_rejected() {
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-sd15/vae/config.json")).expect("readable"),
    )
    .expect("json");
    v["up_block_types"][1] = serde_json::json!("AttnUpDecoderBlock2D");
    let err = VaeConfig::from_json(&v, "vae.json").expect_err("unsupported block type");
    assert_eq!(
        err.to_string(),
        "vae.json: unsupported up_block_types = \"AttnUpDecoderBlock2D\" (supported: UpDecoderBlock2D)"
    );
}
