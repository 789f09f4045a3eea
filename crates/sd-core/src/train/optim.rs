//! Optimisers on parameter groups (AdamW, Lion, SGD with Nesterov momentum, Adafactor), the
//! [`Optimizer`] trait they share with the 8-bit ones, and their construction from sd-scripts'
//! `--optimizer_type` / `--optimizer_args`.
//!
//! Each optimiser keeps one state per parameter (a step count and f32 tensors on the
//! parameter's device), created at the parameter's first step, exactly as PyTorch's lazily
//! initialised `optimizer.state[p]`. A parameter whose `.grad` is undefined is skipped, as
//! PyTorch skips `p.grad is None`.
//!
//! # Source
//! training.md §9; PyTorch 2.x `torch/optim/adamw.py` and `sgd.py` (single-tensor path),
//! lion-pytorch `lion_pytorch.py` (`update_fn`), transformers `optimization.py` (`Adafactor`).

use std::collections::{HashMap, HashSet};
use std::fmt;

use tch::{Kind, Tensor};

use super::optim8bit::{AdamW8bit, AdamW8bitParams, Lion8bit, Lion8bitParams};
use super::{OptimError, Result};

/// One parameter group (training.md §7.5): the trainable tensors that share a learning rate.
#[derive(Debug)]
pub struct ParamGroup {
    /// Description used for logging: "textencoder", "unet", "unet_block3", "unet plus".
    pub name: String,
    /// Leaf tensors with `requires_grad` (shallow clones of the network's variables: the
    /// optimiser updates them in place).
    pub params: Vec<Tensor>,
    /// The group's initial learning rate (before the scheduler's λ).
    pub lr: f64,
}

impl ParamGroup {
    /// A group named `name` with initial learning rate `lr`.
    pub fn new(name: impl Into<String>, params: Vec<Tensor>, lr: f64) -> Self {
        Self {
            name: name.into(),
            params,
            lr,
        }
    }
}

/// An optimiser over parameter groups.
///
/// The training loop calls [`Optimizer::step`] with the current learning rate of every group
/// (`group.lr × λ(k)`, see [`super::LrScheduler::lrs`]), then [`Optimizer::zero_grad`].
pub trait Optimizer {
    /// The parameter groups, in construction order.
    fn groups(&self) -> &[ParamGroup];

    /// One update of every parameter that has a gradient, with `lrs[g]` for group `g`.
    ///
    /// # Errors
    /// [`OptimError::LrCount`] when `lrs.len()` differs from the number of groups.
    fn step(&mut self, lrs: &[f64]) -> Result<()>;

    /// Zeroes the gradients of all parameters (in place; PyTorch's `set_to_none` has no tch
    /// counterpart, so a parameter that once had a gradient keeps being updated).
    fn zero_grad(&mut self);

    /// The optimiser state as named tensors (deep copies), for the training-state file.
    /// Keys are `"{group}.{param}.step"` (int64 scalar) and `"{group}.{param}.{slot}"`.
    fn state_tensors(&self) -> Vec<(String, Tensor)>;

    /// Restores a state saved by [`Optimizer::state_tensors`] of an optimiser of the same
    /// kind over parameters of the same shapes. Tensors are copied to the parameters' device.
    ///
    /// # Errors
    /// [`OptimError::StateMissing`], [`OptimError::StateMismatch`] (shape or dtype) or
    /// [`OptimError::StateUnused`] (keys for no parameter); the state is unchanged then.
    fn load_state_tensors(&mut self, named: &[(String, Tensor)]) -> Result<()>;

    /// The name stored as `ss_optimizer`: `"<module>.<Class>"` plus `"(k=v,k=v)"` with the
    /// optimizer args, e.g. `torch.optim.adamw.AdamW(weight_decay=0.1)` (training.md §9).
    fn metadata_name(&self) -> String;

    /// The learning rate each group's first parameter used in the last step: the lrs given to
    /// `step`, except for Adafactor with `relative_step`, which computes its own (log these).
    fn last_lrs(&self) -> Vec<f64>;

    /// Bytes held by the optimiser state (all groups).
    fn state_bytes(&self) -> usize;
}

/// The per-parameter update of one optimiser: which state slots a parameter gets and how one
/// step changes the parameter and its state. [`Grouped`] runs it over the groups.
pub trait UpdateRule {
    /// Names and initial values (f32 zeros, or u8 for quantised state) of the state slots of
    /// `param`, on its device.
    fn init_state(&self, param: &Tensor) -> Vec<(&'static str, Tensor)>;

    /// One step: `param` is f32 (a copy for half-precision parameters), `grad` f32 of the same
    /// shape, `state` the slots in `init_state` order, `step` the 1-based step count of this
    /// parameter, `lr` the group's current lr. Returns the lr actually used. Runs in no-grad
    /// mode.
    fn update(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
        step: i64,
        lr: f64,
    ) -> f64;
}

#[derive(Debug)]
struct ParamState {
    step: i64,
    slots: Vec<Tensor>,
}

/// An optimiser made of an [`UpdateRule`] applied to every parameter of every group.
#[derive(Debug)]
pub struct Grouped<R> {
    rule: R,
    groups: Vec<ParamGroup>,
    states: Vec<Vec<Option<ParamState>>>,
    last_lrs: Vec<f64>,
    metadata_name: String,
}

impl<R: UpdateRule> Grouped<R> {
    /// An optimiser over `groups` with the given rule; `metadata_name` is what
    /// [`Optimizer::metadata_name`] returns.
    pub fn with_rule(rule: R, groups: Vec<ParamGroup>, metadata_name: impl Into<String>) -> Self {
        let states = groups
            .iter()
            .map(|g| g.params.iter().map(|_| None).collect())
            .collect();
        let last_lrs = groups.iter().map(|g| g.lr).collect();
        Self {
            rule,
            groups,
            states,
            last_lrs,
            metadata_name: metadata_name.into(),
        }
    }

    /// Replaces the name returned by [`Optimizer::metadata_name`].
    pub fn set_metadata_name(&mut self, name: impl Into<String>) {
        self.metadata_name = name.into();
    }

