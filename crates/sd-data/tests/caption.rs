//! Caption files and caption processing (spec training.md §2.5, §4.1), including the edge
//! cases users reported.

use std::fs;
use std::path::{Path, PathBuf};

use sd_data::bucket::Resolution;
use sd_data::caption::{
    CaptionOptions, CaptionProgress, caption_candidates, normalize_extension, process_caption,
    read_caption_file,
};
use sd_data::config::{DatasetArgs, config_from_args};
use sd_data::dataset::{ScanOptions, scan_datasets};
use sd_data::dataset_rng::DataRng;

fn caption_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).expect("write caption");
    p
}

const P: CaptionProgress = CaptionProgress {
    epoch: 1,
    step: 0,
    max_train_steps: 100,
};

#[test]
fn first_line_empty_gives_empty_caption_with_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = caption_file(dir.path(), "a.caption", b"\nsecond line, tags\n");
    let c = read_caption_file(&p, false).expect("readable");
    assert_eq!(c.caption, "");
    assert_eq!(c.warnings.len(), 1);
    assert!(
        c.warnings[0].starts_with("first line is empty"),
        "{:?}",
        c.warnings
    );
    // With wildcards every non-empty line counts.
    let c = read_caption_file(&p, true).expect("readable");
    assert_eq!(c.caption, "second line, tags");
    assert!(c.warnings.is_empty());
}

#[test]
fn several_lines_use_the_first_unless_wildcards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = caption_file(dir.path(), "a.caption", b"  a, b  \r\nc, d\n\n e \n");
    let c = read_caption_file(&p, false).expect("readable");
    assert_eq!(c.caption, "a, b");
    assert_eq!(
        c.warnings,
        vec!["3 non-empty lines: only the first is used (enable_wildcard picks one line per step)"]
    );
    let c = read_caption_file(&p, true).expect("readable");
    assert_eq!(c.caption, "a, b\nc, d\ne");
    // Processing without wildcards keeps the first line only; with wildcards one line is chosen.
    let opts = CaptionOptions::default();
    assert_eq!(
        process_caption("x, y\nz", &opts, P, &mut DataRng::new(0, 1)),
        "x, y"
    );
    let wild = CaptionOptions {
        enable_wildcard: true,
        ..CaptionOptions::default()
    };
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..32 {
        seen.insert(process_caption(
            &c.caption,
            &wild,
            P,
            &mut DataRng::new(seed, 1),
        ));
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec!["a, b", "c, d", "e"]
    );
}

#[test]
fn empty_caption_file_is_an_error_and_blank_file_is_empty_caption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = caption_file(dir.path(), "empty.caption", b"");
    assert_eq!(
        read_caption_file(&p, false).expect_err("0 lines"),
        "caption file is empty (0 lines)"
    );
    let p = caption_file(dir.path(), "blank.caption", b"\n");
    let c = read_caption_file(&p, false).expect("one blank line");
    assert_eq!(c.caption, "");
    assert_eq!(c.warnings, vec!["caption is empty"]);
}

#[test]
fn utf8_bom_is_removed_and_invalid_utf8_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = caption_file(
        dir.path(),
        "bom.caption",
        "\u{feff}tok photo, a cat\n".as_bytes(),
    );
    assert_eq!(
        read_caption_file(&p, false).expect("readable").caption,
        "tok photo, a cat"
    );
    let p = caption_file(dir.path(), "latin1.caption", b"caf\xe9");
    let err = read_caption_file(&p, false).expect_err("latin-1");
    assert_eq!(
        err,
        "caption file is not valid UTF-8 (invalid byte at offset 3)"
    );
}

