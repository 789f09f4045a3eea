//! Key tables against the full-size manifests of SD 1.5, SD 2.1-768-v and SDXL base
//! (`tests/fixtures/manifests/`, produced by running sd-scripts' and diffusers' converters).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;

use sd_formats::family::ModelFamily;
use sd_formats::keymap::{
    Component, KeyMap, KeyMapError, LdmFallback, Op, ToDiffusersOp, ToLdmOp, plan_to_diffusers,
    plan_to_ldm,
};

/// Rows of a gzip TSV manifest, header removed.
fn read_tsv(name: &str) -> Vec<Vec<String>> {
    let path = sd_testutil::fixture(&format!("manifests/{name}"));
    let file = std::fs::File::open(&path).expect("open manifest");
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .expect("gunzip manifest");
    text.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect()
}

fn parse_shape(s: &str) -> Vec<usize> {
    let inner = s.trim_start_matches('[').trim_end_matches(']');
    if inner.is_empty() {
        return vec![];
    }
    inner
        .split(',')
        .map(|d| d.parse().expect("shape dim"))
        .collect()
}

fn component(name: &str) -> Component {
    Component::from_name(name).unwrap_or_else(|| panic!("unknown component {name}"))
}

struct LdmRow {
    key: String,
    shape: Vec<usize>,
    op: String,
    source: String,
}

fn ldm_rows(model: &str) -> Vec<LdmRow> {
    read_tsv(&format!("{model}.ldm.tsv.gz"))
        .into_iter()
        .map(|r| LdmRow {
            key: r[0].clone(),
            shape: parse_shape(&r[1]),
            op: r[2].clone(),
            source: r[3].clone(),
        })
        .collect()
}

fn diffusers_rows(model: &str) -> Vec<(Component, String, Vec<usize>)> {
    read_tsv(&format!("{model}.diffusers.tsv.gz"))
        .into_iter()
        .map(|r| (component(&r[0]), r[1].clone(), parse_shape(&r[2])))
        .collect()
}

/// `comp:key + comp:key` -> (component, keys).
fn parse_source(source: &str) -> (Component, Vec<String>) {
    let mut comp = None;
    let mut keys = Vec::new();
    for part in source.split(" + ") {
        let (c, k) = part.split_once(':').expect("component:key");
        let c = component(c);
        assert!(
            comp.is_none() || comp == Some(c),
            "mixed components in {source}"
        );
        comp = Some(c);
        keys.push(k.to_string());
    }
    (comp.expect("non-empty source"), keys)
}

