//! Learning-rate schedulers: λ(k) multipliers on each group's initial lr, k = number of
//! scheduler steps already taken (the first optimiser step uses λ(0)).
//!
//! # Source
//! training.md §10; sd-scripts `train_util.get_scheduler_fix`; transformers
//! `optimization.py` (`get_*_schedule*` lambdas, `AdafactorSchedule`).

use std::f64::consts::PI;
use std::fmt;
use std::str::FromStr;

use tch::Tensor;

use super::{OptimError, Result};

/// The `--lr_scheduler` choices implemented here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerType {
    /// λ = 1; a non-zero warm-up is an error.
    Constant,
    /// Linear warm-up, then 1.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at T.
    Linear,
    /// Linear warm-up, then a half cosine to 0 at T.
    Cosine,
    /// Linear warm-up, then C hard-restart cosine cycles.
    CosineWithRestarts,
    /// Linear warm-up, then polynomial decay to lr_end = 1e-7.
    Polynomial,
    /// Linear warm-up, then 1/√((k + timescale − W)/timescale).
    InverseSqrt,
    /// Cosine floored at `min_lr_ratio`.
    CosineWithMinLr,
    /// Warm-up, stable, then cosine decay (transformers WSD).
    WarmupStableDecay,
    /// Set internally by Adafactor's relative-step mode: the optimiser computes its own lr.
    Adafactor,
}

const SCHEDULERS: &[(&str, SchedulerType)] = &[
    ("constant", SchedulerType::Constant),
    ("constant_with_warmup", SchedulerType::ConstantWithWarmup),
    ("linear", SchedulerType::Linear),
    ("cosine", SchedulerType::Cosine),
    ("cosine_with_restarts", SchedulerType::CosineWithRestarts),
    ("polynomial", SchedulerType::Polynomial),
    ("inverse_sqrt", SchedulerType::InverseSqrt),
    ("cosine_with_min_lr", SchedulerType::CosineWithMinLr),
    ("warmup_stable_decay", SchedulerType::WarmupStableDecay),
    ("adafactor", SchedulerType::Adafactor),
];

impl FromStr for SchedulerType {
    type Err = OptimError;

    /// Parses an `--lr_scheduler` name (exact, lower case as sd-scripts' choices).
    ///
    /// # Errors
    /// [`OptimError::UnknownScheduler`] listing the supported names; `piecewise_constant` is
    /// reported as unsupported.
    fn from_str(s: &str) -> Result<Self> {
        let supported = || {
            SCHEDULERS
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| *n != "adafactor")
                .collect::<Vec<_>>()
                .join(", ")
        };
        if let Some((_, t)) = SCHEDULERS.iter().find(|(n, _)| *n == s) {
            return Ok(*t);
        }
        if s == "piecewise_constant" {
            return Err(OptimError::SchedulerOption {
                option: "--lr_scheduler".into(),
                reason: format!(
                    "piecewise_constant is not supported; supported are {}",
                    supported()
                ),
            });
        }
        Err(OptimError::UnknownScheduler {
            name: s.to_string(),
            supported: supported(),
        })
    }
}

impl fmt::Display for SchedulerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = SCHEDULERS
            .iter()
            .find(|(_, t)| t == self)
            .map(|(n, _)| *n)
            .expect("every type is in the table");
        f.write_str(name)
    }
}

/// A step count given as `--lr_warmup_steps` / `--lr_decay_steps`: a count (≥ 1, integral) or
/// a fraction of T (< 1; "N%" means N/100).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepsSpec {
    /// A number of steps.
    Steps(u64),
    /// A fraction f of T: int(f·T) steps.
    Fraction(f64),
}

impl Default for StepsSpec {
    fn default() -> Self {
        StepsSpec::Steps(0)
    }
}

