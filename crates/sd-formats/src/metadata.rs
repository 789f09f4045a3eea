//! Metadata values as sd-scripts writes them: Python `str()`, `repr()` and `json.dumps()`
//! emulation for `ss_*` keys, and the Stability AI ModelSpec (`modelspec.*`) keys.
//!
//! Every safetensors metadata value is a string. sd-scripts builds most of them with Python's
//! `str()` (so `True`, `None`, `1.0`, `1e-05`, `(512, 512)`) or `json.dumps()` with its default
//! separators `", "` / `": "` and `ensure_ascii`. [`PyValue`] reproduces both byte for byte.
//!
//! # Source
//! `../shared/spec/lora-format.md` §9 (intro: Python formatting), §9.4 (modelspec); sd-scripts
//! `library/sai_model_spec.py`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::family::ModelFamily;

/// A Python value, formatted as CPython 3 formats it.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue {
    /// `None` (`null` in JSON).
    None,
    /// `True` / `False` (`true` / `false` in JSON).
    Bool(bool),
    /// A Python `int`.
    Int(i64),
    /// A Python `float` (binary64).
    Float(f64),
    /// A Python `str`.
    Str(String),
    /// A Python `list` (`[a, b]`).
    List(Vec<PyValue>),
    /// A Python `tuple` (`(a, b)`, `(a,)`; a JSON array in `json.dumps`).
    Tuple(Vec<PyValue>),
    /// A Python `dict` in insertion order.
    Dict(Vec<(PyValue, PyValue)>),
}

impl From<bool> for PyValue {
    fn from(v: bool) -> Self {
        PyValue::Bool(v)
    }
}
impl From<i64> for PyValue {
    fn from(v: i64) -> Self {
        PyValue::Int(v)
    }
}
impl From<usize> for PyValue {
    fn from(v: usize) -> Self {
        PyValue::Int(i64::try_from(v).unwrap_or(i64::MAX))
    }
}
impl From<f64> for PyValue {
    fn from(v: f64) -> Self {
        PyValue::Float(v)
    }
}
impl From<f32> for PyValue {
    /// Widens to binary64 as Python does when an f32 value becomes a `float`.
    fn from(v: f32) -> Self {
        PyValue::Float(f64::from(v))
    }
}
impl From<&str> for PyValue {
    fn from(v: &str) -> Self {
        PyValue::Str(v.to_owned())
    }
}
impl From<String> for PyValue {
    fn from(v: String) -> Self {
        PyValue::Str(v)
    }
}
impl<T: Into<PyValue>> From<Option<T>> for PyValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(PyValue::None, Into::into)
    }
}

impl PyValue {
    /// Python `str(value)`: strings unquoted, everything else as [`PyValue::py_repr`].
    pub fn py_str(&self) -> String {
        match self {
            PyValue::Str(s) => s.clone(),
            other => other.py_repr(),
        }
    }

    /// Python `repr(value)`: strings quoted as CPython does, containers with `", "` / `": "`.
    pub fn py_repr(&self) -> String {
        match self {
            PyValue::None => "None".into(),
            PyValue::Bool(true) => "True".into(),
            PyValue::Bool(false) => "False".into(),
            PyValue::Int(i) => i.to_string(),
            PyValue::Float(f) => py_float_repr(*f),
            PyValue::Str(s) => py_str_repr(s),
            PyValue::List(items) => {
                let parts: Vec<String> = items.iter().map(PyValue::py_repr).collect();
                format!("[{}]", parts.join(", "))
            }
            PyValue::Tuple(items) => {
                let parts: Vec<String> = items.iter().map(PyValue::py_repr).collect();
                if parts.len() == 1 {
                    format!("({},)", parts[0])
                } else {
                    format!("({})", parts.join(", "))
                }
            }
            PyValue::Dict(items) => {
                let parts: Vec<String> = items
                    .iter()
                    .map(|(k, v)| format!("{}: {}", k.py_repr(), v.py_repr()))
                    .collect();
                format!("{{{}}}", parts.join(", "))
            }
        }
    }

    /// Python `json.dumps(value)` with default arguments: separators `", "` and `": "`,
    /// `ensure_ascii=True` (non-ASCII as `\uXXXX`, astral characters as surrogate pairs), floats
    /// as `repr` (`NaN`, `Infinity`, `-Infinity` for non-finite values), dict keys converted to
    /// strings as Python does (`True` → `"true"`, `None` → `"null"`, numbers by repr).
    pub fn json_dumps(&self) -> String {
        let mut out = String::new();
        self.write_json(&mut out);
        out
    }

