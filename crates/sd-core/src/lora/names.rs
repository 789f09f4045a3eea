//! Which layers get LoRA modules, their names, ranks and order, and block indices.
//!
//! [`select_modules`] is a pure function of one component's layer list (Diffusers module paths
//! with their Linear/Conv2d geometry), the family and a fresh [`NetworkOptions`]; it never keeps
//! state between calls (the reference mutates a class-level target list, spec §4.5).
//!
//! # Source
//! `../shared/spec/lora-format.md` §4 (selection, names, counts), §5 (block indices); sd-scripts
//! `networks/lora.py` (`LoRANetwork.__init__`, `create_modules`, `get_block_index`).

use std::collections::HashMap;

use sd_formats::family::ModelFamily;
use sd_formats::keymap::{Component, KeyMap, ModelStructure, Op, UnetStructure};

use super::{LoraError, Result};

/// Geometry of a base-model layer that can carry a LoRA module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `nn.Linear(in_features, out_features)`; weight `[out, in]`.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
    },
    /// `nn.Conv2d`; weight `[out, in, kh, kw]`.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel `[kh, kw]`.
        kernel: [usize; 2],
        /// Stride `[sh, sw]`.
        stride: [usize; 2],
        /// Padding `[ph, pw]`.
        padding: [usize; 2],
    },
}

impl LayerKind {
    /// Input features / channels.
    pub fn in_dim(&self) -> usize {
        match *self {
            LayerKind::Linear { in_features, .. } => in_features,
            LayerKind::Conv2d { in_channels, .. } => in_channels,
        }
    }

    /// Output features / channels.
    pub fn out_dim(&self) -> usize {
        match *self {
            LayerKind::Linear { out_features, .. } => out_features,
            LayerKind::Conv2d { out_channels, .. } => out_channels,
        }
    }

    /// The LoRA module kind for this layer.
    pub fn module_kind(&self) -> ModuleKind {
        match *self {
            LayerKind::Linear { .. } => ModuleKind::Linear,
            LayerKind::Conv2d { kernel: [1, 1], .. } => ModuleKind::Conv1x1,
            LayerKind::Conv2d { .. } => ModuleKind::Conv,
        }
    }
}

/// LoRA module kind (spec §2): which rank it takes and how ΔW is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    /// Linear layer: linear rank.
    Linear,
    /// 1×1 convolution: linear rank.
    Conv1x1,
    /// Any other convolution (3×3 in SD): conv rank ("C3Lier"), only with a conv rank.
    Conv,
}

impl ModuleKind {
    /// Manifest spelling: `linear`, `conv1x1`, `conv3x3` (any non-1×1 kernel).
    pub fn manifest_name(self) -> &'static str {
        match self {
            ModuleKind::Linear => "linear",
            ModuleKind::Conv1x1 => "conv1x1",
            ModuleKind::Conv => "conv3x3",
        }
    }
}

/// A layer of a model component: Diffusers module path (e.g.
/// `down_blocks.0.attentions.0.proj_in`, `text_model.encoder.layers.0.mlp.fc1`) and geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Module path inside the component, without `.weight`.
    pub path: String,
    /// Geometry.
    pub kind: LayerKind,
}

/// Target container classes of the reference (spec §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Container {
    /// HF `CLIPAttention` (`…layers.N.self_attn`).
    ClipAttention,
    /// HF `CLIPMLP` (`…layers.N.mlp`).
    ClipMlp,
    /// `Transformer2DModel` (`…attentions.N`): always targeted.
    Transformer2D,
    /// `ResnetBlock2D` (`…resnets.N`): only with a conv rank.
    ResnetBlock2D,
    /// `Downsample2D` (`down_blocks.N.downsamplers.0`): only with a conv rank.
    Downsample2D,
    /// `Upsample2D` (`up_blocks.N.upsamplers.0`): only with a conv rank.
    Upsample2D,
}

