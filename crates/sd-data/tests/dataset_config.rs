//! Dataset TOML validation and value resolution (spec training.md §2.1–§2.4).

use std::fs;
use std::path::{Path, PathBuf};

use sd_data::bucket::Resolution;
use sd_data::config::{
    DatasetArgs, DatasetKind, TrainingChecks, config_from_args, load_dataset_config,
};
use sd_data::dataset_error::DatasetError;
use sd_data::image_prep::ResizeInterpolation;

fn toml_file(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("dataset.toml");
    fs::write(&p, text).expect("write toml");
    p
}

fn load(
    text: &str,
) -> (
    tempfile::TempDir,
    PathBuf,
    Result<sd_data::config::DatasetGroupConfig, DatasetError>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = toml_file(dir.path(), text);
    let r = load_dataset_config(&p, &DatasetArgs::default());
    (dir, p, r)
}

#[test]
fn unknown_key_names_file_table_and_key() {
    let (_d, p, r) = load(
        "[general]\nresolution = 512\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"\nnum_repeat = 3\n",
    );
    let err = r.expect_err("unknown key");
    assert!(
        matches!(&err, DatasetError::UnknownKey { key, table, .. } if key == "num_repeat" && table == "[[datasets.subsets]] #1.1")
    );
    assert_eq!(
        err.to_string(),
        format!(
            "{}: unknown key \"num_repeat\" in [[datasets.subsets]] #1.1",
            p.display()
        )
    );

    // A known key at the wrong level says where it belongs.
    let (_d, p, r) = load(
        "[[datasets]]\nresolution = 512\nimage_dir = \"x\"\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
    );
    assert_eq!(
        r.expect_err("subset-only key").to_string(),
        format!(
            "{}: unknown key \"image_dir\" in [[datasets]] #1 (allowed in [[datasets.subsets]] only)",
            p.display()
        )
    );
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = \"x\"\nbatch_size = 2\n",
    );
    assert!(
        r.expect_err("dataset key in subset")
            .to_string()
            .contains("(allowed in [general] and [[datasets]] only)")
    );
    let (_d, _p, r) = load("[general]\nprior_loss_weight = 1.0\n");
    assert!(
        r.expect_err("cli-only")
            .to_string()
            .contains("a command-line option, not a dataset key")
    );
    let (_d, _p, r) = load("title = \"x\"\n");
    assert!(
        r.expect_err("top level")
            .to_string()
            .contains("unknown key \"title\" in the top level")
    );
}

#[test]
fn wrong_types_name_key_expected_and_found() {
    let (_d, p, r) = load(
        "[[datasets]]\nresolution = 512\nnetwork_multiplier = 1\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
    );
    assert_eq!(
        r.expect_err("int for float").to_string(),
        format!(
            "{}: key \"network_multiplier\" in [[datasets]] #1: expected a float (write 1.0, not 1), found integer",
            p.display()
        )
    );
    let (_d, _p, r) = load("[general]\nshuffle_caption = \"yes\"\n");
    let err = r.expect_err("string for bool").to_string();
    assert!(
        err.ends_with(
            "key \"shuffle_caption\" in [general]: expected a boolean (true or false), found string"
        ),
        "{err}"
    );
    let (_d, _p, r) = load("[general]\nresolution = [512, 512, 3]\n");
    assert!(
        r.expect_err("3 ints")
            .to_string()
            .contains("found an array of 3 element(s)")
    );
    // "float or int" keys accept both.
    let (_d, _p, r) = load(
        "[general]\nresolution = [640, 512]\ncaption_dropout_rate = 0\ntoken_warmup_step = 0.5\n\
         [[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
    );
    let g = r.expect("valid");
    assert_eq!(g.datasets[0].buckets.resolution, Resolution::new(640, 512));
    assert_eq!(g.datasets[0].subsets[0].caption.token_warmup_step, 0.5);
}

