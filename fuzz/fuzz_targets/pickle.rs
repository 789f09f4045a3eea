//! Any bytes as a pickle stream (the VM, never executing globals), and the same bytes as a
//! .ckpt file (zip / legacy / raw pickle sniffing and tensor resolution).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_formats::ckpt::CkptFile;
use sd_formats::pickle::{self, Limits};

fuzz_target!(|data: &[u8]| {
    // Small limits so the fuzzer explores the limit checks instead of allocating.
    let limits = Limits {
        max_bytes: 1 << 20,
        max_nodes: 1 << 16,
        max_memo: 1 << 16,
        max_marks: 1 << 10,
    };
    if let Ok(p) = pickle::load(data, limits) {
        let _ = p.describe(p.root);
    }
    let dir = std::env::temp_dir().join(format!("sd-fuzz-pk-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("input.ckpt");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(file) = CkptFile::open(&path) {
        for name in file.names().to_vec() {
            let _ = file.info(&name);
            let _ = file.to_f32_vec(&name);
        }
    }
});
