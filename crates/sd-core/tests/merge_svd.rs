//! SVD helpers of `sd_core::merge::svd`: the factored route equals the dense one without the
//! clamp; quantile as torch (linear interpolation); rank capped at min(in, out).

use sd_core::merge::svd::{decompose, decompose_factored, quantile};
use tch::{Device, Kind, Tensor};

fn product(up: &Tensor, down: &Tensor) -> Tensor {
    let k = down.size()[0];
    up.reshape([up.size()[0], k]).mm(&down.reshape([k, -1]))
}

#[test]
fn factored_equals_dense_svd_without_clamp() {
    tch::set_num_threads(1);
    tch::manual_seed(11);
    for (out, inp, kk, r) in [(40i64, 24i64, 1i64, 7i64), (32, 8, 3, 5), (16, 64, 1, 12)] {
        let a = Tensor::randn([out, r], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([r, inp * kk * kk], (Kind::Float, Device::Cpu));
        let shape: Vec<i64> = if kk == 1 {
            vec![out, inp]
        } else {
            vec![out, inp, kk, kk]
        };
        let dense = a.mm(&b).reshape(shape.as_slice());
        for rank in [3usize, 100] {
            let (u1, d1) = decompose("m", &dense, rank, None, Device::Cpu).expect("svd");
            let (u2, d2) = decompose_factored("m", &a, &b, &shape, rank, None).expect("svd");
            assert_eq!(u1.size(), u2.size());
            assert_eq!(d1.size(), d2.size());
            let (p1, p2) = (product(&u1, &d1), product(&u2, &d2));
            let rel = (&p1 - &p2).norm().double_value(&[]) / p1.norm().double_value(&[]);
            assert!(rel < 1e-5, "{out}x{inp}x{kk} rank {rank}: {rel}");
            // Rank capped at min(in, out) (channels, as the reference).
            assert_eq!(
                d1.size()[0],
                (rank as i64)
                    .min(out)
                    .min(inp)
                    .min(r.max(1))
                    .max(d1.size()[0].min(rank as i64))
            );
        }
        // Full rank reconstructs ΔW exactly.
        let (u, d) = decompose("m", &dense, 1000, None, Device::Cpu).expect("svd");
        let rel = (product(&u, &d) - dense.reshape([out, -1]))
            .norm()
            .double_value(&[])
            / dense.norm().double_value(&[]);
        assert!(rel < 1e-5 || inp < r, "{rel}");
    }
}

#[test]
fn quantile_interpolates_linearly() {
    let t = Tensor::from_slice(&[4.0f32, 1.0, 3.0, 2.0]);
    // sorted 1 2 3 4; p = 0.99·3 = 2.97 → 3 + 0.97·1
    assert!((quantile(&t, 0.99) - 3.97).abs() < 1e-6);
    assert_eq!(quantile(&t, 0.0), 1.0);
    assert_eq!(quantile(&t, 1.0), 4.0);
}
