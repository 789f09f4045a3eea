//! The DDPM training noise schedule: β, ᾱ (alphas_cumprod), SNR, the forward (noising) process
//! and the ε / v training targets.
//!
//! # Source
//! training.md §6.1 and §6.4; Ho et al. 2020, "Denoising Diffusion Probabilistic Models"
//! (eq. 4: x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε); Salimans & Ho 2022, "Progressive Distillation" (§4,
//! v = √ᾱ_t ε − √(1−ᾱ_t) x₀); Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps
//! are Flawed" (Algorithm 1, zero terminal SNR). Numerics follow diffusers' `DDPMScheduler`
//! (everything in float32, `linspace` of √β then squared).

use tch::{Device, Kind, Tensor};

/// Number of training timesteps of every SD model.
pub const NUM_TRAIN_TIMESTEPS: i64 = 1000;
/// First β of the SD `scaled_linear` schedule.
pub const BETA_START: f64 = 0.00085;
/// Last β of the SD `scaled_linear` schedule.
pub const BETA_END: f64 = 0.012;

/// What the U-Net predicts (and so what the training target is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε (SD 1.x, SD 2.x base, SDXL).
    Epsilon,
    /// The velocity v (SD 2.x 768-v, `--v_parameterization`).
    VPrediction,
}

/// A DDPM noise schedule over `T` timesteps (tensors of shape [T], float32, CPU).
#[derive(Debug)]
pub struct NoiseSchedule {
    betas: Tensor,
    alphas: Tensor,
    alphas_cumprod: Tensor,
    all_snr: Tensor,
}

impl NoiseSchedule {
    /// The `scaled_linear` schedule: β_t = linspace(√β_start, √β_end, T)_t², α_t = 1 − β_t,
    /// ᾱ_t = Π_{s≤t} α_s, SNR_t = ᾱ_t / (1 − ᾱ_t), all in float32.
    ///
    /// # Source
    /// training.md §6.1; diffusers `DDPMScheduler(beta_schedule="scaled_linear")`.
    pub fn scaled_linear(num_train_timesteps: i64, beta_start: f64, beta_end: f64) -> Self {
        let f32_cpu = (Kind::Float, Device::Cpu);
        let betas = Tensor::linspace(
            beta_start.sqrt(),
            beta_end.sqrt(),
            num_train_timesteps,
            f32_cpu,
        )
        .pow_tensor_scalar(2);
        Self::from_betas(betas)
    }

    /// The schedule of every SD 1.x / 2.x / SDXL model: `scaled_linear`, 0.00085 → 0.012, 1000
    /// steps.
    pub fn stable_diffusion() -> Self {
        Self::scaled_linear(NUM_TRAIN_TIMESTEPS, BETA_START, BETA_END)
    }

    fn from_betas(betas: Tensor) -> Self {
        let alphas = betas.ones_like() - &betas;
        let alphas_cumprod = alphas.cumprod(0, Kind::Float);
        let all_snr = &alphas_cumprod / (alphas_cumprod.ones_like() - &alphas_cumprod);
        Self {
            betas,
            alphas,
            alphas_cumprod,
            all_snr,
        }
    }

    /// `--zero_terminal_snr`: rescales the schedule so that ᾱ_{T−1} = 0: s = √ᾱ,
    /// s ← (s − s_{T−1}) · s₀ / (s₀ − s_{T−1}), ᾱ' = s², α'_t = ᾱ'_t / ᾱ'_{t−1} (α'_0 = ᾱ'_0),
    /// β' = 1 − α', and ᾱ is recomputed as the cumulative product of α'.
    ///
    /// # Compatibility
    /// [`NoiseSchedule::snr`] keeps the SNR of the original schedule, as sd-scripts does
    /// (`all_snr` is computed before the fix and never updated; training.md §6.1 oddity).
    ///
    /// # Source
    /// training.md §6.1; Lin et al. 2023, Algorithm 1; sd-scripts
    /// `fix_noise_scheduler_betas_for_zero_terminal_snr`.
    pub fn with_zero_terminal_snr(self) -> Self {
        let n = self.alphas_cumprod.size()[0];
        let s = self.alphas_cumprod.sqrt();
        let s0 = s.get(0);
        let s_last = s.get(n - 1);
        let s = (&s - &s_last) * (&s0 / (&s0 - &s_last));
        let ac = s.square();
        let ratio = ac.narrow(0, 1, n - 1) / ac.narrow(0, 0, n - 1);
        let alphas = Tensor::cat(&[ac.narrow(0, 0, 1), ratio], 0);
        let betas = alphas.ones_like() - &alphas;
        let alphas_cumprod = alphas.cumprod(0, Kind::Float);
        Self {
            betas,
            alphas,
            alphas_cumprod,
            all_snr: self.all_snr,
        }
    }

