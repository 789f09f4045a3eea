//! End-to-end SDXL runs of the built `train-network` (issue 8) on the tiny SDXL fixture in both
//! of its layouts (Diffusers folder, single file): the trained LoRA lowers the loss on its
//! training image under SDXL conditioning (both encoders, pooled embedding, size ids), has the
//! module names and shapes of sd-scripts' tiny-SDXL network (with and without conv_dim) and the
//! reference's SDXL metadata; text-encoder output caching writes sd-scripts' cache files.

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::{ComponentLayers, LoraNetwork, LoraWeights};
use sd_core::train::sdxl::{added_condition, encode_captions};
use sd_formats::keymap::Component;
use sd_formats::safetensors::SafetensorsFile;
use sd_testutil::fixture;
use tch::{Device, Kind, Tensor};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_train-network")
}

const CAPTION: &str = "tok photo, astronaut";

/// A one-image DreamBooth dataset at 64 px (no buckets).
fn dataset(dir: &Path) -> (PathBuf, PathBuf) {
    let sub = dir.join("1_tok photo");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let image = sub.join("astronaut.jpg");
    std::fs::copy(fixture("train-images/10_tok photo/astronaut.jpg"), &image).expect("copy");
    std::fs::write(sub.join("astronaut.txt"), CAPTION).expect("caption");
    let toml = format!(
        "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 64\nbatch_size = 1\nenable_bucket = false\n[[datasets.subsets]]\nimage_dir = \"{}\"\nnum_repeats = 1\n",
        sub.display()
    );
    let path = dir.join("data.toml");
    std::fs::write(&path, toml).expect("toml");
    (path, image)
}

fn train(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("train-network runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn common<'a>(model: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "--pretrained_model_name_or_path",
        model,
        "--dataset_config",
        data,
        "--output_dir",
        out,
        "--network_module=networks.lora",
        "--seed",
        "1234",
        "--no_progress",
        "--output_name",
        "xl",
    ]
}

/// A copy of the single-file tiny SDXL whose header carries the Diffusers configs under
/// `sd_lora_rs.configs`, so the tool loads it like a full-size checkpoint.
fn single_file_with_configs(dir: &Path) -> PathBuf {
    let bytes = std::fs::read(fixture("tiny-sdxl.safetensors")).expect("fixture");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
    let mut configs = serde_json::Map::new();
    for c in ["unet", "text_encoder", "text_encoder_2", "vae"] {
        let text = std::fs::read_to_string(fixture(&format!("tiny-sdxl/{c}/config.json")))
            .expect("config");
        configs.insert(
            c.to_owned(),
            serde_json::from_str(&text).expect("config JSON"),
        );
    }
    let meta = header
        .as_object_mut()
        .expect("header object")
        .entry("__metadata__")
        .or_insert_with(|| serde_json::json!({}));
    meta[sd_core::loader::CONFIG_METADATA_KEY] =
        serde_json::Value::String(serde_json::Value::Object(configs).to_string());
    let mut text = serde_json::to_vec(&header).expect("serialise");
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend_from_slice(&bytes[8 + n..]);
    let path = dir.join("tiny-sdxl-with-configs.safetensors");
    std::fs::write(&path, out).expect("write model");
    path
}

