//! Prompt text: the attention (weight) syntax, gen_img's per-line options, and train-network's
//! sample prompt files (.txt / .toml / .json).
//!
//! # Source
//! generation.md §4.1 (attention syntax), §5.2 (per-prompt options); training.md §12.1
//! (sample prompt files).

use std::path::Path;

use super::sampler::{Sampler, SamplerConfig, SamplerKind};
use super::{GenerateError, Result};
use crate::schedule::PredictionType;

/// A piece of prompt text with its attention weight.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedPiece {
    /// The text.
    pub text: String,
    /// Its weight (1.0 = unchanged).
    pub weight: f64,
    /// True for a `BREAK` marker (the text is empty; never merged).
    pub is_break: bool,
}

enum Token<'a> {
    Escaped(&'a str),
    OpenRound,
    OpenSquare,
    CloseWeight(f64),
    CloseRound,
    CloseSquare,
    Text(&'a str),
}

/// `:<number>)` with `<number>` = `[+-]?[.\d]+`; returns the number and the bytes consumed.
fn weight_close(s: &str) -> Option<(f64, usize)> {
    let rest = s.strip_prefix(':')?;
    let sign = usize::from(rest.starts_with(['+', '-']));
    let digits = rest[sign..]
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    if digits == 0 || !rest[sign + digits..].starts_with(')') {
        return None;
    }
    // Python's float() refuses "1.2.3" and "."; those make the regex match but the reference
    // would raise — treat them as text instead of failing the whole prompt.
    let value: f64 = rest[..sign + digits].parse().ok()?;
    Some((value, 1 + sign + digits + 1))
}

fn tokens(text: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut i = 0;
    let b = text.as_bytes();
    while i < b.len() {
        let rest = &text[i..];
        let c = b[i];
        if c == b'\\' {
            match rest[1..].chars().next() {
                Some(n @ ('(' | ')' | '[' | ']' | '\\')) => {
                    out.push(Token::Escaped(&rest[1..1 + n.len_utf8()]));
                    i += 2;
                }
                _ => {
                    out.push(Token::Text("\\"));
                    i += 1;
                }
            }
            continue;
        }
        match c {
            b'(' => out.push(Token::OpenRound),
            b'[' => out.push(Token::OpenSquare),
            b':' => {
                if let Some((w, len)) = weight_close(rest) {
                    out.push(Token::CloseWeight(w));
                    i += len;
                    continue;
                }
                out.push(Token::Text(":"));
            }
            b')' => out.push(Token::CloseRound),
            b']' => out.push(Token::CloseSquare),
            _ => {
                let len = rest
                    .find(['\\', '(', ')', '[', ']', ':'])
                    .unwrap_or(rest.len());
                out.push(Token::Text(&rest[..len]));
                i += len;
                continue;
            }
        }
        i += 1;
    }
    out
}

/// Parses the attention syntax: `(text)` ×1.1, `[text]` ÷1.1, `(text:w)` ×w, `\(` literal,
/// `BREAK` a separate marker piece. Adjacent pieces of exactly equal weight are merged; an
/// empty prompt gives one empty piece of weight 1.
///
/// # Source
/// generation.md §4.1 (sd-scripts `parse_prompt_attention`, with gen_img's BREAK handling).
pub fn parse_prompt_attention(text: &str) -> Vec<WeightedPiece> {
    let mut res: Vec<WeightedPiece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<WeightedPiece>, from: usize, m: f64| {
        for p in &mut res[from..] {
            p.weight *= m;
        }
    };
    let push_text = |res: &mut Vec<WeightedPiece>, s: &str| {
        // BREAK splits text into standalone marker pieces (gen_img).
        let mut parts = s.split("BREAK").peekable();
        while let Some(part) = parts.next() {
            if !part.is_empty() {
                res.push(WeightedPiece {
                    text: part.to_owned(),
                    weight: 1.0,
                    is_break: false,
                });
            }
            if parts.peek().is_some() {
                res.push(WeightedPiece {
                    text: String::new(),
                    weight: -1.0,
                    is_break: true,
                });
            }
        }
    };
    for tok in tokens(text) {
        match tok {
            Token::Escaped(s) => res.push(WeightedPiece {
                text: s.to_owned(),
                weight: 1.0,
                is_break: false,
            }),
            Token::OpenRound => round.push(res.len()),
            Token::OpenSquare => square.push(res.len()),
            Token::CloseWeight(w) if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                multiply(&mut res, from, w);
            }
            Token::CloseRound if !round.is_empty() => {
                let from = round.pop().expect("checked non-empty");
                multiply(&mut res, from, 1.1);
            }
            Token::CloseSquare if !square.is_empty() => {
                let from = square.pop().expect("checked non-empty");
                multiply(&mut res, from, 1.0 / 1.1);
            }
            Token::CloseWeight(w) => push_text(&mut res, &format!(":{}", fmt_weight(w))),
            Token::CloseRound => push_text(&mut res, ")"),
            Token::CloseSquare => push_text(&mut res, "]"),
            Token::Text(s) => push_text(&mut res, s),
        }
    }
    for from in round {
        multiply(&mut res, from, 1.1);
    }
    for from in square {
        multiply(&mut res, from, 1.0 / 1.1);
    }
    for p in &mut res {
        if p.is_break {
            p.weight = -1.0;
        }
    }
    if res.is_empty() {
        res.push(WeightedPiece {
            text: String::new(),
            weight: 1.0,
            is_break: false,
        });
    }
    // Merge runs of equal weight (never across BREAK).
    let mut merged: Vec<WeightedPiece> = Vec::with_capacity(res.len());
    for p in res {
        match merged.last_mut() {
            Some(last) if !last.is_break && !p.is_break && last.weight == p.weight => {
                last.text.push_str(&p.text);
            }
            _ => merged.push(p),
        }
    }
    merged
}

