//! Writes a small Stable Diffusion 1.5-topology model with seeded random weights as one
//! single-file (LDM layout) `.safetensors` checkpoint, for `make demo` and tests that need a
//! model nobody has to download.
//!
//! The architecture is the tiny SD1.5 of `tests/fixtures/tiny-sd15` (all real block, layer and
//! attention structure; 32-wide); its Diffusers configs travel inside the file's metadata
//! (`sd_lora_rs.configs`), so every tool of this project loads it like a full-size checkpoint.
//!
//! Usage: `cargo run --release -p sd-core --example make_tiny_model -- OUT.safetensors [SEED]`
//!
//! Initialisation (our own choice, documented for reproducibility): Linear/conv weights
//! U(−b, b) with b = √(3 / fan_in); token and position embeddings N(0, 0.02); norm weights 1;
//! biases 0.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use sd_core::loader::CONFIG_METADATA_KEY;
use sd_core::models::text_encoder::{ClipTextConfig, ClipTextModel};
use sd_core::models::unet::{Unet, UnetConfig};
use sd_core::models::vae::{Vae, VaeConfig};
use sd_core::tensor::dtype_of;
use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, ToLdmOp, plan_to_ldm};
use sd_formats::safetensors::{TensorToWrite, write_safetensors};
use tch::{Device, Kind, Tensor, nn::VarStore};

const UNET: &str = include_str!("../../../tests/fixtures/tiny-sd15/unet/config.json");
const TEXT_ENCODER: &str =
    include_str!("../../../tests/fixtures/tiny-sd15/text_encoder/config.json");
const VAE: &str = include_str!("../../../tests/fixtures/tiny-sd15/vae/config.json");

fn init(vs: &VarStore) {
    tch::no_grad(|| {
        let mut names: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, mut t) in names {
            let size = t.size();
            if name.ends_with("bias") {
                let _ = t.zero_();
            } else if name.contains("embedding") {
                t.copy_(&(Tensor::randn(&size, (Kind::Float, Device::Cpu)) * 0.02));
            } else if size.len() >= 2 {
                let fan_in: i64 = size[1..].iter().product();
                let b = (3.0 / fan_in as f64).sqrt();
                let _ = t.uniform_(-b, b);
            } else {
                let _ = t.fill_(1.0);
            }
        }
    });
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .ok_or("usage: make_tiny_model OUT.safetensors [SEED]")?,
    );
    let seed: i64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1234);
    tch::manual_seed(seed);

    let unet_json: serde_json::Value = serde_json::from_str(UNET)?;
    let te_json: serde_json::Value = serde_json::from_str(TEXT_ENCODER)?;
    let vae_json: serde_json::Value = serde_json::from_str(VAE)?;
    let mut components: Vec<(Component, VarStore)> = Vec::new();
    let vs = VarStore::new(Device::Cpu);
    let _unet = Unet::new(
        &vs.root(),
        &UnetConfig::from_json(&unet_json, "unet config")?,
    )?;
    components.push((Component::Unet, vs));
    let vs = VarStore::new(Device::Cpu);
    let _te = ClipTextModel::new(
        &vs.root(),
        &ClipTextConfig::from_json_value(&te_json, "text encoder config")?,
    );
    components.push((Component::TextEncoder, vs));
    let vs = VarStore::new(Device::Cpu);
    let _vae = Vae::new(&vs.root(), &VaeConfig::from_json(&vae_json, "vae config")?)?;
    components.push((Component::Vae, vs));

    let mut tensors: HashMap<(Component, String), Tensor> = HashMap::new();
    for (c, vs) in &components {
        init(vs);
        for (k, t) in vs.variables() {
            tensors.insert((*c, k), t);
        }
    }
    let keys: Vec<(Component, String, Vec<usize>)> = tensors
        .iter()
        .map(|((c, k), t)| {
            (
                *c,
                k.clone(),
                t.size().iter().map(|&d| d as usize).collect(),
            )
        })
        .collect();
    let plan = plan_to_ldm(
        ModelFamily::Sd1,
        keys.iter().map(|(c, k, s)| (*c, k.as_str(), s.as_slice())),
        &out.display().to_string(),
    )?;

    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for target in &plan.targets {
        let get = |k: &str| tensors[&(target.component, k.to_owned())].shallow_clone();
        let t = match &target.op {
            ToLdmOp::Copy { key } => get(key),
            ToLdmOp::Reshape { key } => {
                get(key).reshape(target.shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
            }
            ToLdmOp::Transpose { key } => get(key).tr(),
            ToLdmOp::ConcatRows { keys } => {
                Tensor::cat(&keys.iter().map(|k| get(k)).collect::<Vec<_>>(), 0)
            }
            ToLdmOp::LdmOnly { .. } => continue,
        };
        let t = t.to_kind(Kind::Half).contiguous();
        let numel = t.numel();
        let mut bytes = vec![0u8; numel * 2];
        t.copy_data_u8(&mut bytes, numel);
        blobs.push((target.key.clone(), target.shape.clone(), bytes));
    }
    let dtype = dtype_of(Kind::Half).ok_or("f16 has a file dtype")?;
    let views: Vec<TensorToWrite<'_>> = blobs
        .iter()
        .map(|(k, s, b)| TensorToWrite::new(k.as_str(), dtype, s.clone(), b.as_slice()))
        .collect();
    let mut metadata = BTreeMap::new();
    metadata.insert(
        CONFIG_METADATA_KEY.to_owned(),
        serde_json::json!({"unet": unet_json, "text_encoder": te_json, "vae": vae_json})
            .to_string(),
    );
    metadata.insert(
        "sd_lora_rs.note".to_owned(),
        format!("tiny SD1.5-topology model with random weights, seed {seed}; not a trained model"),
    );
    write_safetensors(&out, &views, Some(&metadata))?;
    eprintln!("wrote {} ({} tensors, fp16)", out.display(), views.len());
    Ok(())
}
