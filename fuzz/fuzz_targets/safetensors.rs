//! Any bytes as a .safetensors file: open (header validation), then read every tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_formats::safetensors::SafetensorsFile;
use sd_formats::tensor_file::TensorFile;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sd-fuzz-st-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(file) = SafetensorsFile::open(&path) {
        for name in file.names().to_vec() {
            let _ = file.data(&name);
            let _ = file.to_f32_vec(&name);
            let _ = file.has_non_finite(&name);
        }
        let _ = file.metadata();
    }
    // The format-sniffing entry point the tools use.
    if let Ok(file) = TensorFile::open(&path) {
        for name in file.names().to_vec() {
            let _ = file.to_f32_vec(&name);
        }
    }
});