impl Container {
    /// The reference's class name.
    pub fn class_name(self) -> &'static str {
        match self {
            Container::ClipAttention => "CLIPAttention",
            Container::ClipMlp => "CLIPMLP",
            Container::Transformer2D => "Transformer2DModel",
            Container::ResnetBlock2D => "ResnetBlock2D",
            Container::Downsample2D => "Downsample2D",
            Container::Upsample2D => "Upsample2D",
        }
    }
}

/// Ranks and alphas of one network. Build a fresh value per network: nothing is shared between
/// calls of [`select_modules`].
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkOptions {
    /// Linear rank (`--network_dim`, default 4); 0 creates no Linear/1×1 modules.
    pub network_dim: usize,
    /// Linear alpha (`--network_alpha`, default 1); 0 means alpha = rank.
    pub network_alpha: f32,
    /// Conv rank (`conv_dim`); `Some` enables the ResNet/sampler containers and 3×3 modules.
    pub conv_dim: Option<usize>,
    /// Conv alpha (`conv_alpha`); `None` = 1.0 (the reference default), 0 means alpha = rank.
    pub conv_alpha: Option<f32>,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        NetworkOptions {
            network_dim: 4,
            network_alpha: 1.0,
            conv_dim: None,
            conv_alpha: None,
        }
    }
}

/// One LoRA module to create: its name in files, the layer it wraps, rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleSpec {
    /// Name as sd-scripts writes it, e.g. `lora_unet_input_blocks_4_1_proj_in`.
    pub name: String,
    /// Component the layer belongs to.
    pub component: Component,
    /// Diffusers module path of the wrapped layer inside `component`.
    pub layer_path: String,
    /// Geometry of the wrapped layer.
    pub layer: LayerKind,
    /// Container class that made the layer a target.
    pub container: Container,
    /// Rank r.
    pub rank: usize,
    /// Alpha (already replaced by the rank when given as 0).
    pub alpha: f32,
    /// Block index (spec §5.1 / §5.2; −1 for text encoders).
    pub block_index: i32,
}

impl ModuleSpec {
    /// Module kind (from the layer geometry).
    pub fn kind(&self) -> ModuleKind {
        self.layer.module_kind()
    }

    /// `lora_down.weight` shape: `[r, in]` or `[r, in, kh, kw]`.
    pub fn down_shape(&self) -> Vec<usize> {
        match self.layer {
            LayerKind::Linear { in_features, .. } => vec![self.rank, in_features],
            LayerKind::Conv2d {
                in_channels,
                kernel,
                ..
            } => vec![self.rank, in_channels, kernel[0], kernel[1]],
        }
    }