fn fmt_weight(w: f64) -> String {
    format!("{w}")
}

/// Options of one gen_img prompt line (generation.md §5.2). `None` = use the command-line
/// value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptOptions {
    /// The prompt text (before the first `" --"`).
    pub prompt: String,
    /// `--n`: negative prompt.
    pub negative_prompt: Option<String>,
    /// `--w`: width in pixels.
    pub width: Option<i64>,
    /// `--h`: height in pixels.
    pub height: Option<i64>,
    /// `--ow` / `--oh`: SDXL original width / height.
    pub original_width: Option<i64>,
    /// See `original_width`.
    pub original_height: Option<i64>,
    /// `--nw` / `--nh`: SDXL negative original width / height.
    pub original_width_negative: Option<i64>,
    /// See `original_width_negative`.
    pub original_height_negative: Option<i64>,
    /// `--ct` / `--cl`: SDXL crop top / left.
    pub crop_top: Option<i64>,
    /// See `crop_top`.
    pub crop_left: Option<i64>,
    /// `--s`: steps, clamped to 1..=1000.
    pub steps: Option<usize>,
    /// `--l`: CFG scale.
    pub scale: Option<f64>,
    /// `--nl`: negative scale; `Some(None)` for `--nl none`.
    pub negative_scale: Option<Option<f64>>,
    /// `--t`: img2img strength (parsed, unused by txt2img).
    pub strength: Option<f64>,
    /// `--c`: clip prompt (metadata only).
    pub clip_prompt: Option<String>,
    /// `--am`: network multipliers.
    pub network_multipliers: Option<Vec<f64>>,
    /// `--f`: output file name.
    pub file_name: Option<String>,
    /// `--d`: seeds.
    pub seeds: Option<Vec<u64>>,
    /// `--ss`: sampler (training sample prompts only).
    pub sampler: Option<String>,
    /// `--g`: guidance scale of other model types (parsed, unused for SD/SDXL).
    pub guidance_scale: Option<f64>,
    /// The line with the `--d` part removed (PNG `raw-prompt`).
    pub raw_prompt: String,
}

