//! Samplers (noise schedulers at inference) by sd-scripts' names, with diffusers' timestep
//! grids and step formulas.
//!
//! A [`Sampler`] is driven one U-Net call at a time, as diffusers' schedulers are:
//! for call `c` in `0..num_calls()`: `input = scale_model_input(x, c)`, the caller evaluates
//! the (guided) model at `timestep(c)`, then `x = step(c, output, x, noise)`. Second-order
//! samplers (Heun, DPM2) make two calls per step except the last.
//!
//! All step arithmetic runs on float32 tensors with scalar coefficients computed in f64 from
//! the float32 ᾱ table (diffusers computes them as float32 0-d tensors; the difference is below
//! 1e-6 relative).
//!
//! # Source
//! generation.md §3; diffusers 0.32 `DDIMScheduler`, `EulerDiscreteScheduler`,
//! `EulerAncestralDiscreteScheduler`, `HeunDiscreteScheduler`, `LMSDiscreteScheduler`,
//! `KDPM2DiscreteScheduler`, `KDPM2AncestralDiscreteScheduler`,
//! `DPMSolverMultistepScheduler`, `PNDMScheduler` (PRK warm-up, then PLMS),
//! `DPMSolverSinglestepScheduler`; Liu et al. 2022, "Pseudo Numerical Methods for Diffusion
//! Models" (eq. 9, 12, 13); k-diffusion `sampling.py` (`sample_heun`, `sample_dpm_2`,
//! `sample_dpm_2_ancestral`, `get_ancestral_step`); Lu et al. 2022, "DPM-Solver++" (eq. for
//! 2M).

use std::fmt;
use std::str::FromStr;

use tch::{Kind, Tensor};

use super::{GenerateError, Result};
use crate::schedule::{NoiseSchedule, PredictionType};

/// A sampler name of gen_img's `--sampler` / train-network's `--sample_sampler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// `ddim`: DDIM with η = 0.
    Ddim,
    /// `pndm`: PNDM — three pseudo Runge–Kutta steps (4 calls each), then 4th-order pseudo
    /// linear multistep; needs at least 4 steps.
    Pndm,
    /// `lms`, `k_lms`: linear multistep of order 4 on σ.
    Lms,
    /// `euler`, `k_euler`.
    Euler,
    /// `euler_a`, `k_euler_a`: Euler ancestral.
    EulerAncestral,
    /// `heun`: second order, two calls per step except the last.
    Heun,
    /// `dpm_2`, `k_dpm_2`: DPM2 with a log-σ midpoint.
    Dpm2,
    /// `dpm_2_a`, `k_dpm_2_a`: ancestral DPM2.
    Dpm2Ancestral,
    /// `dpmsolver`: DPM-Solver (noise prediction) 2M.
    DpmSolver,
    /// `dpmsolver++`: DPM-Solver++ (data prediction) 2M.
    DpmSolverPlusPlus,
    /// `dpmsingle`: DPM-Solver++ single-step of order 2 (orders 1, 2, 1, 2, …, last step 1).
    DpmSingle,
}

/// Every accepted name, in gen_img's order.
pub const SAMPLER_NAMES: &[&str] = &[
    "ddim",
    "pndm",
    "lms",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "dpmsolver",
    "dpmsolver++",
    "dpmsingle",
    "k_lms",
    "k_euler",
    "k_euler_a",
    "k_dpm_2",
    "k_dpm_2_a",
];

impl FromStr for SamplerKind {
    type Err = GenerateError;

    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        Ok(match name.strip_prefix("k_").unwrap_or(&name) {
            "ddim" => Self::Ddim,
            "pndm" => Self::Pndm,
            "lms" => Self::Lms,
            "euler" => Self::Euler,
            "euler_a" => Self::EulerAncestral,
            "heun" if !name.starts_with("k_") => Self::Heun,
            "dpm_2" => Self::Dpm2,
            "dpm_2_a" => Self::Dpm2Ancestral,
            "dpmsolver" if !name.starts_with("k_") => Self::DpmSolver,
            "dpmsolver++" if !name.starts_with("k_") => Self::DpmSolverPlusPlus,
            "dpmsingle" if !name.starts_with("k_") => Self::DpmSingle,
            _ => {
                return Err(GenerateError::Invalid(format!(
                    "unknown sampler \"{s}\": expected one of {}",
                    SAMPLER_NAMES.join(", ")
                )));
            }
        })
    }
}

