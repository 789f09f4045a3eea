//! Filling a `VarStore` from named tensors, with every key and shape checked.

use std::collections::{BTreeSet, HashMap};

use tch::{Tensor, nn::VarStore};

/// Errors from loading weights into a model.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The source lacks tensors the model needs.
    #[error("{source_name}: missing {} key(s) the model needs: {}", keys.len(), preview(keys))]
    Missing {
        /// File or component the tensors came from.
        source_name: String,
        /// The missing variable names.
        keys: Vec<String>,
    },
    /// The source holds tensors the model has no place for (usually a wrong key map).
    #[error("{source_name}: {} key(s) match no model parameter: {}", keys.len(), preview(keys))]
    Unused {
        /// File or component the tensors came from.
        source_name: String,
        /// The unused tensor names.
        keys: Vec<String>,
    },
    /// A tensor's shape differs from the model parameter's.
    #[error(
        "{source_name}: shape mismatch for key \"{key}\": expected {expected:?}, found {found:?}"
    )]
    Shape {
        /// File or component the tensors came from.
        source_name: String,
        /// Variable name.
        key: String,
        /// Shape of the model parameter.
        expected: Vec<i64>,
        /// Shape of the tensor in the source.
        found: Vec<i64>,
    },
}

fn preview(keys: &[String]) -> String {
    let shown: Vec<&str> = keys.iter().take(8).map(String::as_str).collect();
    let more = if keys.len() > 8 {
        format!(", … ({} more)", keys.len() - 8)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

/// How strictly [`load_var_store`] treats keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Fail when the source has tensors no variable takes.
    pub deny_unused: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { deny_unused: true }
    }
}

/// Copies `tensors` (name → tensor, any float dtype and device) into the variables of `vs`,
/// casting to each variable's dtype and device (`copy_` semantics: the variables keep their
/// kind; loading an f16 file into an f32 model gives f32 values exactly).
///
/// `ignore` lists source keys known to be irrelevant (e.g. `text_model.embeddings.position_ids`).
///
/// # Errors
/// [`WeightsError::Missing`] when a variable has no tensor, [`WeightsError::Shape`] on a shape
/// difference, [`WeightsError::Unused`] for leftover tensors when `opts.deny_unused`.
pub fn load_var_store(
    vs: &VarStore,
    tensors: HashMap<String, Tensor>,
    source_name: &str,
    ignore: &[&str],
    opts: LoadOptions,
) -> Result<(), WeightsError> {
    let mut filler = VarStoreFiller::new(vs, source_name);
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        filler.put(name, &tensors[name])?;
    }
    filler.finish(ignore, opts)
}

/// Fills the variables of a `VarStore` one source tensor at a time, so a loader never holds
/// more than one converted tensor besides the model (the streaming form of
/// [`load_var_store`], same checks). Each [`VarStoreFiller::put`] copies into the variable of
/// that name, casting to its dtype and moving to its device; [`VarStoreFiller::finish`] reports
/// variables that got nothing and source names no variable took.
pub struct VarStoreFiller {
    vars: HashMap<String, Tensor>,
    source_name: String,
    filled: BTreeSet<String>,
    unused: Vec<String>,
}

impl VarStoreFiller {
    /// A filler for every variable of `vs`; `source_name` names the file or component in errors.
    pub fn new(vs: &VarStore, source_name: &str) -> Self {
        Self {
            vars: vs.variables(),
            source_name: source_name.to_owned(),
            filled: BTreeSet::new(),
            unused: Vec::new(),
        }
    }

    /// Copies `src` into the variable `name` (any float dtype and device; `copy_` semantics), or
    /// records `name` as unused when no variable has it.
    ///
    /// # Errors
    /// [`WeightsError::Shape`] when the shapes differ.
    pub fn put(&mut self, name: &str, src: &Tensor) -> Result<(), WeightsError> {
        let Some(var) = self.vars.get_mut(name) else {
            self.unused.push(name.to_owned());
            return Ok(());
        };
        if src.size() != var.size() {
            return Err(WeightsError::Shape {
                source_name: self.source_name.clone(),
                key: name.to_owned(),
                expected: var.size(),
                found: src.size(),
            });
        }
        tch::no_grad(|| var.copy_(src));
        self.filled.insert(name.to_owned());
        Ok(())
    }

    /// Checks that every variable was filled and, with `opts.deny_unused`, that every source
    /// name was used (names in `ignore` excepted).
    ///
    /// # Errors
    /// [`WeightsError::Missing`] / [`WeightsError::Unused`] listing the names (sorted).
    pub fn finish(self, ignore: &[&str], opts: LoadOptions) -> Result<(), WeightsError> {
        let mut missing: Vec<String> = self
            .vars
            .keys()
            .filter(|k| !self.filled.contains(*k))
            .cloned()
            .collect();
        missing.sort();
        if !missing.is_empty() {
            return Err(WeightsError::Missing {
                source_name: self.source_name,
                keys: missing,
            });
        }
        if opts.deny_unused {
            let mut unused: Vec<String> = self
                .unused
                .into_iter()
                .filter(|k| !ignore.contains(&k.as_str()))
                .collect();
            unused.sort();
            if !unused.is_empty() {
                return Err(WeightsError::Unused {
                    source_name: self.source_name,
                    keys: unused,
                });
            }
        }
        Ok(())
    }
}
