//! CLIP text encoders in the layout of transformers' `CLIPTextModel` /
//! `CLIPTextModelWithProjection` (the Diffusers `text_encoder*/` folders): CLIP ViT-L/14 (SD 1.x,
//! SDXL encoder 1), OpenCLIP ViT-H with 23 layers (SD 2.x) and OpenCLIP ViT-bigG with a text
//! projection (SDXL encoder 2).
//!
//! Variable names are the Diffusers state-dict keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
//! `text_projection.weight`), relative to the `nn::Path` the model is built under, so LoRA names
//! (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`) derive from them.
//!
//! Parameters are created uninitialised (`Tensor::empty`, never touched) and not trainable:
//! they are meant to be filled by [`crate::weights::load_var_store`], which fails on any missing
//! key, so an unloaded model cannot be used by accident. Building a full-size model therefore
//! costs address space but no resident memory (the manifest tests rely on this).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor, nn};

use crate::weights::{LoadOptions, WeightsError, load_var_store};

/// Errors from building or loading a text encoder.
#[derive(Debug, thiserror::Error)]
pub enum TextEncoderError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `config.json` is not a valid CLIP text configuration.
    #[error("invalid text encoder config {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What was expected and what was found.
        reason: String,
    },
    /// libtorch could not read a weights file.
    #[error("reading weights {path}: {source}")]
    Tch {
        /// The file.
        path: PathBuf,
        /// The libtorch error.
        source: tch::TchError,
    },
    /// The weights do not fit the model.
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, TextEncoderError>;

/// Activation of the MLP inside each encoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Activation {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP ViT-L/14).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP ViT-H / bigG).
    #[serde(rename = "gelu")]
    Gelu,
}

/// Architecture of a CLIP text encoder (the fields of transformers' `CLIPTextConfig` that shape
/// the network).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408).
    pub vocab_size: i64,
    /// Width D of the hidden states.
    pub hidden_size: i64,
    /// Width of the MLP's inner layer.
    pub intermediate_size: i64,
    /// Number of encoder layers N.
    pub num_hidden_layers: i64,
    /// Attention heads per layer (head dim = D / heads).
    pub num_attention_heads: i64,
    /// Number of positions (77).
    pub max_position_embeddings: i64,
    /// MLP activation.
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (`CLIPTextModelWithProjection` only).
    #[serde(default)]
    pub projection_dim: Option<i64>,
    /// Whether the model has `text_projection.weight` (SDXL encoder 2). In a `config.json` this
    /// is `architectures == ["CLIPTextModelWithProjection"]`.
    #[serde(skip)]
    pub with_projection: bool,
}

fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    fn clip(hidden: i64, layers: i64, heads: i64, act: Activation) -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: hidden,
            intermediate_size: hidden * 4,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            max_position_embeddings: 77,
            hidden_act: act,
            layer_norm_eps: 1e-5,
            projection_dim: None,
            with_projection: false,
        }
    }

    /// CLIP ViT-L/14 text tower: SD 1.x and SDXL text encoder 1 (768 wide, 12 layers, 12 heads,
    /// quick GELU). Source: training.md §8.1, sd-scripts `model_util` / `sdxl_model_util`.
    pub fn clip_vit_l14() -> Self {
        Self::clip(768, 12, 12, Activation::QuickGelu)
    }

    /// OpenCLIP ViT-H/14 text tower as SD 2.x uses it: 1024 wide, **23** layers (the 24th is
    /// dropped), 16 heads, GELU.
    pub fn open_clip_vit_h14() -> Self {
        Self::clip(1024, 23, 16, Activation::Gelu)
    }

    /// OpenCLIP ViT-bigG/14 text tower with its 1280×1280 text projection: SDXL text encoder 2
    /// (1280 wide, 32 layers, 20 heads, GELU).
    pub fn open_clip_vit_bigg14() -> Self {
        Self {
            projection_dim: Some(1280),
            with_projection: true,
            ..Self::clip(1280, 32, 20, Activation::Gelu)
        }
    }

    /// Reads a transformers `config.json` (`text_encoder*/config.json` of a Diffusers folder).
    ///
    /// # Errors
    /// [`TextEncoderError::Io`] or [`TextEncoderError::Config`] (missing key, unknown activation,
    /// width not divisible by the head count).
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| TextEncoderError::Io {
            path: path.to_owned(),
            source,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| TextEncoderError::Config {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        Self::from_json_value(&value, &path.display().to_string())
    }

    /// Parses a transformers `CLIPTextConfig` already read as JSON; `source_name` names where
    /// it came from in errors (a file, or a metadata key).
    ///
    /// # Errors
    /// [`TextEncoderError::Config`] on missing fields or an inconsistent head count.
    pub fn from_json_value(value: &serde_json::Value, source_name: &str) -> Result<Self> {
        let invalid = |reason: String| TextEncoderError::Config {
            path: PathBuf::from(source_name),
            reason,
        };
        let mut config: Self =
            serde_json::from_value(value.clone()).map_err(|e| invalid(e.to_string()))?;
        config.with_projection = value
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str() == Some("CLIPTextModelWithProjection"))
            });
        if config.num_attention_heads <= 0 || config.hidden_size % config.num_attention_heads != 0 {
            return Err(invalid(format!(
                "hidden_size {} must be a multiple of num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        Ok(config)
    }
}

fn param(p: &nn::Path, name: &str, dims: &[i64], kind: Kind) -> Tensor {
    // Uninitialised and untouched: the loader fills it (see the module docs).
    p.add(name, Tensor::empty(dims, (kind, p.device())), false)
}

pub use super::layers::Linear;

/// A Linear layer with Diffusers names `weight` [out, in] and `bias` [out], registered for
/// LoRA like every model layer (see [`super::layers::collect_layers`]).
fn linear(p: nn::Path, in_dim: i64, out_dim: i64, bias: bool, kind: Kind) -> Linear {
    Linear::with_kind(&p, in_dim, out_dim, bias, kind)
}

/// LayerNorm over the last dimension with `weight` and `bias`.
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale, shape [D].
    pub weight: Tensor,
    /// Shift, shape [D].
    pub bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    fn new(p: nn::Path, dim: i64, eps: f64, kind: Kind) -> Self {
        Self {
            weight: param(&p, "weight", &[dim], kind),
            bias: param(&p, "bias", &[dim], kind),
            eps,
        }
    }

    fn shallow_copy(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            eps: self.eps,
        }
    }

    /// `x` [..., D] → [..., D].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = *x
            .size()
            .last()
            .expect("layer norm input has a last dimension");
        x.layer_norm([d], Some(&self.weight), Some(&self.bias), self.eps, true)
    }
}

/// Causal multi-head self-attention (`self_attn.{q,k,v,out}_proj`).
#[derive(Debug)]
pub struct ClipAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    heads: i64,
}

impl ClipAttention {
    fn new(p: nn::Path, c: &ClipTextConfig, kind: Kind) -> Self {
        let d = c.hidden_size;
        Self {
            q_proj: linear(&p / "q_proj", d, d, true, kind),
            k_proj: linear(&p / "k_proj", d, d, true, kind),
            v_proj: linear(&p / "v_proj", d, d, true, kind),
            out_proj: linear(&p / "out_proj", d, d, true, kind),
            heads: c.num_attention_heads,
        }
    }

    fn shallow_copy(&self) -> Self {
        use super::checkpoint::copy_linear;
        Self {
            q_proj: copy_linear(&self.q_proj),
            k_proj: copy_linear(&self.k_proj),
            v_proj: copy_linear(&self.v_proj),
            out_proj: copy_linear(&self.out_proj),
            heads: self.heads,
        }
    }

    /// `x` [B, T, D] → [B, T, D], each position attending to itself and earlier positions
    /// (libtorch `scaled_dot_product_attention`, `is_causal`, scale 1/√head_dim).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (b, t, d) = x.size3().expect("attention input is [B, T, D]");
        let split = |y: Tensor| y.view([b, t, self.heads, d / self.heads]).transpose(1, 2);
        let q = split(self.q_proj.forward(x));
        let k = split(self.k_proj.forward(x));
        let v = split(self.v_proj.forward(x));
        let o = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        self.out_proj.forward(&o.transpose(1, 2).reshape([b, t, d]))
    }
}

