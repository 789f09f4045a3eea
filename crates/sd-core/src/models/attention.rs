//! Attention and the spatial transformer of the U-Net (`Attention`, `FeedForward`,
//! `BasicTransformerBlock`, `Transformer2DModel`).
//!
//! Attention always runs through libtorch's `scaled_dot_product_attention`, which picks the
//! flash or memory-efficient kernel on CUDA and the flash CPU kernel on CPU. sd-scripts'
//! `--xformers`, `--sdpa` and `--mem_eff_attn` all select this path.

use tch::{Kind, Tensor, nn::Path};

use super::layers::{Conv2d, GroupNorm, LayerNorm, Linear};

/// Multi-head attention (`Attention` with `AttnProcessor2_0`).
///
/// # Shapes
/// `x` `[N, L, query_dim]`, `context` `[N, S, context_dim]` (self-attention when `None`) →
/// `[N, L, query_dim]`; inner width `heads · dim_head`.
///
/// # Compatibility
/// With `upcast` (SD2.x `upcast_attention`) and f16/bf16 weights, q/k/v go through SDPA in
/// f32, which avoids the overflow the flag exists for; Diffusers' SDPA processor ignores the
/// flag. In f32 both are the same computation.
#[derive(Debug)]
pub struct Attention {
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection (`to_out.0`; `to_out.1` is dropout).
    pub to_out: Linear,
    heads: i64,
    upcast: bool,
}

/// Settings of an [`Attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionSettings {
    /// Width of the queries (and of the output).
    pub query_dim: i64,
    /// Width of the keys/values source; `None` for self-attention.
    pub context_dim: Option<i64>,
    /// Number of heads.
    pub heads: i64,
    /// Width per head.
    pub dim_head: i64,
    /// Whether q/k/v have biases (U-Net: no; VAE: yes).
    pub qkv_bias: bool,
    /// Compute attention in f32 for low-precision weights.
    pub upcast: bool,
}

impl Attention {
    /// Creates `p.{to_q, to_k, to_v, to_out.0}`.
    pub fn new(p: &Path, s: AttentionSettings) -> Self {
        let inner = s.heads * s.dim_head;
        let ctx = s.context_dim.unwrap_or(s.query_dim);
        Self {
            to_q: Linear::new(&(p / "to_q"), s.query_dim, inner, s.qkv_bias),
            to_k: Linear::new(&(p / "to_k"), ctx, inner, s.qkv_bias),
            to_v: Linear::new(&(p / "to_v"), ctx, inner, s.qkv_bias),
            to_out: Linear::new(&(p / "to_out" / 0), inner, s.query_dim, true),
            heads: s.heads,
            upcast: s.upcast,
        }
    }

    /// A copy sharing every tensor and adapter slot (for a gradient-checkpoint closure).
    pub(crate) fn shallow_copy(&self) -> Self {
        use super::checkpoint::copy_linear;
        Self {
            to_q: copy_linear(&self.to_q),
            to_k: copy_linear(&self.to_k),
            to_v: copy_linear(&self.to_v),
            to_out: copy_linear(&self.to_out),
            heads: self.heads,
            upcast: self.upcast,
        }
    }

    /// Attends from `x` to `context` (or to `x`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(x);
        let (n, l, _) = x.size3().expect("attention input is [N, L, C]");
        let split = |t: Tensor| {
            let inner = t.size()[2];
            t.view([n, -1, self.heads, inner / self.heads])
                .transpose(1, 2)
        };
        let q = split(self.to_q.forward(x));
        let k = split(self.to_k.forward(ctx));
        let v = split(self.to_v.forward(ctx));
        let kind = q.kind();
        let out = if self.upcast && kind != Kind::Float && kind != Kind::Double {
            sdpa(
                &q.to_kind(Kind::Float),
                &k.to_kind(Kind::Float),
                &v.to_kind(Kind::Float),
            )
            .to_kind(kind)
        } else {
            sdpa(&q, &k, &v)
        };
        let out = out.transpose(1, 2).reshape([n, l, -1]);
        self.to_out.forward(&out)
    }
}

/// Unmasked scaled dot-product attention with scale `1/sqrt(dim_head)`.
///
/// # Shapes
/// `q` `[N, heads, L, d]`, `k`/`v` `[N, heads, S, d]` → `[N, heads, L, d]`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false)
}

/// `FeedForward` with GEGLU: `net.2(h · gelu(gate))`, `[h, gate] = net.0.proj(x)` split in
/// halves on the last dimension; inner width `4 · dim`.
#[derive(Debug)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    /// Creates `p.net.0.proj` `[2·inner, dim]` and `p.net.2` `[dim, inner]`.
    pub fn new(p: &Path, dim: i64) -> Self {
        let inner = 4 * dim;
        Self {
            proj: Linear::new(&(p / "net" / 0 / "proj"), dim, 2 * inner, true),
            out: Linear::new(&(p / "net" / 2), inner, dim, true),
        }
    }

    /// A copy sharing every tensor and adapter slot.
    pub(crate) fn shallow_copy(&self) -> Self {
        use super::checkpoint::copy_linear;
        Self {
            proj: copy_linear(&self.proj),
            out: copy_linear(&self.out),
        }
    }

    /// `[N, L, dim]` → `[N, L, dim]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let hg = self.proj.forward(x).chunk(2, -1);
        self.out.forward(&(&hg[0] * hg[1].gelu("none")))
    }
}

