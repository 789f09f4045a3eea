//! Diffusers folders: model_index.json, configs, weight paths, family detection and errors.

use sd_formats::diffusers::{DiffusersModel, WeightFormat};
use sd_formats::family::{ModelFamily, PredictionType};
use sd_formats::keymap::{Component, KeyMapError};

fn open(name: &str) -> DiffusersModel {
    DiffusersModel::open(sd_testutil::fixture(name)).expect("open")
}

#[test]
fn folder_families_and_components() {
    let sd15 = open("tiny-sd15");
    assert_eq!(sd15.family().expect("family"), ModelFamily::Sd1);
    assert_eq!(sd15.class_name(), Some("StableDiffusionPipeline"));
    assert!(sd15.has(Component::Unet) && sd15.has(Component::Vae));
    assert!(!sd15.has(Component::TextEncoder2));
    assert_eq!(
        sd15.component_names().collect::<Vec<_>>(),
        vec!["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    );

    let sd21 = open("tiny-sd21v");
    assert_eq!(sd21.family().expect("family"), ModelFamily::Sd2);
    assert_eq!(
        sd21.scheduler_prediction_type().expect("scheduler"),
        Some(PredictionType::VPrediction)
    );
    assert_eq!(
        sd15.scheduler_prediction_type().expect("scheduler"),
        Some(PredictionType::Epsilon)
    );

    let sdxl = open("tiny-sdxl");
    assert_eq!(sdxl.family().expect("family"), ModelFamily::Sdxl);
    assert_eq!(
        sdxl.component_class("text_encoder_2"),
        Some((Some("transformers"), Some("CLIPTextModelWithProjection")))
    );
}

#[test]
fn config_accessors() {
    let sdxl = open("tiny-sdxl");
    let u = sdxl.unet_config().expect("unet config");
    assert_eq!(u.block_out_channels().expect("boc"), vec![32, 32, 32]);
    assert_eq!(u.layers_per_block().expect("lpb"), 2);
    assert_eq!(
        u.transformer_layers_per_block().expect("tlpb"),
        vec![1, 2, 3]
    );
    assert_eq!(u.cross_attention_dim().expect("ctx"), 40);
    assert_eq!(
        u.addition_embed_type().expect("aet").as_deref(),
        Some("text_time")
    );
    assert_eq!(
        u.projection_class_embeddings_input_dim().expect("pcei"),
        Some(120)
    );
    assert_eq!(u.addition_time_embed_dim().expect("atd"), Some(16));
    assert!(u.use_linear_projection().expect("ulp"));
    let te2 = sdxl
        .text_encoder_config(Component::TextEncoder2)
        .expect("te2");
    assert_eq!(te2.hidden_size().expect("w"), 24);
    assert_eq!(te2.num_hidden_layers().expect("l"), 32);
    assert_eq!(te2.num_attention_heads().expect("h"), 3);
    assert_eq!(te2.intermediate_size().expect("i"), 96);
    assert_eq!(te2.hidden_act().expect("act"), "gelu");
    assert_eq!(te2.projection_dim().expect("p"), 24);
    let vae = sdxl.vae_config().expect("vae");
    assert_eq!(vae.latent_channels().expect("lc"), 4);
    assert_eq!(vae.scaling_factor().expect("sf"), 0.13025);

    let sd21 = open("tiny-sd21v");
    let u = sd21.unet_config().expect("unet");
    assert_eq!(u.attention_heads().expect("heads"), vec![4, 4, 4, 4]);
    assert!(u.upcast_attention().expect("upcast"));
    assert_eq!(u.addition_embed_type().expect("aet"), None);
    assert_eq!(u.sample_size().expect("ss"), 8);
    assert_eq!(
        sd21.vae_config()
            .expect("vae")
            .scaling_factor()
            .expect("sf"),
        0.18215
    );
    let te = sd21
        .text_encoder_config(Component::TextEncoder)
        .expect("te");
    assert_eq!(te.num_hidden_layers().expect("l"), 23);

    let sd15 = open("tiny-sd15");
    let te = sd15
        .text_encoder_config(Component::TextEncoder)
        .expect("te");
    assert_eq!(te.hidden_act().expect("act"), "quick_gelu");
    assert!(
        !sd15
            .unet_config()
            .expect("unet")
            .use_linear_projection()
            .expect("ulp")
    );
}

#[test]
fn weight_paths() {
    let sdxl = open("tiny-sdxl");
    for (c, file) in [
        (Component::Unet, "unet/diffusion_pytorch_model.safetensors"),
        (Component::TextEncoder, "text_encoder/model.safetensors"),
        (Component::TextEncoder2, "text_encoder_2/model.safetensors"),
        (Component::Vae, "vae/diffusion_pytorch_model.safetensors"),
    ] {
        let w = sdxl.weights(c, None).expect("weights");
        assert_eq!(w.path, sdxl.dir().join(file));
        assert_eq!(w.format, WeightFormat::Safetensors);
        // Without an fp16 file, asking for the variant falls back to the plain name.
        assert_eq!(sdxl.weights(c, Some("fp16")).expect("weights").path, w.path);
    }
}

#[test]
fn variants_and_bin_fallback() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "safety_checker": [null, null]}"#,
    )
    .expect("write");
    for d in ["unet", "vae"] {
        std::fs::create_dir(dir.path().join(d)).expect("mkdir");
    }
    std::fs::write(
        dir.path()
            .join("unet/diffusion_pytorch_model.fp16.safetensors"),
        b"",
    )
    .expect("w");
    std::fs::write(
        dir.path().join("unet/diffusion_pytorch_model.safetensors"),
        b"",
    )
    .expect("w");
    std::fs::write(dir.path().join("vae/diffusion_pytorch_model.bin"), b"").expect("w");
    let m = DiffusersModel::open(dir.path()).expect("open");
    assert!(!m.component_names().any(|n| n == "safety_checker"));
    let unet = m.weights(Component::Unet, Some("fp16")).expect("unet");
    assert!(
        unet.path
            .ends_with("unet/diffusion_pytorch_model.fp16.safetensors")
    );
    let unet = m.weights(Component::Unet, None).expect("unet");
    assert!(
        unet.path
            .ends_with("unet/diffusion_pytorch_model.safetensors")
    );
    let vae = m.weights(Component::Vae, None).expect("vae");
    assert_eq!(vae.format, WeightFormat::PickleBin);

    // Listed but no folder; not listed; folder without weights; no config.
    match m.weights(Component::TextEncoder, None) {
        Err(KeyMapError::MissingComponent {
            component, reason, ..
        }) => {
            assert_eq!(component, "text_encoder");
            assert!(reason.contains("does not exist"), "{reason}");
        }
        other => panic!("expected MissingComponent, got {other:?}"),
    }
    match m.text_encoder_config(Component::TextEncoder2) {
        Err(KeyMapError::MissingComponent { reason, .. }) => {
            assert_eq!(reason, "not listed in model_index.json")
        }
        other => panic!("expected MissingComponent, got {other:?}"),
    }
    std::fs::remove_file(dir.path().join("vae/diffusion_pytorch_model.bin")).expect("rm");
    match m.weights(Component::Vae, None) {
        Err(e @ KeyMapError::MissingWeights { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("diffusion_pytorch_model.safetensors, model.safetensors"),
                "{msg}"
            );
        }
        other => panic!("expected MissingWeights, got {other:?}"),
    }
    assert!(matches!(
        m.unet_config(),
        Err(KeyMapError::MissingComponent { .. })
    ));
}

