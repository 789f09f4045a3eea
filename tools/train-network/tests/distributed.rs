//! Data-parallel training end to end (docs/distributed.md), CPU + Gloo on loopback, tiny SD1.5
//! at 64 px: 2 processes × batch 1 train the same LoRA as 1 process × batch 2 (f32 tolerance),
//! also with gradient accumulation and an uneven last batch; a 2-process state resumes on one
//! process; a worker that dies makes the run fail with a clear message instead of hanging.
//! Skipped, with a printed reason, when the build has no Gloo.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sd_formats::safetensors::SafetensorsFile;
use sd_testutil::fixture;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_train-network")
}

fn gloo_or_skip() -> bool {
    if sd_dist::Backend::Gloo.is_available() {
        true
    } else {
        println!(
            "skipped: this build has no Gloo backend ({})",
            sd_dist::missing_reason()
        );
        false
    }
}

/// A one-subset dataset of `images` (64 px, one repeat) with per-process `batch_size`.
fn dataset(dir: &Path, images: &[&str], batch_size: u32) -> PathBuf {
    let sub = dir.join("1_tok photo");
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
        "[general]\ncaption_extension = \".txt\"\n[[datasets]]\nresolution = 64\nbatch_size = {batch_size}\nenable_bucket = false\n[[datasets.subsets]]\nimage_dir = \"{}\"\nnum_repeats = 1\nflip_aug = true\n",
        sub.display()
    );
    let path = dir.join(format!("data-b{batch_size}.toml"));
    std::fs::write(&path, toml).expect("toml");
    path
}

