//! Issue 12: interruption. SIGINT during training saves the LoRA and the state and exits 130
//! within seconds, and `--resume` continues from that state; SIGKILL at any moment of a save
//! never leaves a partial file under the final name; outputs never overwrite inputs, also with
//! spaces and non-ASCII characters in paths.
#![cfg(unix)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sd_formats::safetensors::SafetensorsFile;
use sd_testutil::fixture;

use crate::tools::{optional_tool, tool};

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill {sig} {pid}");
}

/// One 64-px image with a caption in `<dir>/10_tok photo/`.
fn tiny_dataset(dir: &Path) {
    let sub = dir.join("10_tok photo");
    fs::create_dir_all(&sub).expect("mkdir");
    fs::copy(
        fixture("train-images/10_tok photo/astronaut.jpg"),
        sub.join("astronaut.jpg"),
    )
    .expect("copy image");
    fs::write(sub.join("astronaut.txt"), "tok photo, astronaut").expect("caption");
}

#[test]
fn issue_12_sigint_saves_lora_and_state_exits_130_and_resume_continues() {
    let tmp = tempfile::tempdir().expect("temp dir");
    // A space and non-ASCII letters in every path the trainer sees.
    let root = tmp.path().join("run é 日本");
    let data = root.join("data set");
    tiny_dataset(&data);
    let out_dir = root.join("out dir");
    let common = |cmd: &mut Command| {
        cmd.arg("--pretrained_model_name_or_path")
            .arg(fixture("tiny-sd15"))
            .arg("--train_data_dir")
            .arg(&data)
            .arg("--output_dir")
            .arg(&out_dir)
            .args([
                "--resolution",
                "64",
                "--caption_extension",
                ".txt",
                "--network_module",
                "networks.lora",
                "--output_name",
                "ä run",
                "--seed",
                "7",
                "--max_train_steps",
                "100000",
                "--no_progress",
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1");
    };
    let mut cmd = Command::new(tool("train-network"));
    common(&mut cmd);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting train-network");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
    let mut log = String::new();
    for line in lines.by_ref() {
        let line = line.expect("stderr line");
        log.push_str(&line);
        log.push('\n');
        if line.contains("step 2 ") {
            break;
        }
    }
    assert!(log.contains("step 2 "), "no step logged:\n{log}");
    signal(child.id(), "-INT");
    let sent = Instant::now();
    // Keep draining stderr so the child never blocks on a full pipe.
    let reader = std::thread::spawn(move || {
        let mut rest = String::new();
        for line in lines.map_while(Result::ok) {
            rest.push_str(&line);
            rest.push('\n');
        }
        rest
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting") {
            break status;
        }
        if sent.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("train-network still running 60 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = sent.elapsed();
    log.push_str(&reader.join().expect("reader thread"));
    assert!(!log.contains("panicked at"), "{log}");
    assert_eq!(status.code(), Some(130), "{log}");
    // "A few seconds" on an idle machine; generous for 2 shared cores and a debug build.
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    let step: u64 = log
        .lines()
        .find_map(|l| l.split("interrupted at step ").nth(1))
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 'interrupted at step N' line:\n{log}"));
    assert!(step >= 2, "{log}");
    let lora = out_dir.join("ä run-interrupted.safetensors");
    let state = out_dir.join("ä run-interrupted-state");
    let file = SafetensorsFile::open(&lora).expect("interrupted LoRA loads");
    assert!(
        file.names().iter().any(|n| n.ends_with(".lora_up.weight")),
        "no LoRA keys"
    );
    assert!(state.is_dir(), "{}", state.display());
    // No temporary leftovers besides the two outputs.
    let mut names: Vec<String> = fs::read_dir(&out_dir)
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["ä run-interrupted-state", "ä run-interrupted.safetensors"],
        "{log}"
    );

    // Resume: continues after the saved step and ends at --max_train_steps.
    let target = step + 2;
    let mut cmd = Command::new(tool("train-network"));
    common(&mut cmd);
    let out = cmd
        .args(["--max_train_steps", &target.to_string()])
        .arg("--resume")
        .arg(&state)
        .output()
        .expect("resuming train-network");
    let resumed = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{resumed}");
    assert!(resumed.contains("resumed from"), "{resumed}");
    assert!(
        !resumed.contains("step 1 ") && resumed.contains(&format!("step {} ", step + 1)),
        "the resumed run does not continue at step {}:\n{resumed}",
        step + 1
    );
    assert!(resumed.contains(&format!("step {target} ")), "{resumed}");
    assert!(out_dir.join("ä run.safetensors").is_file(), "{resumed}");

    // Exactness: an uninterrupted run of `target` steps ends with the same tensors, bit for bit
    // (CPU; the metadata differs by its dates).
    let reference_dir = root.join("reference");
    let mut cmd = Command::new(tool("train-network"));
    common(&mut cmd);
    let out = cmd
        .args(["--max_train_steps", &target.to_string(), "--output_dir"])
        .arg(&reference_dir)
        .output()
        .expect("uninterrupted train-network");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed_file = SafetensorsFile::open(out_dir.join("ä run.safetensors")).expect("loads");
    let reference_file =
        SafetensorsFile::open(reference_dir.join("ä run.safetensors")).expect("loads");
    let mut names = reference_file.names().to_vec();
    names.sort();
    let mut resumed_names = resumed_file.names().to_vec();
    resumed_names.sort();
    assert_eq!(resumed_names, names);
    for name in &names {
        assert!(
            resumed_file.data(name).expect("data") == reference_file.data(name).expect("data"),
            "{name}: resumed after SIGINT at step {step} differs from an uninterrupted run"
        );
    }
    // The comparison is not vacuous: the interrupted LoRA (step {step}) differs.
    assert!(
        names
            .iter()
            .any(|n| file.data(n).ok() != reference_file.data(n).ok()),
        "training did not change the weights"
    );
}

/// Key set of the output a complete merge writes.
fn complete_keys(path: &Path) -> Vec<String> {
    let file = SafetensorsFile::open(path).expect("complete output loads");
    let mut names = file.names().to_vec();
    names.sort();
    names
}

#[test]
fn issue_12_sigkill_during_save_never_leaves_a_partial_file_under_the_final_name() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("kill loop ü");
    fs::create_dir(&dir).expect("mkdir");
    let final_name = dir.join("merged model.safetensors");
    // merge-lora into the tiny checkpoint writes ~7 MB; its run time spans parse, merge, write.
    let merge = |save: &Path| {
        let mut cmd = Command::new(tool("merge-lora"));
        cmd.arg("--sd_model")
            .arg(fixture("tiny-sd15.safetensors"))
            .arg("--models")
            .arg(fixture("lora/lora-sd15.safetensors"))
            .args([
                "--ratios",
                "0.5",
                "--save_precision",
                "float",
                "-q",
                "--save_to",
            ])
            .arg(save)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        cmd
    };
    let reference = tmp.path().join("reference.safetensors");
    let start = Instant::now();
    let status = merge(&reference).status().expect("merge runs");
    let full = start.elapsed();
    assert!(status.success());
    let expected = complete_keys(&reference);
    let reference_file = SafetensorsFile::open(&reference).expect("reference loads");

    // Kill times spread over the whole run (and a little past it), deterministic.
    let rounds = 24u32;
    let mut complete = 0;
    for i in 0..rounds {
        let _ = fs::remove_file(&final_name);
        let delay = full.mul_f64(f64::from(i) / f64::from(rounds - 4));
        let mut child = merge(&final_name).spawn().expect("merge starts");
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        if final_name.exists() {
            // Present means complete: valid, all keys, byte-identical to a finished run.
            // Same keys and tensor bytes as a finished run (the metadata holds the date).
            assert_eq!(complete_keys(&final_name), expected, "round {i}");
            let got = SafetensorsFile::open(&final_name).expect("loads");
            for key in &expected {
                assert!(
                    got.data(key).expect("tensor data") == reference_file.data(key).expect("data"),
                    "round {i}: {key} differs from a complete run"
                );
            }
            complete += 1;
        }
        // Temporary files may stay after SIGKILL (nothing can remove them), but never under
        // a name a tool would read as the output.
        for e in fs::read_dir(&dir).expect("dir") {
            let name = e.expect("entry").file_name().to_string_lossy().into_owned();
            assert!(
                name == "merged model.safetensors" || !name.ends_with(".safetensors"),
                "round {i}: stray {name}"
            );
        }
    }
    // The loop must have killed some runs and let at least one finish.
    assert!(complete < rounds, "no run was killed");
    assert!(complete > 0, "no run completed");
}

#[test]
fn issue_12_outputs_never_overwrite_inputs() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let input = tmp.path().join("my lora ß.safetensors");
    fs::copy(fixture("lora/lora-sd15.safetensors"), &input).expect("copy");
    let before = fs::read(&input).expect("read");
    for (bin, extra) in [
        ("merge-lora", vec![]),
        ("svd-merge-lora", vec!["--new_rank", "2"]),
    ] {
        let out = Command::new(tool(bin))
            .arg("--models")
            .arg(&input)
            .args(["--ratios", "1"])
            .args(&extra)
            .arg("--save_to")
            .arg(&input)
            .env_remove("RUST_LOG")
            .output()
            .expect("running tool");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bin}: {stderr}");
        assert!(
            stderr.contains("is an input file; refusing to overwrite it"),
            "{bin}: {stderr}"
        );
        assert_eq!(
            fs::read(&input).expect("read"),
            before,
            "{bin} changed its input"
        );
    }
    // merge-lora into a checkpoint: --save_to = --sd_model.
    let model = tmp.path().join("model é.safetensors");
    fs::copy(fixture("tiny-sd15.safetensors"), &model).expect("copy");
    let model_before = fs::read(&model).expect("read");
    let out = Command::new(tool("merge-lora"))
        .arg("--sd_model")
        .arg(&model)
        .arg("--models")
        .arg(&input)
        .args(["--ratios", "1", "--save_to"])
        .arg(&model)
        .env_remove("RUST_LOG")
        .output()
        .expect("running merge-lora");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refusing to overwrite it"), "{stderr}");
    // extract-lora-from-models: --save_to = --model_tuned.
    if let Some(bin) = optional_tool("extract-lora-from-models") {
        let out = Command::new(bin)
            .arg("--model_org")
            .arg(fixture("tiny-sd15.safetensors"))
            .arg("--model_tuned")
            .arg(&model)
            .arg("--save_to")
            .arg(&model)
            .env_remove("RUST_LOG")
            .output()
            .expect("running extract-lora-from-models");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("refusing to overwrite it"), "{stderr}");
    }
    assert_eq!(fs::read(&model).expect("read"), model_before);
    // extract-lora-from-dylora writes <stem>-<rank:04>.safetensors: an input under that name.
    if let Some(bin) = optional_tool("extract-lora-from-dylora") {
        let dylora = tmp.path().join("dy ö-0002.safetensors");
        fs::copy(fixture("lora/dylora-sd15.safetensors"), &dylora).expect("copy");
        let dy_before = fs::read(&dylora).expect("read");
        let out = Command::new(bin)
            .arg("--model")
            .arg(&dylora)
            .args(["--unit", "2", "--save_to"])
            .arg(tmp.path().join("dy ö.safetensors"))
            .env_remove("RUST_LOG")
            .output()
            .expect("running extract-lora-from-dylora");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("refusing to overwrite the input file"),
            "{stderr}"
        );
        assert_eq!(fs::read(&dylora).expect("read"), dy_before);
    }
    // train-network: --network_weights under a name the outputs use, in --output_dir
    // (refused before the dataset is read or the model loaded).
    for weights_name in [
        "ä.safetensors",
        "ä-000001.safetensors",
        "ä-interrupted.safetensors",
    ] {
        let weights = tmp.path().join(weights_name);
        fs::copy(&input, &weights).expect("copy");
        let out = Command::new(tool("train-network"))
            .arg("--pretrained_model_name_or_path")
            .arg(fixture("tiny-sd15"))
            .arg("--train_data_dir")
            .arg(tmp.path().join("no data here"))
            .arg("--output_dir")
            .arg(tmp.path())
            .args(["--output_name", "ä", "--network_module", "networks.lora"])
            .arg("--network_weights")
            .arg(&weights)
            .env_remove("RUST_LOG")
            .output()
            .expect("running train-network");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{weights_name}: {stderr}");
        assert!(
            stderr.contains(weights_name) && stderr.contains("could be overwritten or removed"),
            "{weights_name}: {stderr}"
        );
        assert_eq!(fs::read(&weights).expect("read"), before);
        fs::remove_file(&weights).expect("rm");
    }
    // resize-images refuses DST_DIR = SRC_DIR.
    let out = Command::new(tool("resize-images"))
        .arg(tmp.path())
        .arg(tmp.path())
        .env_remove("RUST_LOG")
        .output()
        .expect("running resize-images");
    assert!(
        !out.status.success(),
        "resize-images wrote into its source folder"
    );
    assert_eq!(fs::read(&input).expect("read"), before);
}

