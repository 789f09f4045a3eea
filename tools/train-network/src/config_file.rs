//! `--config_file` and `--output_config` (spec training.md §1.1).
//!
//! A config file is a TOML file of training *arguments* with the options' snake_case names
//! as keys. Top-level keys and the keys of every table are read (table names do not
//! matter). Its values act as defaults: an option given on the command line wins. Values
//! keep their TOML types: a float option takes a float or an integer, an integer option an
//! integer, a flag a boolean, a list option an array (or one value), a text option a string.
//!
//! # Compatibility
//! * Unknown keys are an error naming the key and the file (sd-scripts sets them silently).
//! * sd-scripts lets a key in a later table overwrite the same key in an earlier one; here
//!   the same key with two different values is an error, since TOML tables carry no order
//!   that the port wants to depend on.
//! * `config_file` and `output_config` keys inside a file are ignored, as sd-scripts never
//!   writes them.

use std::any::TypeId;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};

/// Keys never read from or written to a config file.
const SKIPPED_KEYS: &[&str] = &["config_file", "output_config", "print_config"];

/// Keys left out of `--output_config` files besides [`SKIPPED_KEYS`] (secrets).
const SECRET_KEYS: &[&str] = &["wandb_api_key", "huggingface_token"];

/// Text options whose TOML value may also be a number (sd-scripts parses them itself).
const NUMBER_AS_TEXT: &[&str] = &["lr_warmup_steps", "lr_decay_steps", "resolution"];

/// The TOML type an option's values take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A flag: `true` sets it, `false` leaves it unset.
    Bool,
    /// A TOML integer.
    Int,
    /// A TOML float or integer.
    Float,
    /// A TOML string.
    Text,
    /// A TOML string, integer or float (see `NUMBER_AS_TEXT`).
    TextOrNumber,
}

impl ValueKind {
    fn name(self) -> &'static str {
        match self {
            ValueKind::Bool => "a boolean",
            ValueKind::Int => "an integer",
            ValueKind::Float => "a float",
            ValueKind::Text => "a string",
            ValueKind::TextOrNumber => "a string or a number",
        }
    }
}

/// The config-file type of one option: its value kind and whether it takes a list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgKind {
    /// Type of each value.
    pub value: ValueKind,
    /// A list option (`nargs="*"`).
    pub list: bool,
}

/// The config-file type of a clap argument, from its action and value parser.
pub fn arg_kind(arg: &Arg) -> ArgKind {
    let list = matches!(arg.get_action(), ArgAction::Append);
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return ArgKind {
            value: ValueKind::Bool,
            list: false,
        };
    }
    let ty = arg.get_value_parser().type_id();
    let value = if ty == TypeId::of::<f64>() {
        ValueKind::Float
    } else if ty == TypeId::of::<i64>() {
        ValueKind::Int
    } else if NUMBER_AS_TEXT.contains(&arg.get_id().as_str()) {
        ValueKind::TextOrNumber
    } else {
        ValueKind::Text
    };
    ArgKind { value, list }
}

/// The file `--config_file NAME` refers to: NAME, with ".toml" appended unless it already
/// ends in ".toml".
pub fn config_path(name: &str) -> PathBuf {
    if name.ends_with(".toml") {
        PathBuf::from(name)
    } else {
        PathBuf::from(format!("{name}.toml"))
    }
}

/// One key of a flattened config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: toml::Value,
    /// Where it was written: "top level" or `[table]`.
    pub place: String,
}

/// Reads a config file and flattens its tables.
///
/// # Errors
/// A missing or unreadable file, TOML syntax, or a key set to two different values in two
/// tables — each naming the file.
pub fn read_flat(path: &Path) -> anyhow::Result<Vec<Entry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        anyhow::anyhow!(
            "config file {}: invalid TOML: {}",
            path.display(),
            e.to_string().trim_end()
        )
    })?;
    flatten(table, path)
}

fn flatten(table: toml::Table, path: &Path) -> anyhow::Result<Vec<Entry>> {
    let mut out: BTreeMap<String, Entry> = BTreeMap::new();
    let mut push = |key: String, value: toml::Value, place: String| -> anyhow::Result<()> {
        if let Some(prev) = out.get(&key) {
            if prev.value != value {
                bail!(
                    "config file {}: key \"{key}\" is set in {} and in {} with different values",
                    path.display(),
                    prev.place,
                    place
                );
            }
            return Ok(());
        }
        out.insert(key.clone(), Entry { key, value, place });
        Ok(())
    };
    for (name, value) in table {
        match value {
            toml::Value::Table(inner) => {
                for (key, value) in inner {
                    push(key, value, format!("[{name}]"))?;
                }
            }
            other => push(name, other, "the top level".to_owned())?,
        }
    }
    Ok(out.into_values().collect())
}

