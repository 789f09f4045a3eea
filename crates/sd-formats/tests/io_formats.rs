//! Public-API tests of tensor file I/O: fixtures in both formats, the writer, the header cap,
//! checkpoints with Lightning objects and strided views.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::PathBuf;

use half::{bf16, f16};
use sd_formats::ckpt::CkptFile;
use sd_formats::dtype::Dtype;
use sd_formats::error::Error;
use sd_formats::safetensors::{
    HEADER_LIMIT, SafetensorsFile, TensorInfo, TensorToWrite, write_safetensors,
    write_safetensors_with_limit,
};
use sd_formats::tensor_file::{Format, TensorFile};
use sd_testutil::fixture;

fn bad_input(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/bad-inputs")
        .join(name);
    assert!(
        p.exists(),
        "missing corpus file {} (run scripts/make-bad-inputs.py)",
        p.display()
    );
    p
}

#[test]
fn tiny_sd15_ckpt_and_safetensors_hold_the_same_tensors_bitwise() {
    let st = TensorFile::open(fixture("tiny-sd15.safetensors")).expect("open safetensors");
    let ck = TensorFile::open(fixture("tiny-sd15.ckpt")).expect("open ckpt");
    assert_eq!(st.format(), Format::Safetensors);
    assert_eq!(ck.format(), Format::Checkpoint);
    assert_eq!(st.len(), 1118);
    assert_eq!(ck.len(), 1118);
    assert_eq!(st.sorted_names(), ck.sorted_names());
    for name in st.names() {
        assert_eq!(st.info(name), ck.info(name), "info of {name}");
        assert_eq!(
            st.data(name).expect("st data"),
            ck.data(name).expect("ck data"),
            "data of {name}"
        );
    }
    // The checkpoint's first key in pickle order, with its shape and dtype (see its data.pkl).
    let first = &ck.names()[0];
    assert_eq!(first, "model.diffusion_model.input_blocks.0.0.weight");
    assert_eq!(
        ck.info(first),
        Some(&TensorInfo {
            dtype: Dtype::F16,
            shape: vec![32, 4, 3, 3]
        })
    );
    assert!(ck.metadata().is_empty());
    assert!(
        ck.ignored_globals().is_empty(),
        "{:?}",
        ck.ignored_globals()
    );
    let meta = st.metadata();
    assert_eq!(meta.get("fixture").map(String::as_str), Some("tiny-sd15"));
    assert_eq!(meta.len(), 2);
    // Values convert: fp16 -> f32 is exact, so both readers agree elementwise too.
    let a = st
        .to_f32_vec("model.diffusion_model.out.2.bias")
        .expect("f32");
    let b = ck
        .to_f32_vec("model.diffusion_model.out.2.bias")
        .expect("f32");
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
    assert!(
        !st.has_non_finite("model.diffusion_model.out.2.bias")
            .expect("finite check")
    );
}

#[test]
fn lora_fixture_metadata_and_tensors() {
    let f = SafetensorsFile::open(fixture("lora/lora-sd15.safetensors")).expect("open lora");
    let m = f.metadata();
    assert_eq!(m.len(), 15);
    assert_eq!(m["ss_network_module"], "networks.lora");
    assert_eq!(m["ss_network_dim"], "4");
    assert_eq!(m["ss_network_alpha"], "1.0");
    assert_eq!(m["ss_v2"], "False");
    assert_eq!(m["modelspec.architecture"], "stable-diffusion-v1/lora");
    assert_eq!(
        m["sshs_model_hash"],
        "6ba643ba07d6f9ae7c7e0daccc95c4ce0f9d2b76de2019f4c5f0e2dd8eb582eb"
    );
    assert_eq!(f.len(), 792);
    let alpha = "lora_te_text_model_encoder_layers_0_mlp_fc1.alpha";
    assert_eq!(f.names()[0], alpha);
    assert_eq!(
        f.info(alpha),
        Some(&TensorInfo {
            dtype: Dtype::F16,
            shape: vec![]
        })
    );
    assert_eq!(f.to_f32_vec(alpha).expect("alpha"), vec![1.0]);
    let down = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight";
    assert_eq!(f.info(down).map(|i| i.shape.clone()), Some(vec![4, 32]));
    assert_eq!(f.data(down).expect("down").len(), 4 * 32 * 2);
    let err = f.data("nope").unwrap_err();
    assert!(
        err.to_string().starts_with("key \"nope\" not found in "),
        "{err}"
    );
}

