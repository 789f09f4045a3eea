//! Any text as a gen-img prompt line (`--n`, `--w`, … options), as attention syntax
//! (`(a:1.2)`, `[b]`, escapes), as a sample-prompt line, and as a sample prompt file
//! (.txt / .toml / .json, chosen by the first byte).
//!
//! sd-core links libtorch, and building it with the fuzzer's sanitizer and coverage flags
//! takes longer than the fuzz run itself on a small machine. The prompt parser
//! (`crates/sd-core/src/generate/prompt.rs`) needs nothing from sd-core but its parent's
//! error type, so this target compiles that very source file against a copy of
//! `GenerateError` with the same two variants it uses.
#![no_main]

use libfuzzer_sys::fuzz_target;

// prompt.rs imports `super::{GenerateError, Result}`: here its parent is this crate root.
/// Mirror of `sd_core::generate::GenerateError` (the variants prompt.rs builds).
#[allow(dead_code)]
#[derive(Debug)]
pub enum GenerateError {
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    Invalid(String),
}

type Result<T> = std::result::Result<T, GenerateError>;

#[allow(dead_code, unreachable_pub)]
#[path = "../../crates/sd-core/src/generate/prompt.rs"]
mod prompt;

use prompt::{
    parse_prompt_attention, parse_prompt_line, parse_sample_line, read_prompt_file,
    read_sample_prompts,
};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = parse_prompt_line(text);
        let _ = parse_prompt_attention(text);
        let _ = parse_sample_line(text);
    }
    let ext = ["txt", "toml", "json"][usize::from(kind % 3)];
    let dir = std::env::temp_dir().join(format!("sd-fuzz-pr-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("prompts.{ext}"));
    if std::fs::write(&path, rest).is_err() {
        return;
    }
    let _ = read_prompt_file(&path);
    let _ = read_sample_prompts(&path);
});
