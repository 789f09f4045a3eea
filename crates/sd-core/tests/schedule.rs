//! The DDPM training schedule against values the references computed: the Euler pipeline
//! golden's sigmas (diffusers builds them from the same float32 ᾱ as σ_t = √((1−ᾱ_t)/ᾱ_t)) and
//! the well-known SD maximum σ of 14.6146.

use std::collections::HashMap;

use sd_core::schedule::{NoiseSchedule, PredictionType};
use tch::{Device, Kind, Tensor};

fn sigmas(s: &NoiseSchedule) -> Tensor {
    let ac = s.alphas_cumprod();
    ((ac.ones_like() - ac) / ac).sqrt()
}

#[test]
fn sigmas_match_diffusers_euler_golden() {
    let path = sd_testutil::fixture("goldens/pipeline-sd15-euler.safetensors");
    let g: HashMap<String, Tensor> = Tensor::read_safetensors(&path)
        .expect("golden")
        .into_iter()
        .collect();
    let t = g["timesteps"].to_kind(Kind::Int64);
    let expected = g["sigmas"].narrow(0, 0, 5);
    let got = sigmas(&NoiseSchedule::stable_diffusion()).index_select(0, &t);
    let a: Vec<f32> = Vec::try_from(got).expect("f32");
    let e: Vec<f32> = Vec::try_from(expected).expect("f32");
    sd_testutil::assert_close("sigmas at 801/601/401/201/1", &a, &e, 1e-6, 1e-6);
}

#[test]
fn terminal_sigma_and_snr() {
    let s = NoiseSchedule::stable_diffusion();
    let sigma_max = sigmas(&s).double_value(&[999]);
    assert!(
        (sigma_max - 14.6146).abs() < 1e-3,
        "sigma_999 = {sigma_max}"
    );
    let snr0 = s.snr().double_value(&[0]);
    let ac0 = s.alphas_cumprod().double_value(&[0]);
    assert!((snr0 - ac0 / (1.0 - ac0)).abs() / snr0 < 1e-5);
}

#[test]
fn noising_and_velocity_invert() {
    tch::manual_seed(7);
    let s = NoiseSchedule::stable_diffusion();
    let x0 = Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu));
    let eps = Tensor::randn([3, 4, 8, 8], (Kind::Float, Device::Cpu));
    let t = Tensor::from_slice(&[0i64, 500, 999]);
    let xt = s.add_noise(&x0, &eps, &t);
    let v = s.target(PredictionType::VPrediction, &x0, &eps, &t);
    // With a = √ᾱ, b = √(1−ᾱ): a·x_t − b·v = (a² + b²)·x₀ = x₀ and b·x_t + a·v = ε.
    let ac = s.alphas_cumprod().index_select(0, &t).view([3, 1, 1, 1]);
    let (a, b) = (ac.sqrt(), (ac.ones_like() - &ac).sqrt());
    let x0_back = &a * &xt - &b * &v;
    let eps_back = &b * &xt + &a * &v;
    assert!((x0_back - &x0).abs().max().double_value(&[]) < 1e-5);
    assert!((eps_back - &eps).abs().max().double_value(&[]) < 1e-5);
    assert!(s.target(PredictionType::Epsilon, &x0, &eps, &t).equal(&eps));
    // Half-precision latents get half-precision outputs.
    assert_eq!(
        s.add_noise(&x0.to_kind(Kind::Half), &eps.to_kind(Kind::Half), &t)
            .kind(),
        Kind::Half
    );
}

#[test]
fn zero_terminal_snr_rescale() {
    let orig = NoiseSchedule::stable_diffusion();
    let first = orig.alphas_cumprod().double_value(&[0]);
    let snr_before: Vec<f32> = Vec::try_from(orig.snr().shallow_clone()).expect("snr");
    let z = orig.with_zero_terminal_snr();
    assert!(z.alphas_cumprod().double_value(&[999]).abs() < 1e-9);
    assert!((z.alphas_cumprod().double_value(&[0]) - first).abs() < 1e-6);
    assert!((z.betas().double_value(&[999]) - 1.0).abs() < 1e-6);
    // sd-scripts keeps the SNR of the original schedule.
    let snr_after: Vec<f32> = Vec::try_from(z.snr().shallow_clone()).expect("snr");
    assert_eq!(snr_before, snr_after);
}
