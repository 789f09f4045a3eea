//! 8-bit optimiser state as bitsandbytes keeps it (AdamW8bit, Lion8bit): each state tensor is
//! flattened, split into blocks of 256 values, each block scaled by its absolute maximum and
//! every value stored as the u8 index of the nearest entry of a 256-value "dynamic" map
//! (signed for the first moment m, unsigned for the second moment v).
//!
//! The update itself runs in f32 on the dequantised state with the bitsandbytes formulas, then
//! the new state is requantised. Parameters with fewer than `min_8bit_size` (4096) values keep
//! f32 state, as bitsandbytes does.
//!
//! # Compatibility
//! Equivalent in spirit to bitsandbytes' fused blockwise kernels
//! (`kOptimizerStatic8bit2StateBlockwise` / `...1StateBlockwise`), not bit-identical:
//! * the nearest code is found through a 65536-entry table indexed by the bf16 bit pattern
//!   of the normalised value plus a one-step midpoint correction (exact nearest code, ties
//!   aside), while bitsandbytes searches the map with its own pivot scheme;
//! * the work is unfused tch ops (dequantise, update, requantise), several passes over memory
//!   instead of one kernel;
//! * weight decay multiplies the parameter before the Adam step (PyTorch's order); the
//!   difference to applying it after is O(lr²·wd);
//! * gradients that are inf/NaN are not skipped per element (the fp16 [`super::GradScaler`]
//!   skips the whole step instead); `percentile_clipping` and `max_unorm` are not implemented.
//!
//! # Source
//! training.md §9; notes/libtorch.md §7; bitsandbytes `functional.create_dynamic_map`,
//! `optim/optimizer.py` (`Optimizer2State.init_state`, `min_8bit_size`), Dettmers et al. 2022,
//! "8-bit Optimizers via Block-wise Quantization".

use tch::{Device, Kind, Tensor};

use super::optim::{AdamWParams, Grouped, LionParams, ParamGroup, UpdateRule};

