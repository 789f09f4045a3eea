//! The dataset configuration: the `--dataset_config` TOML (or JSON) file of spec
//! training.md §2, or the same description built from command-line options
//! ([`DatasetArgs`], which the CLI fills), validated and resolved into typed
//! [`DatasetGroupConfig`] values.
//!
//! Validation is strict like the reference's schema: the top level may hold only `general`
//! and `datasets`; any other key at any level is an error naming the file, the table and
//! the key; a `float` key rejects an integer literal (write `1.0`), keys typed "float or int"
//! accept both.
//!
//! Value resolution (spec §2.4): subset table → its dataset table → `[general]` → command
//! line ([`DatasetArgs`], whose fields carry sd-scripts' argparse defaults) → built-in
//! default. So the TOML wins over the command line.
//!
//! # Source
//! sd-scripts `library/config_util.py` (`ConfigSanitizer`, `BlueprintGenerator`,
//! `generate_dreambooth_subsets_config_by_subdirs`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::bucket::{BucketSettings, Resolution};
use crate::caption::{CaptionOptions, normalize_extension};
use crate::dataset_error::{DatasetError, DatasetResult, io_err};
use crate::image_prep::{AugmentOptions, ResizeInterpolation};

/// Path used in errors about command-line options.
pub const COMMAND_LINE: &str = "<command line>";

/// Dataset options from the command line, with sd-scripts' argparse defaults
/// ([`Default`]). The future CLI fills this plain struct; no clap types here.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetArgs {
    /// `--train_data_dir`: folder of `N_tokens` sub-folders (DreamBooth) or the image folder
    /// of `--in_json`.
    pub train_data_dir: Option<PathBuf>,
    /// `--reg_data_dir`: folder of `N_tokens` regularisation sub-folders.
    pub reg_data_dir: Option<PathBuf>,
    /// `--in_json`: fine-tuning metadata file.
    pub in_json: Option<PathBuf>,
    /// `--dataset_repeats` (1): `num_repeats` for fine-tuning subsets and TOML subsets.
    pub dataset_repeats: i64,
    /// `--train_batch_size` (1).
    pub train_batch_size: i64,
    /// `--resolution` ("W,H" or "S"; none).
    pub resolution: Option<Resolution>,
    /// `--enable_bucket`.
    pub enable_bucket: bool,
    /// `--min_bucket_reso` (256).
    pub min_bucket_reso: i64,
    /// `--max_bucket_reso` (1024).
    pub max_bucket_reso: i64,
    /// `--bucket_reso_steps` (64).
    pub bucket_reso_steps: i64,
    /// `--bucket_no_upscale`.
    pub bucket_no_upscale: bool,
    /// `--caption_extension` (".caption").
    pub caption_extension: String,
    /// `--caption_extention`: the reference's misspelled alias; wins when given.
    pub caption_extention: Option<String>,
    /// `--shuffle_caption`.
    pub shuffle_caption: bool,
    /// `--caption_separator` (",").
    pub caption_separator: String,
    /// `--keep_tokens` (0).
    pub keep_tokens: i64,
    /// `--keep_tokens_separator` ("").
    pub keep_tokens_separator: String,
    /// `--secondary_separator`.
    pub secondary_separator: Option<String>,
    /// `--enable_wildcard`.
    pub enable_wildcard: bool,
    /// `--caption_prefix`.
    pub caption_prefix: Option<String>,
    /// `--caption_suffix`.
    pub caption_suffix: Option<String>,
    /// `--color_aug`.
    pub color_aug: bool,
    /// `--flip_aug`.
    pub flip_aug: bool,
    /// `--random_crop`.
    pub random_crop: bool,
    /// `--face_crop_aug_range` (unsupported: an error when set).
    pub face_crop_aug_range: Option<(f64, f64)>,
    /// `--token_warmup_min` (1).
    pub token_warmup_min: i64,
    /// `--token_warmup_step` (0).
    pub token_warmup_step: f64,
    /// `--caption_dropout_rate` (0.0).
    pub caption_dropout_rate: f64,
    /// `--caption_dropout_every_n_epochs` (0).
    pub caption_dropout_every_n_epochs: i64,
    /// `--caption_tag_dropout_rate` (0.0).
    pub caption_tag_dropout_rate: f64,
    /// `--alpha_mask`.
    pub alpha_mask: bool,
    /// `--masked_loss` (allows `conditioning_data_dir`).
    pub masked_loss: bool,
    /// `--resize_interpolation` (none: automatic area/Lanczos).
    pub resize_interpolation: Option<ResizeInterpolation>,
    /// `--validation_split` (0.0).
    pub validation_split: f64,
    /// `--validation_seed`.
    pub validation_seed: Option<i64>,
    /// `--prior_loss_weight` (1.0): loss weight of regularisation images; command line only.
    pub prior_loss_weight: f64,
}