impl SamplerKind {
    /// The canonical sd-scripts name (without `k_`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Lms => "lms",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
            Self::Heun => "heun",
            Self::Dpm2 => "dpm_2",
            Self::Dpm2Ancestral => "dpm_2_a",
            Self::DpmSolver => "dpmsolver",
            Self::DpmSolverPlusPlus => "dpmsolver++",
            Self::DpmSingle => "dpmsingle",
        }
    }

    /// Noise tensors gen_img reserves per step for this sampler (generation.md §5.5: 2 for
    /// `dpm_2_a`, else 1; only the ancestral samplers use them).
    pub fn noises_per_step(self) -> usize {
        if self == Self::Dpm2Ancestral { 2 } else { 1 }
    }

    /// Whether the sampler draws fresh noise during sampling.
    pub fn is_ancestral(self) -> bool {
        matches!(self, Self::EulerAncestral | Self::Dpm2Ancestral)
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the inference timesteps are spread over 0..1000 (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// `leading`: t_i = (N−1−i)·(1000 // N) + steps_offset.
    Leading,
    /// `linspace`: linspace(0, 999, N) reversed.
    Linspace,
    /// `trailing`: round(arange(1000, 0, −1000/N)) − 1.
    Trailing,
}

/// Scheduler configuration: which sampler and the diffusers config values that change its
/// grid or steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// The sampler.
    pub kind: SamplerKind,
    /// ε or v prediction of the model.
    pub prediction: PredictionType,
    /// Timestep spacing.
    pub spacing: Spacing,
    /// `steps_offset` added to leading grids.
    pub steps_offset: i64,
    /// DDIM: clamp x̂₀ to [−1, 1].
    pub clip_sample: bool,
    /// DDIM: ᾱ of the step after the last is 1 (else ᾱ₀).
    pub set_alpha_to_one: bool,
    /// `--zero_terminal_snr`: rescale the β table first (applied to every sampler, §13 #14).
    pub zero_terminal_snr: bool,
}

impl SamplerConfig {
    /// gen_img's scheduler for `kind` (generation.md §3.1): diffusers defaults with
    /// `steps_offset` 1 (not for dpmsingle), `clip_sample` false; DDIM/PNDM "leading", the
    /// others "linspace" spacing; `set_alpha_to_one` true for DDIM, false for PNDM (the
    /// diffusers defaults).
    pub fn gen_img(kind: SamplerKind, prediction: PredictionType) -> Self {
        let spacing = match kind {
            SamplerKind::Ddim | SamplerKind::Pndm => Spacing::Leading,
            _ => Spacing::Linspace,
        };
        Self {
            kind,
            prediction,
            spacing,
            steps_offset: if kind == SamplerKind::DpmSingle { 0 } else { 1 },
            clip_sample: false,
            set_alpha_to_one: kind != SamplerKind::Pndm,
            zero_terminal_snr: false,
        }
    }

    /// train-network's sample scheduler (training.md §12.2): diffusers defaults, so DDIM keeps
    /// `clip_sample` true and `steps_offset` 0 (§13 #16).
    pub fn training_sample(kind: SamplerKind, prediction: PredictionType) -> Self {
        Self {
            steps_offset: 0,
            clip_sample: kind == SamplerKind::Ddim,
            ..Self::gen_img(kind, prediction)
        }
    }
}

/// Per-call data of the σ-based samplers.
#[derive(Debug, Clone, Copy)]
struct Call {
    /// U-Net timestep.
    timestep: f64,
    /// σ of the model input (for input scaling and x̂₀).
    sigma_in: f64,
}

/// A sampler set up for a number of steps, holding its multistep state.
pub struct Sampler {
    config: SamplerConfig,
    steps: usize,
    alphas_cumprod: Vec<f64>,
    /// DDIM / DPM-Solver integer timesteps, or σ-sampler float timesteps, one per step.
    step_timesteps: Vec<f64>,
    /// σ_0..σ_N of the σ-based samplers (σ_N final), empty for DDIM.
    sigmas: Vec<f64>,
    calls: Vec<Call>,
    /// Derivatives (LMS), model outputs (DPM-Solver), or the first-stage sample and derivative
    /// (Heun/DPM2).
    history: Vec<Tensor>,
    stage_sample: Option<(Tensor, Tensor)>,
    /// PNDM: number of PRK calls (12); they come first.
    prk_calls: usize,
    /// PNDM: the PRK base timestep of each PRK call.
    prk_base: Vec<f64>,
    /// PNDM: the weighted sum of the PRK outputs of the current Runge–Kutta step.
    prk_sum: Option<Tensor>,
    /// PNDM: sample at the start of the Runge–Kutta step; dpmsingle: sample at the start of
    /// the current single-step (order 1 or 2) update.
    step_start: Option<Tensor>,
    /// dpmsingle: solver order of each step.
    orders: Vec<u8>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("config", &self.config)
            .field("steps", &self.steps)
            .field("timesteps", &self.step_timesteps)
            .field("sigmas", &self.sigmas)
            .finish()
    }
}

fn f32_vec(t: &Tensor) -> Vec<f64> {
    let v: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).contiguous().view([-1]))
        .expect("a float tensor converts");
    v.into_iter().map(f64::from).collect()
}

