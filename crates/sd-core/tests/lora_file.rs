//! LoRA files: the sd-scripts goldens (tests/fixtures/lora/, README §5e), round trips, hashes,
//! alpha variants, foreign spellings and refused algorithms.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use sd_core::lora::convert::NameConverter;
use sd_core::lora::file::LoadOptions;
use sd_core::lora::{AlphaDtype, LoraError, LoraWeights, SaveOptions};
use sd_formats::dtype::Dtype;
use sd_formats::family::ModelFamily;
use sd_formats::lora::{KeyStyle, split_key};
use sd_formats::safetensors::{SafetensorsFile, TensorToWrite, write_safetensors};
use sha2::{Digest, Sha256};

const GOLDENS: [(&str, ModelFamily); 4] = [
    ("lora-sd15", ModelFamily::Sd1),
    ("lora-sd15-conv", ModelFamily::Sd1),
    ("lora-sdxl", ModelFamily::Sdxl),
    ("lora-sdxl-conv", ModelFamily::Sdxl),
];

fn golden(name: &str) -> PathBuf {
    sd_testutil::fixture(&format!("lora/{name}.safetensors"))
}

fn modules_json(name: &str) -> serde_json::Value {
    let path = sd_testutil::fixture(&format!("lora/{name}.modules.json"));
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

fn load(path: &Path) -> LoraWeights {
    LoraWeights::load(path, &LoadOptions::default()).expect("loads")
}

/// SHA-256 of everything after the 8-byte length and the header, computed here from raw bytes.
fn data_section_sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    Sha256::digest(&bytes[8 + n..])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn read_tsv(name: &str) -> Vec<BTreeMap<String, String>> {
    let path = sd_testutil::fixture(&format!("manifests/{name}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).expect("open"))
        .read_to_string(&mut text)
        .expect("gzip");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split('\t'))
                .map(|(h, v)| ((*h).to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

/// Copies a safetensors file under new key names (`rename` returns `None` to drop a key).
fn rewrite(
    src: &Path,
    dst: &Path,
    metadata: Option<&BTreeMap<String, String>>,
    rename: impl Fn(&str) -> Option<String>,
) {
    let f = SafetensorsFile::open(src).expect("open");
    let tensors: Vec<TensorToWrite<'_>> = f
        .names()
        .iter()
        .filter_map(|k| {
            let info = f.info(k).expect("info");
            Some(TensorToWrite::new(
                rename(k)?,
                info.dtype,
                info.shape.clone(),
                Cow::Borrowed(f.data(k).expect("data")),
            ))
        })
        .collect();
    write_safetensors(dst, &tensors, metadata).expect("write");
}

#[test]
fn goldens_load_with_the_reference_module_lists() {
    for (name, family) in GOLDENS {
        let w = load(&golden(name));
        assert_eq!(w.family, Some(family), "{name}");
        assert_eq!(w.style, Some(KeyStyle::Kohya), "{name}");
        let json = modules_json(name);
        let rows = json["modules"].as_array().expect("modules");
        let want: BTreeSet<&str> = rows
            .iter()
            .map(|m| m["name"].as_str().expect("name"))
            .collect();
        let got: BTreeSet<&str> = w.modules.keys().map(String::as_str).collect();
        assert_eq!(got, want, "{name}: module names");
        for m in rows {
            let t = &w.modules[m["name"].as_str().expect("name")];
            let shape = |v: &serde_json::Value| -> Vec<i64> {
                v.as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_i64().expect("dim"))
                    .collect()
            };
            assert_eq!(
                t.down.size(),
                shape(&m["lora_down"]),
                "{name} {}",
                m["name"]
            );
            assert_eq!(t.up.size(), shape(&m["lora_up"]), "{name} {}", m["name"]);
            assert_eq!(t.rank() as i64, m["rank"].as_i64().expect("rank"));
            assert_eq!(t.effective_alpha(), m["alpha"].as_f64().expect("alpha"));
            assert_eq!(t.scale(), m["scale"].as_f64().expect("scale"));
            assert_eq!(t.alpha_dtype, Some(Dtype::F16));
        }
    }
}

#[test]
fn stored_sshs_model_hash_is_the_data_section_hash() {
    for (name, _) in GOLDENS {
        let path = golden(name);
        let f = SafetensorsFile::open(&path).expect("open");
        assert_eq!(
            f.metadata()["sshs_model_hash"],
            data_section_sha256(&path),
            "{name}"
        );
    }
}

#[test]
fn round_trip_keeps_names_values_metadata_and_the_reference_hash() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, _) in GOLDENS {
        let src = golden(name);
        let w = load(&src);
        let mut metadata = w.metadata.clone();
        metadata.remove("sshs_model_hash");
        metadata.remove("sshs_legacy_hash");

        // Alpha dtype kept (F16 like the reference with --save_precision fp16): the data
        // section is byte-identical, so the hash equals the one sd-scripts stored.
        let same = dir.path().join(format!("{name}-keep.safetensors"));
        let report = w
            .save(
                &same,
                &SaveOptions {
                    alpha_dtype: AlphaDtype::Keep,
                    metadata: metadata.clone(),
                    ..SaveOptions::default()
                },
            )
            .expect("save");
        let original = SafetensorsFile::open(&src).expect("open");
        let saved = SafetensorsFile::open(&same).expect("open");
        assert_eq!(
            report.hashes.model_hash,
            original.metadata()["sshs_model_hash"]
        );
        assert_eq!(saved.metadata(), original.metadata(), "{name}: metadata");
        assert_eq!(
            saved.sorted_names(),
            original.sorted_names(),
            "{name}: keys"
        );
        for k in original.names() {
            assert_eq!(
                saved.data(k).expect("data"),
                original.data(k).expect("data"),
                "{k}"
            );
            assert_eq!(saved.info(k), original.info(k), "{k}");
        }

        // Default: F32 alphas; weights untouched, hash of exactly what was written.
        let f32_alpha = dir.path().join(format!("{name}-f32.safetensors"));
        let report = w
            .save(
                &f32_alpha,
                &SaveOptions {
                    metadata,
                    ..SaveOptions::default()
                },
            )
            .expect("save");
        let saved = SafetensorsFile::open(&f32_alpha).expect("open");
        assert_eq!(report.hashes.model_hash, data_section_sha256(&f32_alpha));
        assert_eq!(
            saved.metadata()["sshs_model_hash"],
            report.hashes.model_hash
        );
        assert_eq!(
            saved.metadata()["sshs_legacy_hash"],
            "e3b0c442",
            "file under 1 MiB"
        );
        for k in original.names() {
            let info = saved.info(k).expect("present");
            if k.ends_with(".alpha") {
                assert_eq!(info.dtype, Dtype::F32);
                assert!(info.shape.is_empty());
                assert_eq!(
                    saved.to_f32_vec(k).expect("v"),
                    original.to_f32_vec(k).expect("v")
                );
            } else {
                assert_eq!(
                    saved.data(k).expect("d"),
                    original.data(k).expect("d"),
                    "{k}"
                );
            }
        }
        let again = load(&f32_alpha);
        assert_eq!(
            again.modules.keys().collect::<Vec<_>>(),
            w.modules.keys().collect::<Vec<_>>()
        );
    }
}

/// `write_safetensors`, padding the metadata so the header length does not start with the bytes
/// `80 02..05`: sd-formats' reader (5e31b96) takes such a file for a pickle (reported).
fn write_st(path: &Path, tensors: &[TensorToWrite<'_>]) {
    for pad in 0..64 {
        let mut meta = BTreeMap::new();
        meta.insert("pad".to_string(), "x".repeat(pad));
        let (header, _) =
            sd_formats::safetensors::serialize_header(path, tensors, Some(&meta)).expect("header");
        let len = (header.len() as u64).to_le_bytes();
        if len[0] != 0x80 || !(2..=5).contains(&len[1]) {
            write_safetensors(path, tensors, Some(&meta)).expect("write");
            return;
        }
    }
    unreachable!("some padding gives another header length");
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn write_module(
    out: &mut Vec<TensorToWrite<'static>>,
    name: &str,
    rank: usize,
    (i, o): (usize, usize),
) {
    let down: Vec<f32> = (0..rank * i).map(|k| k as f32 * 0.01).collect();
    let up: Vec<f32> = (0..o * rank).map(|k| 1.0 - k as f32 * 0.01).collect();
    out.push(TensorToWrite::new(
        format!("{name}.lora_down.weight"),
        Dtype::F32,
        vec![rank, i],
        f32_bytes(&down),
    ));
    out.push(TensorToWrite::new(
        format!("{name}.lora_up.weight"),
        Dtype::F32,
        vec![o, rank],
        f32_bytes(&up),
    ));
}

const Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
const FC1: &str = "lora_te_text_model_encoder_layers_0_mlp_fc1";

#[test]
fn mixed_ranks_without_alpha_mean_scale_one_and_save_explicit_alphas() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mixed.safetensors");
    let mut t = Vec::new();
    write_module(&mut t, Q, 2, (8, 8));
    write_module(&mut t, FC1, 8, (8, 32));
    let mut meta = BTreeMap::new();
    // kohya files never take alpha from metadata (every loader ignores it).
    meta.insert("ss_network_alpha".to_string(), "16.0".to_string());
    write_safetensors(&path, &t, Some(&meta)).expect("write");
    let w = load(&path);
    assert_eq!(w.modules[Q].alpha, None);
    assert_eq!((w.modules[Q].rank(), w.modules[Q].scale()), (2, 1.0));
    assert_eq!((w.modules[FC1].rank(), w.modules[FC1].scale()), (8, 1.0));
    let out = dir.path().join("out.safetensors");
    w.save(&out, &SaveOptions::default()).expect("save");
    let f = SafetensorsFile::open(&out).expect("open");
    assert_eq!(f.to_f32_vec(&format!("{Q}.alpha")).expect("alpha"), [2.0]);
    assert_eq!(f.to_f32_vec(&format!("{FC1}.alpha")).expect("alpha"), [8.0]);
    // The reference's rule: I64 for an integer alpha without --save_precision.
    let ref_out = dir.path().join("ref.safetensors");
    w.save(
        &ref_out,
        &SaveOptions {
            alpha_dtype: AlphaDtype::reference(false, true),
            ..SaveOptions::default()
        },
    )
    .expect("save");
    let f = SafetensorsFile::open(&ref_out).expect("open");
    let info = f.info(&format!("{Q}.alpha")).expect("alpha");
    assert_eq!((info.dtype, info.shape.len()), (Dtype::I64, 0));
    // I64 sorts before F32 in the data section (spec §1.1).
    assert!(f.names()[0].ends_with(".alpha") && f.names()[1].ends_with(".alpha"));
}

#[test]
fn alpha_dtypes_and_shapes_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(Dtype, Vec<usize>, Vec<u8>, f64); 5] = [
        (
            Dtype::BF16,
            vec![],
            half::bf16::from_f32(3.0).to_le_bytes().to_vec(),
            3.0,
        ),
        (
            Dtype::F16,
            vec![1],
            half::f16::from_f32(0.5).to_le_bytes().to_vec(),
            0.5,
        ),
        (Dtype::I64, vec![], 16i64.to_le_bytes().to_vec(), 16.0),
        (Dtype::F32, vec![1], 2.5f32.to_le_bytes().to_vec(), 2.5),
        (Dtype::F64, vec![], 1.25f64.to_le_bytes().to_vec(), 1.25),
    ];
    for (dtype, shape, bytes, want) in cases {
        let path = dir.path().join(format!("a-{dtype}.safetensors"));
        let mut t = Vec::new();
        write_module(&mut t, Q, 4, (8, 8));
        t.push(TensorToWrite::new(
            format!("{Q}.alpha"),
            dtype,
            shape,
            bytes,
        ));
        write_st(&path, &t);
        let w = load(&path);
        assert_eq!(w.modules[Q].alpha, Some(want), "{dtype}");
        assert_eq!(w.modules[Q].alpha_dtype, Some(dtype));
        assert_eq!(w.modules[Q].scale(), want / 4.0);
    }
    // A non-scalar alpha is refused with the key.
    let path = dir.path().join("bad.safetensors");
    let mut t = Vec::new();
    write_module(&mut t, Q, 4, (8, 8));
    t.push(TensorToWrite::new(
        format!("{Q}.alpha"),
        Dtype::F32,
        vec![2],
        f32_bytes(&[1.0, 2.0]),
    ));
    write_st(&path, &t);
    let err = LoraWeights::load(&path, &LoadOptions::default()).expect_err("refused");
    assert!(matches!(err, LoraError::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&format!("{Q}.alpha")), "{err}");
}

#[test]
fn unsupported_algorithms_refuse_the_whole_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (suffix, algo) in [
        ("hada_w1_a", "LoHa"),
        ("lokr_w1", "LoKr"),
        ("lora_mid.weight", "Tucker"),
        ("dora_scale", "DoRA"),
        ("oft_blocks", "OFT"),
    ] {
        let path = dir.path().join(format!("{algo}.safetensors"));
        let mut t = Vec::new();
        write_module(&mut t, Q, 4, (8, 8));
        write_module(&mut t, FC1, 4, (8, 32));
        let key = format!("{FC1}.{suffix}");
        t.push(TensorToWrite::new(
            key.clone(),
            Dtype::F32,
            vec![1],
            f32_bytes(&[1.0]),
        ));
        write_st(&path, &t);
        let err = LoraWeights::load(&path, &LoadOptions::default()).expect_err("refused");
        assert!(
            matches!(err, LoraError::UnsupportedAlgorithm { .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&key) && msg.contains(algo), "{msg}");
    }
    // Keys that are no LoRA keys at all are reported too.
    let path = dir.path().join("stray.safetensors");
    let mut t = Vec::new();
    write_module(&mut t, Q, 4, (8, 8));
    t.push(TensorToWrite::new(
        "model.diffusion_model.out.2.weight",
        Dtype::F32,
        vec![1],
        f32_bytes(&[1.0]),
    ));
    write_st(&path, &t);
    let err = LoraWeights::load(&path, &LoadOptions::default()).expect_err("refused");
    assert!(
        err.to_string()
            .contains("model.diffusion_model.out.2.weight"),
        "{err}"
    );
    let ok = LoraWeights::load(
        &path,
        &LoadOptions {
            allow_stray_keys: true,
            ..LoadOptions::default()
        },
    )
    .expect("opted out");
    assert_eq!(ok.modules.len(), 1);
}

/// Renames every key of a golden into another spelling using the manifest's columns
/// (`<down column>`, `<up column>`), dropping alphas.
fn respell(
    name: &str,
    model: &str,
    down_col: &str,
    up_col: &str,
    dst: &Path,
    metadata: Option<&BTreeMap<String, String>>,
) {
    let rows = read_tsv(&format!("{model}.lora_spellings.tsv.gz"));
    let map: BTreeMap<String, (String, String)> = rows
        .into_iter()
        .map(|r| {
            (
                r["lora_name"].clone(),
                (r[down_col].clone(), r[up_col].clone()),
            )
        })
        .collect();
    rewrite(&golden(name), dst, metadata, |k| {
        let (module, part, _) = split_key(k).expect("lora key");
        let (down, up) = &map[&module];
        match part {
            sd_formats::lora::Part::Down => Some(down.clone()),
            sd_formats::lora::Part::Up => Some(up.clone()),
            _ => None,
        }
    });
}

fn assert_same_modules(a: &LoraWeights, b: &LoraWeights, what: &str) {
    assert_eq!(
        a.modules.keys().collect::<Vec<_>>(),
        b.modules.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (k, x) in &a.modules {
        let y = &b.modules[k];
        assert!(x.down.equal(&y.down) && x.up.equal(&y.up), "{what}: {k}");
        assert_eq!(x.scale(), y.scale(), "{what}: {k}");
    }
}

#[test]
fn peft_and_old_diffusers_files_convert_to_the_kohya_golden_modules() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, model) in [("lora-sd15-conv", "sd15"), ("lora-sdxl-conv", "sdxl")] {
        let kohya = load(&golden(name));
        let mut meta = BTreeMap::new();
        meta.insert("lora_alpha".to_string(), "1".to_string());
        let peft = dir.path().join(format!("{name}-peft.safetensors"));
        respell(name, model, "peft_down", "peft_up", &peft, Some(&meta));
        let w = load(&peft);
        assert_eq!(w.style, Some(KeyStyle::DiffusersPeft));
        assert_same_modules(&kohya, &w, "PEFT, alpha from metadata");

        // Without any alpha: scale 1; with an explicit lora_alpha option it wins.
        let bare = dir.path().join(format!("{name}-peft-bare.safetensors"));
        respell(name, model, "peft_down", "peft_up", &bare, None);
        let w = load(&bare);
        assert!(
            w.modules
                .values()
                .all(|t| t.alpha.is_none() && t.scale() == 1.0)
        );
        let w = LoraWeights::load(
            &bare,
            &LoadOptions {
                peft_alpha: Some(1.0),
                ..LoadOptions::default()
            },
        )
        .expect("loads");
        assert_same_modules(&kohya, &w, "PEFT, alpha given");

        let old = dir.path().join(format!("{name}-old.safetensors"));
        respell(
            name,
            model,
            "diffusers_old_down",
            "diffusers_old_up",
            &old,
            Some(&meta),
        );
        assert_same_modules(&kohya, &load(&old), "old Diffusers spelling");
    }
}