#[test]
fn folder_without_model_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    match DiffusersModel::open(dir.path()) {
        Err(e @ KeyMapError::MissingModelIndex { .. }) => {
            assert!(e.to_string().contains("model_index.json not found"))
        }
        other => panic!("expected MissingModelIndex, got {other:?}"),
    }
    std::fs::write(dir.path().join("model_index.json"), "{not json").expect("write");
    assert!(matches!(
        DiffusersModel::open(dir.path()),
        Err(KeyMapError::Json { .. })
    ));
}

#[test]
fn bad_config_field_names_file_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("model_index.json"),
        r#"{"unet": ["diffusers", "UNet2DConditionModel"]}"#,
    )
    .expect("write");
    std::fs::create_dir(dir.path().join("unet")).expect("mkdir");
    std::fs::write(
        dir.path().join("unet/config.json"),
        r#"{"block_out_channels": [32, 32], "cross_attention_dim": "wide", "transformer_layers_per_block": [1, 2, 3]}"#,
    )
    .expect("write");
    let u = DiffusersModel::open(dir.path())
        .expect("open")
        .unet_config()
        .expect("config");
    match u.cross_attention_dim() {
        Err(KeyMapError::ConfigField { field, path, .. }) => {
            assert_eq!(field, "cross_attention_dim");
            assert!(path.ends_with("unet/config.json"));
        }
        other => panic!("expected ConfigField, got {other:?}"),
    }
    // A list of the wrong length is an error, not silently truncated.
    assert!(u.transformer_layers_per_block().is_err());
    assert_eq!(u.layers_per_block().expect("default"), 2);
}