/// numpy `interp(x, arange(len(table)), table)`.
fn interp(x: f64, table: &[f64]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0];
    }
    if x >= last as f64 {
        return table[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    table[i] + (table[i + 1] - table[i]) * w
}

/// Rounds like numpy (half to even).
fn round_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// k-diffusion's `get_ancestral_step(σ_from, σ_to)` with η = 1: (σ_down, σ_up).
fn ancestral(sigma_from: f64, sigma_to: f64) -> (f64, f64) {
    let up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to)
        / (sigma_from * sigma_from))
        .max(0.0)
        .sqrt()
        .min(sigma_to);
    let down = (sigma_to * sigma_to - up * up).max(0.0).sqrt();
    (down, up)
}

impl Sampler {
    /// Sets the sampler up for `steps` steps.
    ///
    /// # Errors
    /// [`GenerateError::Invalid`] for 0 steps, more than 1000, or `pndm` with fewer than 4
    /// steps (diffusers' PNDM fails there: its Runge–Kutta warm-up needs 4 grid points).
    pub fn new(config: SamplerConfig, steps: usize) -> Result<Self> {
        if steps == 0 || steps > 1000 {
            return Err(GenerateError::Invalid(format!(
                "steps must be in 1..=1000, found {steps}"
            )));
        }
        if config.kind == SamplerKind::Pndm && steps < 4 {
            return Err(GenerateError::Invalid(format!(
                "sampler \"pndm\" needs at least 4 steps (its Runge-Kutta warm-up covers 3), found {steps}"
            )));
        }
        let mut schedule = NoiseSchedule::stable_diffusion();
        if config.zero_terminal_snr {
            schedule = schedule.with_zero_terminal_snr();
        }
        let ac_t = schedule.alphas_cumprod();
        let alphas_cumprod = f32_vec(ac_t);
        // σ table computed in float32 as diffusers does, then widened.
        let sigma_table = f32_vec(&((ac_t.ones_like() - ac_t) / ac_t).sqrt());
        let n_train = alphas_cumprod.len() as i64;
        let n = steps as i64;
        let mut s = Self {
            config,
            steps,
            alphas_cumprod,
            step_timesteps: Vec::new(),
            sigmas: Vec::new(),
            calls: Vec::new(),
            history: Vec::new(),
            stage_sample: None,
            prk_calls: 0,
            prk_base: Vec::new(),
            prk_sum: None,
            step_start: None,
            orders: Vec::new(),
        };
        match config.kind {
            SamplerKind::Ddim => {
                s.step_timesteps = Self::int_grid(config, n, n_train);
                s.calls = s
                    .step_timesteps
                    .iter()
                    .map(|&t| Call {
                        timestep: t,
                        sigma_in: 0.0,
                    })
                    .collect();
            }
            SamplerKind::Pndm => s.pndm_grid(n, n_train),
            SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus | SamplerKind::DpmSingle => {
                let ts: Vec<f64> = match config.spacing {
                    Spacing::Leading => {
                        let ratio = n_train / (n + 1);
                        (0..=n)
                            .rev()
                            .take(steps)
                            .map(|i| (i * ratio + config.steps_offset) as f64)
                            .collect()
                    }
                    Spacing::Linspace => (0..=n)
                        .rev()
                        .take(steps)
                        .map(|i| round_even(i as f64 * (n_train - 1) as f64 / n as f64))
                        .collect(),
                    Spacing::Trailing => (0..n)
                        .map(|i| {
                            round_even(n_train as f64 - i as f64 * n_train as f64 / n as f64) - 1.0
                        })
                        .collect(),
                };
                let mut sigmas: Vec<f64> = ts.iter().map(|&t| interp(t, &sigma_table)).collect();
                // dpmsolver++ and dpmsingle end at σ = 0; noise-prediction dpmsolver cannot
                // (0·∞), so it ends at σ_min as diffusers requires for it ("sigma_min").
                sigmas.push(if config.kind == SamplerKind::DpmSolver {
                    sigma_table[0]
                } else {
                    0.0
                });
                if config.kind == SamplerKind::DpmSingle {
                    s.orders = dpm_single_orders(steps);
                }
                s.calls = ts
                    .iter()
                    .zip(&sigmas)
                    .map(|(&t, &sg)| Call {
                        timestep: t,
                        sigma_in: sg,
                    })
                    .collect();
                s.step_timesteps = ts;
                s.sigmas = sigmas;
            }
            _ => {
                let ts: Vec<f64> = match config.spacing {
                    Spacing::Linspace => (0..n)
                        .rev()
                        .map(|i| {
                            if n == 1 {
                                0.0
                            } else {
                                (i as f64 * (n_train - 1) as f64 / (n - 1) as f64) as f32 as f64
                            }
                        })
                        .collect(),
                    _ => Self::int_grid(config, n, n_train),
                };
                let mut sigmas: Vec<f64> = ts
                    .iter()
                    .map(|&t| interp(t, &sigma_table) as f32 as f64)
                    .collect();
                sigmas.push(0.0);
                s.step_timesteps = ts;
                s.sigmas = sigmas;
                s.calls = s.sigma_calls(&sigma_table);
            }
        }
        Ok(s)
    }