/// `BasicTransformerBlock` (`norm_type="layer_norm"`): self-attention, cross-attention and
/// feed-forward, each pre-normed (LayerNorm eps 1e-5) and residual.
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    /// Creates `p.{norm1, attn1, norm2, attn2, norm3, ff}`.
    pub fn new(
        p: &Path,
        dim: i64,
        heads: i64,
        dim_head: i64,
        context_dim: i64,
        upcast: bool,
    ) -> Self {
        let a = |name: &str, context_dim| {
            Attention::new(
                &(p / name),
                AttentionSettings {
                    query_dim: dim,
                    context_dim,
                    heads,
                    dim_head,
                    qkv_bias: false,
                    upcast,
                },
            )
        };
        Self {
            norm1: LayerNorm::new(&(p / "norm1"), dim, 1e-5),
            attn1: a("attn1", None),
            norm2: LayerNorm::new(&(p / "norm2"), dim, 1e-5),
            attn2: a("attn2", Some(context_dim)),
            norm3: LayerNorm::new(&(p / "norm3"), dim, 1e-5),
            ff: FeedForward::new(&(p / "ff"), dim),
        }
    }

    /// A copy sharing every tensor and adapter slot.
    pub(crate) fn shallow_copy(&self) -> Self {
        use super::checkpoint::copy_layer_norm;
        Self {
            norm1: copy_layer_norm(&self.norm1),
            attn1: self.attn1.shallow_copy(),
            norm2: copy_layer_norm(&self.norm2),
            attn2: self.attn2.shallow_copy(),
            norm3: copy_layer_norm(&self.norm3),
            ff: self.ff.shallow_copy(),
        }
    }

    /// `x` `[N, L, dim]`, `context` `[N, S, context_dim]` → `[N, L, dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        // 1. self-attention
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        // 2. cross-attention on the text embedding
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + x;
        // 3. feed-forward
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// Projection into and out of the transformer: 1×1 conv (SD1.x) or linear (SD2.x, SDXL).
#[derive(Debug)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn shallow_copy(&self) -> Self {
        match self {
            Projection::Conv(c) => Projection::Conv(super::checkpoint::copy_conv(c)),
            Projection::Linear(l) => Projection::Linear(super::checkpoint::copy_linear(l)),
        }
    }
}

/// Settings of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerSettings {
    /// Channels of the feature map (also the inner width, `heads · dim_head`).
    pub channels: i64,
    /// Attention heads.
    pub heads: i64,
    /// Number of `transformer_blocks`.
    pub depth: i64,
    /// Width of `encoder_hidden_states`.
    pub context_dim: i64,
    /// GroupNorm groups of `norm` (eps 1e-6).
    pub groups: i64,
    /// `proj_in`/`proj_out` as Linear (true) or 1×1 Conv2d (false).
    pub use_linear_projection: bool,
    /// `upcast_attention`.
    pub upcast_attention: bool,
}

/// `Transformer2DModel` on continuous input: GroupNorm → proj_in → blocks → proj_out, plus
/// the input as residual.
///
/// # Shapes
/// `x` `[N, C, H, W]`, `context` `[N, S, context_dim]` → `[N, C, H, W]`.
///
/// # Source
/// diffusers `models/transformers/transformer_2d.py` (`_operate_on_continuous_inputs`,
/// `_get_output_for_continuous_inputs`).
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    /// Creates `p.{norm, proj_in, transformer_blocks.i, proj_out}`.
    pub fn new(p: &Path, s: TransformerSettings) -> Self {
        let c = s.channels;
        let proj = |name: &str| {
            if s.use_linear_projection {
                Projection::Linear(Linear::new(&(p / name), c, c, true))
            } else {
                Projection::Conv(Conv2d::new(&(p / name), c, c, 1, 1, 0))
            }
        };
        let tb = p / "transformer_blocks";
        Self {
            norm: GroupNorm::new(&(p / "norm"), s.groups, c, 1e-6),
            proj_in: proj("proj_in"),
            blocks: (0..s.depth)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &(&tb / i),
                        c,
                        s.heads,
                        c / s.heads,
                        s.context_dim,
                        s.upcast_attention,
                    )
                })
                .collect(),
            proj_out: proj("proj_out"),
        }
    }

    /// A copy sharing every tensor and adapter slot (for a gradient-checkpoint closure).
    pub(crate) fn shallow_copy(&self) -> Self {
        Self {
            norm: super::checkpoint::copy_group_norm(&self.norm),
            proj_in: self.proj_in.shallow_copy(),
            blocks: self
                .blocks
                .iter()
                .map(BasicTransformerBlock::shallow_copy)
                .collect(),
            proj_out: self.proj_out.shallow_copy(),
        }
    }

    /// Runs the spatial transformer.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let (n, c, h, w) = x.size4().expect("transformer input is [N, C, H, W]");
        // 1. GroupNorm, then project in and flatten to tokens [N, H·W, C]
        let normed = self.norm.forward(x);
        let to_tokens = |t: &Tensor| t.permute([0, 2, 3, 1]).reshape([n, h * w, c]);
        let mut t = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)),
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)),
        };
        // 2. transformer blocks
        for block in &self.blocks {
            t = block.forward(&t, context);
        }
        // 3. back to a feature map and project out
        let to_map = |t: &Tensor| t.reshape([n, h, w, c]).permute([0, 3, 1, 2]).contiguous();
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&t)),
            Projection::Linear(lin) => to_map(&lin.forward(&t)),
        };
        // 4. residual
        out + x
    }
}
