//! Prompt conditioning: weighted tokens, 77-token chunks, text-encoder passes, weight
//! application and SDXL's pooled embedding.
//!
//! # Source
//! generation.md §4.2–§4.4 (sd-scripts gen_img `get_weighted_text_embeddings`).

use sd_formats::family::ModelFamily;
use tch::{Kind, Tensor};

use super::prompt::parse_prompt_attention;
use super::{GenerateError, Result};
use crate::loader::StableDiffusion;
use crate::models::text_encoder::OutputLayer;
use crate::tokenizer::{BOS_ID, CHUNK_TOKENS, ClipTokenizer, EOS_ID, MODEL_MAX_LENGTH};

/// `--emb_normalize_mode`: how weighted embeddings are re-normalised (generation.md §4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmbNormalize {
    /// e ← e·w·(mean(e₀)/mean(e·w)) (the default).
    #[default]
    Original,
    /// The same with mean(|e|).
    Abs,
    /// e ← e·w.
    None,
}

/// How prompts are encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TextOptions {
    /// `--clip_skip`: `None` = the family default (SD: the last layer with final LayerNorm;
    /// SDXL: 2, the penultimate layer without it).
    pub clip_skip: Option<usize>,
    /// `--max_embeddings_multiples` M: prompt capacity in multiples of 75 tokens (≥ 1).
    pub max_embeddings_multiples: usize,
    /// Weight normalisation.
    pub normalize: EmbNormalize,
}

impl Default for TextOptions {
    fn default() -> Self {
        Self {
            clip_skip: None,
            max_embeddings_multiples: 1,
            normalize: EmbNormalize::Original,
        }
    }
}

/// Encoded prompts.
#[derive(Debug)]
pub struct Conditioning {
    /// U-Net context, [B, 77·M', D] in the text encoder's dtype (D = 2048 for full SDXL:
    /// TE1 and TE2 states concatenated).
    pub context: Tensor,
    /// SDXL: TE2's projected pooled output of each text's first chunk, [B, P]; else `None`.
    pub pooled: Option<Tensor>,
}

/// Token ids and per-token weights of one text, without BOS/EOS, BREAK padded to a multiple
/// of 75 (§13 #5 recommendation) and truncated to 75·M tokens.
fn weighted_tokens(
    tokenizer: &ClipTokenizer,
    text: &str,
    max_multiples: usize,
) -> Result<(Vec<i64>, Vec<f64>)> {
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for piece in parse_prompt_attention(text) {
        if piece.is_break {
            let rem = ids.len() % CHUNK_TOKENS;
            if rem != 0 {
                for _ in rem..CHUNK_TOKENS {
                    ids.push(tokenizer.pad_id());
                    weights.push(1.0);
                }
            }
            continue;
        }
        let tokens = tokenizer
            .encode(&piece.text)
            .map_err(|e| GenerateError::Invalid(format!("tokenizing \"{}\": {e}", piece.text)))?;
        weights.extend(std::iter::repeat_n(piece.weight, tokens.len()));
        ids.extend(tokens);
    }
    let cap = CHUNK_TOKENS * max_multiples.max(1);
    if ids.len() > cap {
        tracing::warn!(
            "prompt truncated to {cap} tokens ({} given; raise --max_embeddings_multiples): \"{text}\"",
            ids.len()
        );
        ids.truncate(cap);
        weights.truncate(cap);
    }
    Ok((ids, weights))
}

