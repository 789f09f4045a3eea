//! Conversion plans: for each tensor of the target layout, where its data comes from, with
//! shapes checked. Plans name keys and shapes only; moving the data is the caller's job
//! (sd-core with libtorch, or a byte-level copier in a tool).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::error::{KeyMapError, Result};
use super::{
    Component, ConstantShape, KeyMap, LdmFallback, ModelStructure, Op, is_ignorable_diffusers_key,
    is_ignorable_ldm_key,
};
use crate::family::ModelFamily;

/// How a Diffusers tensor is built from its single-file tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToDiffusersOp {
    /// Same data and shape.
    Copy,
    /// Same data, shape `[o, i, 1, 1]` -> `[o, i]` (VAE mid attention).
    Reshape,
    /// 2-D transpose (SDXL TE2 `text_projection`).
    Transpose,
    /// Rows `start..end` of the single-file tensor (q, k or v of OpenCLIP `in_proj_*`).
    Rows {
        /// First row.
        start: usize,
        /// One past the last row.
        end: usize,
    },
}

/// One Diffusers tensor of a [`ToDiffusersPlan`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffusersTarget {
    /// Diffusers key inside its component.
    pub key: String,
    /// Diffusers shape.
    pub shape: Vec<usize>,
    /// Single-file key the data comes from, as spelled in the input.
    pub ldm_key: String,
    /// Shape of that single-file tensor.
    pub ldm_shape: Vec<usize>,
    /// How the data is taken.
    pub op: ToDiffusersOp,
}

/// Plan for building Diffusers components from a single file.
#[derive(Debug, Clone)]
pub struct ToDiffusersPlan {
    /// Family the plan was made for.
    pub family: ModelFamily,
    /// Structure read from the keys.
    pub structure: ModelStructure,
    /// Targets per component, in table order.
    pub components: BTreeMap<Component, Vec<DiffusersTarget>>,
    /// Single-file keys Diffusers has no place for ([`Op::LdmOnly`]: SD2 resblock 23,
    /// `text_projection`, `logit_scale`; SDXL TE2 `logit_scale`), dropped by the conversion.
    pub ldm_only: Vec<String>,
    /// Known non-weight extras skipped ([`super::is_ignorable_ldm_key`]).
    pub ignored: Vec<String>,
}

impl ToDiffusersPlan {
    /// Targets of one component (empty when the file lacks it).
    pub fn targets(&self, component: Component) -> &[DiffusersTarget] {
        self.components.get(&component).map_or(&[], Vec::as_slice)
    }
}

/// How a single-file tensor is built from Diffusers tensors of `LdmTarget::component`.
#[derive(Debug, Clone, PartialEq)]
pub enum ToLdmOp {
    /// Same data and shape.
    Copy {
        /// Diffusers key.
        key: String,
    },
    /// Same data, `[o, i]` -> `[o, i, 1, 1]`.
    Reshape {
        /// Diffusers key.
        key: String,
    },
    /// 2-D transpose.
    Transpose {
        /// Diffusers key.
        key: String,
    },
    /// Row-wise concatenation in this order.
    ConcatRows {
        /// Diffusers keys (q, k, v).
        keys: Vec<String>,
    },
    /// Not in Diffusers: take the tensor from a reference checkpoint when the caller has one
    /// (keeps the original values, as sd-scripts' merge tools do); otherwise apply `fallback`.
    LdmOnly {
        /// What to write without a reference.
        fallback: LdmFallback,
    },
}

/// One single-file tensor of a [`ToLdmPlan`].
#[derive(Debug, Clone, PartialEq)]
pub struct LdmTarget {
    /// Single-file key.
    pub key: String,
    /// Single-file shape (`[]` for `logit_scale`).
    pub shape: Vec<usize>,
    /// Diffusers component the data comes from.
    pub component: Component,
    /// How the data is built.
    pub op: ToLdmOp,
}

/// Plan for writing a single file from Diffusers components.
#[derive(Debug, Clone)]
pub struct ToLdmPlan {
    /// Family the plan was made for.
    pub family: ModelFamily,
    /// Structure read from the keys.
    pub structure: ModelStructure,
    /// Single-file tensors in table order (U-Net, text encoder(s), VAE).
    pub targets: Vec<LdmTarget>,
    /// Diffusers keys skipped as known non-weight extras, as `component:key`.
    pub ignored: Vec<String>,
}

