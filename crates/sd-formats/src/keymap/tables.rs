//! Generation of the key tables by loops over the structure. Names follow the reference
//! converters (sd-scripts `model_util.py` / `sdxl_model_util.py`, diffusers
//! `single_file_utils.py`): see `docs/formats.md` for the table in words.

use super::error::{KeyMapError, Result};
use super::structure::{
    LDM_UNET, LDM_VAE, ModelStructure, TextEncoderLayout, TextEncoderStructure, UnetStructure,
    VaeStructure,
};
use super::{Component, ConstantShape, KeyEntry, LdmFallback, Op};
use crate::family::ModelFamily;

/// Parameters of a module with weight and bias.
const WB: &[&str] = &["weight", "bias"];
/// Parameters of a bias-free Linear.
const W: &[&str] = &["weight"];

/// Collects entries of one component under one single-file prefix.
struct Builder<'a> {
    out: &'a mut Vec<KeyEntry>,
    component: Component,
    ldm_prefix: &'a str,
}

impl Builder<'_> {
    /// One entry per parameter: `<ldm_prefix><ldm>.<p>` <-> `<diffusers>.<p>`.
    fn module(&mut self, ldm: &str, diffusers: &str, params: &[&str], op: Op, optional: bool) {
        for p in params {
            self.out.push(KeyEntry {
                ldm_key: format!("{}{ldm}.{p}", self.ldm_prefix),
                component: self.component,
                diffusers_keys: vec![format!("{diffusers}.{p}")],
                op: op.clone(),
                optional,
            });
        }
    }

    /// A module copied unchanged.
    fn copy(&mut self, ldm: &str, diffusers: &str, params: &[&str]) {
        self.module(ldm, diffusers, params, Op::Copy, false);
    }

    /// A raw entry (full single-file key after the prefix, full Diffusers keys).
    fn raw(&mut self, ldm: &str, diffusers_keys: Vec<String>, op: Op) {
        self.out.push(KeyEntry {
            ldm_key: format!("{}{ldm}", self.ldm_prefix),
            component: self.component,
            diffusers_keys,
            op,
            optional: false,
        });
    }
}

/// Generates every entry for `family` and `structure`, U-Net first, then text encoders, then
/// VAE.
pub(crate) fn generate(family: ModelFamily, structure: &ModelStructure) -> Result<Vec<KeyEntry>> {
    let mut out = Vec::new();
    if let Some(unet) = &structure.unet {
        if unet.down_depths.len() != unet.levels || unet.up_depths.len() != unet.levels {
            return Err(KeyMapError::Structure {
                path: format!("{family} key table"),
                message: "U-Net depth lists do not have one entry per level".to_string(),
            });
        }
        unet_entries(&mut out, unet);
    }
    for te in &structure.text_encoders {
        text_encoder_entries(&mut out, family, te);
    }
    if let Some(vae) = &structure.vae {
        vae_entries(&mut out, vae);
    }
    Ok(out)
}

/// ResNet block: LDM `ResBlock` <-> Diffusers `ResnetBlock2D`.
fn unet_resnet(b: &mut Builder<'_>, ldm: &str, diffusers: &str) {
    for (l, d) in [
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
    ] {
        b.copy(&format!("{ldm}.{l}"), &format!("{diffusers}.{d}"), WB);
    }
    // Only where the channel count changes.
    b.module(
        &format!("{ldm}.skip_connection"),
        &format!("{diffusers}.conv_shortcut"),
        WB,
        Op::Copy,
        true,
    );
}

