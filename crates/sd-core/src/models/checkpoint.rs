//! Gradient checkpointing of model blocks (`--gradient_checkpointing`): a block's forward runs
//! inside one [`tch_ext::checkpoint`] node, so its activations are not kept for backward but
//! recomputed from the block input during backward (one extra forward per step, much less
//! memory). See docs/architecture.md, "Gradient checkpointing".
//!
//! A checkpoint node owns a closure that must hold its own handles of the block's weights, so
//! each checkpointed call runs on a *shallow copy* of the block (same tensors, same adapter
//! slots): the copies here cost one reference count per tensor.

use tch::Tensor;

use super::layers::{Conv2d, GroupNorm, LayerNorm, Linear};

/// Checkpointing switched on for a model: the trainable tensors its blocks may use (the LoRA
/// weights attached to the model's layers), passed to every checkpoint node so they get
/// gradients even when a block's input needs none.
pub struct Checkpointing {
    params: Vec<Tensor>,
}

impl std::fmt::Debug for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Checkpointing({} trainable tensors)", self.params.len())
    }
}

impl Checkpointing {
    /// Checkpointing with `params`: every trainable tensor the checkpointed blocks use besides
    /// their inputs (normally all LoRA weights of this component; tensors a block does not use
    /// simply get no gradient from it).
    pub fn new(params: Vec<Tensor>) -> Self {
        Self { params }
    }

    /// The trainable tensors passed to each node.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Runs `f(inputs)` as one checkpoint node and returns its single output.
    ///
    /// # Panics
    /// When `f` panics (a bug in the block's forward, as without checkpointing).
    pub fn run<F>(&self, f: F, inputs: &[&Tensor]) -> Tensor
    where
        F: Fn(&[Tensor]) -> Tensor + Send + 'static,
    {
        let mut out = tch_ext::checkpoint(move |i| vec![f(i)], inputs, &self.params)
            .unwrap_or_else(|e| panic!("{e}"));
        out.pop()
            .expect("the checkpointed closure returns one tensor")
    }
}

fn opt(t: &Option<Tensor>) -> Option<Tensor> {
    t.as_ref().map(Tensor::shallow_clone)
}

/// A shallow copy of a Linear (same weight tensors and adapter slot).
pub(crate) fn copy_linear(l: &Linear) -> Linear {
    Linear {
        weight: l.weight.shallow_clone(),
        bias: opt(&l.bias),
        adapters: l.adapters.clone(),
    }
}

/// A shallow copy of a Conv2d.
pub(crate) fn copy_conv(c: &Conv2d) -> Conv2d {
    Conv2d {
        weight: c.weight.shallow_clone(),
        bias: opt(&c.bias),
        stride: c.stride,
        padding: c.padding,
        adapters: c.adapters.clone(),
    }
}

/// A shallow copy of a GroupNorm.
pub(crate) fn copy_group_norm(g: &GroupNorm) -> GroupNorm {
    GroupNorm {
        weight: g.weight.shallow_clone(),
        bias: g.bias.shallow_clone(),
        groups: g.groups,
        eps: g.eps,
    }
}

/// A shallow copy of a LayerNorm.
pub(crate) fn copy_layer_norm(n: &LayerNorm) -> LayerNorm {
    LayerNorm {
        weight: n.weight.shallow_clone(),
        bias: n.bias.shallow_clone(),
        eps: n.eps,
    }
}
