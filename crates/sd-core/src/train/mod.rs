//! Training building blocks that act on the trainable parameters: optimisers (AdamW, 8-bit
//! AdamW, Lion, 8-bit Lion, SGD with Nesterov momentum, Adafactor), their construction from
//! sd-scripts' `--optimizer_type` / `--optimizer_args`, learning-rate schedulers, gradient
//! clipping and the fp16 gradient scaler.
//!
//! The optimisers work on a list of [`ParamGroup`]s of `tch::Tensor` leaves with
//! `requires_grad` (the LoRA `lora_up` / `lora_down` weights), keep their state in f32 on the
//! parameters' device, and export that state as named tensors for the training-state file
//! (training.md §11.4). Nothing here knows about models or the training loop.
//!
//! # Source
//! training.md §6.7 (backward, accumulation, clipping, loss scaling), §7.5 (parameter groups),
//! §9 (optimisers), §10 (LR schedulers), §11.4 (training state).

pub mod grad;
pub mod latent_cache;
pub mod lr_scheduler;
pub mod memory;
pub mod optim;
pub mod optim8bit;
pub mod sdxl;
pub mod state_file;
pub mod tensorboard;
pub mod trainer;

pub use grad::{GradScaler, clip_grad_norm};
pub use lr_scheduler::{LrScheduler, SchedulerConfig, SchedulerType, StepsSpec};
pub use optim::{
    Adafactor, AdafactorParams, AdamW, AdamWParams, Lion, LionParams, Literal, Optimizer,
    OptimizerConfig, OptimizerKind, OptimizerParams, ParamGroup, SgdNesterov, SgdParams,
    parse_optimizer_arg,
};
pub use optim8bit::{AdamW8bit, AdamW8bitParams, DynamicMap, Lion8bit, Lion8bitParams};

/// Errors from building or running an optimiser or LR scheduler, or restoring their state.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// `--optimizer_type` names no optimiser known to this port.
    #[error("unknown optimizer type \"{name}\": supported are {supported}")]
    UnknownOptimizer {
        /// The name as given.
        name: String,
        /// Comma-separated list of the supported names.
        supported: String,
    },
    /// `--optimizer_type` names an sd-scripts optimiser this port does not implement.
    #[error("unsupported optimizer type \"{name}\": {reason}")]
    UnsupportedOptimizer {
        /// The name as given.
        name: String,
        /// Why, and what to use instead.
        reason: String,
    },
    /// Mutually exclusive optimiser flags were combined.
    #[error("conflicting optimizer options: {0}")]
    ConflictingFlags(String),
    /// One `--optimizer_args` item could not be parsed.
    #[error("bad --optimizer_args item \"{arg}\": {reason}")]
    BadArg {
        /// The item as given (`key=value`).
        arg: String,
        /// What was expected.
        reason: String,
    },
    /// `--optimizer_args` keys the chosen optimiser does not take.
    #[error("unknown --optimizer_args for {optimizer}: {keys:?} (accepted: {accepted})")]
    UnknownArgs {
        /// The optimiser class.
        optimizer: String,
        /// The offending keys.
        keys: Vec<String>,
        /// The accepted keys, comma-separated.
        accepted: String,
    },
    /// An `--optimizer_args` value has the wrong type or an invalid value.
    #[error("invalid --optimizer_args value for \"{key}\": expected {expected}, found {found}")]
    InvalidArg {
        /// The key.
        key: String,
        /// What was expected.
        expected: String,
        /// The value given (Python literal syntax).
        found: String,
    },
    /// `--lr_scheduler` names no scheduler known to this port.
    #[error("unknown lr scheduler \"{name}\": supported are {supported}")]
    UnknownScheduler {
        /// The name as given.
        name: String,
        /// Comma-separated list of the supported names.
        supported: String,
    },
    /// A scheduler option is invalid (warm-up with `constant`, bad step count, ...).
    #[error("invalid lr scheduler option {option}: {reason}")]
    SchedulerOption {
        /// The option (`--lr_warmup_steps`, ...).
        option: String,
        /// What is wrong.
        reason: String,
    },
    /// `step` was given a different number of learning rates than there are groups.
    #[error(
        "optimizer step needs one learning rate per parameter group: expected {expected}, found {found}"
    )]
    LrCount {
        /// Number of groups.
        expected: usize,
        /// Number of lrs given.
        found: usize,
    },
    /// A state tensor needed to restore an optimiser is missing.
    #[error("optimizer state is missing key \"{key}\"")]
    StateMissing {
        /// The key.
        key: String,
    },
    /// A restored state tensor has the wrong shape or dtype.
    #[error("optimizer state key \"{key}\": expected {expected}, found {found}")]
    StateMismatch {
        /// The key.
        key: String,
        /// Expected shape and dtype.
        expected: String,
        /// Found shape and dtype.
        found: String,
    },
    /// A restored state holds keys that belong to no parameter of this optimiser.
    #[error("optimizer state has keys for no parameter of this optimizer: {keys:?}")]
    StateUnused {
        /// The unused keys (at most 10).
        keys: Vec<String>,
    },
    /// A libtorch call failed.
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, OptimError>;