impl Default for DatasetArgs {
    fn default() -> Self {
        Self {
            train_data_dir: None,
            reg_data_dir: None,
            in_json: None,
            dataset_repeats: 1,
            train_batch_size: 1,
            resolution: None,
            enable_bucket: false,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            caption_extension: ".caption".to_owned(),
            caption_extention: None,
            shuffle_caption: false,
            caption_separator: ",".to_owned(),
            keep_tokens: 0,
            keep_tokens_separator: String::new(),
            secondary_separator: None,
            enable_wildcard: false,
            caption_prefix: None,
            caption_suffix: None,
            color_aug: false,
            flip_aug: false,
            random_crop: false,
            face_crop_aug_range: None,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            alpha_mask: false,
            masked_loss: false,
            resize_interpolation: None,
            validation_split: 0.0,
            validation_seed: None,
            prior_loss_weight: 1.0,
        }
    }
}

/// Parses a `--resolution` value: `"S"` (square) or `"W,H"`.
///
/// # Errors
/// [`DatasetError::InvalidValue`] unless one or two positive integers.
pub fn parse_resolution_arg(text: &str) -> DatasetResult<Resolution> {
    let bad = || DatasetError::InvalidValue {
        path: PathBuf::from(COMMAND_LINE),
        table: "options".to_owned(),
        key: "--resolution".to_owned(),
        reason: format!(
            "expected \"SIZE\" or \"WIDTH,HEIGHT\" with positive integers, found \"{text}\""
        ),
    };
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let nums: Vec<u32> = parts
        .iter()
        .map(|p| p.parse::<u32>().ok().filter(|&v| v > 0))
        .collect::<Option<_>>()
        .ok_or_else(bad)?;
    match nums.as_slice() {
        [s] => Ok(Resolution::new(*s, *s)),
        [w, h] => Ok(Resolution::new(*w, *h)),
        _ => Err(bad()),
    }
}

/// What kind of dataset an `[[datasets]]` entry is (spec §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DatasetKind {
    /// Image folders with caption files beside the images.
    DreamBooth,
    /// Images described by a metadata JSON/JSONL file.
    FineTuning,
}

impl DatasetKind {
    /// The reference's class name (`DreamBoothDataset`, `FineTuningDataset`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::DreamBooth => "DreamBoothDataset",
            Self::FineTuning => "FineTuningDataset",
        }
    }
}

/// One resolved subset (spec §2.3).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SubsetConfig {
    /// `image_dir` as written (relative paths are resolved by the scan's base folder).
    pub image_dir: Option<PathBuf>,
    /// `metadata_file` (fine-tuning).
    pub metadata_file: Option<PathBuf>,
    /// `is_reg`: regularisation subset (DreamBooth).
    pub is_reg: bool,
    /// `alpha_mask`: the PNG alpha channel becomes the loss mask.
    pub alpha_mask: bool,
    /// `num_repeats`; a value below 1 means the subset is ignored.
    pub num_repeats: i64,
    /// Caption processing.
    pub caption: CaptionOptions,
    /// Augmentations.
    pub augment: AugmentOptions,
    /// `resize_interpolation` (subset, else dataset, else command line).
    pub resize_interpolation: Option<ResizeInterpolation>,
    /// `caption_extension`, with a leading ".".
    pub caption_extension: String,
    /// `class_tokens`: caption of images without a caption file.
    pub class_tokens: Option<String>,
    /// `cache_info` (accepted; no effect: sizes and captions are always read fresh).
    pub cache_info: bool,
    /// `custom_attributes`, as JSON.
    pub custom_attributes: serde_json::Value,
}

/// One resolved dataset (spec §2.2).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DatasetConfig {
    /// DreamBooth or fine-tuning.
    pub kind: DatasetKind,
    /// `batch_size`.
    pub batch_size: u32,
    /// Normalised bucket settings (spec §3.1 applied).
    pub buckets: BucketSettings,
    /// `network_multiplier` (no effect with networks.lora).
    pub network_multiplier: f64,
    /// `validation_split` (stored; the split itself is not applied by sd-data yet).
    pub validation_split: f64,
    /// `validation_seed`.
    pub validation_seed: Option<i64>,
    /// `--prior_loss_weight`: loss weight of regularisation samples.
    pub prior_loss_weight: f64,
    /// Subsets in file order, duplicates and `num_repeats < 1` kept out.
    pub subsets: Vec<SubsetConfig>,
}

/// Every dataset of one training run, plus the warnings produced while resolving them.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DatasetGroupConfig {
    /// The datasets, concatenated in this order for training.
    pub datasets: Vec<DatasetConfig>,
    /// User-actionable warnings (ignored options, rounded bucket limits, skipped folders).
    pub warnings: Vec<String>,
}

/// Per-model checks of spec §1.2 that involve the dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrainingChecks {
    /// `bucket_reso_steps` must be divisible by this: 64 for SD 1.x/2.x, 32 for SDXL.
    pub bucket_step_divisor: u32,
    /// `--cache_latents`: no subset may use `color_aug` or `random_crop`.
    pub cache_latents: bool,
    /// `--cache_text_encoder_outputs` (SDXL): no caption dropout, shuffle, warm-up or tag dropout.
    pub cache_text_encoder_outputs: bool,
}