/// Our writer reproduces the reference's files byte for byte (tensor order, header format,
/// padding; the fixtures' metadata keys are sorted, as ours are).
#[test]
fn rewriting_fixtures_is_byte_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    for rel in ["lora/lora-sd15.safetensors", "tiny-sd15.safetensors"] {
        let src = fixture(rel);
        let f = SafetensorsFile::open(&src).expect("open");
        let tensors: Vec<TensorToWrite<'_>> = f
            .names()
            .iter()
            .map(|n| {
                let i = f.info(n).expect("info");
                TensorToWrite::new(
                    n.clone(),
                    i.dtype,
                    i.shape.clone(),
                    f.data(n).expect("data"),
                )
            })
            .collect();
        let out = dir.path().join("out.safetensors");
        write_safetensors(&out, &tensors, Some(f.metadata())).expect("write");
        let a = std::fs::read(&src).expect("read src");
        let b = std::fs::read(&out).expect("read out");
        assert!(
            a == b,
            "{rel}: rewritten file differs ({} vs {} bytes)",
            a.len(),
            b.len()
        );
    }
}

#[test]
fn write_read_round_trip_with_metadata_and_dtypes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub/dir/out.safetensors");
    let vals = [0.5f32, -1.25, 3.0e-3, 65504.0, f32::MIN_POSITIVE];
    let h: Vec<u8> = vals
        .iter()
        .flat_map(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    let b: Vec<u8> = vals
        .iter()
        .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
        .collect();
    let f: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
    let alpha: Vec<u8> = 4i64.to_le_bytes().to_vec();
    let tensors = vec![
        TensorToWrite::new("w.f16", Dtype::F16, vec![5], h.as_slice()),
        TensorToWrite::new(
            "w.bf16",
            Dtype::BF16,
            vec![1, 5],
            Cow::Borrowed(b.as_slice()),
        ),
        TensorToWrite::new("w.f32", Dtype::F32, vec![5, 1], f.clone()),
        TensorToWrite::new("alpha", Dtype::I64, vec![], alpha.as_slice()),
        TensorToWrite::new("empty", Dtype::F32, vec![0, 3], Vec::new()),
    ];
    let mut meta = BTreeMap::new();
    meta.insert("ss_network_dim".to_string(), "4".to_string());
    meta.insert("b_quote".to_string(), "say \"hi\"\n\tüñï/\\".to_string());
    meta.insert("a_empty".to_string(), String::new());
    write_safetensors(&path, &tensors, Some(&meta)).expect("write");

    let r = SafetensorsFile::open(&path).expect("reopen");
    assert_eq!(r.metadata(), &meta);
    // Data order: dtype descending in the safetensors crate's order, then name.
    assert_eq!(r.names(), ["alpha", "empty", "w.f32", "w.bf16", "w.f16"]);
    for t in &tensors {
        assert_eq!(
            r.info(&t.name),
            Some(&TensorInfo {
                dtype: t.dtype,
                shape: t.shape.clone()
            })
        );
        assert_eq!(
            r.data(&t.name).expect("data"),
            &t.data[..],
            "bytes of {}",
            t.name
        );
    }
    assert_eq!(
        r.to_f32_vec("w.f16").expect("f16"),
        vals.iter()
            .map(|&x| f16::from_f32(x).to_f32())
            .collect::<Vec<_>>()
    );
    assert_eq!(r.to_f32_vec("w.f32").expect("f32"), vals);
    assert_eq!(r.to_f32_vec("alpha").expect("alpha"), vec![4.0]);

    // Raw header: length field, sorted metadata first, padding to 8 with spaces.
    let raw = std::fs::read(&path).expect("read");
    let n = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes")) as usize;
    assert_eq!(n % 8, 0);
    let header = std::str::from_utf8(&raw[8..8 + n]).expect("utf8");
    assert!(header.starts_with(r#"{"__metadata__":{"a_empty":"","b_quote":"say \"hi\"\n\tüñï/\\","ss_network_dim":"4"},"alpha":{"dtype":"I64","shape":[],"data_offsets":[0,8]}"#), "{header}");
    // Only the written file is left in the directory (no temporary files).
    let entries: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
        .expect("ls")
        .collect();
    assert_eq!(entries.len(), 1);

    // Without metadata, no __metadata__ entry; overwriting replaces the file.
    write_safetensors(&path, &tensors[..1], None).expect("overwrite");
    let raw = std::fs::read(&path).expect("read");
    assert!(raw[8..].starts_with(br#"{"w.f16":"#));
    assert!(
        SafetensorsFile::open(&path)
            .expect("reopen")
            .metadata()
            .is_empty()
    );
}

#[test]
fn writer_refuses_bad_tensors_without_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("x.safetensors");
    let short = [TensorToWrite::new(
        "a",
        Dtype::F32,
        vec![2, 2],
        vec![0u8; 12],
    )];
    let err = write_safetensors(&path, &short, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                expected: 16,
                found: 12,
                ..
            }
        ),
        "{err}"
    );
    let dup = [
        TensorToWrite::new("a", Dtype::U8, vec![1], vec![0u8]),
        TensorToWrite::new("a", Dtype::U8, vec![1], vec![1u8]),
    ];
    let err = write_safetensors(&path, &dup, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("duplicate key \"a\" for {}", path.display())
    );
    let err = write_safetensors(dir.path(), &dup[..1], None).unwrap_err();
    assert!(matches!(err, Error::IsDirectory { .. }), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}

#[test]
fn header_cap_enforced_on_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.safetensors");
    let t = [TensorToWrite::new(
        "a",
        Dtype::F32,
        vec![1],
        1f32.to_le_bytes().to_vec(),
    )];
    let mut meta = BTreeMap::new();
    meta.insert("ss_tag_frequency".to_string(), "x".repeat(2000));
    let err = write_safetensors_with_limit(&path, &t, Some(&meta), 1024).unwrap_err();
    assert!(
        matches!(err, Error::HeaderTooLargeToWrite { limit: 1024, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("over the 1024-byte limit"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        0,
        "nothing may be written"
    );
    // Under the cap the same call succeeds.
    write_safetensors_with_limit(&path, &t, Some(&meta), 4096).expect("fits");

    // The real cap: a metadata value just over 100 MB.
    std::fs::remove_file(&path).expect("rm");
    meta.insert(
        "ss_tag_frequency".to_string(),
        "x".repeat(HEADER_LIMIT as usize),
    );
    let err = write_safetensors(&path, &t, Some(&meta)).unwrap_err();
    assert!(
        err.to_string().contains("over the 100000000-byte limit")
            && err.to_string().contains("ss_tag_frequency"),
        "{err}"
    );
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 0);
}

#[test]
fn header_cap_reported_on_read_as_over_the_limit() {
    let err = SafetensorsFile::open(bad_input("header-over-limit.safetensors")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("header of 120000000 bytes is over the 100000000-byte limit"),
        "{msg}"
    );
    assert!(msg.contains("not a corrupt file"), "{msg}");
    assert!(!msg.contains("truncated"), "{msg}");
}

#[test]
fn os_system_pickle_runs_nothing_and_is_refused() {
    let marker = std::path::Path::new("/tmp/sd-formats-bad-input-pwned");
    let _ = std::fs::remove_file(marker);
    for name in ["os-system.ckpt", "raw-pickle-os-system.pt"] {
        let path = bad_input(name);
        let err = TensorFile::open(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no tensors found in {}; it holds a call to posix.system",
                path.display()
            )
        );
        assert!(
            !marker.exists(),
            "{name}: opening ran the pickle's os.system call"
        );
    }
}

#[test]
fn lightning_checkpoint_with_callbacks_loads() {
    let f = CkptFile::open(bad_input("lightning-callbacks.ckpt")).expect("open");
    assert_eq!(
        f.names(),
        [
            "model.diffusion_model.out.2.weight",
            "model.diffusion_model.out.2.bias",
            "model.num_steps"
        ]
    );
    assert_eq!(
        f.info("model.diffusion_model.out.2.weight"),
        Some(&TensorInfo {
            dtype: Dtype::F16,
            shape: vec![2, 3]
        })
    );
    assert_eq!(
        f.to_f32_vec("model.diffusion_model.out.2.weight")
            .expect("w"),
        vec![1., 2., 3., 4., 5., 6.]
    );
    // A Parameter (`_rebuild_parameter`) reads as its tensor.
    assert_eq!(
        f.to_f32_vec("model.diffusion_model.out.2.bias").expect("b"),
        vec![0.5, -0.5]
    );
    assert_eq!(
        f.info("model.num_steps"),
        Some(&TensorInfo {
            dtype: Dtype::I64,
            shape: vec![]
        })
    );
    assert_eq!(f.data("model.num_steps").expect("step"), 7i64.to_le_bytes());
    assert_eq!(
        f.ignored_globals(),
        [
            "_codecs.encode",
            "pytorch_lightning.callbacks.ModelCheckpoint"
        ]
    );
}

#[test]
fn strided_views_are_materialised_contiguous() {
    let f = TensorFile::open(bad_input("strided-views.ckpt")).expect("open");
    let v = |n: &str| f.to_f32_vec(n).expect(n);
    let full: Vec<f32> = (0..12).map(|x| x as f32).collect();
    assert_eq!(v("full"), full);
    assert_eq!(
        f.info("transposed").map(|i| i.shape.clone()),
        Some(vec![4, 3])
    );
    assert_eq!(
        v("transposed"),
        [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
    );
    assert_eq!(v("row2"), [8., 9., 10., 11.]);
    assert_eq!(v("col1"), [1., 5., 9.]);
    assert_eq!(v("bf16"), [1., 2., 3., 4.]);
    assert_eq!(v("deflated"), [10., 20., 30., 40.]);
    assert_eq!(v("deflated_t"), [10., 30., 20., 40.]);
    assert_eq!(f.info("empty").map(|i| i.shape.clone()), Some(vec![0, 4]));
    assert!(f.data("empty").expect("empty").is_empty());
    // Cached: a second access returns the same bytes.
    assert_eq!(f.data("transposed").expect("again").len(), 48);
}

#[test]
fn nan_and_inf_tensors_are_readable_and_flagged() {
    let f = TensorFile::open(bad_input("nan-inf.safetensors")).expect("open");
    assert!(!f.has_non_finite("finite").expect("finite"));
    assert!(f.has_non_finite("inf_bf16").expect("inf"));
    assert!(f.has_non_finite("nan_f16").expect("nan16"));
    assert!(f.has_non_finite("nan_f32").expect("nan32"));
    assert_eq!(
        f.to_f32_vec("inf_bf16").expect("bf16"),
        [1.0, f32::NEG_INFINITY]
    );
    assert_eq!(f.metadata()["note"], "NaN/Inf tensors are readable");
}

#[test]
fn legacy_non_zip_checkpoint_reads() {
    let f = TensorFile::open(bad_input("legacy-tensors.pt")).expect("open");
    assert_eq!(f.format(), Format::Checkpoint);
    assert_eq!(f.names(), ["w", "b"]);
    assert_eq!(
        f.info("w"),
        Some(&TensorInfo {
            dtype: Dtype::F32,
            shape: vec![2, 2]
        })
    );
    assert_eq!(f.to_f32_vec("w").expect("w"), [1., 2., 3., 4.]);
    assert_eq!(f.to_f32_vec("b").expect("b"), [0.5, -1.]);
}