    /// `lora_up.weight` shape: `[out, r]` or `[out, r, 1, 1]`.
    pub fn up_shape(&self) -> Vec<usize> {
        match self.layer {
            LayerKind::Linear { out_features, .. } => vec![out_features, self.rank],
            LayerKind::Conv2d { out_channels, .. } => vec![out_channels, self.rank, 1, 1],
        }
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// Name prefix of a component's modules (`lora_unet`, `lora_te`, `lora_te1`, `lora_te2`).
///
/// # Errors
/// [`LoraError::Invalid`] for the VAE and for a second text encoder outside SDXL.
pub fn lora_prefix(family: ModelFamily, component: Component) -> Result<&'static str> {
    match (family, component) {
        (_, Component::Unet) => Ok("lora_unet"),
        (ModelFamily::Sdxl, Component::TextEncoder) => Ok("lora_te1"),
        (_, Component::TextEncoder) => Ok("lora_te"),
        (ModelFamily::Sdxl, Component::TextEncoder2) => Ok("lora_te2"),
        (f, c) => Err(LoraError::Invalid(format!(
            "{f} has no LoRA modules on {c}"
        ))),
    }
}

/// The container of a Diffusers module path and the container's path length in segments.
fn container_of(component: Component, segs: &[&str]) -> Option<(Container, usize)> {
    match component {
        Component::TextEncoder | Component::TextEncoder2 => {
            if segs.len() > 5 && segs[..3] == ["text_model", "encoder", "layers"] {
                match segs[4] {
                    "self_attn" => Some((Container::ClipAttention, 5)),
                    "mlp" => Some((Container::ClipMlp, 5)),
                    _ => None,
                }
            } else {
                None
            }
        }
        Component::Unet => {
            let (kind_at, len) = match segs.first() {
                Some(&"mid_block") => (1, 3),
                Some(&"down_blocks") | Some(&"up_blocks") => (2, 4),
                _ => return None,
            };
            if segs.len() <= len {
                return None;
            }
            let c = match (segs[0], segs[kind_at]) {
                (_, "attentions") => Container::Transformer2D,
                (_, "resnets") => Container::ResnetBlock2D,
                ("down_blocks", "downsamplers") => Container::Downsample2D,
                ("up_blocks", "upsamplers") => Container::Upsample2D,
                _ => return None,
            };
            Some((c, len))
        }
        Component::Vae => None,
    }
}

/// Sibling order of the reference's `named_modules()` walk, for the segment names that occur
/// in LoRA targets (Diffusers and SAI layouts). Numbers sort numerically; unknown names last.
const ORDER: &[&str] = &[
    // text encoders
    "text_model",
    "encoder",
    "layers",
    "self_attn",
    "mlp",
    "k_proj",
    "v_proj",
    "q_proj",
    "out_proj",
    "fc1",
    "fc2",
    // U-Net, sd-scripts' Diffusers-0.10 tree: the mid block is registered after the up blocks
    "down_blocks",
    "up_blocks",
    "mid_block",
    "attentions",
    "resnets",
    "downsamplers",
    "upsamplers",
    // SAI tree
    "input_blocks",
    "middle_block",
    "output_blocks",
    // transformer internals: BasicTransformerBlock registers attn1, ff, attn2
    "proj_in",
    "transformer_blocks",
    "proj_out",
    "attn1",
    "ff",
    "attn2",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "net",
    "proj",
    // ResNet internals (Diffusers, then SAI)
    "conv1",
    "time_emb_proj",
    "conv2",
    "conv_shortcut",
    "in_layers",
    "emb_layers",
    "out_layers",
    "skip_connection",
    "op",
    "conv",
];

/// Sort key of a module path: per segment (class, rank or number, unknown name).
type OrderKey = Vec<(u8, usize, String)>;

fn order_key(path: &str) -> OrderKey {
    path.split('.')
        .map(|s| {
            if let Ok(n) = s.parse::<usize>() {
                (1, n, String::new())
            } else if let Some(i) = ORDER.iter().position(|o| *o == s) {
                (0, i, String::new())
            } else {
                (2, 0, s.to_owned())
            }
        })
        .collect()
}

/// Diffusers ↔ single-file (LDM/SAI) module paths of U-Net layers, from the key tables.
///
/// Paths are dotted module paths without `.weight` and without `model.diffusion_model.`.
#[derive(Debug, Clone, Default)]
pub struct UnetPathMap {
    to_ldm: HashMap<String, String>,
    to_diffusers: HashMap<String, String>,
}

impl UnetPathMap {
    /// Builds the map of a U-Net structure from the family's key table.
    ///
    /// # Errors
    /// [`LoraError::KeyMap`] when the table cannot be generated.
    pub fn new(family: ModelFamily, unet: UnetStructure) -> Result<Self> {
        let structure = ModelStructure {
            unet: Some(unet),
            text_encoders: Vec::new(),
            vae: None,
        };
        let map = KeyMap::new(family, structure)?;
        let mut out = UnetPathMap::default();
        for e in map.entries() {
            if e.component != Component::Unet || !matches!(e.op, Op::Copy) {
                continue;
            }
            let [d] = e.diffusers_keys.as_slice() else {
                continue;
            };
            let (Some(d), Some(l)) = (
                d.strip_suffix(".weight"),
                e.ldm_key
                    .strip_prefix("model.diffusion_model.")
                    .and_then(|k| k.strip_suffix(".weight")),
            ) else {
                continue;
            };
            out.to_ldm.insert(d.to_owned(), l.to_owned());
            out.to_diffusers.insert(l.to_owned(), d.to_owned());
        }
        Ok(out)
    }

