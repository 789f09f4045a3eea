//! Command line of `resize-images`, spelled as sd-scripts' `resize_images_to_resolution.py`
//! (underscore flags, each with a kebab-case alias), and its conversion to a checked
//! [`Config`] before any work.

use std::path::PathBuf;

use clap::Parser;
use sd_data::resize::{
    DEFAULT_MAX_RESOLUTION, Interpolation, OutputFormat, ResizeConfig, parse_targets,
};

/// Resize a folder of images to one or more target areas (sd-scripts
/// resize_images_to_resolution).
///
/// Each image is scaled to fit each target area keeping its aspect ratio (never enlarged),
/// centre-cropped to multiples of --divisible_by and written as `<stem>+<WxH>.jpg` (or
/// `.png`). The original and other files of SRC_DIR are copied to DST_DIR unchanged.
#[derive(Debug, Parser)]
#[command(name = "resize-images", version)]
pub struct Args {
    /// Folder with the source images (not searched recursively).
    #[arg(value_name = "SRC_DIR")]
    pub src_img_folder: PathBuf,

    /// Output folder, created when missing; must not be SRC_DIR.
    #[arg(value_name = "DST_DIR")]
    pub dst_img_folder: PathBuf,

    /// Comma-separated target areas WIDTHxHEIGHT; an image is scaled to at most
    /// WIDTH·HEIGHT pixels keeping its aspect ratio. The text is the output suffix.
    #[arg(long = "max_resolution", alias = "max-resolution", value_name = "WxH,...", default_value = DEFAULT_MAX_RESOLUTION)]
    pub max_resolution: String,

    /// Write PNG (keeps transparency) instead of JPEG at quality 100.
    #[arg(long = "save_as_png", alias = "save-as-png")]
    pub save_as_png: bool,

    /// Centre-crop the final width and height down to multiples of N pixels.
    #[arg(long = "divisible_by", alias = "divisible-by", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub divisible_by: u32,

    /// Resampling filter: area (OpenCV INTER_AREA, default), cubic, lanczos4, linear, nearest
    /// or box.
    #[arg(long = "interpolation", value_name = "METHOD", default_value = "area",
          value_parser = |s: &str| s.parse::<Interpolation>())]
    pub interpolation: Interpolation,

    /// Also copy files sharing an image's stem (captions…) as `<stem>+<WxH>.<ext>`.
    #[arg(long = "copy_associated_files", alias = "copy-associated-files")]
    pub copy_associated_files: bool,

    /// Worker threads for decoding, resizing and encoding (default: one per CPU core).
    #[arg(long = "max_workers", alias = "max-workers", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_workers: Option<u32>,

    #[command(flatten)]
    pub verbosity: sd_cli::Verbosity,
}

/// Checked settings of one run; work code never sees clap types.
#[derive(Debug)]
pub struct Config {
    /// Source folder.
    pub src_dir: PathBuf,
    /// Destination folder.
    pub dst_dir: PathBuf,
    /// Worker threads (None: rayon's default).
    pub workers: Option<usize>,
    /// What to produce.
    pub resize: ResizeConfig,
}

impl Args {
    /// Validates the flags into a [`Config`].
    ///
    /// # Errors
    /// A message naming the bad `--max_resolution` entry.
    pub fn into_config(self) -> Result<Config, String> {
        let targets =
            parse_targets(&self.max_resolution).map_err(|e| format!("--max_resolution: {e}"))?;
        Ok(Config {
            src_dir: self.src_img_folder,
            dst_dir: self.dst_img_folder,
            workers: self.max_workers.map(|n| n as usize),
            resize: ResizeConfig {
                targets,
                divisible_by: self.divisible_by,
                interpolation: self.interpolation,
                format: if self.save_as_png {
                    OutputFormat::Png
                } else {
                    OutputFormat::Jpeg
                },
                copy_associated_files: self.copy_associated_files,
            },
        })
    }
}
