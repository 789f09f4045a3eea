//! The txt2img pipeline against diffusers' pipeline goldens (tests/fixtures/README.md §5d):
//! prompt embeddings, timestep/σ grids, per-step U-Net inputs and outputs and scheduler steps
//! (teacher forcing), final latents and decoded images end to end, seeded noise equal to
//! PyTorch's, and LoRA at 0.7 applied = merged.

use std::collections::HashMap;

use sd_core::generate::encode::{TextOptions, encode_texts};
use sd_core::generate::pipeline::{Guidance, decode_latents, denoise, seeded_noise};
use sd_core::generate::sampler::{Sampler, SamplerConfig, SamplerKind, Spacing};
use sd_core::generate::{GenerationSettings, ImageSpec, SdxlSize, model_components, txt2img};
use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::{LoraNetwork, LoraWeights};
use sd_core::schedule::PredictionType;
use sd_testutil::{assert_close, fixture};
use tch::{Kind, Tensor};

const PROMPT: &str = "a photo of an astronaut riding a horse on the moon";
const NEGATIVE: &str = "blurry, low quality";

fn read(rel: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(rel))
        .expect("golden reads")
        .into_iter()
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).expect("f32")
}

fn model(dir: &str, v: bool) -> StableDiffusion {
    let opts = ModelLoadOptions {
        v_parameterization: v,
        ..ModelLoadOptions::default()
    };
    StableDiffusion::load(&fixture(dir), &opts).expect("tiny model loads")
}

/// The goldens' schedulers: built from the model's PNDM/DDIM/Euler config, so "leading"
/// spacing with steps_offset 1; DDIM of tiny-sd15 keeps clip_sample true and
/// set_alpha_to_one false.
fn golden_config(kind: SamplerKind, prediction: PredictionType, clip: bool) -> SamplerConfig {
    SamplerConfig {
        spacing: Spacing::Leading,
        steps_offset: 1,
        clip_sample: clip,
        set_alpha_to_one: false,
        ..SamplerConfig::gen_img(kind, prediction)
    }
}

fn spec() -> ImageSpec {
    ImageSpec {
        prompt: PROMPT.to_owned(),
        negative_prompt: NEGATIVE.to_owned(),
        seed: 0,
    }
}

fn settings(config: SamplerConfig) -> GenerationSettings {
    GenerationSettings {
        width: 128,
        height: 64,
        steps: 5,
        scale: 7.5,
        negative_scale: None,
        sampler: config,
        text: TextOptions::default(),
        sdxl: SdxlSize::default(),
    }
}

