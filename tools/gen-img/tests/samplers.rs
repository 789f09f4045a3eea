//! Every sampler against diffusers 0.32.1's scheduler, call by call, on a fixed affine "model"
//! (no U-Net): golden data from scripts/make-sampler-goldens.py in
//! tests/data/sampler-goldens.safetensors (see tests/data/README.md).
//!
//! Per case: the call timesteps and σ grid; then, teacher-forced from the golden latents and
//! model outputs, our model input and step result after every call; then a free run with our
//! own model evaluations from the same start, compared at the end.

use std::collections::HashMap;
use std::path::PathBuf;

use sd_core::generate::sampler::{Sampler, SamplerConfig, SamplerKind};
use sd_core::schedule::PredictionType;
use sd_testutil::assert_close;
use tch::{Kind, Tensor};

fn goldens() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/sampler-goldens.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).expect("f32")
}

/// The golden "model": 0.1·x_in + (t/1000)·C + D, in f32 as the script computes it.
fn model(x_in: &Tensor, t: f64, c: &Tensor, d: &Tensor) -> Tensor {
    x_in * 0.1 + c * f64::from(t as f32 / 1000.0) + d
}

/// Runs one golden case. `training` selects train-network's scheduler config.
fn check(case: &str, kind: SamplerKind, prediction: PredictionType, steps: usize, training: bool) {
    let g = goldens();
    let get = |k: &str| {
        g.get(&format!("{case}.{k}"))
            .unwrap_or_else(|| panic!("golden {case}.{k} missing"))
            .shallow_clone()
    };
    let config = if training {
        SamplerConfig::training_sample(kind, prediction)
    } else {
        SamplerConfig::gen_img(kind, prediction)
    };
    let (c, d) = (&g["C"], &g["D"]);
    let mut sampler = Sampler::new(config, steps).expect("sampler");
    let ts = values(&get("timesteps"));
    let ours: Vec<f32> = (0..sampler.num_calls())
        .map(|i| sampler.timestep(i) as f32)
        .collect();
    assert_eq!(ours.len(), ts.len(), "{case}: number of U-Net calls");
    assert_close(&format!("{case} timesteps"), &ours, &ts, 1e-4, 1e-6);
    // Heun and DPM2 list σ interleaved with their second-stage values; their per-call
    // timesteps above and the steps below cover them.
    let interleaved = matches!(
        kind,
        SamplerKind::Heun | SamplerKind::Dpm2 | SamplerKind::Dpm2Ancestral
    );
    if let Some(sig) = g.get(&format!("{case}.sigmas")).filter(|_| !interleaved) {
        let ours: Vec<f32> = sampler.sigmas().iter().map(|&s| s as f32).collect();
        assert_close(&format!("{case} sigmas"), &ours, &values(sig), 1e-6, 1e-5);
    }
    let (xs, x_ins, outs) = (get("x"), get("x_in"), get("out"));
    let noises = g.get(&format!("{case}.noise")).map(Tensor::shallow_clone);
    let x0 = xs.get(0);
    let start_noise = &x0 / sampler.init_noise_sigma();

    // 1. Teacher forcing: golden latents and outputs in, our step out.
    let mut drawn = 0i64;
    let mut noise = || {
        let n = noises
            .as_ref()
            .expect("only ancestral samplers draw")
            .get(drawn);
        drawn += 1;
        n
    };
    for i in 0..ts.len() {
        let x = xs.get(i as i64);
        let x_in = sampler.scale_model_input(&x, i);
        assert_close(
            &format!("{case} call {i} model input"),
            &values(&x_in),
            &values(&x_ins.get(i as i64)),
            1e-6,
            1e-5,
        );
        let next = sampler.step(i, &outs.get(i as i64), &x, &mut noise);
        assert_close(
            &format!("{case} call {i} step"),
            &values(&next),
            &values(&xs.get(i as i64 + 1)),
            2e-5,
            1e-5,
        );
    }
    if let Some(n) = &noises {
        assert_eq!(drawn, n.size()[0], "{case}: noise draws");
    }

    // 2. Free run with our own model evaluations.
    let mut sampler = Sampler::new(config, steps).expect("sampler");
    let mut x = start_noise * sampler.init_noise_sigma();
    let mut drawn = 0i64;
    let mut noise = || {
        let n = noises
            .as_ref()
            .expect("only ancestral samplers draw")
            .get(drawn);
        drawn += 1;
        n
    };
    for i in 0..sampler.num_calls() {
        let x_in = sampler.scale_model_input(&x, i);
        let out = model(&x_in, sampler.timestep(i), c, d);
        x = sampler.step(i, &out, &x, &mut noise);
    }
    assert_close(
        &format!("{case} final latents (free run)"),
        &values(&x),
        &values(&xs.get(ts.len() as i64)),
        5e-5,
        1e-4,
    );
}

#[test]
fn pndm_matches_diffusers() {
    check(
        "pndm_eps_5",
        SamplerKind::Pndm,
        PredictionType::Epsilon,
        5,
        false,
    );
    check(
        "pndm_eps_20",
        SamplerKind::Pndm,
        PredictionType::Epsilon,
        20,
        false,
    );
    check(
        "pndm_v_6",
        SamplerKind::Pndm,
        PredictionType::VPrediction,
        6,
        false,
    );
}

#[test]
fn pndm_training_sample_config_matches_diffusers() {
    check(
        "pndm_eps_5_training",
        SamplerKind::Pndm,
        PredictionType::Epsilon,
        5,
        true,
    );
}

#[test]
fn pndm_refuses_fewer_than_4_steps() {
    let config = SamplerConfig::gen_img(SamplerKind::Pndm, PredictionType::Epsilon);
    let err = Sampler::new(config, 3).expect_err("3 steps");
    assert!(err.to_string().contains("at least 4 steps"), "{err}");
    assert!(Sampler::new(config, 4).is_ok());
}

#[test]
fn dpmsingle_matches_diffusers() {
    let k = SamplerKind::DpmSingle;
    check("dpmsingle_eps_5", k, PredictionType::Epsilon, 5, false);
    check("dpmsingle_eps_6", k, PredictionType::Epsilon, 6, false);
    check("dpmsingle_v_7", k, PredictionType::VPrediction, 7, false);
    check("dpmsingle_eps_20", k, PredictionType::Epsilon, 20, false);
}

#[test]
fn other_samplers_match_diffusers() {
    let e = PredictionType::Epsilon;
    check("ddim_eps_5", SamplerKind::Ddim, e, 5, false);
    check("lms_eps_6", SamplerKind::Lms, e, 6, false);
    check("euler_eps_5", SamplerKind::Euler, e, 5, false);
    check("euler_a_eps_5", SamplerKind::EulerAncestral, e, 5, false);
    check("heun_eps_5", SamplerKind::Heun, e, 5, false);
    check("dpm_2_eps_5", SamplerKind::Dpm2, e, 5, false);
    check("dpm_2_a_eps_5", SamplerKind::Dpm2Ancestral, e, 5, false);
    check("dpmsolver_eps_6", SamplerKind::DpmSolver, e, 6, false);
    check(
        "dpmsolver++_eps_6",
        SamplerKind::DpmSolverPlusPlus,
        e,
        6,
        false,
    );
    let v = PredictionType::VPrediction;
    check(
        "dpmsolver++_v_20",
        SamplerKind::DpmSolverPlusPlus,
        v,
        20,
        false,
    );
}
