//! Captions: finding and reading caption files (spec training.md §2.5) and the per-sample
//! caption processing of §4.1 (prefix/suffix, dropout, wildcards, keep_tokens, shuffling,
//! token warm-up, tag dropout, secondary separator).
//!
//! # Source
//! sd-scripts `library/train_util.py`: `DreamBoothDataset.read_caption`,
//! `BaseDataset.process_caption`.

use std::path::{Path, PathBuf};

use crate::dataset_rng::DataRng;

/// Caption-processing options of one subset (spec §2.3; defaults are sd-scripts').
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CaptionOptions {
    /// `shuffle_caption`: shuffle the flexible tokens (default false).
    pub shuffle_caption: bool,
    /// `caption_separator`: tag separator (default ",").
    pub caption_separator: String,
    /// `keep_tokens`: number of leading tokens never shuffled or dropped (default 0).
    pub keep_tokens: u32,
    /// `keep_tokens_separator`: explicit fixed | flexible | fixed-suffix separator (default "").
    pub keep_tokens_separator: String,
    /// `secondary_separator`: replaced by `caption_separator` after shuffling.
    pub secondary_separator: Option<String>,
    /// `enable_wildcard`: `{a|b}` wildcards and one random line of multi-line captions.
    pub enable_wildcard: bool,
    /// `caption_prefix`: joined before the caption with a space.
    pub caption_prefix: Option<String>,
    /// `caption_suffix`: joined after the caption with a space.
    pub caption_suffix: Option<String>,
    /// `token_warmup_min`: tag count at step 0 (default 1).
    pub token_warmup_min: u32,
    /// `token_warmup_step`: step where all tags are used; < 1 means a fraction of
    /// `max_train_steps` (default 0 = off).
    pub token_warmup_step: f64,
    /// `caption_dropout_rate`: probability of an empty caption (default 0).
    pub caption_dropout_rate: f64,
    /// `caption_dropout_every_n_epochs`: drop every caption in epochs divisible by N (0 = off).
    pub caption_dropout_every_n_epochs: u32,
    /// `caption_tag_dropout_rate`: per-tag drop probability (default 0).
    pub caption_tag_dropout_rate: f64,
}

impl Default for CaptionOptions {
    fn default() -> Self {
        Self {
            shuffle_caption: false,
            caption_separator: ",".to_owned(),
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            secondary_separator: None,
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
        }
    }
}

impl CaptionOptions {
    /// Whether processing draws random numbers or depends on the epoch/step (false means
    /// the processed caption is a pure function of the file's caption).
    pub fn is_random(&self) -> bool {
        self.shuffle_caption
            || self.enable_wildcard
            || self.token_warmup_step > 0.0
            || self.caption_dropout_rate > 0.0
            || self.caption_dropout_every_n_epochs > 0
            || self.caption_tag_dropout_rate > 0.0
    }
}

/// Training progress the caption processing depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CaptionProgress {
    /// Current epoch, 1-based (set *before* the epoch's batches are built; spec §15 #1).
    pub epoch: u32,
    /// Optimizer steps done so far.
    pub step: u64,
    /// `max_train_steps`, for a fractional `token_warmup_step`.
    pub max_train_steps: u64,
}

/// Candidate caption files of an image, in the order they are tried (spec §2.5):
/// `<path without extension><ext>`, then, when that path split on `_` has at least 5 parts,
/// the same with the last four `_` fields removed (face-crop naming; directories take part
/// in the split, as in the reference). `caption_extension` gets a leading "." if missing.
pub fn caption_candidates(image: &Path, caption_extension: &str) -> Vec<PathBuf> {
    let ext = normalize_extension(caption_extension);
    let base = image.with_extension("");
    let base_text = base.to_string_lossy().into_owned();
    let mut out = vec![PathBuf::from(format!("{base_text}{ext}"))];
    let parts: Vec<&str> = base_text.split('_').collect();
    if parts.len() >= 5 {
        out.push(PathBuf::from(format!(
            "{}{ext}",
            parts[..parts.len() - 4].join("_")
        )));
    }
    out
}

/// `caption_extension` with a leading "." (sd-scripts prepends one when missing).
pub fn normalize_extension(ext: &str) -> String {
    if ext.is_empty() || ext.starts_with('.') {
        ext.to_owned()
    } else {
        format!(".{ext}")
    }
}

