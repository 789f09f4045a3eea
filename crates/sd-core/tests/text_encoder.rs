//! Text-encoder parity with the goldens of `tests/fixtures/goldens/te-*.safetensors`
//! (transformers `CLIPTextModel` on the tiny Diffusers folders; README §5a, tolerance 1e-4 /
//! 1e-4 in f32).

use std::collections::HashMap;

use sd_core::models::text_encoder::{ClipTextModel, OutputLayer, join_chunks};
use sd_core::tokenizer::{ClipTokenizer, PadConvention};
use tch::{Device, Kind, Tensor};

const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-4;

fn golden(name: &str) -> HashMap<String, Tensor> {
    let path = sd_testutil::fixture(&format!("goldens/{name}.safetensors"));
    Tensor::read_safetensors(&path)
        .expect("read golden")
        .into_iter()
        .collect()
}

fn model(folder: &str, kind: Kind) -> ClipTextModel {
    tch::set_num_threads(1);
    // The model's tensors are shallow clones of the store's variables; the store may go.
    let (_vs, m) =
        ClipTextModel::from_diffusers_folder(&sd_testutil::fixture(folder), Device::Cpu, kind)
            .expect("load");
    m
}

fn close(what: &str, actual: &Tensor, expected: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(actual.size(), expected.size(), "{what}: shape");
    let a: Vec<f32> = Vec::try_from(actual.to_kind(Kind::Float).flatten(0, -1)).expect("f32");
    let e: Vec<f32> = Vec::try_from(expected.to_kind(Kind::Float).flatten(0, -1)).expect("f32");
    sd_testutil::assert_close(what, &a, &e, atol, rtol);
}

fn check_common(name: &str, folder: &str) -> (ClipTextModel, HashMap<String, Tensor>) {
    let g = golden(name);
    let m = model(folder, Kind::Float);
    let out = tch::no_grad(|| m.forward(&g["input_ids"]));
    close(
        &format!("{name} last_hidden_state"),
        &out.last_hidden_state,
        &g["last_hidden_state"],
        ATOL,
        RTOL,
    );
    close(
        &format!("{name} hidden_states_1"),
        &out.hidden_states[1],
        &g["hidden_states_1"],
        ATOL,
        RTOL,
    );
    close(
        &format!("{name} penultimate"),
        &out.select(OutputLayer::PenultimateRaw, &m),
        &g["penultimate"],
        ATOL,
        RTOL,
    );
    close(
        &format!("{name} penultimate_final_ln"),
        &out.select(OutputLayer::ClipSkip(2), &m),
        &g["penultimate_final_ln"],
        ATOL,
        RTOL,
    );
    if let Some(p) = g.get("pooler_output") {
        close(&format!("{name} pooler_output"), &out.pooled, p, ATOL, RTOL);
    }
    (m, g)
}

fn ids_of(t: &Tensor, row: i64) -> Vec<i64> {
    Vec::try_from(t.get(row)).expect("ids")
}

#[test]
fn sd15_matches_goldens() {
    let (m, g) = check_common("te-sd15", "tiny-sd15/text_encoder");
    let tok = ClipTokenizer::shipped(PadConvention::EndOfText).expect("tokenizer");
    assert_eq!(
        tok.tokenize("a photo of a cat", 77).expect("ids"),
        ids_of(&g["input_ids"], 0)
    );
    assert_eq!(
        tok.tokenize("", 77).expect("ids"),
        ids_of(&g["input_ids"], 1)
    );
    // sd-scripts --max_token_length 225: three chunks re-joined to 227 positions.
    let chunks = g["sdscripts_mtl225_input_ids"].view([3, 77]);
    let out = tch::no_grad(|| m.forward(&chunks));
    let skip1 = join_chunks(&out.select(OutputLayer::ClipSkip(1), &m), 3);
    let skip2 = join_chunks(&out.select(OutputLayer::ClipSkip(2), &m), 3);
    close(
        "sd15 mtl225 clip_skip1",
        &skip1,
        &g["sdscripts_mtl225_clip_skip1"],
        ATOL,
        RTOL,
    );
    close(
        "sd15 mtl225 clip_skip2",
        &skip2,
        &g["sdscripts_mtl225_clip_skip2"],
        ATOL,
        RTOL,
    );
}

#[test]
fn sd21v_matches_goldens() {
    let (m, g) = check_common("te-sd21v", "tiny-sd21v/text_encoder");
    assert_eq!(m.layers.len(), 23);
    let tok = ClipTokenizer::shipped(PadConvention::Zero).expect("tokenizer");
    assert_eq!(
        tok.tokenize("a photo of a cat", 77).expect("ids"),
        ids_of(&g["input_ids"], 0)
    );
    let chunks = g["sdscripts_mtl225_input_ids"].view([3, 77]);
    let out = tch::no_grad(|| m.forward(&chunks));
    let last = join_chunks(&out.select(OutputLayer::Last, &m), 3);
    close(
        "sd21v mtl225",
        &last,
        &g["sdscripts_mtl225_clip_skip1"],
        ATOL,
        RTOL,
    );
}

#[test]
fn sdxl_te1_matches_goldens() {
    check_common("te-sdxl-te1", "tiny-sdxl/text_encoder");
}

#[test]
fn sdxl_te2_matches_goldens_with_pooled_projection() {
    let (m, g) = check_common("te-sdxl-te2", "tiny-sdxl/text_encoder_2");
    let out = tch::no_grad(|| m.forward(&g["input_ids"]));
    let embeds = out.text_embeds.expect("TE2 has a projection");
    close(
        "sdxl te2 text_embeds",
        &embeds,
        &g["text_embeds"],
        ATOL,
        RTOL,
    );
    close(
        "sdxl te2 sd-scripts pooling",
        &embeds,
        &g["sdscripts_pool_workaround"],
        ATOL,
        RTOL,
    );
}

#[test]
fn sdxl_encode_prompt_matches_diffusers() {
    let g = golden("te-sdxl-encode-prompt");
    let te1 = model("tiny-sdxl/text_encoder", Kind::Float);
    let te2 = model("tiny-sdxl/text_encoder_2", Kind::Float);
    let ids1 = golden("te-sdxl-te1").remove("input_ids").expect("ids");
    let ids2 = golden("te-sdxl-te2").remove("input_ids").expect("ids");
    let (o1, o2) = tch::no_grad(|| (te1.forward(&ids1), te2.forward(&ids2)));
    let context = Tensor::cat(
        &[
            o1.select(OutputLayer::PenultimateRaw, &te1),
            o2.select(OutputLayer::PenultimateRaw, &te2),
        ],
        -1,
    );
    close(
        "sdxl prompt_embeds",
        &context,
        &g["prompt_embeds"],
        ATOL,
        RTOL,
    );
    close(
        "sdxl pooled_prompt_embeds",
        &o2.text_embeds.expect("projection"),
        &g["pooled_prompt_embeds"],
        ATOL,
        RTOL,
    );
}

#[test]
fn half_and_bfloat16_loads_are_cast_and_close() {
    let g = golden("te-sd15");
    for kind in [Kind::Half, Kind::BFloat16] {
        let m = model("tiny-sd15/text_encoder", kind);
        assert_eq!(m.token_embedding.kind(), kind);
        let out = tch::no_grad(|| m.forward(&g["input_ids"]));
        assert_eq!(out.last_hidden_state.kind(), kind);
        let tol = if kind == Kind::Half { 2e-2 } else { 1e-1 };
        close(
            &format!("sd15 {kind:?} last_hidden_state"),
            &out.last_hidden_state,
            &g["last_hidden_state"],
            tol,
            tol,
        );
    }
}