#[test]
fn syntax_errors_and_missing_keys() {
    let (_d, p, r) = load("[general\n");
    let err = r.expect_err("syntax").to_string();
    assert!(
        err.starts_with(&format!("{}: invalid TOML", p.display())),
        "{err}"
    );
    let (_d, _p, r) = load("[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"x\"\n");
    assert!(
        r.expect_err("no resolution")
            .to_string()
            .contains("missing required key \"resolution\"")
    );
    let (_d, _p, r) =
        load("[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nclass_tokens = \"x\"\n");
    assert!(
        r.expect_err("no image_dir")
            .to_string()
            .contains("missing required key \"image_dir\"")
    );
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = \"x\"\n[[datasets.subsets]]\nmetadata_file = \"m.json\"\n",
    );
    assert!(matches!(
        r.expect_err("mixed"),
        DatasetError::MixedDatasetKinds { .. }
    ));
}

#[test]
fn values_resolve_subset_dataset_general_cli_default() {
    let text = r#"
[general]
resolution = 512
keep_tokens = 1
flip_aug = true
caption_extension = "txt"
resize_interpolation = "box"

[[datasets]]
batch_size = 4
keep_tokens = 2
enable_bucket = true
min_bucket_reso = 300
  [[datasets.subsets]]
  image_dir = "a"
  keep_tokens = 3
  [[datasets.subsets]]
  image_dir = "b"
  is_reg = true
  [[datasets.subsets]]
  image_dir = "a"
  [[datasets.subsets]]
  image_dir = "c"
  num_repeats = 0

[[datasets]]
resolution = [768, 512]
  [[datasets.subsets]]
  metadata_file = "meta.json"
  image_dir = "imgs"
"#;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = toml_file(dir.path(), text);
    let args = DatasetArgs {
        train_data_dir: Some(PathBuf::from("ignored")),
        shuffle_caption: true,
        dataset_repeats: 7,
        train_batch_size: 3,
        prior_loss_weight: 0.25,
        ..DatasetArgs::default()
    };
    let g = load_dataset_config(&p, &args).expect("valid");
    assert_eq!(g.datasets.len(), 2);
    let d0 = &g.datasets[0];
    assert_eq!(d0.kind, DatasetKind::DreamBooth);
    assert_eq!(d0.batch_size, 4);
    assert_eq!(d0.prior_loss_weight, 0.25);
    assert_eq!(d0.buckets.min_bucket_reso, 256); // rounded down to the 64 step
    // duplicate "a" and num_repeats 0 are dropped
    let dirs: Vec<_> = d0
        .subsets
        .iter()
        .map(|s| s.image_dir.clone().expect("dir"))
        .collect();
    assert_eq!(dirs, vec![PathBuf::from("a"), PathBuf::from("b")]);
    let (s0, s1) = (&d0.subsets[0], &d0.subsets[1]);
    assert_eq!((s0.caption.keep_tokens, s1.caption.keep_tokens), (3, 2));
    assert!(s0.augment.flip_aug && !s0.augment.color_aug);
    assert!(s0.caption.shuffle_caption); // from the command line
    assert_eq!(s0.num_repeats, 7); // --dataset_repeats
    assert_eq!(s0.caption_extension, ".txt");
    assert_eq!(s0.resize_interpolation, Some(ResizeInterpolation::Box));
    assert!(s1.is_reg && !s0.is_reg);
    let d1 = &g.datasets[1];
    assert_eq!(d1.kind, DatasetKind::FineTuning);
    assert_eq!(d1.batch_size, 3); // --train_batch_size
    assert_eq!(d1.buckets.resolution, Resolution::new(768, 512));
    assert_eq!(d1.subsets[0].caption.keep_tokens, 1); // [general]
    let w = g.warnings.join("\n");
    assert!(w.contains("duplicate subset a ignored"), "{w}");
    assert!(w.contains("num_repeats 0 < 1, subset ignored"), "{w}");
    assert!(
        w.contains("ignored is ignored because a dataset config is given"),
        "{w}"
    );
    assert!(
        w.contains(
            "min_bucket_reso 300 is not divisible by bucket_reso_steps 64: rounded down to 256"
        ),
        "{w}"
    );
}

