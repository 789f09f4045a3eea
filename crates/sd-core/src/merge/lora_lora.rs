//! LoRA + LoRA merges (no checkpoint): ΔW_out = Σ ratio_i · ΔW_i.
//!
//! Exact by default (spec tools §1.3 "recommended behaviour"): input i enters with the
//! coefficient a_i = ratio_i · alpha_i / r_i, split as √|a_i| on `lora_up` and
//! sign(a_i)·√|a_i| on `lora_down`; the output alpha equals its rank (scale 1).
//! - `concat`: ranks add, ΔW_out = Σ ratio_i ΔW_i exactly.
//! - sum (equal ranks): ups and downs are summed separately, as the reference does; the
//!   product then has cross terms up_i·down_j (exact only for one input), and the relative
//!   error against the exact sum is reported per module.
//!
//! [`LoraMergeOptions::reference_compatible`] reproduces sd-scripts' numbers instead:
//! s_i = ratio_i·√(alpha_i/alpha_base), up × |s_i|, down × s_i, alpha = alpha_base (the
//! ratio's effect is squared and `--concat` dilutes each part by r_i/R).
//!
//! # Source
//! sd-scripts `networks/merge_lora.py` (`merge_lora_models`); `../shared/spec/tools.md` §1.3.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sd_formats::dtype::Dtype;
use tch::{Kind, Tensor};

use super::{MergeError, Result, preview};
use crate::lora::{LoraTensors, LoraWeights};

/// Options of [`merge_loras`].
#[derive(Debug, Clone, Default)]
pub struct LoraMergeOptions {
    /// `--concat`: concatenate ranks instead of adding factors.
    pub concat: bool,
    /// Reproduce the reference's arithmetic (squared ratios, concat dilution).
    pub reference_compatible: bool,
    /// `--shuffle`: permute each module's rank dimension with this seed (ΔW unchanged).
    pub shuffle_seed: Option<i64>,
    /// Output weight dtype; `None` = the first input's weight dtype.
    pub dtype: Option<Dtype>,
}

/// Result of [`merge_loras`].
#[derive(Debug)]
pub struct LoraMergeResult {
    /// Merged modules (alpha stored as a value; weights in the output dtype).
    pub weights: LoraWeights,
    /// Output weight dtype.
    pub dtype: Dtype,
    /// `ss_network_dim`: the common rank, or `None` ("Dynamic").
    pub network_dim: Option<usize>,
    /// `ss_network_alpha`: the common alpha, or `None` ("Dynamic"); with the flag whether
    /// it came from a missing alpha (an integer in the reference's metadata).
    pub network_alpha: Option<(f64, bool)>,
    /// Per module: ‖ΔW_out − Σ ratio_i ΔW_i‖ / ‖Σ ratio_i ΔW_i‖ (sum mode with several
    /// inputs; 0 elsewhere), computed in f32 before the dtype conversion.
    pub relative_errors: BTreeMap<String, f64>,
    /// Modules merged per input (same order as the inputs).
    pub modules_per_input: Vec<usize>,
}

/// One input: file (for messages), ratio, modules.
#[derive(Debug)]
pub struct LoraSource<'a> {
    /// The file.
    pub path: PathBuf,
    /// Ratio.
    pub ratio: f64,
    /// Modules.
    pub weights: &'a LoraWeights,
}

/// `t` as an f32 matrix `[dim 0, rest]` (up `[out, r]`, down `[r, in·kh·kw]`).
fn f32_2d(t: &Tensor) -> Tensor {
    let rows = t.size()[0];
    t.to_kind(Kind::Float).reshape([rows, -1])
}

/// The exact ΔW of one module as a `[out, in·k·k]` f32 matrix.
fn exact_delta(t: &LoraTensors, coeff: f64) -> Tensor {
    f32_2d(&t.up).mm(&f32_2d(&t.down)) * (coeff * t.scale())
}

