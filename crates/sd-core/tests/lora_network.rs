//! LoRA networks on loaded models against sd-scripts' goldens (tests/fixtures/README.md §5e):
//! the golden LoRAs applied at multiplier 0.7 reproduce the reference's text-encoder and U-Net
//! outputs (tolerance 1e-4 / 1e-4), merging gives the same outputs as applying, several
//! networks combine, and a LoRA for another family is refused.

use std::collections::HashMap;

use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::{ComponentLayers, LoraNetwork, LoraWeights};
use sd_core::models::text_encoder::OutputLayer;
use sd_core::models::unet::TextTimeCondition;
use sd_formats::keymap::Component;
use sd_testutil::{assert_close, fixture};
use tch::{Kind, Tensor};

fn read(rel: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(rel))
        .expect("golden reads")
        .into_iter()
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32")
}

fn model(dir: &str) -> StableDiffusion {
    StableDiffusion::load(&fixture(dir), &ModelLoadOptions::default()).expect("tiny model loads")
}

fn components(m: &StableDiffusion) -> Vec<ComponentLayers<'_>> {
    let mut c = vec![ComponentLayers {
        component: Component::Unet,
        layers: m.unet.lora_layers(),
    }];
    for slot in &m.text_encoders {
        c.push(ComponentLayers {
            component: slot.component,
            layers: slot.model.lora_layers(),
        });
    }
    c
}

fn network(
    m: &StableDiffusion,
    lora: &str,
    multiplier: f64,
) -> (LoraNetwork, sd_core::lora::ApplyReport) {
    let weights = LoraWeights::load(fixture(lora), &Default::default()).expect("LoRA loads");
    LoraNetwork::from_weights(&weights, m.family, &components(m), multiplier)
        .expect("network builds")
}

fn sd15_outputs(
    m: &StableDiffusion,
    g: &HashMap<String, Tensor>,
    base: &HashMap<String, Tensor>,
) -> (Tensor, Tensor, Tensor) {
    tch::no_grad(|| {
        let te = &m.text_encoders[0].model;
        let out = te.forward(&g["te_input_ids"]);
        let penult = out.select(OutputLayer::ClipSkip(2), te);
        let noise = m.unet.forward(
            &g["unet_sample"],
            &g["unet_timestep"],
            &base["encoder_hidden_states"],
            None,
        );
        (out.last_hidden_state, penult, noise)
    })
}

#[test]
fn sd15_golden_lora_applied_at_0_7_matches_sd_scripts_and_merging_equals_applying() {
    tch::set_num_threads(1);
    let g = read("goldens/lora-sd15-applied.safetensors");
    let base = read("goldens/unet-sd15.safetensors");
    let m = model("tiny-sd15");
    let (mut net, report) = network(&m, "lora/lora-sd15.safetensors", 0.7);
    assert_eq!(report.applied.get("unet"), Some(&192));
    assert_eq!(report.applied.get("text_encoder"), Some(&72));
    assert!(report.unmatched.is_empty(), "{:?}", report.unmatched);
    net.apply();
    let (last, penult, noise) = sd15_outputs(&m, &g, &base);
    assert_close(
        "te_last_hidden_state",
        &values(&last),
        &values(&g["te_last_hidden_state"]),
        1e-4,
        1e-4,
    );
    assert_close(
        "te_penultimate_final_ln",
        &values(&penult),
        &values(&g["te_penultimate_final_ln"]),
        1e-4,
        1e-4,
    );
    assert_close(
        "unet_noise_pred",
        &values(&noise),
        &values(&g["unet_noise_pred"]),
        1e-4,
        1e-4,
    );

    // Multiplier 0 gives the base model back (the diffusers golden).
    net.set_multiplier(0.0);
    let (_, _, noise0) = sd15_outputs(&m, &g, &base);
    assert_close(
        "multiplier 0",
        &values(&noise0),
        &values(&base["noise_pred"]),
        1e-4,
        1e-4,
    );

    // Merging at 0.7 into the weights gives what applying gave.
    net.set_multiplier(0.7);
    net.merge();
    let (last_m, _, noise_m) = sd15_outputs(&m, &g, &base);
    assert_close(
        "merged te",
        &values(&last_m),
        &values(&g["te_last_hidden_state"]),
        1e-4,
        1e-4,
    );
    assert_close(
        "merged unet",
        &values(&noise_m),
        &values(&g["unet_noise_pred"]),
        1e-4,
        1e-4,
    );
}