    /// The update rule (hyper-parameters).
    pub fn rule(&self) -> &R {
        &self.rule
    }
}

fn describe(t: &Tensor) -> String {
    format!("{:?} {:?}", t.size(), t.kind())
}

impl<R: UpdateRule> Optimizer for Grouped<R> {
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn step(&mut self, lrs: &[f64]) -> Result<()> {
        if lrs.len() != self.groups.len() {
            return Err(OptimError::LrCount {
                expected: self.groups.len(),
                found: lrs.len(),
            });
        }
        let _guard = tch::no_grad_guard();
        let Self {
            rule,
            groups,
            states,
            last_lrs,
            ..
        } = self;
        for (gi, group) in groups.iter_mut().enumerate() {
            for (pi, param) in group.params.iter_mut().enumerate() {
                let grad = param.grad();
                if !grad.defined() {
                    continue;
                }
                let grad = if grad.kind() == Kind::Float {
                    grad
                } else {
                    grad.to_kind(Kind::Float)
                };
                let state = states[gi][pi].get_or_insert_with(|| ParamState {
                    step: 0,
                    slots: rule.init_state(param).into_iter().map(|(_, t)| t).collect(),
                });
                state.step += 1;
                let used = if param.kind() == Kind::Float {
                    rule.update(param, &grad, &mut state.slots, state.step, lrs[gi])
                } else {
                    let mut p32 = param.to_kind(Kind::Float);
                    let used = rule.update(&mut p32, &grad, &mut state.slots, state.step, lrs[gi]);
                    param.copy_(&p32);
                    used
                };
                if pi == 0 {
                    last_lrs[gi] = used;
                }
            }
        }
        Ok(())
    }

    fn zero_grad(&mut self) {
        for group in &mut self.groups {
            for p in &mut group.params {
                p.zero_grad();
            }
        }
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (gi, (group, states)) in self.groups.iter().zip(&self.states).enumerate() {
            for (pi, (param, state)) in group.params.iter().zip(states).enumerate() {
                let Some(state) = state else { continue };
                out.push((format!("{gi}.{pi}.step"), Tensor::from(state.step)));
                let names = self.rule.init_state(param);
                for ((name, _), slot) in names.iter().zip(&state.slots) {
                    out.push((format!("{gi}.{pi}.{name}"), slot.copy()));
                }
            }
        }
        out
    }

    fn load_state_tensors(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let map: HashMap<&str, &Tensor> = named.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let mut used: HashSet<&str> = HashSet::new();
        let mut new_states = Vec::with_capacity(self.groups.len());
        for (gi, group) in self.groups.iter().enumerate() {
            let mut group_states = Vec::with_capacity(group.params.len());
            for (pi, param) in group.params.iter().enumerate() {
                let step_key = format!("{gi}.{pi}.step");
                let Some((&step_key_ref, step_t)) = map.get_key_value(step_key.as_str()) else {
                    group_states.push(None);
                    continue;
                };
                if step_t.numel() != 1 || step_t.kind() != Kind::Int64 {
                    return Err(OptimError::StateMismatch {
                        key: step_key,
                        expected: "[] Int64".into(),
                        found: describe(step_t),
                    });
                }
                used.insert(step_key_ref);
                let step = step_t.int64_value(&[]);
                let mut slots = Vec::new();
                for (name, init) in self.rule.init_state(param) {
                    let key = format!("{gi}.{pi}.{name}");
                    let Some((&key_ref, t)) = map.get_key_value(key.as_str()) else {
                        return Err(OptimError::StateMissing { key });
                    };
                    if t.size() != init.size() || t.kind() != init.kind() {
                        return Err(OptimError::StateMismatch {
                            key,
                            expected: describe(&init),
                            found: describe(t),
                        });
                    }
                    used.insert(key_ref);
                    slots.push(t.to_device(param.device()).copy());
                }
                group_states.push(Some(ParamState { step, slots }));
            }
            new_states.push(group_states);
        }
        let unused: Vec<String> = named
            .iter()
            .filter(|(k, _)| !used.contains(k.as_str()))
            .take(10)
            .map(|(k, _)| k.clone())
            .collect();
        if !unused.is_empty() {
            return Err(OptimError::StateUnused { keys: unused });
        }
        self.states = new_states;
        Ok(())
    }

    fn metadata_name(&self) -> String {
        self.metadata_name.clone()
    }

    fn last_lrs(&self) -> Vec<f64> {
        self.last_lrs.clone()
    }

    fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .flatten()
            .flatten()
            .flat_map(|s| &s.slots)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }
}

fn zeros_f32(shape: &[i64], like: &Tensor) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, like.device()))
}

// ---------------------------------------------------------------------------------------------
// AdamW

/// Hyper-parameters of AdamW (PyTorch `torch.optim.AdamW` defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    /// (β₁, β₂), default (0.9, 0.999).
    pub betas: (f64, f64),
    /// ε added to √v̂ (outside the square root), default 1e-8.
    pub eps: f64,
    /// Decoupled weight decay, default 0.01.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl UpdateRule for AdamWParams {
    fn init_state(&self, param: &Tensor) -> Vec<(&'static str, Tensor)> {
        let shape = param.size();
        vec![
            ("exp_avg", zeros_f32(&shape, param)),
            ("exp_avg_sq", zeros_f32(&shape, param)),
        ]
    }

    /// PyTorch's single-tensor AdamW: p ← p·(1 − lr·wd); m ← lerp(m, g, 1 − β₁);
    /// v ← β₂·v + (1 − β₂)·g²; p ← p − (lr / (1 − β₁ᵗ)) · m / (√v / √(1 − β₂ᵗ) + ε).
    fn update(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
        step: i64,
        lr: f64,
    ) -> f64 {
        let (beta1, beta2) = self.betas;
        let _ = param.g_mul_scalar_(1.0 - lr * self.weight_decay);
        let (exp_avg, rest) = state.split_at_mut(1);
        let exp_avg = &mut exp_avg[0];
        let exp_avg_sq = &mut rest[0];
        let _ = exp_avg.lerp_(grad, 1.0 - beta1);
        let _ = exp_avg_sq.g_mul_scalar_(beta2);
        let _ = exp_avg_sq.addcmul_(&(grad * (1.0 - beta2)), grad);
        let t = step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        let bias_correction2_sqrt = (1.0 - beta2.powf(t)).sqrt();
        let step_size = lr / bias_correction1;
        let denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + self.eps;
        let _ = param.addcdiv_(&(&*exp_avg * -step_size), &denom);
        lr
    }
}

/// AdamW (PyTorch's algorithm, f32 state).
pub type AdamW = Grouped<AdamWParams>;

impl AdamW {
    /// AdamW over `groups`; metadata name `torch.optim.adamw.AdamW`.
    pub fn new(groups: Vec<ParamGroup>, params: AdamWParams) -> Self {
        Grouped::with_rule(params, groups, "torch.optim.adamw.AdamW")
    }
}

// ---------------------------------------------------------------------------------------------
// Lion

