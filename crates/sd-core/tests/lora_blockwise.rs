//! Block-wise LR weights and ranks (spec lora-format.md §5.1, §6.1, §6.2): preset values
//! against the reference formulas, block ranks per module on the full-size SD1.5 manifest.

use std::collections::BTreeMap;
use std::io::Read;

use sd_core::lora::blockwise::{BlockArgs, BlockRanks, lr_weights, preset, select_block_modules};
use sd_core::lora::{Layer, LayerKind, NetworkOptions};
use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;

/// sd-scripts `networks/lora.py get_block_lr_weight` with max_len 12, printed by Python
/// (`repr` of each float): `cosine` = `[sin(pi*(i/(n-1))/2) + base for i in reversed(range(n))]`,
/// `sine` the same with `range(n)`, `linear` `i/(n-1) + base`, `reverse_linear` reversed,
/// `zeros` `0.0 + base`.
const REFERENCE: &[(&str, [f64; 12])] = &[
    (
        "sine",
        [
            0.0,
            0.14231483827328514,
            0.28173255684142967,
            0.4154150130018864,
            0.5406408174555976,
            0.654860733945285,
            0.7557495743542583,
            0.8412535328311811,
            0.9096319953545183,
            0.9594929736144974,
            0.9898214418809327,
            1.0,
        ],
    ),
    (
        "sine+.25",
        [
            0.25,
            0.39231483827328517,
            0.5317325568414297,
            0.6654150130018863,
            0.7906408174555976,
            0.904860733945285,
            1.0057495743542582,
            1.091253532831181,
            1.1596319953545184,
            1.2094929736144975,
            1.2398214418809328,
            1.25,
        ],
    ),
    (
        "sine+-0.5",
        [
            -0.5,
            -0.35768516172671483,
            -0.21826744315857033,
            -0.08458498699811362,
            0.040640817455597555,
            0.154860733945285,
            0.25574957435425827,
            0.3412535328311811,
            0.40963199535451833,
            0.45949297361449737,
            0.4898214418809327,
            0.5,
        ],
    ),
    (
        "cosine",
        [
            1.0,
            0.9898214418809327,
            0.9594929736144974,
            0.9096319953545183,
            0.8412535328311811,
            0.7557495743542583,
            0.654860733945285,
            0.5406408174555976,
            0.4154150130018864,
            0.28173255684142967,
            0.14231483827328514,
            0.0,
        ],
    ),
    (
        "cosine+.25",
        [
            1.25,
            1.2398214418809328,
            1.2094929736144975,
            1.1596319953545184,
            1.091253532831181,
            1.0057495743542582,
            0.904860733945285,
            0.7906408174555976,
            0.6654150130018863,
            0.5317325568414297,
            0.39231483827328517,
            0.25,
        ],
    ),
    (
        "cosine+-0.5",
        [
            0.5,
            0.4898214418809327,
            0.45949297361449737,
            0.40963199535451833,
            0.3412535328311811,
            0.25574957435425827,
            0.154860733945285,
            0.040640817455597555,
            -0.08458498699811362,
            -0.21826744315857033,
            -0.35768516172671483,
            -0.5,
        ],
    ),
    (
        "linear",
        [
            0.0,
            0.09090909090909091,
            0.18181818181818182,
            0.2727272727272727,
            0.36363636363636365,
            0.45454545454545453,
            0.5454545454545454,
            0.6363636363636364,
            0.7272727272727273,
            0.8181818181818182,
            0.9090909090909091,
            1.0,
        ],
    ),
    (
        "linear+.25",
        [
            0.25,
            0.34090909090909094,
            0.4318181818181818,
            0.5227272727272727,
            0.6136363636363636,
            0.7045454545454546,
            0.7954545454545454,
            0.8863636363636364,
            0.9772727272727273,
            1.0681818181818183,
            1.1590909090909092,
            1.25,
        ],
    ),
    (
        "linear+-0.5",
        [
            -0.5,
            -0.40909090909090906,
            -0.3181818181818182,
            -0.2272727272727273,
            -0.13636363636363635,
            -0.04545454545454547,
            0.045454545454545414,
            0.13636363636363635,
            0.2272727272727273,
            0.31818181818181823,
            0.40909090909090906,
            0.5,
        ],
    ),
    (
        "reverse_linear",
        [
            1.0,
            0.9090909090909091,
            0.8181818181818182,
            0.7272727272727273,
            0.6363636363636364,
            0.5454545454545454,
            0.45454545454545453,
            0.36363636363636365,
            0.2727272727272727,
            0.18181818181818182,
            0.09090909090909091,
            0.0,
        ],
    ),
    (
        "reverse_linear+.25",
        [
            1.25,
            1.1590909090909092,
            1.0681818181818183,
            0.9772727272727273,
            0.8863636363636364,
            0.7954545454545454,
            0.7045454545454546,
            0.6136363636363636,
            0.5227272727272727,
            0.4318181818181818,
            0.34090909090909094,
            0.25,
        ],
    ),
    (
        "reverse_linear+-0.5",
        [
            0.5,
            0.40909090909090906,
            0.31818181818181823,
            0.2272727272727273,
            0.13636363636363635,
            0.045454545454545414,
            -0.04545454545454547,
            -0.13636363636363635,
            -0.2272727272727273,
            -0.3181818181818182,
            -0.40909090909090906,
            -0.5,
        ],
    ),
    (
        "zeros",
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ),
    (
        "zeros+.25",
        [
            0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25,
        ],
    ),
    (
        "zeros+-0.5",
        [
            -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5,
        ],
    ),
];