/// Removes the first `" --d <digits/commas>"` from `line` and returns the line and the seeds.
fn take_seeds(line: &str) -> (String, Option<Vec<u64>>) {
    let mut search = 0;
    while let Some(pos) = line[search..].find(" --d ") {
        let start = search + pos;
        let value_start = start + " --d ".len();
        let len = line[value_start..]
            .bytes()
            .take_while(|b| b.is_ascii_digit() || *b == b',')
            .count();
        if len > 0 {
            let seeds: Vec<u64> = line[value_start..value_start + len]
                .split(',')
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            let rest = format!("{}{}", &line[..start], &line[value_start + len..]);
            return (rest, Some(seeds));
        }
        search = value_start;
    }
    (line.to_owned(), None)
}

fn parse_number(s: &str) -> Option<f64> {
    s.trim().parse::<f64>().ok().filter(|v| v.is_finite())
}

fn parse_int(s: &str) -> Option<i64> {
    s.trim().parse::<i64>().ok()
}

/// Parses one gen_img prompt line: `--d` seeds are taken out first, then the line is split on
/// `" --"` and every later piece matched case-insensitively at its start (first match wins, in
/// the reference's order). Pieces that match nothing or fail to parse are ignored with a log
/// line.
///
/// # Source
/// generation.md §5.2.
pub fn parse_prompt_line(line: &str) -> PromptOptions {
    let (rest, seeds) = take_seeds(line);
    let mut parts = rest.split(" --");
    let mut o = PromptOptions {
        prompt: parts.next().unwrap_or("").to_owned(),
        seeds,
        raw_prompt: rest.clone(),
        ..PromptOptions::default()
    };
    for piece in parts {
        if !apply_option(&mut o, piece, false) {
            tracing::warn!("prompt option \"--{piece}\" not understood: ignored");
        }
    }
    o
}

/// Applies one `" --"` piece; returns false when it matched nothing or did not parse.
fn apply_option(o: &mut PromptOptions, piece: &str, training: bool) -> bool {
    let lower = piece.to_ascii_lowercase();
    // (prefix, handler) in the reference's order; prefixes include the separating space.
    let value = |prefix: &str| -> Option<&str> {
        lower
            .strip_prefix(prefix)
            .map(|_| piece[prefix.len()..].trim())
    };
    let int = |v: &str, f: &mut Option<i64>| parse_int(v).map(|n| *f = Some(n)).is_some();
    if !training {
        for (prefix, field) in [
            ("w ", &mut o.width),
            ("h ", &mut o.height),
            ("ow ", &mut o.original_width),
            ("oh ", &mut o.original_height),
            ("nw ", &mut o.original_width_negative),
            ("nh ", &mut o.original_height_negative),
            ("ct ", &mut o.crop_top),
            ("cl ", &mut o.crop_left),
        ] {
            if let Some(v) = value(prefix) {
                return int(v, field);
            }
        }
    } else {
        for (prefix, field) in [("w ", &mut o.width), ("h ", &mut o.height)] {
            if let Some(v) = value(prefix) {
                return int(v, field);
            }
        }
        if let Some(v) = value("d ") {
            return v.parse::<u64>().map(|d| o.seeds = Some(vec![d])).is_ok();
        }
    }
    if let Some(v) = value("s ") {
        return parse_int(v)
            .map(|n| o.steps = Some(n.clamp(1, 1000) as usize))
            .is_some();
    }
    if let Some(v) = value("l ") {
        return parse_number(v).map(|x| o.scale = Some(x)).is_some();
    }
    if training {
        if let Some(v) = value("g ") {
            return parse_number(v)
                .map(|x| o.guidance_scale = Some(x))
                .is_some();
        }
        if lower.starts_with("n ") {
            o.negative_prompt = Some(piece[2..].to_owned());
            return true;
        }
        if let Some(v) = value("ss ") {
            o.sampler = Some(v.to_owned());
            return true;
        }
        // --cn, --ctr, --rcfg, --fs: other models, ignored.
        return ["cn ", "ctr", "rcfg", "fs "]
            .iter()
            .any(|p| lower.starts_with(p));
    }
    if let Some(v) = value("nl ") {
        if v.eq_ignore_ascii_case("none") {
            o.negative_scale = Some(None);
            return true;
        }
        return parse_number(v)
            .map(|x| o.negative_scale = Some(Some(x)))
            .is_some();
    }
    if let Some(v) = value("t ") {
        return parse_number(v).map(|x| o.strength = Some(x)).is_some();
    }
    if lower.starts_with("n ") {
        o.negative_prompt = Some(piece[2..].to_owned());
        return true;
    }
    if lower.starts_with("c ") {
        o.clip_prompt = Some(piece[2..].to_owned());
        return true;
    }
    if let Some(v) = value("am ") {
        let values: Option<Vec<f64>> = v.split(',').map(parse_number).collect();
        return values.map(|m| o.network_multipliers = Some(m)).is_some();
    }
    if lower.starts_with("f ") {
        o.file_name = Some(piece[2..].trim().to_owned());
        return true;
    }
    // Deep Shrink / Gradual Latent overrides are accepted; they would change the image
    // upstream, so the user is told they have no effect here.
    let known = [
        "dsd1", "dst1", "dsd2", "dst2", "dsr", "glt", "glr", "gle", "gls", "glsn", "glus",
    ]
    .iter()
    .any(|p| lower.starts_with(p));
    if known {
        tracing::warn!(
            "prompt option \"--{piece}\" (Deep Shrink / Gradual Latent) has no effect: not available in this port"
        );
    }
    known
}