/// Merges LoRA files; see the module documentation for the arithmetic.
///
/// # Errors
/// [`MergeError::Invalid`] for sum mode with different ranks of one module (naming the modules
/// and ranks, suggesting `--concat` or `svd-merge-lora`), for modules whose layer shapes differ
/// between inputs, for non-finite values, and when no module is left.
pub fn merge_loras(inputs: &[LoraSource<'_>], opts: &LoraMergeOptions) -> Result<LoraMergeResult> {
    let first_kind = inputs
        .iter()
        .find_map(|i| i.weights.modules.values().next().map(|t| t.down.kind()))
        .unwrap_or(Kind::Float);
    let dtype = opts
        .dtype
        .or_else(|| crate::tensor::dtype_of(first_kind))
        .unwrap_or(Dtype::F32);
    let out_kind = crate::tensor::kind_of(dtype).unwrap_or(Kind::Float);

    // module → [(input index, tensors)]
    let mut by_module: BTreeMap<&str, Vec<(usize, &LoraTensors)>> = BTreeMap::new();
    let mut modules_per_input = vec![0usize; inputs.len()];
    for (i, inp) in inputs.iter().enumerate() {
        if !inp.ratio.is_finite() {
            return Err(MergeError::Invalid(format!(
                "{}: ratio {} is not finite",
                inp.path.display(),
                inp.ratio
            )));
        }
        for (name, t) in &inp.weights.modules {
            let finite = |x: &Tensor| x.isfinite().all().int64_value(&[]) != 0;
            if !finite(&t.up) || !finite(&t.down) || !t.effective_alpha().is_finite() {
                return Err(MergeError::Invalid(format!(
                    "{}: module {name} holds NaN or Inf; nothing was written",
                    inp.path.display()
                )));
            }
            by_module.entry(name.as_str()).or_default().push((i, t));
            modules_per_input[i] += 1;
        }
    }

    // Shapes (apart from rank) must agree; without concat so must ranks.
    let mut rank_clashes = Vec::new();
    for (name, parts) in &by_module {
        let (i0, t0) = parts[0];
        let geom = |t: &LoraTensors| {
            let (u, d) = (t.up.size(), t.down.size());
            let k: Vec<i64> = if d.len() == 4 {
                d[2..].to_vec()
            } else {
                vec![1, 1]
            };
            (u[0], d[1], k)
        };
        for &(i, t) in &parts[1..] {
            if geom(t) != geom(t0) {
                return Err(MergeError::Invalid(format!(
                    "module {name}: {} has up {:?} / down {:?} but {} has up {:?} / down {:?} (LoRAs for different models?)",
                    inputs[i0].path.display(),
                    t0.up.size(),
                    t0.down.size(),
                    inputs[i].path.display(),
                    t.up.size(),
                    t.down.size()
                )));
            }
        }
        if !opts.concat {
            let ranks: Vec<usize> = parts.iter().map(|(_, t)| t.rank()).collect();
            if ranks.iter().any(|&r| r != ranks[0]) {
                let desc: Vec<String> = parts
                    .iter()
                    .map(|(i, t)| format!("rank {} in {}", t.rank(), inputs[*i].path.display()))
                    .collect();
                rank_clashes.push(format!("{name} ({})", desc.join(", ")));
            }
        }
    }
    if !rank_clashes.is_empty() {
        return Err(MergeError::Invalid(format!(
            "{} module(s) have different ranks in different inputs, which adding factors cannot merge: {}; use --concat (exact, ranks add) or svd-merge-lora (re-approximated at a chosen rank)",
            rank_clashes.len(),
            preview(&rank_clashes, 4)
        )));
    }

    let mut modules = BTreeMap::new();
    let mut relative_errors = BTreeMap::new();
    let mut dims = Vec::new();
    let mut alphas = Vec::new();
    for (name, parts) in &by_module {
        let (ups, downs, alpha, from_missing): (Vec<Tensor>, Vec<Tensor>, f64, bool) =
            if opts.reference_compatible {
                let base = parts[0].1;
                let base_alpha = base.effective_alpha();
                let mut ups = Vec::new();
                let mut downs = Vec::new();
                for &(i, t) in parts {
                    let s = inputs[i].ratio * (t.effective_alpha() / base_alpha).sqrt();
                    ups.push(t.up.to_kind(Kind::Float) * s.abs());
                    downs.push(t.down.to_kind(Kind::Float) * s);
                }
                (ups, downs, base_alpha, base.alpha.is_none())
            } else {
                let mut ups = Vec::new();
                let mut downs = Vec::new();
                for &(i, t) in parts {
                    let a = inputs[i].ratio * t.scale();
                    if a == 0.0 {
                        continue;
                    }
                    let root = a.abs().sqrt();
                    ups.push(t.up.to_kind(Kind::Float) * root);
                    downs.push(t.down.to_kind(Kind::Float) * (root * a.signum()));
                }
                if ups.is_empty() {
                    continue; // every input of this module has ratio 0
                }
                let r = if opts.concat {
                    downs.iter().map(|d| d.size()[0]).sum::<i64>()
                } else {
                    downs[0].size()[0]
                };
                (ups, downs, r as f64, false)
            };
        let (mut up, mut down) = if opts.concat {
            (Tensor::cat(&ups, 1), Tensor::cat(&downs, 0))
        } else {
            let mut u = ups[0].shallow_clone();
            let mut d = downs[0].shallow_clone();
            for k in 1..ups.len() {
                u += &ups[k];
                d += &downs[k];
            }
            (u, d)
        };
        let rank = down.size()[0];
        if !opts.concat && parts.len() > 1 {
            let exact = parts
                .iter()
                .map(|&(i, t)| exact_delta(t, inputs[i].ratio))
                .reduce(|a, b| a + b)
                .expect("at least one part");
            let got = f32_2d(&up).mm(&f32_2d(&down)) * (alpha / rank as f64);
            let den = exact.norm().double_value(&[]);
            let num = (got - &exact).norm().double_value(&[]);
            relative_errors.insert(name.to_string(), if den > 0.0 { num / den } else { num });
        } else {
            relative_errors.insert(name.to_string(), 0.0);
        }
        if let Some(seed) = opts.shuffle_seed {
            // Seeded per module so the permutation does not depend on other modules.
            let _guard = tch::no_grad_guard();
            tch::manual_seed(seed.wrapping_add(crate::merge::lora_lora::name_seed(name)));
            let perm = Tensor::randperm(rank, (Kind::Int64, tch::Device::Cpu));
            down = down.index_select(0, &perm);
            up = up.index_select(1, &perm);
        }
        dims.push(rank as usize);
        alphas.push((alpha, from_missing));
        modules.insert(
            name.to_string(),
            LoraTensors {
                down: down.to_kind(out_kind),
                up: up.to_kind(out_kind),
                alpha: Some(alpha),
                alpha_dtype: None,
            },
        );
    }
    if modules.is_empty() {
        return Err(MergeError::Invalid(
            "no module left to write (every ratio is 0?); nothing was written".into(),
        ));
    }
    let network_dim = if opts.reference_compatible {
        // The reference reports the first input's dim even after concatenation.
        let base: Vec<usize> = by_module.values().map(|p| p[0].1.rank()).collect();
        base.iter().all(|&d| d == base[0]).then_some(base[0])
    } else {
        dims.iter().all(|&d| d == dims[0]).then_some(dims[0])
    };
    let network_alpha = alphas
        .iter()
        .all(|a| a.0 == alphas[0].0)
        .then_some(alphas[0]);
    Ok(LoraMergeResult {
        weights: LoraWeights {
            modules,
            ..Default::default()
        },
        dtype,
        network_dim,
        network_alpha,
        relative_errors,
        modules_per_input,
    })
}

/// A stable number from a module name (FNV-1a), to seed per-module permutations.
pub(crate) fn name_seed(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}
