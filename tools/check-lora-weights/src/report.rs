//! The statistics `check-lora-weights` prints, computed without libtorch.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result};
use sd_formats::lora::{KeyStyle, LoraLayout};
use sd_formats::tensor_file::TensorFile;
use serde_json::json;

/// One LoRA module's statistics.
pub struct ModuleStats {
    /// Module name as written in the file.
    pub name: String,
    /// Rank r (rows of the down weight).
    pub rank: usize,
    /// Alpha as stored, or `None` when the file has no alpha for this module (alpha = rank).
    pub alpha: Option<f64>,
    /// scale = alpha / rank (1 when alpha is absent or 0).
    pub scale: f64,
    /// Dtype of the down/up weights (e.g. "F16").
    pub dtype: String,
    /// Shapes of the down and up weights.
    pub down_shape: Vec<usize>,
    /// Shape of the up weight.
    pub up_shape: Vec<usize>,
    /// Frobenius norm of up·down (the weight delta before scale and multiplier).
    pub norm_up_down: f64,
    /// Problems found in this module (missing half, rank mismatch, unsupported keys).
    pub problems: Vec<String>,
}

/// Everything printed about one file.
pub struct Report {
    /// Detected key style.
    pub style: KeyStyle,
    /// Family guessed from module names and shapes.
    pub family: &'static str,
    /// Per-module statistics, sorted by name.
    pub modules: Vec<ModuleStats>,
    /// Keys that belong to no LoRA module.
    pub stray_keys: Vec<String>,
    /// Tensors holding NaN or Inf.
    pub non_finite: Vec<String>,
    /// The file's `__metadata__` (empty for pickles).
    pub metadata: BTreeMap<String, String>,
    /// Number of tensors in the file.
    pub tensor_count: usize,
}

impl Report {
    /// Reads every LoRA tensor of `file` once (as f32) and computes the statistics.
    ///
    /// # Errors
    /// When a tensor cannot be read or converted (non-float dtype for a weight).
    pub fn build(file: &TensorFile) -> Result<Self> {
        let names: Vec<&str> = file.names().iter().map(String::as_str).collect();
        let layout = LoraLayout::from_keys(names.iter().copied());
        let mut non_finite = Vec::new();
        for name in &names {
            if file.has_non_finite(name)? {
                non_finite.push((*name).to_owned());
            }
        }
        let mut modules = Vec::new();
        for (name, keys) in &layout.modules {
            let mut problems = Vec::new();
            if !keys.unsupported.is_empty() {
                problems.push(format!(
                    "unsupported algorithm keys: {}",
                    keys.unsupported.join(", ")
                ));
            }
            let (Some(down_key), Some(up_key)) = (&keys.down, &keys.up) else {
                if keys.down.is_none() && keys.up.is_none() && keys.unsupported.is_empty() {
                    problems.push("alpha without down/up weights".to_owned());
                } else if keys.unsupported.is_empty() {
                    problems.push(format!(
                        "missing {}",
                        if keys.down.is_none() {
                            "down weight"
                        } else {
                            "up weight"
                        }
                    ));
                }
                modules.push(ModuleStats {
                    name: name.clone(),
                    rank: 0,
                    alpha: None,
                    scale: 0.0,
                    dtype: String::new(),
                    down_shape: Vec::new(),
                    up_shape: Vec::new(),
                    norm_up_down: f64::NAN,
                    problems,
                });
                continue;
            };
            let down_info = file.info(down_key).context("listed key has no info")?;
            let up_info = file.info(up_key).context("listed key has no info")?;
            let down_shape = down_info.shape.clone();
            let up_shape = up_info.shape.clone();
            let rank = down_shape.first().copied().unwrap_or(0);
            let up_rank = up_shape.get(1).copied().unwrap_or(0);
            if rank != up_rank {
                problems.push(format!("rank mismatch: down {down_shape:?} has {rank} rows, up {up_shape:?} has {up_rank} columns"));
            }
            let alpha = match &keys.alpha {
                Some(k) => {
                    let v = file.to_f32_vec(k).with_context(|| format!("reading {k}"))?;
                    if v.len() != 1 {
                        problems.push(format!("alpha has {} values, expected 1", v.len()));
                    }
                    v.first().map(|a| f64::from(*a))
                }
                None => None,
            };
            let scale = match alpha {
                Some(a) if a != 0.0 && rank > 0 => a / rank as f64,
                _ => 1.0,
            };
            for (half, info) in [("down", down_info), ("up", up_info)] {
                if !info.dtype.is_float() {
                    problems.push(format!(
                        "{half} weight has dtype {:?}, expected F16, BF16, F32 or F64",
                        info.dtype
                    ));
                }
            }
            let norm_up_down = if rank == up_rank && rank > 0 {
                let down = file
                    .to_f32_vec(down_key)
                    .with_context(|| format!("reading {down_key}"))?;
                let up = file
                    .to_f32_vec(up_key)
                    .with_context(|| format!("reading {up_key}"))?;
                frobenius_norm_of_product(&up, &down, rank)
            } else {
                f64::NAN
            };
            modules.push(ModuleStats {
                name: name.clone(),
                rank,
                alpha,
                scale,
                dtype: format!("{:?}", down_info.dtype),
                down_shape,
                up_shape,
                norm_up_down,
                problems,
            });
        }
        Ok(Report {
            style: layout.style(),
            family: guess_family(&modules),
            modules,
            stray_keys: layout.stray_keys,
            non_finite,
            metadata: file.metadata().clone(),
            tensor_count: names.len(),
        })
    }