/// Config-file values turned into command-line tokens.
#[derive(Debug, Clone, Default)]
pub struct FileArguments {
    /// Tokens to put before the real command line (`--key=value` …).
    pub tokens: Vec<OsString>,
    /// Ids of the options they set.
    pub ids: Vec<String>,
}

fn toml_type(v: &toml::Value) -> &'static str {
    match v {
        toml::Value::String(_) => "a string",
        toml::Value::Integer(_) => "an integer",
        toml::Value::Float(_) => "a float",
        toml::Value::Boolean(_) => "a boolean",
        toml::Value::Datetime(_) => "a date-time",
        toml::Value::Array(_) => "an array",
        toml::Value::Table(_) => "a table",
    }
}

/// Formats one scalar of kind `kind`, or says what was found instead.
fn scalar_text(kind: ValueKind, v: &toml::Value) -> Option<String> {
    match (kind, v) {
        (ValueKind::Int, toml::Value::Integer(i)) => Some(i.to_string()),
        (ValueKind::Float, toml::Value::Integer(i)) => Some(i.to_string()),
        (ValueKind::Float, toml::Value::Float(f)) => Some(format_float(*f)),
        (ValueKind::Text | ValueKind::TextOrNumber, toml::Value::String(s)) => Some(s.clone()),
        (ValueKind::TextOrNumber, toml::Value::Integer(i)) => Some(i.to_string()),
        (ValueKind::TextOrNumber, toml::Value::Float(f)) => Some(format_float(*f)),
        _ => None,
    }
}

/// A float as Rust parses it back exactly (`1e-4` → "0.0001").
fn format_float(f: f64) -> String {
    format!("{f:?}")
}

/// Type-checks the config-file entries against `cmd` and turns the ones the command line
/// does not give (`cli_given`) into tokens.
///
/// # Errors
/// An unknown key (naming the key and the file), or a value of the wrong TOML type (naming
/// the key, the expected and the found type).
pub fn to_arguments(
    cmd: &Command,
    entries: &[Entry],
    cli_given: &BTreeSet<String>,
    path: &Path,
) -> anyhow::Result<FileArguments> {
    let mut out = FileArguments::default();
    for entry in entries {
        let key = entry.key.as_str();
        if SKIPPED_KEYS.contains(&key) {
            tracing::debug!("config file {}: ignoring key \"{key}\"", path.display());
            continue;
        }
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(key) && a.get_id().as_str() == key)
        else {
            bail!(
                "config file {}: unknown key \"{key}\" in {} (keys are train-network option names, e.g. \"network_dim\")",
                path.display(),
                entry.place
            );
        };
        let kind = arg_kind(arg);
        let wrong = |expected: String| {
            anyhow::anyhow!(
                "config file {}: key \"{key}\": expected {expected}, found {}",
                path.display(),
                toml_type(&entry.value)
            )
        };
        let values: Vec<String> = if kind.value == ValueKind::Bool {
            match entry.value {
                toml::Value::Boolean(true) => vec![],
                toml::Value::Boolean(false) => continue,
                _ => return Err(wrong(ValueKind::Bool.name().to_owned())),
            }
        } else if kind.list {
            let items: Vec<&toml::Value> = match &entry.value {
                toml::Value::Array(a) => a.iter().collect(),
                scalar => vec![scalar],
            };
            items
                .into_iter()
                .map(|v| {
                    scalar_text(kind.value, v).ok_or_else(|| {
                        anyhow::anyhow!(
                            "config file {}: key \"{key}\": expected an array of {}s, found {} in it",
                            path.display(),
                            kind.value.name().trim_start_matches("a ").trim_start_matches("an "),
                            toml_type(v)
                        )
                    })
                })
                .collect::<anyhow::Result<_>>()?
        } else {
            vec![
                scalar_text(kind.value, &entry.value)
                    .ok_or_else(|| wrong(kind.value.name().to_owned()))?,
            ]
        };
        if cli_given.contains(key) {
            continue;
        }
        if kind.value == ValueKind::Bool {
            out.tokens.push(format!("--{key}").into());
        } else if values.is_empty() {
            // An empty list: the option given with no values.
            out.tokens.push(format!("--{key}").into());
        } else {
            for v in values {
                out.tokens.push(format!("--{key}={v}").into());
            }
        }
        out.ids.push(key.to_owned());
    }
    Ok(out)
}

