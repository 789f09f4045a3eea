//! The one error type of sd-data (STYLE.md §3): every variant names the file it is about.

use std::path::PathBuf;

/// Result alias for sd-data.
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong in sd-data. Messages are lower case and say expected vs found.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading, writing, listing or renaming a file failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done ("reading", "writing", "listing", …).
        action: &'static str,
        /// The file or folder concerned.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// An image file could not be decoded (unknown format, truncated, too large…).
    #[error("cannot decode image {}: {source}", path.display())]
    Decode {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// An output image could not be encoded.
    #[error("cannot encode image {}: {source}", path.display())]
    Encode {
        /// The output file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: image::ImageError,
    },
    /// A JPEG output could not be encoded (e.g. a side above 65535 pixels).
    #[error("cannot encode JPEG {}: {reason}", path.display())]
    EncodeJpeg {
        /// The output file.
        path: PathBuf,
        /// The encoder's message.
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
    /// A `--max_resolution` entry is not `WxH` with positive integers.
    #[error("invalid resolution \"{text}\": {reason}")]
    InvalidResolution {
        /// The entry as given.
        text: String,
        /// Expected vs found.
        reason: String,
    },
    /// An image would be cropped to zero pixels in one dimension for one target.
    #[error(
        "{} would become {width}x{height} pixels for {target} (divisible_by {divisible_by}): skipped",
        path.display()
    )]
    ZeroSize {
        /// The image file.
        path: PathBuf,
        /// The target text, e.g. `512x512`.
        target: String,
        /// Width after scaling and cropping (pixels).
        width: u32,
        /// Height after scaling and cropping (pixels).
        height: u32,
        /// The `--divisible_by` value used.
        divisible_by: u32,
    },
    /// The destination folder is the source folder, so outputs could replace inputs.
    #[error("destination {} is the source folder {}: choose another folder", dst.display(), src.display())]
    SameDirectory {
        /// Source folder.
        src: PathBuf,
        /// Destination folder.
        dst: PathBuf,
    },
    /// Two inputs would write the same output file; the later one is not written.
    #[error("{} would also be written from {} (first from {}): not written", output.display(), second.display(), first.display())]
    OutputConflict {
        /// The output file both would write.
        output: PathBuf,
        /// The input that keeps the name.
        first: PathBuf,
        /// The input whose output is dropped.
        second: PathBuf,
    },
}
