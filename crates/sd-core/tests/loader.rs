//! Whole-model loading: every layout of the tiny fixtures gives bitwise the same weights, and a
//! model loaded from a single file reproduces the diffusers U-Net golden.

use std::collections::HashMap;

use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::models::unet::TextTimeCondition;
use sd_formats::family::ModelFamily;
use sd_testutil::{assert_close, fixture};
use tch::{Kind, Tensor};

fn load(rel: &str, config_dir: Option<&str>) -> StableDiffusion {
    let opts = ModelLoadOptions {
        config_dir: config_dir.map(fixture),
        ..Default::default()
    };
    StableDiffusion::load(&fixture(rel), &opts).unwrap_or_else(|e| panic!("loading {rel}: {e}"))
}

/// Every variable of every component, by `component/name`.
fn all_weights(m: &StableDiffusion) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (k, v) in m.unet_vs.variables() {
        out.insert(format!("unet/{k}"), v);
    }
    for slot in &m.text_encoders {
        for (k, v) in slot.vs.variables() {
            out.insert(format!("{}/{k}", slot.component.name()), v);
        }
    }
    for (k, v) in m.vae_vs.variables() {
        out.insert(format!("vae/{k}"), v);
    }
    out
}

fn assert_bitwise_equal(a: &StableDiffusion, b: &StableDiffusion, what: &str) {
    let (wa, wb) = (all_weights(a), all_weights(b));
    let mut ka: Vec<&String> = wa.keys().collect();
    let mut kb: Vec<&String> = wb.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb, "{what}: variable sets differ");
    for (k, ta) in &wa {
        let tb = &wb[k];
        assert_eq!(ta.size(), tb.size(), "{what}: {k}");
        assert!(ta.equal(tb), "{what}: {k} differs");
    }
}

#[test]
fn tiny_sd15_folder_single_file_and_ckpt_load_identically() {
    tch::set_num_threads(1);
    let folder = load("tiny-sd15", None);
    assert_eq!(folder.family, ModelFamily::Sd1);
    assert_eq!(folder.text_encoders.len(), 1);
    let single = load("tiny-sd15.safetensors", Some("tiny-sd15"));
    let ckpt = load("tiny-sd15.ckpt", Some("tiny-sd15"));
    assert_bitwise_equal(&folder, &single, "tiny-sd15 folder vs .safetensors");
    assert_bitwise_equal(&folder, &ckpt, "tiny-sd15 folder vs .ckpt");
    // 682 U-Net + 196 text encoder + 240 VAE variables (fixtures README, key counts).
    assert_eq!(all_weights(&folder).len(), 682 + 196 + 240);
}

#[test]
fn tiny_sd21v_and_sdxl_folders_equal_their_single_files() {
    tch::set_num_threads(1);
    for (dir, file, family, encoders) in [
        ("tiny-sd21v", "tiny-sd21v.safetensors", ModelFamily::Sd2, 1),
        ("tiny-sdxl", "tiny-sdxl.safetensors", ModelFamily::Sdxl, 2),
    ] {
        let folder = load(dir, None);
        let single = load(file, Some(dir));
        assert_eq!(folder.family, family);
        assert_eq!(single.family, family);
        assert_eq!(single.text_encoders.len(), encoders);
        assert_bitwise_equal(&folder, &single, file);
    }
}

#[test]
fn single_file_sdxl_unet_reproduces_the_diffusers_golden() {
    tch::set_num_threads(1);
    let m = load("tiny-sdxl.safetensors", Some("tiny-sdxl"));
    let g: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixture("goldens/unet-sdxl.safetensors"))
            .expect("golden")
            .into_iter()
            .collect();
    let added = TextTimeCondition {
        text_embeds: g["text_embeds"].shallow_clone(),
        time_ids: g["time_ids"].shallow_clone(),
    };
    let out = tch::no_grad(|| {
        m.unet.forward(
            &g["sample"],
            &g["timestep"],
            &g["encoder_hidden_states"],
            Some(&added),
        )
    });
    let values =
        |t: &Tensor| Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32");
    assert_close(
        "unet-sdxl via single file",
        &values(&out),
        &values(&g["noise_pred"]),
        1e-4,
        1e-4,
    );
}

#[test]
fn full_size_preset_does_not_fit_a_tiny_file_and_says_so() {
    let err = StableDiffusion::load(
        &fixture("tiny-sd15.safetensors"),
        &ModelLoadOptions::default(),
    )
    .err()
    .expect("the SD1.5 preset cannot hold tiny weights");
    let msg = err.to_string();
    assert!(msg.contains("shape mismatch for key"), "{msg}");
    assert!(msg.contains("model config directory"), "{msg}");
}

#[test]
fn half_precision_load_keeps_the_kind() {
    let opts = ModelLoadOptions {
        kind: Kind::Half,
        config_dir: Some(fixture("tiny-sd15")),
        ..Default::default()
    };
    let m = StableDiffusion::load(&fixture("tiny-sd15.safetensors"), &opts).expect("loads");
    assert!(
        m.unet_vs
            .variables()
            .values()
            .all(|t| t.kind() == Kind::Half)
    );
    assert!(
        m.vae_vs
            .variables()
            .values()
            .all(|t| t.kind() == Kind::Float),
        "VAE stays f32 by default"
    );
}