#[test]
fn txt_captions_with_caption_extension_are_pointed_at() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("train/2_cat");
    fs::create_dir_all(&sub).expect("mkdir");
    for name in ["a", "b"] {
        image::RgbImage::new(64, 64)
            .save(sub.join(format!("{name}.png")))
            .expect("png");
        fs::write(sub.join(format!("{name}.txt")), "a caption").expect("txt");
    }
    let args = DatasetArgs {
        train_data_dir: Some(dir.path().join("train")),
        resolution: Some(Resolution::new(64, 64)),
        ..DatasetArgs::default()
    };
    let scan = scan_datasets(
        &config_from_args(&args).expect("config"),
        &ScanOptions::default(),
    )
    .expect("scan");
    // No fallback: the class tokens are used, as in the reference…
    let captions: Vec<&str> = scan.datasets[0]
        .images
        .iter()
        .map(|e| e.caption.as_str())
        .collect();
    assert_eq!(captions, vec!["cat", "cat"]);
    // …but a warning names the folder, the files and the fix.
    assert_eq!(scan.warnings.len(), 1, "{:?}", scan.warnings);
    let w = &scan.warnings[0];
    assert_eq!(w.path, sub);
    assert!(
        w.reason.starts_with(
            "2 image(s) have no \".caption\" caption but a \".txt\" file beside them ("
        ),
        "{}",
        w.reason
    );
    assert!(
        w.reason.contains(&sub.join("a.txt").display().to_string()),
        "{}",
        w.reason
    );
    assert!(
        w.reason.contains("set caption_extension = \".txt\""),
        "{}",
        w.reason
    );

    // With caption_extension "txt" (no dot) the captions are read.
    let args = DatasetArgs {
        caption_extension: "txt".to_owned(),
        ..args
    };
    let scan = scan_datasets(
        &config_from_args(&args).expect("config"),
        &ScanOptions::default(),
    )
    .expect("scan");
    assert!(scan.warnings.is_empty());
    assert_eq!(scan.datasets[0].images[0].caption, "a caption");
}

#[test]
fn caption_candidates_include_the_face_crop_name() {
    let c = caption_candidates(Path::new("/d/img_10_20_30_40.png"), "txt");
    assert_eq!(
        c,
        vec![
            PathBuf::from("/d/img_10_20_30_40.txt"),
            PathBuf::from("/d/img.txt")
        ]
    );
    assert_eq!(
        caption_candidates(Path::new("/d/a_b.jpg"), ".caption"),
        vec![PathBuf::from("/d/a_b.caption")]
    );
    assert_eq!(normalize_extension("txt"), ".txt");
    assert_eq!(normalize_extension(".txt"), ".txt");
}

fn sorted_tokens(s: &str, sep: &str) -> Vec<String> {
    let mut v: Vec<String> = s.split(sep).map(|t| t.trim().to_owned()).collect();
    v.sort();
    v
}

#[test]
fn custom_separator_is_kept_when_shuffling() {
    let opts = CaptionOptions {
        shuffle_caption: true,
        caption_separator: ";".to_owned(),
        ..CaptionOptions::default()
    };
    let caption = "red hair; blue eyes; smile, open mouth; hat";
    let mut orders = std::collections::BTreeSet::new();
    for seed in 0..16 {
        let out = process_caption(caption, &opts, P, &mut DataRng::new(seed, 1));
        assert!(!out.contains(", ,"));
        assert_eq!(out.matches("; ").count(), 3, "{out}");
        assert_eq!(sorted_tokens(&out, ";"), sorted_tokens(caption, ";"));
        orders.insert(out);
    }
    assert!(orders.len() > 1);
}

#[test]
fn keep_tokens_and_keep_tokens_separator() {
    let opts = CaptionOptions {
        shuffle_caption: true,
        keep_tokens: 2,
        ..CaptionOptions::default()
    };
    for seed in 0..8 {
        let out = process_caption(
            "tok, photo, a, b, c, d",
            &opts,
            P,
            &mut DataRng::new(seed, 1),
        );
        assert!(out.starts_with("tok, photo, "), "{out}");
        assert_eq!(
            sorted_tokens(&out, ","),
            sorted_tokens("tok, photo, a, b, c, d", ",")
        );
    }
    let opts = CaptionOptions {
        shuffle_caption: true,
        keep_tokens: 5, // ignored when the separator occurs
        keep_tokens_separator: "|||".to_owned(),
        ..CaptionOptions::default()
    };
    for seed in 0..8 {
        let out = process_caption(
            "a, b ||| c, d, , e ||| f, g",
            &opts,
            P,
            &mut DataRng::new(seed, 1),
        );
        assert!(
            out.starts_with("a, b, ") && out.ends_with(", f, g"),
            "{out}"
        );
        assert_eq!(
            sorted_tokens(&out, ","),
            vec!["a", "b", "c", "d", "e", "f", "g"]
        );
    }
}

