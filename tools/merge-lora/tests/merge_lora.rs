//! `merge-lora` against the sd-scripts goldens (tests/fixtures/README.md §5f).

use std::path::{Path, PathBuf};
use std::process::Command;

use sd_formats::dtype::Dtype;
use sd_formats::tensor_file::TensorFile;
use sd_testutil::{assert_close, fixture};
use tch::{Kind, Tensor};

fn tool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_merge-lora"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("merge-lora runs")
}

fn ok(args: &[&str]) -> String {
    let out = tool(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "merge-lora {args:?} failed:\n{stderr}"
    );
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

fn tensor(f: &TensorFile, key: &str) -> Tensor {
    let info = f
        .info(key)
        .unwrap_or_else(|| panic!("{key} missing in {}", f.path().display()));
    let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
    sd_core::tensor::from_bytes(key, info.dtype, &info.shape, f.data(key).expect("data"))
        .expect("tensor")
        .reshape(shape)
        .to_kind(Kind::Float)
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).flatten(0, -1);
    Vec::<f32>::try_from(&t).expect("f32 vector")
}

#[test]
fn merge_into_sd15_at_0_8_equals_reference() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("tiny-sd15-merged.safetensors");
    let base = fixture("tiny-sd15.safetensors");
    let lora = fixture("lora/lora-sd15-conv.safetensors");
    let log = ok(&[
        "--sd_model",
        s(&base),
        "--models",
        s(&lora),
        "--ratios",
        "0.8",
        "--save_to",
        s(&out),
        "--precision",
        "float",
        "--save_precision",
        "float",
    ]);
    assert!(log.contains("applied unet 276, text_encoder 72"), "{log}");
    let got = TensorFile::open(&out).expect("output");
    let basef = TensorFile::open(&base).expect("base");
    assert_eq!(got.len(), 1118);
    assert_eq!(
        got.metadata()
            .get("modelspec.merged_from")
            .map(String::as_str),
        Some("tiny-sd15, lora-sd15-conv")
    );
    assert_eq!(
        got.metadata()
            .get("modelspec.architecture")
            .map(String::as_str),
        Some("stable-diffusion-v1")
    );

    let sample = TensorFile::open(fixture(
        "goldens/lora-tools/merge-sd15-lora-0.8.sample.safetensors",
    ))
    .expect("golden");
    for key in sample.names() {
        assert_close(
            key,
            &vec_of(&tensor(&got, key)),
            &vec_of(&tensor(&sample, key)),
            1e-6,
            1e-6,
        );
    }
    let changed: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(
            "goldens/lora-tools/merge-sd15-lora-0.8.changed.json",
        ))
        .expect("json"),
    )
    .expect("json");
    let mut changed_keys = std::collections::BTreeSet::new();
    for c in changed["changed"].as_array().expect("list") {
        let key = c["key"].as_str().expect("key");
        changed_keys.insert(key.to_string());
        let t = tensor(&got, key).to_kind(Kind::Double);
        let stats = [
            ("sum", t.sum(Kind::Double).double_value(&[])),
            ("abs_sum", t.abs().sum(Kind::Double).double_value(&[])),
            ("sq_sum", t.square().sum(Kind::Double).double_value(&[])),
            ("max_abs", t.abs().max().double_value(&[])),
        ];
        for (name, v) in stats {
            let want = c[name].as_f64().expect("number");
            let tol = 1e-5 * want.abs().max(c["abs_sum"].as_f64().unwrap_or(1.0) * 1e-3);
            assert!(
                (v - want).abs() <= tol.max(1e-6),
                "{key} {name}: {v} vs {want}"
            );
        }
    }
    assert_eq!(changed_keys.len(), 348);
    // Every other key: the base value (fp16 → fp32, exact); every key fp32.
    for key in got.names() {
        assert_eq!(got.info(key).expect("info").dtype, Dtype::F32, "{key}");
        if !changed_keys.contains(key) {
            assert_eq!(
                vec_of(&tensor(&got, key)),
                vec_of(&tensor(&basef, key)),
                "{key} changed"
            );
        }
    }
}

