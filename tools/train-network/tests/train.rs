//! End-to-end runs of the built `train-network` on the tiny SD1.5 fixture (spec
//! training.md): the trained LoRA lowers the loss on its training image, has the reference's
//! module names, shapes and metadata keys, and a run resumed from a saved state ends bitwise
//! equal to an uninterrupted one.

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::{ComponentLayers, LoraNetwork, LoraWeights};
use sd_formats::keymap::Component;
use sd_formats::safetensors::SafetensorsFile;
use sd_testutil::fixture;
use tch::{Kind, Tensor};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_train-network")
}

/// A one-subset DreamBooth dataset with `images` of the bundled photos at 64 px.
fn dataset(dir: &Path, images: &[&str], repeats: u32) -> PathBuf {
    let sub = dir.join(format!("{repeats}_tok photo"));
    std::fs::create_dir_all(&sub).expect("mkdir");
    for name in images {
        let src = fixture("train-images/10_tok photo").join(name);
        std::fs::copy(&src, sub.join(name)).expect("copy image");
        let stem = Path::new(name)
            .file_stem()
            .expect("stem")
            .to_string_lossy()
            .into_owned();
        std::fs::write(
            sub.join(format!("{stem}.txt")),
            format!("tok photo, {stem}"),
        )
        .expect("caption");
    }
    let toml = format!(
        "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 64\nbatch_size = 1\nenable_bucket = false\n[[datasets.subsets]]\nimage_dir = \"{}\"\nnum_repeats = {repeats}\n",
        sub.display()
    );
    let path = dir.join("data.toml");
    std::fs::write(&path, toml).expect("toml");
    path
}

fn train(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin())
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
    ]
}

/// Mean ε-loss of `model` (with `lora` at multiplier 1 when given) on the latents of `image`
/// over fixed noise and timesteps.
fn loss_on(model: &StableDiffusion, lora: Option<&Path>, image: &Path) -> f64 {
    let mut net = lora.map(|p| {
        let w = LoraWeights::load(p, &Default::default()).expect("LoRA loads");
        let comps = vec![
            ComponentLayers {
                component: Component::Unet,
                layers: model.unet.lora_layers(),
            },
            ComponentLayers {
                component: Component::TextEncoder,
                layers: model.text_encoders[0].model.lora_layers(),
            },
        ];
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
        let te = &model.text_encoders[0];
        let ids = te
            .tokenizer
            .tokenize("tok photo, astronaut", 77)
            .expect("tokenize");
        let ctx = te
            .model
            .forward(&Tensor::from_slice(&ids).view([1, 77]))
            .last_hidden_state;
        let schedule = sd_core::schedule::NoiseSchedule::stable_diffusion();
        tch::manual_seed(99);
        let mut total = 0.0;
        for t in [50i64, 200, 400, 600, 800, 950] {
            let noise = latents.randn_like();
            let ts = Tensor::from_slice(&[t]);
            let noisy = schedule.add_noise(&latents, &noise, &ts);
            let pred = model.unet.forward(&noisy, &ts, &ctx, None);
            total += (pred - noise).square().mean(Kind::Float).double_value(&[]);
        }
        total / 6.0
    })
}

