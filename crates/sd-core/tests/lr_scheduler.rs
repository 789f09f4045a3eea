//! LR schedulers: λ(k) at chosen k against the formulas of training.md §10, warm-up given as a
//! count, a fraction or "N%", T = max_train_steps × num_processes, and the option errors.

use std::f64::consts::PI;

use sd_core::train::{LrScheduler, OptimError, SchedulerConfig, SchedulerType, StepsSpec};

fn sched(
    kind: &str,
    warmup: &str,
    max_train_steps: u64,
    f: impl FnOnce(&mut SchedulerConfig),
) -> LrScheduler {
    let mut cfg = SchedulerConfig {
        kind: kind.parse().expect("scheduler name"),
        warmup: StepsSpec::parse("--lr_warmup_steps", warmup).expect("warmup"),
        max_train_steps,
        learning_rate: 1e-4,
        ..SchedulerConfig::default()
    };
    f(&mut cfg);
    LrScheduler::new(&cfg).expect("scheduler")
}

fn check(s: &LrScheduler, cases: &[(u64, f64)]) {
    for &(k, expected) in cases {
        let got = s.lambda(k);
        assert!(
            (got - expected).abs() < 1e-12,
            "{} at k={k}: {got} vs {expected}",
            s.kind()
        );
    }
}

#[test]
fn cosine_with_warmup() {
    let s = sched("cosine", "10", 100, |_| {});
    let cos = |p: f64| 0.5 * (1.0 + (PI * p).cos());
    check(
        &s,
        &[
            (0, 0.0),
            (5, 0.5),
            (10, 1.0),
            (40, cos(30.0 / 90.0)),
            (55, 0.5),
            (100, 0.0),
            (150, cos(140.0 / 90.0)),
        ],
    );
    assert!((s.lambda(40) - 0.75).abs() < 1e-12);
}

#[test]
fn warmup_as_percent_and_fraction_of_all_processes() {
    // T = 50 steps × 2 processes = 100; "10%" and 0.1 give W = 10
    for w in ["10%", "0.1"] {
        let s = sched("linear", w, 50, |c| c.num_processes = 2);
        assert_eq!(s.total_steps(), 100);
        assert_eq!(s.warmup_steps(), 10);
        check(
            &s,
            &[
                (0, 0.0),
                (5, 0.5),
                (10, 1.0),
                (55, 0.5),
                (100, 0.0),
                (120, 0.0),
            ],
        );
    }
    // int(0.15 × 10) = 1
    assert_eq!(sched("linear", "0.15", 10, |_| {}).warmup_steps(), 1);
}

#[test]
fn constant_and_constant_with_warmup() {
    check(
        &sched("constant", "0", 100, |_| {}),
        &[(0, 1.0), (100, 1.0), (1000, 1.0)],
    );
    check(
        &sched("constant_with_warmup", "4", 100, |_| {}),
        &[(0, 0.0), (3, 0.75), (4, 1.0), (99, 1.0)],
    );
    // W = 0: warm-up divides by max(1, W) and is never active
    check(
        &sched("constant_with_warmup", "0", 100, |_| {}),
        &[(0, 1.0)],
    );
    for w in ["5", "10%", "0.5"] {
        let cfg = SchedulerConfig {
            kind: SchedulerType::Constant,
            warmup: StepsSpec::parse("--lr_warmup_steps", w).expect("parse"),
            ..SchedulerConfig::default()
        };
        let err = LrScheduler::new(&cfg).expect_err("constant with warm-up");
        assert_eq!(
            err.to_string(),
            "invalid lr scheduler option --lr_warmup_steps: constant does not require \
             num_warmup_steps; set it to 0"
        );
    }
}

#[test]
fn cosine_with_restarts() {
    let s = sched("cosine_with_restarts", "0", 100, |c| c.num_cycles = 2);
    check(
        &s,
        &[
            (0, 1.0),
            (25, 0.5),
            (49, 0.5 * (1.0 + (PI * 0.98).cos())),
            (50, 1.0),
            (75, 0.5),
            (100, 0.0),
        ],
    );
    let s1 = sched("cosine_with_restarts", "10", 100, |_| {});
    check(&s1, &[(5, 0.5), (55, 0.5), (100, 0.0)]);
}