#[test]
fn untouched_keys_are_copied_byte_for_byte_and_dtype_kept() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m.safetensors");
    let base = fixture("tiny-sd15.safetensors");
    let log = ok(&[
        "--sd_model",
        s(&base),
        "--models",
        s(&fixture("lora/lora-sd15.safetensors")),
        "--ratios",
        "1",
        "--save_to",
        s(&out),
    ]);
    assert!(log.contains("applied unet 192, text_encoder 72"), "{log}");
    let got = TensorFile::open(&out).expect("output");
    let basef = TensorFile::open(&base).expect("base");
    assert_eq!(got.names().len(), basef.names().len());
    let mut same = 0;
    for key in basef.names() {
        assert_eq!(
            got.info(key).expect("key kept").dtype,
            basef.info(key).expect("info").dtype
        );
        if got.data(key).expect("data") == basef.data(key).expect("data") {
            same += 1;
        }
    }
    // 264 modules touch 264 keys; everything else is identical.
    assert_eq!(same, 1118 - 264);
    // The checkpoint's own metadata is kept.
    assert_eq!(
        got.metadata().get("fixture"),
        basef.metadata().get("fixture")
    );
}

fn lora_delta(f: &TensorFile, module: &str) -> Tensor {
    let down = tensor(f, &format!("{module}.lora_down.weight"));
    let up = tensor(f, &format!("{module}.lora_up.weight"));
    let r = down.size()[0];
    let alpha = if f.info(&format!("{module}.alpha")).is_some() {
        tensor(f, &format!("{module}.alpha")).double_value(&[])
    } else {
        r as f64
    };
    up.reshape([up.size()[0], -1]).mm(&down.reshape([r, -1])) * (alpha / r as f64)
}

fn modules(f: &TensorFile) -> Vec<String> {
    f.names()
        .iter()
        .filter_map(|n| n.strip_suffix(".lora_down.weight").map(str::to_owned))
        .collect()
}

fn lora_pair(extra: &[&str], name: &str) -> (PathBuf, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join(name);
    let a = fixture("lora/lora-sd15.safetensors");
    let b = fixture("lora/lora-sd15-b.safetensors");
    let mut args = vec![
        "--models",
        s(&a),
        s(&b),
        "--ratios",
        "1.0",
        "-0.5",
        "--save_to",
        s(&out),
    ];
    args.extend_from_slice(extra);
    let log = ok(&args);
    (out, dir, log)
}

fn compare_files(got: &Path, golden: &str) {
    let got = TensorFile::open(got).expect("output");
    let want = TensorFile::open(fixture(golden)).expect("golden");
    let mut a: Vec<&String> = got.names().iter().collect();
    let mut b: Vec<&String> = want.names().iter().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "key sets differ");
    for key in want.names() {
        assert_eq!(
            got.info(key).map(|i| i.dtype),
            want.info(key).map(|i| i.dtype),
            "{key} dtype"
        );
        // 1 fp16 ulp.
        assert_close(
            key,
            &vec_of(&tensor(&got, key)),
            &vec_of(&tensor(&want, key)),
            1e-4,
            1e-3,
        );
    }
    for k in [
        "ss_network_dim",
        "ss_network_alpha",
        "ss_network_module",
        "ss_v2",
        "ss_base_model_version",
        "modelspec.merged_from",
        "modelspec.architecture",
    ] {
        assert_eq!(
            got.metadata().get(k),
            want.metadata().get(k),
            "metadata {k}"
        );
    }
}

#[test]
fn lora_plus_lora_reference_compatible_equals_reference() {
    tch::set_num_threads(1);
    let (out, _d, _) = lora_pair(
        &["--save_precision", "fp16", "--reference_compatible"],
        "merge-lora-lora.safetensors",
    );
    compare_files(&out, "goldens/lora-tools/merge-lora-lora.safetensors");
    let (out, _d, _) = lora_pair(
        &[
            "--save_precision",
            "fp16",
            "--reference_compatible",
            "--concat",
        ],
        "merge-lora-lora-concat.safetensors",
    );
    let got = TensorFile::open(&out).expect("out");
    let want = TensorFile::open(fixture(
        "goldens/lora-tools/merge-lora-lora-concat.safetensors",
    ))
    .expect("golden");
    for key in want.names() {
        assert_close(
            key,
            &vec_of(&tensor(&got, key)),
            &vec_of(&tensor(&want, key)),
            1e-4,
            1e-3,
        );
    }
}

