//! LoRA networks (kohya-ss sd-scripts `networks/lora.py` compatible), model-independent part.
//!
//! - [`names`]: which layers get a LoRA module and how it is named (a pure function over a
//!   component's layer list), block indices.
//! - [`module`]: one module's tensors and maths (init, forward delta with dropouts, ΔW).
//! - [`file`]: loading LoRA files of every supported spelling into kohya names, saving kohya
//!   safetensors with `sshs_*` hashes and modelspec metadata.
//! - [`convert`]: other trainers' key spellings (Diffusers/PEFT, ComfyUI) to kohya names.
//!
//! Hooking modules into model layers lives with the models; this module only works on names,
//! layer lists and tensors.
//!
//! # Source
//! `../shared/spec/lora-format.md` (§2 keys, §3 maths, §4 selection, §5 block indices, §9
//! metadata, §10 other formats). Documentation: `docs/lora.md`.

pub mod blockwise;
pub mod convert;
pub mod dylora;
pub mod file;
pub mod metadata;
pub mod module;
pub mod names;
pub mod network;

use std::path::PathBuf;

pub use file::{AlphaDtype, LoadOptions, LoraTensors, LoraWeights, SaveOptions, SaveReport};
pub use module::{Dropouts, LoraModule};
pub use names::{
    Container, Layer, LayerKind, ModuleKind, ModuleSpec, NetworkOptions, select_modules,
};
pub use network::{ApplyReport, ComponentLayers, LoraNetwork};

/// Result of the LoRA functions.
pub type Result<T> = std::result::Result<T, LoraError>;

/// Errors of LoRA module selection, loading and saving.
///
/// `path` fields name the file (or the input description) concerned.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Tensor file I/O failed (open, parse, write).
    #[error(transparent)]
    Format(#[from] sd_formats::error::Error),
    /// Key tables could not be built for the layer list.
    #[error(transparent)]
    KeyMap(#[from] sd_formats::keymap::KeyMapError),
    /// The file uses a LoRA algorithm this project does not implement.
    #[error(
        "{}: unsupported LoRA algorithm keys ({}); only plain LoRA/LoCon (lora_down, lora_up, alpha) is supported: {}",
        path.display(), algorithms.join(", "), preview(keys)
    )]
    UnsupportedAlgorithm {
        /// The file.
        path: PathBuf,
        /// Algorithm names detected (`LoHa`, `LoKr`, `Tucker lora_mid`, `DoRA`, …).
        algorithms: Vec<String>,
        /// The offending keys, sorted.
        keys: Vec<String>,
    },
    /// A module lacks its down or up weight.
    #[error("{}: module \"{module}\" has no {part} weight", path.display())]
    MissingPart {
        /// The file.
        path: PathBuf,
        /// Module name as written in the file.
        module: String,
        /// `"down"` or `"up"`.
        part: &'static str,
    },
    /// Keys that belong to no LoRA module, or module names that map to no known layer.
    #[error("{}: {} {what}: {}", path.display(), keys.len(), preview(keys))]
    Unmapped {
        /// The file.
        path: PathBuf,
        /// What kind of leftovers (`"keys are no LoRA keys"`, `"module names match no layer"`).
        what: &'static str,
        /// The keys or names, sorted.
        keys: Vec<String>,
    },
    /// Two spellings in one file map to the same kohya module.
    #[error("{}: \"{first}\" and \"{second}\" are the same module \"{module}\"", path.display())]
    DuplicateModule {
        /// The file.
        path: PathBuf,
        /// The kohya name.
        module: String,
        /// First key spelling.
        first: String,
        /// Second key spelling.
        second: String,
    },
    /// A tensor has a shape that does not fit its role.
    #[error("{}: shape mismatch for key \"{key}\": expected {expected}, found {found:?}", path.display())]
    ShapeMismatch {
        /// The file (or `<memory>`).
        path: PathBuf,
        /// Tensor key or module name.
        key: String,
        /// What was expected, in words.
        expected: String,
        /// Shape found.
        found: Vec<i64>,
    },
    /// A tensor has a dtype that cannot hold LoRA weights (e.g. an integer down weight).
    #[error("{}: unsupported dtype {dtype} for key \"{key}\": expected {expected}", path.display())]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// Tensor key.
        key: String,
        /// Dtype found.
        dtype: String,
        /// What is accepted.
        expected: &'static str,
    },
    /// A layer list or option that module selection cannot work with.
    #[error("invalid LoRA network input: {0}")]
    Invalid(String),
}

pub(crate) fn preview(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(8).map(String::as_str).collect();
    let more = if keys.len() > 8 {
        format!(", … ({} more)", keys.len() - 8)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}