    fn write_json(&self, out: &mut String) {
        match self {
            PyValue::None => out.push_str("null"),
            PyValue::Bool(true) => out.push_str("true"),
            PyValue::Bool(false) => out.push_str("false"),
            PyValue::Int(i) => out.push_str(&i.to_string()),
            PyValue::Float(f) => out.push_str(&json_float(*f)),
            PyValue::Str(s) => json_str_ascii(s, out),
            PyValue::List(items) | PyValue::Tuple(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    v.write_json(out);
                }
                out.push(']');
            }
            PyValue::Dict(items) => {
                out.push('{');
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    let key = match k {
                        PyValue::Str(s) => s.clone(),
                        PyValue::Float(f) => json_float(*f),
                        PyValue::None | PyValue::Bool(_) | PyValue::Int(_) => k.json_dumps(),
                        // json.dumps raises on other key types; repr is the closest message-free choice.
                        other => other.py_repr(),
                    };
                    json_str_ascii(&key, out);
                    out.push_str(": ");
                    v.write_json(out);
                }
                out.push('}');
            }
        }
    }
}

/// Python `repr(float)` (also `str(float)`): the shortest digits that round-trip, in fixed
/// notation when the decimal exponent is in `-4..16`, otherwise `d.ddde±XX` (at least two
/// exponent digits); integral values keep `.0`; `inf`, `-inf`, `nan`.
///
/// Examples: `1.0`, `0.0001`, `1e-05`, `1e+16`, `1708000000.1234567`, `-0.0`.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    // Rust's `{:e}` prints the shortest round-trip digits, e.g. "1.2345e3", "-1e-5".
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci
        .split_once('e')
        .expect("`{:e}` output always contains an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    if (-4..16).contains(&exp) {
        let s = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{digits}", "0".repeat((-exp - 1) as usize))
        };
        format!("{sign}{s}")
    } else {
        let m = if n == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

fn json_float(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        py_float_repr(x)
    }
}

/// Python `repr(str)`: single quotes unless the text contains `'` and no `"`; escapes `\\`,
/// the quote, `\n`, `\r`, `\t`, other non-printable ASCII and Latin-1 as `\xNN`; the rest raw.
pub fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            // CPython also escapes non-printable Latin-1 characters: the C1 controls, the
            // no-break space and the soft hyphen. (Other non-printable code points, written as
            // `\uXXXX` by CPython, are not emulated: sd-scripts never repr()s such text.)
            c if (0x80..0xa1).contains(&(c as u32)) || c == '\u{ad}' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn json_str_ascii(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `modelspec.implementation` for SDXL LoRAs and every full checkpoint.
pub const SAI_IMPLEMENTATION: &str = "https://github.com/Stability-AI/generative-models";

/// `modelspec.implementation_version` written by this project (spec §9.4 asks for our own
/// identity instead of `sd-scripts/<commit>`).
pub fn implementation_version() -> String {
    format!("sd-rs/{}", env!("CARGO_PKG_VERSION"))
}

/// Inputs of [`modelspec`]; optional keys are written only when `Some`.
#[derive(Debug, Clone)]
pub struct ModelSpecInput {
    /// Model family.
    pub family: ModelFamily,
    /// v-parameterization (SD2 768-v; SDXL v-pred only changes `prediction_type`).
    pub v_parameterization: bool,
    /// Whether the file is a LoRA (architecture gets `/lora`).
    pub lora: bool,
    /// `modelspec.title`.
    pub title: String,
    /// Training resolution `(width, height)`; `None` = family default (512, 768 for SD2 v,
    /// 1024 for SDXL).
    pub resolution: Option<(u32, u32)>,
    /// `modelspec.date`, ISO-8601 without zone and fraction (see [`iso_date_utc`]).
    pub date: String,
    /// Optional keys (`description`, `author`, `license`, `tags`, `merged_from`,
    /// `trigger_phrase`, `encoder_layer`, …) without the `modelspec.` prefix.
    pub extra: BTreeMap<String, String>,
}

/// The `modelspec.*` keys of sd-scripts `sai_model_spec.build_metadata` (ModelSpec 1.0.1).
///
/// # Compatibility
/// `modelspec.implementation_version` names this project ([`implementation_version`]).
///
/// # Source
/// spec/lora-format.md §9.4.
pub fn modelspec(input: &ModelSpecInput) -> BTreeMap<String, String> {
    let mut arch = match input.family {
        ModelFamily::Sd1 => "stable-diffusion-v1",
        ModelFamily::Sd2 if input.v_parameterization => "stable-diffusion-v2-768-v",
        ModelFamily::Sd2 => "stable-diffusion-v2-512",
        ModelFamily::Sdxl => "stable-diffusion-xl-v1-base",
    }
    .to_string();
    if input.lora {
        arch.push_str("/lora");
    }
    let implementation = if input.lora && input.family != ModelFamily::Sdxl {
        "diffusers"
    } else {
        SAI_IMPLEMENTATION
    };
    let (w, h) = input.resolution.unwrap_or(match input.family {
        ModelFamily::Sdxl => (1024, 1024),
        ModelFamily::Sd2 if input.v_parameterization => (768, 768),
        _ => (512, 512),
    });
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("modelspec.{k}"), v);
    };
    put("sai_model_spec", "1.0.1".into());
    put("architecture", arch);
    put("implementation", implementation.into());
    put("title", input.title.clone());
    put("resolution", format!("{w}x{h}"));
    put("date", input.date.clone());
    put(
        "prediction_type",
        if input.v_parameterization {
            "v"
        } else {
            "epsilon"
        }
        .into(),
    );
    put("implementation_version", implementation_version());
    for (k, v) in &input.extra {
        put(k, v.clone());
    }
    m
}