/// `SpatialTransformer` <-> `Transformer2DModel`: identical names inside. SD1 `proj_in`/
/// `proj_out` are 1x1 convs in both layouts, SD2/SDXL Linear in both (checkpoints and the
/// linear-projection Diffusers U-Net), so they are copies.
fn unet_transformer(b: &mut Builder<'_>, ldm: &str, diffusers: &str, depth: usize) {
    b.copy(&format!("{ldm}.norm"), &format!("{diffusers}.norm"), WB);
    b.copy(
        &format!("{ldm}.proj_in"),
        &format!("{diffusers}.proj_in"),
        WB,
    );
    for t in 0..depth {
        let tb = format!("transformer_blocks.{t}");
        for (m, params) in [
            ("norm1", WB),
            ("attn1.to_q", W),
            ("attn1.to_k", W),
            ("attn1.to_v", W),
            ("attn1.to_out.0", WB),
            ("norm2", WB),
            ("attn2.to_q", W),
            ("attn2.to_k", W),
            ("attn2.to_v", W),
            ("attn2.to_out.0", WB),
            ("norm3", WB),
            ("ff.net.0.proj", WB),
            ("ff.net.2", WB),
        ] {
            b.copy(
                &format!("{ldm}.{tb}.{m}"),
                &format!("{diffusers}.{tb}.{m}"),
                params,
            );
        }
    }
    b.copy(
        &format!("{ldm}.proj_out"),
        &format!("{diffusers}.proj_out"),
        WB,
    );
}

/// U-Net table. `L` = layers per block:
/// - down level `i`, resnet `j`: `input_blocks.{(L+1)i+j+1}.0` <-> `down_blocks.i.resnets.j`,
///   attention `….1` <-> `down_blocks.i.attentions.j`, downsampler
///   `input_blocks.{(L+1)(i+1)}.0.op` <-> `down_blocks.i.downsamplers.0.conv`;
/// - mid: `middle_block.{0,1,2}` <-> `mid_block.resnets.0`, `attentions.0`, `resnets.1`;
/// - up level `i`, resnet `j` (`0..=L`): `output_blocks.{(L+1)i+j}.0` <-> `up_blocks.i.resnets.j`,
///   attention `….1`, upsampler `output_blocks.{(L+1)i+L}.{1|2}.conv` (2 when the level has
///   attention) <-> `up_blocks.i.upsamplers.0.conv`.
fn unet_entries(out: &mut Vec<KeyEntry>, s: &UnetStructure) {
    let mut b = Builder {
        out,
        component: Component::Unet,
        ldm_prefix: LDM_UNET,
    };
    let l = s.layers_per_block;
    b.copy("input_blocks.0.0", "conv_in", WB);
    b.copy("time_embed.0", "time_embedding.linear_1", WB);
    b.copy("time_embed.2", "time_embedding.linear_2", WB);
    if s.add_embedding {
        b.copy("label_emb.0.0", "add_embedding.linear_1", WB);
        b.copy("label_emb.0.2", "add_embedding.linear_2", WB);
    }
    for i in 0..s.levels {
        for j in 0..l {
            let n = (l + 1) * i + j + 1;
            unet_resnet(
                &mut b,
                &format!("input_blocks.{n}.0"),
                &format!("down_blocks.{i}.resnets.{j}"),
            );
            if s.down_depths[i] > 0 {
                unet_transformer(
                    &mut b,
                    &format!("input_blocks.{n}.1"),
                    &format!("down_blocks.{i}.attentions.{j}"),
                    s.down_depths[i],
                );
            }
        }
        if i + 1 < s.levels {
            b.copy(
                &format!("input_blocks.{}.0.op", (l + 1) * (i + 1)),
                &format!("down_blocks.{i}.downsamplers.0.conv"),
                WB,
            );
        }
    }
    unet_resnet(&mut b, "middle_block.0", "mid_block.resnets.0");
    if s.mid_depth > 0 {
        unet_transformer(
            &mut b,
            "middle_block.1",
            "mid_block.attentions.0",
            s.mid_depth,
        );
        unet_resnet(&mut b, "middle_block.2", "mid_block.resnets.1");
    } else {
        unet_resnet(&mut b, "middle_block.1", "mid_block.resnets.1");
    }
    for i in 0..s.levels {
        for j in 0..=l {
            let n = (l + 1) * i + j;
            unet_resnet(
                &mut b,
                &format!("output_blocks.{n}.0"),
                &format!("up_blocks.{i}.resnets.{j}"),
            );
            if s.up_depths[i] > 0 {
                unet_transformer(
                    &mut b,
                    &format!("output_blocks.{n}.1"),
                    &format!("up_blocks.{i}.attentions.{j}"),
                    s.up_depths[i],
                );
            }
        }
        if i + 1 < s.levels {
            let slot = if s.up_depths[i] > 0 { 2 } else { 1 };
            b.copy(
                &format!("output_blocks.{}.{slot}.conv", (l + 1) * i + l),
                &format!("up_blocks.{i}.upsamplers.0.conv"),
                WB,
            );
        }
    }
    b.copy("out.0", "conv_norm_out", WB);
    b.copy("out.2", "conv_out", WB);
}

