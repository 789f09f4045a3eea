//! LoraModule maths: initialisation, forward delta (with dropouts), ΔW (spec §3).

use sd_core::lora::names::{Container, ModuleSpec};
use sd_core::lora::{Dropouts, LayerKind, LoraModule};
use sd_formats::keymap::Component;
use sd_testutil::assert_close;
use tch::{Device, Kind, Tensor, nn};

/// libtorch's global generator is shared by the test threads: tests that seed it and compare
/// draws hold this lock, so a neighbour cannot draw in between.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    let t = t.to_kind(Kind::Float).contiguous().view([-1]);
    Vec::<f32>::try_from(&t).expect("f32 tensor")
}

fn linear(i: usize, o: usize) -> LayerKind {
    LayerKind::Linear {
        in_features: i,
        out_features: o,
    }
}

fn conv(i: usize, o: usize, k: usize, s: usize, p: usize) -> LayerKind {
    LayerKind::Conv2d {
        in_channels: i,
        out_channels: o,
        kernel: [k, k],
        stride: [s, s],
        padding: [p, p],
    }
}

fn spec(layer: LayerKind, rank: usize, alpha: f32) -> ModuleSpec {
    ModuleSpec {
        name: "lora_unet_x".into(),
        component: Component::Unet,
        layer_path: "x".into(),
        layer,
        container: Container::Transformer2D,
        rank,
        alpha,
        block_index: 1,
    }
}

fn random_module(layer: LayerKind, rank: i64, alpha: Option<f64>, seed: i64) -> LoraModule {
    tch::manual_seed(seed);
    let (down, up) = match layer {
        LayerKind::Linear {
            in_features,
            out_features,
        } => (
            Tensor::randn([rank, in_features as i64], (Kind::Float, Device::Cpu)),
            Tensor::randn([out_features as i64, rank], (Kind::Float, Device::Cpu)),
        ),
        LayerKind::Conv2d {
            in_channels,
            out_channels,
            kernel,
            ..
        } => (
            Tensor::randn(
                [rank, in_channels as i64, kernel[0] as i64, kernel[1] as i64],
                (Kind::Float, Device::Cpu),
            ),
            Tensor::randn(
                [out_channels as i64, rank, 1, 1],
                (Kind::Float, Device::Cpu),
            ),
        ),
    };
    LoraModule::from_tensors("lora_unet_x", layer, down, up, alpha).expect("valid shapes")
}

#[test]
fn init_is_kaiming_uniform_down_and_zero_up() {
    let _rng = rng_lock();
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let m = LoraModule::init(&vs.root(), &spec(conv(40, 24, 3, 1, 1), 8, 4.0));
    assert_eq!(m.lora_down.size(), [8, 40, 3, 3]);
    assert_eq!(m.lora_up.size(), [24, 8, 1, 1]);
    let bound = 1.0 / ((40 * 9) as f64).sqrt();
    let d = to_vec(&m.lora_down);
    assert!(d.iter().all(|v| f64::from(v.abs()) <= bound));
    let max = d.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    assert!(f64::from(max) > 0.9 * bound, "uniform over the full range");
    assert!(to_vec(&m.lora_up).iter().all(|v| *v == 0.0));
    assert_eq!(m.scale(), 0.5);
    // Var names are the file keys.
    let mut names: Vec<String> = vs.variables().keys().cloned().collect();
    names.sort();
    assert_eq!(
        names,
        ["lora_unet_x.lora_down.weight", "lora_unet_x.lora_up.weight"]
    );
    // Same seed, same draw as PyTorch's single uniform_ call.
    tch::manual_seed(0);
    let expect = Tensor::empty([8, 40, 3, 3], (Kind::Float, Device::Cpu)).uniform_(-bound, bound);
    assert_eq!(to_vec(&expect), d);
}

#[test]
fn linear_forward_equals_delta_weight() {
    let _rng = rng_lock();
    let mut m = random_module(linear(12, 10), 4, Some(2.0), 1);
    m.multiplier = 0.7;
    assert_eq!(m.scale(), 0.5);
    let x = Tensor::randn([2, 5, 12], (Kind::Float, Device::Cpu));
    let got = m.forward_delta(&x, false).expect("no module dropout");
    let dw = m.delta_weight();
    assert_eq!(dw.size(), [10, 12]);
    let want = x.matmul(&dw.tr()) * 0.7;
    assert_close("linear", &to_vec(&got), &to_vec(&want), 1e-5, 1e-5);
    let manual = m.lora_up.mm(&m.lora_down) * 0.5;
    assert_close("ΔW", &to_vec(&dw), &to_vec(&manual), 1e-6, 1e-6);
}