/// The MLP (`mlp.fc1`, activation, `mlp.fc2`).
#[derive(Debug)]
pub struct ClipMlp {
    /// D → intermediate.
    pub fc1: Linear,
    /// intermediate → D.
    pub fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    /// `x` [..., D] → [..., D].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.forward(x);
        let h = match self.act {
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            Activation::Gelu => h.gelu("none"),
        };
        self.fc2.forward(&h)
    }
}

/// One pre-norm transformer layer (`text_model.encoder.layers.{i}`).
#[derive(Debug)]
pub struct ClipEncoderLayer {
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// Causal self-attention.
    pub self_attn: ClipAttention,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm,
    /// The MLP.
    pub mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(p: nn::Path, c: &ClipTextConfig, kind: Kind) -> Self {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        Self {
            layer_norm1: LayerNorm::new(&p / "layer_norm1", d, eps, kind),
            self_attn: ClipAttention::new(&p / "self_attn", c, kind),
            layer_norm2: LayerNorm::new(&p / "layer_norm2", d, eps, kind),
            mlp: ClipMlp {
                fc1: linear(&p / "mlp" / "fc1", d, c.intermediate_size, true, kind),
                fc2: linear(&p / "mlp" / "fc2", c.intermediate_size, d, true, kind),
                act: c.hidden_act,
            },
        }
    }

    /// A copy sharing every tensor and adapter slot (for a gradient-checkpoint closure).
    pub(crate) fn shallow_copy(&self) -> Self {
        use super::checkpoint::copy_linear;
        Self {
            layer_norm1: self.layer_norm1.shallow_copy(),
            self_attn: self.self_attn.shallow_copy(),
            layer_norm2: self.layer_norm2.shallow_copy(),
            mlp: ClipMlp {
                fc1: copy_linear(&self.mlp.fc1),
                fc2: copy_linear(&self.mlp.fc2),
                act: self.mlp.act,
            },
        }
    }

    /// `x` [B, T, D] → [B, T, D]: `x + attn(ln1(x))`, then `+ mlp(ln2(·))`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = x + self.self_attn.forward(&self.layer_norm1.forward(x));
        let y = self.mlp.forward(&self.layer_norm2.forward(&x));
        x + y
    }
}

/// Outputs of one text-encoder pass.
#[derive(Debug)]
pub struct TextEncoderOutput {
    /// `[embeddings, layer 1, …, layer N]` outputs, each [B, T, D], without final LayerNorm
    /// (transformers' `hidden_states`).
    pub hidden_states: Vec<Tensor>,
    /// Final LayerNorm of the last layer's output, [B, T, D].
    pub last_hidden_state: Tensor,
    /// `last_hidden_state` at the position of the largest id of each row (the first EOS for
    /// any tokenisation of this crate), [B, D] (transformers' `pooler_output`, quirk 13 of the
    /// fixtures README).
    pub pooled: Tensor,
    /// `pooled · text_projectionᵀ`, [B, projection_dim]: SDXL's pooled text embedding
    /// (`text_embeds`); `None` without a projection.
    pub text_embeds: Option<Tensor>,
}

/// Which hidden state conditions the U-Net.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputLayer {
    /// The last layer after the final LayerNorm (SD default, `--clip_skip` unset or 1).
    Last,
    /// sd-scripts' `--clip_skip k` (k ≥ 1): `hidden_states[N + 1 − k]` with the final LayerNorm
    /// applied (training.md §4.3; diffusers' `clip_skip = k − 1`).
    ClipSkip(usize),
    /// `hidden_states[N − 1]` (penultimate layer) **without** final LayerNorm: what SDXL feeds the
    /// U-Net from both encoders.
    PenultimateRaw,
}

