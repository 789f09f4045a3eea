//! `sdxl-train-network`: the name of sd-scripts' `sdxl_train_network.py` as a thin alias. It
//! runs the `train-network` binary next to it with `--sdxl` in front of the given arguments
//! (one binary handles every family; the checkpoint decides, `--sdxl` turns on the SDXL option
//! checks). Signals (Ctrl-C saves the run) and exit codes are `train-network`'s.

fn main() -> std::process::ExitCode {
    sd_cli::run_alias("train-network", &["--sdxl"])
}