#[test]
fn lora_plus_lora_concat_is_the_exact_sum() {
    tch::set_num_threads(1);
    let (out, _d, _) = lora_pair(
        &["--concat", "--save_precision", "float"],
        "exact.safetensors",
    );
    let got = TensorFile::open(&out).expect("out");
    let a = TensorFile::open(fixture("lora/lora-sd15.safetensors")).expect("a");
    let b = TensorFile::open(fixture("lora/lora-sd15-b.safetensors")).expect("b");
    let names = modules(&got);
    assert_eq!(names, modules(&a));
    for m in &names {
        let want = lora_delta(&a, m) * 1.0 + lora_delta(&b, m) * -0.5;
        let dw = lora_delta(&got, m);
        assert_eq!(
            got.info(&format!("{m}.lora_down.weight"))
                .expect("down")
                .shape[0],
            8
        );
        assert_close(m, &vec_of(&dw), &vec_of(&want), 1e-5, 1e-4);
    }
    assert_eq!(
        got.metadata().get("ss_network_dim").map(String::as_str),
        Some("8")
    );
    // Default dtype: the inputs' (fp16).
    let (out, _d, log) = lora_pair(&["--concat"], "fp16.safetensors");
    assert!(log.contains("output dtype: F16"), "{log}");
    let got = TensorFile::open(&out).expect("out");
    assert!(
        got.names()
            .iter()
            .all(|n| got.info(n).expect("info").dtype == Dtype::F16)
    );
}

#[test]
fn lora_plus_lora_sum_single_input_zero_and_negative_ratios() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let a = fixture("lora/lora-sd15.safetensors");
    let b = fixture("lora/lora-sd15-b.safetensors");
    let out = dir.path().join("neg.safetensors");
    // A ratio of 0 removes b; a negative ratio subtracts a: ΔW = −0.7·ΔW_a exactly.
    ok(&[
        "--models",
        s(&a),
        s(&b),
        "--ratios",
        "-0.7",
        "0",
        "--save_to",
        s(&out),
        "--save_precision",
        "float",
    ]);
    let got = TensorFile::open(&out).expect("out");
    let af = TensorFile::open(&a).expect("a");
    for m in modules(&af) {
        assert_close(
            &m,
            &vec_of(&lora_delta(&got, &m)),
            &vec_of(&(lora_delta(&af, &m) * -0.7)),
            1e-5,
            1e-4,
        );
    }
    // Two inputs without --concat: the factor sums (reference approximation), error reported.
    let out2 = dir.path().join("sum.safetensors");
    let log = ok(&[
        "--models",
        s(&a),
        s(&b),
        "--ratios",
        "1",
        "1",
        "--save_to",
        s(&out2),
        "--save_precision",
        "float",
    ]);
    assert!(log.contains("relative error of ΔW"), "{log}");
}