/// Teacher-forced per-step checks, then (unless chaotic) the end-to-end run.
fn check_pipeline(golden: &str, dir: &str, config: SamplerConfig, end_to_end: Option<(f32, f32)>) {
    tch::set_num_threads(1);
    let g = read(golden);
    let m = model(dir, config.prediction == PredictionType::VPrediction);
    let s = settings(config);
    let guidance = Guidance::new(&m, &[spec()], &s).expect("guidance");

    // Prompt embeddings [negative, positive].
    assert_close(
        "prompt_embeds_neg_pos",
        &values(guidance.context()),
        &values(&g["prompt_embeds_neg_pos"]),
        1e-4,
        1e-4,
    );

    let mut sampler = Sampler::new(config, 5).expect("sampler");
    let ts: Vec<f32> = sampler.timesteps().iter().map(|&t| t as f32).collect();
    assert_eq!(ts, values(&g["timesteps"]), "timesteps");
    if let Some(sig) = g.get("sigmas") {
        let ours: Vec<f32> = sampler.sigmas().iter().map(|&s| s as f32).collect();
        assert_close("sigmas", &ours, &values(sig), 1e-6, 1e-6);
    }

    // Per step with the reference's own inputs.
    let anc = g.get("ancestral_noise");
    for i in 0..5 {
        let x = g["step_sample_in"].get(i);
        let x_in = sampler.scale_model_input(&x, i as usize);
        let unet_in = g["step_unet_input"].get(i);
        assert_close(
            &format!("step {i} unet input"),
            &values(&x_in),
            &values(&unet_in.get(1)),
            1e-5,
            1e-5,
        );
        let (guided, uncond, cond) = guidance.predict_parts(&x_in, sampler.timestep(i as usize));
        let uncond = uncond.expect("cfg on");
        assert_close(
            &format!("step {i} uncond"),
            &values(&uncond),
            &values(&g["step_noise_pred_uncond"].get(i)),
            1e-4,
            1e-4,
        );
        assert_close(
            &format!("step {i} text"),
            &values(&cond),
            &values(&g["step_noise_pred_text"].get(i)),
            1e-4,
            1e-4,
        );
        assert_close(
            &format!("step {i} guided"),
            &values(&guided),
            &values(&g["step_noise_pred_guided"].get(i)),
            1e-3,
            1e-4,
        );
        let golden_guided = g["step_noise_pred_guided"].get(i);
        let mut noise = || anc.expect("ancestral noise").get(i);
        let prev = sampler.step(i as usize, &golden_guided, &x, &mut noise);
        assert_close(
            &format!("step {i} prev_sample"),
            &values(&prev),
            &values(&g["step_prev_sample"].get(i)),
            1e-5,
            1e-5,
        );
    }

    if let Some((atol, rtol)) = end_to_end {
        let mut sampler = Sampler::new(config, 5).expect("sampler");
        let init_sigma: f64 = 0.0 + sampler.init_noise_sigma();
        let mut k = 0;
        let mut noise = || {
            k += 1;
            anc.expect("ancestral noise").get(k - 1)
        };
        let latents = denoise(
            &guidance,
            &mut sampler,
            &g["initial_latents"],
            &mut noise,
            &mut |_, _| {},
        );
        assert!(init_sigma > 0.0);
        assert_close(
            "final_latents",
            &values(&latents),
            &values(&g["final_latents"]),
            atol,
            rtol,
        );
        let decoded = decode_latents(&m, &latents);
        assert_close(
            "decoded",
            &values(&decoded),
            &values(&g["decoded"]),
            2e-4,
            1e-4,
        );
    }
}

#[test]
fn sd15_euler_matches_diffusers() {
    let c = golden_config(SamplerKind::Euler, PredictionType::Epsilon, false);
    check_pipeline(
        "goldens/pipeline-sd15-euler.safetensors",
        "tiny-sd15",
        c,
        Some((1e-3, 1e-4)),
    );
}

#[test]
fn sd15_euler_ancestral_matches_diffusers_with_its_noise() {
    let c = golden_config(SamplerKind::EulerAncestral, PredictionType::Epsilon, false);
    check_pipeline(
        "goldens/pipeline-sd15-euler_a.safetensors",
        "tiny-sd15",
        c,
        Some((1e-3, 1e-4)),
    );
}

#[test]
fn sd15_dpmsolver_plus_plus_matches_diffusers() {
    let c = golden_config(
        SamplerKind::DpmSolverPlusPlus,
        PredictionType::Epsilon,
        false,
    );
    check_pipeline(
        "goldens/pipeline-sd15-dpmpp_2m.safetensors",
        "tiny-sd15",
        c,
        Some((1e-3, 1e-4)),
    );
}

#[test]
fn sd15_ddim_step_by_step_matches_diffusers() {
    // Chaotic end to end (README tolerance table): per-step checks only.
    let c = golden_config(SamplerKind::Ddim, PredictionType::Epsilon, true);
    check_pipeline(
        "goldens/pipeline-sd15-ddim.safetensors",
        "tiny-sd15",
        c,
        None,
    );
}

#[test]
fn sd21v_ddim_matches_diffusers() {
    let c = golden_config(SamplerKind::Ddim, PredictionType::VPrediction, false);
    check_pipeline(
        "goldens/pipeline-sd21v-ddim.safetensors",
        "tiny-sd21v",
        c,
        Some((2e-4, 1e-4)),
    );
}

#[test]
fn sdxl_euler_matches_diffusers() {
    let c = golden_config(SamplerKind::Euler, PredictionType::Epsilon, false);
    check_pipeline(
        "goldens/pipeline-sdxl-euler.safetensors",
        "tiny-sdxl",
        c,
        Some((1e-3, 1e-4)),
    );
}

