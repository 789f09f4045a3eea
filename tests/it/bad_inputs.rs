//! Issue 12: the bad-input corpus (tests/bad-inputs/, made by scripts/make-bad-inputs.py) run
//! against every tool it applies to. For each run: the expected exit code, an `error:` line
//! naming the file and the cause, never "panicked at", and no output left behind on failure.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sd_formats::safetensors::SafetensorsFile;
use sd_testutil::fixture;

use crate::tools::{optional_tool, tool};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bad-inputs")
}

/// Tensor files whose reading fails (crates/sd-formats/tests/io_bad_inputs.rs has the exact
/// reader messages) or that hold no LoRA: every LoRA-reading tool exits 1 and names the file.
const NOT_A_LORA: &[&str] = &[
    "bad-opcode.ckpt",
    "big-endian.ckpt",
    "float8-dtype.safetensors",
    "folder.safetensors",
    "gap-in-data.safetensors",
    "header-longer-than-file.safetensors",
    "header-over-limit.safetensors",
    "header-too-short.safetensors",
    "invalid-json.safetensors",
    "legacy-tensors.pt",
    "legacy-truncated.pt",
    "lightning-callbacks.ckpt",
    "metadata-not-strings.safetensors",
    "missing-storage.ckpt",
    "nan-inf.safetensors",
    "no-tensors.ckpt",
    "offsets-past-end.safetensors",
    "os-system.ckpt",
    "overlapping-offsets.safetensors",
    "plain-text.safetensors",
    "raw-pickle-os-system.pt",
    "shape-length-mismatch.safetensors",
    "strided-views.ckpt",
    "truncated-zip.ckpt",
    "truncated.safetensors",
    "unknown-dtype.safetensors",
    "unknown-module.ckpt",
    "view-past-storage.ckpt",
    "zero-length.safetensors",
    "zero-length.ckpt",
    "zip-without-data-pkl.ckpt",
];

/// Which LoRA tool run a [`LoraCase`] row describes.
///
/// check-lora-weights prints its report and exits 1 when a module has a PROBLEM
/// (docs/check-lora-weights.md); the report itself is not checked here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `check-lora-weights FILE`.
    Check,
    /// `merge-lora --models FILE lora-sd15 --ratios 1 1` (LoRA + LoRA).
    MergeLoras,
    /// `merge-lora --sd_model tiny-sd15 --models FILE --ratios 1`.
    MergeModel,
    /// `svd-merge-lora --models FILE --ratios 1 --new_rank 2`.
    SvdMerge,
}

const ALL_MODES: [Mode; 4] = [
    Mode::Check,
    Mode::MergeLoras,
    Mode::MergeModel,
    Mode::SvdMerge,
];

/// (file, mode, exit code, text expected in stderr (exit 1) or stdout (exit 0)).
/// Exit 0 rows are valid-but-unusual inputs; their output must exist and load.
type LoraCase = (&'static str, Mode, i32, &'static str);