#[test]
fn sdxl_diffusers_style_kohya_names_map_to_sai_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rows = read_tsv("sdxl.lora_spellings.tsv.gz");
    let to_diffusers: BTreeMap<String, String> = rows
        .into_iter()
        .filter(|r| !r["lora_diffusers_name"].is_empty())
        .map(|r| (r["lora_name"].clone(), r["lora_diffusers_name"].clone()))
        .collect();
    let path = dir.path().join("sdxl-diffusers-names.safetensors");
    rewrite(&golden("lora-sdxl-conv"), &path, None, |k| {
        let (module, _, _) = split_key(k).expect("lora key");
        let suffix = &k[module.len()..];
        Some(match to_diffusers.get(&module) {
            Some(d) => format!("{d}{suffix}"),
            None => k.to_owned(),
        })
    });
    assert!(
        SafetensorsFile::open(&path)
            .expect("open")
            .names()
            .iter()
            .any(|k| k.starts_with("lora_unet_down_blocks_"))
    );
    assert_same_modules(
        &load(&golden("lora-sdxl-conv")),
        &load(&path),
        "Diffusers names",
    );
}

#[test]
fn every_manifest_spelling_converts_to_the_sd_scripts_name() {
    for (model, family) in [
        ("sd15", ModelFamily::Sd1),
        ("sd21v", ModelFamily::Sd2),
        ("sdxl", ModelFamily::Sdxl),
    ] {
        let c = NameConverter::new(family);
        for r in read_tsv(&format!("{model}.lora_spellings.tsv.gz")) {
            let want = r["lora_name"].as_str();
            for col in ["peft_down", "diffusers_old_down"] {
                let (module, _, style) = split_key(&r[col]).expect("lora key");
                assert_eq!(
                    c.to_kohya(&module, style).as_deref(),
                    Some(want),
                    "{model} {col}"
                );
            }
            assert_eq!(c.to_kohya(want, KeyStyle::Kohya).as_deref(), Some(want));
            if !r["lora_diffusers_name"].is_empty() {
                assert_eq!(
                    c.to_kohya(&r["lora_diffusers_name"], KeyStyle::Kohya)
                        .as_deref(),
                    Some(want),
                    "{model}"
                );
            }
        }
    }
}