/// Values per quantisation block.
pub const BLOCK_SIZE: i64 = 256;

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits, total_bits)`: for each decade
/// 10^(i − max_exponent_bits + 1), i in 0..max_exponent_bits, the midpoints of a
/// `linspace(0.1, 1, …)` grid (negated too when `signed`), plus 0 and 1, zero-padded to
/// 2^total_bits values and sorted. f32 arithmetic as torch does it.
///
/// The signed 8-bit map spans −0.99297 … 1.0, the unsigned one 0 … 1.0.
pub fn create_dynamic_map(signed: bool, max_exponent_bits: i64, total_bits: i64) -> Vec<f32> {
    let to_vec = |t: &Tensor| -> Vec<f32> {
        let mut v = vec![0f32; t.numel()];
        t.copy_data(&mut v, t.numel());
        v
    };
    let mut data: Vec<f32> = Vec::new();
    let non_sign_bits = total_bits - 1;
    let additional_items = (1i64 << (non_sign_bits - max_exponent_bits).max(0)) - 1;
    let push_decade = |i: i64, items: i64, data: &mut Vec<f32>| {
        let b = Tensor::linspace(0.1, 1.0, items, (Kind::Float, Device::Cpu));
        let means = (b.slice(0, 0, items - 1, 1) + b.slice(0, 1, items, 1)) / 2.0;
        let scale = 10f64.powf((-(max_exponent_bits - 1) + i) as f64);
        data.extend(to_vec(&(&means * scale)));
        if signed {
            data.extend(to_vec(&(&means * -scale)));
        }
    };
    for i in 0..max_exponent_bits {
        let shift = i + non_sign_bits - max_exponent_bits + if signed { 0 } else { 1 };
        push_decade(i, (1i64 << shift) + 1, &mut data);
    }
    if additional_items > 0 {
        push_decade(max_exponent_bits - 1, additional_items + 1, &mut data);
    }
    data.push(0.0);
    data.push(1.0);
    let n = 1usize << total_bits;
    data.resize(n.max(data.len()), 0.0);
    data.sort_by(|a, b| a.total_cmp(b));
    data
}

/// A 256-entry quantisation map with its bf16 lookup table.
#[derive(Debug)]
pub struct DynamicMap {
    /// The map values, f32 [256], sorted.
    code: Tensor,
    /// For each bf16 bit pattern p (indexed by p as i16 + 32768), the index of the code
    /// nearest to that bf16 value; i64 [65536].
    lut: Tensor,
    /// Midpoint between code i and code i+1 (+inf for the last), f32 [256].
    upper_mid: Tensor,
    /// Midpoint between code i−1 and code i (−inf for the first), f32 [256].
    lower_mid: Tensor,
    signed: bool,
}

impl DynamicMap {
    /// The signed (`true`, for m) or unsigned (`false`, for v) 8-bit dynamic map, on the CPU.
    pub fn new(signed: bool) -> Self {
        let code = create_dynamic_map(signed, 7, 8);
        let mut lut = vec![0u8; 1 << 16];
        let zero_index = code.iter().position(|&c| c == 0.0).unwrap_or(0);
        for (j, slot) in lut.iter_mut().enumerate() {
            let bits = (j as i32 - 32768) as i16 as u16;
            let x = f32::from_bits(u32::from(bits) << 16);
            *slot = if x.is_nan() {
                zero_index as u8
            } else {
                let i = code.partition_point(|&c| c < x);
                let best = if i == 0 {
                    0
                } else if i >= code.len() {
                    code.len() - 1
                } else if (x - code[i - 1]) <= (code[i] - x) {
                    i - 1
                } else {
                    i
                };
                best as u8
            };
        }
        let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let mut upper = mids.clone();
        upper.push(f32::INFINITY);
        let mut lower = vec![f32::NEG_INFINITY];
        lower.extend(&mids);
        let lut: Vec<i64> = lut.into_iter().map(i64::from).collect();
        Self {
            code: Tensor::from_slice(&code),
            lut: Tensor::from_slice(&lut),
            upper_mid: Tensor::from_slice(&upper),
            lower_mid: Tensor::from_slice(&lower),
            signed,
        }
    }

    /// Whether this is the signed map.
    pub fn signed(&self) -> bool {
        self.signed
    }

    /// The map values, f32 [256].
    pub fn code(&self) -> &Tensor {
        &self.code
    }

    /// A copy of the map on `device`.
    pub fn to_device(&self, device: Device) -> Self {
        Self {
            code: self.code.to_device(device),
            lut: self.lut.to_device(device),
            upper_mid: self.upper_mid.to_device(device),
            lower_mid: self.lower_mid.to_device(device),
            signed: self.signed,
        }
    }

    /// Quantises blocks: `x` f32 [nb, 256] → (u8 codes [nb, 256], f32 absmax [nb]).
    ///
    /// Each normalised value x/absmax picks the code nearest to its bf16 rounding from the
    /// lookup table, then moves one code up or down when x itself lies beyond the midpoint to
    /// that neighbour (bf16 rounding error is always below one code gap), so the result is the
    /// nearest code (ties between two codes may go either way).
    pub fn quantize_blocks(&self, x: &Tensor) -> (Tensor, Tensor) {
        let absmax = x.abs().amax([1], true);
        let xn = x / absmax.clamp_min(f64::from(f32::MIN_POSITIVE));
        let bits = xn
            .to_kind(Kind::BFloat16)
            .view_dtype(Kind::Int16)
            .to_kind(Kind::Int64)
            + 32768;
        let index = self.lut.take(&bits);
        let up = xn.gt_tensor(&self.upper_mid.take(&index));
        let down = xn.lt_tensor(&self.lower_mid.take(&index));
        let index = index + up.to_kind(Kind::Int64) - down.to_kind(Kind::Int64);
        (index.to_kind(Kind::Uint8), absmax.squeeze_dim(1))
    }

    /// Dequantises blocks: u8 codes [nb, 256] and absmax [nb] → f32 [nb, 256].
    pub fn dequantize_blocks(&self, q: &Tensor, absmax: &Tensor) -> Tensor {
        self.code.take(&q.to_kind(Kind::Int64)) * absmax.unsqueeze(1)
    }

    /// Quantises a tensor of any shape: flattened, zero-padded to whole blocks →
    /// (u8 [nb·256], f32 absmax [nb]) with nb = ⌈numel / 256⌉.
    pub fn quantize(&self, x: &Tensor) -> (Tensor, Tensor) {
        let blocks = to_blocks(&x.to_kind(Kind::Float));
        let (q, absmax) = self.quantize_blocks(&blocks);
        (q.reshape([-1]), absmax)
    }

    /// Inverse of [`DynamicMap::quantize`]: f32 tensor of `shape`.
    pub fn dequantize(&self, q: &Tensor, absmax: &Tensor, shape: &[i64]) -> Tensor {
        let numel: i64 = shape.iter().product();
        self.dequantize_blocks(&q.view([-1, BLOCK_SIZE]), absmax)
            .reshape([-1])
            .narrow(0, 0, numel)
            .reshape(shape)
    }
}

fn num_blocks(numel: i64) -> i64 {
    (numel + BLOCK_SIZE - 1) / BLOCK_SIZE
}

/// Flattens and zero-pads to [nb, 256].
fn to_blocks(x: &Tensor) -> Tensor {
    let n = x.numel() as i64;
    let nb = num_blocks(n);
    x.reshape([-1])
        .constant_pad_nd([0, nb * BLOCK_SIZE - n])
        .view([nb, BLOCK_SIZE])
}

/// The first `param`-many values of `blocks` in the shape of `param`.
fn from_blocks(blocks: &Tensor, param: &Tensor) -> Tensor {
    blocks
        .reshape([-1])
        .narrow(0, 0, param.numel() as i64)
        .view(param.size().as_slice())
}

/// The two maps, cached on the device last used.
#[derive(Debug)]
struct Maps {
    device: Device,
    signed: DynamicMap,
    unsigned: DynamicMap,
}

impl Maps {
    fn on(cache: &mut Option<Maps>, device: Device) -> &Maps {
        if cache.as_ref().map(|m| m.device) != Some(device) {
            let cpu = cache.take();
            let (s, u) = match cpu {
                Some(m) => (m.signed.to_device(device), m.unsigned.to_device(device)),
                None => (
                    DynamicMap::new(true).to_device(device),
                    DynamicMap::new(false).to_device(device),
                ),
            };
            *cache = Some(Maps {
                device,
                signed: s,
                unsigned: u,
            });
        }
        cache.as_ref().expect("just filled")
    }
}

fn quantized_slots(param: &Tensor, n_states: usize) -> Vec<(&'static str, Tensor)> {
    let nb = num_blocks(param.numel() as i64);
    let dev = param.device();
    let names = [("state1", "absmax1"), ("state2", "absmax2")];
    let mut out = Vec::new();
    for (s, a) in names.iter().take(n_states) {
        out.push((*s, Tensor::zeros([nb * BLOCK_SIZE], (Kind::Uint8, dev))));
        out.push((*a, Tensor::zeros([nb], (Kind::Float, dev))));
    }
    out
}

fn f32_slots(param: &Tensor, n_states: usize) -> Vec<(&'static str, Tensor)> {
    ["state1", "state2"]
        .iter()
        .take(n_states)
        .map(|s| {
            (
                *s,
                Tensor::zeros(param.size(), (Kind::Float, param.device())),
            )
        })
        .collect()
}

/// Hyper-parameters of AdamW8bit (bitsandbytes `AdamW8bit` defaults with sd-scripts' lr).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW8bitParams {
    /// β, ε and weight decay as AdamW (weight decay default 0.01).
    pub adamw: AdamWParams,
    /// Parameters with fewer values keep f32 state; default 4096 (`optim_bits=32`: i64::MAX).
    pub min_8bit_size: i64,
}

impl Default for AdamW8bitParams {
    fn default() -> Self {
        Self {
            adamw: AdamWParams::default(),
            min_8bit_size: 4096,
        }
    }
}

/// The AdamW8bit update rule (hyper-parameters plus the cached maps).
#[derive(Debug)]
pub struct AdamW8bitRule {
    /// Hyper-parameters.
    pub params: AdamW8bitParams,
    maps: Option<Maps>,
}

impl UpdateRule for AdamW8bitRule {
    fn init_state(&self, param: &Tensor) -> Vec<(&'static str, Tensor)> {
        if param.numel() as i64 >= self.params.min_8bit_size {
            quantized_slots(param, 2)
        } else {
            f32_slots(param, 2)
        }
    }

    /// bitsandbytes' Adam: m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
    /// p ← p·(1 − lr·wd) − lr·(√(1 − β₂ᵗ)/(1 − β₁ᵗ))·m / (√v + √(1 − β₂ᵗ)·ε), with m and v
    /// dequantised before and requantised after.
    fn update(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
        step: i64,
        lr: f64,
    ) -> f64 {
        let AdamWParams {
            betas: (beta1, beta2),
            eps,
            weight_decay,
        } = self.params.adamw;
        let t = step as f64;
        let correction1 = 1.0 - beta1.powf(t);
        let correction2 = (1.0 - beta2.powf(t)).sqrt();
        let step_size = -lr * correction2 / correction1;
        let quantized = state[0].kind() == Kind::Uint8;
        let (g, m, v) = if quantized {
            let maps = Maps::on(&mut self.maps, param.device());
            let nb = state[1].size()[0];
            let m = maps
                .signed
                .dequantize_blocks(&state[0].view([nb, BLOCK_SIZE]), &state[1]);
            let v = maps
                .unsigned
                .dequantize_blocks(&state[2].view([nb, BLOCK_SIZE]), &state[3]);
            (to_blocks(grad), m, v)
        } else {
            (
                grad.shallow_clone(),
                state[0].shallow_clone(),
                state[1].shallow_clone(),
            )
        };
        let m = m * beta1 + &g * (1.0 - beta1);
        let v = v * beta2 + &g * &g * (1.0 - beta2);
        let update = &m * step_size / (v.sqrt() + correction2 * eps);
        let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
        if quantized {
            let _ = param.g_add_(&from_blocks(&update, param));
            let maps = Maps::on(&mut self.maps, param.device());
            let (q1, a1) = maps.signed.quantize_blocks(&m);
            let (q2, a2) = maps.unsigned.quantize_blocks(&v);
            state[0].copy_(&q1.reshape([-1]));
            state[1].copy_(&a1);
            state[2].copy_(&q2.reshape([-1]));
            state[3].copy_(&a2);
        } else {
            let _ = param.g_add_(&update);
            state[0].copy_(&m);
            state[1].copy_(&v);
        }
        lr
    }
}

/// AdamW with block-wise 8-bit state (bitsandbytes `AdamW8bit`).
pub type AdamW8bit = Grouped<AdamW8bitRule>;

impl AdamW8bit {
    /// AdamW8bit over `groups`; metadata name `bitsandbytes.optim.adamw.AdamW8bit`.
    pub fn new(groups: Vec<ParamGroup>, params: AdamW8bitParams) -> Self {
        let rule = AdamW8bitRule { params, maps: None };
        Grouped::with_rule(rule, groups, "bitsandbytes.optim.adamw.AdamW8bit")
    }
}

/// Hyper-parameters of Lion8bit (bitsandbytes `Lion8bit` defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lion8bitParams {
    /// β and weight decay as Lion.
    pub lion: LionParams,
    /// Parameters with fewer values keep f32 state; default 4096.
    pub min_8bit_size: i64,
}

impl Default for Lion8bitParams {
    fn default() -> Self {
        Self {
            lion: LionParams::default(),
            min_8bit_size: 4096,
        }
    }
}

/// The Lion8bit update rule.
#[derive(Debug)]
pub struct Lion8bitRule {
    /// Hyper-parameters.
    pub params: Lion8bitParams,
    maps: Option<Maps>,
}

impl UpdateRule for Lion8bitRule {
    fn init_state(&self, param: &Tensor) -> Vec<(&'static str, Tensor)> {
        if param.numel() as i64 >= self.params.min_8bit_size {
            quantized_slots(param, 1)
        } else {
            f32_slots(param, 1)
        }
    }

    /// Lion on the dequantised m: p ← p·(1 − lr·wd) − lr·sign(β₁m + (1 − β₁)g);
    /// m ← β₂m + (1 − β₂)g, requantised.
    fn update(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
        _step: i64,
        lr: f64,
    ) -> f64 {
        let LionParams {
            betas: (beta1, beta2),
            weight_decay,
        } = self.params.lion;
        let quantized = state[0].kind() == Kind::Uint8;
        let (g, m) = if quantized {
            let maps = Maps::on(&mut self.maps, param.device());
            let nb = state[1].size()[0];
            let m = maps
                .signed
                .dequantize_blocks(&state[0].view([nb, BLOCK_SIZE]), &state[1]);
            (to_blocks(grad), m)
        } else {
            (grad.shallow_clone(), state[0].shallow_clone())
        };
        let update = (&m * beta1 + &g * (1.0 - beta1)).sign() * -lr;
        let m = m * beta2 + &g * (1.0 - beta2);
        let _ = param.g_mul_scalar_(1.0 - lr * weight_decay);
        if quantized {
            let _ = param.g_add_(&from_blocks(&update, param));
            let maps = Maps::on(&mut self.maps, param.device());
            let (q1, a1) = maps.signed.quantize_blocks(&m);
            state[0].copy_(&q1.reshape([-1]));
            state[1].copy_(&a1);
        } else {
            let _ = param.g_add_(&update);
            state[0].copy_(&m);
        }
        lr
    }
}

/// Lion with block-wise 8-bit state (bitsandbytes `Lion8bit`).
pub type Lion8bit = Grouped<Lion8bitRule>;

impl Lion8bit {
    /// Lion8bit over `groups`; metadata name `bitsandbytes.optim.lion.Lion8bit`.
    pub fn new(groups: Vec<ParamGroup>, params: Lion8bitParams) -> Self {
        let rule = Lion8bitRule { params, maps: None };
        Grouped::with_rule(rule, groups, "bitsandbytes.optim.lion.Lion8bit")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_maps_match_bitsandbytes_layout() {
        let s = create_dynamic_map(true, 7, 8);
        assert_eq!(s.len(), 256);
        assert_eq!(s[255], 1.0);
        assert!((s[0] + 0.992_968_75).abs() < 1e-6, "min {}", s[0]);
        assert_eq!(s.iter().filter(|&&x| x == 0.0).count(), 1);
        let u = create_dynamic_map(false, 7, 8);
        assert_eq!(u.len(), 256);
        assert_eq!(u[0], 0.0);
        assert_eq!(u[255], 1.0);
        assert!(u.iter().all(|&x| x >= 0.0));
        // smallest non-zero magnitude: 1e-6 × mean(0.1, 1) for the signed map (one item in the
        // first decade), 1e-6 × (0.1 + 0.4)/2... for the unsigned one (two items).
        assert!((s[128] - 0.55e-6).abs() < 1e-12, "{}", s[128]);
        assert!((u[1] - 0.325e-6).abs() < 1e-12, "{}", u[1]);
        for w in s.windows(2).chain(u.windows(2)) {
            assert!(w[0] < w[1]);
        }
    }
}
