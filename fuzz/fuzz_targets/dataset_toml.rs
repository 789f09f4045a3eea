//! Any text as a dataset config: TOML syntax, then key/type/value resolution.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sd_data::config::{DatasetArgs, resolve_dataset_table};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = text.parse::<toml::Table>() else {
        return;
    };
    let _ = resolve_dataset_table(&table, Path::new("fuzz.toml"), &DatasetArgs::default());
});