#[test]
fn blockwise_presets_equal_the_reference_formulas() {
    for (text, want) in REFERENCE {
        let got = preset(text, 12).expect("valid preset");
        assert_eq!(got.as_slice(), want.as_slice(), "{text}");
    }
}

#[test]
fn blockwise_lr_vector_threshold_and_padding() {
    let w = lr_weights(
        ModelFamily::Sd1,
        Some("linear"),
        Some("0.5"),
        Some("1,,0.2"),
        Some(0.2),
    )
    .expect("valid")
    .expect("given");
    assert_eq!(w.len(), 25);
    // down: linear, values ≤ 0.2 become 0 (i/11 ≤ 0.2 for i = 0, 1, 2)
    assert_eq!(&w[..3], &[0.0, 0.0, 0.0]);
    assert_eq!(w[3], 3.0 / 11.0);
    assert_eq!(w[12], 0.5);
    // up: "1,,0.2" → [1, 0 (empty), 0.2 → 0 by the threshold], padded with 1.0
    assert_eq!(&w[13..16], &[1.0, 0.0, 0.0]);
    assert!(w[16..].iter().all(|&x| x == 1.0));
    assert!(lr_weights(ModelFamily::Sd1, Some("cosinus"), None, None, None).is_err());
    assert_eq!(
        lr_weights(ModelFamily::Sd1, None, None, None, None).expect("valid"),
        None
    );
}

fn read_tsv(name: &str) -> Vec<Vec<String>> {
    let path = sd_testutil::fixture(&format!("manifests/{name}"));
    let file = std::fs::File::open(&path).expect("manifest exists");
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .expect("gzip text");
    text.lines()
        .skip(1)
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

/// Full-size SD1.5 U-Net layers from the Diffusers key manifest.
fn unet_layers() -> Vec<Layer> {
    read_tsv("sd15.diffusers.tsv.gz")
        .into_iter()
        .filter(|r| r[0] == "unet")
        .filter_map(|r| {
            let path = r[1].strip_suffix(".weight")?.to_owned();
            let inner = r[2].trim_start_matches('[').trim_end_matches(']');
            let shape: Vec<usize> = inner
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|d| d.parse().expect("dim"))
                .collect();
            let kind = match shape.len() {
                2 => LayerKind::Linear {
                    in_features: shape[1],
                    out_features: shape[0],
                },
                4 => {
                    let s = if path.contains("downsamplers.0.conv") {
                        2
                    } else {
                        1
                    };
                    let p = if shape[2] == 3 { 1 } else { 0 };
                    LayerKind::Conv2d {
                        in_channels: shape[1],
                        out_channels: shape[0],
                        kernel: [shape[2], shape[3]],
                        stride: [s, s],
                        padding: [p, p],
                    }
                }
                _ => return None,
            };
            Some(Layer { path, kind })
        })
        .collect()
}

