//! The training memory estimate (`sd_core::train::memory`) on full-size SD1.5 figures: parameter
//! counts from the fixture manifests (every key and shape of runwayml/stable-diffusion-v1-5), a
//! rank-16 default network from the LoRA-module manifest, and the optimiser-state, weight and
//! activation terms with and without each memory saver.

use std::io::Read;

use sd_core::models::unet::UnetConfig;
use sd_core::train::OptimizerConfig;
use sd_core::train::memory::{
    MemoryInputs, estimate, gib, optimizer_state_bytes, text_encoder_activation_values,
    unet_activation_values,
};
use sd_testutil::fixture;
use tch::Kind;

/// Rows of a gzipped TSV manifest as (header → value) maps.
fn manifest(name: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(fixture(&format!("manifests/{name}"))).expect("manifest"),
    )
    .read_to_string(&mut text)
    .expect("gzip");
    let mut lines = text.lines();
    let head: Vec<&str> = lines.next().expect("header").split('\t').collect();
    lines
        .map(|l| {
            head.iter()
                .zip(l.split('\t'))
                .map(|(h, v)| ((*h).to_owned(), v.to_owned()))
                .collect()
        })
        .collect()
}

fn shape(text: &str, rank: i64) -> Vec<i64> {
    text.trim_matches(['[', ']'])
        .split(',')
        .map(|d| {
            if d == "r" {
                rank
            } else {
                d.parse().expect("dim")
            }
        })
        .collect()
}

/// Parameter count per component of full-size SD1.5 (Diffusers manifest).
fn params(component: &str) -> u64 {
    manifest("sd15.diffusers.tsv.gz")
        .iter()
        .filter(|r| r["component"] == component)
        .map(|r| shape(&r["shape"], 0).iter().product::<i64>() as u64)
        .sum()
}

/// `lora_down` and `lora_up` shapes of the default SD1.5 network on the U-Net at `rank`.
fn unet_lora_shapes(rank: i64) -> Vec<Vec<i64>> {
    manifest("sd15.lora_modules.tsv.gz")
        .iter()
        .filter(|r| r["component"] == "unet" && r["default"] == "1")
        .flat_map(|r| {
            [
                shape(&r["lora_down_shape"], rank),
                shape(&r["lora_up_shape"], rank),
            ]
        })
        .collect()
}

fn optimizer(name: &str) -> OptimizerConfig {
    OptimizerConfig::from_cli(Some(name), &[], false, false).expect("optimizer")
}

fn inputs<'a>(
    unet: &'a UnetConfig,
    shapes: &'a [Vec<i64>],
    opt: &'a OptimizerConfig,
    kind: Kind,
    checkpointing: bool,
) -> MemoryInputs<'a> {
    MemoryInputs {
        unet,
        unet_params: params("unet"),
        unet_kind: kind,
        text_encoder_params: params("text_encoder"),
        text_encoder_kind: kind,
        vae_params: params("vae"),
        vae_kind: kind,
        lora_shapes: shapes,
        lora_kind: Kind::Float,
        optimizer: opt,
        batch_size: 1,
        latent_size: (64, 64),
        gradient_checkpointing: checkpointing,
        trained_text_encoders: &[],
        text_tokens: 77,
    }
}

#[test]
fn full_size_sd15_parameter_counts_from_the_manifests() {
    // The published sizes of runwayml/stable-diffusion-v1-5's components.
    assert_eq!(params("unet"), 859_520_964);
    assert_eq!(params("text_encoder"), 123_060_480);
    assert_eq!(params("vae"), 83_653_863);
    // Default network (192 U-Net modules: 160 Linear, 32 1×1 Conv), rank 16: 16·(in + out)
    // values per module.
    let shapes = unet_lora_shapes(16);
    assert_eq!(shapes.len(), 2 * 192);
    let lora: u64 = shapes
        .iter()
        .map(|s| s.iter().product::<i64>() as u64)
        .sum();
    assert_eq!(lora, 6_782_976);
}