#[test]
fn refusals_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("x.safetensors");
    let sd15 = fixture("tiny-sd15.safetensors");
    let cases: Vec<(Vec<String>, &str)> = vec![
        // An SDXL LoRA into an SD1.5 checkpoint.
        (
            vec![
                "--sd_model".into(),
                s(&sd15).into(),
                "--models".into(),
                s(&fixture("lora/lora-sdxl.safetensors")).into(),
                "--ratios".into(),
                "1".into(),
            ],
            "LoRA for SDXL",
        ),
        // An SD1 LoRA into the SD2 checkpoint: every shape misfits.
        (
            vec![
                "--sd_model".into(),
                s(&fixture("tiny-sd21v.safetensors")).into(),
                "--models".into(),
                s(&fixture("lora/lora-sd15.safetensors")).into(),
                "--ratios".into(),
                "1".into(),
            ],
            "do not fit the shapes",
        ),
        // Count mismatch.
        (
            vec![
                "--models".into(),
                s(&fixture("lora/lora-sd15.safetensors")).into(),
                "--ratios".into(),
                "1".into(),
                "2".into(),
            ],
            "one ratio per model",
        ),
        // Different ranks without --concat.
        (
            vec![
                "--models".into(),
                s(&fixture("lora/lora-sd15.safetensors")).into(),
                s(&fixture("lora/lora-sd15-r8.safetensors")).into(),
                "--ratios".into(),
                "1".into(),
                "1".into(),
            ],
            "--concat",
        ),
    ];
    for (mut args, msg) in cases {
        args.extend(["--save_to".to_string(), s(&out).to_string()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = tool(&refs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: expected {msg:?} in {err}");
        assert!(!out.exists(), "{args:?} wrote output");
    }
    // --save_to equal to an input.
    let lora = fixture("lora/lora-sd15.safetensors");
    let o = tool(&["--models", s(&lora), "--ratios", "1", "--save_to", s(&lora)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("is an input file"));
}

#[test]
fn merges_into_sd2_and_sdxl_text_encoders_with_packed_qkv() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    for (model, lora, ratio) in [("tiny-sdxl.safetensors", "lora/lora-sdxl.safetensors", 0.6)] {
        let out = dir.path().join("m.safetensors");
        let base = fixture(model);
        let lpath = fixture(lora);
        ok(&[
            "--sd_model",
            s(&base),
            "--models",
            s(&lpath),
            "--ratios",
            &ratio.to_string(),
            "--save_to",
            s(&out),
            "--save_precision",
            "float",
        ]);
        let got = TensorFile::open(&out).expect("out");
        let basef = TensorFile::open(&base).expect("base");
        let lf = TensorFile::open(&lpath).expect("lora");
        // TE2 layer 3: q, k, v rows of the packed in_proj_weight.
        let key = "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight";
        let w0 = tensor(&basef, key);
        let h = w0.size()[0] / 3;
        let want = w0.shallow_clone();
        for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let m = format!("lora_te2_text_model_encoder_layers_3_self_attn_{p}");
            let mut part = want.narrow(0, i as i64 * h, h);
            let _ = part.g_add_(&(lora_delta(&lf, &m) * ratio));
        }
        assert_close(key, &vec_of(&tensor(&got, key)), &vec_of(&want), 1e-6, 1e-5);
        // TE1 (HF layout) and an SGM U-Net key.
        for (key, m) in [
            (
                "conditioner.embedders.0.transformer.text_model.encoder.layers.2.mlp.fc1.weight",
                "lora_te1_text_model_encoder_layers_2_mlp_fc1",
            ),
            (
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            ),
        ] {
            let want = tensor(&basef, key) + lora_delta(&lf, m) * ratio;
            assert_close(key, &vec_of(&tensor(&got, key)), &vec_of(&want), 1e-6, 1e-5);
        }
    }
}

#[test]
fn merges_into_sd2_openclip_in_proj() {
    tch::set_num_threads(1);
    // An SD2 LoRA made from the SD1 one is not at hand: build one on the fly with the SD2
    // shapes (tiny-sd21v TE width 16) for one q/k/v triple and one out_proj.
    let dir = tempfile::tempdir().expect("tempdir");
    let lora = dir.path().join("sd2.safetensors");
    tch::manual_seed(5);
    let mut w = sd_core::lora::LoraWeights::default();
    for m in ["q_proj", "k_proj", "v_proj", "out_proj"] {
        w.modules.insert(
            format!("lora_te_text_model_encoder_layers_7_self_attn_{m}"),
            sd_core::lora::LoraTensors {
                down: Tensor::randn([2, 16], (Kind::Float, tch::Device::Cpu)),
                up: Tensor::randn([16, 2], (Kind::Float, tch::Device::Cpu)),
                alpha: Some(1.0),
                alpha_dtype: None,
            },
        );
    }
    w.save(&lora, &sd_core::lora::SaveOptions::default())
        .expect("save");
    let out = dir.path().join("m.safetensors");
    let base = fixture("tiny-sd21v.safetensors");
    let log = ok(&[
        "--sd_model",
        s(&base),
        "--models",
        s(&lora),
        "--ratios",
        "0.5",
        "--save_to",
        s(&out),
        "--v2",
    ]);
    assert!(log.contains("applied text_encoder 4"), "{log}");
    let got = TensorFile::open(&out).expect("out");
    let basef = TensorFile::open(&base).expect("base");
    let lf = TensorFile::open(&lora).expect("lora");
    let key = "cond_stage_model.model.transformer.resblocks.7.attn.in_proj_weight";
    let w0 = tensor(&basef, key);
    let want = w0.shallow_clone();
    for (i, p) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        let m = format!("lora_te_text_model_encoder_layers_7_self_attn_{p}");
        let mut part = want.narrow(0, i as i64 * 16, 16);
        let _ = part.g_add_(&(lora_delta(&lf, &m) * 0.5));
    }
    // fp16 output (the checkpoint's dtype): compare at fp16 precision.
    assert_close(key, &vec_of(&tensor(&got, key)), &vec_of(&want), 2e-3, 2e-3);
}