    /// PNDM's U-Net calls (diffusers `PNDMScheduler.set_timesteps` with PRK steps): with the
    /// integer grid t_0 < … < t_{N−1} and h = (1000 // N) // 2, three Runge–Kutta steps over
    /// the 4 highest grid points (calls at t, t−h, t−h, t−2h each), then one PLMS call per
    /// remaining grid point t_{N−4} … t_0.
    fn pndm_grid(&mut self, n: i64, n_train: i64) {
        let mut asc = Self::int_grid(self.config, n, n_train);
        asc.reverse();
        let half = (n_train / n / 2) as f64;
        let top = &asc[asc.len() - 4..];
        // [t, t+h] per grid point, last dropped, each doubled, first and last dropped, reversed.
        let mut pairs: Vec<f64> = top.iter().flat_map(|&t| [t, t + half]).collect();
        pairs.pop();
        let doubled: Vec<f64> = pairs.iter().flat_map(|&t| [t, t]).collect();
        let mut prk: Vec<f64> = doubled[1..doubled.len() - 1].to_vec();
        prk.reverse();
        self.prk_calls = prk.len();
        self.prk_base = (0..prk.len()).map(|c| prk[c / 4 * 4]).collect();
        let plms: Vec<f64> = asc[..asc.len() - 3].iter().rev().copied().collect();
        self.step_timesteps = prk.iter().chain(&plms).copied().collect();
        self.calls = self
            .step_timesteps
            .iter()
            .map(|&t| Call {
                timestep: t,
                sigma_in: 0.0,
            })
            .collect();
    }