const LORA_CASES: &[LoraCase] = &[
    // SDXL module names: merging into an SD1 model or with an SD1 LoRA is refused.
    (
        "lora-other-family-sdxl.safetensors",
        Mode::Check,
        0,
        "lora_unet_input_blocks_4_1",
    ),
    (
        "lora-other-family-sdxl.safetensors",
        Mode::MergeLoras,
        1,
        "different model families",
    ),
    (
        "lora-other-family-sdxl.safetensors",
        Mode::MergeModel,
        1,
        "is a LoRA for SDXL but",
    ),
    // A single input of one family is a valid svd-merge (re-approximation at a new rank);
    // mixing families is refused (SVD_PAIR_CASES).
    ("lora-other-family-sdxl.safetensors", Mode::SvdMerge, 0, ""),
    // One file with SD1/SD2 and SDXL module names: no model takes both.
    (
        "lora-mixed-family-names.safetensors",
        Mode::Check,
        1,
        "module names mix model families: lora_te_text_model_encoder_layers_0_self_attn_k_proj is an SD1.x/SD2.x name, lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q an SDXL name",
    ),
    (
        "lora-mixed-family-names.safetensors",
        Mode::MergeLoras,
        1,
        "module names mix model families",
    ),
    (
        "lora-mixed-family-names.safetensors",
        Mode::MergeModel,
        1,
        "is a LoRA for SDXL but",
    ),
    (
        "lora-mixed-family-names.safetensors",
        Mode::SvdMerge,
        1,
        "module names mix model families",
    ),
    // LyCORIS algorithms: reported by the inspector (exit 1 after the report), refused by the
    // mergers.
    (
        "lora-unknown-algorithm-loha.safetensors",
        Mode::Check,
        1,
        "unsupported algorithm keys",
    ),
    (
        "lora-unknown-algorithm-loha.safetensors",
        Mode::MergeLoras,
        1,
        "hada_w1_a",
    ),
    (
        "lora-unknown-algorithm-loha.safetensors",
        Mode::MergeModel,
        1,
        "hada_w1_a",
    ),
    (
        "lora-unknown-algorithm-loha.safetensors",
        Mode::SvdMerge,
        1,
        "hada_w1_a",
    ),
    (
        "lora-unknown-algorithm-lokr.safetensors",
        Mode::Check,
        1,
        "1 of 1 module(s) cannot be used as LoRA modules",
    ),
    (
        "lora-unknown-algorithm-lokr.safetensors",
        Mode::MergeLoras,
        1,
        "(LoKr)",
    ),
    (
        "lora-unknown-algorithm-lokr.safetensors",
        Mode::MergeModel,
        1,
        "(LoKr)",
    ),
    (
        "lora-unknown-algorithm-lokr.safetensors",
        Mode::SvdMerge,
        1,
        "(LoKr)",
    ),
    // Ranks 2 and 4 without alpha tensors: valid (alpha = rank).
    (
        "lora-mixed-rank-no-alpha.safetensors",
        Mode::Check,
        0,
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj\t2",
    ),
    (
        "lora-mixed-rank-no-alpha.safetensors",
        Mode::MergeLoras,
        1,
        "use --concat",
    ),
    (
        "lora-mixed-rank-no-alpha.safetensors",
        Mode::MergeModel,
        0,
        "",
    ),
    (
        "lora-mixed-rank-no-alpha.safetensors",
        Mode::SvdMerge,
        0,
        "",
    ),
    // NaN/Inf in lora_up: nothing is written.
    (
        "lora-nan-weights.safetensors",
        Mode::Check,
        1,
        "hold NaN or Inf values",
    ),
    (
        "lora-nan-weights.safetensors",
        Mode::MergeLoras,
        1,
        "NaN or Inf",
    ),
    (
        "lora-nan-weights.safetensors",
        Mode::MergeModel,
        1,
        "NaN or Inf",
    ),
    (
        "lora-nan-weights.safetensors",
        Mode::SvdMerge,
        1,
        "NaN or Inf",
    ),
    (
        "lora-rank-mismatch.safetensors",
        Mode::Check,
        1,
        "rank mismatch: down [4, 32] has 4 rows, up [32, 2] has 2 columns",
    ),
    (
        "lora-rank-mismatch.safetensors",
        Mode::MergeLoras,
        1,
        "shape mismatch for key",
    ),
    (
        "lora-rank-mismatch.safetensors",
        Mode::MergeModel,
        1,
        "shape mismatch for key",
    ),
    (
        "lora-rank-mismatch.safetensors",
        Mode::SvdMerge,
        1,
        "shape mismatch for key",
    ),
    (
        "lora-down-without-up.safetensors",
        Mode::Check,
        1,
        "missing up weight",
    ),
    (
        "lora-down-without-up.safetensors",
        Mode::MergeLoras,
        1,
        "has no up weight",
    ),
    (
        "lora-down-without-up.safetensors",
        Mode::MergeModel,
        1,
        "has no up weight",
    ),
    (
        "lora-down-without-up.safetensors",
        Mode::SvdMerge,
        1,
        "has no up weight",
    ),
    (
        "lora-alpha-not-scalar.safetensors",
        Mode::Check,
        1,
        "alpha has 2 values, expected 1",
    ),
    (
        "lora-alpha-not-scalar.safetensors",
        Mode::MergeLoras,
        1,
        "expected a scalar",
    ),
    (
        "lora-alpha-not-scalar.safetensors",
        Mode::MergeModel,
        1,
        "expected a scalar",
    ),
    (
        "lora-alpha-not-scalar.safetensors",
        Mode::SvdMerge,
        1,
        "expected a scalar",
    ),
    (
        "lora-no-tensors.safetensors",
        Mode::Check,
        1,
        "no LoRA module found",
    ),
    (
        "lora-no-tensors.safetensors",
        Mode::MergeLoras,
        1,
        "no LoRA module found",
    ),
    (
        "lora-no-tensors.safetensors",
        Mode::MergeModel,
        1,
        "none of its 0 modules",
    ),
    (
        "lora-no-tensors.safetensors",
        Mode::SvdMerge,
        1,
        "no LoRA module found",
    ),
    // Tiny-model names with full-size shapes.
    (
        "lora-wrong-shape-for-model.safetensors",
        Mode::Check,
        0,
        "[1, 320]",
    ),
    (
        "lora-wrong-shape-for-model.safetensors",
        Mode::MergeLoras,
        1,
        "LoRAs for different models?",
    ),
    (
        "lora-wrong-shape-for-model.safetensors",
        Mode::MergeModel,
        1,
        "found [320, 1]",
    ),
    (
        "lora-wrong-shape-for-model.safetensors",
        Mode::SvdMerge,
        0,
        "",
    ),
    (
        "lora-integer-dtype.safetensors",
        Mode::Check,
        1,
        "down weight has dtype I64, expected F16, BF16, F32 or F64",
    ),
    (
        "lora-integer-dtype.safetensors",
        Mode::MergeLoras,
        1,
        "unsupported dtype I64",
    ),
    (
        "lora-integer-dtype.safetensors",
        Mode::MergeModel,
        1,
        "unsupported dtype I64",
    ),
    (
        "lora-integer-dtype.safetensors",
        Mode::SvdMerge,
        1,
        "unsupported dtype I64",
    ),
];