#[test]
fn secondary_separator_prefix_and_suffix() {
    let opts = CaptionOptions {
        secondary_separator: Some(";;;".to_owned()),
        caption_prefix: Some("pre".to_owned()),
        caption_suffix: Some("post".to_owned()),
        ..CaptionOptions::default()
    };
    assert_eq!(
        process_caption("a;;;b, c", &opts, P, &mut DataRng::new(0, 1)),
        "pre a,b, c post"
    );
    // With shuffling the secondary-separated group stays together.
    let opts = CaptionOptions {
        shuffle_caption: true,
        ..opts
    };
    for seed in 0..8 {
        let out = process_caption("x;;;y, z", &opts, P, &mut DataRng::new(seed, 1));
        assert!(out.contains("x,y"), "{out}");
    }
}

#[test]
fn dropout_rates_and_epochs() {
    let always = CaptionOptions {
        caption_dropout_rate: 1.0,
        ..CaptionOptions::default()
    };
    assert_eq!(
        process_caption("a, b", &always, P, &mut DataRng::new(0, 1)),
        ""
    );
    let every2 = CaptionOptions {
        caption_dropout_every_n_epochs: 2,
        ..CaptionOptions::default()
    };
    assert_eq!(
        process_caption("a, b", &every2, P, &mut DataRng::new(0, 1)),
        "a, b"
    );
    let epoch2 = CaptionProgress { epoch: 2, ..P };
    assert_eq!(
        process_caption("a, b", &every2, epoch2, &mut DataRng::new(0, 1)),
        ""
    );
    let tags = CaptionOptions {
        caption_tag_dropout_rate: 1.0,
        keep_tokens: 1,
        ..CaptionOptions::default()
    };
    assert_eq!(
        process_caption("keep, x, y", &tags, P, &mut DataRng::new(0, 1)),
        "keep"
    );
}

#[test]
fn token_warmup_truncates_flexible_tokens() {
    let opts = CaptionOptions {
        token_warmup_step: 10.0,
        token_warmup_min: 1,
        keep_tokens: 1,
        ..CaptionOptions::default()
    };
    let caption = "fixed, a, b, c, d, e";
    let at = |step| {
        process_caption(
            caption,
            &opts,
            CaptionProgress { step, ..P },
            &mut DataRng::new(0, 1),
        )
    };
    assert_eq!(at(0), "fixed, a");
    assert_eq!(at(5), "fixed, a, b, c"); // floor(5 * (5 - 1) / 10) + 1 = 3
    assert_eq!(at(10), caption);
    // A fraction of max_train_steps: 0.1 * 100 = 10 steps.
    let frac = CaptionOptions {
        token_warmup_step: 0.1,
        ..opts
    };
    assert_eq!(
        process_caption(
            caption,
            &frac,
            CaptionProgress { step: 5, ..P },
            &mut DataRng::new(0, 1)
        ),
        "fixed, a, b, c"
    );
}

#[test]
fn processing_is_deterministic_per_seed() {
    let opts = CaptionOptions {
        shuffle_caption: true,
        caption_tag_dropout_rate: 0.3,
        enable_wildcard: true,
        ..CaptionOptions::default()
    };
    let caption = "a {red|green|blue} car, b, c, d, e, f, {{literal}}";
    for seed in 0..8 {
        let x = process_caption(caption, &opts, P, &mut DataRng::new(seed, 1));
        let y = process_caption(caption, &opts, P, &mut DataRng::new(seed, 1));
        assert_eq!(x, y);
        assert!(!x.contains('|'), "{x}");
    }
}