impl TextEncoderOutput {
    /// The hidden state `layer` selects, [B, T, D]. `ClipSkip(k)` with `k` larger than the number
    /// of hidden states is clamped to the embeddings.
    pub fn select(&self, layer: OutputLayer, encoder: &ClipTextModel) -> Tensor {
        let n = self.hidden_states.len();
        match layer {
            OutputLayer::Last | OutputLayer::ClipSkip(0 | 1) => {
                self.last_hidden_state.shallow_clone()
            }
            OutputLayer::ClipSkip(k) => encoder
                .final_layer_norm
                .forward(&self.hidden_states[n.saturating_sub(k)]),
            OutputLayer::PenultimateRaw => self.hidden_states[n.saturating_sub(2)].shallow_clone(),
        }
    }
}

/// A CLIP text encoder (`CLIPTextModel`, or `CLIPTextModelWithProjection` when the config has a
/// projection).
#[derive(Debug)]
pub struct ClipTextModel {
    /// `text_model.embeddings.token_embedding.weight` [vocab, D].
    pub token_embedding: Tensor,
    /// `text_model.embeddings.position_embedding.weight` [positions, D].
    pub position_embedding: Tensor,
    /// `text_model.encoder.layers.*`.
    pub layers: Vec<ClipEncoderLayer>,
    /// `text_model.final_layer_norm`.
    pub final_layer_norm: LayerNorm,
    /// `text_projection` (no bias), [projection_dim, D].
    pub text_projection: Option<Linear>,
    config: ClipTextConfig,
    linear_layers: Vec<super::layers::LayerHandle>,
    checkpointing: Option<super::checkpoint::Checkpointing>,
}

/// Source keys of Diffusers text-encoder files that hold no parameter (a buffer in older
/// transformers versions).
pub const IGNORED_KEYS: &[&str] = &["text_model.embeddings.position_ids"];

impl ClipTextModel {
    /// Builds the module tree under `p` in f32; see [`ClipTextModel::new_with_kind`].
    pub fn new(p: &nn::Path, config: &ClipTextConfig) -> Self {
        Self::new_with_kind(p, config, Kind::Float)
    }

    /// Builds the module tree under `p` with parameters of `kind` on `p`'s device (loading then
    /// casts every tensor to `kind`, so f16/bf16 models never exist in f32 first).
    pub fn new_with_kind(p: &nn::Path, config: &ClipTextConfig, kind: Kind) -> Self {
        let (mut model, layers) = super::layers::collect_layers(|| Self::build(p, config, kind));
        model.linear_layers = layers;
        model
    }

    /// Every Linear layer in creation order, with paths relative to `p` (what LoRA networks
    /// attach to; see [`super::layers::collect_layers`]).
    pub fn lora_layers(&self) -> &[super::layers::LayerHandle] {
        &self.linear_layers
    }

    fn build(p: &nn::Path, config: &ClipTextConfig, kind: Kind) -> Self {
        let tm = p / "text_model";
        let emb = &tm / "embeddings";
        let d = config.hidden_size;
        Self {
            token_embedding: param(
                &(&emb / "token_embedding"),
                "weight",
                &[config.vocab_size, d],
                kind,
            ),
            position_embedding: param(
                &(&emb / "position_embedding"),
                "weight",
                &[config.max_position_embeddings, d],
                kind,
            ),
            layers: (0..config.num_hidden_layers)
                .map(|i| ClipEncoderLayer::new(&tm / "encoder" / "layers" / i, config, kind))
                .collect(),
            final_layer_norm: LayerNorm::new(
                &tm / "final_layer_norm",
                d,
                config.layer_norm_eps,
                kind,
            ),
            text_projection: config.with_projection.then(|| {
                linear(
                    p / "text_projection",
                    d,
                    config.projection_dim.unwrap_or(d),
                    false,
                    kind,
                )
            }),
            config: config.clone(),
            linear_layers: Vec::new(),
            checkpointing: None,
        }
    }

    /// Gradient checkpointing of every encoder layer (`--gradient_checkpointing`): `Some` with
    /// the trainable tensors the layers use (the LoRA weights on this encoder), `None` to turn
    /// it off. Outputs and gradients are unchanged; backward recomputes each layer.
    pub fn set_gradient_checkpointing(
        &mut self,
        checkpointing: Option<super::checkpoint::Checkpointing>,
    ) {
        self.checkpointing = checkpointing;
    }