/// Reads gen_img's `--from_file`: UTF-8, one prompt per line; empty lines and lines starting
/// with `#` are skipped.
///
/// # Errors
/// [`GenerateError::Io`] naming the file.
pub fn read_prompt_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|source| GenerateError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

/// One training sample prompt (training.md §12.1) with defaults applied: steps 30, 512×512
/// (rounded down to multiples of 8, at least 64), scale 7.5.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    /// Position in the file (0-based), used in file names.
    pub index: usize,
    /// Prompt text.
    pub prompt: String,
    /// Negative prompt (none = "").
    pub negative_prompt: Option<String>,
    /// Width in pixels.
    pub width: i64,
    /// Height in pixels.
    pub height: i64,
    /// Sampling steps.
    pub sample_steps: usize,
    /// CFG scale.
    pub scale: f64,
    /// Seed, if given.
    pub seed: Option<u64>,
    /// Per-prompt sampler override (`--ss`).
    pub sampler: Option<String>,
}

impl SamplePrompt {
    fn from_options(index: usize, o: PromptOptions) -> Self {
        let round = |v: Option<i64>| (v.unwrap_or(512) / 8 * 8).max(64);
        Self {
            index,
            prompt: o.prompt,
            negative_prompt: o.negative_prompt,
            width: round(o.width),
            height: round(o.height),
            sample_steps: o.steps.unwrap_or(30),
            scale: o.scale.unwrap_or(7.5),
            seed: o.seeds.and_then(|s| s.first().copied()),
            sampler: o.sampler,
        }
    }
}

/// Parses one `.txt` sample prompt line (training syntax: `--w --h --d --s --l --g --n --ss`).
pub fn parse_sample_line(line: &str) -> PromptOptions {
    let mut parts = line.split(" --");
    let mut o = PromptOptions {
        prompt: parts.next().unwrap_or("").trim().to_owned(),
        raw_prompt: line.to_owned(),
        ..PromptOptions::default()
    };
    for piece in parts {
        if !apply_option(&mut o, piece, true) {
            tracing::warn!("sample prompt option \"--{piece}\" not understood: ignored");
        }
    }
    o
}