    /// A map covering every U-Net of `family` that LoRA files are made for: the full-size
    /// layout with every attention level given a transformer depth of 10 (extra depth only adds
    /// paths, it never renumbers blocks), so tiny and full-size models both resolve.
    pub fn superset(family: ModelFamily) -> Self {
        let unet = match family {
            ModelFamily::Sdxl => UnetStructure {
                levels: 3,
                layers_per_block: 2,
                down_depths: vec![10, 10, 10],
                mid_depth: 10,
                up_depths: vec![10, 10, 10],
                add_embedding: true,
            },
            ModelFamily::Sd1 | ModelFamily::Sd2 => UnetStructure {
                levels: 4,
                layers_per_block: 2,
                down_depths: vec![10, 10, 10, 0],
                mid_depth: 10,
                up_depths: vec![0, 10, 10, 10],
                add_embedding: false,
            },
        };
        Self::new(family, unet).expect("the built-in superset structure generates a valid table")
    }

    /// Single-file path of a Diffusers layer path (`down_blocks.1.attentions.0.proj_in` →
    /// `input_blocks.4.1.proj_in`).
    pub fn to_ldm(&self, diffusers_path: &str) -> Option<&str> {
        self.to_ldm.get(diffusers_path).map(String::as_str)
    }

    /// Diffusers path of a single-file layer path.
    pub fn to_diffusers(&self, ldm_path: &str) -> Option<&str> {
        self.to_diffusers.get(ldm_path).map(String::as_str)
    }

    /// Iterates over (Diffusers path, single-file path) pairs.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.to_ldm.iter().map(|(d, l)| (d.as_str(), l.as_str()))
    }
}