    fn component_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::new();
        for m in &self.modules {
            *counts.entry(component_of(&m.name)).or_default() += 1;
        }
        counts
    }

    /// Writes the human-readable report.
    ///
    /// # Errors
    /// On a write error (closed pipe).
    pub fn write_text(&self, out: &mut impl Write, show_all_keys: bool) -> std::io::Result<()> {
        writeln!(out, "key style: {}", self.style.describe())?;
        writeln!(
            out,
            "model family (guessed from names and shapes): {}",
            self.family
        )?;
        let counts: Vec<String> = self
            .component_counts()
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        writeln!(
            out,
            "modules: {} ({}); tensors: {}",
            self.modules.len(),
            counts.join(", "),
            self.tensor_count
        )?;
        writeln!(
            out,
            "module\trank\talpha\tscale\tdtype\tnorm(up·down)\tdown shape\tup shape"
        )?;
        for m in &self.modules {
            let alpha = m.alpha.map_or_else(|| "-".to_owned(), |a| format!("{a}"));
            writeln!(
                out,
                "{}\t{}\t{}\t{}\t{}\t{:.6e}\t{:?}\t{:?}{}",
                m.name,
                m.rank,
                alpha,
                m.scale,
                m.dtype,
                m.norm_up_down,
                m.down_shape,
                m.up_shape,
                if m.problems.is_empty() {
                    String::new()
                } else {
                    format!("\tPROBLEM: {}", m.problems.join("; "))
                }
            )?;
        }
        if show_all_keys && !self.stray_keys.is_empty() {
            writeln!(out, "other keys ({}):", self.stray_keys.len())?;
            for k in &self.stray_keys {
                writeln!(out, "  {k}")?;
            }
        } else if !self.stray_keys.is_empty() {
            writeln!(
                out,
                "other keys: {} (list them with -s)",
                self.stray_keys.len()
            )?;
        }
        if !self.non_finite.is_empty() {
            writeln!(
                out,
                "NON-FINITE values (NaN/Inf) in: {}",
                self.non_finite.join(", ")
            )?;
        }
        writeln!(out, "metadata ({} keys):", self.metadata.len())?;
        for (k, v) in &self.metadata {
            writeln!(out, "  {k}: {}", shorten(v, 200))?;
        }
        Ok(())
    }

    /// The report as one JSON value (full metadata values, no shortening).
    pub fn to_json(&self, show_all_keys: bool) -> serde_json::Value {
        let modules: Vec<_> = self
            .modules
            .iter()
            .map(|m| {
                json!({
                    "name": m.name, "component": component_of(&m.name), "rank": m.rank, "alpha": m.alpha,
                    "scale": m.scale, "dtype": m.dtype,
                    "norm_up_down": if m.norm_up_down.is_finite() { json!(m.norm_up_down) } else { json!(null) },
                    "down_shape": m.down_shape, "up_shape": m.up_shape, "problems": m.problems,
                })
            })
            .collect();
        let mut v = json!({
            "key_style": self.style.describe(),
            "family": self.family,
            "module_count": self.modules.len(),
            "modules_per_component": self.component_counts(),
            "tensor_count": self.tensor_count,
            "modules": modules,
            "non_finite": self.non_finite,
            "other_key_count": self.stray_keys.len(),
            "metadata": self.metadata,
        });
        if show_all_keys {
            v["other_keys"] = json!(self.stray_keys);
        }
        v
    }
}