fn train(args: &[String], env: &[(&str, &str)]) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args).env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("train-network runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

fn args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let model = fixture("tiny-sd15");
    let mut v: Vec<String> = [
        "--pretrained_model_name_or_path",
        model.to_str().expect("utf-8"),
        "--dataset_config",
        data.to_str().expect("utf-8"),
        "--output_dir",
        out.to_str().expect("utf-8"),
        "--network_module=networks.lora",
        "--seed",
        "1234",
        "--no_progress",
        "--learning_rate",
        "1.0",
        "--output_name",
        "d",
        "--optimizer_type",
        "SGDNesterov",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    v.extend(extra.iter().map(|s| (*s).to_owned()));
    v
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let f = SafetensorsFile::open(path).expect("LoRA opens");
    let mut v: Vec<(String, Vec<f32>)> = f
        .names()
        .iter()
        .map(|n| {
            let bytes = f.data(n).expect("data");
            let vals = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n.clone(), vals)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest |a − b| over every tensor of two LoRA files (same key sets required), and the
/// largest |a − initial| (how much training moved the weights).
fn max_diff(a: &Path, b: &Path) -> f32 {
    let (ta, tb) = (tensors(a), tensors(b));
    let names = |t: &[(String, Vec<f32>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&ta), names(&tb), "key sets differ");
    ta.iter()
        .zip(&tb)
        .flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

// Plain SGD with momentum keeps the update linear in the gradient, so a summation-order
// difference of the all-reduce stays at f32 rounding size (Adam would normalise it away or
// amplify it for tiny gradients).
const TOL: f32 = 2e-5;

#[test]
fn two_processes_of_batch_1_train_the_same_lora_as_one_of_batch_2() {
    if !gloo_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    // 3 images: global batches of 2 and 1, so the last batch leaves rank 1 empty; with
    // --gradient_accumulation_steps 2 that is one optimiser step per epoch.
    let images = ["astronaut.jpg", "coffee.jpg", "rocket.jpg"];
    let d2 = dataset(tmp.path(), &images, 2);
    let d1 = dataset(tmp.path(), &images, 1);
    let extra = [
        "--max_train_steps",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--save_every_n_steps",
        "1",
        "--save_state",
    ];
    let (one, two, resumed) = (
        tmp.path().join("one"),
        tmp.path().join("two"),
        tmp.path().join("resumed"),
    );
    let (code, log_one) = train(&args(&d2, &one, &extra), &[]);
    assert_eq!(code, 0, "{log_one}");
    let mut a = args(&d1, &two, &extra);
    a.extend(["--num_processes", "2", "--ddp_backend", "gloo"].map(String::from));
    let (code, log_two) = train(&a, &[]);
    assert_eq!(code, 0, "{log_two}");
    assert!(log_two.contains("rank 0 of 2 (gloo"), "{log_two}");
    // Only rank 0 writes: one LoRA per save, no duplicates or partial files.
    let mut written: Vec<String> = std::fs::read_dir(&two)
        .expect("output dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "d-state",
            "d-step00000001-state",
            "d-step00000001.safetensors",
            "d-step00000002-state",
            "d-step00000002.safetensors",
            "d.safetensors"
        ]
    );
    let diff = max_diff(&one.join("d.safetensors"), &two.join("d.safetensors"));
    println!("2×1 vs 1×2: max |Δ| = {diff:e}");
    assert!(diff <= TOL, "2×1 vs 1×2: max |Δ| = {diff}");
    let moved = max_diff(
        &one.join("d-step00000001.safetensors"),
        &one.join("d.safetensors"),
    );
    assert!(
        moved > 100.0 * TOL,
        "training barely moved the weights ({moved})"
    );
    println!("2 processes × batch 1 vs 1 × batch 2: max |Δ| = {diff:e} (moved {moved:e})");

    // The 2-process state of step 1 resumes on one process (batch 2) and ends where the
    // uninterrupted 1-process run did.
    let state = two.join("d-step00000001-state");
    let mut a = args(&d2, &resumed, &extra[..4]);
    a.extend(["--resume".to_owned(), state.to_string_lossy().into_owned()]);
    let (code, log) = train(&a, &[]);
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("resumed from"), "{log}");
    let diff = max_diff(&one.join("d.safetensors"), &resumed.join("d.safetensors"));
    assert!(
        diff <= TOL,
        "resumed 2-process state vs uninterrupted: {diff}"
    );
}

#[test]
fn cached_latents_are_split_over_the_ranks_with_the_same_result() {
    if !gloo_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let images = ["astronaut.jpg", "coffee.jpg", "rocket.jpg", "coins.png"];
    let d2 = dataset(tmp.path(), &images, 2);
    let d1 = dataset(tmp.path(), &images, 1);
    let extra = ["--max_train_steps", "2", "--cache_latents"];
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let (code, log) = train(&args(&d2, &one, &extra), &[]);
    assert_eq!(code, 0, "{log}");
    let mut a = args(&d1, &two, &extra);
    a.extend(["--num_processes", "2"].map(String::from));
    let (code, log) = train(&a, &[]);
    assert_eq!(code, 0, "{log}");
    // Rank 0 encoded its half (images 0 and 2) and received the rest.
    assert!(log.contains("cached latents of 2 images"), "{log}");
    let diff = max_diff(&one.join("d.safetensors"), &two.join("d.safetensors"));
    assert!(diff <= TOL, "cached latents, 2×1 vs 1×2: max |Δ| = {diff}");
}

#[test]
fn a_worker_that_dies_fails_the_run_with_a_clear_message() {
    if !gloo_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let d1 = dataset(tmp.path(), &["astronaut.jpg", "coffee.jpg"], 1);
    let out = tmp.path().join("out");
    let mut a = args(
        &d1,
        &out,
        &["--max_train_steps", "20", "--ddp_timeout", "1"],
    );
    a.extend(["--num_processes", "2"].map(String::from));
    let start = Instant::now();
    let (code, log) = train(&a, &[("SD_DIST_TEST_ABORT", "1:2")]);
    let took = start.elapsed();
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains(
            "error: worker 1 of 2 failed (killed by signal 6); the other workers were stopped"
        ),
        "{log}"
    );
    // Generous for a loaded 2-core machine; the bound that matters is --ddp_timeout 1 (min).
    assert!(took < Duration::from_secs(300), "took {took:?}");
    assert!(!out.join("d.safetensors").exists());
}
