//! Runs the built `check-lora-weights` on the fixture LoRAs and on broken inputs.

use std::process::Command;

use sd_testutil::fixture;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_check-lora-weights"))
        .args(args)
        .output()
        .expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(rel: &str) -> serde_json::Value {
    let path = fixture(rel);
    let (code, stdout, stderr) = run(&["--json", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0, "{rel}: exit {code}, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{rel}: stdout is not JSON ({e}): {stdout}"))
}

#[test]
fn every_fixture_lora_is_read_with_exact_module_counts() {
    // (file, modules, text-encoder modules, U-Net modules, family)
    let cases = [
        ("lora/lora-sd15.safetensors", 264, 72, 192, "SD1.x"),
        ("lora/lora-sd15-b.safetensors", 264, 72, 192, "SD1.x"),
        ("lora/lora-sd15-r8.safetensors", 264, 72, 192, "SD1.x"),
        ("lora/lora-sd15-conv.safetensors", 348, 72, 276, "SD1.x"),
        ("lora/dylora-sd15.safetensors", 264, 72, 192, "SD1.x"),
        ("lora/lora-sdxl.safetensors", 566, 0, 0, "SDXL"),
        ("lora/lora-sdxl-conv.safetensors", 630, 0, 0, "SDXL"),
        (
            "goldens/lora-tools/dylora-sd15-split-0004.safetensors",
            264,
            72,
            192,
            "SD1.x",
        ),
        (
            "goldens/lora-tools/extract-sd15-dim4-conv2.safetensors",
            348,
            72,
            276,
            "SD1.x",
        ),
        (
            "goldens/lora-tools/merge-lora-lora.safetensors",
            264,
            72,
            192,
            "SD1.x",
        ),
        (
            "goldens/lora-tools/merge-lora-lora-concat.safetensors",
            264,
            72,
            192,
            "SD1.x",
        ),
        (
            "goldens/lora-tools/svd-merge-r4-r8-to-r6.safetensors",
            348,
            72,
            276,
            "SD1.x",
        ),
    ];
    for (rel, modules, te, unet, family) in cases {
        let v = json_of(rel);
        assert_eq!(v["module_count"], modules, "{rel}");
        assert_eq!(v["key_style"], "kohya (sd-scripts)", "{rel}");
        assert_eq!(v["family"], family, "{rel}");
        assert_eq!(v["non_finite"].as_array().map(Vec::len), Some(0), "{rel}");
        if te > 0 {
            assert_eq!(v["modules_per_component"]["text encoder"], te, "{rel}");
            assert_eq!(v["modules_per_component"]["U-Net"], unet, "{rel}");
        }
        let problems: usize = v["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .map(|m| m["problems"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(problems, 0, "{rel}");
        assert!(
            v["metadata"]["ss_network_dim"].is_string() || rel.contains("products"),
            "{rel}: metadata read"
        );
    }
}

#[test]
fn rank_alpha_scale_and_norm_match_an_independent_computation() {
    let v = json_of("lora/lora-sd15.safetensors");
    let find = |name: &str| {
        v["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no module {name}"))
    };
    // Expected norms computed with plain Python from the f16 values (sum over explicit U·D).
    for (name, norm, down, up) in [
        (
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            6.433516705005836,
            vec![4, 32, 1, 1],
            vec![32, 4, 1, 1],
        ),
        (
            "lora_te_text_model_encoder_layers_0_mlp_fc1",
            10.531369257274392,
            vec![4, 32],
            vec![128, 4],
        ),
    ] {
        let m = find(name);
        assert_eq!(m["rank"], 4);
        assert_eq!(m["alpha"], 1.0);
        assert_eq!(m["scale"], 0.25);
        assert_eq!(m["dtype"], "F16");
        assert_eq!(m["down_shape"], serde_json::json!(down));
        assert_eq!(m["up_shape"], serde_json::json!(up));
        let got = m["norm_up_down"].as_f64().expect("finite norm");
        assert!((got - norm).abs() < 1e-9 * norm, "{name}: {got} vs {norm}");
    }
}