/// Manifest U-Net rows: name → (kind, in default network, in conv network, block index).
fn manifest() -> BTreeMap<String, (String, bool, bool, usize)> {
    read_tsv("sd15.lora_modules.tsv.gz")
        .into_iter()
        .filter(|r| r[1] == "unet")
        .map(|r| {
            (
                r[0].clone(),
                (
                    r[3].clone(),
                    r[10] == "1",
                    r[11] == "1",
                    r[19].parse().expect("block index"),
                ),
            )
        })
        .collect()
}

#[test]
fn blockwise_block_dims_give_the_expected_ranks_per_module() {
    let family = ModelFamily::Sd1;
    let layers = unet_layers();
    let rows = manifest();
    let dims: Vec<usize> = (0..25).map(|b| b % 5).collect(); // blocks 5, 10, 15, 20: rank 0
    let alphas: Vec<f32> = (0..25).map(|b| b as f32 * 0.5).collect();
    let conv_dims: Vec<usize> = (0..25).map(|b| (b + 2) % 4).collect();
    let opts = NetworkOptions {
        network_dim: 8,
        network_alpha: 4.0,
        ..NetworkOptions::default()
    };
    for with_conv in [false, true] {
        let args = BlockArgs {
            block_dims: Some(dims.clone()),
            block_alphas: Some(alphas.clone()),
            conv_block_dims: with_conv.then(|| conv_dims.clone()),
            conv_block_alphas: None,
        };
        let blocks = BlockRanks::new(family, &opts, &args, None)
            .expect("valid")
            .expect("block mode");
        let specs = select_block_modules(family, Component::Unet, &layers, &opts, &blocks)
            .expect("selection");
        let mut expected: Vec<&str> = rows
            .iter()
            .filter(|(_, (kind, default, conv, b))| {
                let present = if with_conv { *conv } else { *default };
                let rank = if kind == "conv3x3" {
                    conv_dims[*b]
                } else {
                    dims[*b]
                };
                present && rank > 0
            })
            .map(|(n, _)| n.as_str())
            .collect();
        let mut got: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        expected.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, expected, "with_conv {with_conv}");
        for s in &specs {
            let (kind, _, _, b) = &rows[&s.name];
            assert_eq!(s.block_index as usize, *b, "{}", s.name);
            if kind == "conv3x3" {
                assert_eq!((s.rank, s.alpha), (conv_dims[*b], 1.0), "{}", s.name);
            } else {
                let alpha = if alphas[*b] == 0.0 {
                    dims[*b] as f32
                } else {
                    alphas[*b]
                };
                assert_eq!((s.rank, s.alpha), (dims[*b], alpha), "{}", s.name);
            }
        }
        // Without conv: 12 modules in each of blocks 1, 2, 4, 5, 7, 8, 12, 16..24, less the
        // rank-0 blocks 5 and 20.
        if !with_conv {
            assert_eq!(got.len(), 14 * 12);
        }
    }
}

#[test]
fn blockwise_zero_lr_weight_creates_no_modules() {
    let family = ModelFamily::Sd1;
    let layers = unet_layers();
    let opts = NetworkOptions::default();
    // down block 4 (IN04) and the mid block at weight 0; up via the cosine preset: OUT11 = 0.
    let w = lr_weights(
        family,
        Some("1,1,1,1,0,1,1,1,1,1,1,1"),
        Some("0"),
        Some("cosine"),
        None,
    )
    .expect("valid")
    .expect("given");
    let blocks = BlockRanks::new(family, &opts, &BlockArgs::default(), Some(&w))
        .expect("valid")
        .expect("block mode");
    let specs =
        select_block_modules(family, Component::Unet, &layers, &opts, &blocks).expect("selection");
    let used: std::collections::BTreeSet<i32> = specs.iter().map(|s| s.block_index).collect();
    let want: std::collections::BTreeSet<i32> = [1, 2, 5, 7, 8, 16, 17, 18, 19, 20, 21, 22, 23]
        .into_iter()
        .collect();
    assert_eq!(used, want);
    assert_eq!(specs.len(), 13 * 12);
    assert!(specs.iter().all(|s| s.rank == 4));
}