/// Every key of `a` and `b` (except `skip`) with identical dtype, shape and bytes.
fn assert_same_tensors(a: &Path, b: &Path, skip: &[&str]) {
    let (fa, fb) = (
        TensorFile::open(a).expect("a"),
        TensorFile::open(b).expect("b"),
    );
    let mut ka: Vec<&str> = fa.sorted_names();
    let mut kb: Vec<&str> = fb.sorted_names();
    ka.retain(|k| !skip.contains(k));
    kb.retain(|k| !skip.contains(k));
    assert_eq!(ka, kb, "key sets of {} and {}", a.display(), b.display());
    for k in ka {
        assert_eq!(fa.info(k), fb.info(k), "{k}");
        assert!(
            fa.data(k).expect("data") == fb.data(k).expect("data"),
            "{k} differs"
        );
    }
}

#[test]
fn diffusers_folder_input_equals_single_file_input() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    // (folder, single file, LoRA, keys only a single file holds)
    let cases = [
        (
            "tiny-sd15",
            "tiny-sd15.safetensors",
            "lora/lora-sd15.safetensors",
            vec![],
        ),
        (
            "tiny-sdxl",
            "tiny-sdxl.safetensors",
            "lora/lora-sdxl.safetensors",
            // Diffusers has no OpenCLIP logit_scale; sd-scripts leaves it out without a
            // reference checkpoint too.
            vec!["conditioner.embedders.1.model.logit_scale"],
        ),
    ];
    for (folder, file, lora, only_file) in cases {
        let from_dir = dir.path().join(format!("{folder}-dir.safetensors"));
        let from_file = dir.path().join(format!("{folder}-file.safetensors"));
        for (model, out) in [(folder, &from_dir), (file, &from_file)] {
            let log = ok(&[
                "--sd_model",
                s(&fixture(model)),
                "--models",
                s(&fixture(lora)),
                "--ratios",
                "0.8",
                "--save_to",
                s(out),
            ]);
            if model == folder {
                assert!(log.contains("is a Diffusers folder"), "{log}");
            }
        }
        assert_same_tensors(&from_dir, &from_file, &only_file);
    }
}