fn options_from_json(
    map: &serde_json::Map<String, serde_json::Value>,
    path: &Path,
    what: &str,
) -> Result<PromptOptions> {
    let bad = |key: &str, expected: &str| {
        GenerateError::Invalid(format!(
            "{}: {what}: key \"{key}\": expected {expected}",
            path.display()
        ))
    };
    let mut o = PromptOptions::default();
    for (key, v) in map {
        let int = || {
            v.as_i64()
                .or_else(|| v.as_str().and_then(parse_int))
                .ok_or_else(|| bad(key, "an integer"))
        };
        let num = || {
            v.as_f64()
                .or_else(|| v.as_str().and_then(parse_number))
                .ok_or_else(|| bad(key, "a number"))
        };
        let text = || {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| bad(key, "a string"))
        };
        match key.as_str() {
            "prompt" => o.prompt = text()?,
            "negative_prompt" => o.negative_prompt = Some(text()?),
            "width" => o.width = Some(int()?),
            "height" => o.height = Some(int()?),
            "seed" => {
                let s = int()?;
                o.seeds = Some(vec![
                    u64::try_from(s).map_err(|_| bad(key, "a non-negative integer"))?,
                ]);
            }
            "sample_steps" => o.steps = Some(int()?.clamp(1, 1000) as usize),
            "scale" => o.scale = Some(num()?),
            "guidance_scale" => o.guidance_scale = Some(num()?),
            "sample_sampler" => o.sampler = Some(text()?),
            "controlnet_image" | "cfg_trunc_ratio" | "renorm_cfg" | "flow_shift" | "enum" => {}
            other => tracing::warn!(
                "{}: {what}: unknown key \"{other}\" ignored",
                path.display()
            ),
        }
    }
    Ok(o)
}

/// Reads train-network's `--sample_prompts` file: `.txt` (one prompt per line with options),
/// `.toml` (`[prompt]` defaults and `[[prompt.subset]]` entries; a subset overrides a
/// default), or `.json` (a list of objects with the same keys, or of strings parsed like
/// `.txt` lines). Call it when training starts so a bad file fails early.
///
/// # Errors
/// [`GenerateError::Io`] for unreadable files; [`GenerateError::Invalid`] for other
/// extensions, syntax errors and wrongly typed keys, naming the file and key; an empty prompt
/// list is an error too.
///
/// # Source
/// training.md §12.1.
pub fn read_sample_prompts(path: &Path) -> Result<Vec<SamplePrompt>> {
    let text = std::fs::read_to_string(path).map_err(|source| GenerateError::Io {
        path: path.to_owned(),
        source,
    })?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    let options: Vec<PromptOptions> = match ext.as_str() {
        "txt" => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(parse_sample_line)
            .collect(),
        "toml" => {
            let value: toml::Value = toml::from_str(&text).map_err(|e| {
                GenerateError::Invalid(format!("{}: invalid TOML: {e}", path.display()))
            })?;
            let json = serde_json::to_value(value)
                .map_err(|e| GenerateError::Invalid(format!("{}: {e}", path.display())))?;
            let prompt = json
                .get("prompt")
                .and_then(|p| p.as_object())
                .ok_or_else(|| {
                    GenerateError::Invalid(format!(
                        "{}: expected a [prompt] table with [[prompt.subset]] entries",
                        path.display()
                    ))
                })?;
            let mut defaults = prompt.clone();
            let subsets = defaults
                .remove("subset")
                .and_then(|s| s.as_array().cloned())
                .unwrap_or_default();
            subsets
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let obj = s.as_object().ok_or_else(|| {
                        GenerateError::Invalid(format!(
                            "{}: prompt.subset[{i}]: expected a table",
                            path.display()
                        ))
                    })?;
                    let mut merged = defaults.clone();
                    merged.extend(obj.clone());
                    options_from_json(&merged, path, &format!("prompt.subset[{i}]"))
                })
                .collect::<Result<_>>()?
        }
        "json" => {
            let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                GenerateError::Invalid(format!("{}: invalid JSON: {e}", path.display()))
            })?;
            let list = json.as_array().ok_or_else(|| {
                GenerateError::Invalid(format!(
                    "{}: expected a JSON list of prompt objects or strings",
                    path.display()
                ))
            })?;
            list.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    serde_json::Value::String(s) => Ok(parse_sample_line(s)),
                    serde_json::Value::Object(m) => {
                        options_from_json(m, path, &format!("entry {i}"))
                    }
                    _ => Err(GenerateError::Invalid(format!(
                        "{}: entry {i}: expected an object or a string",
                        path.display()
                    ))),
                })
                .collect::<Result<_>>()?
        }
        other => {
            return Err(GenerateError::Invalid(format!(
                "{}: unsupported sample prompt file extension \"{other}\": expected .txt, .toml or .json",
                path.display()
            )));
        }
    };
    if options.is_empty() {
        return Err(GenerateError::Invalid(format!(
            "{}: no sample prompt found",
            path.display()
        )));
    }
    let prompts: Vec<SamplePrompt> = options
        .into_iter()
        .enumerate()
        .map(|(i, o)| SamplePrompt::from_options(i, o))
        .collect();
    // Per-prompt samplers are checked now too, not at the first sample.
    for p in &prompts {
        if let Some(name) = &p.sampler {
            check_sample_prompt(p, name.parse()?).map_err(|e| {
                GenerateError::Invalid(format!("{}: prompt {}: {e}", path.display(), p.index))
            })?;
        }
    }
    Ok(prompts)
}

