//! Dataset config, scan, summary, epoch plan and debug listing through the public API.

use std::fs;
use std::path::Path;

use sd_data::bucket::Resolution;
use sd_data::caption::CaptionProgress;
use sd_data::config::{DatasetArgs, DatasetKind, config_from_args, load_dataset_config};
use sd_data::dataset::{DatasetSummary, ScanOptions, scan_datasets};
use sd_data::dataset_error::DatasetError;
use sd_data::dataset_plan::plan_epoch;
use sd_data::debug_listing::debug_listing;
use sd_testutil::{fixture, fixtures_dir};

fn write_png(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]))
        .save(path)
        .expect("write png");
}

fn write(path: &Path, text: &str) {
    fs::write(path, text).expect("write file");
}

#[test]
fn fixture_dataset_matches_sd_scripts() {
    let toml = fixture("train-images/dataset.toml");
    let group = load_dataset_config(&toml, &DatasetArgs::default()).expect("valid config");
    assert_eq!(group.datasets.len(), 1);
    let ds = &group.datasets[0];
    assert_eq!(ds.kind, DatasetKind::DreamBooth);
    assert_eq!(ds.batch_size, 2);
    assert_eq!(ds.buckets.resolution, Resolution::new(256, 256));
    assert_eq!(ds.subsets.len(), 1);
    let sub = &ds.subsets[0];
    assert_eq!(sub.caption_extension, ".txt");
    assert_eq!(sub.caption.keep_tokens, 1);
    assert_eq!(sub.num_repeats, 10);
    assert_eq!(sub.class_tokens.as_deref(), Some("tok photo"));

    // dataset.toml paths are relative to the fixtures root.
    let opts = ScanOptions {
        base_dir: fixtures_dir(),
        verify_decode: true,
    };
    let scan = scan_datasets(&group, &opts).expect("scan");
    assert!(scan.warnings.is_empty(), "{:?}", scan.warnings);
    let summary = scan.datasets[0].summary();

    let expected: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(fixture("train-images/dataset.expected.json")).expect("read"),
    )
    .expect("json");
    let exp_summary = DatasetSummary {
        dataset_class: expected["dataset_class"].as_str().expect("str").to_owned(),
        num_train_images: expected["num_train_images"].as_u64().expect("u64"),
        num_reg_images: expected["num_reg_images"].as_u64().expect("u64"),
        bucket_counts_with_repeats: serde_json::from_value(
            expected["bucket_counts_with_repeats"].clone(),
        )
        .expect("map"),
        num_batches_per_epoch: expected["num_batches_per_epoch"].as_u64().expect("u64"),
        images: serde_json::from_value(expected["images"].clone()).expect("images"),
    };
    assert_eq!(summary, exp_summary);
    let used: Vec<[u32; 2]> = scan.datasets[0]
        .buckets
        .iter()
        .map(|b| [b.resolution.width, b.resolution.height])
        .collect();
    let exp_used: Vec<[u32; 2]> =
        serde_json::from_value(expected["predefined_bucket_resos_wh"].clone())
            .expect("bucket list");
    assert_eq!(used, exp_used);
    assert_eq!(scan.num_batches(), 40);
}

#[test]
fn epoch_plan_is_deterministic_and_complete() {
    let toml = fixture("train-images/dataset.toml");
    let group = load_dataset_config(&toml, &DatasetArgs::default()).expect("valid config");
    let scan = scan_datasets(
        &group,
        &ScanOptions {
            base_dir: fixtures_dir(),
            verify_decode: false,
        },
    )
    .expect("scan");
    let a = plan_epoch(&scan, 1234, 1);
    let b = plan_epoch(&scan, 1234, 1);
    assert_eq!(a, b);
    assert_eq!(a.batches.len(), 40);
    // Every image appears num_repeats (10) times, batches never mix buckets, sizes <= 2.
    let mut counts = vec![0usize; scan.datasets[0].images.len()];
    for batch in &a.batches {
        assert!(!batch.samples.is_empty() && batch.samples.len() <= 2);
        for s in &batch.samples {
            counts[s.image] += 1;
            assert_eq!(
                scan.datasets[0].images[s.image].assignment.bucket,
                batch.bucket
            );
        }
    }
    assert_eq!(counts, vec![10; 8]);
    // Another epoch or seed gives another order.
    assert_ne!(a.batches, plan_epoch(&scan, 1234, 2).batches);
    assert_ne!(a.batches, plan_epoch(&scan, 1235, 1).batches);
    // Pinned first batch: bitwise reproducibility across builds (ChaCha8 + own draws).
    let first: Vec<usize> = a.batches[0].samples.iter().map(|s| s.image).collect();
    let again: Vec<usize> = plan_epoch(&scan, 1234, 1).batches[0]
        .samples
        .iter()
        .map(|s| s.image)
        .collect();
    assert_eq!(first, again);

    let listing = debug_listing(
        &scan,
        &a,
        CaptionProgress {
            epoch: 1,
            step: 0,
            max_train_steps: 400,
        },
    );
    assert_eq!(listing.batches.len(), 40);
    assert_eq!(listing.num_batches, 40);
    assert_eq!(
        listing.datasets[0].buckets,
        vec![
            (Resolution::new(256, 256), 50),
            (Resolution::new(320, 192), 30)
        ]
    );
    let json = serde_json::to_value(&listing).expect("serialise");
    assert_eq!(
        json["datasets"][0]["buckets"][0],
        serde_json::json!([[256, 256], 50])
    );
    let text = listing.to_text();
    assert!(
        text.starts_with("epoch 1 (seed 1234): 40 batches\n"),
        "{text}"
    );
    assert!(text.contains("  bucket 320x192: 30\n"), "{text}");
    assert!(text.contains("| repeats 10 | tok photo, "), "{text}");
}

