//! Full-size U-Nets and VAEs (SD1.5, SD2.1-v, SDXL) built from the presets have exactly the
//! parameter names and shapes of the reference manifests
//! (`tests/fixtures/manifests/<model>.diffusers.tsv.gz`, made by diffusers 0.32.1 on the meta
//! device).
//!
//! No weights are allocated for real: the model constructors create their variables with
//! `Tensor::empty`, whose pages are never touched, so the process's resident set grows by a
//! few MB while the models' virtual size is gigabytes. The test measures `VmRSS` to keep it so.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};

use sd_core::models::unet::{Unet, UnetConfig};
use sd_core::models::vae::{Vae, VaeConfig};
use sd_testutil::fixture;
use tch::{Device, nn::VarStore};

/// `key → shape` of one component of a manifest.
fn manifest(model: &str, component: &str) -> BTreeMap<String, Vec<i64>> {
    let path = fixture(&format!("manifests/{model}.diffusers.tsv.gz"));
    let file = std::fs::File::open(&path).expect("manifest readable");
    let mut out = BTreeMap::new();
    for (i, line) in BufReader::new(flate2::read::GzDecoder::new(file))
        .lines()
        .enumerate()
    {
        let line = line.expect("gzip text");
        if i == 0 {
            assert_eq!(line, "component\tkey\tshape", "{}: header", path.display());
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 3, "{}: line {}", path.display(), i + 1);
        if cols[0] != component {
            continue;
        }
        let dims = cols[2].trim_start_matches('[').trim_end_matches(']');
        let shape = if dims.is_empty() {
            vec![]
        } else {
            dims.split(',').map(|d| d.parse().expect("dim")).collect()
        };
        out.insert(cols[1].to_owned(), shape);
    }
    assert!(
        !out.is_empty(),
        "{}: no rows for {component}",
        path.display()
    );
    out
}

fn shapes(vs: &VarStore) -> BTreeMap<String, Vec<i64>> {
    vs.variables()
        .into_iter()
        .map(|(k, v)| (k, v.size()))
        .collect()
}

/// Resident set size of this process in KiB (Linux), `None` elsewhere.
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn assert_same(
    what: &str,
    actual: &BTreeMap<String, Vec<i64>>,
    expected: &BTreeMap<String, Vec<i64>>,
) {
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !actual.contains_key(*k))
        .collect();
    let extra: Vec<_> = actual
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter_map(|(k, s)| {
            actual
                .get(k)
                .filter(|a| *a != s)
                .map(|a| format!("{k}: {a:?} != {s:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{what}: missing {missing:?}\nextra {extra:?}\nwrong shapes {wrong:?}"
    );
}

fn check(model: &str, unet: UnetConfig, vae: VaeConfig) {
    let before = rss_kib();
    let unet_vs = VarStore::new(Device::Cpu);
    let _unet = Unet::new(&unet_vs.root(), &unet).expect("preset is valid");
    let vae_vs = VarStore::new(Device::Cpu);
    let _vae = Vae::new(&vae_vs.root(), &vae).expect("preset is valid");
    let after = rss_kib();

    let unet_shapes = shapes(&unet_vs);
    assert_same(
        &format!("{model} unet"),
        &unet_shapes,
        &manifest(model, "unet"),
    );
    assert_same(
        &format!("{model} vae"),
        &shapes(&vae_vs),
        &manifest(model, "vae"),
    );

    let params: i64 = unet_shapes
        .values()
        .map(|s| s.iter().product::<i64>())
        .sum();
    if let (Some(b), Some(a)) = (before, after) {
        let grown_mib = a.saturating_sub(b) / 1024;
        let virtual_mib = params * 4 / (1024 * 1024);
        // Tests in this binary run in parallel threads; 256 MiB bounds all of them together
        // while the U-Nets alone would need 3.3–9.8 GiB if the pages were touched.
        println!(
            "{model}: building U-Net + VAE grew RSS by {grown_mib} MiB; U-Net parameters {virtual_mib} MiB in f32"
        );
        assert!(
            grown_mib < 256,
            "{model}: building grew RSS by {grown_mib} MiB (model is {virtual_mib} MiB)"
        );
    }
}

#[test]
fn sd15_full_size_names_and_shapes() {
    check("sd15", UnetConfig::sd15(), VaeConfig::sd());
}

#[test]
fn sd21v_full_size_names_and_shapes() {
    check("sd21v", UnetConfig::sd21(), VaeConfig::sd());
}

#[test]
fn sdxl_full_size_names_and_shapes() {
    check("sdxl", UnetConfig::sdxl(), VaeConfig::sdxl());
}