#[test]
fn adamw_and_adamw8bit_differ_by_exactly_their_state_bytes() {
    let unet = UnetConfig::sd15();
    let shapes = unet_lora_shapes(16);
    let adamw = optimizer("AdamW");
    let adam8 = optimizer("AdamW8bit");
    let e32 = estimate(&inputs(&unet, &shapes, &adamw, Kind::Float, false));
    let e8 = estimate(&inputs(&unet, &shapes, &adam8, Kind::Float, false));

    // AdamW: two f32 moments per value.
    assert_eq!(e32.optimizer_state, 8 * 6_782_976);
    assert_eq!(e32.optimizer_state, optimizer_state_bytes(&adamw, &shapes));
    // AdamW8bit: per tensor of ≥ 4096 values, 2 × (⌈n/256⌉·256 u8 + ⌈n/256⌉ f32); the rank-16
    // tensors here are all at least 16·320 = 5120 values, so all are quantised.
    let expected8: u64 = shapes
        .iter()
        .map(|s| {
            let n = s.iter().product::<i64>() as u64;
            let blocks = n.div_ceil(256);
            2 * (blocks * 256 + 4 * blocks)
        })
        .sum();
    assert_eq!(e8.optimizer_state, expected8);
    assert_eq!(e8.optimizer_state, 13_777_920); // 3.94× less
    assert_eq!(
        e32.total() - e8.total(),
        e32.optimizer_state - e8.optimizer_state
    );
    assert_eq!(e32.total() - e8.total(), 40_485_888); // 38.6 MiB saved
    // Everything else is the same.
    assert_eq!(
        (e32.unet, e32.lora, e32.lora_grads, e32.activations),
        (e8.unet, e8.lora, e8.lora_grads, e8.activations)
    );
}

#[test]
fn weights_and_lora_terms_follow_the_dtypes() {
    let unet = UnetConfig::sd15();
    let shapes = unet_lora_shapes(16);
    let opt = optimizer("AdamW");
    let f32_run = estimate(&inputs(&unet, &shapes, &opt, Kind::Float, false));
    assert_eq!(f32_run.unet, 4 * 859_520_964);
    assert_eq!(f32_run.text_encoders, 4 * 123_060_480);
    assert_eq!(f32_run.vae, 4 * 83_653_863);
    assert_eq!(
        (f32_run.lora, f32_run.lora_grads),
        (4 * 6_782_976, 4 * 6_782_976)
    );

    let mut half = inputs(&unet, &shapes, &opt, Kind::Half, false);
    half.lora_kind = Kind::Half; // --full_fp16
    let h = estimate(&half);
    assert_eq!(h.unet, 2 * 859_520_964);
    assert_eq!((h.lora, h.lora_grads), (2 * 6_782_976, 2 * 6_782_976));
    // The optimiser state stays f32 (updates go through an f32 copy).
    assert_eq!(h.optimizer_state, f32_run.optimizer_state);
    // Activations are kept in the compute dtype: half of the f32 figure.
    assert_eq!(2 * h.activations, f32_run.activations);
}

#[test]
fn activation_counts_for_sd15_at_512_px() {
    let unet = UnetConfig::sd15();
    // Values per sample at 64×64 latents; see the per-block model in sd_core::train::memory.
    let plain = unet_activation_values(&unet, 64, 64, false);
    let ckpt = unet_activation_values(&unet, 64, 64, true);
    assert_eq!(plain, 476_692_480);
    assert_eq!(ckpt, 84_131_840);
    // f32: 1.78 GiB without checkpointing, 0.31 GiB with it.
    assert!((gib(4 * plain) - 1.776).abs() < 1e-3, "{}", gib(4 * plain));
    assert!((gib(4 * ckpt) - 0.313).abs() < 1e-3, "{}", gib(4 * ckpt));
    // Linear in the number of latent cells at a fixed aspect ratio.
    assert_eq!(unet_activation_values(&unet, 128, 128, false), 4 * plain);
    assert_eq!(unet_activation_values(&unet, 32, 32, false) * 4, plain);

    let shapes = unet_lora_shapes(16);
    let opt = optimizer("AdamW");
    let mut batch2 = inputs(&unet, &shapes, &opt, Kind::Float, false);
    batch2.batch_size = 2;
    assert_eq!(estimate(&batch2).activations, 2 * 4 * plain);

    // A trained CLIP ViT-L text encoder: 16·768 values per token and layer, 12 layers, 77 tokens.
    assert_eq!(
        text_encoder_activation_values(768, 12, 77, false),
        16 * 768 * 77 * 12
    );
    assert_eq!(
        text_encoder_activation_values(768, 12, 77, true),
        768 * 77 * 12 + 16 * 768 * 77
    );
}

#[test]
fn all_savers_together_for_sd15() {
    let unet = UnetConfig::sd15();
    let shapes = unet_lora_shapes(16);
    let adamw = optimizer("AdamW");
    let adam8 = optimizer("AdamW8bit");
    let base = estimate(&inputs(&unet, &shapes, &adamw, Kind::Float, false));
    let all = estimate(&inputs(&unet, &shapes, &adam8, Kind::Half, true));
    // f32 baseline vs fp16 + checkpointing + AdamW8bit (LoRA weights f32).
    assert_eq!(base.total(), 6_280_238_764, "{}", base.summary());
    assert_eq!(all.total(), 2_368_776_022, "{}", all.summary());
    assert_eq!(
        all.summary(),
        "2.21 GiB = weights 1.99 (U-Net 1.60, text encoders 0.23, VAE 0.16) + LoRA 0.025 + gradients 0.025 + optimizer state 0.013 + activations 0.16"
    );
}