fn check_model(model: &str, family: ModelFamily, counts: &[(&str, usize)], total: usize) {
    let ldm = ldm_rows(model);
    let diff = diffusers_rows(model);
    assert_eq!(ldm.len(), total, "{model}: single-file key count");
    for (prefix, n) in counts {
        let found = ldm.iter().filter(|r| r.key.starts_with(prefix)).count();
        assert_eq!(found, *n, "{model}: keys under {prefix}");
    }

    // Family from the single-file keys.
    let detected = ModelFamily::detect_ldm(ldm.iter().map(|r| (&r.key, &r.shape)), model)
        .expect("family detection");
    assert_eq!(detected, family, "{model}");

    // Table entries equal the manifest's op and source, both ways.
    let map =
        KeyMap::for_ldm_keys(family, ldm.iter().map(|r| r.key.as_str()), model).expect("key map");
    let in_file: BTreeSet<&str> = ldm.iter().map(|r| r.key.as_str()).collect();
    let required: Vec<&str> = map
        .entries()
        .iter()
        .filter(|e| !e.optional)
        .map(|e| e.ldm_key.as_str())
        .collect();
    assert!(
        required.iter().all(|k| in_file.contains(k)),
        "{model}: required keys"
    );
    let optional = map.entries().len() - required.len();
    let optional_present = ldm.len() - required.len();
    assert!(optional_present <= optional, "{model}: optional entries");
    for r in &ldm {
        let e = map
            .lookup_ldm(&r.key)
            .unwrap_or_else(|| panic!("{model}: {} not in the table", r.key));
        match r.op.as_str() {
            "copy" | "reshape" | "concat_rows" => {
                let (c, keys) = parse_source(&r.source);
                assert_eq!(e.component, c, "{}", r.key);
                assert_eq!(e.diffusers_keys, keys, "{}", r.key);
                let expected = match r.op.as_str() {
                    // sd-scripts copies text_projection; we transpose it (see Op::Transpose).
                    "copy" if r.key == "conditioner.embedders.1.model.text_projection" => {
                        Op::Transpose
                    }
                    "copy" => Op::Copy,
                    "reshape" => Op::Reshape,
                    _ => Op::ConcatRows,
                };
                assert_eq!(e.op, expected, "{}", r.key);
                for (i, k) in keys.iter().enumerate() {
                    let (back, pos) = map
                        .lookup_diffusers(c, k)
                        .unwrap_or_else(|| panic!("{model}: {c}:{k} not reachable"));
                    assert_eq!(back.ldm_key, r.key, "{c}:{k} maps back");
                    assert_eq!(pos, i, "{c}:{k} row block");
                }
            }
            "dummy_copy" => {
                let (c, keys) = parse_source(&r.source);
                assert_eq!(e.component, c, "{}", r.key);
                assert_eq!(e.op, Op::LdmOnly(LdmFallback::CopyOf(keys)), "{}", r.key);
            }
            "dummy_constant" => {
                assert!(
                    matches!(e.op, Op::LdmOnly(LdmFallback::Constant { value, .. }) if value == 1.0),
                    "{}: {:?}",
                    r.key,
                    e.op
                );
            }
            "from_checkpoint" => {
                assert_eq!(e.op, Op::LdmOnly(LdmFallback::ReferenceOnly), "{}", r.key);
            }
            other => panic!("unknown op {other}"),
        }
    }

    // Every Diffusers key is the source of exactly the single-file key the manifest says.
    let sourced: BTreeSet<(Component, String)> = ldm
        .iter()
        .filter(|r| matches!(r.op.as_str(), "copy" | "reshape" | "concat_rows"))
        .flat_map(|r| {
            let (c, keys) = parse_source(&r.source);
            keys.into_iter().map(move |k| (c, k))
        })
        .collect();
    let diff_keys: BTreeSet<(Component, String)> =
        diff.iter().map(|(c, k, _)| (*c, k.clone())).collect();
    assert_eq!(
        sourced, diff_keys,
        "{model}: Diffusers keys reached by the single file"
    );

    // LDM -> Diffusers plan gives exactly the Diffusers keys and shapes.
    let plan = plan_to_diffusers(family, ldm.iter().map(|r| (&r.key, &r.shape)), model)
        .expect("plan to diffusers");
    let planned: BTreeSet<(Component, String, Vec<usize>)> = plan
        .components
        .iter()
        .flat_map(|(c, ts)| ts.iter().map(move |t| (*c, t.key.clone(), t.shape.clone())))
        .collect();
    let expected: BTreeSet<(Component, String, Vec<usize>)> = diff.iter().cloned().collect();
    assert_eq!(planned.len(), diff.len(), "{model}: no duplicate targets");
    assert_eq!(planned, expected, "{model}: Diffusers keys and shapes");
    let ldm_only: BTreeSet<&str> = ldm
        .iter()
        .filter(|r| {
            matches!(
                r.op.as_str(),
                "dummy_copy" | "dummy_constant" | "from_checkpoint"
            )
        })
        .map(|r| r.key.as_str())
        .collect();
    assert_eq!(
        plan.ldm_only
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        ldm_only,
        "{model}: keys dropped by LDM -> Diffusers"
    );

    // Diffusers -> LDM plan gives back every single-file key with its shape.
    let back =
        plan_to_ldm(family, diff.iter().map(|(c, k, s)| (*c, k, s)), model).expect("plan to ldm");
    let got: BTreeMap<&str, &Vec<usize>> = back
        .targets
        .iter()
        .map(|t| (t.key.as_str(), &t.shape))
        .collect();
    let want: BTreeMap<&str, &Vec<usize>> =
        ldm.iter().map(|r| (r.key.as_str(), &r.shape)).collect();
    assert_eq!(
        got, want,
        "{model}: single-file keys and shapes from Diffusers"
    );
    for t in &back.targets {
        let r = ldm.iter().find(|r| r.key == t.key).expect("row");
        let sources = |keys: &[String]| {
            keys.iter()
                .map(|k| format!("{}:{k}", t.component))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        match &t.op {
            ToLdmOp::Copy { key } | ToLdmOp::Reshape { key } | ToLdmOp::Transpose { key } => {
                assert_eq!(sources(std::slice::from_ref(key)), r.source, "{}", t.key)
            }
            ToLdmOp::ConcatRows { keys } => assert_eq!(sources(keys), r.source, "{}", t.key),
            ToLdmOp::LdmOnly {
                fallback: LdmFallback::CopyOf(keys),
            } => assert_eq!(sources(keys), r.source, "{}", t.key),
            ToLdmOp::LdmOnly { .. } => {
                assert!(matches!(
                    r.op.as_str(),
                    "dummy_constant" | "from_checkpoint"
                ))
            }
        }
    }

    // LoRA merge targets: the module weight a LoRA changes lands in the single-file key and
    // rows the lora_modules manifest gives.
    let targets: BTreeMap<(Component, &str), (&str, &ToDiffusersOp)> = plan
        .components
        .iter()
        .flat_map(|(c, ts)| {
            ts.iter()
                .map(move |t| ((*c, t.key.as_str()), (t.ldm_key.as_str(), &t.op)))
        })
        .collect();
    let mut checked = 0;
    for r in read_tsv(&format!("{model}.lora_modules.tsv.gz")) {
        let (comp, weight_key, ldm_key, rows) = (component(&r[1]), &r[14], &r[16], &r[17]);
        if family == ModelFamily::Sdxl && comp == Component::Unet {
            // SDXL LoRAs name SAI modules: the module weight is the single-file key itself.
            assert_eq!(&format!("model.diffusion_model.{weight_key}"), ldm_key);
            assert!(map.lookup_ldm(ldm_key).is_some(), "{ldm_key}");
        } else {
            let (key, op) = targets
                .get(&(comp, weight_key.as_str()))
                .unwrap_or_else(|| panic!("{model}: no target {comp}:{weight_key}"));
            assert_eq!(key, ldm_key, "{comp}:{weight_key}");
            match (rows.as_str(), op) {
                ("all", ToDiffusersOp::Copy) => {}
                (rows, ToDiffusersOp::Rows { start, end }) => {
                    assert_eq!(rows, format!("{start}:{end}"), "{comp}:{weight_key}")
                }
                (rows, op) => panic!("{comp}:{weight_key}: rows {rows} but op {op:?}"),
            }
        }
        checked += 1;
    }
    assert!(checked > 200, "{model}: {checked} LoRA modules checked");
}

#[test]
fn sd15_manifest() {
    check_model(
        "sd15",
        ModelFamily::Sd1,
        &[
            ("model.diffusion_model.", 686),
            ("cond_stage_model.transformer.text_model.", 196),
            ("first_stage_model.", 248),
        ],
        1130,
    );
}

#[test]
fn sd21v_manifest() {
    check_model(
        "sd21v",
        ModelFamily::Sd2,
        &[
            ("model.diffusion_model.", 686),
            ("cond_stage_model.model.", 294),
            ("first_stage_model.", 248),
        ],
        1228,
    );
}

#[test]
fn sdxl_manifest() {
    check_model(
        "sdxl",
        ModelFamily::Sdxl,
        &[
            ("model.diffusion_model.", 1680),
            ("conditioner.embedders.0.transformer.text_model.", 196),
            ("conditioner.embedders.1.model.", 390),
            ("first_stage_model.", 248),
        ],
        2514,
    );
}

#[test]
fn diffusers_manifest_counts() {
    for (model, counts) in [
        (
            "sd15",
            vec![("unet", 686), ("text_encoder", 196), ("vae", 248)],
        ),
        (
            "sd21v",
            vec![("unet", 686), ("text_encoder", 372), ("vae", 248)],
        ),
        (
            "sdxl",
            vec![
                ("unet", 1680),
                ("text_encoder", 196),
                ("text_encoder_2", 517),
                ("vae", 248),
            ],
        ),
    ] {
        let rows = diffusers_rows(model);
        for (c, n) in counts {
            let found = rows.iter().filter(|(comp, _, _)| comp.name() == c).count();
            assert_eq!(found, n, "{model} {c}");
        }
    }
}

#[test]
fn structure_read_from_full_size_keys() {
    let ldm = ldm_rows("sdxl");
    let map = KeyMap::for_ldm_keys(
        ModelFamily::Sdxl,
        ldm.iter().map(|r| r.key.as_str()),
        "sdxl",
    )
    .expect("key map");
    let u = map.structure().unet.as_ref().expect("unet");
    assert_eq!((u.levels, u.layers_per_block), (3, 2));
    assert_eq!(u.down_depths, vec![0, 2, 10]);
    assert_eq!(u.mid_depth, 10);
    assert_eq!(u.up_depths, vec![10, 2, 0]);
    assert!(u.add_embedding);
    let te: Vec<(usize, usize)> = map
        .structure()
        .text_encoders
        .iter()
        .map(|t| (t.ldm_layers, t.diffusers_layers))
        .collect();
    assert_eq!(te, vec![(12, 12), (32, 32)]);

    let ldm = ldm_rows("sd21v");
    let map = KeyMap::for_ldm_keys(
        ModelFamily::Sd2,
        ldm.iter().map(|r| r.key.as_str()),
        "sd21v",
    )
    .expect("key map");
    let u = map.structure().unet.as_ref().expect("unet");
    assert_eq!(u.down_depths, vec![1, 1, 1, 0]);
    assert_eq!(u.up_depths, vec![0, 1, 1, 1]);
    let te = &map.structure().text_encoders[0];
    assert_eq!((te.ldm_layers, te.diffusers_layers), (24, 23));
}

#[test]
fn unknown_key_is_unmapped() {
    let mut ldm: Vec<(String, Vec<usize>)> = ldm_rows("sd15")
        .into_iter()
        .map(|r| (r.key, r.shape))
        .collect();
    ldm.push((
        "model.diffusion_model.input_blocks.1.7.weight".to_string(),
        vec![4],
    ));
    ldm.push(("lora_unet_foo.alpha".to_string(), vec![]));
    match plan_to_diffusers(ModelFamily::Sd1, ldm.clone(), "x.safetensors") {
        Err(KeyMapError::UnmappedKeys { path, keys }) => {
            assert_eq!(path, "x.safetensors");
            assert_eq!(
                keys,
                vec![
                    "lora_unet_foo.alpha".to_string(),
                    "model.diffusion_model.input_blocks.1.7.weight".to_string()
                ]
            );
        }
        other => panic!("expected UnmappedKeys, got {other:?}"),
    }
    let msg = plan_to_diffusers(ModelFamily::Sd1, ldm, "x.safetensors")
        .expect_err("unmapped")
        .to_string();
    assert!(msg.contains("2 unmapped key(s) in x.safetensors"), "{msg}");

    let mut diff = diffusers_rows("sd15");
    diff.push((Component::Vae, "encoder.extra.weight".to_string(), vec![1]));
    match plan_to_ldm(ModelFamily::Sd1, diff, "folder") {
        Err(KeyMapError::UnmappedKeys { keys, .. }) => {
            assert_eq!(keys, vec!["vae:encoder.extra.weight".to_string()])
        }
        other => panic!("expected UnmappedKeys, got {other:?}"),
    }
}

#[test]
fn missing_key_is_an_error() {
    let ldm: Vec<(String, Vec<usize>)> = ldm_rows("sd15")
        .into_iter()
        .filter(|r| r.key != "model.diffusion_model.out.2.bias")
        .map(|r| (r.key, r.shape))
        .collect();
    match plan_to_diffusers(ModelFamily::Sd1, ldm, "x") {
        Err(KeyMapError::MissingKeys { keys, .. }) => {
            assert_eq!(keys, vec!["model.diffusion_model.out.2.bias".to_string()])
        }
        other => panic!("expected MissingKeys, got {other:?}"),
    }
}

#[test]
fn ignorable_extras_and_old_text_encoder_layout() {
    let mut ldm: Vec<(String, Vec<usize>)> = ldm_rows("sd15")
        .into_iter()
        .map(|r| {
            // Older SD1 files lack the `text_model.` level.
            let k = r.key.replace(
                "cond_stage_model.transformer.text_model.",
                "cond_stage_model.transformer.",
            );
            (k, r.shape)
        })
        .collect();
    for extra in [
        "betas",
        "alphas_cumprod",
        "model_ema.num_updates",
        "cond_stage_model.transformer.embeddings.position_ids",
    ] {
        ldm.push((extra.to_string(), vec![1000]));
    }
    let plan = plan_to_diffusers(ModelFamily::Sd1, ldm, "old.ckpt").expect("plan");
    assert_eq!(plan.ignored.len(), 4);
    let te = plan.targets(Component::TextEncoder);
    assert_eq!(te.len(), 196);
    let t = te
        .iter()
        .find(|t| t.key == "text_model.final_layer_norm.weight")
        .expect("final_layer_norm");
    assert_eq!(
        t.ldm_key,
        "cond_stage_model.transformer.final_layer_norm.weight"
    );
}

#[test]
fn shape_errors() {
    let mut ldm: Vec<(String, Vec<usize>)> = ldm_rows("sd21v")
        .into_iter()
        .map(|r| (r.key, r.shape))
        .collect();
    let k = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
    ldm.iter_mut().find(|(key, _)| key == k).expect("key").1 = vec![3073, 1024];
    match plan_to_diffusers(ModelFamily::Sd2, ldm, "bad") {
        Err(KeyMapError::ShapeMismatch { key, found, .. }) => {
            assert_eq!(key, k);
            assert_eq!(found, vec![3073, 1024]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}