#[test]
fn two_networks_combine_and_cancel() {
    tch::set_num_threads(1);
    let g = read("goldens/lora-sd15-applied.safetensors");
    let base = read("goldens/unet-sd15.safetensors");
    let m = model("tiny-sd15");
    let (mut a, _) = network(&m, "lora/lora-sd15.safetensors", 0.7);
    let (mut b, _) = network(&m, "lora/lora-sd15-b.safetensors", 0.5);
    a.apply();
    b.apply();
    let (_, _, with_both) = sd15_outputs(&m, &g, &base);
    b.set_multiplier(0.0);
    let (_, _, only_a) = sd15_outputs(&m, &g, &base);
    assert_close(
        "b at 0",
        &values(&only_a),
        &values(&g["unet_noise_pred"]),
        1e-4,
        1e-4,
    );
    let diff = (&with_both - &only_a).abs().max().double_value(&[]);
    assert!(
        diff > 1e-3,
        "the second network changes the output (max diff {diff})"
    );
    // The same file at +0.7 and −0.7 cancels.
    let (mut c, _) = network(&m, "lora/lora-sd15.safetensors", -0.7);
    c.apply();
    let (_, _, cancelled) = sd15_outputs(&m, &g, &base);
    assert_close(
        "+0.7 and −0.7",
        &values(&cancelled),
        &values(&base["noise_pred"]),
        1e-4,
        1e-4,
    );
    drop(c);
    let (_, _, after_drop) = sd15_outputs(&m, &g, &base);
    assert_close(
        "dropping a network detaches it",
        &values(&after_drop),
        &values(&g["unet_noise_pred"]),
        1e-4,
        1e-4,
    );
}

#[test]
fn sdxl_golden_lora_applied_at_0_7_matches_sd_scripts() {
    tch::set_num_threads(1);
    let g = read("goldens/lora-sdxl-applied.safetensors");
    let base = read("goldens/unet-sdxl.safetensors");
    let m = model("tiny-sdxl");
    let (mut net, report) = network(&m, "lora/lora-sdxl.safetensors", 0.7);
    assert_eq!(report.applied.get("unet"), Some(&302));
    assert_eq!(report.applied.get("text_encoder"), Some(&72));
    assert_eq!(report.applied.get("text_encoder_2"), Some(&192));
    net.apply();
    let (te1, te2, noise) = tch::no_grad(|| {
        let e1 = &m.text_encoders[0].model;
        let e2 = &m.text_encoders[1].model;
        let o1 = e1.forward(&g["te1_input_ids"]);
        let o2 = e2.forward(&g["te2_input_ids"]);
        let added = TextTimeCondition {
            text_embeds: base["text_embeds"].shallow_clone(),
            time_ids: base["time_ids"].shallow_clone(),
        };
        let noise = m.unet.forward(
            &g["unet_sample"],
            &g["unet_timestep"],
            &g["unet_encoder_hidden_states"],
            Some(&added),
        );
        (
            o1.select(OutputLayer::PenultimateRaw, e1),
            (
                o2.select(OutputLayer::PenultimateRaw, e2),
                o2.text_embeds.expect("TE2 projects"),
            ),
            noise,
        )
    });
    assert_close(
        "te1_penultimate",
        &values(&te1),
        &values(&g["te1_penultimate"]),
        1e-4,
        1e-4,
    );
    assert_close(
        "te2_penultimate",
        &values(&te2.0),
        &values(&g["te2_penultimate"]),
        1e-4,
        1e-4,
    );
    assert_close(
        "te2_text_embeds",
        &values(&te2.1),
        &values(&g["te2_text_embeds"]),
        1e-4,
        1e-4,
    );
    assert_close(
        "unet_noise_pred",
        &values(&noise),
        &values(&g["unet_noise_pred"]),
        1e-4,
        1e-4,
    );
}

#[test]
fn conv_lora_applies_to_resnet_convs() {
    tch::set_num_threads(1);
    let g = read("goldens/lora-sd15-conv-applied.safetensors");
    let base = read("goldens/unet-sd15.safetensors");
    let m = model("tiny-sd15");
    let (mut net, report) = network(&m, "lora/lora-sd15-conv.safetensors", 0.7);
    assert_eq!(report.total(), 348);
    net.apply();
    let (_, _, noise) = sd15_outputs(&m, &g, &base);
    assert_close(
        "conv unet_noise_pred",
        &values(&noise),
        &values(&g["unet_noise_pred"]),
        1e-4,
        1e-4,
    );
}

#[test]
fn an_sdxl_lora_on_an_sd15_model_is_refused_with_the_reason() {
    let m = model("tiny-sd15");
    let weights = LoraWeights::load(fixture("lora/lora-sdxl.safetensors"), &Default::default())
        .expect("loads");
    let err = LoraNetwork::from_weights(&weights, m.family, &components(&m), 1.0)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("no LoRA module matches this Sd1 model"),
        "{msg}"
    );
    assert!(msg.contains("looks like Sdxl"), "{msg}");
}
