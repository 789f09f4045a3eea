//! Merging LoRAs into checkpoints, LoRA + LoRA merges, SVD re-approximation and extraction
//! (sd-scripts `networks/merge_lora.py`, `sdxl_merge_lora.py`, `svd_merge_lora.py`,
//! `extract_lora_from_models.py`).
//!
//! - [`targets`]: LoRA module name → single-file key and row block, from the key tables.
//! - [`checkpoint`]: ΔW into a single-file checkpoint, streamed key by key from the mmap'd
//!   input, untouched keys copied byte for byte.
//! - [`source`]: the checkpoint read by a merge, a single file or a Diffusers folder under
//!   single-file keys.
//! - [`lora_lora`]: LoRA + LoRA (exact by default, the reference's arithmetic on request).
//! - [`svd`]: truncated SVD with the reference's quantile clamp; svd-merge; extraction.
//! - [`torch_save`]: a streaming writer of PyTorch zip checkpoints (`.ckpt`/`.pt` output).
//! - [`stream`]: a safetensors writer that asks for each tensor's bytes only when it writes
//!   it, so peak memory stays near one tensor plus the mapped inputs.
//!
//! Libraries never print: every function reports through `tracing` and its return value.
//!
//! # Source
//! `../shared/spec/tools.md` §0–§4, `../shared/spec/lora-format.md` §3 (ΔW), §8 (key tables).

pub mod checkpoint;
pub mod extract;
pub mod lora_lora;
pub mod source;
pub mod stream;
pub mod svd;
pub mod targets;
pub mod torch_save;

use std::path::PathBuf;

/// Result of the merge functions.
pub type Result<T> = std::result::Result<T, MergeError>;

/// Errors of the merge, SVD-merge and extraction functions.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Tensor file I/O failed.
    #[error(transparent)]
    Format(#[from] sd_formats::error::Error),
    /// Key tables could not be built for a checkpoint.
    #[error(transparent)]
    KeyMap(#[from] sd_formats::keymap::KeyMapError),
    /// A LoRA could not be loaded or named.
    #[error(transparent)]
    Lora(#[from] crate::lora::LoraError),
    /// A libtorch operation failed (e.g. an SVD that did not converge).
    #[error("{what}: {source}")]
    Torch {
        /// What was being computed.
        what: String,
        /// libtorch's error.
        source: tch::TchError,
    },
    /// Inputs that cannot be merged (family mismatch, shapes, ranks, non-finite values,
    /// nothing matched), with a message naming files and modules.
    #[error("{0}")]
    Invalid(String),
    /// A tensor shape does not fit its target.
    #[error("{}: shape mismatch for \"{key}\": expected {expected}, found {found:?}", path.display())]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// Module or key.
        key: String,
        /// What was expected, in words.
        expected: String,
        /// Shape found.
        found: Vec<i64>,
    },
    /// Output I/O failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`write`, `rename`).
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

pub(crate) fn preview(items: &[String], n: usize) -> String {
    let shown: Vec<&str> = items.iter().take(n).map(String::as_str).collect();
    let more = if items.len() > n {
        format!(", … ({} more)", items.len() - n)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

/// modelspec title of an input (spec tools §0.4): its `modelspec.title` metadata when present,
/// else the file stem.
pub fn input_title(
    path: &std::path::Path,
    metadata: &std::collections::BTreeMap<String, String>,
) -> String {
    metadata.get("modelspec.title").cloned().unwrap_or_else(|| {
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

/// Whether `output` names the same file as `input` (after resolving links and `..`); an
/// output that does not exist yet is compared through its resolved parent directory.
pub fn is_same_file(output: &std::path::Path, input: &std::path::Path) -> bool {
    let Ok(input) = std::fs::canonicalize(input) else {
        return false;
    };
    if let Ok(o) = std::fs::canonicalize(output) {
        return o == input;
    }
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    match (std::fs::canonicalize(parent), output.file_name()) {
        (Ok(p), Some(n)) => p.join(n) == input,
        _ => false,
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
///
/// # Errors
/// [`MergeError::Invalid`] for other names and for CUDA when libtorch sees no GPU.
pub fn parse_device(name: &str) -> Result<tch::Device> {
    let d = match name.trim().to_ascii_lowercase().as_str() {
        "cpu" => return Ok(tch::Device::Cpu),
        "cuda" | "gpu" => 0,
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => {
                return Err(MergeError::Invalid(format!(
                    "unknown device \"{name}\": expected cpu, cuda or cuda:N"
                )));
            }
        },
    };
    if !tch::Cuda::is_available() || d >= tch::Cuda::device_count().max(0) as usize {
        return Err(MergeError::Invalid(format!(
            "device \"{name}\" requested but libtorch sees {} CUDA device(s)",
            tch::Cuda::device_count()
        )));
    }
    Ok(tch::Device::Cuda(d))
}

/// The current time as modelspec's `YYYY-MM-DDTHH:MM:SS` (UTC).
pub fn now_iso() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    sd_formats::metadata::iso_date_utc(secs)
}