fn check_sample_prompt(p: &SamplePrompt, kind: SamplerKind) -> Result<()> {
    Sampler::new(
        SamplerConfig::training_sample(kind, PredictionType::Epsilon),
        p.sample_steps,
    )
    .map(drop)
}

/// Checks that every sample prompt can be sampled: its own sampler (`--ss`) or `default`
/// (train-network's `--sample_sampler`) with its step count (`pndm` needs at least 4 steps).
/// Call it with [`read_sample_prompts`]'s result when training starts.
///
/// # Errors
/// [`GenerateError::Invalid`] naming the prompt (0-based index in the file) and the cause.
pub fn check_sample_prompts(prompts: &[SamplePrompt], default: SamplerKind) -> Result<()> {
    for p in prompts {
        let kind = match &p.sampler {
            Some(name) => name.parse()?,
            None => default,
        };
        check_sample_prompt(p, kind).map_err(|e| {
            GenerateError::Invalid(format!("sample prompt {} (\"{}\"): {e}", p.index, p.prompt))
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn sample_prompt_samplers_are_checked_when_read() {
        let (_d, path) = write("p.txt", "a cat --ss euler_a\na dog --ss nope\n");
        let err = read_sample_prompts(&path).expect_err("unknown sampler");
        assert!(
            err.to_string().contains("unknown sampler \"nope\""),
            "{err}"
        );
        let (_d, path) = write("p.txt", "a cat --ss pndm --s 3\n");
        let err = read_sample_prompts(&path).expect_err("pndm with 3 steps");
        let msg = err.to_string();
        assert!(
            msg.contains("p.txt: prompt 0") && msg.contains("at least 4 steps"),
            "{msg}"
        );
        let (_d, path) = write(
            "p.json",
            r#"[{"prompt": "x", "sample_sampler": "dpmsingle"}]"#,
        );
        let prompts = read_sample_prompts(&path).expect("dpmsingle is fine");
        assert_eq!(prompts[0].sampler.as_deref(), Some("dpmsingle"));
    }

    #[test]
    fn check_sample_prompts_uses_the_default_sampler() {
        let (_d, path) = write("p.txt", "a cat --s 3\na dog --ss euler --s 3\n");
        let prompts = read_sample_prompts(&path).expect("prompts");
        check_sample_prompts(&prompts, SamplerKind::Euler).expect("euler, 3 steps");
        let err = check_sample_prompts(&prompts, SamplerKind::Pndm).expect_err("pndm, 3 steps");
        assert!(
            err.to_string().contains("sample prompt 0 (\"a cat\")"),
            "{err}"
        );
    }
}
