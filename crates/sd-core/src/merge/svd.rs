//! Truncated SVD with the reference's symmetric quantile clamp, and svd-merge.
//!
//! # Source
//! sd-scripts `networks/svd_merge_lora.py` (`merge_lora_models`),
//! `networks/extract_lora_from_models.py` (`svd`); `../shared/spec/tools.md` §3.2, §4.2, §9.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tch::{Device, Kind, Tensor};

use super::{MergeError, Result};
use crate::lora::{LoraTensors, LoraWeights};

/// `q`-quantile of all elements of `t` with linear interpolation (torch's default), without
/// any element-count limit.
pub fn quantile(t: &Tensor, q: f64) -> f64 {
    let flat = t.flatten(0, -1).to_kind(Kind::Float);
    let n = flat.size()[0];
    if n == 0 {
        return 0.0;
    }
    let (sorted, _) = flat.sort(0, false);
    let p = q.clamp(0.0, 1.0) * (n - 1) as f64;
    let lo = p.floor() as i64;
    let hi = p.ceil() as i64;
    let a = sorted.double_value(&[lo]);
    let b = sorted.double_value(&[hi]);
    a + (b - a) * (p - lo as f64)
}

/// How the SVD of a merged ΔW is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SvdMethod {
    /// LAPACK SVD of the dense ΔW (the reference's path; same singular-vector signs).
    Full,
    /// Exact SVD through the factors: ΔW = A·B with A `[out, R]`, B `[R, in]`, R = Σ ranks;
    /// QR of A and Bᵀ, then the SVD of the R×R core. O((out+in)·R²) instead of
    /// O(out·in·min(out, in)); same singular values and subspaces, but singular-vector signs
    /// may differ from [`SvdMethod::Full`], which moves the quantile clamp slightly.
    #[default]
    Factored,
}

/// Truncates `U·diag(S)·Vᵀ` (torch.svd's V, `[cols, n]`) to rank k, clamps, reshapes to
/// `shape`.
fn finish(
    u: &Tensor,
    s: &Tensor,
    v: &Tensor,
    shape: &[i64],
    rank: usize,
    clamp_quantile: Option<f64>,
) -> (Tensor, Tensor) {
    let (out, inp) = (shape[0], shape[1]);
    let n = s.size()[0];
    let k = (rank as i64).min(inp).min(out).max(1);
    // The factored route has only R singular values; the rest are exactly 0, so the rank the
    // reference writes is reached with zero columns/rows (ΔW unchanged).
    let kk = k.min(n);
    let mut up = u.narrow(1, 0, kk) * s.narrow(0, 0, kk).unsqueeze(0);
    let mut down = v.narrow(1, 0, kk).transpose(0, 1).contiguous();
    if kk < k {
        up = Tensor::cat(
            &[
                up.shallow_clone(),
                up.zeros_like().narrow(1, 0, 1).repeat([1, k - kk]),
            ],
            1,
        );
        down = Tensor::cat(
            &[
                down.shallow_clone(),
                down.zeros_like().narrow(0, 0, 1).repeat([k - kk, 1]),
            ],
            0,
        );
    }
    if let Some(q) = clamp_quantile {
        let joined = Tensor::cat(&[up.flatten(0, -1), down.flatten(0, -1)], 0);
        let hi = quantile(&joined, q);
        up = up.clamp(-hi, hi);
        down = down.clamp(-hi, hi);
    }
    let (up, down) = if shape.len() == 4 {
        (
            up.reshape([out, k, 1, 1]),
            down.reshape([k, inp, shape[2], shape[3]]),
        )
    } else {
        (up, down)
    };
    (
        up.to_device(Device::Cpu).contiguous(),
        down.to_device(Device::Cpu).contiguous(),
    )
}

fn torch_err(what: &str) -> impl FnOnce(tch::TchError) -> MergeError + '_ {
    move |source| MergeError::Torch {
        what: format!("SVD of {what}"),
        source,
    }
}

/// Rank-`rank` factors of a dense ΔW: `up = U[:, :k]·diag(S[:k])`, `down = Vh[:k]`, both
/// clamped to ±(`clamp_quantile`-quantile of their joined elements) when a quantile is given.
///
/// # Shapes
/// `delta` `[out, in]` or `[out, in, kh, kw]` (any float dtype; computed in f32 on `device`);
/// returns (up `[out, k]` / `[out, k, 1, 1]`, down `[k, in]` / `[k, in, kh, kw]`) in f32 on
/// the CPU, with k = min(rank, in, out) (in = channels, as the reference).
///
/// # Errors
/// [`MergeError::Torch`] when the SVD fails (e.g. non-finite input).
pub fn decompose(
    what: &str,
    delta: &Tensor,
    rank: usize,
    clamp_quantile: Option<f64>,
    device: Device,
) -> Result<(Tensor, Tensor)> {
    let shape = delta.size();
    let mat = delta
        .to_device(device)
        .to_kind(Kind::Float)
        .reshape([shape[0], -1]);
    // torch.svd (= linalg.svd without the CUDA-only `driver` argument, which tch always passes).
    let (u, s, v) = mat.f_svd(true, true).map_err(torch_err(what))?;
    Ok(finish(&u, &s, &v, &shape, rank, clamp_quantile))
}