/// HF CLIP layer modules (Diffusers names, also the SD1/SDXL-TE1 single-file names).
const HF_LAYER: [(&str, &str); 8] = [
    ("self_attn.q_proj", "attn.q"),
    ("self_attn.k_proj", "attn.k"),
    ("self_attn.v_proj", "attn.v"),
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("layer_norm2", "ln_2"),
];

/// Text-encoder table.
/// - HF CLIP layout: `<prefix>text_model.X` <-> `text_model.X` for every key.
/// - OpenCLIP layout: `token_embedding.weight`, `positional_embedding`, `ln_final` and
///   `transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`
///   <-> HF names; `in_proj_*` = q;k;v rows; `text_projection`/`logit_scale` per family.
fn text_encoder_entries(out: &mut Vec<KeyEntry>, family: ModelFamily, te: &TextEncoderStructure) {
    let mut b = Builder {
        out,
        component: te.component,
        ldm_prefix: te.ldm_prefix,
    };
    let layer = |n: usize| format!("text_model.encoder.layers.{n}");
    match te.layout {
        TextEncoderLayout::HfClip => {
            for e in ["token_embedding", "position_embedding"] {
                let k = format!("text_model.embeddings.{e}");
                b.copy(&k, &k, W);
            }
            for n in 0..te.ldm_layers {
                for (m, _) in HF_LAYER {
                    let k = format!("{}.{m}", layer(n));
                    b.copy(&k, &k, WB);
                }
            }
            b.copy(
                "text_model.final_layer_norm",
                "text_model.final_layer_norm",
                WB,
            );
        }
        TextEncoderLayout::OpenClip => {
            b.raw(
                "token_embedding.weight",
                vec!["text_model.embeddings.token_embedding.weight".to_string()],
                Op::Copy,
            );
            b.raw(
                "positional_embedding",
                vec!["text_model.embeddings.position_embedding.weight".to_string()],
                Op::Copy,
            );
            for n in 0..te.ldm_layers {
                let rb = format!("transformer.resblocks.{n}");
                // Resblocks Diffusers does not keep are fabricated from its last layer.
                let src = n.min(te.diffusers_layers - 1);
                let kept = n < te.diffusers_layers;
                let qkv = |p: &str| -> Vec<String> {
                    ["q_proj", "k_proj", "v_proj"]
                        .iter()
                        .map(|m| format!("{}.self_attn.{m}.{p}", layer(src)))
                        .collect()
                };
                for (p, ldm_p) in [("weight", "in_proj_weight"), ("bias", "in_proj_bias")] {
                    let ldm = format!("{rb}.attn.{ldm_p}");
                    if kept {
                        b.raw(&ldm, qkv(p), Op::ConcatRows);
                    } else {
                        b.raw(&ldm, vec![], Op::LdmOnly(LdmFallback::CopyOf(qkv(p))));
                    }
                }
                for (m, o) in HF_LAYER.iter().skip(3) {
                    for p in WB {
                        let ldm = format!("{rb}.{o}.{p}");
                        let d = format!("{}.{m}.{p}", layer(src));
                        if kept {
                            b.raw(&ldm, vec![d], Op::Copy);
                        } else {
                            b.raw(&ldm, vec![], Op::LdmOnly(LdmFallback::CopyOf(vec![d])));
                        }
                    }
                }
            }
            b.copy("ln_final", "text_model.final_layer_norm", WB);
            match family {
                ModelFamily::Sdxl => {
                    b.raw(
                        "text_projection",
                        vec!["text_projection.weight".to_string()],
                        Op::Transpose,
                    );
                    b.raw(
                        "logit_scale",
                        vec![],
                        Op::LdmOnly(LdmFallback::ReferenceOnly),
                    );
                }
                ModelFamily::Sd1 | ModelFamily::Sd2 => {
                    b.raw(
                        "text_projection",
                        vec![],
                        Op::LdmOnly(LdmFallback::Constant {
                            value: 1.0,
                            shape: ConstantShape::SquareHidden,
                        }),
                    );
                    b.raw(
                        "logit_scale",
                        vec![],
                        Op::LdmOnly(LdmFallback::Constant {
                            value: 1.0,
                            shape: ConstantShape::Scalar,
                        }),
                    );
                }
            }
        }
    }
}