/// Builds the `--output_config` TOML: every option given (on the command line) whose value
/// differs from its default, except config-file options and secrets, with typed values.
///
/// # Errors
/// A value that does not convert to its TOML type (cannot happen for values clap accepted).
pub fn output_config_table(cmd: &Command, matches: &ArgMatches) -> anyhow::Result<toml::Table> {
    let mut table = toml::Table::new();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if arg.get_long().is_none()
            || SKIPPED_KEYS.contains(&id)
            || SECRET_KEYS.contains(&id)
            || crate::args::OWN_OPTIONS.contains(&id)
            || matches.value_source(id) != Some(ValueSource::CommandLine)
        {
            continue;
        }
        let kind = arg_kind(arg);
        if kind.value == ValueKind::Bool {
            table.insert(id.to_owned(), toml::Value::Boolean(true));
            continue;
        }
        let raw: Vec<String> = matches
            .get_raw(id)
            .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if !kind.list && raw == defaults {
            continue;
        }
        let typed = |s: &str| -> anyhow::Result<toml::Value> {
            Ok(match kind.value {
                ValueKind::Int => toml::Value::Integer(
                    s.parse()
                        .with_context(|| format!("--{id}: \"{s}\" is not an integer"))?,
                ),
                ValueKind::Float => toml::Value::Float(
                    s.parse()
                        .with_context(|| format!("--{id}: \"{s}\" is not a number"))?,
                ),
                _ => toml::Value::String(s.to_owned()),
            })
        };
        let value = if kind.list {
            toml::Value::Array(
                raw.iter()
                    .map(|s| typed(s))
                    .collect::<anyhow::Result<_>>()?,
            )
        } else {
            match raw.first() {
                Some(s) => typed(s)?,
                None => continue,
            }
        };
        table.insert(id.to_owned(), value);
    }
    Ok(table)
}

