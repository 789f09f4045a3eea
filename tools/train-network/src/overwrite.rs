//! Training never writes over one of its input files (issue 12).
//!
//! The trainer names its outputs in `--output_dir` after `--output_name` (default `last`,
//! `at` or `epoch`): `<name>.<ext>`, `<name>-<epoch:06>.<ext>`, `<name>-step<step:08>.<ext>`,
//! `<name>-interrupted.<ext>`, and removes older ones with `--save_last_n_*`. A model or
//! `--network_weights` file under one of those names would be overwritten or removed.

use std::path::Path;

use crate::options::TrainOptions;

/// Refuses a run whose outputs could replace or remove an input file (the model file or
/// `--network_weights`), before any work.
///
/// # Errors
/// Names the input and the folder.
pub fn refuse_outputs_over_inputs(o: &TrainOptions) -> anyhow::Result<()> {
    let names: Vec<&str> = match &o.output.output_name {
        Some(n) => vec![n.as_str()],
        None => vec!["last", "at", "epoch"],
    };
    let Ok(out_dir) = o.output.output_dir.canonicalize() else {
        // Not there yet: no input can lie in it.
        return Ok(());
    };
    let inputs = [
        Some(&o.model.pretrained_model_name_or_path),
        o.network.network_weights.as_ref(),
    ];
    for input in inputs.into_iter().flatten() {
        if !input.is_file() {
            continue;
        }
        let (Some(parent), Some(file_name)) = (
            input
                .canonicalize()
                .ok()
                .as_deref()
                .and_then(Path::parent)
                .map(Path::to_path_buf),
            input.file_name().and_then(|n| n.to_str()),
        ) else {
            continue;
        };
        if parent == out_dir && names.iter().any(|n| is_output_name(file_name, n)) {
            anyhow::bail!(
                "{}: this input lies in --output_dir under a name the outputs use ({}.<ext>, {}-<epoch>.<ext>, {}-step<N>.<ext>, {}-interrupted.<ext>); it could be overwritten or removed: choose another --output_name or --output_dir",
                input.display(),
                names[0],
                names[0],
                names[0],
                names[0]
            );
        }
    }
    Ok(())
}

/// Whether `file_name` is one of the names the trainer writes for output name `name`.
fn is_output_name(file_name: &str, name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix(name) else {
        return false;
    };
    let Some((middle, ext)) = rest.rsplit_once('.') else {
        return false;
    };
    if ext.is_empty() || ext.contains('/') {
        return false;
    }
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    middle.is_empty()
        || middle == "-interrupted"
        || middle.strip_prefix("-step").is_some_and(|d| digits(d, 8))
        || middle.strip_prefix('-').is_some_and(|d| digits(d, 6))
}

#[cfg(test)]
mod tests {
    use super::is_output_name;

    #[test]
    fn output_names_are_recognised_exactly() {
        for yes in [
            "my lora.safetensors",
            "my lora-000003.safetensors",
            "my lora-step00000120.ckpt",
            "my lora-interrupted.safetensors",
        ] {
            assert!(is_output_name(yes, "my lora"), "{yes}");
        }
        for no in [
            "my lora-v2.safetensors",
            "my lora-3.safetensors",
            "my lora-step12.safetensors",
            "my lora",
            "other.safetensors",
            "my loras.safetensors",
        ] {
            assert!(!is_output_name(no, "my lora"), "{no}");
        }
    }
}
