//! Module selection on the full-size layer lists, checked row by row against the manifests that
//! sd-scripts' `create_network` produced (tests/fixtures/manifests/<model>.lora_modules.tsv.gz).

use std::io::Read;

use sd_core::lora::names::{block_index, select_modules};
use sd_core::lora::{Layer, LayerKind, ModuleSpec, NetworkOptions};
use sd_formats::family::ModelFamily;
use sd_formats::keymap::Component;

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

fn parse_shape(s: &str) -> Vec<usize> {
    let inner = s.trim_start_matches('[').trim_end_matches(']');
    if inner.is_empty() {
        return vec![];
    }
    inner.split(',').map(|d| d.parse().expect("dim")).collect()
}

/// Layers of one component from `<model>.diffusers.tsv.gz`: 2-D weights → Linear, 4-D → Conv2d
/// (stride 2 for downsampler convs, padding 1 for 3×3). `conv_proj` turns the 2-D
/// `proj_in`/`proj_out` weights into 1×1 convs (SD2 as trained from a single file).
fn layers(model: &str, component: &str, conv_proj: bool) -> Vec<Layer> {
    read_tsv(&format!("{model}.diffusers.tsv.gz"))
        .into_iter()
        .filter(|r| r[0] == component)
        .filter_map(|r| {
            let path = r[1].strip_suffix(".weight")?.to_owned();
            let shape = parse_shape(&r[2]);
            let is_proj = path.ends_with(".proj_in") || path.ends_with(".proj_out");
            let kind = match shape.len() {
                2 if conv_proj && is_proj && component == "unet" => LayerKind::Conv2d {
                    in_channels: shape[1],
                    out_channels: shape[0],
                    kernel: [1, 1],
                    stride: [1, 1],
                    padding: [0, 0],
                },
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

fn components(family: ModelFamily) -> Vec<(Component, &'static str)> {
    let mut v = vec![(Component::TextEncoder, "text_encoder")];
    if family == ModelFamily::Sdxl {
        v.push((Component::TextEncoder2, "text_encoder_2"));
    }
    v.push((Component::Unet, "unet"));
    v
}

fn network(
    model: &str,
    family: ModelFamily,
    conv: bool,
    conv_proj: bool,
) -> (Vec<ModuleSpec>, Vec<usize>) {
    let opts = NetworkOptions {
        network_dim: 4,
        network_alpha: 1.0,
        conv_dim: conv.then_some(8),
        conv_alpha: None,
    };
    let mut all = Vec::new();
    let mut counts = Vec::new();
    for (c, name) in components(family) {
        let m = select_modules(family, c, &layers(model, name, conv_proj), &opts)
            .expect("selection works");
        counts.push(m.len());
        all.extend(m);
    }
    (all, counts)
}

fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("[{}]", parts.join(","))
}

/// Compares with the manifest; `linear_proj` expects SD2 proj_in/out as Linear (2-D).
fn check(model: &str, family: ModelFamily, conv: bool, conv_proj: bool, linear_proj: bool) {
    let (got, _) = network(model, family, conv, conv_proj);
    let rows: Vec<Vec<String>> = read_tsv(&format!("{model}.lora_modules.tsv.gz"))
        .into_iter()
        .filter(|r| conv || r[10] == "1")
        .collect();
    assert_eq!(got.len(), rows.len(), "{model} conv={conv}: module count");
    for (m, r) in got.iter().zip(&rows) {
        let ctx = format!("{model} conv={conv}: {}", r[0]);
        assert_eq!(m.name, r[0], "{ctx}: name/order");
        let component = match m.component {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
            Component::TextEncoder2 => "text_encoder_2",
            Component::Vae => "vae",
        };
        assert_eq!(component, r[1], "{ctx}");
        assert_eq!(m.container.class_name(), r[2], "{ctx}");
        let is_proj = m.layer_path.ends_with("proj_in") || m.layer_path.ends_with("proj_out");
        let want_kind = if linear_proj && is_proj && r[3] == "conv1x1" {
            "linear"
        } else {
            r[3].as_str()
        };
        assert_eq!(m.kind().manifest_name(), want_kind, "{ctx}");
        assert_eq!(m.layer.in_dim().to_string(), r[4], "{ctx}");
        assert_eq!(m.layer.out_dim().to_string(), r[5], "{ctx}");
        if let LayerKind::Conv2d {
            kernel,
            stride,
            padding,
            ..
        } = m.layer
        {
            assert_eq!(format!("{}x{}", kernel[0], kernel[1]), r[6], "{ctx}");
            assert_eq!(format!("{}x{}", stride[0], stride[1]), r[7], "{ctx}");
            assert_eq!(format!("{}x{}", padding[0], padding[1]), r[8], "{ctx}");
        } else if want_kind == r[3] {
            assert_eq!(r[6], "-", "{ctx}");
        }
        let (rank, dim_from) = if r[9] == "conv_dim" {
            (8, "conv_dim")
        } else {
            (4, "network_dim")
        };
        assert_eq!(m.rank, rank, "{ctx}: rank from {dim_from}");
        assert_eq!(m.alpha, 1.0, "{ctx}");
        let expect = |s: &str| -> String {
            let dims: Vec<String> = s
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .map(|d| {
                    if d == "r" {
                        rank.to_string()
                    } else {
                        d.to_owned()
                    }
                })
                .collect();
            let dims = if linear_proj && is_proj && dims.len() == 4 {
                dims[..2].to_vec()
            } else {
                dims
            };
            format!("[{}]", dims.join(","))
        };
        assert_eq!(shape_str(&m.down_shape()), expect(&r[12]), "{ctx}: down");
        assert_eq!(shape_str(&m.up_shape()), expect(&r[13]), "{ctx}: up");
        assert_eq!(m.block_index.to_string(), r[19], "{ctx}: block index");
        assert_eq!(block_index(family, &m.name).to_string(), r[19], "{ctx}");
        if family != ModelFamily::Sdxl || m.component != Component::Unet {
            assert_eq!(
                format!("{}.weight", m.layer_path),
                r[14],
                "{ctx}: wrapped layer"
            );
        }
    }
}

#[test]
fn sd15_modules_match_the_manifest() {
    check("sd15", ModelFamily::Sd1, false, false, false);
    check("sd15", ModelFamily::Sd1, true, false, false);
    assert_eq!(network("sd15", ModelFamily::Sd1, false, false).1, [72, 192]);
    assert_eq!(network("sd15", ModelFamily::Sd1, true, false).1, [72, 278]);
}

#[test]
fn sd21_modules_match_the_manifest_with_both_projection_kinds() {
    // Single-file training: proj_in/proj_out are 1×1 convs (what the manifest lists).
    check("sd21v", ModelFamily::Sd2, false, true, false);
    check("sd21v", ModelFamily::Sd2, true, true, false);
    // Diffusers-format model: the same names and order, proj_in/proj_out Linear.
    check("sd21v", ModelFamily::Sd2, false, false, true);
    check("sd21v", ModelFamily::Sd2, true, false, true);
    assert_eq!(
        network("sd21v", ModelFamily::Sd2, false, true).1,
        [138, 192]
    );
    assert_eq!(
        network("sd21v", ModelFamily::Sd2, true, false).1,
        [138, 278]
    );
}

#[test]
fn sdxl_modules_match_the_manifest() {
    check("sdxl", ModelFamily::Sdxl, false, false, false);
    check("sdxl", ModelFamily::Sdxl, true, false, false);
    assert_eq!(
        network("sdxl", ModelFamily::Sdxl, false, false).1,
        [72, 192, 722]
    );
    assert_eq!(
        network("sdxl", ModelFamily::Sdxl, true, false).1,
        [72, 192, 788]
    );
}

/// The reference extends a class-level target list when a network has a conv rank, so a later
/// network without one also wraps ResNet layers (spec §4.5). Ours decides per call.
#[test]
fn options_are_not_shared_between_networks() {
    let unet = layers("sd15", "unet", false);
    let plain = NetworkOptions::default();
    let first = select_modules(ModelFamily::Sd1, Component::Unet, &unet, &plain).expect("ok");
    let conv = NetworkOptions {
        conv_dim: Some(4),
        ..NetworkOptions::default()
    };
    let with_conv = select_modules(ModelFamily::Sd1, Component::Unet, &unet, &conv).expect("ok");
    let again = select_modules(ModelFamily::Sd1, Component::Unet, &unet, &plain).expect("ok");
    assert_eq!(first.len(), 192);
    assert_eq!(with_conv.len(), 278);
    assert_eq!(
        again, first,
        "a second network must not inherit conv targets"
    );
    assert!(
        again
            .iter()
            .all(|m| m.container.class_name() == "Transformer2DModel")
    );
}

#[test]
fn alpha_zero_means_rank_and_conv_alpha_defaults_to_one() {
    let unet = layers("sd15", "unet", false);
    let opts = NetworkOptions {
        network_dim: 16,
        network_alpha: 0.0,
        conv_dim: Some(8),
        conv_alpha: None,
    };
    let m = select_modules(ModelFamily::Sd1, Component::Unet, &unet, &opts).expect("ok");
    for x in &m {
        match x.kind() {
            sd_core::lora::ModuleKind::Conv => assert_eq!((x.rank, x.alpha), (8, 1.0)),
            _ => assert_eq!((x.rank, x.alpha), (16, 16.0)),
        }
    }
    let none = NetworkOptions {
        network_dim: 0,
        ..NetworkOptions::default()
    };
    assert!(
        select_modules(ModelFamily::Sd1, Component::Unet, &unet, &none)
            .expect("ok")
            .is_empty()
    );
}

#[test]
fn vae_and_foreign_text_encoders_are_refused() {
    assert!(
        select_modules(
            ModelFamily::Sd1,
            Component::Vae,
            &[],
            &NetworkOptions::default()
        )
        .is_err()
    );
    assert!(
        select_modules(
            ModelFamily::Sd1,
            Component::TextEncoder2,
            &[],
            &NetworkOptions::default()
        )
        .is_err()
    );
}