/// VAE ResNet: identical inner names except `nin_shortcut` <-> `conv_shortcut`.
fn vae_resnet(b: &mut Builder<'_>, ldm: &str, diffusers: &str) {
    for m in ["norm1", "conv1", "norm2", "conv2"] {
        b.copy(&format!("{ldm}.{m}"), &format!("{diffusers}.{m}"), WB);
    }
    b.module(
        &format!("{ldm}.nin_shortcut"),
        &format!("{diffusers}.conv_shortcut"),
        WB,
        Op::Copy,
        true,
    );
}

/// VAE mid block of the encoder or decoder (`which`).
fn vae_mid(b: &mut Builder<'_>, which: &str, attention: bool) {
    vae_resnet(
        b,
        &format!("{which}.mid.block_1"),
        &format!("{which}.mid_block.resnets.0"),
    );
    if attention {
        let (l, d) = (
            format!("{which}.mid.attn_1"),
            format!("{which}.mid_block.attentions.0"),
        );
        b.copy(&format!("{l}.norm"), &format!("{d}.group_norm"), WB);
        for (lm, dm) in [
            ("q", "to_q"),
            ("k", "to_k"),
            ("v", "to_v"),
            ("proj_out", "to_out.0"),
        ] {
            b.module(
                &format!("{l}.{lm}"),
                &format!("{d}.{dm}"),
                W,
                Op::Reshape,
                false,
            );
            b.copy(&format!("{l}.{lm}"), &format!("{d}.{dm}"), &["bias"]);
        }
    }
    vae_resnet(
        b,
        &format!("{which}.mid.block_2"),
        &format!("{which}.mid_block.resnets.1"),
    );
}

/// VAE table: encoder `down.i.block.j` <-> `down_blocks.i.resnets.j`, `down.i.downsample.conv`
/// <-> `down_blocks.i.downsamplers.0.conv`; decoder `up.{levels-1-i}` <-> `up_blocks.i` (the
/// LDM decoder counts levels from the highest resolution, Diffusers from the lowest).
fn vae_entries(out: &mut Vec<KeyEntry>, s: &VaeStructure) {
    let mut b = Builder {
        out,
        component: Component::Vae,
        ldm_prefix: LDM_VAE,
    };
    b.copy("encoder.conv_in", "encoder.conv_in", WB);
    for i in 0..s.levels {
        for j in 0..s.layers_per_block {
            vae_resnet(
                &mut b,
                &format!("encoder.down.{i}.block.{j}"),
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
            );
        }
        if i + 1 < s.levels {
            b.copy(
                &format!("encoder.down.{i}.downsample.conv"),
                &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                WB,
            );
        }
    }
    vae_mid(&mut b, "encoder", s.mid_attention);
    b.copy("encoder.norm_out", "encoder.conv_norm_out", WB);
    b.copy("encoder.conv_out", "encoder.conv_out", WB);
    b.copy("quant_conv", "quant_conv", WB);
    b.copy("post_quant_conv", "post_quant_conv", WB);
    b.copy("decoder.conv_in", "decoder.conv_in", WB);
    vae_mid(&mut b, "decoder", s.mid_attention);
    for i in 0..s.levels {
        let u = s.levels - 1 - i;
        for j in 0..=s.layers_per_block {
            vae_resnet(
                &mut b,
                &format!("decoder.up.{u}.block.{j}"),
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
            );
        }
        if i + 1 < s.levels {
            b.copy(
                &format!("decoder.up.{u}.upsample.conv"),
                &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                WB,
            );
        }
    }
    b.copy("decoder.norm_out", "decoder.conv_norm_out", WB);
    b.copy("decoder.conv_out", "decoder.conv_out", WB);
}