    /// Number of training timesteps T.
    pub fn num_train_timesteps(&self) -> i64 {
        self.betas.size()[0]
    }

    /// β_t, [T] float32.
    pub fn betas(&self) -> &Tensor {
        &self.betas
    }

    /// α_t = 1 − β_t, [T] float32.
    pub fn alphas(&self) -> &Tensor {
        &self.alphas
    }

    /// ᾱ_t (`alphas_cumprod`), [T] float32.
    pub fn alphas_cumprod(&self) -> &Tensor {
        &self.alphas_cumprod
    }

    /// SNR_t = ᾱ_t / (1 − ᾱ_t) of the original schedule (sd-scripts' `all_snr`), [T] float32.
    pub fn snr(&self) -> &Tensor {
        &self.all_snr
    }

    /// √ᾱ_t and √(1−ᾱ_t) gathered at `timesteps` and shaped to broadcast against `like`
    /// ([B, 1, 1, …]) in `like`'s dtype and device.
    fn coefficients(&self, timesteps: &Tensor, like: &Tensor) -> (Tensor, Tensor) {
        let ac = self
            .alphas_cumprod
            .to_device(like.device())
            .index_select(0, &timesteps.to_kind(Kind::Int64));
        let mut shape = vec![-1i64];
        shape.resize(like.dim(), 1);
        let sqrt_a = ac.sqrt().to_kind(like.kind()).view(shape.as_slice());
        let sqrt_1ma = (ac.ones_like() - &ac)
            .sqrt()
            .to_kind(like.kind())
            .view(shape.as_slice());
        (sqrt_a, sqrt_1ma)
    }

    /// Forward process x_t = √ᾱ_t · x₀ + √(1−ᾱ_t) · ε.
    ///
    /// # Shapes
    /// `x0`, `noise` [B, C, H, W] (latents); `timesteps` [B] integers in 0..T; result like `x0`.
    ///
    /// # Source
    /// DDPM eq. 4; diffusers `DDPMScheduler.add_noise` (coefficients from float32 ᾱ, then cast
    /// to the sample dtype).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sqrt_a, sqrt_1ma) = self.coefficients(timesteps, x0);
        sqrt_a * x0 + sqrt_1ma * noise
    }

    /// Velocity v = √ᾱ_t · ε − √(1−ᾱ_t) · x₀ (shapes as [`NoiseSchedule::add_noise`]).
    ///
    /// # Source
    /// Salimans & Ho 2022 §4; diffusers `DDPMScheduler.get_velocity`; training.md §6.1.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &Tensor) -> Tensor {
        let (sqrt_a, sqrt_1ma) = self.coefficients(timesteps, x0);
        sqrt_a * noise - sqrt_1ma * x0
    }

    /// The training target: ε for [`PredictionType::Epsilon`], v for
    /// [`PredictionType::VPrediction`] (training.md §6.4).
    pub fn target(
        &self,
        prediction: PredictionType,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &Tensor,
    ) -> Tensor {
        match prediction {
            PredictionType::Epsilon => noise.shallow_clone(),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_monotonic() {
        let s = NoiseSchedule::stable_diffusion();
        assert_eq!(s.num_train_timesteps(), 1000);
        assert!((s.betas().double_value(&[0]) - BETA_START).abs() < 1e-9);
        assert!((s.betas().double_value(&[999]) - BETA_END).abs() < 1e-8);
        let ac = s.alphas_cumprod();
        let diffs = ac.narrow(0, 1, 999) - ac.narrow(0, 0, 999);
        assert!(diffs.max().double_value(&[]) < 0.0);
    }
}