#[test]
fn oversized_tag_frequency_is_trimmed_to_fit_the_header_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = load(&golden("lora-sd15"));
    let tags: Vec<String> = (0..2000)
        .map(|i| format!("\"tag number {i}\": {}", 2000 - i))
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert(
        "ss_tag_frequency".to_string(),
        format!("{{\"10_dir\": {{{}}}}}", tags.join(", ")),
    );
    metadata.insert("ss_network_dim".to_string(), "4".to_string());
    let path = dir.path().join("trim.safetensors");
    // Header without tags, plus 20 kB: the 2000 tags (about 50 kB) do not fit.
    let base = dir.path().join("base.safetensors");
    w.save(&base, &SaveOptions::default()).expect("save");
    let base_len = u64::from_le_bytes(
        std::fs::read(&base).expect("read")[..8]
            .try_into()
            .expect("8 bytes"),
    );
    let plain_header = base_len + 20_000;
    let report = w
        .save(
            &path,
            &SaveOptions {
                metadata,
                header_limit: plain_header,
                ..SaveOptions::default()
            },
        )
        .expect("save");
    assert!(report.tag_frequency_trimmed);
    let f = SafetensorsFile::open(&path).expect("open");
    let kept: serde_json::Value =
        serde_json::from_str(&f.metadata()["ss_tag_frequency"]).expect("json");
    let kept = kept["10_dir"].as_object().expect("dir");
    assert!(!kept.is_empty() && kept.len() < 2000);
    // The most frequent tags survive.
    assert_eq!(kept["tag number 0"], 2000);
    assert_eq!(f.metadata()["ss_network_dim"], "4");
    assert_eq!(f.metadata()["sshs_model_hash"], data_section_sha256(&path));
    let header_len = u64::from_le_bytes(
        std::fs::read(&path).expect("read")[..8]
            .try_into()
            .expect("8 bytes"),
    );
    assert!(header_len <= plain_header);
}

#[test]
fn modelspec_keys_name_this_project() {
    let dir = tempfile::tempdir().expect("tempdir");
    let w = load(&golden("lora-sdxl"));
    let path = dir.path().join("spec.safetensors");
    w.save(
        &path,
        &SaveOptions {
            modelspec: Some(sd_formats::metadata::ModelSpecInput {
                family: ModelFamily::Sdxl,
                v_parameterization: false,
                lora: true,
                title: "spec".into(),
                resolution: None,
                date: sd_formats::metadata::iso_date_utc(1_700_000_000),
                extra: BTreeMap::new(),
            }),
            ..SaveOptions::default()
        },
    )
    .expect("save");
    let f = SafetensorsFile::open(&path).expect("open");
    let m = f.metadata();
    assert_eq!(
        m["modelspec.architecture"],
        "stable-diffusion-xl-v1-base/lora"
    );
    assert_eq!(m["modelspec.resolution"], "1024x1024");
    assert!(m["modelspec.implementation_version"].starts_with("sd-rs/"));
    assert!(m.contains_key("sshs_model_hash") && m.contains_key("sshs_legacy_hash"));
}