/// Hyper-parameters of Lion (lion-pytorch defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LionParams {
    /// (β₁, β₂), default (0.9, 0.99).
    pub betas: (f64, f64),
    /// Decoupled weight decay, default 0.
    pub weight_decay: f64,
}

impl Default for LionParams {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.99),
            weight_decay: 0.0,
        }
    }
}

impl UpdateRule for LionParams {
    fn init_state(&self, param: &Tensor) -> Vec<(&'static str, Tensor)> {
        vec![("exp_avg", zeros_f32(&param.size(), param))]
    }

    /// lion-pytorch `update_fn`: p ← p·(1 − lr·wd); p ← p − lr·sign(β₁·m + (1 − β₁)·g);
    /// m ← β₂·m + (1 − β₂)·g.
    fn update(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
        _step: i64,
        lr: f64,
    ) -> f64 {
        let (beta1, beta2) = self.betas;
        let exp_avg = &mut state[0];
        let _ = param.g_mul_scalar_(1.0 - lr * self.weight_decay);
        let update = (&*exp_avg * beta1 + grad * (1.0 - beta1)).sign();
        let _ = param.g_add_(&(update * -lr));
        let _ = exp_avg.g_mul_scalar_(beta2);
        let _ = exp_avg.g_add_(&(grad * (1.0 - beta2)));
        lr
    }
}

/// Lion (lion-pytorch's update, f32 state).
pub type Lion = Grouped<LionParams>;

impl Lion {
    /// Lion over `groups`; metadata name `lion_pytorch.lion_pytorch.Lion`.
    pub fn new(groups: Vec<ParamGroup>, params: LionParams) -> Self {
        Grouped::with_rule(params, groups, "lion_pytorch.lion_pytorch.Lion")
    }
}

// ---------------------------------------------------------------------------------------------
// SGD (Nesterov)

/// Hyper-parameters of SGD (PyTorch `torch.optim.SGD`; sd-scripts' SGDNesterov sets
/// `nesterov = true` and momentum 0.9 when not given).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdParams {
    /// Momentum factor μ, default 0.9 (SGDNesterov).
    pub momentum: f64,
    /// Dampening τ, default 0 (must be 0 with Nesterov).
    pub dampening: f64,
    /// L2 penalty added to the gradient (not decoupled), default 0.
    pub weight_decay: f64,
    /// Nesterov momentum, default true.
    pub nesterov: bool,
}

impl Default for SgdParams {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: true,
        }
    }
}

impl UpdateRule for SgdParams {
    fn init_state(&self, param: &Tensor) -> Vec<(&'static str, Tensor)> {
        if self.momentum == 0.0 {
            Vec::new()
        } else {
            vec![("momentum_buffer", zeros_f32(&param.size(), param))]
        }
    }

    /// PyTorch's single-tensor SGD: d = g + wd·p; b ← d at the first step, else
    /// b ← μ·b + (1 − τ)·d; d ← d + μ·b (Nesterov) or b; p ← p − lr·d.
    fn update(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
        step: i64,
        lr: f64,
    ) -> f64 {
        let mut d_p = if self.weight_decay != 0.0 {
            grad + &*param * self.weight_decay
        } else {
            grad.shallow_clone()
        };
        if self.momentum != 0.0 {
            let buf = &mut state[0];
            if step == 1 {
                buf.copy_(&d_p);
            } else {
                let _ = buf.g_mul_scalar_(self.momentum);
                let _ = buf.g_add_(&(&d_p * (1.0 - self.dampening)));
            }
            d_p = if self.nesterov {
                &d_p + &*buf * self.momentum
            } else {
                buf.shallow_clone()
            };
        }
        let _ = param.g_add_(&(d_p * -lr));
        lr
    }
}

/// SGD with (Nesterov) momentum (PyTorch's algorithm, f32 state).
pub type SgdNesterov = Grouped<SgdParams>;

impl SgdNesterov {
    /// SGD over `groups`; metadata name `torch.optim.sgd.SGD`.
    pub fn new(groups: Vec<ParamGroup>, params: SgdParams) -> Self {
        Grouped::with_rule(params, groups, "torch.optim.sgd.SGD")
    }
}

// ---------------------------------------------------------------------------------------------
// Adafactor

/// Hyper-parameters of Adafactor (transformers `optimization.Adafactor` defaults, with
/// sd-scripts' `relative_step = true`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorParams {
    /// (ε₁ added to g², ε₂ lower bound of the parameter scale), default (1e-30, 1e-3).
    pub eps: (f64, f64),
    /// Update RMS clip d, default 1.0.
    pub clip_threshold: f64,
    /// Exponent of the second-moment decay β₂ₜ = 1 − t^decay_rate, default −0.8.
    pub decay_rate: f64,
    /// First-moment coefficient, default None (no first moment).
    pub beta1: Option<f64>,
    /// Weight decay (scaled by the step's lr), default 0.
    pub weight_decay: f64,
    /// Multiply the lr by max(ε₂, RMS(p)), default true.
    pub scale_parameter: bool,
    /// Use the lr min(1e-2, 1/√t) (or 1e-6·t with warm-up init) instead of the group lr,
    /// default true.
    pub relative_step: bool,
    /// Relative-step warm-up: min(1e-6·t, 1/√t), default false.
    pub warmup_init: bool,
}

impl Default for AdafactorParams {
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorParams {
    /// The step's learning rate (transformers `Adafactor._get_lr`): with `relative_step`,
    /// min(1e-6·t if warmup_init else 1e-2, 1/√t), else `group_lr`; times max(ε₂, RMS(p))
    /// with `scale_parameter`. `param_rms` is RMS(p) before the update.
    pub fn step_lr(&self, group_lr: f64, step: i64, param_rms: f64) -> f64 {
        let mut rel_step = group_lr;
        if self.relative_step {
            let min_step = if self.warmup_init {
                1e-6 * step as f64
            } else {
                1e-2
            };
            rel_step = min_step.min(1.0 / (step as f64).sqrt());
        }
        let param_scale = if self.scale_parameter {
            self.eps.1.max(param_rms)
        } else {
            1.0
        };
        param_scale * rel_step
    }
}

fn rms(t: &Tensor) -> Tensor {
    t.norm() / (t.numel() as f64).sqrt()
}

impl UpdateRule for AdafactorParams {
    fn init_state(&self, param: &Tensor) -> Vec<(&'static str, Tensor)> {
        let shape = param.size();
        let mut slots = Vec::new();
        if self.beta1.is_some() {
            slots.push(("exp_avg", zeros_f32(&shape, param)));
        }
        if shape.len() >= 2 {
            let n = shape.len();
            let row = &shape[..n - 1];
            let mut col = shape[..n - 2].to_vec();
            col.push(shape[n - 1]);
            slots.push(("exp_avg_sq_row", zeros_f32(row, param)));
            slots.push(("exp_avg_sq_col", zeros_f32(&col, param)));
        } else {
            slots.push(("exp_avg_sq", zeros_f32(&shape, param)));
        }
        slots
    }

