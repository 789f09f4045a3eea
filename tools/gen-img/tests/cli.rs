//! gen-img end to end on the tiny SD1.5 fixture: files, names, PNG metadata, JSON lines,
//! seeds from --seed (Python semantics), LoRA with per-prompt --am, the pndm and dpmsingle
//! samplers, and refused inputs.

use std::path::Path;
use std::process::Command;

use sd_core::generate::png::read_png_text;
use sd_testutil::fixture;

fn gen_img(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gen-img"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("gen-img runs")
}

fn text(path: &Path, key: &str) -> Option<String> {
    read_png_text(path)
        .expect("png text")
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[test]
fn generates_named_pngs_with_metadata_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-sd15.safetensors");
    let config = fixture("tiny-sd15");
    let lora = fixture("lora/lora-sd15.safetensors");
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# comment\na (red:1.2) cat --n blurry --d 5,6 --am 0.5\na dog --w 32 --h 64 --s 2 --l 4\n",
    )
    .expect("prompts");
    let out = dir.path().join("out");
    let o = gen_img(&[
        "--ckpt",
        model.to_str().expect("utf-8"),
        "--model_config_dir",
        config.to_str().expect("utf-8"),
        "--from_file",
        prompts.to_str().expect("utf-8"),
        "--images_per_prompt",
        "2",
        "--batch_size",
        "2",
        "--W",
        "64",
        "--H",
        "32",
        "--steps",
        "3",
        "--sampler",
        "k_euler_a",
        "--seed",
        "42",
        "--network_module",
        "networks.lora",
        "--network_weights",
        lora.to_str().expect("utf-8"),
        "--network_mul",
        "0.7",
        "--outdir",
        out.to_str().expect("utf-8"),
        "--device",
        "cpu",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let stdout = String::from_utf8(o.stdout).expect("utf-8");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 4);
    // Line 1: seeds from --d; line 2: from random.Random(42).randint(0, 2**32-1).
    let seeds: Vec<u64> = lines
        .iter()
        .map(|l| l["seed"].as_u64().expect("seed"))
        .collect();
    assert_eq!(seeds, vec![5, 6, 2746317213, 1181241943]);
    assert_eq!(lines[0]["network_multipliers"], serde_json::json!([0.5]));
    assert_eq!(lines[2]["network_multipliers"], serde_json::json!([0.7]));
    assert_eq!(
        (lines[2]["width"].as_i64(), lines[2]["steps"].as_u64()),
        (Some(32), Some(2))
    );

    let first = Path::new(lines[0]["file"].as_str().expect("file")).to_path_buf();
    let name = first
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with("im_") && name.ends_with("_000_5.png"),
        "{name}"
    );
    assert_eq!(text(&first, "prompt").as_deref(), Some("a (red:1.2) cat"));
    assert_eq!(text(&first, "negative-prompt").as_deref(), Some("blurry"));
    assert_eq!(text(&first, "seed").as_deref(), Some("5"));
    assert_eq!(text(&first, "sampler").as_deref(), Some("k_euler_a"));
    assert_eq!(text(&first, "steps").as_deref(), Some("3"));
    assert_eq!(text(&first, "scale").as_deref(), Some("7.5"));
    assert_eq!(
        text(&first, "lora").as_deref(),
        Some("lora-sd15.safetensors:0.5")
    );
    let third = Path::new(lines[2]["file"].as_str().expect("file")).to_path_buf();
    assert_eq!(text(&third, "scale").as_deref(), Some("4.0"));
    assert_eq!(text(&third, "negative-prompt").as_deref(), Some(""));
    let png = std::fs::read(&third).expect("png");
    // IHDR width/height (big-endian at bytes 16..24).
    assert_eq!(&png[16..24], &[0, 0, 0, 32, 0, 0, 0, 64]);
}