/// `--output_config`: writes [`output_config_table`] to `path`, refusing to overwrite.
///
/// # Errors
/// `path` exists, or writing fails.
pub fn write_output_config(cmd: &Command, matches: &ArgMatches, path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        bail!(
            "config file {} already exists; --output_config does not overwrite it",
            path.display()
        );
    }
    let table = output_config_table(cmd, matches)?;
    let text = toml::to_string(&table).context("formatting the config file")?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating config file {}", path.display()))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("writing config file {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{CliError, command, parse_from};

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write test file");
        p
    }

    #[test]
    fn toml_suffix_is_appended() {
        assert_eq!(config_path("cfg"), PathBuf::from("cfg.toml"));
        assert_eq!(config_path("cfg.toml"), PathBuf::from("cfg.toml"));
        assert_eq!(config_path("a.b"), PathBuf::from("a.b.toml"));
    }

    #[test]
    fn precedence_cli_over_file_over_default() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = write(
            dir.path(),
            "cfg.toml",
            r#"
            learning_rate = 1e-4          # file wins over the default
            network_dim = 16              # the command line wins over this
            [model]
            pretrained_model_name_or_path = "base.safetensors"
            v2 = true
            [extra]
            network_args = ["conv_dim=4", "conv_alpha=1"]
            text_encoder_lr = 5e-5        # one value for a list option
            cache_latents = false         # false leaves a flag unset
            max_train_steps = 10
            "#,
        );
        // Without the suffix: ".toml" is appended.
        let stem = dir.path().join("cfg");
        let p = parse_from([
            "train-network",
            "--config_file",
            stem.to_str().expect("utf-8 path"),
            "--network_dim=8",
            "--max_train_steps",
            "20",
        ])
        .expect("parses");
        assert_eq!(p.config_file.as_deref(), Some(cfg.as_path()));
        let a = &p.args;
        assert_eq!(a.optimization.learning_rate, 1e-4);
        assert_eq!(a.network.network_dim, Some(8));
        assert_eq!(a.optimization.max_train_steps, 20);
        assert!(a.model.v2);
        assert_eq!(
            a.model.pretrained_model_name_or_path,
            Some(PathBuf::from("base.safetensors"))
        );
        assert_eq!(a.network.network_args, ["conv_dim=4", "conv_alpha=1"]);
        assert_eq!(a.optimization.text_encoder_lr, [5e-5]);
        assert!(!a.caching.cache_latents);
        assert_eq!(a.network.network_alpha, 1.0, "default kept");
        let from_file: Vec<&str> = p.from_file.iter().map(String::as_str).collect();
        assert_eq!(
            from_file,
            [
                "learning_rate",
                "network_args",
                "pretrained_model_name_or_path",
                "text_encoder_lr",
                "v2"
            ]
        );
        assert!(p.given.contains("network_dim") && p.given.contains("learning_rate"));
        assert!(!p.given.contains("cache_latents"));
    }

    fn config_error(text: &str) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = write(dir.path(), "c.toml", text);
        match parse_from([
            "train-network",
            "--config_file",
            cfg.to_str().expect("utf-8"),
        ]) {
            Err(CliError::Config(e)) => format!("{e:#}"),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let err = config_error("[training]\nnetwork_dimm = 4\n");
        assert!(
            err.contains("unknown key \"network_dimm\" in [training]"),
            "{err}"
        );
        assert!(err.contains("c.toml"), "{err}");
    }

    #[test]
    fn wrong_types_name_key_expected_and_found() {
        let err = config_error("learning_rate = \"1e-4\"\n");
        assert!(
            err.contains("key \"learning_rate\": expected a float, found a string"),
            "{err}"
        );
        let err = config_error("network_dim = 4.0\n");
        assert!(
            err.contains("key \"network_dim\": expected an integer, found a float"),
            "{err}"
        );
        let err = config_error("v2 = 1\n");
        assert!(
            err.contains("key \"v2\": expected a boolean, found an integer"),
            "{err}"
        );
        let err = config_error("network_args = [4]\n");
        assert!(
            err.contains("key \"network_args\": expected an array of strings, found an integer"),
            "{err}"
        );
        let err = config_error("output_name = [\"a\"]\n");
        assert!(
            err.contains("key \"output_name\": expected a string, found an array"),
            "{err}"
        );
        // A value clap rejects names the file.
        let err = config_error("mixed_precision = \"fp8\"\n");
        assert!(err.contains("c.toml") && err.contains("fp8"), "{err}");
    }

    #[test]
    fn int_is_accepted_for_float_and_numbers_for_warmup() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = write(
            dir.path(),
            "c.toml",
            "network_alpha = 8\nlr_warmup_steps = 0.1\nresolution = 512\n",
        );
        let p = parse_from([
            "train-network",
            "--config_file",
            cfg.to_str().expect("utf-8"),
        ])
        .expect("parses");
        assert_eq!(p.args.network.network_alpha, 8.0);
        assert_eq!(p.args.optimization.lr_warmup_steps, "0.1");
        assert_eq!(p.args.dataset.resolution.as_deref(), Some("512"));
    }

    #[test]
    fn conflicting_tables_are_an_error() {
        let err = config_error("[a]\nnetwork_dim = 4\n[b]\nnetwork_dim = 8\n");
        assert!(
            err.contains("\"network_dim\" is set in [a] and in [b]"),
            "{err}"
        );
    }

    #[test]
    fn missing_file_is_a_config_error() {
        let err = match parse_from(["train-network", "--config_file", "/nonexistent/x"]) {
            Err(CliError::Config(e)) => format!("{e:#}"),
            other => panic!("expected a config error, got {other:?}"),
        };
        assert!(err.contains("/nonexistent/x.toml"), "{err}");
    }

    #[test]
    fn output_config_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("saved.toml");
        let argv = [
            "train-network",
            "--config_file",
            out.to_str().expect("utf-8"),
            "--output_config",
            "--network_dim",
            "8",
            "--learning_rate",
            "1e-4",
            "--network_args",
            "conv_dim=4",
            "--xformers",
            "--wandb_api_key",
            "secret",
            "--max_train_steps",
            "1600",
        ];
        let p = parse_from(argv).expect("parses");
        write_output_config(&command(), &p.matches, &out).expect("written");
        let table: toml::Table = std::fs::read_to_string(&out)
            .expect("read")
            .parse()
            .expect("toml");
        let keys: Vec<&str> = table.keys().map(String::as_str).collect();
        // max_train_steps equals the default and the API key is a secret: both left out.
        assert_eq!(
            keys,
            ["learning_rate", "network_args", "network_dim", "xformers"]
        );
        assert_eq!(table["learning_rate"], toml::Value::Float(1e-4));
        assert_eq!(table["network_dim"], toml::Value::Integer(8));
        // The written file reads back as the same options.
        let q = parse_from([
            "train-network",
            "--config_file",
            out.to_str().expect("utf-8"),
        ])
        .expect("reads back");
        assert_eq!(q.args.network.network_dim, Some(8));
        assert_eq!(q.args.optimization.learning_rate, 1e-4);
        assert_eq!(q.args.network.network_args, ["conv_dim=4"]);
        // Never overwrites.
        let err = write_output_config(&command(), &p.matches, &out).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
    }
}