/// What a SIGKILLed training run leaves in its output folder must be usable: every
/// `*.safetensors` complete, every `*-state` folder complete; temporary names only otherwise.
fn assert_outputs_complete(out_dir: &Path, what: &str) {
    for e in fs::read_dir(out_dir).expect("out dir") {
        let path = e.expect("entry").path();
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".safetensors") {
            SafetensorsFile::open(&path)
                .unwrap_or_else(|e| panic!("{what}: partial file {name}: {e}"));
        } else if name.ends_with("-state") {
            for part in ["network.safetensors", "optimizer.safetensors"] {
                SafetensorsFile::open(path.join(part))
                    .unwrap_or_else(|e| panic!("{what}: partial state {name}/{part}: {e}"));
            }
            let json = fs::read_to_string(path.join("train_state.json"))
                .unwrap_or_else(|e| panic!("{what}: {name}/train_state.json: {e}"));
            assert!(json.trim_end().ends_with('}'), "{what}: {name}: {json}");
        } else {
            // tempfile names: hidden (".state-…", ".tmp…").
            assert!(name.starts_with('.'), "{what}: unexpected {name}");
        }
    }
}

#[test]
fn issue_12_sigkill_while_training_saves_leaves_only_complete_outputs() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let data = tmp.path().join("data");
    tiny_dataset(&data);
    // Kill right after the third "saved" line (a state save follows at once), then a little
    // later: two moments inside the save sequence of a step.
    for (round, delay_ms) in [(0, 0u64), (1, 30)] {
        let out_dir = tmp.path().join(format!("out {round}"));
        let mut child = Command::new(tool("train-network"))
            .arg("--pretrained_model_name_or_path")
            .arg(fixture("tiny-sd15"))
            .arg("--train_data_dir")
            .arg(&data)
            .arg("--output_dir")
            .arg(&out_dir)
            .args([
                "--resolution",
                "64",
                "--caption_extension",
                ".txt",
                "--network_module",
                "networks.lora",
                "--output_name",
                "k",
                "--max_train_steps",
                "100000",
                "--save_every_n_steps",
                "1",
                "--save_state",
                "--no_progress",
            ])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting train-network");
        let mut lines = BufReader::new(child.stderr.take().expect("stderr piped")).lines();
        let mut saved = 0;
        let mut log = String::new();
        for line in lines.by_ref() {
            let line = line.expect("stderr line");
            log.push_str(&line);
            log.push('\n');
            if line.contains("saved ") {
                saved += 1;
                if saved == 3 {
                    break;
                }
            }
        }
        assert_eq!(saved, 3, "round {round}: no saves logged:\n{log}");
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        assert_outputs_complete(&out_dir, &format!("round {round}"));
    }
}