#[test]
fn text_report_lists_modules_and_metadata() {
    let path = fixture("lora/lora-sd15.safetensors");
    let (code, stdout, _) = run(&[path.to_str().expect("utf-8")]);
    assert_eq!(code, 0);
    assert!(stdout.contains("key style: kohya (sd-scripts)"), "{stdout}");
    assert!(
        stdout.contains("modules: 264 (U-Net 192, text encoder 72); tensors: 792"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\nlora_unet_down_blocks_0_attentions_0_proj_in\t4\t1\t0.25\tF16\t"),
        "{stdout}"
    );
    assert!(stdout.contains("  ss_network_dim: 4\n"), "{stdout}");
}

#[test]
fn reference_tensor_lines_use_python_formatting() {
    let path = fixture("lora/lora-sd15.safetensors");
    let (code, stdout, _) = run(&["--tensors", path.to_str().expect("utf-8")]);
    assert_eq!(code, 0);
    assert!(stdout.contains("number of LoRA tensors: 528"), "{stdout}");
    assert!(
        stdout.contains(
            "\nlora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight,(4-32-1-1),"
        ),
        "{stdout}"
    );
}

#[test]
fn a_model_checkpoint_is_not_a_lora() {
    let path = fixture("tiny-sd15.safetensors");
    let (code, _, stderr) = run(&[path.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no LoRA module found"), "{stderr}");
    assert!(stderr.contains("1118 other key(s)"), "{stderr}");
}

#[test]
fn missing_file_and_usage_errors() {
    let (code, _, stderr) = run(&["/nonexistent/x.safetensors"]);
    assert_eq!(code, 1);
    assert!(
        stderr.starts_with("error: reading LoRA /nonexistent/x.safetensors"),
        "{stderr}"
    );
    let (code, _, _) = run(&["--no-such-flag"]);
    assert_eq!(code, 2);
}

/// Writes a minimal safetensors file by hand (header + data), independent of our writer.
fn write_raw_safetensors(path: &std::path::Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert((*name).to_owned(), serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}));
    }
    let mut h = serde_json::to_vec(&header).expect("json");
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(path, file).expect("write");
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn non_finite_values_are_flagged_with_exit_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nan.safetensors");
    write_raw_safetensors(
        &path,
        &[
            (
                "lora_unet_a.lora_down.weight",
                "F32",
                vec![1, 2],
                f32_bytes(&[f32::NAN, 1.0]),
            ),
            (
                "lora_unet_a.lora_up.weight",
                "F32",
                vec![2, 1],
                f32_bytes(&[1.0, 2.0]),
            ),
        ],
    );
    let (code, stdout, stderr) = run(&[path.to_str().expect("utf-8")]);
    assert_eq!(code, 1);
    assert!(
        stdout.contains("NON-FINITE values (NaN/Inf) in: lora_unet_a.lora_down.weight"),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 tensor(s) hold NaN or Inf values: lora_unet_a.lora_down.weight"),
        "{stderr}"
    );
    // Alpha absent: scale is 1 (alpha = rank).
    assert!(stdout.contains("\nlora_unet_a\t1\t-\t1\tF32\t"), "{stdout}");
}

#[test]
fn lycoris_and_peft_files_are_recognised() {
    let dir = tempfile::tempdir().expect("tempdir");
    let loha = dir.path().join("loha.safetensors");
    write_raw_safetensors(
        &loha,
        &[
            (
                "lora_unet_conv_in.hada_w1_a",
                "F32",
                vec![2, 1],
                f32_bytes(&[1.0, 2.0]),
            ),
            (
                "lora_unet_conv_in.hada_w1_b",
                "F32",
                vec![1, 2],
                f32_bytes(&[1.0, 2.0]),
            ),
        ],
    );
    // Issue 12: the report is printed in full, and the unusable module makes the exit code 1.
    let (code, stdout, stderr) = run(&[loha.to_str().expect("utf-8")]);
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stderr.contains("loha.safetensors: 1 of 1 module(s) cannot be used as LoRA modules"),
        "{stderr}"
    );
    assert!(stdout.contains("key style: LyCORIS"), "{stdout}");
    assert!(stdout.contains("PROBLEM: unsupported algorithm keys: lora_unet_conv_in.hada_w1_a, lora_unet_conv_in.hada_w1_b"), "{stdout}");

    let peft = dir.path().join("peft.safetensors");
    write_raw_safetensors(
        &peft,
        &[
            (
                "unet.mid_block.attentions.0.proj_in.lora_A.weight",
                "F32",
                vec![1, 2],
                f32_bytes(&[3.0, 4.0]),
            ),
            (
                "unet.mid_block.attentions.0.proj_in.lora_B.weight",
                "F32",
                vec![2, 1],
                f32_bytes(&[1.0, 0.0]),
            ),
        ],
    );
    let (code, stdout, _) = run(&["--json", peft.to_str().expect("utf-8")]);
    assert_eq!(code, 0, "{stdout}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["key_style"], "Diffusers/PEFT");
    // up·down = [[3,4],[0,0]] → Frobenius norm 5.
    assert_eq!(v["modules"][0]["norm_up_down"], 5.0);
}