    /// Leading or trailing integer grid (DDIM, and σ samplers with those spacings).
    fn int_grid(config: SamplerConfig, n: i64, n_train: i64) -> Vec<f64> {
        match config.spacing {
            Spacing::Leading => {
                let ratio = n_train / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + config.steps_offset) as f64)
                    .collect()
            }
            Spacing::Linspace => (0..n)
                .rev()
                .map(|i| {
                    if n == 1 {
                        0.0
                    } else {
                        round_even(i as f64 * (n_train - 1) as f64 / (n - 1) as f64)
                    }
                })
                .collect(),
            Spacing::Trailing => (0..n)
                .map(|i| round_even(n_train as f64 - i as f64 * n_train as f64 / n as f64) - 1.0)
                .collect(),
        }
    }

    /// The U-Net calls of σ-based samplers.
    fn sigma_calls(&self, sigma_table: &[f64]) -> Vec<Call> {
        let log_table: Vec<f64> = sigma_table.iter().map(|s| s.ln()).collect();
        let mut calls = Vec::new();
        for i in 0..self.steps {
            let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
            calls.push(Call {
                timestep: self.step_timesteps[i],
                sigma_in: sigma,
            });
            match self.config.kind {
                SamplerKind::Heun if next > 0.0 => calls.push(Call {
                    timestep: self.step_timesteps[i + 1],
                    sigma_in: next,
                }),
                SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral => {
                    let target = if self.config.kind == SamplerKind::Dpm2 {
                        next
                    } else {
                        ancestral(sigma, next).0
                    };
                    if target > 0.0 {
                        let mid = ((sigma.ln() + target.ln()) / 2.0).exp();
                        calls.push(Call {
                            timestep: sigma_to_t(mid, &log_table),
                            sigma_in: mid,
                        });
                    }
                }
                _ => {}
            }
        }
        calls
    }

    /// The configuration.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Number of sampling steps.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The timestep of each step (diffusers' `timesteps` for single-call samplers; for PNDM
    /// the timestep of each call, as diffusers lists them).
    pub fn timesteps(&self) -> &[f64] {
        &self.step_timesteps
    }

    /// σ_0..σ_N (σ-based samplers and DPM-Solver; empty for DDIM).
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// Number of U-Net calls.
    pub fn num_calls(&self) -> usize {
        self.calls.len()
    }

    /// The U-Net timestep of call `call` (fractional for linspace σ samplers and DPM2
    /// midpoints).
    pub fn timestep(&self, call: usize) -> f64 {
        self.calls[call].timestep
    }

    /// The step (0-based) that call `call` belongs to.
    pub fn step_of_call(&self, call: usize) -> usize {
        match self.config.kind {
            SamplerKind::Heun | SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral => {
                let mut step = 0;
                let mut c = 0;
                while c < call {
                    c += if self.is_two_call_step(step) { 2 } else { 1 };
                    if c <= call {
                        step += 1;
                    }
                }
                step
            }
            _ => call,
        }
    }

    fn is_two_call_step(&self, step: usize) -> bool {
        let (sigma, next) = (self.sigmas[step], self.sigmas[step + 1]);
        match self.config.kind {
            SamplerKind::Heun | SamplerKind::Dpm2 => next > 0.0,
            SamplerKind::Dpm2Ancestral => ancestral(sigma, next).0 > 0.0,
            _ => false,
        }
    }

    /// The factor the start noise N(0, I) is multiplied by: 1 for DDIM, PNDM and DPM-Solver,
    /// σ_max for linspace/trailing σ samplers, √(σ_max² + 1) for leading ones.
    pub fn init_noise_sigma(&self) -> f64 {
        match self.config.kind {
            SamplerKind::Ddim
            | SamplerKind::Pndm
            | SamplerKind::DpmSolver
            | SamplerKind::DpmSolverPlusPlus
            | SamplerKind::DpmSingle => 1.0,
            _ => {
                let max = self.sigmas.iter().copied().fold(0.0, f64::max);
                if self.config.spacing == Spacing::Leading {
                    (max * max + 1.0).sqrt()
                } else {
                    max
                }
            }
        }
    }

    /// The U-Net input for call `call`: x/√(σ²+1) for σ samplers, x otherwise.
    ///
    /// # Shapes
    /// `x` [B, 4, h, w] → same shape and dtype.
    pub fn scale_model_input(&self, x: &Tensor, call: usize) -> Tensor {
        match self.config.kind {
            SamplerKind::Ddim
            | SamplerKind::Pndm
            | SamplerKind::DpmSolver
            | SamplerKind::DpmSolverPlusPlus
            | SamplerKind::DpmSingle => x.shallow_clone(),
            _ => {
                let s = self.calls[call].sigma_in;
                x / (s * s + 1.0).sqrt()
            }
        }
    }

    /// x̂₀ from a model output at σ (σ form, generation.md §3.2).
    fn x0_sigma(&self, out: &Tensor, x: &Tensor, sigma: f64) -> Tensor {
        match self.config.prediction {
            PredictionType::Epsilon => x - out * sigma,
            PredictionType::VPrediction => {
                out * (-sigma / (sigma * sigma + 1.0).sqrt()) + x / (sigma * sigma + 1.0)
            }
        }
    }

    /// Advances the sample after U-Net call `call`.
    ///
    /// `noise` is asked for one N(0, I) tensor like `x` by the ancestral samplers (once per
    /// step; the pipeline hands out per-image streams, generation.md §3.4 recommendation).
    ///
    /// # Shapes
    /// `model_output`, `x` [B, 4, h, w] (any float kind; computed in f32) → [B, 4, h, w] f32.
    pub fn step(
        &mut self,
        call: usize,
        model_output: &Tensor,
        x: &Tensor,
        noise: &mut dyn FnMut() -> Tensor,
    ) -> Tensor {
        let out = model_output.to_kind(Kind::Float);
        let x = x.to_kind(Kind::Float);
        match self.config.kind {
            SamplerKind::Ddim => self.step_ddim(call, &out, &x),
            SamplerKind::DpmSolver | SamplerKind::DpmSolverPlusPlus => {
                self.step_dpm_solver(call, &out, &x)
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let (sigma, next) = (self.sigmas[call], self.sigmas[call + 1]);
                let x0 = self.x0_sigma(&out, &x, sigma);
                let d = (&x - x0) / sigma;
                if self.config.kind == SamplerKind::Euler {
                    &x + d * (next - sigma)
                } else {
                    let (down, up) = ancestral(sigma, next);
                    &x + d * (down - sigma) + noise().to_kind(Kind::Float) * up
                }
            }
            SamplerKind::Lms => self.step_lms(call, &out, &x),
            SamplerKind::Heun | SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral => {
                self.step_second_order(call, &out, &x, noise)
            }
            SamplerKind::Pndm => self.step_pndm(call, &out, &x),
            SamplerKind::DpmSingle => self.step_dpm_single(call, &out, &x),
        }
    }

    /// PNDM's transfer from `t` to `prev` (Liu et al. eq. 9; diffusers `_get_prev_sample`):
    /// x_prev = √(ᾱ_prev/ᾱ_t)·x − (ᾱ_prev − ᾱ_t)·ε / (ᾱ_t·√(1−ᾱ_prev) + √(ᾱ_t(1−ᾱ_t)ᾱ_prev)),
    /// with ᾱ_prev = ᾱ₀ (or 1 with `set_alpha_to_one`) below 0 and ε = √ᾱ_t·v + √(1−ᾱ_t)·x
    /// for v-prediction.
    fn pndm_transfer(&self, x: &Tensor, t: f64, prev: f64, out: &Tensor) -> Tensor {
        let a_t = self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)];
        let a_prev = if prev >= 0.0 {
            self.alphas_cumprod[prev as usize]
        } else if self.config.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        };
        let eps = match self.config.prediction {
            PredictionType::Epsilon => out.shallow_clone(),
            PredictionType::VPrediction => out * a_t.sqrt() + x * (1.0 - a_t).sqrt(),
        };
        let denom = a_t * (1.0 - a_prev).sqrt() + (a_t * (1.0 - a_t) * a_prev).sqrt();
        x * (a_prev / a_t).sqrt() - eps * ((a_prev - a_t) / denom)
    }

    /// PNDM (diffusers `step_prk` / `step_plms` without skipped PRK steps).
    fn step_pndm(&mut self, call: usize, out: &Tensor, x: &Tensor) -> Tensor {
        let t = self.calls[call].timestep;
        let ratio = (self.alphas_cumprod.len() / self.steps) as f64;
        if call < self.prk_calls {
            // 1. Pseudo Runge–Kutta: the 4 calls of one step evaluate at t, t−h, t−h, t−2h;
            //    each moves from the step's start sample, the last with the weighted sum
            //    (1/6, 1/3, 1/3, 1/6) of the 4 outputs.
            let prev = if call % 2 == 1 {
                t
            } else {
                t - (ratio / 2.0).floor()
            };
            let base = self.prk_base[call];
            let used = match call % 4 {
                0 => {
                    self.prk_sum = Some(out * (1.0 / 6.0));
                    self.history.push(out.shallow_clone());
                    self.step_start = Some(x.shallow_clone());
                    out.shallow_clone()
                }
                1 | 2 => {
                    let sum = self
                        .prk_sum
                        .take()
                        .expect("set at the first call of a PRK step");
                    self.prk_sum = Some(sum + out * (1.0 / 3.0));
                    out.shallow_clone()
                }
                _ => {
                    let sum = self
                        .prk_sum
                        .take()
                        .expect("set at the first call of a PRK step");
                    sum + out * (1.0 / 6.0)
                }
            };
            let start = self.step_start.as_ref().expect("set at the first PRK call");
            self.pndm_transfer(start, base, prev, &used)
        } else {
            // 2. Pseudo linear multistep of order 4 over the last 4 outputs (the PRK steps
            //    leave 3).
            self.history.push(out.shallow_clone());
            if self.history.len() > 4 {
                let _ = self.history.remove(0);
            }
            let e = &self.history;
            let combined = match e.len() {
                1 => e[0].shallow_clone(),
                2 => (&e[1] * 3.0 - &e[0]) / 2.0,
                3 => (&e[2] * 23.0 - &e[1] * 16.0 + &e[0] * 5.0) / 12.0,
                _ => (&e[3] * 55.0 - &e[2] * 59.0 + &e[1] * 37.0 - &e[0] * 9.0) / 24.0,
            };
            self.pndm_transfer(x, t, t - ratio, &combined)
        }
    }

    /// DPM-Solver++ single-step, order 2, midpoint (diffusers `DPMSolverSinglestepScheduler`
    /// with `lower_order_final`, which it forces when the final σ is 0).
    ///
    /// An order-1 step saves its start sample x_s1 and moves to σ_{i+1}; the following
    /// order-2 step restarts from x_s1 and goes to σ_{i+1} using the outputs at σ_{i−1} and
    /// σ_i: with h = λ_t − λ_s1, r₀ = (λ_s0 − λ_s1)/h, D₀ = m_{s1}, D₁ = (m_{s0} − m_{s1})/r₀,
    /// x_t = (s_t/s_s1)·x_s1 − α_t(e^{−h} − 1)·D₀ − ½·α_t(e^{−h} − 1)·D₁.
    fn step_dpm_single(&mut self, call: usize, out: &Tensor, x: &Tensor) -> Tensor {
        let alpha_s = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let lambda = |(a, s): (f64, f64)| a.ln() - s.ln();
        let sigma_s0 = self.sigmas[call];
        let (a_s0, s_s0) = alpha_s(sigma_s0);
        let m = match self.config.prediction {
            PredictionType::Epsilon => (x - out * s_s0) / a_s0,
            PredictionType::VPrediction => x * a_s0 - out * s_s0,
        };
        self.history.push(m);
        if self.history.len() > 2 {
            let _ = self.history.remove(0);
        }
        let mut order = self.orders[call];
        if order == 2 && self.history.len() < 2 {
            order = 1;
        }
        if order == 1 {
            self.step_start = Some(x.shallow_clone());
        }
        let start = self.step_start.as_ref().expect("set at the order-1 step");
        let (a_t, s_t) = alpha_s(self.sigmas[call + 1]);
        let l_t = lambda((a_t, s_t));
        if order == 1 {
            let h = l_t - lambda((a_s0, s_s0));
            let m0 = &self.history[self.history.len() - 1];
            start * (s_t / s_s0) - m0 * (a_t * ((-h).exp() - 1.0))
        } else {
            let (a_s1, s_s1) = alpha_s(self.sigmas[call - 1]);
            let l_s1 = lambda((a_s1, s_s1));
            let h = l_t - l_s1;
            let r0 = (lambda((a_s0, s_s0)) - l_s1) / h;
            let (m1, m0) = (&self.history[0], &self.history[1]);
            let d1 = (m0 - m1) * (1.0 / r0);
            let c = a_t * ((-h).exp() - 1.0);
            start * (s_t / s_s1) - m1 * c - d1 * (0.5 * c)
        }
    }

    fn step_ddim(&self, call: usize, out: &Tensor, x: &Tensor) -> Tensor {
        let t = self.step_timesteps[call] as i64;
        let prev = t - self.alphas_cumprod.len() as i64 / self.steps as i64;
        let a = self.alphas_cumprod[t.clamp(0, 999) as usize];
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else if self.config.set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        };
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let (mut x0, eps) = match self.config.prediction {
            PredictionType::Epsilon => ((x - out * sb) / sa, out.shallow_clone()),
            PredictionType::VPrediction => (x * sa - out * sb, out * sa + x * sb),
        };
        if self.config.clip_sample {
            x0 = x0.clamp(-1.0, 1.0);
        }
        x0 * a_prev.sqrt() + eps * (1.0 - a_prev).sqrt()
    }

    fn step_dpm_solver(&mut self, call: usize, out: &Tensor, x: &Tensor) -> Tensor {
        let plus = self.config.kind == SamplerKind::DpmSolverPlusPlus;
        let alpha_s = |s: f64| {
            let a = 1.0 / (s * s + 1.0).sqrt();
            (a, s * a)
        };
        let sigma_s0 = self.sigmas[call];
        let sigma_t = self.sigmas[call + 1];
        let (a_s0, s_s0) = alpha_s(sigma_s0);
        let (a_t, s_t) = alpha_s(sigma_t);
        // 1. Convert the output to x̂₀ (dpmsolver++) or ε̂ (dpmsolver).
        let m = match (plus, self.config.prediction) {
            (true, PredictionType::Epsilon) => (x - out * s_s0) / a_s0,
            (true, PredictionType::VPrediction) => x * a_s0 - out * s_s0,
            (false, PredictionType::Epsilon) => out.shallow_clone(),
            (false, PredictionType::VPrediction) => out * a_s0 + x * s_s0,
        };
        self.history.push(m.shallow_clone());
        if self.history.len() > 2 {
            let _ = self.history.remove(0);
        }
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let l_t = lambda(a_t, s_t);
        let l_s0 = lambda(a_s0, s_s0);
        let h = l_t - l_s0;
        let n = self.steps;
        // 2. Order: first at the first step and at the final step (σ = 0 or < 15 steps);
        //    second otherwise (diffusers `lower_order_final`, solver_order 2).
        let last = call == n - 1;
        let first_order = call == 0 || (last && (n < 15 || sigma_t == 0.0));
        let (d0, d1) = if first_order {
            (m, None)
        } else {
            let sigma_s1 = self.sigmas[call - 1];
            let (a_s1, s_s1) = alpha_s(sigma_s1);
            let h0 = l_s0 - lambda(a_s1, s_s1);
            let r0 = h0 / h;
            let d1 = (&m - &self.history[0]) * (1.0 / r0);
            (m, Some(d1))
        };
        let mut y = if plus {
            x * (s_t / s_s0) - &d0 * (a_t * ((-h).exp() - 1.0))
        } else {
            x * (a_t / a_s0) - &d0 * (s_t * (h.exp() - 1.0))
        };
        if let Some(d1) = d1 {
            y = if plus {
                y - d1 * (0.5 * a_t * ((-h).exp() - 1.0))
            } else {
                y - d1 * (0.5 * s_t * (h.exp() - 1.0))
            };
        }
        y
    }

    fn step_lms(&mut self, call: usize, out: &Tensor, x: &Tensor) -> Tensor {
        let sigma = self.sigmas[call];
        let x0 = self.x0_sigma(out, x, sigma);
        let d = (x - x0) / sigma;
        self.history.push(d);
        if self.history.len() > 4 {
            let _ = self.history.remove(0);
        }
        let order = self.history.len();
        let mut y = x.shallow_clone();
        for j in 0..order {
            let c = lms_coefficient(&self.sigmas, order, call, j);
            y += &self.history[order - 1 - j] * c;
        }
        y
    }

    fn step_second_order(
        &mut self,
        call: usize,
        out: &Tensor,
        x: &Tensor,
        noise: &mut dyn FnMut() -> Tensor,
    ) -> Tensor {
        let kind = self.config.kind;
        let step = self.step_of_call(call);
        let (sigma, next) = (self.sigmas[step], self.sigmas[step + 1]);
        let sigma_in = self.calls[call].sigma_in;
        let x0 = self.x0_sigma(out, x, sigma_in);
        let d = (x - &x0) / sigma_in;
        let (target, up) = if kind == SamplerKind::Dpm2Ancestral {
            ancestral(sigma, next)
        } else {
            (next, 0.0)
        };
        let add_noise = |y: Tensor, noise: &mut dyn FnMut() -> Tensor| {
            if up > 0.0 {
                y + noise().to_kind(Kind::Float) * up
            } else {
                y
            }
        };
        match self.stage_sample.take() {
            None if !self.is_two_call_step(step) => {
                // Last step (or σ_down = 0): plain Euler to the target.
                add_noise(x + d * (target - sigma), noise)
            }
            None => {
                let x_next = match kind {
                    SamplerKind::Heun => x + &d * (next - sigma),
                    _ => x + &d * (self.calls[call + 1].sigma_in - sigma),
                };
                self.stage_sample = Some((x.shallow_clone(), d));
                x_next
            }
            Some((x_start, d_first)) => {
                let y = match kind {
                    SamplerKind::Heun => x_start + (d_first + d) * (0.5 * (next - sigma)),
                    _ => x_start + d * (target - sigma),
                };
                add_noise(y, noise)
            }
        }
    }
}

