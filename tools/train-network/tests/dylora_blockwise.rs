//! End-to-end `train-network` runs of issue 7 on the tiny SD1.5 fixture: a DyLoRA run whose
//! file splits into working fixed-rank LoRAs, and block-wise options from `--network_args`
//! and from a `--config_file` TOML.

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::dylora::{split, split_path};
use sd_core::lora::{ComponentLayers, LoraNetwork, LoraWeights};
use sd_formats::keymap::Component;
use sd_formats::safetensors::SafetensorsFile;
use sd_formats::tensor_file::TensorFile;
use sd_testutil::fixture;
use tch::Kind;

fn dataset(dir: &Path) -> PathBuf {
    let sub = dir.join("1_tok photo");
    std::fs::create_dir_all(&sub).expect("mkdir");
    std::fs::copy(
        fixture("train-images/10_tok photo/astronaut.jpg"),
        sub.join("astronaut.jpg"),
    )
    .expect("copy image");
    std::fs::write(sub.join("astronaut.txt"), "tok photo").expect("caption");
    let toml = format!(
        "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 64\nbatch_size = 1\nenable_bucket = false\n[[datasets.subsets]]\nimage_dir = \"{}\"\nnum_repeats = 1\n",
        sub.display()
    );
    let path = dir.join("data.toml");
    std::fs::write(&path, toml).expect("toml");
    path
}

fn train(dir: &Path, extra: &[&str]) -> (i32, String) {
    let data = dataset(dir);
    let out = Command::new(env!("CARGO_BIN_EXE_train-network"))
        .arg("--pretrained_model_name_or_path")
        .arg(fixture("tiny-sd15"))
        .arg("--dataset_config")
        .arg(&data)
        .arg("--output_dir")
        .arg(dir.join("out"))
        .args(["--output_name", "net", "--seed", "7", "--no_progress"])
        .args(["--network_train_unet_only", "--learning_rate", "1e-2"])
        .args(extra)
        .env("RUST_LOG", "info")
        .output()
        .expect("train-network runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn down_shapes(path: &Path) -> Vec<(String, Vec<usize>)> {
    let f = SafetensorsFile::open(path).expect("reads");
    f.sorted_names()
        .into_iter()
        .filter(|n| n.ends_with(".lora_down.weight"))
        .map(|n| (n.to_owned(), f.info(n).expect("info").shape.clone()))
        .collect()
}

#[test]
fn dylora_run_splits_into_working_loras() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = train(
        tmp.path(),
        &[
            "--network_module=networks.dylora",
            "--network_dim=8",
            "--network_alpha=4",
            "--network_args",
            "unit=4",
            "conv_dim=8",
            "--max_train_steps",
            "12",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    let file = tmp.path().join("out/net.safetensors");
    let f = SafetensorsFile::open(&file).expect("reads");
    assert_eq!(f.metadata()["ss_network_module"], "networks.dylora");
    let shapes = down_shapes(&file);
    assert!(shapes.iter().all(|(_, s)| s[0] == 8), "{shapes:?}");
    assert!(
        shapes.iter().any(|(_, s)| s.len() == 4 && s[2] == 3),
        "C3Lier modules"
    );

    // Both rank slices were trained (up starts at zero).
    let w = LoraWeights::load(&file, &Default::default()).expect("loads");
    let trained = |range: (i64, i64)| {
        w.modules.values().any(|t| {
            let up = t.up.to_kind(Kind::Float).reshape([t.up.size()[0], -1]);
            up.narrow(1, range.0, range.1)
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0
        })
    };
    assert!(trained((0, 4)) && trained((4, 4)));

    // Split at unit 4 → rank 4; it applies to the model as a plain LoRA.
    let splits = split(&TensorFile::open(&file).expect("open"), 4).expect("split");
    assert_eq!(splits.iter().map(|s| s.rank).collect::<Vec<_>>(), [4]);
    let part = split_path(&tmp.path().join("split.safetensors"), 4);
    let meta = splits[0].save(&part).expect("save split");
    assert_eq!(meta["ss_network_dim"], "4");
    assert!(down_shapes(&part).iter().all(|(_, s)| s[0] == 4));

    tch::set_num_threads(1);
    let model =
        StableDiffusion::load(&fixture("tiny-sd15"), &ModelLoadOptions::default()).expect("model");
    for lora in [&file, &part] {
        let w = LoraWeights::load(lora, &Default::default()).expect("split loads");
        let comps = [ComponentLayers {
            component: Component::Unet,
            layers: model.unet.lora_layers(),
        }];
        let (mut net, report) =
            LoraNetwork::from_weights(&w, model.family, &comps, 1.0).expect("applies");
        assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
        assert_eq!(report.total(), w.modules.len());
        let total: f64 = net
            .parameters()
            .iter()
            .flat_map(|(_, p)| p.iter().map(|t| t.abs().sum(Kind::Float).double_value(&[])))
            .sum();
        assert!(total.is_finite() && total > 0.0);
        net.apply();
        net.remove();
    }
}

#[test]
fn dylora_conv_dim_must_equal_network_dim() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = train(
        tmp.path(),
        &[
            "--network_module=networks.dylora",
            "--network_dim=8",
            "--network_args",
            "unit=4",
            "conv_dim=4",
        ],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("conv_dim (4) must equal --network_dim (8)"),
        "{stderr}"
    );
}

/// Down blocks at weight 0 (preset `zeros`) get no modules; block_dims set the other ranks.
fn check_blockwise_file(path: &Path) {
    let shapes = down_shapes(path);
    assert!(!shapes.is_empty());
    assert!(
        shapes.iter().all(|(n, _)| !n.contains("down_blocks")),
        "{shapes:?}"
    );
    for (n, s) in &shapes {
        let want = if n.contains("mid_block") { 2 } else { 3 };
        assert_eq!(s[0], want, "{n}");
    }
}

const BLOCK_DIMS: &str = "block_dims=3,3,3,3,3,3,3,3,3,3,3,3,2,3,3,3,3,3,3,3,3,3,3,3,3";

#[test]
fn blockwise_options_from_network_args_and_config_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, stderr) = train(
        tmp.path(),
        &[
            "--network_module=networks.lora",
            "--max_train_steps",
            "2",
            "--network_args",
            "down_lr_weight=zeros",
            "up_lr_weight=cosine+.5",
            BLOCK_DIMS,
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    check_blockwise_file(&tmp.path().join("out/net.safetensors"));

    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "network_module = \"networks.lora\"\nmax_train_steps = 2\nnetwork_args = [\"down_lr_weight=zeros\", \"up_lr_weight=cosine+.5\", \"{BLOCK_DIMS}\"]\n"
        ),
    )
    .expect("config");
    let (code, stderr) = train(
        tmp.path(),
        &["--config_file", config.to_str().expect("utf-8")],
    );
    assert_eq!(code, 0, "{stderr}");
    check_blockwise_file(&tmp.path().join("out/net.safetensors"));

    // A wrong length is refused before the model loads.
    let (code, stderr) = train(
        tmp.path(),
        &[
            "--network_module=networks.lora",
            "--network_args",
            "block_dims=4,4",
        ],
    );
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("block_dims"), "{stderr}");
}