#[test]
fn training_lowers_the_loss_on_the_training_image_and_writes_a_reference_shaped_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = dataset(tmp.path(), &["astronaut.jpg"], 1);
    let out = tmp.path().join("out");
    let model = fixture("tiny-sd15");
    let (m, d, o) = (
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
    );
    let mut args = common(m, d, o);
    args.extend([
        "--output_name",
        "mylora",
        "--max_train_steps",
        "40",
        "--learning_rate",
        "1e-2",
        "--network_train_unet_only",
        "--cache_latents",
    ]);
    let (code, stderr) = train(&args);
    assert_eq!(code, 0, "{stderr}");
    let lora = out.join("mylora.safetensors");
    assert!(lora.is_file(), "{stderr}");

    tch::set_num_threads(1);
    let base = StableDiffusion::load(&model, &ModelLoadOptions::default()).expect("model");
    let image = fixture("train-images/10_tok photo/astronaut.jpg");
    let before = loss_on(&base, None, &image);
    let after = loss_on(&base, Some(&lora), &image);
    assert!(
        after < before * 0.97,
        "loss on the training image: before {before}, after {after}"
    );

    // Names and shapes: the U-Net modules of the reference network on this model.
    let file = SafetensorsFile::open(&lora).expect("reads");
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("lora/lora-sd15.modules.json")).expect("json"),
    )
    .expect("json");
    let rows = reference["modules"].as_array().expect("modules list");
    let mut expected: Vec<String> = rows
        .iter()
        .filter_map(|r| r["name"].as_str())
        .filter(|n| n.starts_with("lora_unet_"))
        .map(str::to_owned)
        .collect();
    expected.sort();
    let mut got: Vec<String> = file
        .names()
        .iter()
        .filter_map(|k| k.strip_suffix(".lora_down.weight"))
        .map(str::to_owned)
        .collect();
    got.sort();
    assert_eq!(got, expected);
    for row in rows.iter().filter(|r| {
        r["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("lora_unet_"))
    }) {
        let name = row["name"].as_str().expect("name");
        let shape = |k: &str| {
            file.info(&format!("{name}.{k}"))
                .map(|i| serde_json::json!(i.shape.clone()))
        };
        assert_eq!(
            shape("lora_down.weight"),
            Some(row["lora_down"].clone()),
            "{name}"
        );
        assert_eq!(
            shape("lora_up.weight"),
            Some(row["lora_up"].clone()),
            "{name}"
        );
        assert_eq!(
            file.info(&format!("{name}.alpha")).map(|i| i.shape.len()),
            Some(0),
            "{name}: 0-d alpha"
        );
    }
    let meta = file.metadata();
    for key in [
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_base_model_version",
        "ss_v2",
        "ss_learning_rate",
        "ss_num_train_images",
        "ss_num_epochs",
        "ss_max_train_steps",
        "ss_optimizer",
        "ss_seed",
        "ss_steps",
        "ss_epoch",
        "ss_tag_frequency",
        "ss_dataset_dirs",
        "ss_datasets",
        "ss_session_id",
        "ss_training_started_at",
        "sshs_model_hash",
        "sshs_legacy_hash",
        "modelspec.architecture",
        "modelspec.title",
        "modelspec.prediction_type",
    ] {
        assert!(
            meta.contains_key(key),
            "metadata lacks {key}: {:?}",
            meta.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1/lora");
    assert_eq!(meta["ss_steps"], "40");
    assert_eq!(meta["ss_optimizer"], "torch.optim.adamw.AdamW");
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let f = SafetensorsFile::open(path).expect("reads");
    let mut v: Vec<(String, Vec<u8>)> = f
        .names()
        .iter()
        .map(|n| (n.clone(), f.data(n).expect("data").to_vec()))
        .collect();
    v.sort();
    v
}

#[test]
fn a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = dataset(tmp.path(), &["astronaut.jpg", "coffee.jpg"], 2);
    let model = fixture("tiny-sd15");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (m, d) = (
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
    );
    // Steps cross an epoch boundary (4 batches per epoch) and the state is taken mid-epoch.
    let extra = [
        "--max_train_steps",
        "6",
        "--learning_rate",
        "1e-3",
        "--output_name",
        "r",
        "--lr_scheduler",
        "cosine",
        "--network_dropout",
        "0.1",
    ];
    let mut args = common(m, d, a.to_str().expect("utf-8"));
    args.extend(extra);
    args.extend(["--save_every_n_steps", "3", "--save_state"]);
    let (code, stderr) = train(&args);
    assert_eq!(code, 0, "{stderr}");
    let state = a.join("r-step00000003-state");
    assert!(state.join("train_state.json").is_file(), "{stderr}");

    let mut args = common(m, d, b.to_str().expect("utf-8"));
    args.extend(extra);
    args.extend(["--resume", state.to_str().expect("utf-8")]);
    let (code, stderr) = train(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resumed from"), "{stderr}");
    let (ta, tb) = (
        tensors(&a.join("r.safetensors")),
        tensors(&b.join("r.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for ((na, da), (nb, db)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(
            da == db,
            "{na} differs between the resumed and the uninterrupted run"
        );
    }
    // And training did change the weights (the comparison is not vacuous).
    let step3 = tensors(&a.join("r-step00000003.safetensors"));
    assert!(step3.iter().zip(&ta).any(|((_, x), (_, y))| x != y));
}

#[test]
fn debug_dataset_lists_one_epoch_without_loading_the_model() {
    let out = Command::new(bin())
        .current_dir(fixture(""))
        .args([
            "--pretrained_model_name_or_path",
            "/nonexistent/model.safetensors",
            "--dataset_config",
            "train-images/dataset.toml",
        ])
        .args([
            "--network_module",
            "networks.lora",
            "--output_dir",
            "/tmp/unused",
            "--debug_dataset",
            "--json",
        ])
        .output()
        .expect("runs");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON listing");
    let batches = v["batches"].as_array().expect("batches");
    assert_eq!(batches.len(), 40);
    let samples: usize = batches
        .iter()
        .map(|b| b["samples"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(samples, 80);
}

#[test]
fn dataset_problems_are_reported_before_the_model_loads() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let sub = tmp.path().join("1_x");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::fs::write(sub.join("broken.png"), b"not a png").expect("write");
    std::fs::write(sub.join("also.jpg"), b"nope").expect("write");
    let (code, stderr) = train(&[
        "--pretrained_model_name_or_path",
        "/nonexistent/model.safetensors",
        "--train_data_dir",
        tmp.path().to_str().expect("utf-8"),
        "--resolution",
        "64",
        "--network_module",
        "networks.lora",
        "--output_dir",
        "/tmp/unused",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("broken.png") && stderr.contains("also.jpg"),
        "both bad images listed: {stderr}"
    );
    assert!(!stderr.contains("loading model"), "{stderr}");
}

#[test]
fn sample_prompt_problems_are_reported_before_training() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let data = dataset(tmp.path(), &["astronaut.jpg"], 1);
    let prompts = tmp.path().join("prompts.txt");
    // pndm needs at least 4 steps (its Runge-Kutta warm-up); the default sampler is euler_a.
    std::fs::write(&prompts, "a photo --ss pndm --s 3\n").expect("write prompts");
    let out = tmp.path().join("out");
    let model = fixture("tiny-sd15");
    let mut args = common(
        model.to_str().expect("utf-8"),
        data.to_str().expect("utf-8"),
        out.to_str().expect("utf-8"),
    );
    let prompts_arg = prompts.to_str().expect("utf-8").to_owned();
    args.extend(["--sample_prompts", &prompts_arg, "--max_train_steps", "2"]);
    let (code, stderr) = train(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("prompts.txt") && stderr.contains("pndm"),
        "the prompt file and sampler are named: {stderr}"
    );
    let written: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        !written
            .iter()
            .any(|n| n.to_string_lossy().ends_with(".safetensors")),
        "no LoRA written: {written:?}"
    );
}