/// `svd-merge-lora --models lora-sd15 FILE --ratios 1 1`: (file, expected stderr text). Every
/// row exits 1 naming FILE, and nothing is written.
const SVD_PAIR_CASES: &[(&str, &str)] = &[
    (
        "lora-other-family-sdxl.safetensors",
        "is for SD1.x/SD2.x (module lora_te_text_model_encoder_layers_0_mlp_fc1), ",
    ),
    (
        "lora-other-family-sdxl.safetensors",
        "lora-other-family-sdxl.safetensors is for SDXL (module lora_te1_text_model_encoder_layers_0_self_attn_k_proj)",
    ),
    (
        "lora-mixed-family-names.safetensors",
        "module names mix model families",
    ),
    ("lora-no-tensors.safetensors", "no LoRA module found"),
];

/// Dataset configs given to `train-network --dataset_config` (all fail before the model loads).
const DATASET_CASES: &[(&str, &str)] = &[
    (
        "dataset-wrong-type.toml",
        "key \"resolution\" in [[datasets]] #1: expected an integer",
    ),
    (
        "dataset-batch-size-string.toml",
        "key \"batch_size\" in [[datasets]] #1: expected an integer, found string",
    ),
    (
        "dataset-unknown-key.toml",
        "unknown key \"colour_jitter\" in [general]",
    ),
    (
        "dataset-unknown-top-level.toml",
        "unknown key \"model\" in the top level",
    ),
    ("dataset-syntax-error.toml", "invalid TOML"),
    ("dataset-negative-repeats.toml", "num_repeats -1 < 1"),
    (
        "dataset-missing-image-dir.toml",
        "no-such-folder-here: cannot list image folder",
    ),
    (
        "dataset-subsets-not-array.toml",
        "expected an array of tables",
    ),
    ("dataset-utf16.toml", "valid UTF-8"),
];

/// Image folders (`<name>/1_tok/`): train-network refuses the dataset (naming the image or
/// caption file), resize-images (when `resize` is set) exits 1 naming the image.
const FOLDER_CASES: &[(&str, &str, bool)] = &[
    (
        "captions-latin1",
        "img.txt: caption file is not valid UTF-8",
        false,
    ),
    (
        "captions-utf16",
        "img.txt: caption file is not valid UTF-8 (invalid byte at offset 0)",
        false,
    ),
    (
        "captions-binary",
        "img.txt: caption file is not valid UTF-8",
        false,
    ),
    (
        "captions-empty-file",
        "img.txt: caption file is empty",
        false,
    ),
    (
        "images-truncated-png",
        "img.png: unexpected end of file",
        true,
    ),
    (
        "images-text-as-jpg",
        "img.jpg: Format error decoding Jpeg",
        true,
    ),
    (
        "images-zero-length-png",
        "img.png: unexpected end of file",
        true,
    ),
    (
        "images-corrupt-idat",
        "img.png: Format error decoding Png",
        true,
    ),
    (
        "images-huge-dimensions",
        "img.png: Memory limit exceeded",
        true,
    ),
];