#[test]
fn issue_12_paths_with_spaces_and_non_ascii_names_work_in_every_tool() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let root = tmp.path().join("dir ü 日本");
    fs::create_dir(&root).expect("mkdir");
    let lora = root.join("lora ß é.safetensors");
    fs::copy(fixture("lora/lora-sd15.safetensors"), &lora).expect("copy");
    let run = |cmd: &mut Command, what: &str| {
        let out = cmd
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .output()
            .expect("running tool");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{what}: {stderr}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let stdout = run(
        Command::new(tool("check-lora-weights")).arg(&lora),
        "check-lora-weights",
    );
    assert!(stdout.contains("modules: 264"), "{stdout}");
    for (bin, extra, out_name) in [
        ("merge-lora", vec!["--concat"], "merged ö.safetensors"),
        (
            "svd-merge-lora",
            vec!["--new_rank", "2"],
            "svd ñ.safetensors",
        ),
    ] {
        let save = root.join(out_name);
        run(
            Command::new(tool(bin))
                .arg("--models")
                .arg(&lora)
                .arg(&lora)
                .args(["--ratios", "0.5", "0.5"])
                .args(&extra)
                .arg("--save_to")
                .arg(&save),
            bin,
        );
        SafetensorsFile::open(&save).unwrap_or_else(|e| panic!("{bin}: {e}"));
    }
    let src = root.join("images é");
    fs::create_dir(&src).expect("mkdir");
    fs::copy(
        fixture("train-images/10_tok photo/astronaut.jpg"),
        src.join("astronaut ü.jpg"),
    )
    .expect("copy image");
    fs::write(src.join("astronaut ü.txt"), "tok").expect("caption");
    let dst = root.join("resized ä");
    run(
        Command::new(tool("resize-images"))
            .args(["--max_resolution", "8x8", "--no_progress"])
            .arg(&src)
            .arg(&dst),
        "resize-images",
    );
    let mut produced: Vec<String> = fs::read_dir(&dst)
        .expect("dst")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    produced.sort();
    // The resized image beside copies of the original and its caption.
    assert_eq!(
        produced,
        ["astronaut ü+8x8.jpg", "astronaut ü.jpg", "astronaut ü.txt"]
    );
    let prompts = root.join("prompts ö.txt");
    fs::write(&prompts, "a cat --n dog\n").expect("prompts");
    let outdir = root.join("images out ß");
    run(
        Command::new(tool("gen-img"))
            .arg("--ckpt")
            .arg(fixture("tiny-sd15"))
            .arg("--network_weights")
            .arg(&lora)
            .arg("--from_file")
            .arg(&prompts)
            .args(["--steps", "1", "--W", "64", "--H", "64", "--device", "cpu"])
            .args(["--seed", "1", "--outdir"])
            .arg(&outdir),
        "gen-img",
    );
    assert_eq!(fs::read_dir(&outdir).expect("outdir").count(), 1);
}
