//! The library API in one place, mirroring sd-scripts' recipe for Diffusers pipelines
//! (`../shared/spec/generation.md` §10.1): load a model, create networks from LoRA files for
//! the loaded text encoder(s) and U-Net, apply them with multipliers, change a multiplier,
//! or merge one into the weights.
//!
//! Usage:
//! `cargo run -p sd-core --example apply_lora -- MODEL LORA[:MULTIPLIER]... [--merge]`
//! e.g. with the test fixtures:
//! `cargo run -p sd-core --example apply_lora -- tests/fixtures/tiny-sd15 tests/fixtures/lora/lora-sd15.safetensors:0.7 tests/fixtures/lora/lora-sd15-b.safetensors:0.5`

use std::path::PathBuf;

use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::{ComponentLayers, LoraNetwork, LoraWeights};
use sd_formats::keymap::Component;
use tch::{Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let merge = args.iter().any(|a| a == "--merge");
    let mut positional = args.iter().filter(|a| *a != "--merge");
    let model_path = PathBuf::from(
        positional
            .next()
            .ok_or("usage: apply_lora MODEL LORA[:MUL]... [--merge]")?,
    );

    // 1. The model: a single file or a Diffusers folder; f32 on the CPU (or CUDA when present).
    let opts = ModelLoadOptions {
        device: tch::Device::cuda_if_available(),
        ..Default::default()
    };
    let model = StableDiffusion::load(&model_path, &opts)?;
    println!("{:?} model from {}", model.family, model_path.display());

    // 2. The layers networks may attach to, per component.
    let mut components = vec![ComponentLayers {
        component: Component::Unet,
        layers: model.unet.lora_layers(),
    }];
    for slot in &model.text_encoders {
        components.push(ComponentLayers {
            component: slot.component,
            layers: slot.model.lora_layers(),
        });
    }

    // 3. One network per file, each with its own multiplier; several apply at once.
    let mut networks = Vec::new();
    for spec in positional {
        let (file, multiplier) = match spec.rsplit_once(':') {
            Some((f, m)) if m.parse::<f64>().is_ok() => (f, m.parse::<f64>()?),
            _ => (spec.as_str(), 1.0),
        };
        let weights = LoraWeights::load(file, &Default::default())?;
        let (mut network, report) =
            LoraNetwork::from_weights(&weights, model.family, &components, multiplier)?;
        println!(
            "{file}: {:?} modules applied at {multiplier}, {} unmatched",
            report.applied,
            report.unmatched.len()
        );
        if merge {
            network.merge(); // folded into the weights; the network no longer adds anything
        } else {
            network.apply();
        }
        networks.push(network);
    }

    // 4. Use the model as usual: here one U-Net call on seeded random latents.
    tch::manual_seed(0);
    let unet = model.unet.config();
    let context_dim = unet.cross_attention_dim;
    let device = opts.device;
    let latents = Tensor::randn([1, unet.in_channels, 8, 8], (Kind::Float, device));
    let context = Tensor::randn([1, 77, context_dim], (Kind::Float, device));
    let t = Tensor::from_slice(&[500i64]).to_device(device);
    if unet.addition.is_some() {
        println!("(SDXL: the U-Net call below needs size conditioning; see sd_core::generate)");
        return Ok(());
    }
    let out = tch::no_grad(|| model.unet.forward(&latents, &t, &context, None));
    println!(
        "noise prediction mean |x| with the networks: {:.6}",
        out.abs().mean(Kind::Float).double_value(&[])
    );

    // 5. Multipliers change without reloading (merged networks are part of the weights now).
    if !merge {
        for n in &networks {
            n.set_multiplier(0.0);
        }
        let base = tch::no_grad(|| model.unet.forward(&latents, &t, &context, None));
        println!(
            "with every multiplier at 0 (the base model):   {:.6}",
            base.abs().mean(Kind::Float).double_value(&[])
        );
    }
    Ok(())
}
