//! sd-data: dataset-side work that needs no libtorch — image loading and resizing for the
//! `resize-images` pre-processor today; aspect-ratio buckets, captions and dataset TOML later.
//!
//! This crate never links `tch` or `sd-core`, never prints and never installs a log
//! subscriber; it reports through `tracing` events, [`Result`] values and progress callbacks.

mod error;
pub mod resize;

pub use error::{Error, Result};
