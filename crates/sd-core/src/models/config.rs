//! Reading Diffusers `config.json` files (U-Net, VAE) into typed model configs.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Errors from reading or validating a model configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The configuration file is not JSON.
    #[error("parsing {}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A key has a value of the wrong type or shape.
    #[error("{source_name}: key \"{key}\": expected {expected}, found {found}")]
    Field {
        /// The configuration's origin (file or preset name).
        source_name: String,
        /// The offending key.
        key: String,
        /// What was expected.
        expected: String,
        /// What was found.
        found: String,
    },
    /// A key holds a valid Diffusers value that this implementation does not build.
    #[error("{source_name}: unsupported {key} = {value} (supported: {supported})")]
    Unsupported {
        /// The configuration's origin.
        source_name: String,
        /// The key.
        key: String,
        /// Its value.
        value: String,
        /// What is supported.
        supported: String,
    },
    /// Values that are each valid but do not fit together.
    #[error("{source_name}: invalid configuration: {reason}")]
    Invalid {
        /// The configuration's origin.
        source_name: String,
        /// Why.
        reason: String,
    },
}

/// Reads and parses a JSON file.
///
/// # Errors
/// [`ConfigError::Io`] or [`ConfigError::Json`], naming the file.
pub fn read_json(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ConfigError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Typed access to the keys of one JSON object, with Diffusers' defaults for absent or null
/// keys and errors that name the key.
pub(crate) struct Fields<'a> {
    pub value: &'a Value,
    pub source_name: &'a str,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    pub fn err(&self, key: &str, expected: &str, found: &Value) -> ConfigError {
        ConfigError::Field {
            source_name: self.source_name.to_owned(),
            key: key.to_owned(),
            expected: expected.to_owned(),
            found: found.to_string(),
        }
    }

    pub fn unsupported(&self, key: &str, value: &Value, supported: &str) -> ConfigError {
        ConfigError::Unsupported {
            source_name: self.source_name.to_owned(),
            key: key.to_owned(),
            value: value.to_string(),
            supported: supported.to_owned(),
        }
    }

    /// Whether the key is present and not null.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub fn int(&self, key: &str, default: i64) -> Result<i64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_i64().ok_or_else(|| self.err(key, "an integer", v)),
        }
    }

    pub fn opt_int(&self, key: &str) -> Result<Option<i64>, ConfigError> {
        self.get(key)
            .map(|v| v.as_i64().ok_or_else(|| self.err(key, "an integer", v)))
            .transpose()
    }

    pub fn float(&self, key: &str, default: f64) -> Result<f64, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(key, "a number", v)),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(key, "true or false", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, ConfigError> {
        self.get(key)
            .map(|v| v.as_str().ok_or_else(|| self.err(key, "a string", v)))
            .transpose()
    }

    /// Requires an absent/null key or one of `allowed` string values.
    pub fn expect_str(
        &self,
        key: &str,
        allowed: &[&str],
        null_ok: bool,
    ) -> Result<(), ConfigError> {
        match self.get(key) {
            None if null_ok => Ok(()),
            Some(v) if v.as_str().is_some_and(|s| allowed.contains(&s)) => Ok(()),
            other => Err(self.unsupported(
                key,
                other.unwrap_or(&Value::Null),
                &format!(
                    "{}{}",
                    allowed.join(", "),
                    if null_ok { ", null" } else { "" }
                ),
            )),
        }
    }

    pub fn str_list(&self, key: &str) -> Result<Vec<String>, ConfigError> {
        let v = self
            .get(key)
            .ok_or_else(|| self.err(key, "a list of strings", &Value::Null))?;
        let items = v
            .as_array()
            .ok_or_else(|| self.err(key, "a list of strings", v))?;
        items
            .iter()
            .map(|s| {
                s.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| self.err(key, "a list of strings", v))
            })
            .collect()
    }

    pub fn int_list(&self, key: &str) -> Result<Vec<i64>, ConfigError> {
        let v = self
            .get(key)
            .ok_or_else(|| self.err(key, "a list of integers", &Value::Null))?;
        let items = v
            .as_array()
            .ok_or_else(|| self.err(key, "a list of integers", v))?;
        items
            .iter()
            .map(|s| {
                s.as_i64()
                    .ok_or_else(|| self.err(key, "a list of integers", v))
            })
            .collect()
    }

    /// An integer repeated `n` times, or a list of `n` integers; `None` when absent/null.
    pub fn int_or_list(&self, key: &str, n: usize) -> Result<Option<Vec<i64>>, ConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let expected = format!("an integer or a list of {n} integers");
        if let Some(i) = v.as_i64() {
            return Ok(Some(vec![i; n]));
        }
        let items = v.as_array().ok_or_else(|| self.err(key, &expected, v))?;
        if items.len() != n {
            return Err(self.err(key, &expected, v));
        }
        items
            .iter()
            .map(|s| s.as_i64().ok_or_else(|| self.err(key, &expected, v)))
            .collect::<Result<_, _>>()
            .map(Some)
    }
}
