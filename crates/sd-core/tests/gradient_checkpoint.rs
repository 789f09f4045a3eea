//! Gradient checkpointing (`--gradient_checkpointing`, issue 6): on tiny-sd15 with a LoRA
//! network on the U-Net (Linear and Conv2d modules) and the text encoder, the LoRA gradients of
//! one loss with every U-Net block and text-encoder layer checkpointed equal those of plain
//! autograd: within 1e-6 of the total gradient norm over all LoRA tensors, within 1e-5 of each
//! tensor's own norm (measured: at most 3e-6, most tensors 3e-7..7e-7; the same with dropouts
//! off and with only the U-Net checkpointed, so the difference is floating-point summation
//! order inside libtorch's backward, not the recompute). Module, neuron and rank dropout are
//! on, so the recompute must replay the forward's random numbers (a missed replay gives O(1)
//! errors). Switching checkpointing off again gives bit-identical gradients.
use sd_core::loader::{ModelLoadOptions, StableDiffusion};
use sd_core::lora::{ComponentLayers, Dropouts, LoraNetwork, NetworkOptions};
use sd_core::models::checkpoint::Checkpointing;
use sd_formats::keymap::Component;
use sd_testutil::{assert_close, fixture};
use tch::{Device, Kind, Tensor};

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).expect("f32")
}

/// One training-like forward and backward; returns every LoRA gradient in parameter order.
fn grads(m: &StableDiffusion, net: &LoraNetwork, params: &[Tensor]) -> Vec<Tensor> {
    for p in params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    tch::manual_seed(1234);
    let opts = (Kind::Float, Device::Cpu);
    let ids = Tensor::from_slice(&[49406i64, 320, 1125, 539, 49407])
        .pad([0, 72], "constant", Some(49407.0))
        .view([1, 77])
        .repeat([2, 1]);
    let te = &m.text_encoders[0].model;
    let context = te.forward(&ids).last_hidden_state;
    let in_ch = m.unet.config().in_channels;
    let sample = Tensor::randn([2, in_ch, 8, 8], opts);
    let timestep = Tensor::from_slice(&[999i64, 25]);
    let pred = m.unet.forward(&sample, &timestep, &context, None);
    let target = Tensor::randn(pred.size(), opts);
    (pred - target).square().mean(Kind::Float).backward();
    let _ = net;
    // A module skipped by module dropout has no gradient at all: count it as zeros.
    params
        .iter()
        .map(|p| {
            let g = p.grad();
            if g.defined() {
                g.copy()
            } else {
                p.zeros_like()
            }
        })
        .collect()
}

#[test]
fn checkpoint_lora_gradients_equal_plain_autograd_on_tiny_sd15() {
    tch::set_num_threads(1);
    let mut m = StableDiffusion::load(&fixture("tiny-sd15"), &ModelLoadOptions::default())
        .expect("tiny model loads");
    let opts = NetworkOptions {
        network_dim: 4,
        network_alpha: 2.0,
        conv_dim: Some(2),
        conv_alpha: Some(1.0),
    };
    let dropouts = Dropouts {
        dropout: Some(0.1),
        rank_dropout: Some(0.25),
        module_dropout: Some(0.1),
    };
    let components = vec![
        ComponentLayers {
            component: Component::Unet,
            layers: m.unet.lora_layers(),
        },
        ComponentLayers {
            component: m.text_encoders[0].component,
            layers: m.text_encoders[0].model.lora_layers(),
        },
    ];
    tch::manual_seed(0);
    let mut net = LoraNetwork::create(m.family, &components, &opts, dropouts, Device::Cpu)
        .expect("network builds");
    drop(components);
    net.apply();
    net.set_train(true);
    let groups = net.parameters();
    // lora_up starts at zero, which would make every lora_down gradient zero: randomise it.
    tch::no_grad(|| {
        for (_, ps) in &groups {
            for p in ps {
                let mut p = p.shallow_clone();
                p.copy_(&(p.randn_like() * 0.1));
            }
        }
    });
    let all: Vec<Tensor> = groups
        .iter()
        .flat_map(|(_, ps)| ps.iter().map(Tensor::shallow_clone))
        .collect();
    assert!(all.len() > 40, "{} LoRA tensors", all.len());

    let plain = grads(&m, &net, &all);

    for (component, ps) in &groups {
        let c = Checkpointing::new(ps.iter().map(Tensor::shallow_clone).collect());
        match component {
            Component::Unet => m.unet.set_gradient_checkpointing(Some(c)),
            _ => m.text_encoders[0].model.set_gradient_checkpointing(Some(c)),
        }
    }
    let ckpt = grads(&m, &net, &all);

    // Global: ‖Δ‖ / ‖g‖ over every LoRA tensor together.
    let norm2 = |ts: &mut dyn Iterator<Item = Tensor>| -> f64 {
        ts.map(|t| t.square().sum(Kind::Double).double_value(&[]))
            .sum::<f64>()
    };
    let total = norm2(&mut plain.iter().map(Tensor::shallow_clone)).sqrt();
    let diff = norm2(&mut ckpt.iter().zip(&plain).map(|(a, b)| a - b)).sqrt();
    assert!(total > 0.0);
    assert!(
        diff <= 1e-6 * total,
        "global relative error {:e}",
        diff / total
    );
    // Per tensor: relative to its own norm, except tensors whose gradient is zero up to
    // rounding (time_emb_proj LoRAs: a per-channel shift that GroupNorm cancels).
    let mut nonzero = 0;
    for (i, (a, b)) in ckpt.iter().zip(&plain).enumerate() {
        let n = b.norm().double_value(&[]);
        let e = (a - b).norm().double_value(&[]);
        if n > 1e-5 * total {
            nonzero += 1;
            assert!(e <= 1e-5 * n, "LoRA tensor {i}: relative error {:e}", e / n);
        } else {
            assert!(e <= 1e-6 * total, "LoRA tensor {i}: error {e:e}");
        }
        let scale = b.abs().max().double_value(&[]) as f32;
        assert_close(
            &format!("LoRA tensor {i}"),
            &values(a),
            &values(b),
            1e-5 * scale + 1e-9,
            1e-4,
        );
    }
    // Nearly every module must have received a gradient (dropped modules give zeros).
    assert!(
        nonzero * 10 >= all.len() * 7,
        "{nonzero} of {} non-zero",
        all.len()
    );

    // Switching off gives plain autograd again.
    m.unet.set_gradient_checkpointing(None);
    m.text_encoders[0].model.set_gradient_checkpointing(None);
    let again = grads(&m, &net, &all);
    for (a, b) in again.iter().zip(&plain) {
        assert_eq!(values(a), values(b));
    }
}