#[test]
fn folder_mode_with_reg_balancing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train = dir.path().join("train");
    let reg = dir.path().join("reg");
    for (folder, n) in [
        (train.join("3_sks dog"), 2),
        (reg.join("1_dog"), 5),
        (train.join("not_a_subset"), 1),
    ] {
        fs::create_dir_all(&folder).expect("mkdir");
        for i in 0..n {
            write_png(&folder.join(format!("img{i}.png")), 64, 64);
        }
    }
    let args = DatasetArgs {
        train_data_dir: Some(train),
        reg_data_dir: Some(reg),
        resolution: Some(Resolution::new(64, 64)),
        train_batch_size: 4,
        prior_loss_weight: 0.5,
        ..DatasetArgs::default()
    };
    let group = config_from_args(&args).expect("config");
    assert_eq!(group.datasets[0].subsets.len(), 2);
    assert!(
        group.warnings.iter().any(|w| w.contains("not_a_subset")),
        "{:?}",
        group.warnings
    );
    let scan = scan_datasets(&group, &ScanOptions::default()).expect("scan");
    let ds = &scan.datasets[0];
    // 2 train images x 3 repeats = 6; 5 reg images x 1 = 5 before balancing.
    assert_eq!(ds.num_train_images, 6);
    assert_eq!(ds.num_reg_images, 5);
    // Balancing: first round registers all 5 reg images (n = 5), second round adds one
    // repeat to the first reg image (n = 6) and stops.
    let reg_repeats: Vec<u32> = ds
        .images
        .iter()
        .filter(|e| e.is_reg)
        .map(|e| e.num_repeats)
        .collect();
    assert_eq!(reg_repeats, vec![2, 1, 1, 1, 1]);
    let caption: Vec<&str> = ds.images.iter().map(|e| e.caption.as_str()).collect();
    assert_eq!(
        caption,
        vec!["sks dog", "sks dog", "dog", "dog", "dog", "dog", "dog"]
    );
    // 12 samples in one 64x64 bucket at batch 4 -> 3 batches.
    assert_eq!(ds.num_batches(), 3);
    let reg_index = ds.images.iter().position(|e| e.is_reg).expect("reg image");
    assert_eq!(ds.loss_weight(reg_index), 0.5);
    assert_eq!(ds.loss_weight(0), 1.0);
}

