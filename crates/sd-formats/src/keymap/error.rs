//! Errors of the key tables, family detection and Diffusers folder reading.

use std::path::PathBuf;

/// Result of the key-table, family and Diffusers-folder functions.
pub type Result<T> = std::result::Result<T, KeyMapError>;

/// Error of the key tables ([`crate::keymap`]), family detection ([`crate::family`]) and
/// Diffusers folders ([`crate::diffusers`]).
///
/// `path` fields name the file, folder or input description the keys came from (as given by the
/// caller).
#[derive(Debug, thiserror::Error)]
pub enum KeyMapError {
    /// Keys that no table entry maps (and that are not known ignorable extras).
    #[error("{} unmapped key(s) in {path}: {}", keys.len(), preview(keys))]
    UnmappedKeys {
        /// Input the keys came from.
        path: String,
        /// The unmapped keys, sorted.
        keys: Vec<String>,
    },
    /// Keys the table requires for the detected structure but the input lacks.
    #[error("{} missing key(s) in {path}: {}", keys.len(), preview(keys))]
    MissingKeys {
        /// Input the keys should be in.
        path: String,
        /// The missing keys, sorted.
        keys: Vec<String>,
    },
    /// A tensor whose shape does not fit its table entry.
    #[error("shape mismatch for key {key:?} in {path}: expected {expected}, found {found:?}")]
    ShapeMismatch {
        /// Input the key came from.
        path: String,
        /// The offending key.
        key: String,
        /// What the entry needs, in words (e.g. `[c, c, 1, 1] or [c, c]`).
        expected: String,
        /// The shape found.
        found: Vec<usize>,
    },
    /// The keys do not look like SD1, SD2 or SDXL.
    #[error("cannot tell the model family of {path}: {reason}")]
    UnknownFamily {
        /// Input that was inspected.
        path: String,
        /// What was looked for.
        reason: String,
    },
    /// The keys do not form a structure the tables can describe.
    #[error("unexpected model structure in {path}: {message}")]
    Structure {
        /// Input that was inspected.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Reading a file or folder failed.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// File or folder.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is not valid JSON.
    #[error("invalid JSON in {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A folder is not a Diffusers model folder.
    #[error("{} is not a Diffusers model folder: model_index.json not found", dir.display())]
    MissingModelIndex {
        /// The folder.
        dir: PathBuf,
    },
    /// A Diffusers component is absent from `model_index.json` or its folder is missing.
    #[error("Diffusers model {} has no {component} component: {reason}", dir.display())]
    MissingComponent {
        /// The model folder.
        dir: PathBuf,
        /// Component name.
        component: String,
        /// What was missing.
        reason: String,
    },
    /// A component folder holds no weight file of a known name.
    #[error("no weight file in {}: tried {}", dir.display(), tried.join(", "))]
    MissingWeights {
        /// The component folder.
        dir: PathBuf,
        /// File names tried, in order.
        tried: Vec<String>,
    },
    /// A config field is missing or has the wrong type.
    #[error("config field {field:?} in {}: expected {expected}", path.display())]
    ConfigField {
        /// The config file.
        path: PathBuf,
        /// Field name.
        field: String,
        /// What was expected.
        expected: String,
    },
}

/// At most 10 keys, then a count, so a message for thousands of keys stays readable.
fn preview(keys: &[String]) -> String {
    const MAX: usize = 10;
    let mut s = keys
        .iter()
        .take(MAX)
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > MAX {
        s.push_str(&format!(", ... and {} more", keys.len() - MAX));
    }
    s
}