    /// transformers `Adafactor.step` for one parameter (factored second moment for ≥ 2-D
    /// parameters over the last two dims).
    fn update(
        &mut self,
        param: &mut Tensor,
        grad: &Tensor,
        state: &mut [Tensor],
        step: i64,
        lr: f64,
    ) -> f64 {
        let factored = param.dim() >= 2;
        let param_rms = rms(param).double_value(&[]);
        let lr = self.step_lr(lr, step, param_rms);
        let beta2t = 1.0 - (step as f64).powf(self.decay_rate);
        let mut update = grad * grad + self.eps.0;
        let moments = if self.beta1.is_some() {
            &mut state[1..]
        } else {
            &mut state[..]
        };
        if factored {
            let (row, col) = moments.split_at_mut(1);
            let (row, col) = (&mut row[0], &mut col[0]);
            let _ = row.g_mul_scalar_(beta2t);
            let _ = row.g_add_(&(update.mean_dim(-1, false, Kind::Float) * (1.0 - beta2t)));
            let _ = col.g_mul_scalar_(beta2t);
            let _ = col.g_add_(&(update.mean_dim(-2, false, Kind::Float) * (1.0 - beta2t)));
            let r_factor = (&*row / row.mean_dim(-1, true, Kind::Float))
                .rsqrt()
                .unsqueeze(-1);
            let c_factor = col.unsqueeze(-2).rsqrt();
            update = r_factor * c_factor * grad;
        } else {
            let v = &mut moments[0];
            let _ = v.g_mul_scalar_(beta2t);
            let _ = v.g_add_(&(update * (1.0 - beta2t)));
            update = v.rsqrt() * grad;
        }
        let clip = (rms(&update) / self.clip_threshold).clamp_min(1.0);
        update = update / clip * lr;
        if let Some(beta1) = self.beta1 {
            let exp_avg = &mut state[0];
            let _ = exp_avg.g_mul_scalar_(beta1);
            let _ = exp_avg.g_add_(&(update * (1.0 - beta1)));
            update = exp_avg.shallow_clone();
        }
        if self.weight_decay != 0.0 {
            let decay = &*param * (-self.weight_decay * lr);
            let _ = param.g_add_(&decay);
        }
        let _ = param.g_sub_(&update);
        lr
    }
}

/// Adafactor (transformers' algorithm, f32 state).
pub type Adafactor = Grouped<AdafactorParams>;

impl Adafactor {
    /// Adafactor over `groups`; metadata name `transformers.optimization.Adafactor`. With
    /// `relative_step` the lrs given to `step` are ignored.
    pub fn new(groups: Vec<ParamGroup>, params: AdafactorParams) -> Self {
        Grouped::with_rule(params, groups, "transformers.optimization.Adafactor")
    }
}

// ---------------------------------------------------------------------------------------------
// --optimizer_args literals

/// A Python literal value of `--optimizer_args` (what `ast.literal_eval` accepts that sd-scripts
/// users write).
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// `3`, `-1`.
    Int(i64),
    /// `0.1`, `1e-8`.
    Float(f64),
    /// `True` / `False`.
    Bool(bool),
    /// `None`.
    None,
    /// `'text'` or `"text"`.
    Str(String),
    /// `0.9,0.999` or `(0.9, 0.999)`.
    Tuple(Vec<Literal>),
    /// `[1, 2]`.
    List(Vec<Literal>),
}

/// Formats an f64 as Python's `repr(float)`: shortest round-trip digits, positional for
/// exponents in [−4, 16), else `1e-08` style.
fn py_float(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

impl Literal {
    /// Python `repr` of the value (strings quoted).
    fn repr(&self) -> String {
        match self {
            Literal::Str(s) => format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'")),
            other => other.to_string(),
        }
    }

    /// The value as f64 (ints and floats; bools are rejected).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Literal::Int(i) => Some(*i as f64),
            Literal::Float(f) => Some(*f),
            _ => None,
        }
    }
}

/// Python `str()` of the value, as sd-scripts writes it into `ss_optimizer`.
impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Int(i) => write!(f, "{i}"),
            Literal::Float(x) => f.write_str(&py_float(*x)),
            Literal::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Literal::None => f.write_str("None"),
            Literal::Str(s) => f.write_str(s),
            Literal::Tuple(items) => {
                let inner: Vec<String> = items.iter().map(Literal::repr).collect();
                if items.len() == 1 {
                    write!(f, "({},)", inner[0])
                } else {
                    write!(f, "({})", inner.join(", "))
                }
            }
            Literal::List(items) => {
                let inner: Vec<String> = items.iter().map(Literal::repr).collect();
                write!(f, "[{}]", inner.join(", "))
            }
        }
    }
}

