//! `sd-rs generate` and `sd-rs info` end to end: the real binary on the tiny diffusers model
//! directories of tests/fixtures/pipeline (random weights, 32x32 images, milliseconds a step).
//!
//! Every run is offline (`HF_HUB_OFFLINE=1`, `HF_HOME` an empty folder) and writes under
//! `CARGO_TARGET_TMPDIR`. What is shown: reproducibility (same seed, same bytes; image i of a
//! batch equals a run of seed + i alone, also with an ancestral sampler), prompt files (good
//! lines run, bad lines named FILE:LINE, outputs kept unless --overwrite, shards), the PNG
//! parameters round trip, img2img, the x0 strip, and clear errors instead of panics.
use sd_rs::io::png_meta::{read_parameters, GenerationParams};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn model(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline")
        .join(name)
        .display()
        .to_string()
}

mod common;
use common::sd_rs;

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("cli_generate", name)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn params(p: &Path) -> GenerationParams {
    let text = read_parameters(p)
        .unwrap()
        .unwrap_or_else(|| panic!("{} has no parameters chunk", p.display()));
    GenerationParams::from_a1111(&text).unwrap()
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p).unwrap().to_rgb8()
}

/// The largest difference of two same-sized images, in 8-bit levels.
fn max_level_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

/// The PNG files in `dir`, by name.
fn pngs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "png"))
                .map(|p| {
                    (
                        p.file_name().unwrap().to_string_lossy().into_owned(),
                        bytes(&p),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts byte equality of two PNGs, saying how far apart the pixels are when they differ.
fn assert_same_png(a: &Path, b: &Path) {
    if bytes(a) != bytes(b) {
        panic!(
            "{} and {} differ (max pixel difference {} levels; parameters {:?} vs {:?})",
            a.display(),
            b.display(),
            max_level_diff(&rgb(a), &rgb(b)),
            read_parameters(a).unwrap(),
            read_parameters(b).unwrap()
        );
    }
}

#[test]
fn same_seed_same_png_and_batch_images_equal_single_runs() {
    let dir = temp_dir("reproducible");
    // The batched run must not change a single bit of an image's arithmetic. SD 2 with its
    // zero-terminal-SNR schedule (first sigma 4096) magnifies the smallest difference.
    for (family, sampler, tag) in [
        ("sd15", "Euler", "euler"),
        ("sd15", "Euler a", "euler_a"),
        ("sd2", "Euler a", "sd2_euler_a"),
    ] {
        let model = model(family);
        let run = |seed: &str, out: &Path, extra: &[&str]| {
            let mut args = vec![
                "generate",
                "anime girl, red hair",
                "--model",
                &model,
                "--negative-prompt",
                "blurry",
                "--steps",
                "4",
                "--sampler",
                sampler,
                "--seed",
                seed,
                "-o",
            ];
            let out = s(out);
            args.push(&out);
            args.extend_from_slice(extra);
            sd_rs(&dir, &args).ok();
        };
        let single = |seed: u64| dir.join(format!("{tag}-single-{seed}"));
        for seed in 10..13u64 {
            run(&seed.to_string(), &single(seed), &[]);
        }
        // Twice the same: byte-identical files.
        run("10", &dir.join(format!("{tag}-again")), &[]);
        assert_same_png(
            &single(10).join("00000-10.png"),
            &dir.join(format!("{tag}-again/00000-10.png")),
        );
        // One batch of three: image i uses seed 10 + i and equals that seed's lone run.
        let batch = dir.join(format!("{tag}-batch"));
        run("10", &batch, &["--num-images", "3", "--batch-size", "3"]);
        let names: Vec<String> = pngs(&batch).into_keys().collect();
        assert_eq!(names, ["00000-10.png", "00001-11.png", "00002-12.png"]);
        for i in 0..3u64 {
            let seed = 10 + i;
            let in_batch = batch.join(format!("0000{i}-{seed}.png"));
            assert_eq!(params(&in_batch).seed, seed);
            assert_eq!(params(&in_batch).sampler, sampler);
            assert_same_png(&in_batch, &single(seed).join(format!("00000-{seed}.png")));
        }
        // The seeds matter: three different images, none of them flat.
        let images: Vec<_> = (0..3u64)
            .map(|i| rgb(&single(10 + i).join(format!("00000-{}.png", 10 + i))))
            .collect();
        for (i, a) in images.iter().enumerate() {
            let (lo, hi) = a
                .as_raw()
                .iter()
                .fold((255, 0), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            assert!(hi - lo > 20, "image {i} is nearly flat: {lo}..{hi}");
            for b in &images[i + 1..] {
                assert!(
                    max_level_diff(a, b) > 10,
                    "two seeds gave near-equal images"
                );
            }
        }
    }
    // The ancestral sampler adds noise every step: its images differ from plain Euler's.
    let euler = rgb(&dir.join("euler-single-10/00000-10.png"));
    let euler_a = rgb(&dir.join("euler_a-single-10/00000-10.png"));
    assert!(max_level_diff(&euler, &euler_a) > 10);

    // SDXL (two text encoders, size conditioning) is just as reproducible.
    let sdxl = model("sdxl");
    for out in ["xl-1", "xl-2"] {
        let out = s(&dir.join(out));
        sd_rs(
            &dir,
            &[
                "generate", "a castle", "--model", &sdxl, "--steps", "3", "--seed", "5", "-o", &out,
            ],
        )
        .ok();
    }
    assert_same_png(&dir.join("xl-1/00000-5.png"), &dir.join("xl-2/00000-5.png"));
}

#[test]
fn prompt_file_runs_good_lines_reports_bad_ones_and_keeps_outputs() {
    let dir = temp_dir("prompt-file");
    let file = dir.join("prompts.txt");
    std::fs::write(
        &file,
        r#"# lines 2, 3, 4 and 8 are good; 5, 6, 7, 9 and 10 are not
a red cat
--prompt "a blue dog" --negative_prompt "blurry, lowres" --seed 5 --steps 4 --sampler_name "Euler a" --width 40 --height 48 --cfg_scale 5
{"prompt": "a green bird", "seed": 7, "steps": 5, "sampler": "DDIM", "cfg_scale": 3.5, "width": 48}
--prompt "unbalanced --seed 3
{"prompt": "bad json",
--prompt "a cat" --bogus 1
--prompt "two images" --seed 20 --batch_size 2 --sampler_name "DPM++ 2M Karras"
--prompt "an odd size" --width 30
{"prompt": "a fish", "colour": "red"}
"#,
    )
    .unwrap();
    let out = dir.join("out");
    let sd15 = model("sd15");
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate",
            "--from-file",
            &s(&file),
            "--model",
            &sd15,
            "--steps",
            "3",
            "--seed",
            "100",
            "-o",
            &s(&out),
        ]
        .iter()
        .map(|x| x.to_string())
        .collect();
        a.extend(extra.iter().map(|x| x.to_string()));
        a
    };
    let run = |extra: &[&'static str]| {
        let a = args(extra);
        sd_rs(&dir, &a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let first = run(&[]);
    let f = s(&file);
    first.fails_with(&[
        &format!("{f}:5: skipped: unbalanced quotes"),
        &format!("{f}:6: skipped: invalid JSON line"),
        &format!("{f}:7: skipped: unknown option --bogus"),
        &format!("{f}:9: skipped: size 30x32: width and height must be positive multiples of 8"),
        &format!("{f}:10: skipped: invalid JSON line: unknown field `colour`"),
        "done: 5 images written, 0 kept, 5 failed",
        "error: 5 requests failed",
    ]);
    // The summary closes the run: it comes after every image line.
    let summary = first.stderr.find("done: ").unwrap();
    assert!(
        first.stderr.rfind("(seed ").unwrap() < summary,
        "{}",
        first.stderr
    );
    for line in [2, 3, 4, 8] {
        assert!(
            !first.stderr.contains(&format!("{f}:{line}:")),
            "{}",
            first.stderr
        );
    }

    // Images are numbered over the file; each carries its own line's settings.
    let made = pngs(&out);
    assert_eq!(
        made.keys().collect::<Vec<_>>(),
        [
            "00000-100.png",
            "00001-5.png",
            "00002-7.png",
            "00003-20.png",
            "00004-21.png"
        ]
    );
    let check = |name: &str,
                 prompt: &str,
                 negative: &str,
                 (seed, steps, sampler, cfg): (u64, usize, &str, f64),
                 (width, height): (usize, usize)| {
        let path = out.join(name);
        let p = params(&path);
        assert_eq!(
            (p.prompt.as_str(), p.negative_prompt.as_str()),
            (prompt, negative),
            "{name}"
        );
        assert_eq!(
            (p.seed, p.steps, p.sampler.as_str(), p.cfg_scale),
            (seed, steps, sampler, cfg),
            "{name}"
        );
        assert_eq!((p.width, p.height), (width, height), "{name}");
        assert_eq!(p.model.as_deref(), Some("sd15"));
        assert_eq!(
            rgb(&path).dimensions(),
            (width as u32, height as u32),
            "{name}"
        );
    };
    // Line 2 takes everything from the command line and the model's defaults.
    check(
        "00000-100.png",
        "a red cat",
        "",
        (100, 3, "Euler", 7.5),
        (32, 32),
    );
    check(
        "00001-5.png",
        "a blue dog",
        "blurry, lowres",
        (5, 4, "Euler a", 5.0),
        (40, 48),
    );
    check(
        "00002-7.png",
        "a green bird",
        "",
        (7, 5, "DDIM", 3.5),
        (48, 32),
    );
    check(
        "00003-20.png",
        "two images",
        "",
        (20, 3, "DPM++ 2M Karras", 7.5),
        (32, 32),
    );
    check(
        "00004-21.png",
        "two images",
        "",
        (21, 3, "DPM++ 2M Karras", 7.5),
        (32, 32),
    );

    // A second run keeps what exists: a file replaced by junk stays junk, others untouched.
    let junk = out.join("00000-100.png");
    std::fs::write(&junk, b"not a png").unwrap();
    let kept = out.join("00001-5.png");
    let mtime = std::fs::metadata(&kept).unwrap().modified().unwrap();
    run(&[]).fails_with(&[
        "5 images already exist and are kept (use --overwrite to replace them)",
        "done: 0 images written, 5 kept, 5 failed",
    ]);
    assert_eq!(bytes(&junk), b"not a png");
    assert_eq!(std::fs::metadata(&kept).unwrap().modified().unwrap(), mtime);
    // --overwrite makes them again, the same bytes as the first time.
    run(&["--overwrite"]).fails_with(&["done: 5 images written, 0 kept, 5 failed"]);
    assert_eq!(pngs(&out), made);
}

#[test]
fn shards_together_make_exactly_the_full_set() {
    let dir = temp_dir("shards");
    let file = dir.join("prompts.txt");
    // Most lines share the command line's seed, so only the file-wide index tells their
    // images apart; line 4 makes two images; line 6 is bad.
    std::fs::write(
        &file,
        "a cat\na dog\n--prompt \"a bird\" --seed 3\n{\"prompt\": \"a fish\", \"batch_size\": 2}\n\
         a tree\n--prompt \"broken\n",
    )
    .unwrap();
    let sd15 = model("sd15");
    let run = |out: &str, shard: Option<&str>| {
        let out = s(&dir.join(out));
        let f = s(&file);
        let mut args = vec![
            "generate",
            "--from-file",
            &f,
            "--model",
            &sd15,
            "--steps",
            "3",
            "--seed",
            "1",
            "-o",
            &out,
        ];
        if let Some(shard) = shard {
            args.extend(["--shard", shard]);
        }
        sd_rs(&dir, &args)
    };
    let bad_line = format!("{}:6: skipped: unbalanced quotes", s(&file));
    run("full", None).fails_with(&[&bad_line, "done: 6 images written, 0 kept, 1 failed"]);
    let full = pngs(&dir.join("full"));
    assert_eq!(
        full.keys().collect::<Vec<_>>(),
        [
            "00000-1.png",
            "00001-1.png",
            "00002-3.png",
            "00003-1.png",
            "00004-2.png",
            "00005-1.png"
        ]
    );

    // Round robin over the lines: shard 1 has lines 1, 3, 5 (the bad line 6 goes to shard 2).
    let one = run("shard-1", Some("1/2"));
    one.ok();
    assert!(!one.stderr.contains("skipped"), "{}", one.stderr);
    run("shard-2", Some("2/2"))
        .fails_with(&[&bad_line, "done: 3 images written, 0 kept, 1 failed"]);
    let (s1, s2) = (pngs(&dir.join("shard-1")), pngs(&dir.join("shard-2")));
    assert_eq!(
        s1.keys().collect::<Vec<_>>(),
        ["00000-1.png", "00002-3.png", "00005-1.png"]
    );
    assert_eq!(
        s2.keys().collect::<Vec<_>>(),
        ["00001-1.png", "00003-1.png", "00004-2.png"]
    );
    let mut union = s1.clone();
    union.extend(s2);
    assert_eq!(union, full, "the shards' images differ from the full run's");

    // Both shards into one folder: nothing collides, nothing is skipped as existing.
    run("together", Some("1/2")).ok();
    let second = run("together", Some("2/2"));
    assert!(
        !second.stderr.contains("already exist"),
        "{}",
        second.stderr
    );
    assert_eq!(pngs(&dir.join("together")), full);
}

#[test]
fn png_parameters_round_trip_through_info_and_from_png() {
    let dir = temp_dir("from-png");
    let sd15 = model("sd15");
    let original = dir.join("castle.png");
    sd_rs(
        &dir,
        &[
            "generate",
            "a castle, at dusk",
            "--model",
            &sd15,
            "-n",
            "blurry: lowres",
            "--steps",
            "4",
            "--cfg-scale",
            "5.5",
            "--sampler",
            "dpm++2m-karras",
            "--seed",
            "42",
            "-W",
            "40",
            "-H",
            "32",
            "-o",
            &s(&original),
        ],
    )
    .ok();
    let text = read_parameters(&original).unwrap().unwrap();
    assert_eq!(
        text,
        "a castle, at dusk\nNegative prompt: blurry: lowres\nSteps: 4, Sampler: DPM++ 2M Karras, \
         CFG scale: 5.5, Seed: 42, Size: 40x32, Model: sd15"
    );

    // `sd-rs info` prints exactly that text.
    let info = sd_rs(&dir, &["info", &s(&original)]);
    info.ok();
    assert_eq!(info.stdout, format!("{text}\n"));

    // Re-made from its own parameters: the same file, byte for byte.
    let remade = dir.join("remade.png");
    sd_rs(
        &dir,
        &[
            "generate",
            "--from-png",
            &s(&original),
            "--model",
            &sd15,
            "-o",
            &s(&remade),
        ],
    )
    .ok();
    assert_same_png(&original, &remade);

    // One setting changed on the command line, the rest from the PNG.
    let varied = dir.join("varied.png");
    sd_rs(
        &dir,
        &[
            "generate",
            "--from-png",
            &s(&original),
            "--model",
            &sd15,
            "--steps",
            "5",
            "-o",
            &s(&varied),
        ],
    )
    .ok();
    let p = params(&varied);
    assert_eq!((p.steps, p.seed, p.cfg_scale), (5, 42, 5.5));
    assert_eq!(
        (p.prompt.as_str(), p.negative_prompt.as_str()),
        ("a castle, at dusk", "blurry: lowres")
    );
    assert_ne!(bytes(&varied), bytes(&original));

    // A PNG without parameters: info and --from-png say so.
    let plain = dir.join("plain.png");
    image::RgbImage::new(8, 8).save(&plain).unwrap();
    sd_rs(&dir, &["info", &s(&plain)])
        .fails_with(&["plain.png: no generation parameters in this PNG"]);
    sd_rs(
        &dir,
        &[
            "generate",
            "--from-png",
            &s(&plain),
            "--model",
            &sd15,
            "-o",
            &s(&dir),
        ],
    )
    .fails_with(&["plain.png has no generation parameters to re-run"]);
}

#[test]
fn img2img_uses_the_init_image() {
    let dir = temp_dir("img2img");
    let sd15 = model("sd15");
    let save = |name: &str, image: image::RgbImage| {
        let path = dir.join(name);
        image.save(&path).unwrap();
        s(&path)
    };
    // 48x40: resized to the 32x32 output.
    let gradient = save(
        "gradient.png",
        image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 3) as u8])
        }),
    );
    let black = save("black.png", image::RgbImage::new(32, 32));
    let white = save(
        "white.png",
        image::RgbImage::from_pixel(32, 32, image::Rgb([255; 3])),
    );
    let run = |out: &str, extra: &[&str]| {
        let out = s(&dir.join(out));
        let mut args = vec![
            "generate",
            "a red cat",
            "--model",
            &sd15,
            "--steps",
            "4",
            "--seed",
            "10",
            "-o",
            &out,
        ];
        args.extend_from_slice(extra);
        sd_rs(&dir, &args)
    };
    let path = |n: &str| dir.join(n);

    run("txt2img.png", &[]).ok();
    for out in ["img2img.png", "img2img-again.png"] {
        run(out, &["--init-image", &gradient, "--strength", "0.5"]).ok();
    }
    let p = params(&path("img2img.png"));
    assert_eq!((p.seed, p.steps, p.denoising_strength), (10, 4, Some(0.5)));
    assert_eq!(rgb(&path("img2img.png")).dimensions(), (32, 32));
    assert_same_png(&path("img2img.png"), &path("img2img-again.png"));
    assert!(
        max_level_diff(&rgb(&path("txt2img.png")), &rgb(&path("img2img.png"))) > 10,
        "img2img gave the txt2img image"
    );

    // The init image shows through more the lower the strength: black and white inits end up
    // further apart at 0.25 (1 of 4 steps run) than at 0.5 (2 steps) than at 1 (all 4).
    let mut gaps = Vec::new();
    for strength in ["0.25", "0.5", "1"] {
        let made = |init: &str, name: &str| {
            let out = format!("{name}-{strength}.png");
            run(&out, &["--init-image", init, "--strength", strength]).ok();
            rgb(&path(&out))
        };
        let (b, w) = (made(&black, "black"), made(&white, "white"));
        let sum: u64 = b
            .as_raw()
            .iter()
            .zip(w.as_raw())
            .map(|(x, y)| x.abs_diff(*y) as u64)
            .sum();
        gaps.push(sum as f64 / b.as_raw().len() as f64);
    }
    assert!(
        gaps[0] > gaps[1] && gaps[1] > gaps[2] && gaps[2] > 0.0,
        "mean |black - white| by strength 0.25, 0.5, 1: {gaps:?}"
    );

    // 4 steps at strength 0.2 leave int(0.8) = 0 steps to run.
    let zero = run(
        "zero.png",
        &["--init-image", &gradient, "--strength", "0.2"],
    );
    zero.fails_with(&[
        "--strength 0.2 leaves no denoising steps",
        "raise --strength or --steps",
    ]);
    assert!(!path("zero.png").exists());
}