/// As [`decompose`] for ΔW = `a`·`b` given by factors (`a` `[out, R]`, `b` `[R, in·kh·kw]`,
/// f32), without forming ΔW (see [`SvdMethod::Factored`]). `shape` is ΔW's shape.
///
/// # Errors
/// [`MergeError::Torch`] when a factorisation fails.
pub fn decompose_factored(
    what: &str,
    a: &Tensor,
    b: &Tensor,
    shape: &[i64],
    rank: usize,
    clamp_quantile: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let (qa, ra) = Tensor::f_linalg_qr(a, "reduced").map_err(torch_err(what))?;
    let (qb, rb) = Tensor::f_linalg_qr(&b.transpose(0, 1), "reduced").map_err(torch_err(what))?;
    let core = ra.mm(&rb.transpose(0, 1));
    let (uc, s, vc) = core.f_svd(true, true).map_err(torch_err(what))?;
    Ok(finish(
        &qa.mm(&uc),
        &s,
        &qb.mm(&vc),
        shape,
        rank,
        clamp_quantile,
    ))
}

/// One input of [`svd_merge`].
#[derive(Debug)]
pub struct SvdSource<'a> {
    /// The file (for messages).
    pub path: PathBuf,
    /// Ratio.
    pub ratio: f64,
    /// Modules.
    pub weights: &'a LoraWeights,
}

/// Options of [`svd_merge`].
#[derive(Debug, Clone)]
pub struct SvdMergeOptions {
    /// `--new_rank` (Linear and 1×1 modules).
    pub new_rank: usize,
    /// `--new_conv_rank` (k×k convs).
    pub new_conv_rank: usize,
    /// Device of the accumulation and SVD.
    pub device: Device,
    /// Clamp quantile (the reference fixes 0.99).
    pub clamp_quantile: Option<f64>,
    /// SVD route.
    pub method: SvdMethod,
}

/// Sums Σ ratio_i · scale_i · up_i ⊗ down_i per module in f32 (union of all inputs' modules),
/// then [`decompose`]s each sum. Alpha of every output module = its rank (scale 1).
/// `progress(done, total)` is called after each module.
///
/// # Errors
/// [`MergeError::Invalid`] when one module has different layer shapes in two inputs, or for
/// non-finite values; [`MergeError::Torch`] from the SVD.
pub fn svd_merge(
    inputs: &[SvdSource<'_>],
    opts: &SvdMergeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoraWeights> {
    let mut by_module: BTreeMap<&str, Vec<(usize, &LoraTensors)>> = BTreeMap::new();
    for (i, inp) in inputs.iter().enumerate() {
        for (name, t) in &inp.weights.modules {
            by_module.entry(name.as_str()).or_default().push((i, t));
        }
    }
    let total = by_module.len();
    let mut modules = BTreeMap::new();
    for (done, (name, parts)) in by_module.iter().enumerate() {
        let shape = dense_shape(parts[0].1);
        for &(i, t) in parts {
            let s = dense_shape(t);
            if s != shape {
                return Err(MergeError::Invalid(format!(
                    "module {name}: ΔW shape {s:?} in {} differs from {shape:?} in {} (LoRAs for different models?)",
                    inputs[i].path.display(),
                    inputs[parts[0].0].path.display()
                )));
            }
        }
        let conv = shape.len() == 4 && shape[2..] != [1, 1];
        let rank = if conv {
            opts.new_conv_rank
        } else {
            opts.new_rank
        };
        let (up, down) = match opts.method {
            SvdMethod::Full => {
                let mut acc = Tensor::zeros(shape.as_slice(), (Kind::Float, opts.device));
                for &(i, t) in parts {
                    acc += super::checkpoint::delta_weight(
                        &t.up,
                        &t.down,
                        inputs[i].ratio,
                        t.scale(),
                        &shape,
                        Kind::Float,
                        opts.device,
                    );
                }
                if acc.isfinite().all().int64_value(&[]) == 0 {
                    return Err(MergeError::Invalid(format!(
                        "module {name}: the merged ΔW holds NaN or Inf"
                    )));
                }
                decompose(name, &acc, rank, opts.clamp_quantile, opts.device)?
            }
            SvdMethod::Factored => {
                let mut ups = Vec::with_capacity(parts.len());
                let mut downs = Vec::with_capacity(parts.len());
                for &(i, t) in parts {
                    let r = t.rank() as i64;
                    let coeff = inputs[i].ratio * t.scale();
                    ups.push(
                        t.up.to_device(opts.device)
                            .to_kind(Kind::Float)
                            .reshape([-1, r])
                            * coeff,
                    );
                    downs.push(
                        t.down
                            .to_device(opts.device)
                            .to_kind(Kind::Float)
                            .reshape([r, -1]),
                    );
                }
                let a = Tensor::cat(&ups, 1);
                let b = Tensor::cat(&downs, 0);
                let finite = |x: &Tensor| x.isfinite().all().int64_value(&[]) != 0;
                if !finite(&a) || !finite(&b) {
                    return Err(MergeError::Invalid(format!(
                        "module {name}: a LoRA factor holds NaN or Inf"
                    )));
                }
                decompose_factored(name, &a, &b, &shape, rank, opts.clamp_quantile)?
            }
        };
        let k = down.size()[0];
        modules.insert(
            name.to_string(),
            LoraTensors {
                down,
                up,
                alpha: Some(k as f64),
                alpha_dtype: None,
            },
        );
        progress(done + 1, total);
    }
    Ok(LoraWeights {
        modules,
        ..Default::default()
    })
}

/// The dense ΔW shape of a module: `[out, in]` or `[out, in, kh, kw]`.
pub fn dense_shape(t: &LoraTensors) -> Vec<i64> {
    let (u, d) = (t.up.size(), t.down.size());
    let mut s = vec![u[0], d[1]];
    if d.len() == 4 {
        s.extend_from_slice(&d[2..]);
    }
    s
}
