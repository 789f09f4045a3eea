//! Optimiser step benchmark: f32 AdamW vs AdamW8bit (and Lion vs Lion8bit) on ~10 M parameters
//! in 64 LoRA-sized tensors (32 × [32, 5000] down + 32 × [5000, 32] up).
//!
//! Usage: `bench_optim [cpu|cuda] [ITERS] [THREADS]`; prints one JSON line per optimiser.
#![allow(clippy::print_stdout)]

use std::time::Instant;

use sd_core::train::{
    AdamW, AdamW8bit, AdamW8bitParams, AdamWParams, Lion, Lion8bit, Lion8bitParams, LionParams,
    Optimizer, ParamGroup,
};
use tch::{Device, Kind, Tensor};

fn params(device: Device) -> Vec<Tensor> {
    tch::manual_seed(0);
    (0..64)
        .map(|i| {
            let shape: [i64; 2] = if i % 2 == 0 { [32, 5000] } else { [5000, 32] };
            let p = (Tensor::randn(shape, (Kind::Float, device)) * 0.01).set_requires_grad(true);
            (&p * Tensor::randn(shape, (Kind::Float, device)))
                .sum(Kind::Float)
                .backward();
            p
        })
        .collect()
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let device = match args.get(1).map(String::as_str) {
        Some("cuda") => Device::Cuda(0),
        _ => Device::Cpu,
    };
    let iters: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(10);
    if let Some(t) = args.get(3).and_then(|s| s.parse().ok()) {
        tch::set_num_threads(t);
    }
    type Make = fn(Vec<ParamGroup>) -> Box<dyn Optimizer>;
    let cases: [(&str, Make); 4] = [
        ("AdamW", |g| Box::new(AdamW::new(g, AdamWParams::default()))),
        ("AdamW8bit", |g| {
            Box::new(AdamW8bit::new(g, AdamW8bitParams::default()))
        }),
        ("Lion", |g| Box::new(Lion::new(g, LionParams::default()))),
        ("Lion8bit", |g| {
            Box::new(Lion8bit::new(g, Lion8bitParams::default()))
        }),
    ];
    for (name, make) in cases {
        let ps = params(device);
        let numel: usize = ps.iter().map(Tensor::numel).sum();
        let mut opt = make(vec![ParamGroup::new("unet", ps, 1e-4)]);
        opt.step(&[1e-4]).expect("warm-up step");
        sync(device);
        let mut times = Vec::new();
        for _ in 0..iters {
            let t0 = Instant::now();
            opt.step(&[1e-4]).expect("step");
            sync(device);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "{{\"optimizer\":\"{name}\",\"device\":\"{device:?}\",\"params\":{numel},\"threads\":{},\"median_ms\":{:.2},\"min_ms\":{:.2},\"state_mib\":{:.2}}}",
            tch::get_num_threads(),
            times[times.len() / 2],
            times[0],
            opt.state_bytes() as f64 / (1024.0 * 1024.0)
        );
    }
}