#[test]
fn json_dataset_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("ds.JSON");
    fs::write(&p, r#"{"general": {"resolution": 512}, "datasets": [{"subsets": [{"image_dir": "x", "num_repeats": 2}]}]}"#)
        .expect("write");
    let g = load_dataset_config(&p, &DatasetArgs::default()).expect("valid json");
    assert_eq!(g.datasets[0].subsets[0].num_repeats, 2);
}

#[test]
fn unsupported_and_invalid_options() {
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = \"x\"\nface_crop_aug_range = [2.0, 4.0]\n",
    );
    let err = r.expect_err("unsupported").to_string();
    assert!(
        err.starts_with("face_crop_aug_range is unsupported"),
        "{err}"
    );
    let args = DatasetArgs {
        train_data_dir: Some(PathBuf::from("/nonexistent-dir-for-test")),
        in_json: Some(PathBuf::from("m.json")),
        resolution: Some(Resolution::new(512, 512)),
        face_crop_aug_range: Some((2.0, 4.0)),
        ..DatasetArgs::default()
    };
    assert!(matches!(
        config_from_args(&args),
        Err(DatasetError::Unsupported { .. })
    ));
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 512\nbatch_size = 0\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
    );
    assert!(r.expect_err("batch 0").to_string().contains(
        "key \"batch_size\" in [[datasets]] #1: expected an integer of at least 1, found 0"
    ));
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = \"x\"\ncaption_dropout_rate = 1.5\n",
    );
    assert!(
        r.expect_err("rate")
            .to_string()
            .contains("expected a probability in [0, 1], found 1.5")
    );
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 512\nenable_bucket = true\nmax_bucket_reso = 256\n[[datasets.subsets]]\nimage_dir = \"x\"\n",
    );
    assert!(
        r.expect_err("limits")
            .to_string()
            .contains("must be at most max_bucket_reso 256")
    );
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = \"x\"\nresize_interpolation = \"fancy\"\n",
    );
    assert!(
        r.expect_err("interp")
            .to_string()
            .contains("unknown interpolation \"fancy\"")
    );
}

#[test]
fn training_checks() {
    let (_d, _p, r) = load(
        "[[datasets]]\nresolution = 1024\nenable_bucket = true\nbucket_reso_steps = 32\n[[datasets.subsets]]\nimage_dir = \"x\"\nrandom_crop = true\n",
    );
    let g = r.expect("valid");
    let sdxl = TrainingChecks {
        bucket_step_divisor: 32,
        cache_latents: false,
        cache_text_encoder_outputs: false,
    };
    g.check_for_training(sdxl).expect("SDXL accepts 32");
    let sd = TrainingChecks {
        bucket_step_divisor: 64,
        ..sdxl
    };
    assert!(
        g.check_for_training(sd)
            .expect_err("SD needs 64")
            .to_string()
            .contains("must be divisible by 64")
    );
    let cached = TrainingChecks {
        cache_latents: true,
        ..sdxl
    };
    assert!(
        g.check_for_training(cached)
            .expect_err("random_crop")
            .to_string()
            .contains("--cache_latents")
    );
}

#[test]
fn caption_extention_alias_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::create_dir_all(dir.path().join("5_dog")).expect("mkdir");
    let args = DatasetArgs {
        train_data_dir: Some(dir.path().to_path_buf()),
        resolution: Some(Resolution::new(512, 512)),
        caption_extension: ".caption".to_owned(),
        caption_extention: Some(".txt".to_owned()),
        ..DatasetArgs::default()
    };
    let g = config_from_args(&args).expect("config");
    let s = &g.datasets[0].subsets[0];
    assert_eq!(s.caption_extension, ".txt");
    assert_eq!((s.num_repeats, s.class_tokens.as_deref()), (5, Some("dog")));
}