/// Single-file key in its canonical spelling: SD1's older text-encoder layout without the
/// `text_model.` level (`cond_stage_model.transformer.{embeddings,encoder,final_layer_norm}.…`)
/// gets it inserted, as sd-scripts does on load. Other keys are returned unchanged.
pub fn normalize_ldm_key(family: ModelFamily, key: &str) -> Cow<'_, str> {
    const P: &str = "cond_stage_model.transformer.";
    if family == ModelFamily::Sd1
        && let Some(rest) = key.strip_prefix(P)
        && ["embeddings.", "encoder.", "final_layer_norm."]
            .iter()
            .any(|s| rest.starts_with(s))
    {
        return Cow::Owned(format!("{P}text_model.{rest}"));
    }
    Cow::Borrowed(key)
}

fn mismatch(path: &str, key: &str, expected: &str, found: &[usize]) -> KeyMapError {
    KeyMapError::ShapeMismatch {
        path: path.to_string(),
        key: key.to_string(),
        expected: expected.to_string(),
        found: found.to_vec(),
    }
}

/// 1x1 conv weight `[o, i, 1, 1]` (or an already 2-D `[o, i]`) -> `[o, i]`.
fn squeeze_1x1(path: &str, key: &str, shape: &[usize]) -> Result<Vec<usize>> {
    match shape {
        [o, i, 1, 1] | [o, i] => Ok(vec![*o, *i]),
        _ => Err(mismatch(
            path,
            key,
            "[c_out, c_in, 1, 1] or [c_out, c_in]",
            shape,
        )),
    }
}

/// Plans the conversion of a single file (its (key, shape) list) to Diffusers components.
///
/// The structure is read from the keys; every key must be in the table or be a known
/// ignorable extra, and every required table key must be present.
///
/// # Errors
/// [`KeyMapError::UnmappedKeys`] listing unknown keys, [`KeyMapError::MissingKeys`],
/// [`KeyMapError::ShapeMismatch`] (e.g. an `in_proj_weight` whose rows are not divisible by
/// 3), [`KeyMapError::Structure`].
pub fn plan_to_diffusers<K, S>(
    family: ModelFamily,
    tensors: impl IntoIterator<Item = (K, S)>,
    path: &str,
) -> Result<ToDiffusersPlan>
where
    K: AsRef<str>,
    S: AsRef<[usize]>,
{
    let mut present: HashMap<String, (String, Vec<usize>)> = HashMap::new();
    let mut ignored = Vec::new();
    for (k, s) in tensors {
        let k = k.as_ref();
        if is_ignorable_ldm_key(k) {
            ignored.push(k.to_string());
            continue;
        }
        let canonical = normalize_ldm_key(family, k).into_owned();
        if let Some((other, _)) =
            present.insert(canonical.clone(), (k.to_string(), s.as_ref().to_vec()))
        {
            return Err(KeyMapError::Structure {
                path: path.to_string(),
                message: format!("keys {other:?} and {k:?} name the same tensor"),
            });
        }
    }
    ignored.sort();
    let map = KeyMap::for_ldm_keys(family, present.keys().map(String::as_str), path)?;

    let mut unmapped: Vec<String> = present
        .iter()
        .filter(|(k, _)| map.lookup_ldm(k).is_none())
        .map(|(_, (orig, _))| orig.clone())
        .collect();
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(KeyMapError::UnmappedKeys {
            path: path.to_string(),
            keys: unmapped,
        });
    }
    let mut missing: Vec<String> = map
        .entries()
        .iter()
        .filter(|e| !e.optional && !matches!(e.op, Op::LdmOnly(_)))
        .filter(|e| !present.contains_key(&e.ldm_key))
        .map(|e| e.ldm_key.clone())
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(KeyMapError::MissingKeys {
            path: path.to_string(),
            keys: missing,
        });
    }

    let mut components: BTreeMap<Component, Vec<DiffusersTarget>> = BTreeMap::new();
    let mut ldm_only = Vec::new();
    for e in map.entries() {
        let Some((orig, shape)) = present.get(&e.ldm_key) else {
            continue;
        };
        let target = |key: &str, shape: Vec<usize>, op| DiffusersTarget {
            key: key.to_string(),
            shape,
            ldm_key: orig.clone(),
            ldm_shape: present[&e.ldm_key].1.clone(),
            op,
        };
        let out = components.entry(e.component).or_default();
        match &e.op {
            Op::Copy => out.push(target(
                &e.diffusers_keys[0],
                shape.clone(),
                ToDiffusersOp::Copy,
            )),
            Op::Reshape => {
                let s = squeeze_1x1(path, orig, shape)?;
                out.push(target(&e.diffusers_keys[0], s, ToDiffusersOp::Reshape));
            }
            Op::Transpose => {
                let [a, b] = shape[..] else {
                    return Err(mismatch(path, orig, "a 2-D matrix", shape));
                };
                out.push(target(
                    &e.diffusers_keys[0],
                    vec![b, a],
                    ToDiffusersOp::Transpose,
                ));
            }
            Op::ConcatRows => {
                let n = e.diffusers_keys.len();
                let rows = match shape.first() {
                    Some(&r) if r % n == 0 => r / n,
                    _ => {
                        return Err(mismatch(
                            path,
                            orig,
                            &format!("rows divisible by {n} (stacked q, k, v)"),
                            shape,
                        ));
                    }
                };
                for (i, d) in e.diffusers_keys.iter().enumerate() {
                    let mut s = shape.clone();
                    s[0] = rows;
                    out.push(target(
                        d,
                        s,
                        ToDiffusersOp::Rows {
                            start: i * rows,
                            end: (i + 1) * rows,
                        },
                    ));
                }
            }
            Op::LdmOnly(_) => ldm_only.push(orig.clone()),
        }
    }
    components.retain(|_, v| !v.is_empty());
    Ok(ToDiffusersPlan {
        family,
        structure: map.structure().clone(),
        components,
        ldm_only,
        ignored,
    })
}