/// Solver order per step of dpmsingle (diffusers `get_order_list` with solver order 2 and
/// `lower_order_final`): [1, 2] repeated, ending [1, 1] for even N and [1] for odd N.
fn dpm_single_orders(steps: usize) -> Vec<u8> {
    let mut orders: Vec<u8> = (0..steps).map(|i| if i % 2 == 0 { 1 } else { 2 }).collect();
    if let Some(last) = orders.last_mut() {
        *last = 1;
    }
    orders
}

/// diffusers' `_sigma_to_t`: the fractional timestep whose log σ is `sigma`'s, by linear
/// interpolation in log σ.
fn sigma_to_t(sigma: f64, log_table: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_table.len();
    let low = log_table
        .iter()
        .rposition(|&l| ls - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_table[low], log_table[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// ∫_{σ_i}^{σ_{i+1}} ℓ_j(τ) dτ for the Lagrange basis over σ_i, σ_{i−1}, …, σ_{i−order+1}
/// (diffusers `get_lms_coefficient`, integrated exactly instead of by quadrature).
fn lms_coefficient(sigmas: &[f64], order: usize, i: usize, j: usize) -> f64 {
    // Polynomial coefficients (ascending powers) of the basis product.
    let mut poly = vec![1.0f64];
    let mut denom = 1.0;
    for k in 0..order {
        if k == j {
            continue;
        }
        let sk = sigmas[i - k];
        let mut next = vec![0.0; poly.len() + 1];
        for (p, &c) in poly.iter().enumerate() {
            next[p + 1] += c;
            next[p] -= c * sk;
        }
        poly = next;
        denom *= sigmas[i - j] - sk;
    }
    let integral = |x: f64| {
        poly.iter()
            .enumerate()
            .map(|(p, &c)| c * x.powi(p as i32 + 1) / (p + 1) as f64)
            .sum::<f64>()
    };
    (integral(sigmas[i + 1]) - integral(sigmas[i])) / denom
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_aliases() {
        assert_eq!(
            "k_euler_a".parse::<SamplerKind>().ok(),
            Some(SamplerKind::EulerAncestral)
        );
        assert_eq!(
            "DPMSolver++".parse::<SamplerKind>().ok(),
            Some(SamplerKind::DpmSolverPlusPlus)
        );
        assert!("k_heun".parse::<SamplerKind>().is_err());
        for n in SAMPLER_NAMES {
            assert!(n.parse::<SamplerKind>().is_ok(), "{n}");
        }
    }

    #[test]
    fn leading_grid_50() {
        let s = Sampler::new(
            SamplerConfig::gen_img(SamplerKind::Ddim, PredictionType::Epsilon),
            50,
        )
        .expect("ddim");
        assert_eq!(s.timesteps()[0], 981.0);
        assert_eq!(s.timesteps()[49], 1.0);
    }

    #[test]
    fn lms_coefficients_integrate_constants() {
        // The basis sums to 1, so the coefficients sum to σ_{i+1} − σ_i.
        let sigmas = [10.0, 6.0, 3.0, 1.5, 0.5, 0.0];
        for i in 0..5 {
            let order = (i + 1).min(4);
            let total: f64 = (0..order)
                .map(|j| lms_coefficient(&sigmas, order, i, j))
                .sum();
            assert!((total - (sigmas[i + 1] - sigmas[i])).abs() < 1e-12);
        }
    }
}