impl StepsSpec {
    /// Parses sd-scripts' `int_or_float`: "N%" → N/100 (a fraction); a value ≥ 1 must be an
    /// integer literal; a value < 1 is a fraction.
    ///
    /// # Errors
    /// [`OptimError::SchedulerOption`] naming `option` for non-numbers, non-integral values
    /// ≥ 1 ("1.5") and negative values.
    pub fn parse(option: &str, value: &str) -> Result<Self> {
        let err = |reason: String| OptimError::SchedulerOption {
            option: option.to_string(),
            reason,
        };
        let v = value.trim();
        if let Some(pct) = v.strip_suffix('%') {
            let p: f64 = pct
                .trim()
                .parse()
                .map_err(|_| err(format!("\"{value}\" is not a valid percentage")))?;
            if !(p.is_finite() && p >= 0.0) {
                return Err(err(format!(
                    "\"{value}\" must be a non-negative percentage"
                )));
            }
            return Ok(StepsSpec::Fraction(p / 100.0));
        }
        let f: f64 = v
            .parse()
            .map_err(|_| err(format!("\"{value}\" is not an int or float")))?;
        if !f.is_finite() || f < 0.0 {
            return Err(err(format!("\"{value}\" must be >= 0")));
        }
        if f >= 1.0 {
            return v.parse::<u64>().map(StepsSpec::Steps).map_err(|_| {
                err(format!(
                    "\"{value}\" is >= 1, so it must be an integer step count"
                ))
            });
        }
        if v.contains(['.', 'e', 'E']) {
            Ok(StepsSpec::Fraction(f))
        } else {
            Ok(StepsSpec::Steps(0))
        }
    }

    /// The step count for T total steps: n, or int(f·T).
    pub fn resolve(&self, total_steps: u64) -> u64 {
        match *self {
            StepsSpec::Steps(n) => n,
            StepsSpec::Fraction(f) => (f * total_steps as f64) as u64,
        }
    }

    /// Whether the value is non-zero (Python truthiness, used by the constant check).
    pub fn is_nonzero(&self) -> bool {
        match *self {
            StepsSpec::Steps(n) => n != 0,
            StepsSpec::Fraction(f) => f != 0.0,
        }
    }
}

/// The scheduler options of training.md §10 / §13.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulerConfig {
    /// `--lr_scheduler` (default constant).
    pub kind: SchedulerType,
    /// `--lr_warmup_steps` (default 0).
    pub warmup: StepsSpec,
    /// `--lr_decay_steps` (default 0; warmup_stable_decay only).
    pub decay: StepsSpec,
    /// `--lr_scheduler_num_cycles` C (default 1).
    pub num_cycles: u64,
    /// `--lr_scheduler_power` P (default 1).
    pub power: f64,
    /// `--lr_scheduler_timescale` (default: W, or 10000 when W = 0).
    pub timescale: Option<u64>,
    /// `--lr_scheduler_min_lr_ratio` (required by cosine_with_min_lr; WSD default 0).
    pub min_lr_ratio: Option<f64>,
    /// `--learning_rate`: lr_init of polynomial, initial lr of the adafactor scheduler.
    pub learning_rate: f64,
    /// `--max_train_steps`.
    pub max_train_steps: u64,
    /// Number of processes (T = max_train_steps × num_processes).
    pub num_processes: u64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            kind: SchedulerType::Constant,
            warmup: StepsSpec::Steps(0),
            decay: StepsSpec::Steps(0),
            num_cycles: 1,
            power: 1.0,
            timescale: None,
            min_lr_ratio: None,
            learning_rate: 2e-6,
            max_train_steps: 1600,
            num_processes: 1,
        }
    }
}

/// Polynomial decay's end lr (transformers default).
pub const POLYNOMIAL_LR_END: f64 = 1e-7;

/// A learning-rate scheduler: the resolved schedule plus the step count k (its state).
#[derive(Debug, Clone, PartialEq)]
pub struct LrScheduler {
    kind: SchedulerType,
    /// T.
    total: u64,
    /// W.
    warmup: u64,
    /// D.
    decay: u64,
    num_cycles: u64,
    power: f64,
    timescale: u64,
    min_lr_ratio: f64,
    learning_rate: f64,
    step: u64,
}

fn warmup_lambda(k: u64, w: u64) -> f64 {
    k as f64 / w.max(1) as f64
}