#[test]
fn polynomial() {
    let lr = 1e-4;
    let end = 1e-7;
    let s = sched("polynomial", "10", 110, |c| c.power = 2.0);
    let expected = |k: f64| ((lr - end) * (1.0 - (k - 10.0) / 100.0).powi(2) + end) / lr;
    check(
        &s,
        &[
            (5, 0.5),
            (10, 1.0),
            (60, expected(60.0)),
            (110, end / lr),
            (200, end / lr),
        ],
    );
    assert!((s.lambda(60) - (0.25 * 0.999 + 0.001)).abs() < 1e-12);
    let cfg = SchedulerConfig {
        kind: SchedulerType::Polynomial,
        learning_rate: 1e-7,
        ..SchedulerConfig::default()
    };
    assert!(
        LrScheduler::new(&cfg)
            .expect_err("lr_end")
            .to_string()
            .contains("lr_end")
    );
}

#[test]
fn inverse_sqrt_cosine_with_min_lr_and_wsd() {
    check(
        &sched("inverse_sqrt", "10", 100, |_| {}),
        &[(5, 0.5), (10, 1.0), (40, 0.5)],
    );
    // W = 0: timescale 10000
    check(
        &sched("inverse_sqrt", "0", 100, |_| {}),
        &[(0, 1.0), (30000, 0.5)],
    );
    check(
        &sched("inverse_sqrt", "0", 100, |c| c.timescale = Some(100)),
        &[(300, 0.5)],
    );

    let s = sched("cosine_with_min_lr", "0", 100, |c| {
        c.min_lr_ratio = Some(0.1)
    });
    check(&s, &[(0, 1.0), (50, 0.55), (100, 0.1)]);
    let cfg = SchedulerConfig {
        kind: SchedulerType::CosineWithMinLr,
        ..SchedulerConfig::default()
    };
    assert!(LrScheduler::new(&cfg).is_err());

    let s = sched("warmup_stable_decay", "10", 100, |c| {
        c.decay = StepsSpec::Steps(20);
    });
    check(
        &s,
        &[
            (5, 0.5),
            (10, 1.0),
            (50, 1.0),
            (79, 1.0),
            (80, 1.0),
            (90, 0.5),
            (100, 0.0),
        ],
    );
    let s = sched("warmup_stable_decay", "10", 100, |c| {
        c.decay = StepsSpec::Fraction(0.2);
        c.min_lr_ratio = Some(0.2);
    });
    check(&s, &[(0, 0.2), (5, 0.6), (90, 0.6), (100, 0.2)]);
}

#[test]
fn state_and_learning_rates() {
    let mut s = sched("linear", "0", 10, |_| {});
    assert_eq!(s.lrs(&[1e-4, 5e-5]), vec![1e-4, 5e-5]);
    for _ in 0..5 {
        s.step();
    }
    assert_eq!(s.steps_done(), 5);
    assert_eq!(s.lrs(&[1e-4, 5e-5]), vec![0.5e-4, 0.25e-4]);
    let state = s.state_tensors();
    let mut t = sched("linear", "0", 10, |_| {});
    t.load_state_tensors(&state).expect("load");
    assert_eq!(t.current_lambda(), 0.5);
    assert!(t.load_state_tensors(&[]).is_err());
}

#[test]
fn scheduler_name_errors() {
    let err = "cosine_annealing"
        .parse::<SchedulerType>()
        .expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown lr scheduler \"cosine_annealing\": supported are constant, \
         constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, inverse_sqrt, \
         cosine_with_min_lr, warmup_stable_decay"
    );
    assert!(matches!(
        "piecewise_constant".parse::<SchedulerType>(),
        Err(OptimError::SchedulerOption { .. })
    ));
    assert_eq!(
        StepsSpec::parse("--lr_warmup_steps", "1.5")
            .expect_err("1.5")
            .to_string(),
        "invalid lr scheduler option --lr_warmup_steps: \"1.5\" is >= 1, so it must be an \
         integer step count"
    );
    // the adafactor scheduler (forced by Adafactor's relative step) takes no warm-up either
    let cfg = SchedulerConfig {
        kind: SchedulerType::Adafactor,
        warmup: StepsSpec::Steps(3),
        ..SchedulerConfig::default()
    };
    assert!(LrScheduler::new(&cfg).is_err());
}
