//! Every file of the bad-input corpus (tests/bad-inputs/, made by scripts/make-bad-inputs.py)
//! gives its expected error, through every reader that accepts it, without panicking.

use std::path::PathBuf;

use sd_formats::ckpt::CkptFile;
use sd_formats::safetensors::SafetensorsFile;
use sd_formats::tensor_file::TensorFile;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/bad-inputs")
}

/// (file, expected error substrings; empty = the file must open).
const TABLE: &[(&str, &[&str])] = &[
    (
        "truncated.safetensors",
        &[
            "is truncated: expected at least",
            "the data of \"b\" at offsets 8..16",
        ],
    ),
    ("zero-length.safetensors", &["is empty (0 bytes)"]),
    ("zero-length.ckpt", &["is empty (0 bytes)"]),
    (
        "header-too-short.safetensors",
        &["is truncated: expected at least 8 bytes (the 8-byte header length), found 3"],
    ),
    (
        "header-longer-than-file.safetensors",
        &["is truncated: expected at least 1008 bytes (the header of 1000 bytes), found 64"],
    ),
    (
        "header-over-limit.safetensors",
        &[
            "header of 120000000 bytes is over the 100000000-byte limit",
            "not a corrupt file: the metadata is too large",
        ],
    ),
    (
        "overlapping-offsets.safetensors",
        &["bad data offsets for key \"b\": bytes 4..12 overlap \"a\" at 0..8"],
    ),
    (
        "offsets-past-end.safetensors",
        &["is truncated", "the data of \"b\" at offsets 12..20"],
    ),
    (
        "gap-in-data.safetensors",
        &[
            "bad data offsets for key \"b\"",
            "4 bytes of the data section belong to no tensor",
        ],
    ),
    (
        "unknown-dtype.safetensors",
        &["unsupported dtype \"F12\" for key \"a\""],
    ),
    (
        "float8-dtype.safetensors",
        &["unsupported dtype \"F8_E4M3\" for key \"a\""],
    ),
    (
        "shape-length-mismatch.safetensors",
        &[
            "byte length mismatch for key \"a\"",
            "expected 12 bytes (shape [3] of F32), found 8",
        ],
    ),
    (
        "invalid-json.safetensors",
        &["invalid safetensors header: expected a JSON object"],
    ),
    (
        "metadata-not-strings.safetensors",
        &["metadata value of \"ss_network_dim\" must be a string, found 4"],
    ),
    ("nan-inf.safetensors", &[]),
    (
        "plain-text.safetensors",
        &[
            "is not a tensor file",
            "found text starting with \"this is a text file",
        ],
    ),
    (
        "folder.safetensors",
        &[
            "is a directory, not a tensor file",
            "Diffusers model folder",
        ],
    ),
    (
        "truncated-zip.ckpt",
        &["invalid PyTorch checkpoint: not a readable zip archive"],
    ),
    (
        "zip-without-data-pkl.ckpt",
        &["invalid PyTorch checkpoint: no data.pkl entry in the zip (found 3 entries"],
    ),
    ("os-system.ckpt", &["; it holds a call to posix.system"]),
    (
        "unknown-module.ckpt",
        &["; it holds a call to evil_module.run"],
    ),
    (
        "missing-storage.ckpt",
        &["tensor \"w\" refers to storage entry archive/data/0, which is missing from the archive"],
    ),
    (
        "view-past-storage.ckpt",
        &[
            "tensor \"w\" (shape [2], stride [1], offset 1) needs 12 bytes of storage archive/data/0 but it holds 8 bytes",
        ],
    ),
    (
        "big-endian.ckpt",
        &["a big-endian checkpoint (byteorder \"big\") is not supported"],
    ),
    (
        "bad-opcode.ckpt",
        &["unreadable pickle at byte 5: unknown opcode 0xff (in archive/data.pkl)"],
    ),
    (
        "no-tensors.ckpt",
        &["; it holds a dict with keys \"epoch\", \"global_step\""],
    ),
    (
        "raw-pickle-os-system.pt",
        &["; it holds a call to posix.system"],
    ),
    ("legacy-tensors.pt", &[]),
    (
        "legacy-truncated.pt",
        &["is truncated: expected at least", "(the data of storage 1)"],
    ),
    ("lightning-callbacks.ckpt", &[]),
    ("strided-views.ckpt", &[]),
];