/// Plans writing a single file from Diffusers components given as (component, key, shape).
///
/// The structure is read from the keys. Single-file keys without a Diffusers counterpart are
/// planned as [`ToLdmOp::LdmOnly`]: the caller uses a reference checkpoint's tensor when it has
/// one, else the fallback (SD2: resblock 23 copied from layer 22, `text_projection` = ones,
/// `logit_scale` = 1, as sd-scripts writes; SDXL TE2 `logit_scale`: omitted).
///
/// # Errors
/// [`KeyMapError::UnmappedKeys`] (keys as `component:key`), [`KeyMapError::MissingKeys`],
/// [`KeyMapError::ShapeMismatch`] (q/k/v of different widths, non-2-D Reshape sources),
/// [`KeyMapError::Structure`].
pub fn plan_to_ldm<K, S>(
    family: ModelFamily,
    tensors: impl IntoIterator<Item = (Component, K, S)>,
    path: &str,
) -> Result<ToLdmPlan>
where
    K: AsRef<str>,
    S: AsRef<[usize]>,
{
    let mut present: HashMap<(Component, String), Vec<usize>> = HashMap::new();
    let mut ignored = Vec::new();
    for (c, k, s) in tensors {
        let k = k.as_ref();
        if is_ignorable_diffusers_key(k) {
            ignored.push(format!("{c}:{k}"));
            continue;
        }
        present.insert((c, k.to_string()), s.as_ref().to_vec());
    }
    ignored.sort();
    let structure = ModelStructure::from_diffusers_keys(
        family,
        present.keys().map(|(c, k)| (*c, k.as_str())),
        path,
    )?;
    let map = KeyMap::new(family, structure)?;

    let mut unmapped: Vec<String> = present
        .keys()
        .filter(|(c, k)| map.lookup_diffusers(*c, k).is_none())
        .map(|(c, k)| format!("{c}:{k}"))
        .collect();
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(KeyMapError::UnmappedKeys {
            path: path.to_string(),
            keys: unmapped,
        });
    }
    let has = |c: Component, k: &str| present.contains_key(&(c, k.to_string()));
    let mut missing = BTreeSet::new();
    let mut used = Vec::new();
    for e in map.entries() {
        let keys: Vec<&String> = match &e.op {
            Op::LdmOnly(LdmFallback::CopyOf(keys)) => keys.iter().collect(),
            Op::LdmOnly(_) => vec![],
            _ => e.diffusers_keys.iter().collect(),
        };
        let found = keys.iter().filter(|k| has(e.component, k)).count();
        if e.optional && found == 0 && !keys.is_empty() {
            continue;
        }
        for k in keys.iter().filter(|k| !has(e.component, k)) {
            missing.insert(format!("{}:{k}", e.component));
        }
        used.push(e);
    }
    if !missing.is_empty() {
        return Err(KeyMapError::MissingKeys {
            path: path.to_string(),
            keys: missing.into_iter().collect(),
        });
    }

    let shape_of = |c: Component, k: &str| -> &Vec<usize> { &present[&(c, k.to_string())] };
    let concat = |c: Component, keys: &[String], ldm_key: &str| -> Result<Vec<usize>> {
        let first = shape_of(c, &keys[0]);
        let mut rows = 0;
        for k in keys {
            let s = shape_of(c, k);
            if s.is_empty() || s[1..] != first[1..] {
                return Err(mismatch(
                    path,
                    &format!("{c}:{k}"),
                    &format!(
                        "trailing dims {:?} like {c}:{} (rows of {ldm_key})",
                        &first.get(1..),
                        keys[0]
                    ),
                    s,
                ));
            }
            rows += s[0];
        }
        let mut s = first.clone();
        s[0] = rows;
        Ok(s)
    };
    let mut targets = Vec::with_capacity(used.len());
    for e in used {
        let c = e.component;
        let (shape, op) = match &e.op {
            Op::Copy => {
                let k = &e.diffusers_keys[0];
                (shape_of(c, k).clone(), ToLdmOp::Copy { key: k.clone() })
            }
            Op::Reshape => {
                let k = &e.diffusers_keys[0];
                let s = squeeze_1x1(path, &format!("{c}:{k}"), shape_of(c, k))?;
                (vec![s[0], s[1], 1, 1], ToLdmOp::Reshape { key: k.clone() })
            }
            Op::Transpose => {
                let k = &e.diffusers_keys[0];
                let s = shape_of(c, k);
                let [a, b] = s[..] else {
                    return Err(mismatch(path, &format!("{c}:{k}"), "a 2-D matrix", s));
                };
                (vec![b, a], ToLdmOp::Transpose { key: k.clone() })
            }
            Op::ConcatRows => (
                concat(c, &e.diffusers_keys, &e.ldm_key)?,
                ToLdmOp::ConcatRows {
                    keys: e.diffusers_keys.clone(),
                },
            ),
            Op::LdmOnly(fallback) => {
                let shape = match fallback {
                    LdmFallback::CopyOf(keys) => concat(c, keys, &e.ldm_key)?,
                    LdmFallback::Constant {
                        shape: ConstantShape::Scalar,
                        ..
                    }
                    | LdmFallback::ReferenceOnly => vec![],
                    LdmFallback::Constant {
                        shape: ConstantShape::SquareHidden,
                        ..
                    } => {
                        const EMB: &str = "text_model.embeddings.token_embedding.weight";
                        match present.get(&(c, EMB.to_string())).map(Vec::as_slice) {
                            Some(&[_, w]) => vec![w, w],
                            Some(s) => {
                                return Err(mismatch(
                                    path,
                                    &format!("{c}:{EMB}"),
                                    "[vocab, width]",
                                    s,
                                ));
                            }
                            None => {
                                return Err(KeyMapError::MissingKeys {
                                    path: path.to_string(),
                                    keys: vec![format!("{c}:{EMB}")],
                                });
                            }
                        }
                    }
                };
                (
                    shape,
                    ToLdmOp::LdmOnly {
                        fallback: fallback.clone(),
                    },
                )
            }
        };
        targets.push(LdmTarget {
            key: e.ldm_key.clone(),
            shape,
            component: c,
            op,
        });
    }
    Ok(ToLdmPlan {
        family,
        structure: map.structure().clone(),
        targets,
        ignored,
    })
}