/// Mean ε-loss of `model` (with `lora` applied at multiplier 1 when given) on the latents of
/// `image` under SDXL conditioning, over fixed noise and timesteps.
fn loss_on(model: &StableDiffusion, lora: Option<&Path>, image: &Path) -> f64 {
    let mut net = lora.map(|p| {
        let w = LoraWeights::load(p, &Default::default()).expect("LoRA loads");
        let mut comps = vec![ComponentLayers {
            component: Component::Unet,
            layers: model.unet.lora_layers(),
        }];
        for slot in &model.text_encoders {
            comps.push(ComponentLayers {
                component: slot.component,
                layers: slot.model.lora_layers(),
            });
        }
        LoraNetwork::from_weights(&w, model.family, &comps, 1.0)
            .expect("applies")
            .0
    });
    if let Some(n) = &mut net {
        n.apply();
    }
    tch::no_grad(|| {
        let img = image::open(image)
            .expect("image")
            .resize_exact(64, 64, image::imageops::FilterType::Triangle)
            .to_rgb8();
        let data: Vec<f32> = img
            .pixels()
            .flat_map(|p| p.0)
            .map(|v| f32::from(v) / 127.5 - 1.0)
            .collect();
        let x = Tensor::from_slice(&data)
            .view([64, 64, 3])
            .permute([2, 0, 1])
            .unsqueeze(0);
        let latents = model.vae.encode(&x).mean * model.latent_scale();
        let text = encode_captions(model, &[CAPTION], None, Device::Cpu).expect("encodes");
        let ctx = text.context();
        // The image is 512×512, resized to the 64×64 bucket without a crop.
        let added = added_condition(
            &text.pool2,
            &[[512.0, 512.0, 0.0, 0.0, 64.0, 64.0]],
            Kind::Float,
            Device::Cpu,
        );
        let schedule = sd_core::schedule::NoiseSchedule::stable_diffusion();
        tch::manual_seed(99);
        let mut total = 0.0;
        for t in [50i64, 200, 400, 600, 800, 950] {
            let noise = latents.randn_like();
            let ts = Tensor::from_slice(&[t]);
            let noisy = schedule.add_noise(&latents, &noise, &ts);
            let pred = model.unet.forward(&noisy, &ts, &ctx, Some(&added));
            total += (pred - noise).square().mean(Kind::Float).double_value(&[]);
        }
        total / 6.0
    })
}

