//! U-Net forward benchmark (run by `scripts/bench-unet`; not a test).
//!
//! Usage: `bench_unet <sd15|sd21|sdxl|PATH/config.json> <latent-height> <latent-width> <iters> <threads>`
//!
//! Builds the U-Net with weights drawn from N(0, 0.02) (values do not change the work done),
//! runs one warm-up forward and `iters` timed forwards of batch 1 with a 77-token context
//! under `no_grad`, and prints one JSON line: per-forward times in ms, the RSS before the model
//! was built and the peak RSS (`VmHWM`) in MiB.

use std::time::Instant;

use sd_core::models::unet::{TextTimeCondition, Unet, UnetConfig};
use tch::{Device, Kind, Tensor, nn::VarStore};

fn status_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, h, w, iters, threads] = args.as_slice() else {
        return Err("usage: bench_unet <sd15|sd21|sdxl|config.json> <latent-h> <latent-w> <iters> <threads>".into());
    };
    let (h, w, iters, threads): (i64, i64, usize, i32) =
        (h.parse()?, w.parse()?, iters.parse()?, threads.parse()?);
    tch::set_num_threads(threads);
    let config = match model.as_str() {
        "sd15" => UnetConfig::sd15(),
        "sd21" => UnetConfig::sd21(),
        "sdxl" => UnetConfig::sdxl(),
        path => UnetConfig::from_file(std::path::Path::new(path))?,
    };
    let rss_before = status_mib("VmRSS:");
    let vs = VarStore::new(Device::Cpu);
    let unet = Unet::new(&vs.root(), &config)?;
    tch::manual_seed(0);
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let _ = v.normal_(0.0, 0.02);
        }
    });
    let sample = Tensor::randn([1, config.in_channels, h, w], (Kind::Float, Device::Cpu));
    let timestep = Tensor::from_slice(&[500i64]);
    let ctx = Tensor::randn(
        [1, 77, config.cross_attention_dim],
        (Kind::Float, Device::Cpu),
    );
    let added = config.text_embeds_dim().map(|d| TextTimeCondition {
        text_embeds: Tensor::randn([1, d], (Kind::Float, Device::Cpu)),
        time_ids: Tensor::from_slice(&[
            h as f32 * 8.0,
            w as f32 * 8.0,
            0.0,
            0.0,
            h as f32 * 8.0,
            w as f32 * 8.0,
        ])
        .view([1, 6]),
    });
    let mut times = Vec::with_capacity(iters);
    tch::no_grad(|| {
        let _ = unet.forward(&sample, &timestep, &ctx, added.as_ref());
        for _ in 0..iters {
            let t0 = Instant::now();
            let out = unet.forward(&sample, &timestep, &ctx, added.as_ref());
            let _ = out.sum(Kind::Float).double_value(&[]);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    });
    let times: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
    // A benchmark binary reports on stdout by design.
    #[allow(clippy::print_stdout)]
    {
        println!(
            "{{\"impl\": \"tch\", \"model\": \"{model}\", \"latent\": [{h}, {w}], \"threads\": {threads}, \"times_ms\": [{}], \"rss_before_mib\": {rss_before:.1}, \"peak_rss_mib\": {:.1}}}",
            times.join(", "),
            status_mib("VmHWM:")
        );
    }
    Ok(())
}
