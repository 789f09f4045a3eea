//! Any text as a gen-img prompt line (`--n`, `--w`, … options) and as attention syntax
//! (`(a:1.2)`, `[b]`, escapes). Needs `--features prompt` (links libtorch through sd-core).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_core::generate::{parse_prompt_attention, parse_prompt_line};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_prompt_line(text);
    let _ = parse_prompt_attention(text);
    let _ = sd_core::generate::prompt::parse_sample_line(text);
});