#[test]
fn show_x0_writes_a_strip_per_image() {
    let dir = temp_dir("show-x0");
    let out = dir.join("out");
    sd_rs(
        &dir,
        &[
            "generate",
            "a red cat",
            "--model",
            &model("sd15"),
            "--steps",
            "4",
            "--seed",
            "3",
            "--num-images",
            "2",
            "--batch-size",
            "2",
            "--show-x0",
            "1,3,4",
            "-o",
            &s(&out),
        ],
    )
    .ok();
    assert_eq!(
        pngs(&out).into_keys().collect::<Vec<_>>(),
        [
            "00000-3-x0.png",
            "00000-3.png",
            "00001-4-x0.png",
            "00001-4.png"
        ]
    );
    for name in ["00000-3", "00001-4"] {
        let image = rgb(&out.join(format!("{name}.png")));
        let strip = rgb(&out.join(format!("{name}-x0.png")));
        assert_eq!(
            strip.dimensions(),
            (3 * 32, 32),
            "three 32x32 frames side by side"
        );
        let frame = |i: u32| image::imageops::crop_imm(&strip, 32 * i, 0, 32, 32).to_image();
        // Euler's last step lands on its x0 prediction (sigma 0): the last frame is the image,
        // up to float rounding; the first frame is an earlier, different guess.
        assert!(max_level_diff(&frame(2), &image) <= 1, "{name}");
        assert!(max_level_diff(&frame(0), &image) > 10, "{name}");
    }
    // A step the run does not have is an error, not a silently missing frame.
    sd_rs(
        &dir,
        &[
            "generate",
            "a red cat",
            "--model",
            &model("sd15"),
            "--steps",
            "3",
            "--show-x0",
            "9",
            "-o",
            &s(&dir.join("bad")),
        ],
    )
    .fails_with(&["--show-x0 step 9 is outside this run's steps 1..=3"]);
}