struct LiteralParser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl LiteralParser<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && self.s[self.pos].is_ascii_whitespace() {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.pos).copied()
    }

    /// `a` or `a, b, ...` (a trailing comma makes a tuple).
    fn expr_list(
        &mut self,
        close: Option<u8>,
    ) -> std::result::Result<(Vec<Literal>, bool), String> {
        let mut items = Vec::new();
        let mut saw_comma = false;
        loop {
            match self.peek() {
                None => break,
                Some(c) if Some(c) == close => break,
                _ => {}
            }
            items.push(self.atom()?);
            if self.peek() == Some(b',') {
                self.pos += 1;
                saw_comma = true;
            } else {
                break;
            }
        }
        Ok((items, saw_comma))
    }

    fn atom(&mut self) -> std::result::Result<Literal, String> {
        match self.peek() {
            None => Err("missing value".into()),
            Some(b'(') => {
                self.pos += 1;
                let (items, comma) = self.expr_list(Some(b')'))?;
                self.expect(b')')?;
                if items.len() == 1 && !comma {
                    Ok(items.into_iter().next().expect("one item"))
                } else {
                    Ok(Literal::Tuple(items))
                }
            }
            Some(b'[') => {
                self.pos += 1;
                let (items, _) = self.expr_list(Some(b']'))?;
                self.expect(b']')?;
                Ok(Literal::List(items))
            }
            Some(q @ (b'\'' | b'"')) => self.string(q),
            Some(_) => self.word(),
        }
    }

    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err(format!("expected '{}'", c as char))
        }
    }

    fn string(&mut self, quote: u8) -> std::result::Result<Literal, String> {
        self.pos += 1;
        let mut out = Vec::new();
        while let Some(&c) = self.s.get(self.pos) {
            self.pos += 1;
            if c == quote {
                return String::from_utf8(out)
                    .map(Literal::Str)
                    .map_err(|_| "string is not UTF-8".into());
            }
            if c == b'\\' {
                let Some(&e) = self.s.get(self.pos) else {
                    break;
                };
                self.pos += 1;
                out.push(match e {
                    b'n' => b'\n',
                    b't' => b'\t',
                    other => other,
                });
            } else {
                out.push(c);
            }
        }
        Err("unterminated string".into())
    }

    fn word(&mut self) -> std::result::Result<Literal, String> {
        let start = self.pos;
        while let Some(&c) = self.s.get(self.pos) {
            if c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-') {
                self.pos += 1;
            } else {
                break;
            }
        }
        let w = std::str::from_utf8(&self.s[start..self.pos]).map_err(|_| "not UTF-8")?;
        match w {
            "True" => return Ok(Literal::Bool(true)),
            "False" => return Ok(Literal::Bool(false)),
            "None" => return Ok(Literal::None),
            "" => return Err(format!("unexpected character at offset {start}")),
            _ => {}
        }
        let digits = w.replace('_', "");
        let body = digits.trim_start_matches(['+', '-']);
        let looks_numeric = body.starts_with(|c: char| c.is_ascii_digit() || c == '.')
            && !w.contains("__")
            && !w.ends_with('_');
        if !looks_numeric {
            return Err(format!("{w:?} is not a Python literal (quote strings)"));
        }
        if body.chars().all(|c| c.is_ascii_digit()) {
            if let Ok(i) = digits.parse::<i64>() {
                return Ok(Literal::Int(i));
            }
            return Err(format!("integer {w} is out of range"));
        }
        digits
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .map(Literal::Float)
            .ok_or_else(|| format!("{w:?} is not a number"))
    }
}

/// Parses one `--optimizer_args` item `key=value` as sd-scripts does (`arg.split("=")` into
/// exactly two parts, then `ast.literal_eval(value)`): numbers, `True`/`False`/`None`, quoted
/// strings, comma tuples (`betas=0.9,0.999`), parenthesised tuples and lists.
///
/// # Errors
/// [`OptimError::BadArg`] when there is not exactly one `=`, the key is empty or the value is
/// not such a literal.
pub fn parse_optimizer_arg(arg: &str) -> Result<(String, Literal)> {
    let bad = |reason: String| OptimError::BadArg {
        arg: arg.to_string(),
        reason,
    };
    let parts: Vec<&str> = arg.split('=').collect();
    if parts.len() != 2 {
        return Err(bad("expected exactly one \"=\" (key=value)".into()));
    }
    let key = parts[0].trim();
    if key.is_empty() {
        return Err(bad("empty key".into()));
    }
    let mut parser = LiteralParser {
        s: parts[1].as_bytes(),
        pos: 0,
    };
    let (items, comma) = parser.expr_list(None).map_err(bad)?;
    if parser.peek().is_some() {
        return Err(bad(format!(
            "unexpected text {:?} after the value",
            &parts[1][parser.pos..]
        )));
    }
    let value = match items.len() {
        0 => return Err(bad("missing value".into())),
        1 if !comma => items.into_iter().next().expect("one item"),
        _ => Literal::Tuple(items),
    };
    Ok((key.to_string(), value))
}

// ---------------------------------------------------------------------------------------------
// --optimizer_type

/// The optimiser families this port implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptimizerKind {
    /// AdamW, f32 state.
    AdamW,
    /// AdamW with block-wise 8-bit state.
    AdamW8bit,
    /// Lion, f32 state.
    Lion,
    /// Lion with block-wise 8-bit state.
    Lion8bit,
    /// SGD with Nesterov momentum.
    SgdNesterov,
    /// Adafactor.
    Adafactor,
}

/// Resolved hyper-parameters of the chosen optimiser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerParams {
    /// AdamW.
    AdamW(AdamWParams),
    /// 8-bit AdamW.
    AdamW8bit(AdamW8bitParams),
    /// Lion.
    Lion(LionParams),
    /// 8-bit Lion.
    Lion8bit(Lion8bitParams),
    /// SGD (Nesterov).
    Sgd(SgdParams),
    /// Adafactor.
    Adafactor(AdafactorParams),
}

/// (lower-case name, kind, upstream class recorded in metadata, mapping note)
const OPTIMIZERS: &[(&str, OptimizerKind, &str, Option<&str>)] = &[
    (
        "adamw",
        OptimizerKind::AdamW,
        "torch.optim.adamw.AdamW",
        None,
    ),
    (
        "adamw8bit",
        OptimizerKind::AdamW8bit,
        "bitsandbytes.optim.adamw.AdamW8bit",
        None,
    ),
    (
        "pagedadamw8bit",
        OptimizerKind::AdamW8bit,
        "bitsandbytes.optim.adamw.PagedAdamW8bit",
        Some("paging has no effect here: using AdamW8bit"),
    ),
    (
        "pagedadamw",
        OptimizerKind::AdamW,
        "bitsandbytes.optim.adamw.PagedAdamW",
        Some("paging has no effect here: using AdamW with f32 state"),
    ),
    (
        "pagedadamw32bit",
        OptimizerKind::AdamW,
        "bitsandbytes.optim.adamw.PagedAdamW32bit",
        Some("paging has no effect here: using AdamW with f32 state"),
    ),
    (
        "lion",
        OptimizerKind::Lion,
        "lion_pytorch.lion_pytorch.Lion",
        None,
    ),
    (
        "lion8bit",
        OptimizerKind::Lion8bit,
        "bitsandbytes.optim.lion.Lion8bit",
        None,
    ),
    (
        "pagedlion8bit",
        OptimizerKind::Lion8bit,
        "bitsandbytes.optim.lion.PagedLion8bit",
        Some("paging has no effect here: using Lion8bit"),
    ),
    (
        "sgdnesterov",
        OptimizerKind::SgdNesterov,
        "torch.optim.sgd.SGD",
        None,
    ),
    (
        "sgdnesterov8bit",
        OptimizerKind::SgdNesterov,
        "bitsandbytes.optim.sgd.SGD8bit",
        Some("8-bit SGD state is not implemented: using SGDNesterov with f32 state"),
    ),
    (
        "adafactor",
        OptimizerKind::Adafactor,
        "transformers.optimization.Adafactor",
        None,
    ),
];