#[test]
fn surplus_reg_images_are_dropped_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let train = dir.path().join("train/1_a");
    let reg = dir.path().join("reg/1_b");
    fs::create_dir_all(&train).expect("mkdir");
    fs::create_dir_all(&reg).expect("mkdir");
    write_png(&train.join("t.png"), 64, 64);
    for i in 0..3 {
        write_png(&reg.join(format!("r{i}.png")), 64, 64);
    }
    let args = DatasetArgs {
        train_data_dir: Some(dir.path().join("train")),
        reg_data_dir: Some(dir.path().join("reg")),
        resolution: Some(Resolution::new(64, 64)),
        ..DatasetArgs::default()
    };
    let scan = scan_datasets(
        &config_from_args(&args).expect("config"),
        &ScanOptions::default(),
    )
    .expect("scan");
    let names: Vec<String> = scan.datasets[0]
        .images
        .iter()
        .map(|e| {
            e.path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(names, vec!["t.png", "r0.png"]);
    assert_eq!(scan.datasets[0].num_reg_images, 3);
}

#[test]
fn all_problems_are_reported_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("imgs");
    fs::create_dir_all(&sub).expect("mkdir");
    write_png(&sub.join("good.png"), 64, 64);
    write(&sub.join("good.caption"), "fine\n");
    write(&sub.join("broken.JPG"), "not a jpeg");
    write_png(&sub.join("empty_cap.png"), 64, 64);
    write(&sub.join("empty_cap.caption"), "");
    write_png(&sub.join("latin1.png"), 64, 64);
    fs::write(sub.join("latin1.caption"), b"caf\xe9").expect("write");
    write_png(&sub.join("tiny.png"), 8, 8);
    let toml = dir.path().join("ds.toml");
    write(
        &toml,
        "[general]\nresolution = 64\nenable_bucket = true\nbucket_no_upscale = true\nmin_bucket_reso = 64\nmax_bucket_reso = 64\n\
         [[datasets]]\n[[datasets.subsets]]\nimage_dir = \"imgs\"\nclass_tokens = \"x\"\n",
    );
    let group = load_dataset_config(&toml, &DatasetArgs::default()).expect("config");
    let err = scan_datasets(
        &group,
        &ScanOptions {
            base_dir: dir.path().to_path_buf(),
            verify_decode: false,
        },
    )
    .expect_err("problems");
    let DatasetError::Scan { issues } = &err else {
        panic!("expected a scan error, got {err}")
    };
    let mut found: Vec<(String, bool)> = issues
        .iter()
        .map(|i| {
            (
                i.path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                !i.reason.is_empty(),
            )
        })
        .collect();
    found.sort();
    assert_eq!(
        found,
        vec![
            ("broken.JPG".to_owned(), true),
            ("empty_cap.caption".to_owned(), true),
            ("latin1.caption".to_owned(), true),
            ("tiny.png".to_owned(), true),
        ],
        "{err}"
    );
    let text = err.to_string();
    assert!(text.starts_with("4 problem(s) in the dataset:"), "{text}");
    assert!(text.contains("caption file is empty (0 lines)"), "{text}");
    assert!(text.contains("not valid UTF-8"), "{text}");
    assert!(text.contains("too small"), "{text}");
}

#[test]
fn fine_tuning_metadata() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_png(&dir.path().join("a.png"), 96, 64);
    write_png(&dir.path().join("b.jpg"), 64, 64);
    let meta = dir.path().join("meta.json");
    write(
        &meta,
        r#"{"a.png": {"caption": "a cat", "tags": "tag1, tag2", "train_resolution": [64, 64]},
            "b": {"tags": "only tags"}}"#,
    );
    let args = DatasetArgs {
        train_data_dir: Some(dir.path().to_path_buf()),
        in_json: Some(meta),
        resolution: Some(Resolution::new(64, 64)),
        dataset_repeats: 2,
        ..DatasetArgs::default()
    };
    let group = config_from_args(&args).expect("config");
    assert_eq!(group.datasets[0].kind, DatasetKind::FineTuning);
    let scan = scan_datasets(&group, &ScanOptions::default()).expect("scan");
    let ds = &scan.datasets[0];
    assert_eq!(ds.num_train_images, 4);
    let got: Vec<(String, &str, Resolution)> = ds
        .images
        .iter()
        .map(|e| {
            (
                e.path
                    .file_name()
                    .expect("name")
                    .to_string_lossy()
                    .into_owned(),
                e.caption.as_str(),
                e.size,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "a.png".to_owned(),
                "a cat,tag1, tag2",
                Resolution::new(96, 64)
            ),
            ("b.jpg".to_owned(), "only tags", Resolution::new(64, 64)),
        ]
    );
}

#[test]
fn pinned_sequences_for_bitwise_reproducibility() {
    // Changing DataRng or plan_epoch changes every training run: these values are pinned.
    let mut rng = sd_data::dataset_rng::DataRng::new(1234, 1);
    let raw: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
    assert_eq!(
        raw,
        vec![
            6489699360772695812,
            1974387328855280834,
            12732898307958752601
        ]
    );
    let toml = fixture("train-images/dataset.toml");
    let group = load_dataset_config(&toml, &DatasetArgs::default()).expect("valid config");
    let scan = scan_datasets(
        &group,
        &ScanOptions {
            base_dir: fixtures_dir(),
            verify_decode: false,
        },
    )
    .expect("scan");
    let plan = plan_epoch(&scan, 1234, 1);
    let first: Vec<Vec<usize>> = plan.batches[..4]
        .iter()
        .map(|b| b.samples.iter().map(|s| s.image).collect())
        .collect();
    assert_eq!(first, vec![vec![6, 5], vec![4, 3], vec![0, 6], vec![7, 2]]);
    assert_eq!(plan.batches[0].samples[0].seed, 10800752594299102025);
}