#[test]
fn conv3x3_forward_equals_conv_with_delta_weight() {
    let _rng = rng_lock();
    for (stride, pad) in [(1, 1), (2, 1)] {
        let m = random_module(conv(6, 5, 3, stride, pad), 3, None, 2);
        assert_eq!(m.alpha(), 3.0, "absent alpha = rank");
        let x = Tensor::randn([2, 6, 9, 9], (Kind::Float, Device::Cpu));
        let got = m.forward_delta(&x, false).expect("no module dropout");
        let dw = m.delta_weight();
        assert_eq!(dw.size(), [5, 6, 3, 3]);
        let s = stride as i64;
        let p = pad as i64;
        let want = x.conv2d(&dw, None::<Tensor>, [s, s], [p, p], [1, 1], 1);
        assert_eq!(got.size(), want.size());
        assert_close("conv3x3", &to_vec(&got), &to_vec(&want), 1e-4, 1e-4);
        // The reference's conv formulation of ΔW (spec §3.3).
        let ref_dw = m
            .lora_down
            .permute([1, 0, 2, 3])
            .conv2d(&m.lora_up, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .permute([1, 0, 2, 3])
            * m.scale();
        assert_close("ΔW conv", &to_vec(&dw), &to_vec(&ref_dw), 1e-5, 1e-5);
    }
}

#[test]
fn conv1x1_accepts_2d_pairs_and_linear_accepts_4d_pairs() {
    let _rng = rng_lock();
    let down = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
    let up = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
    let c = LoraModule::from_tensors(
        "lora_unet_p",
        conv(8, 8, 1, 1, 0),
        down.shallow_clone(),
        up.shallow_clone(),
        Some(1.0),
    )
    .expect("2-D pair for a 1×1 conv");
    assert_eq!(c.lora_down.size(), [4, 8, 1, 1]);
    let l = LoraModule::from_tensors(
        "lora_unet_p",
        linear(8, 8),
        down.reshape([4, 8, 1, 1]),
        up.reshape([8, 4, 1, 1]),
        Some(1.0),
    )
    .expect("4-D pair for a Linear");
    assert_eq!(l.lora_down.size(), [4, 8]);
    assert_close(
        "same ΔW",
        &to_vec(&c.delta_weight().reshape([8, 8])),
        &to_vec(&l.delta_weight()),
        1e-6,
        1e-6,
    );
    let x = Tensor::randn([1, 8, 3, 3], (Kind::Float, Device::Cpu));
    let via_conv = c.forward_delta(&x, false).expect("runs");
    let via_linear = l
        .forward_delta(&x.permute([0, 2, 3, 1]), false)
        .expect("runs")
        .permute([0, 3, 1, 2]);
    assert_close(
        "1×1 = linear",
        &to_vec(&via_conv),
        &to_vec(&via_linear),
        1e-5,
        1e-5,
    );
    let bad = LoraModule::from_tensors(
        "lora_unet_p",
        linear(8, 8),
        Tensor::zeros([4, 7], (Kind::Float, Device::Cpu)),
        up,
        None,
    );
    let msg = bad.expect_err("wrong in-dim").to_string();
    assert!(
        msg.contains("lora_unet_p") && msg.contains("[4, 7]"),
        "{msg}"
    );
}

#[test]
fn delta_weight_is_f32_for_half_storage() {
    let _rng = rng_lock();
    let m = random_module(linear(6, 4), 2, Some(1.0), 3);
    let h = LoraModule::from_tensors(
        "lora_unet_x",
        linear(6, 4),
        m.lora_down.to_kind(Kind::Half),
        m.lora_up.to_kind(Kind::Half),
        Some(1.0),
    )
    .expect("ok");
    let dw = h.delta_weight();
    assert_eq!(dw.kind(), Kind::Float);
    let want = m
        .lora_up
        .to_kind(Kind::Half)
        .to_kind(Kind::Float)
        .mm(&m.lora_down.to_kind(Kind::Half).to_kind(Kind::Float))
        * 0.5;
    assert_eq!(to_vec(&dw), to_vec(&want));
}

#[test]
fn dropouts_follow_the_reference_in_training_only() {
    let _rng = rng_lock();
    let mut m = random_module(linear(8, 6), 4, Some(4.0), 4);
    let x = Tensor::randn([3, 5, 8], (Kind::Float, Device::Cpu));
    let plain = m.forward_delta(&x, false).expect("runs");

    // module dropout 1.0: always skipped in training, never in evaluation.
    m.dropouts = Dropouts {
        module_dropout: Some(1.0),
        ..Dropouts::default()
    };
    assert!(m.forward_delta(&x, true).is_none());
    assert_eq!(
        to_vec(&m.forward_delta(&x, false).expect("eval")),
        to_vec(&plain)
    );

    // rank dropout: mask rand(B, r) > p broadcast over tokens, scale × 1/(1-p).
    let p = 0.5;
    m.dropouts = Dropouts {
        rank_dropout: Some(p),
        ..Dropouts::default()
    };
    tch::manual_seed(7);
    let got = m.forward_delta(&x, true).expect("runs");
    tch::manual_seed(7);
    let mask = Tensor::rand([3, 4], (Kind::Float, Device::Cpu))
        .gt(p)
        .to_kind(Kind::Float)
        .unsqueeze(1);
    let want = (x.linear(&m.lora_down, None::<Tensor>) * mask).linear(&m.lora_up, None::<Tensor>)
        * (m.scale() / (1.0 - p));
    assert_close("rank dropout", &to_vec(&got), &to_vec(&want), 1e-5, 1e-5);
    assert_eq!(
        to_vec(&m.forward_delta(&x, false).expect("eval")),
        to_vec(&plain)
    );

    // neuron dropout on down(x).
    m.dropouts = Dropouts {
        dropout: Some(0.25),
        ..Dropouts::default()
    };
    tch::manual_seed(9);
    let got = m.forward_delta(&x, true).expect("runs");
    tch::manual_seed(9);
    let want = x
        .linear(&m.lora_down, None::<Tensor>)
        .dropout(0.25, true)
        .linear(&m.lora_up, None::<Tensor>)
        * m.scale();
    assert_close("dropout", &to_vec(&got), &to_vec(&want), 1e-5, 1e-5);
}