#[test]
fn sdxl_merge_lora_alias_runs_merge_lora_for_sdxl_only() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let alias = env!("CARGO_BIN_EXE_sdxl-merge-lora");
    let run = |args: &[&str]| {
        Command::new(alias)
            .args(args)
            .env("OMP_NUM_THREADS", "1")
            .output()
            .expect("sdxl-merge-lora runs")
    };
    let (a, b) = (
        dir.path().join("alias.safetensors"),
        dir.path().join("tool.safetensors"),
    );
    let common = |out: &Path| -> Vec<String> {
        [
            "--sd_model",
            s(&fixture("tiny-sdxl.safetensors")),
            "--models",
            s(&fixture("lora/lora-sdxl.safetensors")),
            "--ratios",
            "0.7",
            "--no_metadata",
            "--save_to",
            s(out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect()
    };
    let args_a = common(&a);
    let o = run(&args_a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args_b = common(&b);
    ok(&args_b.iter().map(String::as_str).collect::<Vec<_>>());
    assert_same_tensors(&a, &b, &[]);

    // SD1 inputs are refused, nothing written.
    let out = dir.path().join("no.safetensors");
    let (sd15, xl_lora, sd15_lora) = (
        fixture("tiny-sd15.safetensors"),
        fixture("lora/lora-sdxl.safetensors"),
        fixture("lora/lora-sd15.safetensors"),
    );
    let cases: [(Vec<&str>, &str); 3] = [
        (
            vec![
                "--sd_model",
                s(&sd15),
                "--models",
                s(&xl_lora),
                "--ratios",
                "1",
            ],
            "merges into SDXL checkpoints only",
        ),
        (
            vec!["--models", s(&sd15_lora), "--ratios", "1"],
            "merges SDXL LoRAs only",
        ),
        (
            vec!["--v2", "--models", s(&xl_lora), "--ratios", "1"],
            "--v2 is not an option of sdxl-merge-lora",
        ),
    ];
    for (mut args, msg) in cases {
        args.extend(["--save_to", s(&out)]);
        let o = run(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: expected {msg:?} in {err}");
        assert!(!out.exists());
    }
}

#[test]
fn unmatched_modules_are_listed_and_the_rest_applied() {
    use sd_formats::safetensors::{TensorToWrite, write_safetensors};
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = TensorFile::open(fixture("lora/lora-sd15.safetensors")).expect("lora");
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = src
        .names()
        .iter()
        .map(|n| {
            let i = src.info(n).expect("info");
            (
                n.clone(),
                i.dtype,
                i.shape.clone(),
                src.data(n).expect("data").to_vec(),
            )
        })
        .collect();
    // Two modules that exist in no SD1 model.
    let up_key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight";
    let down_key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight";
    let alpha_key = "lora_unet_down_blocks_0_attentions_0_proj_in.alpha";
    for fake in [
        "lora_unet_no_such_block_proj",
        "lora_te_text_model_no_such_layer",
    ] {
        for (from, suffix) in [
            (up_key, ".lora_up.weight"),
            (down_key, ".lora_down.weight"),
            (alpha_key, ".alpha"),
        ] {
            let i = src.info(from).expect("info");
            owned.push((
                format!("{fake}{suffix}"),
                i.dtype,
                i.shape.clone(),
                src.data(from).expect("data").to_vec(),
            ));
        }
    }
    let views: Vec<TensorToWrite<'_>> = owned
        .iter()
        .map(|(n, d, s, b)| TensorToWrite::new(n.clone(), *d, s.clone(), b.as_slice()))
        .collect();
    let lora = dir.path().join("extra.safetensors");
    write_safetensors(&lora, &views, Some(src.metadata())).expect("write");
    let out = dir.path().join("m.safetensors");
    let log = ok(&[
        "--sd_model",
        s(&fixture("tiny-sd15.safetensors")),
        "--models",
        s(&lora),
        "--ratios",
        "0.8",
        "--save_to",
        s(&out),
    ]);
    assert!(log.contains("applied unet 192, text_encoder 72"), "{log}");
    assert!(
        log.contains(
            "2 module(s) matched nothing in the checkpoint: lora_te_text_model_no_such_layer, lora_unet_no_such_block_proj"
        ),
        "{log}"
    );
    assert!(
        log.contains("output dtype: each tensor keeps its input dtype; 264 key(s) change"),
        "{log}"
    );
    // The matched modules give the same file as the plain LoRA.
    let plain = dir.path().join("plain.safetensors");
    ok(&[
        "--sd_model",
        s(&fixture("tiny-sd15.safetensors")),
        "--models",
        s(&fixture("lora/lora-sd15.safetensors")),
        "--ratios",
        "0.8",
        "--no_metadata",
        "--save_to",
        s(&plain),
    ]);
    assert_same_tensors(&out, &plain, &[]);
}

#[test]
fn pytorch_checkpoint_output_holds_the_same_tensors() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let (sd15, lora) = (
        fixture("tiny-sd15.safetensors"),
        fixture("lora/lora-sd15.safetensors"),
    );
    // Checkpoint mode: {"state_dict": …, "epoch": 0, "global_step": 0}.
    let (ckpt, st) = (dir.path().join("m.ckpt"), dir.path().join("m.safetensors"));
    for out in [&ckpt, &st] {
        ok(&[
            "--sd_model",
            s(&sd15),
            "--models",
            s(&lora),
            "--ratios",
            "0.8",
            "--save_to",
            s(out),
        ]);
    }
    let f = TensorFile::open(&ckpt).expect("our reader opens the .ckpt");
    assert_eq!(f.format(), sd_formats::tensor_file::Format::Checkpoint);
    assert_same_tensors(&ckpt, &st, &[]);
    // LoRA + LoRA: a plain tensor dict.
    let (pt, st2) = (dir.path().join("l.pt"), dir.path().join("l.safetensors"));
    for out in [&pt, &st2] {
        ok(&[
            "--models",
            s(&lora),
            s(&lora),
            "--ratios",
            "0.5",
            "0.3",
            "--concat",
            "--save_to",
            s(out),
        ]);
    }
    assert_same_tensors(&pt, &st2, &[]);
    // Other extensions are refused before any work.
    let o = tool(&[
        "--models",
        s(&lora),
        "--ratios",
        "1",
        "--save_to",
        s(&dir.path().join("x.onnx")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the extension decides the format"));
}