#[test]
fn same_seed_same_image_and_single_prompt_uses_the_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-sd15");
    let run = |out: &str| {
        let o = gen_img(&[
            "--ckpt",
            model.to_str().expect("utf-8"),
            "--prompt",
            "a cat",
            "--W",
            "32",
            "--H",
            "32",
            "--steps",
            "2",
            "--sampler",
            "dpmsolver++",
            "--seed",
            "1234",
            "--sequential_file_name",
            "--outdir",
            dir.path().join(out).to_str().expect("utf-8"),
            "--device",
            "cpu",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        dir.path().join(out).join("im_000001.png")
    };
    let a = run("a");
    let b = run("b");
    assert_eq!(text(&a, "seed").as_deref(), Some("1234"));
    assert_eq!(std::fs::read(&a).expect("a"), std::fs::read(&b).expect("b"));
}

#[test]
fn refuses_bad_inputs_with_messages() {
    let model = fixture("tiny-sd15");
    let m = model.to_str().expect("utf-8");
    let o = gen_img(&[
        "--ckpt",
        m,
        "--prompt",
        "x",
        "--sampler",
        "nope",
        "--device",
        "cpu",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown sampler \"nope\""));
    let o = gen_img(&[
        "--ckpt", m, "--prompt", "x", "--W", "60", "--steps", "1", "--device", "cpu",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiples of 8"));
    let o = gen_img(&["--ckpt", m, "--device", "cpu"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no prompt"));
    let o = gen_img(&["--ckpt", m, "--prompt", "x", "--image_path", "a.png"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not supported"));
}

/// Decodes an 8-bit RGB PNG to its pixel bytes.
fn pixels(path: &Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).expect("png opens"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    buf.truncate(info.buffer_size());
    buf
}

#[test]
fn pndm_and_dpmsingle_generate_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-sd15");
    for (sampler, steps) in [("pndm", "4"), ("dpmsingle", "3")] {
        let out = dir.path().join(sampler);
        let o = gen_img(&[
            "--ckpt",
            model.to_str().expect("utf-8"),
            "--prompt",
            "a photo of a cat --n blurry",
            "--W",
            "32",
            "--H",
            "32",
            "--steps",
            steps,
            "--sampler",
            sampler,
            "--seed",
            "7",
            "--sequential_file_name",
            "--outdir",
            out.to_str().expect("utf-8"),
            "--device",
            "cpu",
            "--json",
        ]);
        assert!(
            o.status.success(),
            "{sampler}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let line: serde_json::Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
        assert_eq!(line["sampler"], sampler, "{line}");
        let file = out.join("im_000001.png");
        assert_eq!(text(&file, "sampler").as_deref(), Some(sampler));
        assert_eq!(text(&file, "steps").as_deref(), Some(steps));
        // Non-finite latents decode to one flat colour; a real image has many values.
        let px = pixels(&file);
        assert_eq!(px.len(), 32 * 32 * 3);
        let distinct: std::collections::BTreeSet<u8> = px.iter().copied().collect();
        assert!(
            distinct.len() > 16,
            "{sampler}: {} distinct values",
            distinct.len()
        );
    }
    let o = gen_img(&[
        "--ckpt",
        model.to_str().expect("utf-8"),
        "--prompt",
        "x",
        "--steps",
        "3",
        "--sampler",
        "pndm",
        "--device",
        "cpu",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 4 steps"));
}

#[test]
fn vae_override_accepts_diffusers_folders_and_ldm_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-sd15");
    let run = |name: &str, vae: Option<&Path>| {
        let out = dir.path().join(name);
        let mut args = vec![
            "--ckpt".to_owned(),
            model.display().to_string(),
            "--prompt".to_owned(),
            "a cat".to_owned(),
            "--W".to_owned(),
            "32".to_owned(),
            "--H".to_owned(),
            "32".to_owned(),
            "--steps".to_owned(),
            "2".to_owned(),
            "--sampler".to_owned(),
            "euler".to_owned(),
            "--seed".to_owned(),
            "3".to_owned(),
            "--sequential_file_name".to_owned(),
            "--outdir".to_owned(),
            out.display().to_string(),
            "--device".to_owned(),
            "cpu".to_owned(),
        ];
        if let Some(v) = vae {
            args.push("--vae".to_owned());
            args.push(v.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = gen_img(&args);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::read(out.join("im_000001.png")).expect("png")
    };
    // An LDM-layout VAE file as distributed alone: the checkpoint's first_stage_model.*
    // tensors without the prefix.
    let whole = fixture("tiny-sd15.safetensors");
    let vae: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&whole)
        .expect("checkpoint reads")
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("first_stage_model.")
                .map(|s| (s.to_owned(), v))
        })
        .collect();
    assert!(vae.iter().any(|(k, _)| k.starts_with("encoder.down.0.")));
    let ldm = dir.path().join("vae-ldm.safetensors");
    tch::Tensor::write_safetensors(&vae, &ldm).expect("write");
    let shifted: Vec<(String, tch::Tensor)> = vae
        .iter()
        .map(|(k, v)| {
            let v = if k == "decoder.conv_out.bias" {
                v + 0.5
            } else {
                v.shallow_clone()
            };
            (k.clone(), v)
        })
        .collect();
    let ldm_shifted = dir.path().join("vae-shifted.safetensors");
    tch::Tensor::write_safetensors(&shifted, &ldm_shifted).expect("write");

    let base = run("base", None);
    assert_eq!(
        run("folder", Some(&model.join("vae"))),
        base,
        "Diffusers VAE folder"
    );
    assert_eq!(run("ldm", Some(&ldm)), base, "LDM-layout VAE file");
    assert_eq!(
        run("whole", Some(&whole)),
        base,
        "whole checkpoint as --vae"
    );
    assert_ne!(
        run("shifted", Some(&ldm_shifted)),
        base,
        "a different VAE is used"
    );
}

#[test]
fn dynamic_prompts_pick_variants_with_each_image_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = fixture("tiny-sd15");
    let o = gen_img(&[
        "--ckpt",
        model.to_str().expect("utf-8"),
        "--prompt",
        "a {red|green|blue} cat, {big|small} --d 5,6 --n {x|y}",
        "--images_per_prompt",
        "2",
        "--W",
        "32",
        "--H",
        "32",
        "--steps",
        "1",
        "--sampler",
        "euler",
        "--outdir",
        dir.path().to_str().expect("utf-8"),
        "--device",
        "cpu",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> = String::from_utf8(o.stdout)
        .expect("utf-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    // Python: random.Random(5) / Random(6), the three groups drawn from last to first.
    let got: Vec<(String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["prompt"].as_str().expect("prompt").to_owned(),
                l["seed"].as_u64().expect("seed"),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("a blue cat, small".to_owned(), 5),
            ("a red cat, big".to_owned(), 6)
        ]
    );
    let file = Path::new(lines[0]["file"].as_str().expect("file")).to_path_buf();
    assert_eq!(text(&file, "prompt").as_deref(), Some("a blue cat, small"));
    assert_eq!(text(&file, "negative-prompt").as_deref(), Some("y"));
    assert_eq!(
        text(&file, "raw-prompt").as_deref(),
        Some("a blue cat, small --n y")
    );
}