#[test]
fn sdxl_added_conditioning_matches_diffusers() {
    tch::set_num_threads(1);
    let g = read("goldens/pipeline-sdxl-euler.safetensors");
    let m = model("tiny-sdxl", false);
    let cond = encode_texts(&m, &[NEGATIVE, PROMPT], &TextOptions::default()).expect("encode");
    assert_close(
        "text_embeds",
        &values(&cond.pooled.expect("pooled")),
        &values(&g["added_cond_text_embeds_neg_pos"]),
        1e-4,
        1e-4,
    );
}

#[test]
fn seeded_noise_equals_pytorch_randn() {
    // initial_latents = torch.randn((1,4,8,16)) after manual_seed(71).
    let g = read("goldens/pipeline-sd15-euler.safetensors");
    let (start, _) = seeded_noise(71, 8, 16, 0);
    assert!(start.equal(&g["initial_latents"]), "seed 71 start noise");
    // ancestral_noise = 5 consecutive randn((1,4,8,16)) after manual_seed(1234).
    let a = read("goldens/pipeline-sd15-euler_a.safetensors");
    let (first, rest) = seeded_noise(1234, 8, 16, 4);
    let mut v = vec![first];
    v.extend(rest);
    let all = Tensor::stack(&v, 0);
    assert!(all.equal(&a["ancestral_noise"]), "seed 1234 noise stream");
}

#[test]
fn lora_at_0_7_applied_equals_merged_and_matches_the_unet_golden() {
    tch::set_num_threads(1);
    let weights = LoraWeights::load(fixture("lora/lora-sd15.safetensors"), &Default::default())
        .expect("lora");
    let s = GenerationSettings {
        width: 64,
        height: 32,
        steps: 3,
        ..settings(SamplerConfig::gen_img(
            SamplerKind::Euler,
            PredictionType::Epsilon,
        ))
    };
    let img = ImageSpec { seed: 5, ..spec() };

    let applied = model("tiny-sd15", false);
    let (mut net, _) =
        LoraNetwork::from_weights(&weights, applied.family, &model_components(&applied), 0.7)
            .expect("net");
    net.apply();
    // The U-Net with the LoRA applied reproduces sd-scripts' golden output.
    let lg = read("goldens/lora-sd15-applied.safetensors");
    let base = read("goldens/unet-sd15.safetensors");
    let out = tch::no_grad(|| {
        applied.unet.forward(
            &lg["unet_sample"],
            &lg["unet_timestep"],
            &base["encoder_hidden_states"],
            None,
        )
    });
    assert_close(
        "unet with LoRA 0.7",
        &values(&out),
        &values(&lg["unet_noise_pred"]),
        1e-4,
        1e-4,
    );
    let (lat_a, img_a) =
        txt2img(&applied, std::slice::from_ref(&img), &s, &mut |_, _| {}).expect("applied");

    let merged = model("tiny-sd15", false);
    let (mut net_m, _) =
        LoraNetwork::from_weights(&weights, merged.family, &model_components(&merged), 0.7)
            .expect("net");
    net_m.merge();
    let (lat_m, img_m) =
        txt2img(&merged, std::slice::from_ref(&img), &s, &mut |_, _| {}).expect("merged");
    assert_close(
        "latents applied vs merged",
        &values(&lat_a),
        &values(&lat_m),
        5e-3,
        1e-3,
    );
    let diff = img_a[0]
        .iter()
        .zip(&img_m[0])
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(diff <= 2, "8-bit images differ by {diff}");

    // Multiplier 0 gives the base model's image, not the LoRA one.
    net.set_multiplier(0.0);
    let (lat_0, _) = txt2img(&applied, std::slice::from_ref(&img), &s, &mut |_, _| {}).expect("m0");
    let plain = model("tiny-sd15", false);
    let (lat_p, _) =
        txt2img(&plain, std::slice::from_ref(&img), &s, &mut |_, _| {}).expect("plain");
    assert_close(
        "multiplier 0 = no LoRA",
        &values(&lat_0),
        &values(&lat_p),
        1e-4,
        1e-4,
    );
    assert!(
        (lat_a - lat_p).abs().max().double_value(&[]) > 1e-2,
        "the LoRA changes the image"
    );
}
