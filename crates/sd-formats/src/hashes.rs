//! Model hashes stored in metadata: `sshs_model_hash`, `sshs_legacy_hash` (LoRA files) and
//! `ss_sd_model_hash` / `ss_new_sd_model_hash` (base checkpoints).
//!
//! # Source
//! `../shared/spec/lora-format.md` §9.3; sd-scripts `library/train_util.py`
//! (`precalculate_safetensors_hashes`, `model_hash`, `calculate_sha256`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::safetensors::{TensorToWrite, serialize_header};

/// Start of the window hashed by the legacy ("old webui") hash: 1 MiB.
pub const LEGACY_WINDOW_START: u64 = 0x10_0000;
/// Length of that window: 64 KiB.
pub const LEGACY_WINDOW_LEN: u64 = 0x1_0000;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The two `sshs_*` values of a LoRA file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshsHashes {
    /// `sshs_model_hash`: lowercase hex SHA-256 (64 chars) of the safetensors data section.
    pub model_hash: String,
    /// `sshs_legacy_hash`: first 8 hex chars of SHA-256 over bytes `[1 MiB, 1 MiB + 64 KiB)` of
    /// the serialisation whose metadata holds only the `ss_*` keys.
    pub legacy_hash: String,
}

/// Computes both `sshs_*` hashes for `tensors` and `metadata` exactly as the reference does
/// immediately before writing: the model hash over the data section in write order (dtype
/// descending, then name), the legacy hash over a serialisation whose `__metadata__` keeps only
/// keys starting with `ss_` (always present, `{}` when none).
///
/// The legacy hash is reproducible only when the reference would produce the same header
/// bytes; our headers sort metadata keys, the reference's order is random (spec §9.3).
///
/// # Errors
/// The errors of [`serialize_header`] (duplicate names, wrong data lengths); `path` only names
/// the destination in messages.
pub fn sshs_hashes(
    path: &Path,
    tensors: &[TensorToWrite<'_>],
    metadata: &BTreeMap<String, String>,
) -> Result<SshsHashes> {
    let ss_only: BTreeMap<String, String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let (header, order) = serialize_header(path, tensors, Some(&ss_only))?;

    let mut model = Sha256::new();
    let mut legacy = Sha256::new();
    // Absolute offset in the virtual file: 8-byte length, header, data.
    let mut pos: u64 = 0;
    let mut legacy_part = |bytes: &[u8], pos: &mut u64| {
        let start = *pos;
        let end = start + bytes.len() as u64;
        let lo = start.max(LEGACY_WINDOW_START);
        let hi = end.min(LEGACY_WINDOW_START + LEGACY_WINDOW_LEN);
        if lo < hi {
            legacy.update(&bytes[(lo - start) as usize..(hi - start) as usize]);
        }
        *pos = end;
    };
    legacy_part(&(header.len() as u64).to_le_bytes(), &mut pos);
    legacy_part(&header, &mut pos);
    for &i in &order {
        let data = &tensors[i].data;
        model.update(data);
        legacy_part(data, &mut pos);
    }
    let legacy_full = hex(&legacy.finalize());
    Ok(SshsHashes {
        model_hash: hex(&model.finalize()),
        legacy_hash: legacy_full[..8].to_string(),
    })
}

/// `sshs_model_hash` of raw data-section bytes (SHA-256, lowercase hex).
pub fn data_section_hash(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Legacy hash of a whole file's bytes: first 8 hex chars of SHA-256 of the 64 KiB at offset
/// 1 MiB (fewer bytes when shorter; `e3b0c442` for files of at most 1 MiB).
pub fn legacy_hash_of_bytes(bytes: &[u8]) -> String {
    let len = bytes.len() as u64;
    let lo = LEGACY_WINDOW_START.min(len) as usize;
    let hi = (LEGACY_WINDOW_START + LEGACY_WINDOW_LEN).min(len) as usize;
    hex(&Sha256::digest(&bytes[lo..hi]))[..8].to_string()
}

/// `ss_sd_model_hash` (legacy 8-char hash) and `ss_new_sd_model_hash` (full SHA-256) of a file
/// on disk, reading it once in 1 MiB chunks.
///
/// # Errors
/// [`Error::Io`] when the file cannot be read.
pub fn file_hashes(path: &Path) -> Result<(String, String)> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, "open", e))?;
    let mut full = Sha256::new();
    let mut legacy = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, "read", e))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        full.update(chunk);
        let end = pos + n as u64;
        let lo = pos.max(LEGACY_WINDOW_START);
        let hi = end.min(LEGACY_WINDOW_START + LEGACY_WINDOW_LEN);
        if lo < hi {
            legacy.update(&chunk[(lo - pos) as usize..(hi - pos) as usize]);
        }
        pos = end;
    }
    Ok((
        hex(&legacy.finalize())[..8].to_string(),
        hex(&full.finalize()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Dtype;

    #[test]
    fn small_files_give_the_empty_legacy_hash() {
        assert_eq!(legacy_hash_of_bytes(&[1, 2, 3]), "e3b0c442");
        let t = [TensorToWrite::new("a", Dtype::F32, vec![2], vec![0u8; 8])];
        let h = sshs_hashes(Path::new("x"), &t, &BTreeMap::new()).expect("valid tensors");
        assert_eq!(h.legacy_hash, "e3b0c442");
        assert_eq!(h.model_hash, data_section_hash(&[0u8; 8]));
    }

    #[test]
    fn legacy_window_spans_header_and_data() {
        // 2 MiB of data: the window lies inside the data section, after the header.
        let data: Vec<u8> = (0..(2u32 << 20)).map(|i| (i % 251) as u8).collect();
        let t = [TensorToWrite::new(
            "w",
            Dtype::U8,
            vec![data.len()],
            data.as_slice(),
        )];
        let mut meta = BTreeMap::new();
        meta.insert("ss_x".to_string(), "1".to_string());
        meta.insert("sshs_model_hash".to_string(), "ignored".to_string());
        let h = sshs_hashes(Path::new("x"), &t, &meta).expect("valid tensors");
        let only_ss: BTreeMap<String, String> = [("ss_x".to_string(), "1".to_string())]
            .into_iter()
            .collect();
        let (header, _) = serialize_header(Path::new("x"), &t, Some(&only_ss)).expect("header");
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&header);
        file.extend_from_slice(&data);
        assert_eq!(h.legacy_hash, legacy_hash_of_bytes(&file));
        assert_eq!(h.model_hash, data_section_hash(&data));
    }
}