/// Encodes `texts` (all texts of one call: negatives and prompts together, so they share the
/// chunk count M') with every text encoder of `model`.
///
/// # Errors
/// [`GenerateError::Invalid`] when tokenizing fails.
///
/// # Shapes
/// → [`Conditioning`] with B = `texts.len()`.
pub fn encode_texts(
    model: &StableDiffusion,
    texts: &[&str],
    opts: &TextOptions,
) -> Result<Conditioning> {
    let sdxl = model.family == ModelFamily::Sdxl;
    let m = opts.max_embeddings_multiples.max(1);
    let mut contexts = Vec::new();
    let mut pooled = None;
    for slot in &model.text_encoders {
        let tok = &slot.tokenizer;
        let tokenized: Vec<(Vec<i64>, Vec<f64>)> = texts
            .iter()
            .map(|t| weighted_tokens(tok, t, m))
            .collect::<Result<_>>()?;
        let longest = tokenized.iter().map(|(i, _)| i.len()).max().unwrap_or(0);
        let chunks_n = if longest == 0 {
            1
        } else {
            ((longest - 1) / CHUNK_TOKENS + 1).clamp(1, m)
        };
        let total = CHUNK_TOKENS * chunks_n + 2;
        let mut all_chunks: Vec<i64> = Vec::new();
        let mut all_weights: Vec<f32> = Vec::new();
        for (ids, weights) in &tokenized {
            let mut seq = Vec::with_capacity(total);
            seq.push(BOS_ID);
            seq.extend_from_slice(ids);
            seq.push(EOS_ID);
            seq.resize(total, tok.pad_id());
            for chunk in tok.chunk_generation_ids(&seq) {
                debug_assert_eq!(chunk.len(), MODEL_MAX_LENGTH);
                all_chunks.extend(chunk);
            }
            for j in 0..chunks_n {
                all_weights.push(1.0);
                for k in 0..CHUNK_TOKENS {
                    all_weights
                        .push(weights.get(j * CHUNK_TOKENS + k).copied().unwrap_or(1.0) as f32);
                }
                all_weights.push(1.0);
            }
        }
        let b = texts.len() as i64;
        let n = chunks_n as i64;
        let device = slot.model.token_embedding.device();
        let ids = Tensor::from_slice(&all_chunks)
            .view([b * n, MODEL_MAX_LENGTH as i64])
            .to_device(device);
        let out = tch::no_grad(|| slot.model.forward(&ids));
        let states = if sdxl {
            let k = opts.clip_skip.unwrap_or(2).max(1);
            let hs = &out.hidden_states;
            hs[hs.len().saturating_sub(k)].shallow_clone()
        } else {
            let layer = match opts.clip_skip {
                None | Some(0 | 1) => OutputLayer::Last,
                Some(k) => OutputLayer::ClipSkip(k),
            };
            out.select(layer, &slot.model)
        };
        let d = states.size()[2];
        let states = states.view([b, n * MODEL_MAX_LENGTH as i64, d]);
        let states = apply_weights(&states, &all_weights, opts.normalize);
        if slot.component == sd_formats::keymap::Component::TextEncoder2
            && let Some(te) = &out.text_embeds
        {
            pooled = Some(te.view([b, n, -1]).select(1, 0));
        }
        contexts.push(states);
    }
    let context = if contexts.len() == 1 {
        contexts.pop().expect("one context")
    } else {
        Tensor::cat(&contexts, 2)
    };
    Ok(Conditioning {
        context,
        pooled: if sdxl { pooled } else { None },
    })
}

/// Multiplies each position by its weight and re-normalises (§4.4). All-one weights leave the
/// states untouched.
///
/// # Shapes
/// `states` [B, T, D]; `weights` B·T values → [B, T, D].
pub fn apply_weights(states: &Tensor, weights: &[f32], mode: EmbNormalize) -> Tensor {
    if weights.iter().all(|&w| w == 1.0) {
        return states.shallow_clone();
    }
    let (b, t, _) = states.size3().expect("states are [B, T, D]");
    let kind = states.kind();
    let e = states.to_kind(Kind::Float);
    let w = Tensor::from_slice(weights)
        .view([b, t, 1])
        .to_device(e.device());
    let mean = |x: &Tensor| match mode {
        EmbNormalize::Abs => x.abs().mean_dim(&[1i64, 2][..], true, Kind::Float),
        _ => x.mean_dim(&[1i64, 2][..], true, Kind::Float),
    };
    let before = mean(&e);
    let weighted = &e * w;
    let out = match mode {
        EmbNormalize::None => weighted,
        _ => {
            let after = mean(&weighted);
            &weighted * (before / after)
        }
    };
    out.to_kind(kind)
}