impl LrScheduler {
    /// Resolves the options as sd-scripts' `get_scheduler_fix` does.
    ///
    /// # Errors
    /// [`OptimError::SchedulerOption`]: a non-zero warm-up with `constant` or `adafactor`
    /// ("does not require num_warmup_steps"), `polynomial` with `--learning_rate` ≤ 1e-7,
    /// `cosine_with_min_lr` without `--lr_scheduler_min_lr_ratio`, num_processes 0.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let opt_err = |option: &str, reason: String| OptimError::SchedulerOption {
            option: option.to_string(),
            reason,
        };
        if cfg.num_processes == 0 {
            return Err(opt_err("num_processes", "must be at least 1".into()));
        }
        let total = cfg.max_train_steps * cfg.num_processes;
        let warmup = cfg.warmup.resolve(total);
        let decay = cfg.decay.resolve(total);
        if matches!(cfg.kind, SchedulerType::Constant | SchedulerType::Adafactor)
            && cfg.warmup.is_nonzero()
        {
            return Err(opt_err(
                "--lr_warmup_steps",
                format!(
                    "{} does not require num_warmup_steps; set it to 0",
                    cfg.kind
                ),
            ));
        }
        if cfg.kind == SchedulerType::Polynomial && cfg.learning_rate <= POLYNOMIAL_LR_END {
            return Err(opt_err(
                "--learning_rate",
                format!(
                    "lr_end ({POLYNOMIAL_LR_END:e}) must be smaller than initial lr ({})",
                    cfg.learning_rate
                ),
            ));
        }
        let min_lr_ratio = match (cfg.kind, cfg.min_lr_ratio) {
            (SchedulerType::CosineWithMinLr, None) => {
                return Err(opt_err(
                    "--lr_scheduler_min_lr_ratio",
                    "cosine_with_min_lr needs a min lr ratio".into(),
                ));
            }
            (_, r) => r.unwrap_or(0.0),
        };
        let timescale = cfg
            .timescale
            .unwrap_or(if warmup == 0 { 10_000 } else { warmup });
        if cfg.kind == SchedulerType::InverseSqrt && timescale == 0 {
            return Err(opt_err(
                "--lr_scheduler_timescale",
                "must be at least 1".into(),
            ));
        }
        Ok(Self {
            kind: cfg.kind,
            total,
            warmup,
            decay,
            num_cycles: cfg.num_cycles,
            power: cfg.power,
            timescale,
            min_lr_ratio,
            learning_rate: cfg.learning_rate,
            step: 0,
        })
    }

    /// The scheduler type.
    pub fn kind(&self) -> SchedulerType {
        self.kind
    }

    /// T = max_train_steps × num_processes.
    pub fn total_steps(&self) -> u64 {
        self.total
    }

    /// W, the resolved warm-up steps.
    pub fn warmup_steps(&self) -> u64 {
        self.warmup
    }

    /// λ(k) as in the table of training.md §10 (transformers' lambdas).
    pub fn lambda(&self, k: u64) -> f64 {
        let (t, w) = (self.total, self.warmup);
        let kf = k as f64;
        let progress = || (k - w) as f64 / (t.saturating_sub(w)).max(1) as f64;
        match self.kind {
            SchedulerType::Constant | SchedulerType::Adafactor => 1.0,
            SchedulerType::ConstantWithWarmup => {
                if k < w {
                    warmup_lambda(k, w)
                } else {
                    1.0
                }
            }
            SchedulerType::Linear => {
                if k < w {
                    warmup_lambda(k, w)
                } else {
                    ((t as f64 - kf) / (t.saturating_sub(w)).max(1) as f64).max(0.0)
                }
            }
            SchedulerType::Cosine => {
                if k < w {
                    warmup_lambda(k, w)
                } else {
                    (0.5 * (1.0 + (PI * progress()).cos())).max(0.0)
                }
            }
            SchedulerType::CosineWithRestarts => {
                if k < w {
                    return warmup_lambda(k, w);
                }
                let p = progress();
                if p >= 1.0 {
                    0.0
                } else {
                    let c = self.num_cycles as f64;
                    (0.5 * (1.0 + (PI * ((c * p) % 1.0)).cos())).max(0.0)
                }
            }
            SchedulerType::Polynomial => {
                let lr_init = self.learning_rate;
                if k < w {
                    warmup_lambda(k, w)
                } else if k > t || t == w {
                    POLYNOMIAL_LR_END / lr_init
                } else {
                    let lr_range = lr_init - POLYNOMIAL_LR_END;
                    let pct_remaining = 1.0 - (k - w) as f64 / (t - w) as f64;
                    (lr_range * pct_remaining.powf(self.power) + POLYNOMIAL_LR_END) / lr_init
                }
            }
            SchedulerType::InverseSqrt => {
                if k < w {
                    return warmup_lambda(k, w);
                }
                let ts = self.timescale as f64;
                let shift = ts - w as f64;
                1.0 / ((kf + shift) / ts).sqrt()
            }
            SchedulerType::CosineWithMinLr => {
                if k < w {
                    return warmup_lambda(k, w);
                }
                let cycles = self.num_cycles as f64 / 2.0;
                let factor = 0.5 * (1.0 + (PI * cycles * 2.0 * progress()).cos());
                (factor * (1.0 - self.min_lr_ratio) + self.min_lr_ratio).max(0.0)
            }
            SchedulerType::WarmupStableDecay => {
                let r = self.min_lr_ratio;
                let stable = t as i64 - w as i64 - self.decay as i64;
                let ki = k as i64;
                if k < w {
                    let f = warmup_lambda(k, w);
                    return (f * (1.0 - r) + r).max(0.0);
                }
                if ki < w as i64 + stable {
                    return 1.0;
                }
                if ki < w as i64 + stable + self.decay as i64 {
                    let p = (ki - w as i64 - stable) as f64 / self.decay.max(1) as f64;
                    let cycles = self.num_cycles as f64 / 2.0;
                    let f = 0.5 * (1.0 + (PI * cycles * 2.0 * p).cos());
                    return (f * (1.0 - r) + r).max(0.0);
                }
                r
            }
        }
    }

    /// Steps taken so far (k).
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// λ(k) for the current k: the multiplier for the next optimiser step.
    pub fn current_lambda(&self) -> f64 {
        self.lambda(self.step)
    }

    /// The learning rates for the next optimiser step: each `base_lrs[g] × λ(k)` (for the
    /// adafactor scheduler the optimiser ignores them and reports its own through
    /// `Optimizer::last_lrs`).
    pub fn lrs(&self, base_lrs: &[f64]) -> Vec<f64> {
        let l = self.current_lambda();
        base_lrs.iter().map(|lr| lr * l).collect()
    }

    /// Advances k by one (call once per optimiser step actually taken).
    pub fn step(&mut self) {
        self.step += 1;
    }

    /// The state for the training-state file: `[("step", int64 scalar k)]`.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![("step".to_string(), Tensor::from(self.step as i64))]
    }

    /// Restores k from [`LrScheduler::state_tensors`].
    ///
    /// # Errors
    /// [`OptimError::StateMissing`] without a "step" entry, [`OptimError::StateMismatch`] if it
    /// is not a non-negative int64 scalar.
    pub fn load_state_tensors(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let Some((_, t)) = named.iter().find(|(k, _)| k == "step") else {
            return Err(OptimError::StateMissing { key: "step".into() });
        };
        let bad = || OptimError::StateMismatch {
            key: "step".into(),
            expected: "a non-negative Int64 scalar".into(),
            found: format!("{:?} {:?}", t.size(), t.kind()),
        };
        if t.numel() != 1 || t.kind() != tch::Kind::Int64 {
            return Err(bad());
        }
        let k = t.int64_value(&[]);
        self.step = u64::try_from(k).map_err(|_| bad())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_spec_parsing() {
        let p = |s| StepsSpec::parse("--lr_warmup_steps", s);
        assert_eq!(p("10").ok(), Some(StepsSpec::Steps(10)));
        assert_eq!(p("0").ok(), Some(StepsSpec::Steps(0)));
        assert_eq!(p("0.1").ok(), Some(StepsSpec::Fraction(0.1)));
        assert_eq!(p("10%").ok(), Some(StepsSpec::Fraction(0.1)));
        assert!(p("1.5").is_err());
        assert!(p("abc").is_err());
        assert!(p("-1").is_err());
        assert_eq!(StepsSpec::Fraction(0.1).resolve(100), 10);
        assert_eq!(StepsSpec::Fraction(0.15).resolve(10), 1);
    }
}
