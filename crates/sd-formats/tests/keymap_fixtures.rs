//! Key tables on the tiny fixture models: every tensor of each single file maps to a Diffusers
//! tensor of the folder with the right shape and the same bytes, and back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use ::safetensors::SafeTensors;
use sd_formats::diffusers::{DiffusersModel, WeightFormat};
use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, ToDiffusersOp, ToLdmOp, plan_to_diffusers, plan_to_ldm};

/// (dtype name, shape, bytes) per key.
type Tensors = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

fn read(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

struct Fixture {
    single: Tensors,
    folder: BTreeMap<Component, Tensors>,
}

fn load(name: &str) -> Fixture {
    let single = read(&sd_testutil::fixture(&format!("{name}.safetensors")));
    let model = DiffusersModel::open(sd_testutil::fixture(name)).expect("open folder");
    let mut folder = BTreeMap::new();
    for c in Component::ALL {
        if model.has(c) {
            let w = model.weights(c, None).expect("weights");
            assert_eq!(w.format, WeightFormat::Safetensors);
            folder.insert(c, read(&w.path));
        }
    }
    Fixture { single, folder }
}

/// Bytes of a 2-D transpose of `rows x cols` elements of `elem` bytes.
fn transpose(data: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let src = (r * cols + c) * elem;
            let dst = (c * rows + r) * elem;
            out[dst..dst + elem].copy_from_slice(&data[src..src + elem]);
        }
    }
    out
}

fn check(name: &str, family: ModelFamily, counts: &[(Component, usize)], single_count: usize) {
    let fx = load(name);
    assert_eq!(fx.single.len(), single_count, "{name}: single-file keys");
    for (c, n) in counts {
        assert_eq!(fx.folder[c].len(), *n, "{name}: {c} keys");
    }

    // Family from the single file and from the folder.
    let detected = ModelFamily::detect_ldm(fx.single.iter().map(|(k, (_, s, _))| (k, s)), name)
        .expect("detect");
    assert_eq!(detected, family, "{name} single file");
    let model = DiffusersModel::open(sd_testutil::fixture(name)).expect("open");
    assert_eq!(model.family().expect("family"), family, "{name} folder");

    // Single file -> Diffusers: same key sets, shapes and bytes.
    let plan = plan_to_diffusers(family, fx.single.iter().map(|(k, (_, s, _))| (k, s)), name)
        .expect("plan to diffusers");
    assert!(plan.ignored.is_empty());
    assert_eq!(
        plan.components.keys().collect::<Vec<_>>(),
        fx.folder.keys().collect::<Vec<_>>(),
        "{name}: components"
    );
    for (c, targets) in &plan.components {
        let comp = &fx.folder[c];
        let planned: BTreeSet<&str> = targets.iter().map(|t| t.key.as_str()).collect();
        let have: BTreeSet<&str> = comp.keys().map(String::as_str).collect();
        assert_eq!(planned, have, "{name}: {c} key set");
        for t in targets {
            let (dtype, shape, data) = &comp[&t.key];
            assert_eq!(&t.shape, shape, "{name}: {c}:{}", t.key);
            let (ldm_dtype, ldm_shape, ldm_data) = &fx.single[&t.ldm_key];
            assert_eq!(dtype, ldm_dtype, "{}", t.key);
            assert_eq!(&t.ldm_shape, ldm_shape);
            let elem = data.len() / shape.iter().product::<usize>().max(1);
            let built: Vec<u8> = match &t.op {
                ToDiffusersOp::Copy | ToDiffusersOp::Reshape => ldm_data.clone(),
                ToDiffusersOp::Transpose => transpose(ldm_data, ldm_shape[0], ldm_shape[1], elem),
                ToDiffusersOp::Rows { start, end } => {
                    let row = ldm_data.len() / ldm_shape[0];
                    ldm_data[start * row..end * row].to_vec()
                }
            };
            assert!(
                &built == data,
                "{name}: {c}:{} built from {} ({:?}) differs",
                t.key,
                t.ldm_key,
                t.op
            );
        }
    }

    // Diffusers -> single file: same keys and shapes; data equal except LDM-only keys.
    let back = plan_to_ldm(
        family,
        fx.folder
            .iter()
            .flat_map(|(c, ts)| ts.iter().map(move |(k, (_, s, _))| (*c, k, s))),
        name,
    )
    .expect("plan to ldm");
    let got: BTreeMap<&str, &Vec<usize>> = back
        .targets
        .iter()
        .map(|t| (t.key.as_str(), &t.shape))
        .collect();
    let want: BTreeMap<&str, &Vec<usize>> = fx
        .single
        .iter()
        .map(|(k, (_, s, _))| (k.as_str(), s))
        .collect();
    assert_eq!(got, want, "{name}: single-file keys and shapes");
    for t in &back.targets {
        let comp = &fx.folder[&t.component];
        let built: Vec<u8> = match &t.op {
            ToLdmOp::Copy { key } | ToLdmOp::Reshape { key } => comp[key].2.clone(),
            ToLdmOp::Transpose { key } => {
                let (_, s, d) = &comp[key];
                transpose(d, s[0], s[1], d.len() / (s[0] * s[1]))
            }
            ToLdmOp::ConcatRows { keys } => keys.iter().flat_map(|k| comp[k].2.clone()).collect(),
            ToLdmOp::LdmOnly { .. } => continue,
        };
        assert!(built == fx.single[&t.key].2, "{name}: {} differs", t.key);
    }
}

#[test]
fn tiny_sd15() {
    check(
        "tiny-sd15",
        ModelFamily::Sd1,
        &[
            (Component::Unet, 682),
            (Component::TextEncoder, 196),
            (Component::Vae, 240),
        ],
        1118,
    );
}

#[test]
fn tiny_sd21v() {
    // 682 + 294 OpenCLIP keys (24 resblocks, text_projection, logit_scale) + 244.
    check(
        "tiny-sd21v",
        ModelFamily::Sd2,
        &[
            (Component::Unet, 682),
            (Component::TextEncoder, 372),
            (Component::Vae, 244),
        ],
        682 + 294 + 244,
    );
}

#[test]
fn tiny_sdxl() {
    // 836 + 196 + 32 * 12 + 6 (token/pos embedding, ln_final, text_projection, logit_scale) + 240.
    check(
        "tiny-sdxl",
        ModelFamily::Sdxl,
        &[
            (Component::Unet, 836),
            (Component::TextEncoder, 196),
            (Component::TextEncoder2, 517),
            (Component::Vae, 240),
        ],
        836 + 196 + 390 + 240,
    );
}

#[test]
fn tiny_sdxl_structure() {
    let fx = load("tiny-sdxl");
    let plan = plan_to_diffusers(
        ModelFamily::Sdxl,
        fx.single.iter().map(|(k, (_, s, _))| (k, s)),
        "tiny-sdxl",
    )
    .expect("plan");
    let u = plan.structure.unet.expect("unet");
    assert_eq!(u.down_depths, vec![0, 2, 3]);
    assert_eq!(u.mid_depth, 3);
    assert_eq!(u.up_depths, vec![3, 2, 0]);
    assert_eq!(
        plan.ldm_only,
        vec!["conditioner.embedders.1.model.logit_scale".to_string()]
    );
}