fn check<T, E: std::fmt::Display>(reader: &str, name: &str, expected: &[&str], r: Result<T, E>) {
    match (r, expected.is_empty()) {
        (Ok(_), true) => {}
        (Ok(_), false) => {
            panic!("{reader}: {name} opened, expected an error containing {expected:?}")
        }
        (Err(e), true) => panic!("{reader}: {name} should open, got: {e}"),
        (Err(e), false) => {
            let msg = e.to_string();
            for s in expected {
                assert!(
                    msg.contains(s),
                    "{reader}: {name}: message {msg:?} lacks {s:?}"
                );
            }
            assert!(
                msg.contains(name),
                "{reader}: {name}: message {msg:?} does not name the file"
            );
            assert!(
                !msg.ends_with('.'),
                "{reader}: {name}: message ends with a period: {msg:?}"
            );
        }
    }
}

#[test]
fn every_corpus_file_gives_its_expected_error() {
    for (name, expected) in TABLE {
        let path = corpus().join(name);
        assert!(
            path.exists(),
            "missing corpus file {} (run scripts/make-bad-inputs.py)",
            path.display()
        );
        check("TensorFile", name, expected, TensorFile::open(&path));
        if name.ends_with(".safetensors") && !name.starts_with("plain-text") {
            check(
                "SafetensorsFile",
                name,
                expected,
                SafetensorsFile::open(&path),
            );
        }
        // Other formats given to the safetensors reader are named, not misread as a header.
        let other: Option<&[&str]> = if name.starts_with("plain-text") {
            Some(&["invalid safetensors header: the file is text starting with \"this is"])
        } else if name.ends_with(".ckpt") && !name.starts_with("zero-length") {
            Some(&["the file is a zip archive (a PyTorch checkpoint?), not safetensors"])
        } else if name.starts_with("raw-pickle") || name.starts_with("legacy") {
            Some(&["the file is a pickle (a PyTorch checkpoint?), not safetensors"])
        } else {
            None
        };
        if let Some(e) = other {
            check("SafetensorsFile", name, e, SafetensorsFile::open(&path));
        }
        if name.ends_with(".ckpt") || name.ends_with(".pt") {
            check("CkptFile", name, expected, CkptFile::open(&path));
        }
    }
}

/// Entries of the cross-tool corpus (tests/it/bad_inputs.rs checks them against every tool):
/// LoRA-level, dataset, caption, image and prompt files, not reader cases.
const CROSS_TOOL_PREFIXES: &[&str] = &["lora-", "dataset-", "captions-", "images-", "prompts-"];

#[test]
fn table_covers_the_whole_corpus() {
    let mut files: Vec<String> = std::fs::read_dir(corpus())
        .expect("corpus folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !CROSS_TOOL_PREFIXES.iter().any(|p| n.starts_with(p)))
        .collect();
    files.sort();
    let mut listed: Vec<String> = TABLE.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(files, listed);
    assert!(files.len() >= 15);
}

#[test]
fn every_prefix_of_valid_files_fails_cleanly() {
    // Truncating valid files at every length must give errors, never panics.
    let dir = tempfile::tempdir().expect("tempdir");
    for name in [
        "nan-inf.safetensors",
        "lightning-callbacks.ckpt",
        "strided-views.ckpt",
        "legacy-tensors.pt",
    ] {
        let bytes = std::fs::read(corpus().join(name)).expect("read");
        let path = dir.path().join(name);
        for len in 0..bytes.len() {
            std::fs::write(&path, &bytes[..len]).expect("write");
            if let Ok(f) = TensorFile::open(&path) {
                // A prefix may still be a valid file only if the tail was unused by tensors.
                for n in f.names() {
                    f.data(n).expect("validated tensors are readable");
                }
            }
        }
    }
}

#[test]
fn corrupted_bytes_of_valid_files_never_panic() {
    // Every byte of each small valid file replaced by two different values: each variant
    // must open or fail with an error, and every tensor of an opened variant must be readable.
    let dir = tempfile::tempdir().expect("tempdir");
    for name in [
        "nan-inf.safetensors",
        "lightning-callbacks.ckpt",
        "strided-views.ckpt",
        "legacy-tensors.pt",
    ] {
        let bytes = std::fs::read(corpus().join(name)).expect("read");
        let path = dir.path().join(name);
        for i in 0..bytes.len() {
            for v in [0xffu8, bytes[i] ^ 0x01] {
                let mut b = bytes.clone();
                b[i] = v;
                std::fs::write(&path, &b).expect("write");
                if let Ok(f) = TensorFile::open(&path) {
                    for n in f.names() {
                        let _ = f.data(n);
                        let _ = f.to_f32_vec(n);
                    }
                }
            }
        }
    }
}