#[test]
fn cli_errors_are_clear_messages_not_panics() {
    let dir = temp_dir("errors");
    let sd15 = model("sd15");
    let out = dir.join("out");
    let o = s(&out);
    let text_file = dir.join("notes.txt");
    std::fs::write(&text_file, "not an image").unwrap();
    let init = dir.join("init.png");
    image::RgbImage::from_pixel(32, 32, image::Rgb([200, 30, 30]))
        .save(&init)
        .unwrap();
    let prompts = dir.join("prompts.txt");
    std::fs::write(&prompts, "a cat\n").unwrap();
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", &sd15, "--steps", "3", "-o", &o];
        args.extend_from_slice(extra);
        sd_rs(&dir, &args)
    };

    gen(&["a cat", "--width", "30"])
        .fails_with(&["--width 30 must be a positive multiple of 8 (e.g. 32)"]);
    gen(&["a cat", "--height", "0"]).fails_with(&["--height 0 must be a positive multiple of 8"]);
    gen(&["a cat", "--sampler", "bogus"]).fails_with(&[
        "unknown sampler \"bogus\"",
        "ddpm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras",
        "\"Euler a\"",
        "\"DPM++ 2M Karras\"",
    ]);
    let missing = dir.join("missing.png");
    gen(&["a cat", "--init-image", &s(&missing)]).fails_with(&[
        "reading --init-image",
        &format!("{} is not a readable image", s(&missing)),
    ]);
    gen(&["a cat", "--init-image", &s(&text_file)])
        .fails_with(&[&format!("{} is not a readable image", s(&text_file))]);
    for strength in ["1.5", "-0.5"] {
        gen(&["a cat", "--init-image", &s(&init), "--strength", strength])
            .fails_with(&[&format!("--strength {strength} must be between 0 and 1")]);
    }
    gen(&["a cat", "--from-file", &s(&prompts)])
        .fails_with(&["give either a PROMPT or --from-file, not both"]);
    gen(&[]).fails_with(&["no prompt: give one"]);
    gen(&["a cat", "--seed", "-5"])
        .fails_with(&["--seed -5 is negative; use -1 for a random seed"]);
    gen(&["--from-file", &s(&dir.join("nope.txt"))])
        .fails_with(&[&format!("reading prompt file {}", s(&dir.join("nope.txt")))]);

    // A model that is not in the (empty) cache while offline: what to download, and where.
    let home = s(&dir.join("hf-home"));
    sd_rs(
        &dir,
        &[
            "generate",
            "a cat",
            "--model",
            "someone/not-downloaded",
            "-o",
            &o,
        ],
    )
    .fails_with(&[
        "someone/not-downloaded is not in the Hugging Face cache",
        "(offline)",
        "huggingface-cli download someone/not-downloaded",
        &format!("{home}/hub/models--someone--not-downloaded"),
    ]);
    // A local folder that is not a model.
    sd_rs(&dir, &["generate", "a cat", "--model", &s(&dir), "-o", &o])
        .fails_with(&["is not a diffusers model directory"]);
    // None of the failures above wrote an image.
    assert!(pngs(&out).is_empty());

    // Output that cannot be written. A file where a folder must be stops root too.
    let blocker = dir.join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let reason = format!("{} is a file, not a folder", s(&blocker));
    for output in [blocker.join("out.png"), blocker.join("sub/folder")] {
        sd_rs(
            &dir,
            &[
                "generate",
                "a cat",
                "--model",
                &sd15,
                "--steps",
                "3",
                "-o",
                &s(&output),
            ],
        )
        .fails_with(&["cannot write images to", &reason]);
    }
    // A read-only folder, where the OS enforces it (not for root).
    let read_only = dir.join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(read_only.join("probe"), "x").is_err() {
        sd_rs(
            &dir,
            &[
                "generate",
                "a cat",
                "--model",
                &sd15,
                "--steps",
                "3",
                "-o",
                &s(&read_only),
            ],
        )
        .fails_with(&[
            &format!("cannot write images to {}", s(&read_only)),
            "ermission denied",
        ]);
    }
    std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o755)).unwrap();
}