const SUPPORTED_NAMES: &str = "AdamW, AdamW8bit, PagedAdamW8bit, PagedAdamW, PagedAdamW32bit, \
Lion, Lion8bit, PagedLion8bit, SGDNesterov, SGDNesterov8bit, Adafactor";

const UNSUPPORTED: &[(&str, &str)] = &[
    ("dadaptation", "D-Adaptation optimizers are not implemented"),
    (
        "dadaptadampreprint",
        "D-Adaptation optimizers are not implemented",
    ),
    (
        "dadaptadagrad",
        "D-Adaptation optimizers are not implemented",
    ),
    ("dadaptadam", "D-Adaptation optimizers are not implemented"),
    ("dadaptadan", "D-Adaptation optimizers are not implemented"),
    (
        "dadaptadanip",
        "D-Adaptation optimizers are not implemented",
    ),
    ("dadaptlion", "D-Adaptation optimizers are not implemented"),
    ("dadaptsgd", "D-Adaptation optimizers are not implemented"),
    ("prodigy", "Prodigy is not implemented"),
    (
        "radamschedulefree",
        "schedule-free optimizers are not implemented",
    ),
    (
        "adamwschedulefree",
        "schedule-free optimizers are not implemented",
    ),
    (
        "sgdschedulefree",
        "schedule-free optimizers are not implemented",
    ),
];

/// Reads typed values out of the parsed `--optimizer_args` and remembers which keys were used.
struct ArgReader<'a> {
    args: &'a [(String, Literal)],
    used: HashSet<&'static str>,
}

