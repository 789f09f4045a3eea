//! Tokenizer parity with `tests/fixtures/tokenizer-goldens.json` (transformers' slow
//! `CLIPTokenizer`, open_clip and sd-scripts; README §1): exact ids for every prompt and every
//! padding convention, and sd-scripts' chunking for max_token_length None / 150 / 225.

use sd_core::tokenizer::{ClipTokenizer, PadConvention};
use serde_json::Value;

fn goldens() -> Value {
    let path = sd_testutil::fixture("tokenizer-goldens.json");
    serde_json::from_str(&std::fs::read_to_string(&path).expect("read goldens"))
        .expect("parse goldens")
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect()
}

fn tok(pad: PadConvention) -> ClipTokenizer {
    ClipTokenizer::from_dir(&sd_testutil::fixture("tiny-sd15/tokenizer"), pad).expect("tokenizer")
}

#[test]
fn every_prompt_matches_all_conventions() {
    let g = goldens();
    let prompts = g["prompts"].as_array().expect("prompts");
    assert_eq!(prompts.len(), 33);
    let eos = tok(PadConvention::EndOfText);
    let bang = tok(PadConvention::ExclamationSpecial);
    let zero = tok(PadConvention::Zero);
    for p in prompts {
        let text = p["prompt"].as_str().expect("prompt");
        let unpadded = ids(&p["ids_unpadded_untruncated"]);
        let mut got = vec![sd_core::tokenizer::BOS_ID];
        got.extend(eos.encode(text).expect("encode"));
        got.push(sd_core::tokenizer::EOS_ID);
        assert_eq!(got, unpadded, "unpadded ids of {text:?}");
        assert_eq!(
            eos.tokenize(text, 77).expect("sd1"),
            ids(&p["ids_sd1_pad_eos"]),
            "SD1 ids of {text:?}"
        );
        assert_eq!(
            zero.tokenize(text, 77).expect("zero"),
            ids(&p["ids_pad_zero"]),
            "pad-0 ids of {text:?}"
        );
        assert_eq!(
            bang.tokenize(text, 77).expect("bang"),
            ids(&p["ids_sd2_hf_pad_bang"]),
            "SD2 HF ids of {text:?}"
        );
    }
}

#[test]
fn shipped_vocabulary_equals_fixture_folders() {
    let shipped = ClipTokenizer::shipped(PadConvention::EndOfText).expect("shipped");
    let folder = tok(PadConvention::EndOfText);
    let text = "a highly detailed matte painting, ＦＵＬＬ café 🐱 &amp; supercalifragilistic";
    assert_eq!(
        shipped.encode(text).expect("a"),
        folder.encode(text).expect("b")
    );
    let from = ClipTokenizer::from_dir_or_shipped(None, PadConvention::Zero).expect("fallback");
    assert_eq!(from.pad_id(), 0);
}

#[test]
fn folder_declares_its_pad_convention() {
    let sd1 = PadConvention::from_dir(&sd_testutil::fixture("tiny-sd15/tokenizer")).expect("sd1");
    let sd2 = PadConvention::from_dir(&sd_testutil::fixture("tiny-sd21v/tokenizer")).expect("sd2");
    let xl2 = PadConvention::from_dir(&sd_testutil::fixture("tiny-sdxl/tokenizer_2")).expect("xl2");
    assert_eq!(
        (sd1, sd2, xl2),
        (
            PadConvention::EndOfText,
            PadConvention::ExclamationSpecial,
            PadConvention::ExclamationSpecial
        )
    );
}

#[test]
fn sd_scripts_chunking_matches() {
    let g = goldens();
    let cases = g["sd_scripts_tokenize"].as_array().expect("cases");
    assert_eq!(cases.len(), 63);
    let tokenizers = [
        PadConvention::EndOfText,
        PadConvention::ExclamationSpecial,
        PadConvention::Zero,
    ]
    .map(|p| (p, tok(p)));
    for c in cases {
        let pad = match c["convention"].as_str().expect("convention") {
            "v1_pad_eos" => PadConvention::EndOfText,
            "v2_hf_pad_bang" => PadConvention::ExclamationSpecial,
            "sdxl_tok2_pad_zero" => PadConvention::Zero,
            other => panic!("unknown convention {other}"),
        };
        let mtl = c["max_token_length"].as_u64().map(|n| n as usize);
        let text = c["prompt"].as_str().expect("prompt");
        let expected: Vec<Vec<i64>> = c["input_ids"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(ids)
            .collect();
        let t = &tokenizers
            .iter()
            .find(|(p, _)| *p == pad)
            .expect("three conventions")
            .1;
        let got = t.tokenize_chunks(text, mtl).expect("chunks");
        assert_eq!(
            got, expected,
            "{pad:?} max_token_length {mtl:?} prompt {text:?}"
        );
    }
}

#[test]
fn rejects_other_max_token_lengths() {
    let t = tok(PadConvention::EndOfText);
    assert!(t.tokenize_chunks("a", Some(75)).is_err());
    assert!(t.tokenize_chunks("a", Some(300)).is_err());
}

#[test]
fn generation_chunks_close_every_chunk() {
    let t = tok(PadConvention::Zero);
    let text = ["cat"; 80].join(" ");
    let ids = t.tokenize(&text, 152).expect("ids");
    let chunks = t.chunk_generation_ids(&ids);
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[0][0], sd_core::tokenizer::BOS_ID);
    assert_eq!(chunks[0][76], sd_core::tokenizer::EOS_ID);
    assert_eq!(chunks[1][0], sd_core::tokenizer::BOS_ID);
    assert_eq!(&chunks[1][1..4], &ids[76..79]);
}