impl DatasetGroupConfig {
    /// Applies the dataset checks of spec §1.2.
    ///
    /// # Errors
    /// [`DatasetError::InvalidValue`] naming the dataset and option for the first violation.
    pub fn check_for_training(&self, checks: TrainingChecks) -> DatasetResult<()> {
        let err = |i: usize, key: &str, reason: String| DatasetError::InvalidValue {
            path: PathBuf::from("<dataset config>"),
            table: format!("dataset #{}", i + 1),
            key: key.to_owned(),
            reason,
        };
        for (i, ds) in self.datasets.iter().enumerate() {
            let steps = ds.buckets.bucket_reso_steps;
            if checks.bucket_step_divisor > 0 && steps % checks.bucket_step_divisor != 0 {
                return Err(err(
                    i,
                    "bucket_reso_steps",
                    format!(
                        "must be divisible by {} for this model, found {steps}",
                        checks.bucket_step_divisor
                    ),
                ));
            }
            for s in &ds.subsets {
                if checks.cache_latents && (s.augment.color_aug || s.augment.random_crop) {
                    return Err(err(
                        i,
                        "color_aug/random_crop",
                        "not allowed with --cache_latents".to_owned(),
                    ));
                }
                let c = &s.caption;
                if checks.cache_text_encoder_outputs
                    && (c.caption_dropout_rate > 0.0
                        || c.shuffle_caption
                        || c.token_warmup_step > 0.0
                        || c.caption_tag_dropout_rate > 0.0)
                {
                    return Err(err(
                        i,
                        "caption options",
                        "--cache_text_encoder_outputs needs caption_dropout_rate 0, no shuffle_caption, \
                         token_warmup_step 0 and caption_tag_dropout_rate 0"
                            .to_owned(),
                    ));
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Schema

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Float,
    FloatOrInt,
    Bool,
    Str,
    IntOrPair,
    FloatPair,
    Table,
}

impl Kind {
    fn describe(self) -> &'static str {
        match self {
            Self::Int => "an integer",
            Self::Float => "a float (write 1.0, not 1)",
            Self::FloatOrInt => "a number",
            Self::Bool => "a boolean (true or false)",
            Self::Str => "a string",
            Self::IntOrPair => "an integer or an array of two integers [width, height]",
            Self::FloatPair => "an array of two floats",
            Self::Table => "a table",
        }
    }

    fn accepts(self, v: &toml::Value) -> bool {
        use toml::Value as V;
        let is_int = |v: &V| matches!(v, V::Integer(_));
        let is_float = |v: &V| matches!(v, V::Float(_));
        match self {
            Self::Int => is_int(v),
            Self::Float => is_float(v),
            Self::FloatOrInt => is_int(v) || is_float(v),
            Self::Bool => matches!(v, V::Boolean(_)),
            Self::Str => matches!(v, V::String(_)),
            Self::IntOrPair => {
                is_int(v) || matches!(v, V::Array(a) if a.len() == 2 && a.iter().all(is_int))
            }
            Self::FloatPair => matches!(v, V::Array(a) if a.len() == 2 && a.iter().all(is_float)),
            Self::Table => matches!(v, V::Table(_)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `[general]` and `[[datasets]]`.
    Dataset,
    /// All three levels.
    Subset,
    /// `[[datasets.subsets]]` only.
    SubsetOnly,
}

const SCHEMA: &[(&str, Kind, Scope)] = &[
    ("batch_size", Kind::Int, Scope::Dataset),
    ("resolution", Kind::IntOrPair, Scope::Dataset),
    ("enable_bucket", Kind::Bool, Scope::Dataset),
    ("min_bucket_reso", Kind::Int, Scope::Dataset),
    ("max_bucket_reso", Kind::Int, Scope::Dataset),
    ("bucket_reso_steps", Kind::Int, Scope::Dataset),
    ("bucket_no_upscale", Kind::Bool, Scope::Dataset),
    ("network_multiplier", Kind::Float, Scope::Dataset),
    ("validation_split", Kind::Float, Scope::Dataset),
    ("validation_seed", Kind::Int, Scope::Dataset),
    ("resize_interpolation", Kind::Str, Scope::Subset),
    ("num_repeats", Kind::Int, Scope::Subset),
    ("shuffle_caption", Kind::Bool, Scope::Subset),
    ("caption_separator", Kind::Str, Scope::Subset),
    ("keep_tokens", Kind::Int, Scope::Subset),
    ("keep_tokens_separator", Kind::Str, Scope::Subset),
    ("secondary_separator", Kind::Str, Scope::Subset),
    ("enable_wildcard", Kind::Bool, Scope::Subset),
    ("caption_prefix", Kind::Str, Scope::Subset),
    ("caption_suffix", Kind::Str, Scope::Subset),
    ("color_aug", Kind::Bool, Scope::Subset),
    ("flip_aug", Kind::Bool, Scope::Subset),
    ("random_crop", Kind::Bool, Scope::Subset),
    ("face_crop_aug_range", Kind::FloatPair, Scope::Subset),
    ("token_warmup_min", Kind::Int, Scope::Subset),
    ("token_warmup_step", Kind::FloatOrInt, Scope::Subset),
    ("caption_dropout_rate", Kind::FloatOrInt, Scope::Subset),
    ("caption_dropout_every_n_epochs", Kind::Int, Scope::Subset),
    ("caption_tag_dropout_rate", Kind::FloatOrInt, Scope::Subset),
    ("custom_attributes", Kind::Table, Scope::Subset),
    ("caption_extension", Kind::Str, Scope::Subset),
    ("class_tokens", Kind::Str, Scope::Subset),
    ("cache_info", Kind::Bool, Scope::Subset),
    ("image_dir", Kind::Str, Scope::SubsetOnly),
    ("is_reg", Kind::Bool, Scope::SubsetOnly),
    ("alpha_mask", Kind::Bool, Scope::SubsetOnly),
    ("metadata_file", Kind::Str, Scope::SubsetOnly),
    ("conditioning_data_dir", Kind::Str, Scope::SubsetOnly),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    General,
    Dataset,
    Subset,
}

fn type_name(v: &toml::Value) -> String {
    match v {
        toml::Value::Array(a) => format!("an array of {} element(s)", a.len()),
        other => other.type_str().to_owned(),
    }
}

/// Checks every key of one table against the schema for its level.
fn check_table(
    path: &Path,
    table_name: &str,
    table: &toml::Table,
    level: Level,
) -> DatasetResult<()> {
    for (key, value) in table {
        if level == Level::Dataset && key == "subsets" {
            continue;
        }
        let spec = SCHEMA.iter().find(|(name, _, _)| *name == key.as_str());
        let allowed = spec.is_some_and(|(_, _, scope)| match scope {
            Scope::Dataset => level != Level::Subset,
            Scope::Subset => true,
            Scope::SubsetOnly => level == Level::Subset,
        });
        let Some((_, kind, _)) = spec.filter(|_| allowed) else {
            let allowed_elsewhere = spec.map(|(_, _, scope)| match scope {
                Scope::Dataset => "allowed in [general] and [[datasets]] only".to_owned(),
                _ => "allowed in [[datasets.subsets]] only".to_owned(),
            });
            let allowed_elsewhere = allowed_elsewhere.or_else(|| {
                (key == "prior_loss_weight" || key == "max_token_length")
                    .then(|| "a command-line option, not a dataset key".to_owned())
            });
            return Err(DatasetError::UnknownKey {
                path: path.to_path_buf(),
                table: table_name.to_owned(),
                key: key.clone(),
                allowed_elsewhere,
            });
        };
        if !kind.accepts(value) {
            return Err(DatasetError::WrongType {
                path: path.to_path_buf(),
                table: table_name.to_owned(),
                key: key.clone(),
                expected: kind.describe().to_owned(),
                found: type_name(value),
            });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Resolution across levels

/// The tables searched for a value, most specific first.
struct Chain<'a> {
    path: &'a Path,
    layers: Vec<(&'a toml::Table, String)>,
}

impl<'a> Chain<'a> {
    fn find(&self, key: &str) -> Option<(&'a toml::Value, &str)> {
        self.layers
            .iter()
            .find_map(|(t, name)| t.get(key).map(|v| (v, name.as_str())))
    }

    fn invalid(&self, table: &str, key: &str, reason: String) -> DatasetError {
        DatasetError::InvalidValue {
            path: self.path.to_path_buf(),
            table: table.to_owned(),
            key: key.to_owned(),
            reason,
        }
    }

    fn bool(&self, key: &str, cli: bool) -> bool {
        self.find(key).and_then(|(v, _)| v.as_bool()).unwrap_or(cli)
    }

    fn string(&self, key: &str) -> Option<String> {
        self.find(key)
            .and_then(|(v, _)| v.as_str())
            .map(str::to_owned)
    }

    fn float(&self, key: &str, cli: f64) -> f64 {
        match self.find(key).map(|(v, _)| v) {
            Some(toml::Value::Float(f)) => *f,
            Some(toml::Value::Integer(i)) => *i as f64,
            _ => cli,
        }
    }

    fn int(&self, key: &str, cli: i64) -> i64 {
        self.find(key)
            .and_then(|(v, _)| v.as_integer())
            .unwrap_or(cli)
    }

    /// An integer in `min..=u32::MAX`; `origin` names where a CLI value came from.
    fn uint(&self, key: &str, cli: i64, min: i64) -> DatasetResult<u32> {
        let (value, table) = match self.find(key) {
            Some((v, t)) => (v.as_integer().unwrap_or(cli), t.to_owned()),
            None => (cli, format!("--{key} ({COMMAND_LINE})")),
        };
        u32::try_from(value)
            .ok()
            .filter(|&v| i64::from(v) >= min)
            .ok_or_else(|| {
                self.invalid(
                    &table,
                    key,
                    format!("expected an integer of at least {min}, found {value}"),
                )
            })
    }

    fn rate(&self, key: &str, cli: f64) -> DatasetResult<f64> {
        let v = self.float(key, cli);
        if (0.0..=1.0).contains(&v) {
            Ok(v)
        } else {
            let table = self
                .find(key)
                .map_or_else(|| COMMAND_LINE.to_owned(), |(_, t)| t.to_owned());
            Err(self.invalid(
                &table,
                key,
                format!("expected a probability in [0, 1], found {v}"),
            ))
        }
    }
}

fn resolve_subset(
    chain: &Chain<'_>,
    args: &DatasetArgs,
    kind: DatasetKind,
) -> DatasetResult<SubsetConfig> {
    let face = match chain.find("face_crop_aug_range") {
        Some((toml::Value::Array(a), _)) => Some((
            a[0].as_float().unwrap_or(0.0),
            a[1].as_float().unwrap_or(0.0),
        )),
        _ => args.face_crop_aug_range,
    };
    if let Some((a, b)) = face {
        return Err(DatasetError::Unsupported {
            option: "face_crop_aug_range".to_owned(),
            reason: format!(
                "face-crop augmentation ({a}, {b}) is not implemented by this port; remove it (it only applies with bucketing off)"
            ),
        });
    }
    let interpolation = match chain.find("resize_interpolation") {
        Some((v, table)) => {
            let name = v.as_str().unwrap_or_default();
            Some(
                ResizeInterpolation::parse(name, true)
                    .map_err(|reason| chain.invalid(table, "resize_interpolation", reason))?,
            )
        }
        None => args.resize_interpolation,
    };
    let caption_ext = chain
        .string("caption_extension")
        .or_else(|| args.caption_extention.clone())
        .unwrap_or_else(|| args.caption_extension.clone());
    let token_warmup_step = chain.float("token_warmup_step", args.token_warmup_step);
    if token_warmup_step < 0.0 {
        return Err(chain.invalid(
            "",
            "token_warmup_step",
            format!("expected a value >= 0, found {token_warmup_step}"),
        ));
    }
    let caption = CaptionOptions {
        shuffle_caption: chain.bool("shuffle_caption", args.shuffle_caption),
        caption_separator: chain
            .string("caption_separator")
            .unwrap_or_else(|| args.caption_separator.clone()),
        keep_tokens: chain.uint("keep_tokens", args.keep_tokens, 0)?,
        keep_tokens_separator: chain
            .string("keep_tokens_separator")
            .unwrap_or_else(|| args.keep_tokens_separator.clone()),
        secondary_separator: chain
            .string("secondary_separator")
            .or_else(|| args.secondary_separator.clone()),
        enable_wildcard: chain.bool("enable_wildcard", args.enable_wildcard),
        caption_prefix: chain
            .string("caption_prefix")
            .or_else(|| args.caption_prefix.clone()),
        caption_suffix: chain
            .string("caption_suffix")
            .or_else(|| args.caption_suffix.clone()),
        token_warmup_min: chain.uint("token_warmup_min", args.token_warmup_min, 0)?,
        token_warmup_step,
        caption_dropout_rate: chain.rate("caption_dropout_rate", args.caption_dropout_rate)?,
        caption_dropout_every_n_epochs: chain.uint(
            "caption_dropout_every_n_epochs",
            args.caption_dropout_every_n_epochs,
            0,
        )?,
        caption_tag_dropout_rate: chain
            .rate("caption_tag_dropout_rate", args.caption_tag_dropout_rate)?,
    };
    let custom_attributes = match chain.find("custom_attributes") {
        Some((v, _)) => serde_json::to_value(v).unwrap_or(serde_json::Value::Null),
        None => serde_json::Value::Object(serde_json::Map::new()),
    };
    let is_reg = chain.bool("is_reg", false);
    if is_reg && kind == DatasetKind::FineTuning {
        return Err(chain.invalid(
            chain.find("is_reg").map_or("", |(_, t)| t),
            "is_reg",
            "fine-tuning (metadata_file) subsets cannot be regularisation subsets".to_owned(),
        ));
    }
    Ok(SubsetConfig {
        image_dir: chain.string("image_dir").map(PathBuf::from),
        metadata_file: chain.string("metadata_file").map(PathBuf::from),
        is_reg,
        alpha_mask: chain.bool("alpha_mask", args.alpha_mask),
        num_repeats: chain.int("num_repeats", args.dataset_repeats),
        caption,
        augment: AugmentOptions {
            color_aug: chain.bool("color_aug", args.color_aug),
            flip_aug: chain.bool("flip_aug", args.flip_aug),
            random_crop: chain.bool("random_crop", args.random_crop),
        },
        resize_interpolation: interpolation,
        caption_extension: normalize_extension(&caption_ext),
        class_tokens: chain.string("class_tokens"),
        cache_info: chain.bool("cache_info", false),
        custom_attributes,
    })
}

fn resolve_dataset_params(
    chain: &Chain<'_>,
    args: &DatasetArgs,
    kind: DatasetKind,
    subsets: Vec<SubsetConfig>,
    warnings: &mut Vec<String>,
    table: &str,
) -> DatasetResult<DatasetConfig> {
    let resolution = match chain.find("resolution") {
        Some((toml::Value::Integer(s), t)) => {
            let s = u32::try_from(*s).ok().filter(|&s| s > 0).ok_or_else(|| {
                chain.invalid(
                    t,
                    "resolution",
                    format!("expected a positive integer, found {s}"),
                )
            })?;
            Resolution::new(s, s)
        }
        Some((toml::Value::Array(a), t)) => {
            let side = |v: &toml::Value| {
                v.as_integer()
                    .and_then(|i| u32::try_from(i).ok())
                    .filter(|&i| i > 0)
            };
            match (side(&a[0]), side(&a[1])) {
                (Some(w), Some(h)) => Resolution::new(w, h),
                _ => {
                    return Err(chain.invalid(
                        t,
                        "resolution",
                        "expected two positive integers".to_owned(),
                    ));
                }
            }
        }
        _ => args.resolution.ok_or_else(|| DatasetError::MissingKey {
            path: chain.path.to_path_buf(),
            table: table.to_owned(),
            key: "resolution".to_owned(),
            hint: Some("set it in [general] or [[datasets]], or pass --resolution".to_owned()),
        })?,
    };
    let settings = BucketSettings {
        resolution,
        enable_bucket: chain.bool("enable_bucket", args.enable_bucket),
        min_bucket_reso: chain.uint("min_bucket_reso", args.min_bucket_reso, 1)?,
        max_bucket_reso: chain.uint("max_bucket_reso", args.max_bucket_reso, 1)?,
        bucket_reso_steps: chain.uint("bucket_reso_steps", args.bucket_reso_steps, 1)?,
        bucket_no_upscale: chain.bool("bucket_no_upscale", args.bucket_no_upscale),
    };
    let (buckets, bucket_warnings) = settings
        .normalized()
        .map_err(|reason| chain.invalid(table, "resolution/bucket limits", reason))?;
    warnings.extend(bucket_warnings.into_iter().map(|w| format!("{table}: {w}")));
    let validation_split = chain.float("validation_split", args.validation_split);
    let validation_seed = chain
        .find("validation_seed")
        .and_then(|(v, _)| v.as_integer())
        .or(args.validation_seed);
    Ok(DatasetConfig {
        kind,
        batch_size: chain.uint("batch_size", args.train_batch_size, 1)?,
        buckets,
        network_multiplier: chain.float("network_multiplier", 1.0),
        validation_split,
        validation_seed,
        prior_loss_weight: args.prior_loss_weight,
        subsets,
    })
}

// ---------------------------------------------------------------------------------------
// Entry points

/// Reads and resolves a dataset config file (`.toml`, or `.json` by extension,
/// case-insensitive). Relative paths inside stay as written (see the scan's base folder).
///
/// # Errors
/// I/O, syntax, unknown keys, wrong types, invalid values, missing `resolution`, mixed
/// dataset kinds, unsupported options — each naming the file, table and key.
pub fn load_dataset_config(path: &Path, args: &DatasetArgs) -> DatasetResult<DatasetGroupConfig> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading dataset config", path))?;
    let is_json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let table = if is_json {
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| DatasetError::TomlSyntax {
                path: path.to_path_buf(),
                message: format!("invalid JSON: {e}"),
            })?;
        match json_to_toml(&value) {
            Some(toml::Value::Table(t)) => t,
            _ => {
                return Err(DatasetError::TomlSyntax {
                    path: path.to_path_buf(),
                    message: "expected a JSON object without null values".to_owned(),
                });
            }
        }
    } else {
        text.parse::<toml::Table>()
            .map_err(|e| DatasetError::TomlSyntax {
                path: path.to_path_buf(),
                message: e.to_string().trim_end().to_owned(),
            })?
    };
    resolve_dataset_table(&table, path, args)
}

fn json_to_toml(v: &serde_json::Value) -> Option<toml::Value> {
    use serde_json::Value as J;
    Some(match v {
        J::Null => return None,
        J::Bool(b) => toml::Value::Boolean(*b),
        J::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        J::String(s) => toml::Value::String(s.clone()),
        J::Array(a) => toml::Value::Array(a.iter().map(json_to_toml).collect::<Option<_>>()?),
        J::Object(o) => toml::Value::Table(
            o.iter()
                .map(|(k, v)| Some((k.clone(), json_to_toml(v)?)))
                .collect::<Option<_>>()?,
        ),
    })
}

/// Resolves an already parsed dataset description; `path` is only used in messages.
///
/// # Errors
/// As [`load_dataset_config`].
pub fn resolve_dataset_table(
    root: &toml::Table,
    path: &Path,
    args: &DatasetArgs,
) -> DatasetResult<DatasetGroupConfig> {
    let mut warnings = Vec::new();
    for key in root.keys() {
        if key != "general" && key != "datasets" {
            return Err(DatasetError::UnknownKey {
                path: path.to_path_buf(),
                table: "the top level".to_owned(),
                key: key.clone(),
                allowed_elsewhere: Some(
                    "the top level may only hold [general] and [[datasets]]".to_owned(),
                ),
            });
        }
    }
    let empty = toml::Table::new();
    let general = match root.get("general") {
        None => &empty,
        Some(toml::Value::Table(t)) => t,
        Some(other) => {
            return Err(DatasetError::WrongType {
                path: path.to_path_buf(),
                table: "the top level".to_owned(),
                key: "general".to_owned(),
                expected: "a table [general]".to_owned(),
                found: type_name(other),
            });
        }
    };
    check_table(path, "[general]", general, Level::General)?;
    let datasets = match root.get("datasets") {
        Some(toml::Value::Array(a)) => a,
        None => {
            return Err(DatasetError::MissingKey {
                path: path.to_path_buf(),
                table: "the top level".to_owned(),
                key: "datasets".to_owned(),
                hint: Some(
                    "add at least one [[datasets]] table with [[datasets.subsets]]".to_owned(),
                ),
            });
        }
        Some(other) => {
            return Err(DatasetError::WrongType {
                path: path.to_path_buf(),
                table: "the top level".to_owned(),
                key: "datasets".to_owned(),
                expected: "an array of tables [[datasets]]".to_owned(),
                found: type_name(other),
            });
        }
    };
    for dir in [&args.train_data_dir, &args.reg_data_dir, &args.in_json]
        .into_iter()
        .flatten()
    {
        warnings.push(format!(
            "{} is ignored because a dataset config is given",
            dir.display()
        ));
    }
    let mut out = Vec::new();
    for (di, ds_value) in datasets.iter().enumerate() {
        let ds_name = format!("[[datasets]] #{}", di + 1);
        let toml::Value::Table(ds) = ds_value else {
            return Err(DatasetError::WrongType {
                path: path.to_path_buf(),
                table: "the top level".to_owned(),
                key: "datasets".to_owned(),
                expected: "an array of tables [[datasets]]".to_owned(),
                found: format!("an element of type {}", type_name(ds_value)),
            });
        };
        check_table(path, &ds_name, ds, Level::Dataset)?;
        let subsets = match ds.get("subsets") {
            Some(toml::Value::Array(a)) if !a.is_empty() => a,
            Some(toml::Value::Array(_)) | None => {
                return Err(DatasetError::MissingKey {
                    path: path.to_path_buf(),
                    table: ds_name,
                    key: "subsets".to_owned(),
                    hint: Some("add at least one [[datasets.subsets]] table".to_owned()),
                });
            }
            Some(other) => {
                return Err(DatasetError::WrongType {
                    path: path.to_path_buf(),
                    table: ds_name,
                    key: "subsets".to_owned(),
                    expected: "an array of tables [[datasets.subsets]]".to_owned(),
                    found: type_name(other),
                });
            }
        };
        let mut subset_tables = Vec::new();
        for (si, sv) in subsets.iter().enumerate() {
            let name = format!("[[datasets.subsets]] #{}.{}", di + 1, si + 1);
            let toml::Value::Table(st) = sv else {
                return Err(DatasetError::WrongType {
                    path: path.to_path_buf(),
                    table: ds_name,
                    key: "subsets".to_owned(),
                    expected: "an array of tables [[datasets.subsets]]".to_owned(),
                    found: format!("an element of type {}", type_name(sv)),
                });
            };
            check_table(path, &name, st, Level::Subset)?;
            subset_tables.push((st, name));
        }
        let with_meta = subset_tables
            .iter()
            .filter(|(t, _)| t.contains_key("metadata_file"))
            .count();
        let kind = if with_meta == 0 {
            DatasetKind::DreamBooth
        } else if with_meta == subset_tables.len() {
            DatasetKind::FineTuning
        } else {
            return Err(DatasetError::MixedDatasetKinds {
                path: path.to_path_buf(),
                table: ds_name,
            });
        };
        let mut resolved = Vec::new();
        let mut seen = HashSet::new();
        for (st, name) in &subset_tables {
            if st.contains_key("conditioning_data_dir") {
                return Err(DatasetError::Unsupported {
                    option: format!("conditioning_data_dir in {name}"),
                    reason: if args.masked_loss {
                        "masked-loss (ControlNet-style) datasets are not implemented by sd-data yet"
                            .to_owned()
                    } else {
                        "it needs --masked_loss, and masked-loss datasets are not implemented by sd-data yet".to_owned()
                    },
                });
            }
            let chain = Chain {
                path,
                layers: vec![
                    (*st, name.clone()),
                    (ds, ds_name.clone()),
                    (general, "[general]".to_owned()),
                ],
            };
            let subset = resolve_subset(&chain, args, kind)?;
            let identity = match kind {
                DatasetKind::DreamBooth => {
                    subset
                        .image_dir
                        .clone()
                        .ok_or_else(|| DatasetError::MissingKey {
                            path: path.to_path_buf(),
                            table: name.clone(),
                            key: "image_dir".to_owned(),
                            hint: Some(
                                "DreamBooth subsets need the folder holding their images"
                                    .to_owned(),
                            ),
                        })?
                }
                DatasetKind::FineTuning => subset
                    .metadata_file
                    .clone()
                    .expect("fine-tuning subsets have metadata_file"),
            };
            if !seen.insert(identity.clone()) {
                warnings.push(format!(
                    "{name}: duplicate subset {} ignored",
                    identity.display()
                ));
                continue;
            }
            if subset.num_repeats < 1 {
                warnings.push(format!(
                    "{name}: num_repeats {} < 1, subset ignored",
                    subset.num_repeats
                ));
                continue;
            }
            if subset.cache_info {
                warnings.push(format!(
                    "{name}: cache_info has no effect (sizes and captions are read from the files)"
                ));
            }
            resolved.push(subset);
        }
        let chain = Chain {
            path,
            layers: vec![(ds, ds_name.clone()), (general, "[general]".to_owned())],
        };
        out.push(resolve_dataset_params(
            &chain,
            args,
            kind,
            resolved,
            &mut warnings,
            &ds_name,
        )?);
    }
    Ok(DatasetGroupConfig {
        datasets: out,
        warnings,
    })
}

/// Builds the dataset description from command-line options only (no `--dataset_config`),
/// spec §2.4–§2.5: with `--in_json` one fine-tuning subset; otherwise one DreamBooth
/// dataset whose subsets are the `N_tokens` sub-folders of `--train_data_dir` (and of
/// `--reg_data_dir`, as regularisation subsets).
///
/// # Compatibility
/// Sub-folders are taken in name order (the reference uses unsorted file-system order).
///
/// # Errors
/// Missing `--train_data_dir`/`--resolution`, unreadable folders, invalid option values.
pub fn config_from_args(args: &DatasetArgs) -> DatasetResult<DatasetGroupConfig> {
    let cli = Path::new(COMMAND_LINE);
    let mut warnings = Vec::new();
    let train_dir = args
        .train_data_dir
        .clone()
        .ok_or_else(|| DatasetError::MissingKey {
            path: cli.to_path_buf(),
            table: "options".to_owned(),
            key: "--train_data_dir".to_owned(),
            hint: Some("or give --dataset_config".to_owned()),
        })?;
    let (kind, subsets) = if let Some(meta) = &args.in_json {
        let mut t = toml::Table::new();
        t.insert(
            "image_dir".to_owned(),
            toml::Value::String(train_dir.to_string_lossy().into_owned()),
        );
        t.insert(
            "metadata_file".to_owned(),
            toml::Value::String(meta.to_string_lossy().into_owned()),
        );
        let chain = Chain {
            path: cli,
            layers: vec![(&t, "options".to_owned())],
        };
        (
            DatasetKind::FineTuning,
            vec![resolve_subset(&chain, args, DatasetKind::FineTuning)?],
        )
    } else {
        let mut subsets = Vec::new();
        for (dir, is_reg) in [
            (Some(&train_dir), false),
            (args.reg_data_dir.as_ref(), true),
        ] {
            let Some(dir) = dir else { continue };
            for (folder, repeats, tokens) in repeat_folders(dir, &mut warnings)? {
                let mut t = toml::Table::new();
                t.insert(
                    "image_dir".to_owned(),
                    toml::Value::String(folder.to_string_lossy().into_owned()),
                );
                t.insert("num_repeats".to_owned(), toml::Value::Integer(repeats));
                t.insert("class_tokens".to_owned(), toml::Value::String(tokens));
                t.insert("is_reg".to_owned(), toml::Value::Boolean(is_reg));
                let chain = Chain {
                    path: cli,
                    layers: vec![(&t, "options".to_owned())],
                };
                subsets.push(resolve_subset(&chain, args, DatasetKind::DreamBooth)?);
            }
        }
        (DatasetKind::DreamBooth, subsets)
    };
    let chain = Chain {
        path: cli,
        layers: vec![],
    };
    let ds = resolve_dataset_params(&chain, args, kind, subsets, &mut warnings, "options")?;
    Ok(DatasetGroupConfig {
        datasets: vec![ds],
        warnings,
    })
}

/// Parses a DreamBooth folder name `N_tokens` into (N, tokens). `"10"` gives (10, "").
/// `None` when the text before the first `_` is not an integer.
pub fn parse_repeat_folder(name: &str) -> Option<(i64, String)> {
    let (n, tokens) = name.split_once('_').unwrap_or((name, ""));
    n.parse::<i64>().ok().map(|n| (n, tokens.to_owned()))
}

fn repeat_folders(
    dir: &Path,
    warnings: &mut Vec<String>,
) -> DatasetResult<Vec<(PathBuf, i64, String)>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err("listing", dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    let mut out = Vec::new();
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match parse_repeat_folder(&name) {
            Some((n, tokens)) if n >= 1 => out.push((p, n, tokens)),
            Some((n, _)) => warnings.push(format!(
                "{}: repeat count {n} < 1, folder ignored",
                p.display()
            )),
            None => warnings.push(format!(
                "{}: folder name does not start with \"<repeats>_\", folder ignored",
                p.display()
            )),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folder_names() {
        assert_eq!(
            parse_repeat_folder("10_tok photo"),
            Some((10, "tok photo".to_owned()))
        );
        assert_eq!(parse_repeat_folder("3_a_b"), Some((3, "a_b".to_owned())));
        assert_eq!(parse_repeat_folder("10"), Some((10, String::new())));
        assert_eq!(parse_repeat_folder("x_cat"), None);
    }

    #[test]
    fn resolution_args() {
        assert_eq!(
            parse_resolution_arg("512").expect("ok"),
            Resolution::new(512, 512)
        );
        assert_eq!(
            parse_resolution_arg("768,512").expect("ok"),
            Resolution::new(768, 512)
        );
        assert!(parse_resolution_arg("0").is_err());
        assert!(parse_resolution_arg("1,2,3").is_err());
    }
}