/// The LoRA modules of one component, in the reference's creation order.
///
/// Rules (spec §4.1): layers inside `CLIPAttention`/`CLIPMLP` (text encoders) or
/// `Transformer2DModel` (U-Net `…attentions.N`) are targets; with `opts.conv_dim` also layers
/// inside `ResnetBlock2D`, `Downsample2D`, `Upsample2D`. Linear and 1×1 conv layers get
/// `network_dim`/`network_alpha`, other convs `conv_dim`/`conv_alpha` and are skipped without a
/// conv rank. A rank of 0 creates no module. Names: prefix + `_` + module path with `.` → `_`;
/// SD1/SD2 U-Net paths stay Diffusers paths, SDXL U-Net paths are mapped to SAI paths through
/// the key table built from `layers`.
///
/// # Errors
/// [`LoraError::Invalid`] for the VAE, a second text encoder outside SDXL, or an SDXL U-Net
/// layer the key table cannot map; [`LoraError::KeyMap`] when the layer list has no valid
/// U-Net structure.
pub fn select_modules(
    family: ModelFamily,
    component: Component,
    layers: &[Layer],
    opts: &NetworkOptions,
) -> Result<Vec<ModuleSpec>> {
    let prefix = lora_prefix(family, component)?;
    let sai = if family == ModelFamily::Sdxl && component == Component::Unet {
        let keys: Vec<String> = layers
            .iter()
            .map(|l| format!("{}.weight", l.path))
            .collect();
        let structure = ModelStructure::from_diffusers_keys(
            family,
            keys.iter().map(|k| (Component::Unet, k.as_str())),
            "U-Net layer list",
        )?;
        let unet = structure.unet.ok_or_else(|| {
            LoraError::Invalid("the SDXL U-Net layer list has no down_blocks".into())
        })?;
        Some(UnetPathMap::new(family, unet)?)
    } else {
        None
    };
    let alpha_or_rank = |alpha: f32, rank: usize| {
        if alpha == 0.0 { rank as f32 } else { alpha }
    };

    let mut out: Vec<(OrderKey, ModuleSpec)> = Vec::new();
    for layer in layers {
        let segs: Vec<&str> = layer.path.split('.').collect();
        let Some((container, _)) = container_of(component, &segs) else {
            continue;
        };
        if container != Container::Transformer2D
            && component == Component::Unet
            && opts.conv_dim.is_none()
        {
            continue;
        }
        let (rank, alpha) = match layer.kind.module_kind() {
            ModuleKind::Linear | ModuleKind::Conv1x1 => (
                opts.network_dim,
                alpha_or_rank(opts.network_alpha, opts.network_dim),
            ),
            ModuleKind::Conv => match opts.conv_dim {
                Some(r) => (r, alpha_or_rank(opts.conv_alpha.unwrap_or(1.0), r)),
                None => continue,
            },
        };
        if rank == 0 {
            continue;
        }
        let named_path = match &sai {
            Some(map) => map
                .to_ldm(&layer.path)
                .ok_or_else(|| {
                    LoraError::Invalid(format!(
                        "SDXL U-Net layer \"{}\" has no single-file (SAI) name in the key table",
                        layer.path
                    ))
                })?
                .to_owned(),
            None => layer.path.clone(),
        };
        let name = format!("{prefix}_{}", named_path.replace('.', "_"));
        let block_index = block_index(family, &name);
        out.push((
            order_key(&named_path),
            ModuleSpec {
                name,
                component,
                layer_path: layer.path.clone(),
                layer: layer.kind,
                container,
                rank,
                alpha,
                block_index,
            },
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    for w in out.windows(2) {
        if w[0].1.name == w[1].1.name {
            return Err(LoraError::Invalid(format!(
                "two layers give the LoRA name \"{}\"",
                w[0].1.name
            )));
        }
    }
    Ok(out.into_iter().map(|(_, m)| m).collect())
}

/// Leading decimal number of `s` and the rest after it.
fn leading_number(s: &str) -> Option<(i32, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    Some((s[..end].parse().ok()?, &s[end..]))
}

/// Block index of a LoRA name: SD1/SD2 "25 blocks" (spec §5.1) or SDXL "23 blocks" (§5.2);
/// −1 for names outside the U-Net blocks (text encoders).
pub fn block_index(family: ModelFamily, name: &str) -> i32 {
    if family == ModelFamily::Sdxl {
        let Some(rest) = name.strip_prefix("lora_unet_") else {
            return -1;
        };
        if rest.starts_with("time_embed_") || rest.starts_with("label_emb_") {
            return 0;
        }
        for (p, base) in [
            ("input_blocks_", 1),
            ("middle_block_", 10),
            ("output_blocks_", 13),
        ] {
            if let Some((n, _)) = rest.strip_prefix(p).and_then(leading_number) {
                return base + n;
            }
        }
        if rest.starts_with("out_") {
            return 22;
        }
        return -1;
    }
    // First match of `(up|down)_blocks_<i>_(resnets|upsamplers|downsamplers|attentions)_<j>_`.
    let mut best: Option<(usize, i32)> = None;
    for (word, up) in [("down_blocks_", false), ("up_blocks_", true)] {
        let mut from = 0;
        while let Some(pos) = name[from..].find(word) {
            let at = from + pos;
            from = at + 1;
            let Some((i, rest)) = leading_number(&name[at + word.len()..]) else {
                continue;
            };
            let Some(rest) = rest.strip_prefix('_') else {
                continue;
            };
            let Some((kind, rest)) = ["resnets_", "upsamplers_", "downsamplers_", "attentions_"]
                .iter()
                .find_map(|k| rest.strip_prefix(k).map(|r| (*k, r)))
            else {
                continue;
            };
            let Some((j, rest)) = leading_number(rest) else {
                continue;
            };
            if !rest.starts_with('_') {
                continue;
            }
            let idx = match (up, kind) {
                (false, "downsamplers_") => 1 + 3 * i + 2,
                (false, _) => 1 + 3 * i + j,
                (true, "upsamplers_") => 13 + 3 * i + 2,
                (true, _) => 13 + 3 * i + j,
            };
            if best.is_none_or(|(p, _)| at < p) {
                best = Some((at, idx));
            }
            break;
        }
    }
    if let Some((_, idx)) = best {
        return idx;
    }
    if name.contains("mid_block_") { 12 } else { -1 }
}

/// Slot of a LoRA name in a 26-entry layer-block-weight vector (spec §5.3): 0 = text encoders,
/// 1..12 = IN00..IN11, 13 = MID, 14..25 = OUT00..OUT11 (SDXL `out_*` → 23). `None` when the
/// name fits no slot.
pub fn lbw_slot(family: ModelFamily, name: &str) -> Option<usize> {
    if name.contains("text_model_encoder_") {
        return Some(0);
    }
    let rest = name.strip_prefix("lora_unet_")?;
    if family == ModelFamily::Sdxl {
        if rest.starts_with("time_embed_") || rest.starts_with("label_emb_") {
            return Some(1);
        }
        if let Some((n, _)) = rest.strip_prefix("input_blocks_").and_then(leading_number) {
            return usize::try_from(1 + n).ok();
        }
        if rest.starts_with("middle_block_") {
            return Some(13);
        }
        if let Some((n, _)) = rest.strip_prefix("output_blocks_").and_then(leading_number) {
            return usize::try_from(14 + n).ok();
        }
        return rest.starts_with("out_").then_some(23);
    }
    let idx = block_index(family, name);
    if idx == 12 {
        return Some(13);
    }
    // §5.1 indices 1..=11 are IN01..IN11 → slots 2..=12; 13..=24 are OUT00..OUT11 → 14..=25.
    match idx {
        1..=11 => usize::try_from(idx + 1).ok(),
        13..=24 => usize::try_from(idx + 1).ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_block_indices() {
        let f = ModelFamily::Sd1;
        assert_eq!(
            block_index(f, "lora_unet_down_blocks_0_attentions_1_proj_in"),
            2
        );
        assert_eq!(
            block_index(f, "lora_unet_down_blocks_2_downsamplers_0_conv"),
            9
        );
        assert_eq!(
            block_index(f, "lora_unet_up_blocks_0_upsamplers_0_conv"),
            15
        );
        assert_eq!(block_index(f, "lora_unet_up_blocks_3_resnets_2_conv1"), 24);
        assert_eq!(block_index(f, "lora_unet_mid_block_resnets_1_conv2"), 12);
        assert_eq!(
            block_index(f, "lora_te_text_model_encoder_layers_0_mlp_fc1"),
            -1
        );
        assert_eq!(
            lbw_slot(f, "lora_unet_down_blocks_2_downsamplers_0_conv"),
            Some(10)
        );
        assert_eq!(
            lbw_slot(f, "lora_unet_up_blocks_1_upsamplers_0_conv"),
            Some(19)
        );
        assert_eq!(
            lbw_slot(f, "lora_te_text_model_encoder_layers_0_mlp_fc1"),
            Some(0)
        );
    }

    #[test]
    fn sdxl_block_indices() {
        let f = ModelFamily::Sdxl;
        assert_eq!(block_index(f, "lora_unet_input_blocks_4_1_proj_in"), 5);
        assert_eq!(block_index(f, "lora_unet_middle_block_2_out_layers_3"), 12);
        assert_eq!(
            block_index(f, "lora_unet_output_blocks_8_0_skip_connection"),
            21
        );
        assert_eq!(
            block_index(f, "lora_te2_text_model_encoder_layers_0_mlp_fc1"),
            -1
        );
        assert_eq!(
            lbw_slot(f, "lora_unet_middle_block_2_out_layers_3"),
            Some(13)
        );
        assert_eq!(
            lbw_slot(f, "lora_unet_output_blocks_8_0_skip_connection"),
            Some(22)
        );
    }
}
