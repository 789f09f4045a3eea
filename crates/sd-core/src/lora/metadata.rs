//! The minimum `ss_*` metadata that LoRA-writing tools add (spec §9.2), formatted as Python
//! `str()` / `json.dumps()` would.
//!
//! # Source
//! `../shared/spec/lora-format.md` §9.1–§9.2; sd-scripts `networks/*` tools' metadata blocks.

use std::collections::BTreeMap;

use sd_formats::family::ModelFamily;
use sd_formats::metadata::{PyValue, base_model_version};

/// Inputs of [`minimum_metadata`].
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkMetadata {
    /// Family the LoRA is for; `None` leaves `ss_v2`/`ss_base_model_version` out.
    pub family: Option<ModelFamily>,
    /// v-parameterization (`_v` suffix of `ss_base_model_version`).
    pub v_parameterization: bool,
    /// `ss_network_module` (`networks.lora`).
    pub network_module: String,
    /// `ss_network_dim`; `None` writes `None` as the reference does when the default was used.
    pub network_dim: Option<usize>,
    /// `ss_network_alpha`: a Python value (`PyValue::Int(1)` → `1`, `Float(16.0)` → `16.0`,
    /// `Str("Dynamic")`).
    pub network_alpha: PyValue,
    /// `ss_network_args` as (key, value) pairs in insertion order; written as JSON when given.
    pub network_args: Option<Vec<(String, PyValue)>>,
}

/// `ss_network_module`, `ss_network_dim`, `ss_network_alpha`, and when known `ss_v2`,
/// `ss_base_model_version`, `ss_network_args`.
pub fn minimum_metadata(m: &NetworkMetadata) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("ss_network_module".into(), m.network_module.clone());
    out.insert(
        "ss_network_dim".into(),
        PyValue::from(m.network_dim).py_str(),
    );
    out.insert("ss_network_alpha".into(), m.network_alpha.py_str());
    if let Some(f) = m.family {
        out.insert(
            "ss_v2".into(),
            PyValue::Bool(f == ModelFamily::Sd2).py_str(),
        );
        out.insert(
            "ss_base_model_version".into(),
            base_model_version(f, m.v_parameterization).into(),
        );
    }
    if let Some(args) = &m.network_args {
        let dict = PyValue::Dict(
            args.iter()
                .map(|(k, v)| (PyValue::Str(k.clone()), v.clone()))
                .collect(),
        );
        out.insert("ss_network_args".into(), dict.json_dumps());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values sd-scripts wrote into the SD1.5 C3Lier golden (tests/fixtures/lora).
    #[test]
    fn matches_the_golden_metadata() {
        let m = minimum_metadata(&NetworkMetadata {
            family: Some(ModelFamily::Sd1),
            v_parameterization: false,
            network_module: "networks.lora".into(),
            network_dim: Some(4),
            network_alpha: PyValue::Float(1.0),
            network_args: Some(vec![
                ("conv_dim".into(), "4".into()),
                ("conv_alpha".into(), "1".into()),
            ]),
        });
        let golden = sd_formats::safetensors::SafetensorsFile::open(sd_testutil::fixture(
            "lora/lora-sd15-conv.safetensors",
        ))
        .expect("golden");
        let want: BTreeMap<String, String> = golden
            .metadata()
            .iter()
            .filter(|(k, _)| k.starts_with("ss_"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(m, want);
        let none = minimum_metadata(&NetworkMetadata {
            family: None,
            v_parameterization: false,
            network_module: "networks.lora".into(),
            network_dim: None,
            network_alpha: PyValue::Int(1),
            network_args: None,
        });
        assert_eq!(none["ss_network_dim"], "None");
        assert_eq!(none["ss_network_alpha"], "1");
        assert_eq!(none.len(), 3);
    }
}