/// Formats a unix time (seconds) as `YYYY-MM-DDTHH:MM:SS` in UTC.
///
/// # Compatibility
/// sd-scripts writes local time; without a time-zone database we write UTC.
pub fn iso_date_utc(unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    // Civil-from-days (proleptic Gregorian), H. Hinnant's algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        secs / 3600,
        (secs % 3600) / 60,
        secs % 60
    )
}

/// `ss_base_model_version` of a family: `sd_v1`, `sd_v2` (suffix `_v` with v-parameterization)
/// or `sdxl_base_v1-0`.
pub fn base_model_version(family: ModelFamily, v_parameterization: bool) -> &'static str {
    match (family, v_parameterization) {
        (ModelFamily::Sd1, false) => "sd_v1",
        (ModelFamily::Sd1, true) => "sd_v1_v",
        (ModelFamily::Sd2, false) => "sd_v2",
        (ModelFamily::Sd2, true) => "sd_v2_v",
        (ModelFamily::Sdxl, _) => "sdxl_base_v1-0",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python() {
        for (x, want) in [
            (1.0, "1.0"),
            (0.0001, "0.0001"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (1708000000.1234567, "1708000000.1234567"),
            (0.1, "0.1"),
            (-2.5e-7, "-2.5e-07"),
            (16.0, "16.0"),
            (1.5e300, "1.5e+300"),
            (5e-324, "5e-324"),
            (-0.0, "-0.0"),
            (f64::INFINITY, "inf"),
            (f64::NAN, "nan"),
            (f64::from(0.1f32), "0.10000000149011612"),
        ] {
            assert_eq!(py_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn str_and_repr() {
        assert_eq!(PyValue::Bool(true).py_str(), "True");
        assert_eq!(PyValue::None.py_str(), "None");
        assert_eq!(PyValue::from(Some(4usize)).py_str(), "4");
        assert_eq!(
            PyValue::Tuple(vec![512usize.into(), 768usize.into()]).py_str(),
            "(512, 768)"
        );
        assert_eq!(PyValue::Tuple(vec![1i64.into()]).py_str(), "(1,)");
        assert_eq!(PyValue::from("a'b").py_repr(), "\"a'b\"");
        assert_eq!(PyValue::from("a'b\"").py_repr(), "'a\\'b\"'");
        assert_eq!(PyValue::from("x\ny").py_repr(), "'x\\ny'");
        assert_eq!(
            PyValue::List(vec!["a".into(), 1.5f64.into()]).py_str(),
            "['a', 1.5]"
        );
        assert_eq!(
            PyValue::Dict(vec![("k".into(), PyValue::None)]).py_str(),
            "{'k': None}"
        );
    }

    #[test]
    fn json_dumps_matches_python() {
        let v = PyValue::Dict(vec![
            ("conv_dim".into(), "4".into()),
            ("dropout".into(), PyValue::None),
            (
                "é😀".into(),
                PyValue::List(vec![1e-5f64.into(), true.into()]),
            ),
            (PyValue::Int(3), 2.0f64.into()),
        ]);
        assert_eq!(
            v.json_dumps(),
            r#"{"conv_dim": "4", "dropout": null, "\u00e9\ud83d\ude00": [1e-05, true], "3": 2.0}"#
        );
    }

    #[test]
    fn modelspec_keys() {
        let m = modelspec(&ModelSpecInput {
            family: ModelFamily::Sd2,
            v_parameterization: true,
            lora: true,
            title: "x".into(),
            resolution: None,
            date: iso_date_utc(1_700_000_000),
            extra: BTreeMap::new(),
        });
        assert_eq!(
            m["modelspec.architecture"],
            "stable-diffusion-v2-768-v/lora"
        );
        assert_eq!(m["modelspec.implementation"], "diffusers");
        assert_eq!(m["modelspec.resolution"], "768x768");
        assert_eq!(m["modelspec.prediction_type"], "v");
        assert_eq!(m["modelspec.date"], "2023-11-14T22:13:20");
        assert_eq!(m["modelspec.sai_model_spec"], "1.0.1");
        assert_eq!(m.len(), 8);
        let x = modelspec(&ModelSpecInput {
            family: ModelFamily::Sdxl,
            v_parameterization: false,
            lora: true,
            title: "x".into(),
            resolution: Some((832, 1216)),
            date: String::new(),
            extra: BTreeMap::new(),
        });
        assert_eq!(x["modelspec.implementation"], SAI_IMPLEMENTATION);
        assert_eq!(x["modelspec.resolution"], "832x1216");
    }
}