impl<'a> ArgReader<'a> {
    fn get(&mut self, key: &'static str) -> Option<&'a Literal> {
        self.used.insert(key);
        self.args
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    fn invalid(key: &str, expected: &str, v: &Literal) -> OptimError {
        OptimError::InvalidArg {
            key: key.into(),
            expected: expected.into(),
            found: v.repr(),
        }
    }

    fn f64(&mut self, key: &'static str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| Self::invalid(key, "a number", v)),
        }
    }

    fn non_negative(&mut self, key: &'static str, default: f64) -> Result<f64> {
        let x = self.f64(key, default)?;
        if x >= 0.0 {
            Ok(x)
        } else {
            Err(Self::invalid(key, "a number >= 0", &Literal::Float(x)))
        }
    }

    fn opt_f64(&mut self, key: &'static str, default: Option<f64>) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(default),
            Some(Literal::None) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::invalid(key, "a number or None", v)),
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Literal::Bool(b)) => Ok(*b),
            Some(v) => Err(Self::invalid(key, "True or False", v)),
        }
    }

    fn pair(&mut self, key: &'static str, default: (f64, f64)) -> Result<(f64, f64)> {
        match self.get(key) {
            None => Ok(default),
            Some(v @ (Literal::Tuple(items) | Literal::List(items))) if items.len() == 2 => {
                match (items[0].as_f64(), items[1].as_f64()) {
                    (Some(a), Some(b)) => Ok((a, b)),
                    _ => Err(Self::invalid(key, "two numbers", v)),
                }
            }
            Some(v) => Err(Self::invalid(key, "two numbers (a,b)", v)),
        }
    }

    fn beta_pair(&mut self, key: &'static str, default: (f64, f64)) -> Result<(f64, f64)> {
        let (a, b) = self.pair(key, default)?;
        if (0.0..1.0).contains(&a) && (0.0..1.0).contains(&b) {
            Ok((a, b))
        } else {
            Err(Self::invalid(
                key,
                "two numbers in [0, 1)",
                &Literal::Tuple(vec![Literal::Float(a), Literal::Float(b)]),
            ))
        }
    }

    /// A key accepted for compatibility whose only supported value is `ok`.
    fn fixed(&mut self, key: &'static str, ok: &[Literal], expected: &str) -> Result<()> {
        match self.get(key) {
            Some(v) if !ok.contains(v) => Err(Self::invalid(key, expected, v)),
            _ => Ok(()),
        }
    }

    /// A key with no effect here (implementation selection such as `foreach`).
    fn ignored(&mut self, key: &'static str) {
        if self.get(key).is_some() {
            tracing::warn!("--optimizer_args {key} has no effect in this port");
        }
    }

    fn finish(self, optimizer: &str) -> Result<()> {
        let mut unknown: Vec<String> = Vec::new();
        for (k, _) in self.args {
            if !self.used.contains(k.as_str()) && !unknown.contains(k) {
                unknown.push(k.clone());
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        let mut accepted: Vec<&str> = self.used.iter().copied().collect();
        accepted.sort_unstable();
        Err(OptimError::UnknownArgs {
            optimizer: optimizer.to_string(),
            keys: unknown,
            accepted: accepted.join(", "),
        })
    }
}

fn min_8bit_size(r: &mut ArgReader<'_>) -> Result<i64> {
    let bits = r.f64("optim_bits", 8.0)?;
    let size = r.f64("min_8bit_size", 4096.0)?;
    r.fixed(
        "percentile_clipping",
        &[Literal::Int(100)],
        "100 (clipping is not implemented)",
    )?;
    r.fixed("block_wise", &[Literal::Bool(true)], "True")?;
    r.fixed(
        "is_paged",
        &[Literal::Bool(false), Literal::Bool(true)],
        "True or False",
    )?;
    if bits == 32.0 {
        Ok(i64::MAX)
    } else if bits == 8.0 && size >= 0.0 && size.fract() == 0.0 {
        Ok(size as i64)
    } else if bits != 8.0 {
        Err(OptimError::InvalidArg {
            key: "optim_bits".into(),
            expected: "8 or 32".into(),
            found: py_float(bits),
        })
    } else {
        Err(OptimError::InvalidArg {
            key: "min_8bit_size".into(),
            expected: "a non-negative integer".into(),
            found: py_float(size),
        })
    }
}

/// The optimiser chosen by `--optimizer_type` / `--optimizer_args` (and the legacy flags),
/// validated, before any parameters exist.
#[derive(Debug, Clone)]
pub struct OptimizerConfig {
    /// The family.
    pub kind: OptimizerKind,
    /// Upstream `module.Class` recorded in `ss_optimizer` (the requested class, e.g.
    /// `bitsandbytes.optim.adamw.PagedAdamW8bit`, even when mapped onto another one here).
    pub class_name: String,
    /// The resolved hyper-parameters.
    pub params: OptimizerParams,
    /// The optimizer args after sd-scripts' additions (`momentum=0.9` for SGDNesterov,
    /// `relative_step=True` for Adafactor), in order; they make up the metadata suffix.
    pub args: Vec<(String, Literal)>,
    /// Warnings produced while resolving (also emitted through `tracing`).
    pub warnings: Vec<String>,
}

impl OptimizerConfig {
    /// Resolves sd-scripts' optimiser options (training.md §9): `optimizer_type` (case
    /// insensitive; None or "" = AdamW), the raw `--optimizer_args` items, and the legacy
    /// `--use_8bit_adam` (= AdamW8bit) / `--use_lion_optimizer` (= Lion), each exclusive with
    /// `--optimizer_type`.
    ///
    /// # Errors
    /// [`OptimError::ConflictingFlags`], [`OptimError::UnknownOptimizer`] (lists the supported
    /// names), [`OptimError::UnsupportedOptimizer`] (D-Adaptation, Prodigy, schedule-free,
    /// `module.Class` paths), [`OptimError::BadArg`], [`OptimError::UnknownArgs`] (names every
    /// unknown key), [`OptimError::InvalidArg`].
    pub fn from_cli(
        optimizer_type: Option<&str>,
        optimizer_args: &[String],
        use_8bit_adam: bool,
        use_lion_optimizer: bool,
    ) -> Result<Self> {
        let given = optimizer_type.unwrap_or("").trim();
        let name = if use_8bit_adam {
            if use_lion_optimizer {
                return Err(OptimError::ConflictingFlags(
                    "both --use_8bit_adam and --use_lion_optimizer are given".into(),
                ));
            }
            if !given.is_empty() {
                return Err(OptimError::ConflictingFlags(
                    "both --use_8bit_adam and --optimizer_type are given".into(),
                ));
            }
            "AdamW8bit"
        } else if use_lion_optimizer {
            if !given.is_empty() {
                return Err(OptimError::ConflictingFlags(
                    "both --use_lion_optimizer and --optimizer_type are given".into(),
                ));
            }
            "Lion"
        } else if given.is_empty() {
            "AdamW"
        } else {
            given
        };
        let lower = name.to_lowercase();
        let Some(&(_, kind, class_name, note)) = OPTIMIZERS.iter().find(|o| o.0 == lower) else {
            if let Some((_, reason)) = UNSUPPORTED.iter().find(|u| u.0 == lower) {
                return Err(OptimError::UnsupportedOptimizer {
                    name: name.to_string(),
                    reason: format!("{reason}; supported are {SUPPORTED_NAMES}"),
                });
            }
            if name.contains('.') {
                return Err(OptimError::UnsupportedOptimizer {
                    name: name.to_string(),
                    reason: format!(
                        "optimizer classes by module path are not supported; supported are {SUPPORTED_NAMES}"
                    ),
                });
            }
            return Err(OptimError::UnknownOptimizer {
                name: name.to_string(),
                supported: SUPPORTED_NAMES.to_string(),
            });
        };
        let mut warnings: Vec<String> = note
            .map(|n| format!("--optimizer_type {name}: {n}"))
            .into_iter()
            .collect();

        // sd-scripts builds a dict: a repeated key keeps its first position and its last value.
        let mut args: Vec<(String, Literal)> = Vec::new();
        for raw in optimizer_args {
            let (k, v) = parse_optimizer_arg(raw)?;
            if k == "lr" {
                return Err(OptimError::InvalidArg {
                    key: k,
                    expected: "no lr in --optimizer_args (use --learning_rate)".into(),
                    found: v.repr(),
                });
            }
            match args.iter_mut().find(|(ek, _)| *ek == k) {
                Some(slot) => slot.1 = v,
                None => args.push((k, v)),
            }
        }

        // sd-scripts' additions to the args dict (they show up in the metadata name).
        match kind {
            OptimizerKind::SgdNesterov if !args.iter().any(|(k, _)| k == "momentum") => {
                tracing::info!("SGD with Nesterov must be with momentum, set momentum to 0.9");
                args.push(("momentum".into(), Literal::Float(0.9)));
            }
            OptimizerKind::Adafactor => {
                let warmup_init = matches!(
                    args.iter().find(|(k, _)| k == "warmup_init"),
                    Some((_, Literal::Bool(true)))
                );
                match args.iter_mut().find(|(k, _)| k == "relative_step") {
                    None => args.push(("relative_step".into(), Literal::Bool(true))),
                    Some(slot) if slot.1 == Literal::Bool(false) && warmup_init => {
                        tracing::info!("set relative_step to True because warmup_init is True");
                        slot.1 = Literal::Bool(true);
                    }
                    Some(_) => {}
                }
            }
            _ => {}
        }
        let mut r = ArgReader {
            args: &args,
            used: HashSet::new(),
        };
        let short_class = class_name.rsplit('.').next().unwrap_or(class_name);
        let params = match kind {
            OptimizerKind::AdamW | OptimizerKind::AdamW8bit => {
                let d = AdamWParams::default();
                let adamw = AdamWParams {
                    betas: r.beta_pair("betas", d.betas)?,
                    eps: r.non_negative("eps", d.eps)?,
                    weight_decay: r.non_negative("weight_decay", d.weight_decay)?,
                };
                r.fixed(
                    "amsgrad",
                    &[Literal::Bool(false)],
                    "False (amsgrad is not implemented)",
                )?;
                if kind == OptimizerKind::AdamW8bit {
                    let min_8bit_size = min_8bit_size(&mut r)?;
                    OptimizerParams::AdamW8bit(AdamW8bitParams {
                        adamw,
                        min_8bit_size,
                    })
                } else {
                    r.fixed("maximize", &[Literal::Bool(false)], "False")?;
                    for k in ["foreach", "fused", "capturable", "differentiable"] {
                        r.ignored(k);
                    }
                    if class_name.starts_with("bitsandbytes") {
                        min_8bit_size(&mut r)?;
                    }
                    OptimizerParams::AdamW(adamw)
                }
            }
            OptimizerKind::Lion | OptimizerKind::Lion8bit => {
                let d = LionParams::default();
                let lion = LionParams {
                    betas: r.beta_pair("betas", d.betas)?,
                    weight_decay: r.non_negative("weight_decay", d.weight_decay)?,
                };
                if kind == OptimizerKind::Lion8bit {
                    let min_8bit_size = min_8bit_size(&mut r)?;
                    OptimizerParams::Lion8bit(Lion8bitParams {
                        lion,
                        min_8bit_size,
                    })
                } else {
                    r.ignored("use_triton");
                    OptimizerParams::Lion(lion)
                }
            }
            OptimizerKind::SgdNesterov => {
                let sgd = SgdParams {
                    momentum: r.non_negative("momentum", 0.9)?,
                    dampening: r.f64("dampening", 0.0)?,
                    weight_decay: r.non_negative("weight_decay", 0.0)?,
                    nesterov: true,
                };
                if sgd.momentum <= 0.0 || sgd.dampening != 0.0 {
                    return Err(OptimError::InvalidArg {
                        key: "momentum".into(),
                        expected: "momentum > 0 and dampening 0 (Nesterov momentum)".into(),
                        found: format!(
                            "momentum={}, dampening={}",
                            py_float(sgd.momentum),
                            py_float(sgd.dampening)
                        ),
                    });
                }
                if r.get("nesterov").is_some() {
                    return Err(OptimError::InvalidArg {
                        key: "nesterov".into(),
                        expected: "no nesterov in --optimizer_args (SGDNesterov sets it)".into(),
                        found: "a value".into(),
                    });
                }
                r.fixed("maximize", &[Literal::Bool(false)], "False")?;
                for k in ["foreach", "fused", "differentiable"] {
                    r.ignored(k);
                }
                if class_name.starts_with("bitsandbytes") {
                    min_8bit_size(&mut r)?;
                }
                OptimizerParams::Sgd(sgd)
            }
            OptimizerKind::Adafactor => {
                let d = AdafactorParams::default();
                let p = AdafactorParams {
                    eps: r.pair("eps", d.eps)?,
                    clip_threshold: r.f64("clip_threshold", d.clip_threshold)?,
                    decay_rate: r.f64("decay_rate", d.decay_rate)?,
                    beta1: r.opt_f64("beta1", d.beta1)?,
                    weight_decay: r.non_negative("weight_decay", d.weight_decay)?,
                    scale_parameter: r.bool("scale_parameter", d.scale_parameter)?,
                    relative_step: r.bool("relative_step", true)?,
                    warmup_init: r.bool("warmup_init", false)?,
                };
                if p.clip_threshold <= 0.0 {
                    return Err(OptimError::InvalidArg {
                        key: "clip_threshold".into(),
                        expected: "a number > 0".into(),
                        found: py_float(p.clip_threshold),
                    });
                }
                if p.relative_step {
                    warnings.push(
                        "Adafactor relative_step: --learning_rate is used as the initial lr of \
                         the adafactor scheduler; unet_lr and text_encoder_lr are ignored"
                            .into(),
                    );
                } else {
                    warnings.push(
                        "Adafactor without relative_step: constant_with_warmup and \
                         --max_grad_norm 0 are recommended"
                            .into(),
                    );
                }
                OptimizerParams::Adafactor(p)
            }
        };
        r.finish(short_class)?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok(Self {
            kind,
            class_name: class_name.to_string(),
            params,
            args,
            warnings,
        })
    }

    /// `ss_optimizer`: `"<module>.<Class>"` plus `"(k=v,k=v)"` when there are optimizer args
    /// (values as Python's `str()`), e.g. `torch.optim.adamw.AdamW(weight_decay=0.1)`.
    pub fn metadata_name(&self) -> String {
        if self.args.is_empty() {
            self.class_name.clone()
        } else {
            let args: Vec<String> = self.args.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}({})", self.class_name, args.join(","))
        }
    }

    /// True for Adafactor with `relative_step`: the optimiser computes its own lr, group lrs
    /// are dropped (unet_lr / text_encoder_lr ignored) and the scheduler is forced to
    /// [`super::SchedulerType::Adafactor`] with initial lr = `--learning_rate`.
    pub fn relative_step(&self) -> bool {
        matches!(self.params, OptimizerParams::Adafactor(p) if p.relative_step)
    }

    /// Builds the optimiser over `groups` (in the group order of training.md §7.5).
    pub fn build(&self, groups: Vec<ParamGroup>) -> Box<dyn Optimizer> {
        let name = self.metadata_name();
        match self.params {
            OptimizerParams::AdamW(p) => Box::new(Grouped::with_rule(p, groups, name)),
            OptimizerParams::Lion(p) => Box::new(Grouped::with_rule(p, groups, name)),
            OptimizerParams::Sgd(p) => Box::new(Grouped::with_rule(p, groups, name)),
            OptimizerParams::Adafactor(p) => Box::new(Grouped::with_rule(p, groups, name)),
            OptimizerParams::AdamW8bit(p) => {
                let mut o = AdamW8bit::new(groups, p);
                o.set_metadata_name(name);
                Box::new(o)
            }
            OptimizerParams::Lion8bit(p) => {
                let mut o = Lion8bit::new(groups, p);
                o.set_metadata_name(name);
                Box::new(o)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        assert_eq!(py_float(0.1), "0.1");
        assert_eq!(py_float(1e-8), "1e-08");
        assert_eq!(py_float(1.0), "1.0");
        assert_eq!(py_float(0.0001), "0.0001");
        assert_eq!(py_float(0.00001), "1e-05");
        assert_eq!(py_float(1e16), "1e+16");
        assert_eq!(py_float(123.5), "123.5");
        assert_eq!(py_float(-2.5e-30), "-2.5e-30");
    }

    #[test]
    fn literals() {
        let p = |s: &str| parse_optimizer_arg(s).map(|(_, v)| v);
        assert_eq!(p("a=3").ok(), Some(Literal::Int(3)));
        assert_eq!(p("a=-1e-3").ok(), Some(Literal::Float(-1e-3)));
        assert_eq!(p("a=True").ok(), Some(Literal::Bool(true)));
        assert_eq!(p("a=None").ok(), Some(Literal::None));
        assert_eq!(p("a='x y'").ok(), Some(Literal::Str("x y".into())));
        assert_eq!(
            p("a=0.9,0.999").ok(),
            Some(Literal::Tuple(vec![
                Literal::Float(0.9),
                Literal::Float(0.999)
            ]))
        );
        assert_eq!(
            p("a=(1e-30, 1e-3)").ok(),
            Some(Literal::Tuple(vec![
                Literal::Float(1e-30),
                Literal::Float(1e-3)
            ]))
        );
        assert_eq!(p("a=(5)").ok(), Some(Literal::Int(5)));
        assert_eq!(p("a=5,").ok(), Some(Literal::Tuple(vec![Literal::Int(5)])));
        assert_eq!(
            p("a=[1, 2]").ok(),
            Some(Literal::List(vec![Literal::Int(1), Literal::Int(2)]))
        );
        assert!(p("a=").is_err());
        assert!(p("a=abc").is_err());
        assert!(p("a=1=2").is_err());
        assert!(p("a=(1").is_err());
        assert!(p("a=1 2").is_err());
        assert_eq!(
            Literal::Tuple(vec![Literal::Float(0.9), Literal::Float(0.99)]).to_string(),
            "(0.9, 0.99)"
        );
    }
}