/// A caption file's content as used for training, plus remarks about odd files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptionFile {
    /// The caption: the first line, trimmed; with wildcards all non-empty trimmed lines
    /// joined by "\n".
    pub caption: String,
    /// User-actionable remarks (lines ignored, empty first line), lower case.
    pub warnings: Vec<String>,
}

/// Reads a caption file (spec §2.5).
///
/// The text must be UTF-8; a leading byte-order mark is removed. Without `enable_wildcard`
/// the caption is the first line, trimmed (reference behaviour): a file with several
/// non-empty lines warns that the others are ignored, and a file whose first line is blank
/// but whose later lines have text warns that the caption is empty.
///
/// # Compatibility
/// The reference keeps a UTF-8 byte-order mark as part of the caption (Python's `utf-8`
/// codec does not strip it); it is removed here.
///
/// # Errors
/// A reason string when the file cannot be read, is not UTF-8, or is empty (0 lines; the
/// reference fails on it too).
pub fn read_caption_file(path: &Path, enable_wildcard: bool) -> Result<CaptionFile, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read caption file: {e}"))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "caption file is not valid UTF-8 (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return Err("caption file is empty (0 lines)".to_owned());
    }
    let mut warnings = Vec::new();
    let non_empty: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    let caption = if enable_wildcard {
        non_empty.join("\n")
    } else {
        let first = lines[0].trim();
        if first.is_empty() && !non_empty.is_empty() {
            warnings.push(format!(
                "first line is empty, so the caption is empty although the file has {} non-empty line(s) \
                 (only the first line is used without enable_wildcard)",
                non_empty.len()
            ));
        } else if non_empty.len() > 1 {
            warnings.push(format!(
                "{} non-empty lines: only the first is used (enable_wildcard picks one line per step)",
                non_empty.len()
            ));
        }
        first.to_owned()
    };
    if caption.is_empty() && non_empty.is_empty() {
        warnings.push("caption is empty".to_owned());
    }
    Ok(CaptionFile { caption, warnings })
}

/// Processes a caption for one sample (spec §4.1), drawing from `rng` in this order:
/// dropout (when the rate is > 0), line choice and wildcard choices (with wildcards),
/// shuffle, tag dropout (one draw per flexible token).
///
/// # Compatibility
/// * Tokens are re-joined with `caption_separator` (trailing whitespace removed) plus one
///   space, e.g. `", "` for the default `","` and `"; "` for `";"`. The reference always
///   joins with `", "`, which silently replaces a custom separator when shuffling.
/// * The epoch in [`CaptionProgress`] is the epoch being built (spec §15 #1 fixed).
pub fn process_caption(
    caption: &str,
    opts: &CaptionOptions,
    progress: CaptionProgress,
    rng: &mut DataRng,
) -> String {
    let mut caption = caption.to_owned();
    if let Some(prefix) = opts.caption_prefix.as_deref().filter(|p| !p.is_empty()) {
        caption = format!("{prefix} {caption}");
    }
    if let Some(suffix) = opts.caption_suffix.as_deref().filter(|s| !s.is_empty()) {
        caption = format!("{caption} {suffix}");
    }

    let mut drop = opts.caption_dropout_rate > 0.0 && rng.uniform() < opts.caption_dropout_rate;
    let every = opts.caption_dropout_every_n_epochs;
    // `every > 0` guards the remainder.
    drop = drop || (every > 0 && progress.epoch.checked_rem(every) == Some(0));
    if drop {
        return String::new();
    }

    if opts.enable_wildcard {
        if caption.contains('\n') {
            let lines: Vec<&str> = caption.split('\n').collect();
            caption = lines[rng.choose_index(lines.len())].to_owned();
        }
        caption = expand_wildcards(&caption, rng);
    } else if let Some((first, _)) = caption.split_once('\n') {
        caption = first.to_owned();
    }

    if opts.shuffle_caption || opts.token_warmup_step > 0.0 || opts.caption_tag_dropout_rate > 0.0 {
        caption = process_tokens(&caption, opts, progress, rng);
    }

    if let Some(sec) = opts
        .secondary_separator
        .as_deref()
        .filter(|s| !s.is_empty())
    {
        caption = caption.replace(sec, &opts.caption_separator);
    }
    caption
}