/// (name, lora_down shape, lora_up shape) of the golden modules whose name starts with one of
/// `prefixes`, sorted.
fn golden(file: &str, prefixes: &[&str]) -> Vec<(String, serde_json::Value, serde_json::Value)> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("lora/{file}"))).expect("golden"),
    )
    .expect("json");
    let mut rows: Vec<_> = v["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(|r| {
            let name = r["name"].as_str()?;
            prefixes.iter().any(|p| name.starts_with(p)).then(|| {
                (
                    name.to_owned(),
                    r["lora_down"].clone(),
                    r["lora_up"].clone(),
                )
            })
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

fn modules_of(path: &Path) -> Vec<(String, serde_json::Value, serde_json::Value)> {
    let file = SafetensorsFile::open(path).expect("reads");
    let mut rows: Vec<_> = file
        .names()
        .iter()
        .filter_map(|k| k.strip_suffix(".lora_down.weight"))
        .map(|name| {
            let shape = |k: &str| {
                serde_json::json!(
                    file.info(&format!("{name}.{k}"))
                        .expect("tensor present")
                        .shape
                        .clone()
                )
            };
            assert_eq!(
                file.info(&format!("{name}.alpha")).map(|i| i.shape.len()),
                Some(0),
                "{name}: 0-d alpha"
            );
            (
                name.to_owned(),
                shape("lora_down.weight"),
                shape("lora_up.weight"),
            )
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

fn assert_sdxl_metadata(path: &Path, steps: &str) {
    let file = SafetensorsFile::open(path).expect("reads");
    let meta = file.metadata();
    assert_eq!(meta["ss_base_model_version"], "sdxl_base_v1-0");
    assert_eq!(meta["ss_v2"], "False");
    assert_eq!(
        meta["modelspec.architecture"],
        "stable-diffusion-xl-v1-base/lora"
    );
    assert_eq!(
        meta["modelspec.implementation"],
        "https://github.com/Stability-AI/generative-models"
    );
    assert_eq!(meta["modelspec.prediction_type"], "epsilon");
    assert_eq!(meta["ss_steps"], steps);
    assert_eq!(meta["ss_network_module"], "networks.lora");
}

fn base_model() -> StableDiffusion {
    tch::set_num_threads(1);
    StableDiffusion::load(&fixture("tiny-sdxl"), &ModelLoadOptions::default()).expect("model")
}

#[test]
fn issue_8_sdxl_folder_with_both_text_encoders_trained() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (data, image) = dataset(tmp.path());
    let out = tmp.path().join("out");
    let model = fixture("tiny-sdxl");
    let (m, d, o) = (
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
    );
    let mut args = common(m, d, o);
    args.extend([
        "--sdxl",
        "--max_train_steps",
        "20",
        "--learning_rate",
        "1e-2",
        "--save_every_n_steps",
        "10",
    ]);
    let (code, stderr) = train(bin(), &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("566 modules (unet 302, text_encoder 72, text_encoder_2 192)"),
        "{stderr}"
    );
    // Saved files: the reference's names and count for save_every_n_steps 10 over 20 steps (the
    // step save fires at the last step too, then the final file is written).
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "xl-step00000010.safetensors",
            "xl-step00000020.safetensors",
            "xl.safetensors"
        ]
    );
    let lora = out.join("xl.safetensors");
    assert_eq!(
        modules_of(&lora),
        golden("lora-sdxl.modules.json", &["lora_"]),
        "module names and shapes equal sd-scripts' tiny-SDXL network (TE1 + TE2 + U-Net)"
    );
    assert_sdxl_metadata(&lora, "20");

    let base = base_model();
    let before = loss_on(&base, None, &image);
    let after = loss_on(&base, Some(&lora), &image);
    assert!(
        after < before * 0.97,
        "loss on the training image: before {before}, after {after}"
    );
}

#[test]
fn issue_8_sdxl_single_file_unet_only_with_cached_text_encoder_outputs_and_conv() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (data, image) = dataset(tmp.path());
    let out = tmp.path().join("out");
    let model = single_file_with_configs(tmp.path());
    let (m, d, o) = (
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
    );
    let mut args = common(m, d, o);
    args.extend([
        "--sdxl",
        "--max_train_steps",
        "30",
        "--learning_rate",
        "1e-2",
        "--network_train_unet_only",
        "--cache_text_encoder_outputs_to_disk",
        "--cache_latents_to_disk",
        "--network_args",
        "conv_dim=4",
        "conv_alpha=1",
    ]);
    let (code, stderr) = train(bin(), &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("cached text-encoder outputs of 1 images (0 from disk)"),
        "{stderr}"
    );
    // sd-scripts' cache file names for SDXL.
    let dir = image.parent().expect("dir");
    assert!(dir.join("astronaut_te_outputs.npz").is_file());
    assert!(
        dir.join("astronaut_0512x0512_sdxl.npz").is_file(),
        "{stderr}"
    );
    let lora = out.join("xl.safetensors");
    assert_eq!(
        modules_of(&lora),
        golden("lora-sdxl-conv.modules.json", &["lora_unet_"]),
        "U-Net modules with conv_dim equal sd-scripts' tiny-SDXL conv network"
    );
    assert_sdxl_metadata(&lora, "30");
    let base = base_model();
    let before = loss_on(&base, None, &image);
    let after = loss_on(&base, Some(&lora), &image);
    assert!(
        after < before * 0.97,
        "loss on the training image: before {before}, after {after}"
    );

    // A second run reuses both cache files.
    let out2 = tmp.path().join("out2");
    let mut args = common(m, d, out2.to_str().expect("utf-8"));
    args.extend([
        "--sdxl",
        "--max_train_steps",
        "1",
        "--network_train_unet_only",
        "--cache_text_encoder_outputs_to_disk",
        "--cache_latents_to_disk",
    ]);
    let (code, stderr) = train(bin(), &args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("cached text-encoder outputs of 1 images (1 from disk)"),
        "{stderr}"
    );
    assert_eq!(
        modules_of(&out2.join("xl.safetensors")),
        golden("lora-sdxl.modules.json", &["lora_unet_"]),
    );
}

#[test]
fn issue_8_alias_adds_sdxl_and_a_non_sdxl_checkpoint_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (data, _) = dataset(tmp.path());
    let model = fixture("tiny-sd15");
    let out = tmp.path().join("out");
    let alias = env!("CARGO_BIN_EXE_sdxl-train-network");
    let args = common(
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
    );
    let (code, stderr) = train(alias, &args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--sdxl is given but") && stderr.contains("not an SDXL checkpoint"),
        "{stderr}"
    );
    // Text-encoder caching needs a frozen text encoder (checked before the model loads).
    let mut args = common(
        "/nonexistent/model.safetensors",
        data.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
    );
    args.push("--cache_text_encoder_outputs");
    let (code, stderr) = train(alias, &args);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--network_train_unet_only"), "{stderr}");
}