    /// The architecture.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Runs the encoder.
    ///
    /// # Shapes
    /// `input_ids` [B, T] int64 with T ≤ `max_position_embeddings` (77); every output as
    /// documented on [`TextEncoderOutput`], in the parameters' dtype.
    ///
    /// # Source
    /// transformers `CLIPTextTransformer.forward` (causal mask, no padding mask, as the SD
    /// pipelines and sd-scripts call it).
    pub fn forward(&self, input_ids: &Tensor) -> TextEncoderOutput {
        let (b, t) = input_ids.size2().expect("input_ids is [B, T]");
        // 1. Token + position embeddings.
        let positions = self.position_embedding.narrow(0, 0, t);
        let mut x =
            Tensor::embedding(&self.token_embedding, input_ids, -1, false, false) + positions;
        // 2. Encoder layers, keeping every intermediate state.
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let next = match &self.checkpointing {
                Some(c) => {
                    let layer = layer.shallow_copy();
                    c.run(move |i| layer.forward(&i[0]), &[&x])
                }
                None => layer.forward(&x),
            };
            hidden_states.push(x);
            x = next;
        }
        hidden_states.push(x.shallow_clone());
        // 3. Final norm and pooling at the largest id (the first EOS).
        let last_hidden_state = self.final_layer_norm.forward(&x);
        let rows = Tensor::arange(b, (Kind::Int64, input_ids.device()));
        let eos = input_ids.to_kind(Kind::Int64).argmax(-1, false);
        let pooled = last_hidden_state.index(&[Some(rows), Some(eos)]);
        let text_embeds = self.text_projection.as_ref().map(|p| p.forward(&pooled));
        TextEncoderOutput {
            hidden_states,
            last_hidden_state,
            pooled,
            text_embeds,
        }
    }

    /// Convenience: builds a model from a Diffusers `text_encoder*/` folder (`config.json` and
    /// `model.safetensors`) in a new `VarStore` on `device` with parameters of `kind`.
    ///
    /// # Errors
    /// Config, I/O and [`WeightsError`] failures naming the file and key.
    pub fn from_diffusers_folder(
        dir: &Path,
        device: Device,
        kind: Kind,
    ) -> Result<(nn::VarStore, Self)> {
        let config = ClipTextConfig::from_json_file(&dir.join("config.json"))?;
        let vs = nn::VarStore::new(device);
        let model = Self::new_with_kind(&vs.root(), &config, kind);
        let weights = dir.join("model.safetensors");
        let tensors: HashMap<String, Tensor> = Tensor::read_safetensors(&weights)
            .map_err(|source| TextEncoderError::Tch {
                path: weights.clone(),
                source,
            })?
            .into_iter()
            .collect();
        load_var_store(
            &vs,
            tensors,
            &weights.display().to_string(),
            IGNORED_KEYS,
            LoadOptions::default(),
        )?;
        Ok((vs, model))
    }
}

/// Re-joins the hidden states of `n` 77-position chunks per prompt into one sequence of
/// `75·n + 2` positions: state 0 of the first chunk, states 1..=75 of every chunk, then the last
/// state of the last chunk (sd-scripts' training rebuild; no EOS fix-up).
///
/// # Shapes
/// `states` [B·n, 77, D] (chunks of one prompt consecutive) → [B, 75·n + 2, D]; `n = 1` returns
/// [B, 77, D] unchanged.
///
/// # Source
/// training.md §4.3 step 3.
pub fn join_chunks(states: &Tensor, n: i64) -> Tensor {
    let (bn, t, d) = states.size3().expect("states is [B·n, T, D]");
    if n <= 1 {
        return states.shallow_clone();
    }
    let s = states.view([bn / n, n * t, d]);
    let mut parts = vec![s.narrow(1, 0, 1)];
    for c in 0..n {
        parts.push(s.narrow(1, c * t + 1, t - 2));
    }
    parts.push(s.narrow(1, n * t - 1, 1));
    Tensor::cat(&parts, 1)
}