/// ‖U·D‖_F for U `[out, r]` and D `[r, k]` (k = in·kh·kw), both row-major, without forming
/// U·D: ‖UD‖²_F = tr((UᵀU)(DDᵀ)), two r×r Gram matrices accumulated in f64.
pub fn frobenius_norm_of_product(up: &[f32], down: &[f32], rank: usize) -> f64 {
    if rank == 0 || !up.len().is_multiple_of(rank) || !down.len().is_multiple_of(rank) {
        return f64::NAN;
    }
    let out = up.len() / rank;
    let k = down.len() / rank;
    let mut utu = vec![0f64; rank * rank];
    for row in 0..out {
        let u = &up[row * rank..(row + 1) * rank];
        for i in 0..rank {
            for j in 0..rank {
                utu[i * rank + j] += f64::from(u[i]) * f64::from(u[j]);
            }
        }
    }
    let mut ddt = vec![0f64; rank * rank];
    for i in 0..rank {
        for j in i..rank {
            let di = &down[i * k..(i + 1) * k];
            let dj = &down[j * k..(j + 1) * k];
            let s: f64 = di
                .iter()
                .zip(dj)
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            ddt[i * rank + j] = s;
            ddt[j * rank + i] = s;
        }
    }
    let sq: f64 = utu.iter().zip(&ddt).map(|(a, b)| a * b).sum();
    sq.max(0.0).sqrt()
}

/// Component of a module name: text encoder 1/2, U-Net, or other.
fn component_of(name: &str) -> &'static str {
    if name.starts_with("lora_te2_") || name.starts_with("text_encoder_2.") {
        "text encoder 2"
    } else if name.starts_with("lora_te1_") {
        "text encoder 1"
    } else if name.starts_with("lora_te")
        || name.starts_with("text_encoder.")
        || name.starts_with("text_encoders.")
    {
        "text encoder"
    } else if name.starts_with("lora_unet_")
        || name.starts_with("unet.")
        || name.contains("diffusion_model.")
    {
        "U-Net"
    } else {
        "other"
    }
}

