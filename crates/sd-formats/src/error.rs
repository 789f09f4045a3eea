//! The error type of tensor file I/O (safetensors, PyTorch checkpoints, dtypes).
//!
//! Every variant names the file (and the tensor key where there is one) and says what was
//! expected and what was found. Messages are lower case without a final period.

use std::path::{Path, PathBuf};

/// Errors of reading and writing tensor files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error while opening, mapping, reading or writing `path`.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// File concerned.
        path: PathBuf,
        /// What was being done ("open", "map", "write", ...).
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A directory was given where a tensor file was expected.
    #[error(
        "{} is a directory, not a tensor file (a Diffusers model folder is loaded as a model folder, not as one tensor file; pass a .safetensors or .ckpt file here)",
        path.display()
    )]
    IsDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// The file has zero bytes.
    #[error("{} is empty (0 bytes): expected a safetensors file or a PyTorch checkpoint", path.display())]
    EmptyFile {
        /// The empty file.
        path: PathBuf,
    },
    /// The content is neither safetensors nor a PyTorch checkpoint.
    #[error(
        "{} is not a tensor file: expected a safetensors header or a PyTorch checkpoint (zip or pickle), found {found}",
        path.display()
    )]
    NotATensorFile {
        /// The file.
        path: PathBuf,
        /// A short description of what the first bytes look like.
        found: String,
    },
    /// The file ends before the data its header announces.
    #[error("{} is truncated: expected at least {expected} bytes ({what}), found {found}", path.display())]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What needed the bytes ("the 8-byte header length", "the header", "the data of ...").
        what: String,
        /// Bytes required.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// A safetensors header longer than [`crate::safetensors::HEADER_LIMIT`] (read side).
    #[error(
        "{}: header of {size} bytes is over the {limit}-byte limit of safetensors readers (not a corrupt file: the metadata is too large)",
        path.display()
    )]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// Header length found in the first 8 bytes.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Writing would produce a header over the limit; nothing was written.
    #[error(
        "{}: the safetensors header would be {size} bytes, over the {limit}-byte limit of safetensors readers; nothing was written (trim the metadata, e.g. ss_tag_frequency)",
        path.display()
    )]
    HeaderTooLargeToWrite {
        /// The destination.
        path: PathBuf,
        /// Header length that would have been written.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The safetensors header is not the JSON object the format prescribes.
    #[error("{}: invalid safetensors header: {reason}", path.display())]
    InvalidHeader {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor's `data_offsets` are out of range, overlap another tensor or leave a gap.
    #[error("{}: bad data offsets for key \"{key}\": {reason}", path.display())]
    BadOffsets {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Expected vs found.
        reason: String,
    },
    /// A dtype this crate does not handle (e.g. `F8_E4M3`, `U16`) or an unknown dtype string.
    #[error(
        "unsupported dtype \"{dtype}\" for key \"{key}\" in {} (supported: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL)",
        path.display()
    )]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// The dtype as written in the file.
        dtype: String,
    },
    /// Byte length of a tensor differs from `product(shape) * element size`.
    #[error(
        "byte length mismatch for key \"{key}\" in {}: expected {expected} bytes (shape {shape:?} of {dtype}), found {found}",
        path.display()
    )]
    LengthMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// Shape of the tensor.
        shape: Vec<usize>,
        /// Dtype name of the tensor.
        dtype: String,
        /// `product(shape) * element size`.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// The key is not in the file.
    #[error("key \"{key}\" not found in {}", path.display())]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key asked for.
        key: String,
    },
    /// The same tensor name twice in one write.
    #[error("duplicate key \"{key}\" for {}", path.display())]
    DuplicateKey {
        /// The destination.
        path: PathBuf,
        /// The repeated key.
        key: String,
    },
    /// The zip container of a PyTorch checkpoint is unusable.
    #[error("{}: invalid PyTorch checkpoint: {reason}", path.display())]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The pickle inside a checkpoint cannot be read.
    #[error("{}: unreadable pickle at byte {offset}: {reason}", path.display())]
    Pickle {
        /// The file.
        path: PathBuf,
        /// Byte offset in the pickle stream.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A checkpoint whose pickle holds no tensors.
    #[error("no tensors found in {}; it holds {found}", path.display())]
    NoTensors {
        /// The file.
        path: PathBuf,
        /// What was found instead (e.g. "a call to posix.system").
        found: String,
    },
    /// A feature of the format this reader does not implement.
    #[error("{}: {what} is not supported", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature.
        what: String,
    },
    /// A written file did not read back as written; the destination was left untouched.
    #[error("{}: written file does not read back as written ({reason}); destination left untouched", path.display())]
    WriteVerify {
        /// The destination.
        path: PathBuf,
        /// The first difference.
        reason: String,
    },
}

/// `std::result::Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(path: &Path, action: &'static str, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            action,
            source,
        }
    }
}
