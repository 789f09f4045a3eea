//! Two real processes on loopback (this test binary re-runs itself as rank 0 and rank 1):
//! all-reduce, broadcast and barrier give the expected values, and a rank that dies makes the
//! other's collective fail within the timeout instead of hanging.
//! Skipped, with a printed reason, when the build has no Gloo.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::process::Command;
use std::time::{Duration, Instant};

use sd_dist::{Backend, ProcessGroup, all_reduce_grads, broadcast_params};
use tch::{Kind, Tensor};

const ROLE: &str = "SD_DIST_TEST_ROLE";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs `test` of this binary as ranks 0 and 1; returns their outputs (status, stderr).
fn spawn_pair(test: &str, mode: &str) -> Vec<(std::process::ExitStatus, String)> {
    let exe = std::env::current_exe().expect("test binary path");
    let port = free_port().to_string();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(&exe)
                .args([test, "--exact", "--nocapture", "--test-threads=1"])
                .env(ROLE, format!("{mode}:{rank}:{port}"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawning a rank")
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().expect("waiting for a rank");
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status, text)
        })
        .collect()
}

/// The role of this process: None for the parent test.
fn role() -> Option<(String, usize, u16)> {
    let v = std::env::var(ROLE).ok()?;
    let mut it = v.split(':');
    Some((
        it.next()?.to_owned(),
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

#[test]
fn two_ranks_reduce_and_broadcast() {
    if !Backend::Gloo.is_available() {
        println!("skipped: {}", sd_dist::missing_reason());
        return;
    }
    let Some((_, rank, port)) = role() else {
        let outs = spawn_pair("two_ranks_reduce_and_broadcast", "ok");
        for (status, text) in &outs {
            assert!(status.success(), "a rank failed:\n{text}");
            assert!(text.contains("RANK-OK"), "{text}");
        }
        return;
    };
    let g = ProcessGroup::init(
        Backend::Gloo,
        rank,
        2,
        "127.0.0.1",
        port,
        Duration::from_secs(30),
    )
    .expect("init");
    let t = Tensor::from_slice(&[rank as f32 + 1.0, 10.0]);
    g.all_reduce_mean(&t).expect("all_reduce");
    assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.5, 10.0]);
    let b = Tensor::from_slice(&[rank as f32 * 7.0]);
    g.broadcast(&b, 1).expect("broadcast");
    assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![7.0]);
    // Gradient bucket: each rank's grad is (rank + 1) · 1; the sum is 3; extras sum too.
    let p = Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    (p.sum(Kind::Float) * (rank as f64 + 1.0)).backward();
    let extra = all_reduce_grads(&g, std::slice::from_ref(&p), &[rank as f64 + 0.5]).unwrap();
    assert_eq!(extra, vec![2.0]);
    assert_eq!(
        Vec::<f32>::try_from(&p.grad().reshape([-1])).unwrap(),
        vec![3.0; 6]
    );
    let q = Tensor::full([4], rank as f64, (Kind::Float, tch::Device::Cpu));
    broadcast_params(&g, std::slice::from_ref(&q), 0).unwrap();
    assert_eq!(Vec::<f32>::try_from(&q).unwrap(), vec![0.0; 4]);
    g.barrier().expect("barrier");
    println!("RANK-OK");
}

#[test]
fn a_dead_rank_fails_the_other_within_the_timeout() {
    if !Backend::Gloo.is_available() {
        println!("skipped: {}", sd_dist::missing_reason());
        return;
    }
    let Some((_, rank, port)) = role() else {
        let start = Instant::now();
        let outs = spawn_pair("a_dead_rank_fails_the_other_within_the_timeout", "die");
        assert!(start.elapsed() < Duration::from_secs(60));
        let (status, text) = &outs[0];
        assert!(!status.success());
        assert!(text.contains("all_reduce failed (rank 0 of 2)"), "{text}");
        assert!(!outs[1].0.success());
        return;
    };
    let g = ProcessGroup::init(
        Backend::Gloo,
        rank,
        2,
        "127.0.0.1",
        port,
        Duration::from_secs(10),
    )
    .expect("init");
    g.barrier().expect("barrier");
    if rank == 1 {
        std::process::abort();
    }
    let t = Tensor::from_slice(&[1.0f32]);
    let err = g.all_reduce_sum(&t).expect_err("the peer is gone");
    panic!("{err}");
}
