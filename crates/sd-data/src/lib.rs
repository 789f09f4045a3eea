//! sd-data: dataset-side work that needs no libtorch — image loading and resizing for the
//! `resize-images` pre-processor today; aspect-ratio buckets, captions and dataset TOML later.
//!
//! This crate never links `tch` or `sd-core`, never prints and never installs a log
//! subscriber; it reports through `tracing` events, [`Result`] values and progress callbacks.

mod error;
pub mod resize;

// Training data (dataset TOML, scan, buckets, captions, image preparation); see docs/dataset.md.
pub mod bucket;
pub mod caption;
pub mod config;
pub mod dataset;
pub mod dataset_error;
pub mod dataset_plan;
pub mod dataset_rng;
pub mod debug_listing;
pub mod image_prep;

pub use error::{Error, Result};
