//! `sdxl-merge-lora`: the name of sd-scripts' `networks/sdxl_merge_lora.py` as a thin alias. It
//! runs the `merge-lora` binary next to it with `--sdxl` in front of the given arguments (one
//! binary handles every family; `--sdxl` makes it refuse SD1/SD2 checkpoints and LoRAs, as the
//! SDXL script would). Exit codes are `merge-lora`'s.

fn main() -> std::process::ExitCode {
    sd_cli::run_alias("merge-lora", &["--sdxl"])
}
