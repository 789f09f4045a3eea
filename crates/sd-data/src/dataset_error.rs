//! The error type of the training-data side of sd-data (dataset TOML, scan, buckets, image
//! preparation). Every variant names the file (or command-line option) and, for TOML, the
//! table and key it is about.
//!
//! Kept apart from [`crate::Error`] (the `resize-images` error) so both can grow
//! independently; an integrator may merge them.

use std::fmt;
use std::path::PathBuf;

/// Result alias for the dataset modules.
pub type DatasetResult<T> = std::result::Result<T, DatasetError>;

/// One problem found while scanning a dataset: the file and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    /// The image, caption, folder or metadata file concerned.
    pub path: PathBuf,
    /// What is wrong, lower case, e.g. `caption file is empty (0 lines)`.
    pub reason: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path.display(), self.reason)
    }
}

/// What can go wrong when reading a dataset description, scanning it or preparing images.
/// Messages are lower case and say expected vs found.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// Reading or listing a file or folder failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "listing", …).
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// The dataset TOML is not valid TOML.
    #[error("{}: invalid TOML: {message}", path.display())]
    TomlSyntax {
        /// The TOML file.
        path: PathBuf,
        /// The parser's message (with line and column).
        message: String,
    },
    /// A key that the table does not allow (sd-scripts: "extra keys not allowed").
    #[error("{}: unknown key \"{key}\" in {table}{}", path.display(), paren(.allowed_elsewhere))]
    UnknownKey {
        /// The TOML file.
        path: PathBuf,
        /// The table, e.g. `[general]`, `[[datasets]] #1`, `[[datasets.subsets]] #1.2`.
        table: String,
        /// The key.
        key: String,
        /// Where the key would be allowed, when it is a known key in the wrong table.
        allowed_elsewhere: Option<String>,
    },
    /// A key with a value of the wrong TOML type.
    #[error("{}: key \"{key}\" in {table}: expected {expected}, found {found}", path.display())]
    WrongType {
        /// The TOML file.
        path: PathBuf,
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// The expected type, e.g. `a float (write 1.0, not 1)`.
        expected: String,
        /// The TOML type found, e.g. `integer`.
        found: String,
    },
    /// A key whose value has the right type but is out of range or inconsistent.
    #[error("{}: key \"{key}\" in {table}: {reason}", path.display())]
    InvalidValue {
        /// The TOML file, or `<command line>` for options.
        path: PathBuf,
        /// The table (or `options`).
        table: String,
        /// The key or option name.
        key: String,
        /// Expected vs found.
        reason: String,
    },
    /// A required key is missing after value resolution.
    #[error("{}: {table}: missing required key \"{key}\"{}", path.display(), paren(.hint))]
    MissingKey {
        /// The TOML file, or `<command line>`.
        path: PathBuf,
        /// The table.
        table: String,
        /// The key.
        key: String,
        /// How to provide it.
        hint: Option<String>,
    },
    /// A dataset mixes fine-tuning subsets (with `metadata_file`) and DreamBooth subsets.
    #[error("{}: {table}: subsets with and without metadata_file cannot be mixed in one dataset", path.display())]
    MixedDatasetKinds {
        /// The TOML file.
        path: PathBuf,
        /// The dataset table.
        table: String,
    },
    /// An option whose behaviour this port does not implement (it would change results).
    #[error("{option} is unsupported: {reason}")]
    Unsupported {
        /// The option or key, e.g. `--face_crop_aug_range`.
        option: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// Scanning found problems with images or captions; all of them are listed.
    #[error("{} problem(s) in the dataset:\n{}", issues.len(), list_issues(issues))]
    Scan {
        /// Every problem found, in scan order.
        issues: Vec<Issue>,
    },
    /// A fine-tuning metadata file is malformed.
    #[error("{}: {reason}", path.display())]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// Expected vs found.
        reason: String,
    },
    /// An image could not be decoded.
    #[error("cannot decode image {}: {source}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// An image cannot be used as asked (too small for its bucket, zero-sized bucket…).
    #[error("{}: {reason}", path.display())]
    InvalidImage {
        /// The image file.
        path: PathBuf,
        /// Expected vs found.
        reason: String,
    },
    /// The resampler refused the buffers (a bug rather than bad input; kept as an error).
    #[error("cannot resize {}: {message}", path.display())]
    Resize {
        /// The image file.
        path: PathBuf,
        /// The resampler's message.
        message: String,
    },
}

fn paren(h: &Option<String>) -> String {
    h.as_ref().map(|h| format!(" ({h})")).unwrap_or_default()
}

fn list_issues(issues: &[Issue]) -> String {
    issues
        .iter()
        .map(|i| format!("  {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `map_err` helper for I/O errors: `.map_err(io_err("reading", path))`.
pub(crate) fn io_err(
    action: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> DatasetError {
    let path = path.to_path_buf();
    move |source| DatasetError::Io {
        action,
        path,
        source,
    }
}
