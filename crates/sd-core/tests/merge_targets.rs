//! Every LoRA module of the full-size SD1.5, SD2.1-v and SDXL models maps to the single-file
//! key and row slice the reference modifies (manifests `<model>.lora_modules.tsv.gz`, columns
//! `lora_name`, `ldm_key`, `ldm_rows`, `ldm_shape`).

use std::io::Read;

use sd_core::merge::targets::lora_targets;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::KeyMap;
use sd_testutil::fixture;

fn tsv(name: &str) -> Vec<Vec<String>> {
    let path = fixture(&format!("manifests/{name}"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&path).expect("manifest"))
        .read_to_string(&mut text)
        .expect("gzip text");
    text.lines()
        .map(|l| l.split('\t').map(str::to_owned).collect())
        .collect()
}

fn check(model: &str, family: ModelFamily, expected_modules: usize) {
    let ldm = tsv(&format!("{model}.ldm.tsv.gz"));
    let key_col = ldm[0].iter().position(|c| c == "key").expect("key column");
    let keys: Vec<&str> = ldm[1..].iter().map(|r| r[key_col].as_str()).collect();
    let map = KeyMap::for_ldm_keys(family, keys.iter().copied(), model).expect("key table");
    let targets = lora_targets(&map);

    let rows = tsv(&format!("{model}.lora_modules.tsv.gz"));
    let col = |n: &str| rows[0].iter().position(|c| c == n).expect(n);
    let (name, key, slice, shape) = (
        col("lora_name"),
        col("ldm_key"),
        col("ldm_rows"),
        col("ldm_shape"),
    );
    let mut checked = 0;
    for r in &rows[1..] {
        let t = targets
            .get(&r[name])
            .unwrap_or_else(|| panic!("{model}: no target for {}", r[name]));
        assert_eq!(t.key, r[key], "{model}: {}", r[name]);
        let first_dim: usize = r[shape]
            .trim_matches(['[', ']'])
            .split(',')
            .next()
            .and_then(|d| d.parse().ok())
            .expect("shape");
        let got = match t.row_range(first_dim) {
            None => "all".to_string(),
            Some((a, b)) => format!("{a}:{b}"),
        };
        assert_eq!(got, r[slice], "{model}: rows of {}", r[name]);
        checked += 1;
    }
    assert_eq!(checked, expected_modules, "{model}: module rows");
}

#[test]
fn sd15_modules_map_to_their_keys() {
    check("sd15", ModelFamily::Sd1, 350);
}

#[test]
fn sd21v_modules_map_to_their_keys_and_qkv_rows() {
    check("sd21v", ModelFamily::Sd2, 416);
}

#[test]
fn sdxl_modules_map_to_their_keys_and_qkv_rows() {
    check("sdxl", ModelFamily::Sdxl, 1052);
}