fn split_trimmed<'a>(text: &'a str, sep: &str, keep_empty: bool) -> Vec<&'a str> {
    let pieces: Box<dyn Iterator<Item = &'a str>> = if sep.is_empty() {
        Box::new(std::iter::once(text))
    } else {
        Box::new(text.split(sep))
    };
    pieces
        .map(str::trim)
        .filter(|t| keep_empty || !t.is_empty())
        .collect()
}

fn process_tokens(
    caption: &str,
    opts: &CaptionOptions,
    progress: CaptionProgress,
    rng: &mut DataRng,
) -> String {
    let sep = opts.caption_separator.as_str();
    let kts = opts.keep_tokens_separator.as_str();
    let (fixed, mut flex, suffix): (Vec<&str>, Vec<&str>, Vec<&str>) =
        if !kts.is_empty() && caption.contains(kts) {
            let (fixed_part, rest) = caption.split_once(kts).expect("contains the separator");
            let (flex_part, suffix_part) = rest.split_once(kts).unwrap_or((rest, ""));
            (
                split_trimmed(fixed_part, sep, false),
                split_trimmed(flex_part, sep, false),
                split_trimmed(suffix_part, sep, false),
            )
        } else {
            let tokens = split_trimmed(caption.trim(), sep, true);
            let k = (opts.keep_tokens as usize).min(tokens.len());
            (tokens[..k].to_vec(), tokens[k..].to_vec(), Vec::new())
        };

    let warmup = if opts.token_warmup_step < 1.0 {
        (opts.token_warmup_step * progress.max_train_steps as f64).floor()
    } else {
        opts.token_warmup_step
    };
    if warmup > 0.0 && (progress.step as f64) < warmup {
        let min = f64::from(opts.token_warmup_min);
        let n = (progress.step as f64 * ((flex.len() as f64 - min) / warmup)).floor() + min;
        flex.truncate(python_slice_end(n as i64, flex.len()));
    }
    if opts.shuffle_caption {
        rng.shuffle(&mut flex);
    }
    if opts.caption_tag_dropout_rate > 0.0 {
        flex.retain(|_| rng.uniform() >= opts.caption_tag_dropout_rate);
    }
    let joiner = format!("{} ", sep.trim_end());
    fixed
        .into_iter()
        .chain(flex)
        .chain(suffix)
        .collect::<Vec<_>>()
        .join(&joiner)
}

/// End index of Python's `list[:n]` for a list of `len` elements.
fn python_slice_end(n: i64, len: usize) -> usize {
    let len_i = len as i64;
    if n < 0 {
        (len_i + n).max(0) as usize
    } else {
        n.min(len_i) as usize
    }
}

/// Replaces every `{a|b|…}` group (regex `\{([^}]+)\}`) by one uniformly chosen alternative;
/// `{{` and `}}` are literal braces.
fn expand_wildcards(caption: &str, rng: &mut DataRng) -> String {
    // Escape "{{" / "}}" with marker characters that do not occur in the caption.
    let mut open = String::from("\u{2985}");
    let mut close = String::from("\u{2986}");
    while caption.contains(&open) || caption.contains(&close) {
        open.push('\u{2985}');
        close.push('\u{2986}');
    }
    let escaped = caption.replace("{{", &open).replace("}}", &close);
    let mut out = String::with_capacity(escaped.len());
    let mut rest = escaped.as_str();
    while let Some(start) = rest.find('{') {
        let after = &rest[start + 1..];
        match after.find('}') {
            Some(end) if end > 0 => {
                out.push_str(&rest[..start]);
                let choices: Vec<&str> = after[..end].split('|').collect();
                out.push_str(choices[rng.choose_index(choices.len())]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str(&rest[..=start]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace(&open, "{").replace(&close, "}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_and_escapes() {
        let mut rng = DataRng::new(1, 0);
        for _ in 0..20 {
            let out = expand_wildcards("a {red|blue} {{x}} {} b", &mut rng);
            assert!(out == "a red {x} {} b" || out == "a blue {x} {} b", "{out}");
        }
        assert_eq!(expand_wildcards("{only}", &mut rng), "only");
    }

    #[test]
    fn python_slices() {
        assert_eq!(python_slice_end(2, 5), 2);
        assert_eq!(python_slice_end(9, 5), 5);
        assert_eq!(python_slice_end(-1, 5), 4);
        assert_eq!(python_slice_end(-9, 5), 0);
    }
}
