//! Prompt text: the attention syntax (generation.md §4.1 examples and §14 cases), gen_img's
//! per-line options (§5.2), train-network's sample prompt files (training.md §12.1), Python's
//! seed generator, and PNG metadata round trips (§8.2).

use sd_core::generate::png::{encode_png, read_png_text, write_atomically};
use sd_core::generate::prompt::{parse_prompt_attention, parse_prompt_line, read_sample_prompts};
use sd_core::generate::{PyRandom, image_file_name};

fn pieces(text: &str) -> Vec<(String, f64)> {
    parse_prompt_attention(text)
        .into_iter()
        .map(|p| (p.text, (p.weight * 1e4).round() / 1e4))
        .collect()
}

fn p(text: &str, w: f64) -> (String, f64) {
    (text.to_owned(), w)
}

#[test]
fn attention_examples_from_the_spec() {
    assert_eq!(
        pieces("an (important) word"),
        vec![p("an ", 1.0), p("important", 1.1), p(" word", 1.0)]
    );
    assert_eq!(
        pieces("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
        vec![
            p("a ", 1.0),
            p("house", 1.573),
            p(" ", 1.1),
            p("on", 1.0),
            p(" a ", 1.1),
            p("hill", 0.55),
            p(", sun, ", 1.1),
            p("sky", 1.4641),
            p(".", 1.1),
        ]
    );
}

#[test]
fn attention_escapes_unbalanced_and_break() {
    assert_eq!(pieces("\\(literal\\]"), vec![p("(literal]", 1.0)]);
    assert_eq!(pieces(""), vec![p("", 1.0)]);
    assert_eq!(pieces("a ) b ] c"), vec![p("a ) b ] c", 1.0)]);
    assert_eq!(pieces("(open"), vec![p("open", 1.1)]);
    assert_eq!(pieces("[down"), vec![p("down", 0.9091)]);
    assert_eq!(pieces("(word:1.5) x"), vec![p("word", 1.5), p(" x", 1.0)]);
    assert_eq!(pieces("time: 5"), vec![p("time: 5", 1.0)]);
    let b = parse_prompt_attention("cat BREAK dog");
    assert_eq!(b.len(), 3);
    assert!(b[1].is_break && !b[0].is_break && !b[2].is_break);
    assert_eq!((b[0].text.as_str(), b[2].text.as_str()), ("cat ", " dog"));
}

#[test]
fn prompt_line_options() {
    let o = parse_prompt_line(
        "a cat --n ugly, blurry --w 640 --H 384 --s 2000 --l 5.5 --nl none --am 0.5,-1 --d 7,8 --f out.png --c clip text --ow 1024 --oh 768 --nw 512 --nh 256 --ct 8 --cl 16 --zz what",
    );
    assert_eq!(o.prompt, "a cat");
    assert_eq!(o.negative_prompt.as_deref(), Some("ugly, blurry"));
    assert_eq!((o.width, o.height), (Some(640), Some(384)));
    assert_eq!(o.steps, Some(1000), "clamped");
    assert_eq!(o.scale, Some(5.5));
    assert_eq!(o.negative_scale, Some(None));
    assert_eq!(o.network_multipliers, Some(vec![0.5, -1.0]));
    assert_eq!(o.seeds, Some(vec![7, 8]));
    assert_eq!(o.file_name.as_deref(), Some("out.png"));
    assert_eq!(o.clip_prompt.as_deref(), Some("clip text"));
    assert_eq!(
        (o.original_width, o.original_height),
        (Some(1024), Some(768))
    );
    assert_eq!(
        (o.original_width_negative, o.original_height_negative),
        (Some(512), Some(256))
    );
    assert_eq!((o.crop_top, o.crop_left), (Some(8), Some(16)));
    assert!(!o.raw_prompt.contains("--d"), "{}", o.raw_prompt);
    // A value that does not parse is ignored.
    let bad = parse_prompt_line("x --w wide --l 3");
    assert_eq!((bad.width, bad.scale), (None, Some(3.0)));
    let nl = parse_prompt_line("x --nl 2.5");
    assert_eq!(nl.negative_scale, Some(Some(2.5)));
}

#[test]
fn sample_prompt_files_txt_toml_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let txt = dir.path().join("p.txt");
    std::fs::write(
        &txt,
        "# comment\n\na dog --n cat --w 300 --h 100 --d 5 --s 12 --l 4 --ss euler_a\nplain\n",
    )
    .expect("write");
    let ps = read_sample_prompts(&txt).expect("txt");
    assert_eq!(ps.len(), 2);
    assert_eq!(ps[0].prompt, "a dog");
    assert_eq!(ps[0].negative_prompt.as_deref(), Some("cat"));
    assert_eq!(
        (ps[0].width, ps[0].height),
        (296, 96),
        "rounded down to multiples of 8"
    );
    assert_eq!(
        (ps[0].seed, ps[0].sample_steps, ps[0].scale),
        (Some(5), 12, 4.0)
    );
    assert_eq!(ps[0].sampler.as_deref(), Some("euler_a"));
    assert_eq!(
        (ps[1].width, ps[1].sample_steps, ps[1].scale, ps[1].seed),
        (512, 30, 7.5, None)
    );
    assert_eq!(ps[1].index, 1);

    let toml = dir.path().join("p.toml");
    std::fs::write(
        &toml,
        "[prompt]\nwidth = 256\nscale = 5.0\n[[prompt.subset]]\nprompt = \"one\"\n[[prompt.subset]]\nprompt = \"two\"\nwidth = 128\nseed = 9\n",
    )
    .expect("write");
    let ps = read_sample_prompts(&toml).expect("toml");
    assert_eq!(ps.len(), 2);
    assert_eq!(
        (ps[0].prompt.as_str(), ps[0].width, ps[0].scale),
        ("one", 256, 5.0)
    );
    assert_eq!(
        (ps[1].width, ps[1].seed),
        (128, Some(9)),
        "subset overrides"
    );

    let json = dir.path().join("p.json");
    std::fs::write(
        &json,
        r#"[{"prompt": "obj", "sample_steps": 4, "negative_prompt": "n"}, "str --w 128"]"#,
    )
    .expect("write");
    let ps = read_sample_prompts(&json).expect("json");
    assert_eq!((ps[0].prompt.as_str(), ps[0].sample_steps), ("obj", 4));
    assert_eq!((ps[1].prompt.as_str(), ps[1].width), ("str", 128));

    let bad = dir.path().join("p.json5");
    std::fs::write(&bad, "[]").expect("write");
    let err = read_sample_prompts(&bad)
        .expect_err("extension")
        .to_string();
    assert!(err.contains("expected .txt, .toml or .json"), "{err}");
    let typed = dir.path().join("t.json");
    std::fs::write(&typed, r#"[{"prompt": "x", "width": "wide"}]"#).expect("write");
    let err = read_sample_prompts(&typed).expect_err("type").to_string();
    assert!(
        err.contains("\"width\"") && err.contains("integer"),
        "{err}"
    );
}

#[test]
fn python_seed_generator_matches_cpython() {
    // random.Random(s).randint(0, 2**32 - 1) in CPython 3.11.
    let mut r = PyRandom::new(42);
    let got: Vec<u64> = (0..3).map(|_| r.randint_u32_range()).collect();
    assert_eq!(got, vec![2746317213, 1181241943, 958682846]);
    let mut r = PyRandom::new((1 << 40) + 5);
    assert_eq!(r.randint_u32_range(), 3976222944);
    assert_eq!(r.randint_u32_range(), 3829167211);
    let mut r = PyRandom::new(0);
    assert_eq!(r.randint_u32_range(), 3626764237);
}

#[test]
fn png_metadata_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join(image_file_name("20240102030405", 1, 77));
    assert!(path.ends_with("im_20240102030405_001_77.png"));
    let rgb: Vec<u8> = (0..4 * 2 * 3).map(|i| (i * 10) as u8).collect();
    let text = vec![
        ("prompt".to_owned(), "a (cat:1.2) café".to_owned()),
        ("seed".to_owned(), "77".to_owned()),
        ("sampler".to_owned(), "euler_a".to_owned()),
        ("steps".to_owned(), "20".to_owned()),
        ("scale".to_owned(), "7.5".to_owned()),
        ("negative-prompt".to_owned(), "猫".to_owned()),
    ];
    let bytes = encode_png(&rgb, 4, 2, &text).expect("encode");
    write_atomically(&path, &bytes).expect("write");
    let back = read_png_text(&path).expect("read");
    let mut expected = text.clone();
    expected.sort();
    let mut got = back.clone();
    got.sort();
    assert_eq!(got, expected);
    // The pixels come back too (through the image crate, as other tools read them).
    let img = image_rgb(&path);
    assert_eq!(img, rgb);
    assert!(encode_png(&rgb, 5, 2, &text).is_err());
}

fn image_rgb(path: &std::path::Path) -> Vec<u8> {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).expect("open"),
    ));
    let mut reader = decoder.read_info().expect("info");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("frame");
    buf.truncate(info.buffer_size());
    buf
}
