//! `--full_fp16` / `--full_bf16` end to end on the tiny SD1.5 fixture (spec training.md §6.8,
//! lora-format.md §3): the LoRA weights train in half precision (fp16 with the loss scaler),
//! stay finite and move away from their initialisation, lower the loss on the training image,
//! and the saved file's dtype is the network's unless `--save_precision` says otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::{ComponentLayers, LoraNetwork, LoraWeights};
use sd_formats::dtype::Dtype;
use sd_formats::keymap::Component;
use sd_formats::safetensors::SafetensorsFile;
use sd_testutil::fixture;
use tch::{Kind, Tensor};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_train-network")
}

/// One DreamBooth subset with the astronaut photo at 64 px.
fn dataset(dir: &Path) -> PathBuf {
    let sub = dir.join("1_tok photo");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::fs::copy(
        fixture("train-images/10_tok photo/astronaut.jpg"),
        sub.join("astronaut.jpg"),
    )
    .expect("copy image");
    std::fs::write(sub.join("astronaut.txt"), "tok photo, astronaut").expect("caption");
    let toml = format!(
        "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 64\nbatch_size = 1\nenable_bucket = false\n[[datasets.subsets]]\nimage_dir = \"{}\"\nnum_repeats = 1\n",
        sub.display()
    );
    let path = dir.join("data.toml");
    std::fs::write(&path, toml).expect("toml");
    path
}

/// Runs a training of `steps` steps with `extra` flags; returns (exit code, stderr, LoRA path).
fn train(dir: &Path, steps: &str, extra: &[&str]) -> (i32, String, PathBuf) {
    let data = dataset(dir);
    let out = dir.join("out");
    let output = Command::new(bin())
        .args([
            "--pretrained_model_name_or_path",
            fixture("tiny-sd15").to_str().expect("utf-8"),
            "--dataset_config",
            data.to_str().expect("utf-8"),
            "--output_dir",
            out.to_str().expect("utf-8"),
            "--output_name",
            "half",
            "--network_module=networks.lora",
            "--seed",
            "1234",
            "--no_progress",
            "--network_train_unet_only",
            "--cache_latents",
            "--learning_rate",
            "1e-2",
            "--max_train_steps",
            steps,
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .output()
        .expect("train-network runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        output.status.code().unwrap_or(-1),
        stderr,
        out.join("half.safetensors"),
    )
}

/// (dtype of every lora_down/lora_up tensor, all finite, sum of |lora_up|).
fn weights_summary(path: &Path) -> (Vec<Dtype>, bool, f64) {
    let file = SafetensorsFile::open(path).expect("reads");
    let weights = LoraWeights::load(path, &Default::default()).expect("loads");
    let mut dtypes: Vec<Dtype> = file
        .names()
        .iter()
        .filter(|n| n.ends_with(".weight"))
        .map(|n| file.info(n).expect("info").dtype)
        .collect();
    dtypes.dedup();
    let mut finite = true;
    let mut up = 0.0;
    for t in weights.modules.values() {
        for x in [&t.down, &t.up] {
            finite &= x.to_kind(Kind::Float).isfinite().all().int64_value(&[]) != 0;
        }
        up +=
            t.up.to_kind(Kind::Float)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]);
    }
    (dtypes, finite, up)
}

/// Mean ε-loss of the tiny model (with `lora` at multiplier 1 when given) on the astronaut's
/// latents over fixed noise and timesteps, f32.
fn loss_on(model: &StableDiffusion, lora: Option<&Path>) -> f64 {
    let mut net = lora.map(|p| {
        let w = LoraWeights::load(p, &Default::default()).expect("LoRA loads");
        let comps = vec![ComponentLayers {
            component: Component::Unet,
            layers: model.unet.lora_layers(),
        }];
        LoraNetwork::from_weights(&w, model.family, &comps, 1.0)
            .expect("applies")
            .0
    });
    if let Some(n) = &mut net {
        n.apply();
    }
    tch::no_grad(|| {
        let img = image::open(fixture("train-images/10_tok photo/astronaut.jpg"))
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
fn full_fp16_trains_half_weights_with_the_scaler_and_saves_fp16() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, stderr, lora) = train(
        tmp.path(),
        "30",
        &["--mixed_precision", "fp16", "--full_fp16"],
    );
    assert_eq!(code, 0, "{stderr}");
    // No --save_precision: the file keeps the network's dtype (spec lora-format.md §3).
    let (dtypes, finite, up) = weights_summary(&lora);
    assert_eq!(dtypes, [Dtype::F16], "{stderr}");
    assert!(finite);
    assert!(up > 1.0, "lora_up moved from zero: Σ|up| = {up}");
    let meta = SafetensorsFile::open(&lora)
        .expect("reads")
        .metadata()
        .clone();
    assert_eq!(meta["ss_full_fp16"], "True");
    assert_eq!(meta["ss_mixed_precision"], "fp16");

    tch::set_num_threads(1);
    let base =
        StableDiffusion::load(&fixture("tiny-sd15"), &ModelLoadOptions::default()).expect("model");
    let before = loss_on(&base, None);
    let after = loss_on(&base, Some(&lora));
    assert!(
        after < before * 0.99,
        "loss on the training image: before {before}, after {after}"
    );
}

#[test]
fn full_bf16_saves_in_the_save_precision() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, stderr, lora) = train(
        tmp.path(),
        "4",
        &[
            "--mixed_precision",
            "bf16",
            "--full_bf16",
            "--save_precision",
            "float",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let (dtypes, finite, up) = weights_summary(&lora);
    assert_eq!(dtypes, [Dtype::F32]);
    assert!(finite);
    assert!(up > 0.0, "lora_up moved from zero");
    let meta = SafetensorsFile::open(&lora)
        .expect("reads")
        .metadata()
        .clone();
    assert_eq!(meta["ss_full_fp16"], "False");
    assert_eq!(meta["ss_mixed_precision"], "bf16");
    // The memory estimate is logged before training (sd_core::train::memory).
    assert!(
        stderr.contains("estimated cpu memory for batch 1 at 8x8 latents:"),
        "{stderr}"
    );
}

#[test]
fn full_half_needs_the_matching_mixed_precision() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (flags, message) in [
        (
            &["--full_fp16"][..],
            "--full_fp16 requires --mixed_precision fp16",
        ),
        (
            &["--full_bf16", "--mixed_precision", "fp16"][..],
            "--full_bf16 requires --mixed_precision bf16",
        ),
    ] {
        let (code, stderr, lora) = train(tmp.path(), "1", flags);
        assert_ne!(code, 0, "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
        assert!(!lora.exists());
    }
}