/// gen-img prompt files: (file, exit code, expected stderr text, what the error names).
/// Broken per-line options are ignored with a warning, as sd-scripts does; the run still makes
/// its image. A size error names the prompt line, not the file (known gap, see the report).
const PROMPT_CASES: &[(&str, i32, &str, &str)] = &[
    (
        "prompts-not-utf8.txt",
        1,
        "valid UTF-8",
        "prompts-not-utf8.txt",
    ),
    (
        "prompts-only-comments.txt",
        1,
        "no prompt line found",
        "prompts-only-comments.txt",
    ),
    ("prompts-zero-size.txt", 1, "image size 0×0", "\"a cat\""),
    (
        "prompts-bad-number.txt",
        0,
        "prompt option \"--w abc\" not understood: ignored",
        "",
    ),
    (
        "prompts-unknown-option.txt",
        0,
        "prompt option \"--zz 3\" not understood: ignored",
        "",
    ),
];

/// Corpus entries exercised by generated-output-free checks elsewhere (documented only).
const NOT_RUN_HERE: &[&str] = &[
    // Cost ~8 s each in gen-img; covered by the prompt fuzz target and the two rows above.
    "prompts-missing-value.txt",
    "prompts-negative-steps.txt",
    "prompts-unbalanced-attention.txt",
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Files (recursively) under `dir`; empty when it does not exist.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let path = e.expect("dir entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// The generic promises: no panic; on failure an `error:` line that names `name` and no file
/// under `out`; on success something under `out` (when `expect_output`).
fn check_run(what: &str, name: &str, out: &Output, code: i32, expected: &str, out_dir: &Path) {
    let stderr = text(&out.stderr);
    let stdout = text(&out.stdout);
    assert!(
        !stderr.contains("panicked at") && !stdout.contains("panicked at"),
        "{what}: panicked:\n{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit code\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let left = files_under(out_dir);
    if code == 0 {
        assert!(
            stdout.contains(expected) || stderr.contains(expected),
            "{what}: output lacks {expected:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    } else {
        let line = stderr
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{what}: no `error:` line in stderr:\n{stderr}"));
        assert!(
            line.contains(name) || stderr.contains(name),
            "{what}: the error does not name {name}:\n{stderr}"
        );
        assert!(
            stderr.contains(expected),
            "{what}: stderr lacks {expected:?}:\n{stderr}"
        );
        assert!(left.is_empty(), "{what}: failed but left {left:?}");
    }
}

fn run_lora_tool(mode: Mode, file: &Path, out_dir: &Path) -> Output {
    let save = out_dir.join("out.safetensors");
    let lora = fixture("lora/lora-sd15.safetensors");
    let mut cmd = match mode {
        Mode::Check => {
            let mut c = Command::new(tool("check-lora-weights"));
            c.arg(file);
            c
        }
        Mode::MergeLoras => {
            let mut c = Command::new(tool("merge-lora"));
            c.arg("--models").arg(file).arg(&lora);
            c.args(["--ratios", "1", "1", "--save_to"]).arg(&save);
            c
        }
        Mode::MergeModel => {
            let mut c = Command::new(tool("merge-lora"));
            c.arg("--sd_model").arg(fixture("tiny-sd15.safetensors"));
            c.arg("--models").arg(file);
            c.args(["--ratios", "1", "--save_to"]).arg(&save);
            c
        }
        Mode::SvdMerge => {
            let mut c = Command::new(tool("svd-merge-lora"));
            c.arg("--models").arg(file);
            c.args(["--ratios", "1", "--new_rank", "2", "--save_to"])
                .arg(&save);
            c
        }
    };
    cmd.env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .output()
        .expect("running a LoRA tool")
}

/// Runs `jobs` on two threads (the tools are separate processes; the machine has 2 cores).
fn parallel<T: Sync>(jobs: &[T], f: impl Fn(&T) + Sync) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    f(job);
                }
            });
        }
    });
}

