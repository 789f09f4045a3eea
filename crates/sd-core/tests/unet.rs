//! U-Net parity with diffusers' `UNet2DConditionModel` on the tiny fixtures
//! (tests/fixtures/README.md §5a–c: `goldens/unet-*.safetensors`, tolerance 1e-4 / 1e-4).

use std::collections::HashMap;

use sd_core::models::embeddings::timestep_embedding;
use sd_core::models::unet::{BlockKind, TextTimeCondition, Unet, UnetConfig};
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

/// Builds the tiny U-Net of `model` (a Diffusers folder) with weights of `kind`.
fn tiny_unet(model: &str, kind: Kind) -> (VarStore, Unet) {
    let config = UnetConfig::from_file(&fixture(&format!("{model}/unet/config.json")))
        .expect("tiny config parses");
    let mut vs = VarStore::new(Device::Cpu);
    vs.set_kind(kind);
    let unet = Unet::new(&vs.root(), &config).expect("valid config");
    let rel = format!("{model}/unet/diffusion_pytorch_model.safetensors");
    load_var_store(&vs, read(&rel), &rel, &[], LoadOptions::default())
        .expect("weights match the model exactly");
    (vs, unet)
}

fn check_golden(model: &str, golden: &str) {
    tch::set_num_threads(1);
    let (_vs, unet) = tiny_unet(model, Kind::Float);
    let g = read(&format!("goldens/{golden}.safetensors"));
    let added = g.get("text_embeds").map(|te| TextTimeCondition {
        text_embeds: te.shallow_clone(),
        time_ids: g["time_ids"].shallow_clone(),
    });
    let out = tch::no_grad(|| {
        unet.forward(
            &g["sample"],
            &g["timestep"],
            &g["encoder_hidden_states"],
            added.as_ref(),
        )
    });
    assert_eq!(out.size(), g["noise_pred"].size());
    assert_close(golden, &values(&out), &values(&g["noise_pred"]), 1e-4, 1e-4);
}

#[test]
fn unet_sd15_matches_diffusers() {
    check_golden("tiny-sd15", "unet-sd15");
}

#[test]
fn unet_sd21v_matches_diffusers() {
    check_golden("tiny-sd21v", "unet-sd21v");
}

#[test]
fn unet_sdxl_matches_diffusers() {
    check_golden("tiny-sdxl", "unet-sdxl");
}

#[test]
fn sdxl_added_conditioning_vector_matches_sd_scripts() {
    // The tiny U-Nets have 32 channels in 32 GroupNorm groups, so norm2 of every resnet removes
    // the per-channel time embedding and the noise goldens cannot see the time path. sd-scripts'
    // `y` vector checks the sinusoidal embedding of the SDXL time ids (dim 16, cos first,
    // shift 0) that `add_embedding` consumes; the same function embeds the timesteps.
    let g = read("goldens/unet-sdxl.safetensors");
    let time_embeds =
        timestep_embedding(&g["time_ids"].reshape([-1]), 16, true, 0.0).reshape([2, -1]);
    let y = Tensor::cat(&[g["text_embeds"].shallow_clone(), time_embeds], -1);
    assert_close(
        "sdscripts_y",
        &values(&y),
        &values(&g["sdscripts_y"]),
        1e-5,
        1e-5,
    );
}

#[test]
fn f16_load_keeps_the_file_values_and_runs() {
    tch::set_num_threads(1);
    let (vs, unet) = tiny_unet("tiny-sd15", Kind::Half);
    let file = read("tiny-sd15/unet/diffusion_pytorch_model.safetensors");
    let vars = vs.variables();
    assert_eq!(vars.len(), file.len());
    for (name, t) in &file {
        let v = &vars[name];
        assert_eq!(v.kind(), Kind::Half, "{name}");
        assert!(
            v.equal(&t.to_kind(Kind::Half)),
            "{name}: f16 file values must load bit-exactly"
        );
    }
    // Half-precision forward on CPU: close to the f32 golden at fp16 tolerance.
    let g = read("goldens/unet-sd15.safetensors");
    let out = tch::no_grad(|| {
        unet.forward(
            &g["sample"].to_kind(Kind::Half),
            &g["timestep"],
            &g["encoder_hidden_states"].to_kind(Kind::Half),
            None,
        )
    });
    assert_eq!(out.kind(), Kind::Half);
    assert_close(
        "unet-sd15 f16",
        &values(&out),
        &values(&g["noise_pred"]),
        5e-2,
        5e-2,
    );
}

#[test]
fn tiny_configs_parse_into_the_expected_architecture() {
    let sd21 = UnetConfig::from_file(&fixture("tiny-sd21v/unet/config.json")).expect("parses");
    assert_eq!(sd21.attention_heads, vec![4; 4]);
    assert!(sd21.use_linear_projection && sd21.upcast_attention);
    assert_eq!(sd21.cross_attention_dim, 16);
    let sdxl = UnetConfig::from_file(&fixture("tiny-sdxl/unet/config.json")).expect("parses");
    assert_eq!(sdxl.transformer_layers_per_block, vec![1, 2, 3]);
    assert_eq!(
        sdxl.down_blocks,
        vec![BlockKind::Plain, BlockKind::CrossAttn, BlockKind::CrossAttn]
    );
    assert_eq!(sdxl.text_embeds_dim(), Some(24));
    let sd15 = UnetConfig::from_file(&fixture("tiny-sd15/unet/config.json")).expect("parses");
    assert_eq!(sd15.attention_heads, vec![8; 4]);
    assert!(!sd15.use_linear_projection);
}

#[test]
fn unsupported_config_values_are_errors_naming_the_key() {
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("tiny-sd15/unet/config.json")).expect("readable"),
    )
    .expect("json");
    v["class_embed_type"] = serde_json::json!("timestep");
    let err = UnetConfig::from_json(&v, "cfg.json").expect_err("class embeddings are not built");
    assert_eq!(
        err.to_string(),
        "cfg.json: unsupported class_embed_type = \"timestep\" (supported: null)"
    );
    v["class_embed_type"] = serde_json::Value::Null;
    v["attention_head_dim"] = serde_json::json!([8, 8]);
    let err = UnetConfig::from_json(&v, "cfg.json").expect_err("wrong list length");
    assert!(
        err.to_string()
            .contains("\"attention_head_dim\": expected an integer or a list of 4 integers"),
        "{err}"
    );
    v["attention_head_dim"] = serde_json::json!(7);
    let err = UnetConfig::from_json(&v, "cfg.json")
        .expect_err("32 channels are not divisible by 7 heads");
    assert!(
        err.to_string()
            .contains("not divisible by 7 attention heads"),
        "{err}"
    );
}
