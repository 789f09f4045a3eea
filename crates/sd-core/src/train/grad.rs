//! Gradient post-processing before the optimiser step: clipping by global norm
//! (`--max_grad_norm`) and the fp16 dynamic loss scaler.
//!
//! Order at a synchronisation point (training.md §6.7, Accelerate's order):
//! `scaler.unscale(params)` → `clip_grad_norm(params, max_grad_norm)` → if no inf/NaN was
//! found: optimiser step and scheduler step → `scaler.update(found_inf)` → zero the gradients.
//!
//! # Source
//! PyTorch `torch.nn.utils.clip_grad_norm_` and `torch.amp.GradScaler` (`unscale_`, `update`).

use tch::{Device, Kind, Tensor};

use super::{OptimError, Result};

/// Clips the gradients of `params` in place to a global L2 norm of at most `max_norm`
/// (PyTorch `clip_grad_norm_`): total = ‖(‖g₁‖, ‖g₂‖, …)‖₂, every gradient is multiplied by
/// min(1, max_norm / (total + 1e-6)). Parameters without a gradient are ignored. Returns the
/// total norm before clipping (0 when no parameter has a gradient; inf/NaN propagate).
pub fn clip_grad_norm<'a>(params: impl IntoIterator<Item = &'a Tensor>, max_norm: f64) -> f64 {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .into_iter()
        .map(Tensor::grad)
        .filter(Tensor::defined)
        .collect();
    if grads.is_empty() {
        return 0.0;
    }
    let norms: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_kind(Kind::Float).norm())
        .collect();
    let total = Tensor::stack(&norms, 0).norm();
    let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
    for g in &grads {
        let mut g = g.shallow_clone();
        let _ = g.g_mul_(&coef.to_kind(g.kind()));
    }
    total.double_value(&[])
}

/// The fp16 dynamic loss scaler (PyTorch `GradScaler` defaults: initial scale 2¹⁶, growth ×2
/// after 2000 steps without inf/NaN, back-off ×0.5 on inf/NaN).
#[derive(Debug)]
pub struct GradScaler {
    /// f32 [1] on the device.
    scale: Tensor,
    /// i32 [1]: consecutive steps without inf/NaN.
    growth_tracker: Tensor,
    growth_factor: f64,
    backoff_factor: f64,
    growth_interval: i64,
    /// Result of the unscale in the current step, if it was done.
    unscaled: Option<bool>,
}

impl GradScaler {
    /// A scaler on `device` with PyTorch's defaults.
    pub fn new(device: Device) -> Self {
        Self::with_options(device, 65536.0, 2.0, 0.5, 2000)
    }

    /// A scaler with explicit initial scale, growth / back-off factors and growth interval.
    pub fn with_options(
        device: Device,
        init_scale: f64,
        growth_factor: f64,
        backoff_factor: f64,
        growth_interval: i64,
    ) -> Self {
        Self {
            scale: Tensor::full([1], init_scale, (Kind::Float, device)),
            growth_tracker: Tensor::zeros([1], (Kind::Int, device)),
            growth_factor,
            backoff_factor,
            growth_interval,
            unscaled: None,
        }
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.scale.double_value(&[0])
    }

    /// `loss × scale` (backward this instead of the loss); the scale stays f32, so an fp16
    /// loss gives an f32 product (2¹⁶ is not representable in fp16).
    pub fn scale_loss(&self, loss: &Tensor) -> Tensor {
        loss * self.scale.to_device(loss.device()).squeeze()
    }

    /// Divides every gradient by the scale in place and reports whether any was inf/NaN
    /// (`_amp_foreach_non_finite_check_and_unscale_`). Done once per step: a second call before
    /// [`GradScaler::update`] returns the first result without unscaling again.
    pub fn unscale<'a>(&mut self, params: impl IntoIterator<Item = &'a Tensor>) -> bool {
        if let Some(found) = self.unscaled {
            return found;
        }
        let _guard = tch::no_grad_guard();
        let inv_scale = self
            .scale
            .to_kind(Kind::Double)
            .reciprocal()
            .to_kind(Kind::Float);
        let mut found_inf = Tensor::zeros([1], (Kind::Float, self.scale.device()));
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                g.internal_amp_non_finite_check_and_unscale(&mut found_inf, &inv_scale);
            }
        }
        let found = found_inf.double_value(&[0]) != 0.0;
        self.unscaled = Some(found);
        found
    }

    /// Updates the scale after a step (`_amp_update_scale_`): × backoff when `found_inf`, else
    /// × growth once `growth_interval` clean steps have accumulated.
    pub fn update(&mut self, found_inf: bool) {
        let found = Tensor::full(
            [1],
            if found_inf { 1.0 } else { 0.0 },
            (Kind::Float, self.scale.device()),
        );
        let _ = self.scale.internal_amp_update_scale_(
            &self.growth_tracker,
            &found,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        );
        self.unscaled = None;
    }

    /// State for the training-state file: `scale` (f32 [1]) and `growth_tracker` (i32 [1]).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            ("scale".into(), self.scale.copy()),
            ("growth_tracker".into(), self.growth_tracker.copy()),
        ]
    }

    /// Restores [`GradScaler::state_tensors`].
    ///
    /// # Errors
    /// [`OptimError::StateMissing`] / [`OptimError::StateMismatch`] for a missing key or a
    /// tensor that is not f32 [1] / i32 [1].
    pub fn load_state_tensors(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        let get = |key: &str, kind: Kind| -> Result<Tensor> {
            let (_, t) = named
                .iter()
                .find(|(k, _)| k == key)
                .ok_or_else(|| OptimError::StateMissing { key: key.into() })?;
            if t.size() != [1] || t.kind() != kind {
                return Err(OptimError::StateMismatch {
                    key: key.into(),
                    expected: format!("[1] {kind:?}"),
                    found: format!("{:?} {:?}", t.size(), t.kind()),
                });
            }
            Ok(t.to_device(self.scale.device()).copy())
        };
        let scale = get("scale", Kind::Float)?;
        let tracker = get("growth_tracker", Kind::Int)?;
        self.scale = scale;
        self.growth_tracker = tracker;
        self.unscaled = None;
        Ok(())
    }
}