#[test]
fn issue_12_every_corpus_entry_has_an_expected_outcome() {
    let mut listed: Vec<&str> = NOT_A_LORA.to_vec();
    listed.extend(LORA_CASES.iter().map(|c| c.0));
    listed.extend(DATASET_CASES.iter().map(|c| c.0));
    listed.extend(FOLDER_CASES.iter().map(|c| c.0));
    listed.extend(PROMPT_CASES.iter().map(|c| c.0));
    listed.extend(NOT_RUN_HERE);
    listed.sort_unstable();
    listed.dedup();
    let mut found: Vec<String> = fs::read_dir(corpus())
        .expect("tests/bad-inputs exists (scripts/make-bad-inputs.py)")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    found.sort_unstable();
    assert_eq!(found, listed, "corpus entries vs the tables of this test");
    assert!(found.len() >= 40, "{} corpus entries", found.len());
}

#[test]
fn issue_12_lora_tools_refuse_bad_tensor_files_cleanly() {
    let mut jobs: Vec<(&str, Mode, i32, &str)> = Vec::new();
    for name in NOT_A_LORA {
        // The checkpoint merge reads the LoRA after the model; the reader errors are the same.
        for mode in [Mode::Check, Mode::MergeLoras, Mode::SvdMerge] {
            jobs.push((name, mode, 1, ""));
        }
    }
    jobs.extend(LORA_CASES.iter().copied());
    // Every LoRA case names all four modes.
    for name in LORA_CASES.iter().map(|c| c.0) {
        for mode in ALL_MODES {
            assert!(
                LORA_CASES.iter().any(|c| c.0 == name && c.1 == mode),
                "{name}: no row for {mode:?}"
            );
        }
    }
    parallel(&jobs, |&(name, mode, code, expected)| {
        let tmp = tempfile::tempdir().expect("temp dir");
        let out_dir = tmp.path().join("out");
        fs::create_dir(&out_dir).expect("mkdir");
        let file = corpus().join(name);
        let out = run_lora_tool(mode, &file, &out_dir);
        let what = format!("{mode:?} {name}");
        check_run(&what, name, &out, code, expected, &out_dir);
        if code == 0 && mode != Mode::Check {
            let save = out_dir.join("out.safetensors");
            SafetensorsFile::open(&save)
                .unwrap_or_else(|e| panic!("{what}: output does not load: {e}"));
            assert_eq!(files_under(&out_dir), vec![save], "{what}: stray files");
        }
    });
}

/// `train-network` on a dataset that cannot be used: exit 1 before any output.
fn train_on(dataset_args: &[&std::ffi::OsStr], cwd: &Path, out_dir: &Path) -> Output {
    Command::new(tool("train-network"))
        .arg("--pretrained_model_name_or_path")
        .arg(fixture("tiny-sd15"))
        .args(dataset_args)
        .arg("--output_dir")
        .arg(out_dir)
        .args([
            "--network_module",
            "networks.lora",
            "--max_train_steps",
            "1",
            "--no_progress",
        ])
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("running train-network")
}

#[test]
fn issue_12_train_network_refuses_bad_datasets_cleanly() {
    let mut jobs: Vec<(&str, Vec<std::ffi::OsString>, &str)> = Vec::new();
    for (name, expected) in DATASET_CASES {
        let path = corpus().join(name);
        jobs.push((name, vec!["--dataset_config".into(), path.into()], expected));
    }
    for (name, expected, _) in FOLDER_CASES {
        let path = corpus().join(name);
        jobs.push((
            name,
            vec![
                "--train_data_dir".into(),
                path.into(),
                "--resolution".into(),
                "64".into(),
                "--caption_extension".into(),
                ".txt".into(),
            ],
            expected,
        ));
    }
    parallel(&jobs, |(name, args, expected)| {
        let tmp = tempfile::tempdir().expect("temp dir");
        let out_dir = tmp.path().join("out");
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let out = train_on(&args, tmp.path(), &out_dir);
        let stderr = text(&out.stderr);
        // Relative image_dir resolves against the working folder; the missing folder is named
        // instead of the TOML, and the negative-repeats warning names the subset.
        let named = if name.contains("missing-image-dir") {
            "no-such-folder-here"
        } else if name.contains("negative-repeats") {
            "[[datasets.subsets]] #1.1"
        } else {
            name
        };
        check_run(
            &format!("train-network {name}"),
            named,
            &out,
            1,
            expected,
            &out_dir,
        );
        assert!(
            !stderr.contains("loading"),
            "{name}: model loaded: {stderr}"
        );
    });
}

