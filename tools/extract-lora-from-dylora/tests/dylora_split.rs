//! `extract-lora-from-dylora` against the reference's split of `lora/dylora-sd15.safetensors`
//! (rank 8, unit 4; tests/fixtures/README.md §5f–h).

use std::path::Path;
use std::process::Command;

use sd_formats::hashes::sshs_hashes;
use sd_formats::safetensors::{SafetensorsFile, TensorToWrite, write_safetensors};
use sd_testutil::fixture;

fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_extract-lora-from-dylora"))
}

fn open(p: &Path) -> SafetensorsFile {
    SafetensorsFile::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The sshs hashes a file's own tensors and metadata give.
fn own_hashes(f: &SafetensorsFile, path: &Path) -> (String, String) {
    let tensors: Vec<TensorToWrite<'_>> = f
        .names()
        .iter()
        .map(|n| {
            let i = f.info(n).expect("listed");
            TensorToWrite::new(
                n.clone(),
                i.dtype,
                i.shape.clone(),
                f.data(n).expect("data"),
            )
        })
        .collect();
    let mut meta = f.metadata().clone();
    meta.remove("sshs_model_hash");
    meta.remove("sshs_legacy_hash");
    let h = sshs_hashes(path, &tensors, &meta).expect("hashes");
    (h.model_hash, h.legacy_hash)
}

#[test]
fn dylora_split_unit4_equals_reference() {
    let input = fixture("lora/dylora-sd15.safetensors");
    let golden = open(&fixture(
        "goldens/lora-tools/dylora-sd15-split-0004.safetensors",
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let save_to = dir.path().join("sub/dy.safetensors");
    let out = tool()
        .args([
            "--model",
            input.to_str().expect("utf-8"),
            "--unit",
            "4",
            "--save_to",
        ])
        .arg(&save_to)
        .output()
        .expect("run tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Rank 8 = the full rank is not written, as the reference.
    let mut files: Vec<String> = std::fs::read_dir(dir.path().join("sub"))
        .expect("output dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["dy-0004.safetensors"]);
    let path = dir.path().join("sub/dy-0004.safetensors");
    let ours = open(&path);
    assert_eq!(ours.sorted_names(), golden.sorted_names());
    assert_eq!(ours.len(), 792);
    for n in golden.names() {
        assert_eq!(ours.info(n), golden.info(n), "{n}");
        assert_eq!(
            ours.data(n).expect("ours"),
            golden.data(n).expect("golden"),
            "{n}"
        );
    }
    let m = ours.metadata();
    let g = golden.metadata();
    for k in g.keys().filter(|k| !k.starts_with("sshs_")) {
        assert_eq!(m.get(k), g.get(k), "metadata {k}");
    }
    assert_eq!(m["ss_network_dim"], "4");
    assert_eq!(m["ss_training_comment"], "split from DyLoRA, rank 8 to 4; ");
    // Our own hashes (the reference carries the source file's, a bug).
    let (model, legacy) = own_hashes(&ours, &path);
    assert_eq!(m["sshs_model_hash"], model);
    assert_eq!(m["sshs_legacy_hash"], legacy);
    assert_ne!(m["sshs_model_hash"], g["sshs_model_hash"]);
}

#[test]
fn dylora_split_without_metadata_and_unit_from_metadata() {
    let input = open(&fixture("lora/dylora-sd15.safetensors"));
    let dir = tempfile::tempdir().expect("tempdir");
    let bare = dir.path().join("bare.safetensors");
    let tensors: Vec<TensorToWrite<'_>> = input
        .names()
        .iter()
        .map(|n| {
            let i = input.info(n).expect("listed");
            TensorToWrite::new(
                n.clone(),
                i.dtype,
                i.shape.clone(),
                input.data(n).expect("data"),
            )
        })
        .collect();
    write_safetensors(&bare, &tensors, None).expect("write bare file");
    // unit 2: ranks 2, 4, 6.
    let out = tool()
        .arg("--model")
        .arg(&bare)
        .args(["--unit", "2", "--save_to"])
        .arg(dir.path().join("o.safetensors"))
        .output()
        .expect("run tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut hashes = Vec::new();
    for k in [2usize, 4, 6] {
        let p = dir.path().join(format!("o-{k:04}.safetensors"));
        let f = open(&p);
        assert_eq!(f.metadata()["ss_network_dim"], k.to_string());
        assert_eq!(
            f.metadata()["ss_training_comment"],
            format!("split from DyLoRA, rank 8 to {k}; ")
        );
        let name = "lora_unet_down_blocks_0_attentions_0_proj_in";
        assert_eq!(
            f.info(&format!("{name}.lora_down.weight"))
                .expect("down")
                .shape[0],
            k
        );
        assert_eq!(
            f.info(&format!("{name}.lora_up.weight")).expect("up").shape[1],
            k
        );
        let (model, _) = own_hashes(&f, &p);
        assert_eq!(f.metadata()["sshs_model_hash"], model);
        hashes.push(model);
    }
    hashes.dedup();
    assert_eq!(hashes.len(), 3);
    // Without --unit the file's ss_network_args {"unit": "4"} is used; a bare file has none.
    let out = tool()
        .arg("--model")
        .arg(fixture("lora/dylora-sd15.safetensors"))
        .arg("--save_to")
        .arg(dir.path().join("m.safetensors"))
        .output()
        .expect("run tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("m-0004.safetensors").exists());
    let out = tool()
        .arg("--model")
        .arg(&bare)
        .arg("--save_to")
        .arg(dir.path().join("n.safetensors"))
        .output()
        .expect("run tool");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--unit not given"));
}
