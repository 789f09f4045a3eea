//! Any bytes as a caption file, processed with options taken from the first bytes
//! (shuffle, keep_tokens, separators, wildcards, dropout, warmup).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sd_data::caption::{CaptionOptions, CaptionProgress, process_caption, read_caption_file};
use sd_data::dataset_rng::DataRng;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (head, body) = data.split_at(8);
    let dir = std::env::temp_dir().join(format!("sd-fuzz-cap-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("caption.txt");
    if std::fs::write(&path, body).is_err() {
        return;
    }
    let wildcard = head[0] & 1 != 0;
    let Ok(file) = read_caption_file(&path, wildcard) else {
        return;
    };
    let seps = [",", ";", " ", "", "|", "{", ",,"];
    let opts = CaptionOptions {
        shuffle_caption: head[0] & 2 != 0,
        caption_separator: seps[usize::from(head[1]) % seps.len()].to_owned(),
        keep_tokens: u32::from(head[2] % 8),
        keep_tokens_separator: if head[0] & 4 != 0 {
            "|||".into()
        } else {
            String::new()
        },
        secondary_separator: (head[0] & 8 != 0).then(|| ";;;".to_owned()),
        enable_wildcard: wildcard,
        caption_prefix: (head[0] & 16 != 0).then(|| "pre, {a|b}".to_owned()),
        caption_suffix: (head[0] & 32 != 0).then(|| ", suf".to_owned()),
        token_warmup_min: u32::from(head[3] % 5),
        token_warmup_step: f64::from(head[4]) / 64.0,
        caption_dropout_rate: f64::from(head[5]) / 255.0,
        caption_dropout_every_n_epochs: u32::from(head[6] % 4),
        caption_tag_dropout_rate: f64::from(head[7]) / 255.0,
    };
    let mut rng = DataRng::new(u64::from(head[1]), 7);
    for (epoch, step) in [(1, 0), (2, 5), (3, 1000)] {
        let progress = CaptionProgress {
            epoch,
            step,
            max_train_steps: 100,
        };
        let _ = process_caption(&file.caption, &opts, progress, &mut rng);
    }
});