#[test]
fn issue_12_resize_images_reports_undecodable_images() {
    for (name, expected, resize) in FOLDER_CASES {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dst = tmp.path().join("dst");
        let src = corpus().join(name).join("1_tok");
        let out = Command::new(tool("resize-images"))
            .args(["--max_resolution", "4x4", "--no_progress"])
            .arg(&src)
            .arg(&dst)
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .output()
            .expect("running resize-images");
        let stderr = text(&out.stderr);
        assert!(!stderr.contains("panicked at"), "{name}: {stderr}");
        let produced: Vec<String> = files_under(&dst)
            .iter()
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        if *resize {
            // The other files are still copied; no resized image is written for the bad one.
            assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
            assert!(stderr.contains(expected), "{name}: {stderr}");
            assert!(stderr.contains("cannot decode image"), "{name}: {stderr}");
            assert!(
                !produced.iter().any(|n| n.contains('+')),
                "{name}: resized output from an undecodable image: {produced:?}"
            );
        } else {
            // Caption encodings do not concern resize-images: the caption is copied as is.
            assert_eq!(out.status.code(), Some(0), "{name}: {stderr}");
            assert!(
                produced.contains(&"img+4x4.jpg".to_owned()),
                "{name}: {produced:?}"
            );
            assert_eq!(
                fs::read(dst.join("img.txt")).expect("copied caption"),
                fs::read(src.join("img.txt")).expect("caption"),
                "{name}: caption bytes changed"
            );
        }
    }
}

#[test]
fn issue_12_gen_img_prompt_files() {
    parallel(PROMPT_CASES, |&(name, code, expected, named)| {
        let tmp = tempfile::tempdir().expect("temp dir");
        let out_dir = tmp.path().join("out");
        let out = Command::new(tool("gen-img"))
            .arg("--ckpt")
            .arg(fixture("tiny-sd15"))
            .arg("--from_file")
            .arg(corpus().join(name))
            .args(["--steps", "1", "--W", "64", "--H", "64", "--device", "cpu"])
            .args(["--seed", "1", "--outdir"])
            .arg(&out_dir)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .output()
            .expect("running gen-img");
        check_run(
            &format!("gen-img {name}"),
            named,
            &out,
            code,
            expected,
            &out_dir,
        );
        if code == 0 {
            let images = files_under(&out_dir);
            assert_eq!(images.len(), 1, "{name}: {images:?}");
        }
    });
}

#[test]
fn issue_12_tools_being_written_refuse_bad_files_when_built() {
    // extract-lora-from-models / extract-lora-from-dylora are added by other issues; run the
    // reader part of the corpus through them only when their binaries exist.
    crate::tools::tools_dir();
    for name in ["extract-lora-from-dylora", "extract-lora-from-models"] {
        let Some(bin) = optional_tool(name) else {
            continue;
        };
        for file in NOT_A_LORA {
            let tmp = tempfile::tempdir().expect("temp dir");
            let out_dir = tmp.path().join("out");
            fs::create_dir(&out_dir).expect("mkdir");
            let mut cmd = Command::new(&bin);
            if name == "extract-lora-from-dylora" {
                cmd.arg("--model").arg(corpus().join(file));
            } else {
                cmd.arg("--model_org").arg(fixture("tiny-sd15.safetensors"));
                cmd.arg("--model_tuned").arg(corpus().join(file));
            }
            let out = cmd
                .arg("--save_to")
                .arg(out_dir.join("out.safetensors"))
                .env_remove("RUST_LOG")
                .output()
                .expect("running tool");
            check_run(&format!("{name} {file}"), file, &out, 1, "", &out_dir);
        }
    }
}

#[test]
fn issue_12_svd_merge_lora_refuses_mixing_families() {
    parallel(SVD_PAIR_CASES, |&(name, expected)| {
        let tmp = tempfile::tempdir().expect("temp dir");
        let out_dir = tmp.path().join("out");
        fs::create_dir(&out_dir).expect("mkdir");
        let out = Command::new(tool("svd-merge-lora"))
            .arg("--models")
            .arg(fixture("lora/lora-sd15.safetensors"))
            .arg(corpus().join(name))
            .args(["--ratios", "1", "1", "--new_rank", "2", "--save_to"])
            .arg(out_dir.join("out.safetensors"))
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .output()
            .expect("running svd-merge-lora");
        check_run(
            &format!("svd-merge-lora lora-sd15 + {name}"),
            name,
            &out,
            1,
            expected,
            &out_dir,
        );
    });
}
