//! Full-size text encoders: the module trees built from the full-size configs have exactly the
//! parameter names and shapes of `tests/fixtures/manifests/*.diffusers.tsv.gz` (built by
//! diffusers/transformers on PyTorch's meta device), without allocating the weights' memory.

use std::collections::BTreeMap;
use std::io::Read;

use sd_core::models::text_encoder::{ClipTextConfig, ClipTextModel};
use tch::{Device, Kind, nn};

fn manifest(file: &str, component: &str) -> BTreeMap<String, Vec<i64>> {
    let path = sd_testutil::fixture(&format!("manifests/{file}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).expect("open manifest"))
        .read_to_string(&mut text)
        .expect("gunzip manifest");
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split('\t');
            let (comp, key, shape) = (cols.next()?, cols.next()?, cols.next()?);
            (comp == component).then(|| {
                let dims = shape
                    .trim_matches(['[', ']'])
                    .split(',')
                    .filter(|s| !s.is_empty());
                (
                    key.to_owned(),
                    dims.map(|d| d.parse().expect("dim")).collect(),
                )
            })
        })
        .collect()
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("rss field")
        .parse()
        .expect("rss");
    pages * 4096
}

fn check(file: &str, component: &str, config: ClipTextConfig) {
    let expected = manifest(file, component);
    assert!(!expected.is_empty(), "{file} has no {component} rows");
    let before = resident_bytes();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ClipTextModel::new_with_kind(&vs.root(), &config, Kind::Float);
    let grown = resident_bytes().saturating_sub(before);
    let actual: BTreeMap<String, Vec<i64>> = vs
        .variables()
        .into_iter()
        .map(|(k, t)| (k, t.size()))
        .collect();
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{component}: missing {missing:?}, extra {extra:?}"
    );
    for (k, shape) in &expected {
        assert_eq!(&actual[k], shape, "{component} {k}");
    }
    let bytes: i64 = actual.values().map(|s| s.iter().product::<i64>() * 4).sum();
    // Parameters are `Tensor::empty` and never touched: resident memory stays far below size.
    assert!(
        grown < 64 << 20,
        "{component}: building {bytes} bytes of f32 parameters grew RSS by {grown} bytes"
    );
    drop(model);
}

#[test]
fn sd15_clip_vit_l14_matches_manifest() {
    check(
        "sd15.diffusers.tsv.gz",
        "text_encoder",
        ClipTextConfig::clip_vit_l14(),
    );
}

#[test]
fn sd21v_open_clip_vit_h14_matches_manifest() {
    check(
        "sd21v.diffusers.tsv.gz",
        "text_encoder",
        ClipTextConfig::open_clip_vit_h14(),
    );
}

#[test]
fn sdxl_text_encoders_match_manifest() {
    check(
        "sdxl.diffusers.tsv.gz",
        "text_encoder",
        ClipTextConfig::clip_vit_l14(),
    );
    check(
        "sdxl.diffusers.tsv.gz",
        "text_encoder_2",
        ClipTextConfig::open_clip_vit_bigg14(),
    );
}