/// Guesses SD1.x / SD2.x / SDXL from names and the cross-attention context width.
fn guess_family(modules: &[ModuleStats]) -> &'static str {
    let names = || modules.iter().map(|m| m.name.as_str());
    if names().any(|n| {
        n.starts_with("lora_te1_") || n.starts_with("lora_te2_") || n.starts_with("text_encoder_2.")
    }) || names().any(|n| {
        n.contains("input_blocks") || n.contains("output_blocks") || n.contains("middle_block")
    }) {
        return "SDXL";
    }
    // Text encoder depth: CLIP ViT-L has 12 layers (SD1.x), OpenCLIP ViT-H as Diffusers keeps it 23 (SD2.x).
    let max_te_layer = names()
        .filter_map(|n| {
            n.strip_prefix("lora_te_text_model_encoder_layers_")
                .or_else(|| n.strip_prefix("text_encoder.text_model.encoder.layers."))
        })
        .filter_map(|rest| rest.split(['_', '.']).next()?.parse::<usize>().ok())
        .max();
    match max_te_layer {
        Some(l) if l >= 12 => return "SD2.x",
        Some(_) => return "SD1.x",
        None => {}
    }
    // attn2.to_k reads the text encoder's hidden states: 768 for SD1.x, 1024 for SD2.x.
    let context = modules
        .iter()
        .find(|m| {
            m.name.contains("attn2") && (m.name.ends_with("to_k") || m.name.ends_with("to_k_lora"))
        })
        .and_then(|m| m.down_shape.get(1).copied());
    match context {
        Some(768) => "SD1.x",
        Some(1024) => "SD2.x",
        Some(2048) => "SDXL",
        _ => "SD1.x or SD2.x (U-Net only, non-standard context width)",
    }
}

fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let head: String = s.chars().take(max).collect();
    format!("{head}… ({} characters)", s.chars().count())
}

/// sd-scripts' per-tensor lines: `<key>,<shape>,<mean |x|>,<min |x|>` for every LoRA tensor
/// (spec tools.md §7.2 step 4, Python float repr, shape as a tuple with ", " replaced by "-").
///
/// # Errors
/// On a read or write error.
pub fn write_reference_lines(out: &mut impl Write, file: &TensorFile) -> Result<()> {
    const MARKERS: &[&str] = &["lora_up", "lora_down", "lora_A", "lora_B", "oft_"];
    let mut names: Vec<&String> = file
        .names()
        .iter()
        .filter(|k| MARKERS.iter().any(|m| k.contains(m)))
        .collect();
    names.sort();
    writeln!(out, "number of LoRA tensors: {}", names.len())?;
    for name in names {
        let info = file.info(name).context("listed key has no info")?;
        let values = file.to_f32_vec(name)?;
        let abs: Vec<f64> = values.iter().map(|v| f64::from(v.abs())).collect();
        let mean = if abs.is_empty() {
            f64::NAN
        } else {
            abs.iter().sum::<f64>() / abs.len() as f64
        };
        let min = abs.iter().copied().fold(f64::INFINITY, f64::min);
        let shape = match info.shape.len() {
            1 => format!("({},)", info.shape[0]),
            _ => format!(
                "({})",
                info.shape
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("-")
            ),
        };
        // The reference computes the mean in f32; our f64 mean can differ in the last digits.
        writeln!(
            out,
            "{name},{shape},{},{}",
            python_repr(f64::from(mean as f32)),
            python_repr(min)
        )?;
    }
    Ok(())
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16.
fn python_repr(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "nan".into()
        } else if x > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        };
    }
    if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e16) {
        let s = format!("{x:e}");
        let (mantissa, exp) = s.split_once('e').expect("{:e} always has an exponent");
        let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let s = format!("{x:?}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_matches_explicit_product() {
        // U [3,2], D [2,4]
        let up = [1.0f32, 2.0, -1.0, 0.5, 0.0, 3.0];
        let down = [0.5f32, -1.0, 2.0, 0.0, 1.0, 1.0, -0.5, 2.0];
        let mut sq = 0f64;
        for o in 0..3 {
            for c in 0..4 {
                let v: f64 = (0..2)
                    .map(|r| f64::from(up[o * 2 + r]) * f64::from(down[r * 4 + c]))
                    .sum();
                sq += v * v;
            }
        }
        let expected = sq.sqrt();
        assert!((frobenius_norm_of_product(&up, &down, 2) - expected).abs() < 1e-12);
    }

    #[test]
    fn python_float_repr() {
        assert_eq!(python_repr(0.14285890758037567), "0.14285890758037567");
        assert_eq!(
            python_repr(1.1122876458102837e-05),
            "1.1122876458102837e-05"
        );
        assert_eq!(python_repr(1.0), "1.0");
        assert_eq!(python_repr(0.0), "0.0");
    }
}
