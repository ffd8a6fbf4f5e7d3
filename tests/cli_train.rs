//! `sd-rs train` and `sd-rs train-vae` as a user runs them: the real binary, on CPU, with tiny
//! models (the U-Net trains on the latents of the tiny SD 1.x fixture's VAE) and a toy dataset of
//! solid-colour squares.
//!
//! - Resume is exact: a run stopped at step k (by `--steps k`, or killed with SIGKILL after a
//!   checkpoint) and continued with `--resume` logs the same loss, learning rate and gradient norm
//!   at every step as an uninterrupted run, and saves bitwise-identical weights.
//! - Damaged checkpoints (a partial temporary directory, a truncated newer checkpoint) are passed
//!   over; a NaN loss stops the run naming the step and keeps the last good checkpoint.
//! - Bad inputs give one clear `error:` line and exit code 1, never a panic.
//! - A pretrained diffusers model (the fixture) fine-tunes, and `sd-rs generate` loads the result.
use candle_core::{DType, Device, Tensor};
use sd_rs::train::checkpoint::Checkpoints;
use sd_rs::train::metrics::{read_metrics, MetricsRecord};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

mod common;

const BIN: &str = env!("CARGO_BIN_EXE_sd-rs");

/// A U-Net and text encoder from scratch on 4x4 latents (32x32 images through the fixture's
/// 8x VAE). Every random path is on: caption dropout, min-SNR weights, noise offset, random flips
/// (two cached latents per image), gradient accumulation, an EMA, and a warmup that is still
/// running when the split run stops at step 12.
const UNET_CONFIG: &str = r#"
resolution = 32
caption_dropout = 0.25
min_snr_gamma = 5.0
noise_offset = 0.05
random_flip = true
[train]
steps = 24
batch_size = 4
learning_rate = 1e-3
lr_schedule = "constant_with_warmup"
warmup_steps = 16
grad_accum = 2
ema_decay = 0.9
checkpoint_every = 3
keep_checkpoints = 3
validate_every = 0
log_every = 1
[model]
tokenizer_max_length = 8
[model.unet]
sample_size = 4
layers_per_block = 1
block_out_channels = [8, 16]
down_block_types = ["CrossAttnDownBlock2D", "DownBlock2D"]
up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D"]
attention_head_dim = 2
cross_attention_dim = 8
norm_num_groups = 4
[model.text_encoder]
hidden_size = 8
intermediate_size = 16
num_hidden_layers = 1
num_attention_heads = 2
[model.scheduler]
num_train_timesteps = 1000
beta_schedule = "scaled_linear"
beta_start = 0.00085
beta_end = 0.012
prediction_type = "epsilon"
"#;

/// A two-level VAE on 16x16 images, with an EMA, random flips and validation images.
const VAE_CONFIG: &str = r#"
resolution = 16
random_flip = true
kl_weight = 1e-3
[train]
steps = 10
batch_size = 3
learning_rate = 2e-3
lr_schedule = "constant_with_warmup"
warmup_steps = 7
ema_decay = 0.9
checkpoint_every = 5
validate_every = 5
log_every = 1
[vae]
down_block_types = ["DownEncoderBlock2D", "DownEncoderBlock2D"]
up_block_types = ["UpDecoderBlock2D", "UpDecoderBlock2D"]
block_out_channels = [4, 8]
layers_per_block = 1
latent_channels = 4
norm_num_groups = 4
mid_block_add_attention = false
"#;

const COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [220, 30, 30]),
    ("blue", [30, 40, 220]),
    ("green", [30, 200, 40]),
    ("yellow", [230, 220, 30]),
];

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/sd15")
}

fn scratch(name: &str) -> PathBuf {
    common::temp_dir("cli_train", name)
}

/// Eight 32x32 squares captioned with their colour, as `dir/data.jsonl` + `dir/img/`.
fn make_dataset(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut lines = String::new();
    for i in 0..8u32 {
        let (name, rgb) = COLOURS[i as usize % COLOURS.len()];
        let jitter = (i * 37 % 21) as i32 - 10;
        let px = rgb.map(|c| (c as i32 + jitter).clamp(0, 255) as u8);
        let file = format!("img/{i:03}.png");
        image::RgbImage::from_pixel(32, 32, image::Rgb(px))
            .save(dir.join(&file))
            .unwrap();
        lines.push_str(&format!(
            "{{\"file_name\": \"{file}\", \"text\": \"a {name} square\"}}\n"
        ));
    }
    std::fs::write(dir.join("data.jsonl"), lines).unwrap();
    dir.join("data.jsonl")
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// `sd-rs train` from scratch with the U-Net config on the fixture's VAE.
fn train_args(
    config: &Path,
    captions: &Path,
    out: &Path,
    cache: &Path,
    extra: &[&str],
) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--config", &s(config), "--captions", &s(captions)]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(
        [
            "--vae",
            &s(&fixture().join("vae")),
            "-o",
            &s(out),
            "--cache-dir",
            &s(cache),
            "--device",
            "cpu",
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

fn vae_args(config: &Path, images: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train-vae",
        "--config",
        &s(config),
        "--images",
        &s(images),
        "-o",
        &s(out),
        "--device",
        "cpu",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Runs the binary offline (tests/common).
fn sd_rs(args: &[String]) -> common::Run {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli_train");
    common::sd_rs(&home, args)
}

/// Runs the binary and expects success; returns stderr.
fn ok(args: &[String]) -> String {
    sd_rs(args).ok().stderr.clone()
}

/// Runs the binary and expects a clean failure: exit code 1, an `error:` line, no panic.
/// Returns the error line.
fn fails(args: &[String]) -> String {
    let run = sd_rs(args);
    run.fails_with(&[]).error_line().to_string()
}

fn metrics(dir: &Path) -> Vec<MetricsRecord> {
    read_metrics(&dir.join("metrics.jsonl")).unwrap()
}

/// The same steps with bitwise the same loss, learning rate and gradient norm; the smoothed loss
/// of a resumed run is rebuilt from its last logged value, so it may differ in the last bits.
fn assert_same_metrics(a: &[MetricsRecord], b: &[MetricsRecord], steps: u64, what: &str) {
    let expected: Vec<u64> = (1..=steps).collect();
    assert_eq!(
        a.iter().map(|m| m.step).collect::<Vec<_>>(),
        expected,
        "{what}: steps of the uninterrupted run"
    );
    assert_eq!(
        b.iter().map(|m| m.step).collect::<Vec<_>>(),
        expected,
        "{what}: steps of the resumed run"
    );
    for (x, y) in a.iter().zip(b) {
        assert!(
            x.loss.is_finite() && x.loss > 0.0,
            "{what}: step {} loss {}",
            x.step,
            x.loss
        );
        assert_eq!(
            x.loss.to_bits(),
            y.loss.to_bits(),
            "{what}: loss at step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
        assert_eq!(
            x.lr.to_bits(),
            y.lr.to_bits(),
            "{what}: lr at step {}",
            x.step
        );
        assert_eq!(
            x.grad_norm.map(f64::to_bits),
            y.grad_norm.map(f64::to_bits),
            "{what}: grad norm at step {}",
            x.step
        );
        let rel = (x.smoothed_loss - y.smoothed_loss).abs() / x.smoothed_loss.abs();
        assert!(
            rel < 1e-12,
            "{what}: smoothed loss at step {}: {} vs {}",
            x.step,
            x.smoothed_loss,
            y.smoothed_loss
        );
    }
}

fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32_values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// (number of tensors, number of elements that differ, max abs difference) between two weight
/// files with the same tensor names and shapes.
fn compare_weights(a: &Path, b: &Path) -> (usize, usize, f32) {
    let (ta, tb) = (load_tensors(a), load_tensors(b));
    let mut names: Vec<&String> = ta.keys().collect();
    names.sort();
    let mut other: Vec<&String> = tb.keys().collect();
    other.sort();
    assert_eq!(
        names,
        other,
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    let (mut differing, mut max) = (0, 0f32);
    for name in names {
        assert_eq!(ta[name].shape(), tb[name].shape(), "{name}");
        for (x, y) in f32_values(&ta[name]).iter().zip(f32_values(&tb[name])) {
            if x.to_bits() != y.to_bits() {
                differing += 1;
                max = max.max((x - y).abs());
            }
        }
    }
    (ta.len(), differing, max)
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (n, differing, max) = compare_weights(a, b);
    assert!(n > 0);
    assert_eq!(
        differing,
        0,
        "{} vs {}: {differing} values differ (max abs diff {max})",
        a.display(),
        b.display()
    );
}

// ---------------------------------------------------------------------------------------------
// Uninterrupted reference runs, made once and shared by the tests that compare against them.

struct Reference {
    captions: PathBuf,
    config: PathBuf,
    out: PathBuf,
}

fn unet_reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let root = scratch("unet_reference");
        let captions = make_dataset(&root.join("data"));
        let config = write_config(&root, "unet.toml", UNET_CONFIG);
        let out = root.join("out");
        ok(&train_args(
            &config,
            &captions,
            &out,
            &root.join("cache"),
            &[],
        ));
        Reference {
            captions,
            config,
            out,
        }
    })
}

fn vae_reference() -> &'static Reference {
    static REF: OnceLock<Reference> = OnceLock::new();
    REF.get_or_init(|| {
        let root = scratch("vae_reference");
        let captions = make_dataset(&root.join("data"));
        let config = write_config(&root, "vae.toml", VAE_CONFIG);
        let out = root.join("out");
        ok(&vae_args(&config, &captions, &out, &[]));
        Reference {
            captions,
            config,
            out,
        }
    })
}

fn unet_weights(out: &Path) -> PathBuf {
    out.join("unet/diffusion_pytorch_model.safetensors")
}

fn last_logged_step(dir: &Path) -> u64 {
    read_metrics(&dir.join("metrics.jsonl"))
        .ok()
        .and_then(|m| m.last().map(|r| r.step))
        .unwrap_or(0)
}

/// Starts a run and kills it (SIGKILL) once its metrics log reaches `kill_at`, i.e. after its
/// first checkpoint and between two others. Returns false if the run ended first.
fn run_and_kill(args: &[String], out: &Path, kill_at: u64) -> bool {
    std::fs::create_dir_all(out).unwrap();
    let log = std::fs::File::create(out.with_extension("log")).unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if last_logged_step(out) >= kill_at {
            child.kill().unwrap();
            child.wait().unwrap();
            return true;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the run to be killed never got to step {kill_at}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn train_resumes_exactly_after_a_stop_and_after_a_kill() {
    let r = unet_reference();
    let root = scratch("unet_resume");
    let cache = root.join("cache");
    let reference = metrics(&r.out);
    assert!(
        reference.iter().any(|m| m.loss != reference[0].loss),
        "the loss never changes: {reference:?}"
    );

    // Stopped by --steps at a checkpoint, then resumed with more steps: only train.steps
    // changed, so no config warning.
    let split = root.join("split");
    ok(&train_args(
        &r.config,
        &r.captions,
        &split,
        &cache,
        &["--steps", "12"],
    ));
    let resumed = ok(&train_args(
        &r.config,
        &r.captions,
        &split,
        &cache,
        &["--steps", "24", "--resume"],
    ));
    assert!(resumed.contains("checkpoint-12 at step 12"), "{resumed}");
    assert!(!resumed.contains("config differs"), "{resumed}");
    assert_same_metrics(&reference, &metrics(&split), 24, "stopped at 12");
    assert_same_weights(&unet_weights(&r.out), &unet_weights(&split));
    assert_same_weights(
        &r.out.join("text_encoder/model.safetensors"),
        &split.join("text_encoder/model.safetensors"),
    );

    // Killed mid-run (after at least the step-3 checkpoint and some steps past it), then resumed:
    // the steps logged after the last checkpoint are dropped and done again.
    let mut killed = None;
    for attempt in 0..3 {
        let dir = root.join(format!("killed-{attempt}"));
        if run_and_kill(
            &train_args(&r.config, &r.captions, &dir, &cache, &[]),
            &dir,
            5,
        ) {
            killed = Some(dir);
            break;
        }
    }
    let killed = killed.expect("every run finished before it could be killed");
    assert!(
        !killed.join("model_index.json").exists(),
        "the killed run got to write its model"
    );
    let logged = last_logged_step(&killed);
    let resumed = ok(&train_args(
        &r.config,
        &r.captions,
        &killed,
        &cache,
        &["--resume"],
    ));
    let at: u64 = resumed
        .split("at step ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume step in:\n{resumed}"));
    println!("killed after step {logged} was logged; resumed from the checkpoint at step {at}");
    assert!(
        at >= 3 && at.is_multiple_of(3) && at < 24,
        "resumed at step {at}"
    );
    assert_same_metrics(&reference, &metrics(&killed), 24, "killed");
    assert_same_weights(&unet_weights(&r.out), &unet_weights(&killed));
    assert_same_weights(
        &r.out.join("text_encoder/model.safetensors"),
        &killed.join("text_encoder/model.safetensors"),
    );

    // The seed decides the run: another seed starts from other weights and other noise.
    let other = root.join("other-seed");
    ok(&train_args(
        &r.config,
        &r.captions,
        &other,
        &cache,
        &["--steps", "1", "--seed", "1"],
    ));
    assert_ne!(
        metrics(&other)[0].loss,
        reference[0].loss,
        "the seed changes nothing"
    );
}

#[test]
fn train_vae_resumes_exactly() {
    let r = vae_reference();
    let root = scratch("vae_resume");
    let split = root.join("split");
    ok(&vae_args(&r.config, &r.captions, &split, &["--steps", "5"]));
    let resumed = ok(&vae_args(
        &r.config,
        &r.captions,
        &split,
        &["--steps", "10", "--resume"],
    ));
    assert!(resumed.contains("checkpoint-5 at step 5"), "{resumed}");
    assert!(!resumed.contains("config differs"), "{resumed}");
    assert_same_metrics(
        &metrics(&r.out),
        &metrics(&split),
        10,
        "train-vae stopped at 5",
    );
    let weights = "diffusion_pytorch_model.safetensors";
    assert_same_weights(&r.out.join(weights), &split.join(weights));
    // The scaling factor is measured on the final weights: the same number.
    let factor = |dir: &Path| -> f64 {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        cfg["scaling_factor"].as_f64().unwrap()
    };
    assert_eq!(factor(&r.out), factor(&split));
    assert!(split.join("samples/step-000010.png").is_file());
}

/// `train-vae --decoder-only` fine-tunes the decoder of --init and leaves the encoder (so the
/// latents a U-Net was trained on, and their scale) exactly as they were.
#[test]
fn train_vae_decoder_only_keeps_the_encoder() {
    let r = vae_reference();
    let out = scratch("vae_decoder_only").join("out");
    let log = ok(&vae_args(
        &r.config,
        &r.captions,
        &out,
        &["--init", &s(&r.out), "--decoder-only", "--steps", "4"],
    ));
    let weights = "diffusion_pytorch_model.safetensors";
    let before = load_tensors(&r.out.join(weights));
    let after = load_tensors(&out.join(weights));
    assert_eq!(before.len(), after.len());
    let (mut same, mut changed) = (Vec::new(), Vec::new());
    for (name, t) in &before {
        let equal = f32_values(t) == f32_values(&after[name]);
        let decoder = name.starts_with("decoder.") || name.starts_with("post_quant_conv.");
        match (decoder, equal) {
            (false, false) => panic!("{name}: the encoder changed"),
            (true, true) => same.push(name.clone()),
            (true, false) => changed.push(name.clone()),
            (false, true) => {}
        }
    }
    // Every decoder tensor moves (AdamW's first steps move every weight with a gradient).
    assert!(same.is_empty(), "decoder tensors not trained: {same:?}");
    assert!(changed.len() > 10, "{changed:?}");
    let n_trained = changed.len();
    assert!(
        log.contains(&format!("training {n_trained} tensors")),
        "{log}"
    );
    let factor = |dir: &Path| -> f64 {
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        cfg["scaling_factor"].as_f64().unwrap()
    };
    assert_eq!(factor(&out), factor(&r.out));
}

/// bf16 mixed precision needs CUDA; on the CPU it is refused before any work, saying why.
#[test]
fn mixed_precision_bf16_is_refused_on_the_cpu() {
    let root = scratch("bf16_cpu");
    let captions = make_dataset(&root.join("data"));
    let config = write_config(&root, "unet.toml", UNET_CONFIG);
    let args = train_args(
        &config,
        &captions,
        &root.join("out"),
        &root.join("cache"),
        &["--mixed-precision", "bf16"],
    );
    let err = fails(&args);
    assert!(
        err.contains("bf16 needs a CUDA device") && err.contains("--mixed-precision no"),
        "{err}"
    );
    assert!(!root.join("out/checkpoints").exists());
}

/// Dropout rates outside 0..1 are refused before any work, naming the option.
#[test]
fn caption_dropout_rates_must_be_probabilities() {
    let root = scratch("bad_rates");
    let captions = make_dataset(&root.join("data"));
    let config = write_config(&root, "unet.toml", UNET_CONFIG);
    for (key, value) in [("caption_tag_dropout", "1.5"), ("caption_dropout", "-0.1")] {
        let set = format!("{key}={value}");
        let args = train_args(
            &config,
            &captions,
            &root.join("out"),
            &root.join("cache"),
            &["--set", &set],
        );
        let err = fails(&args);
        assert!(
            err.contains(&format!("{key} is a probability")) && err.contains(value),
            "{err}"
        );
    }
    assert!(!root.join("out/checkpoints").exists());
}

#[test]
fn resume_passes_over_partial_and_damaged_checkpoints() {
    let r = vae_reference();
    let root = scratch("damaged_checkpoints");
    let out = root.join("out");
    ok(&vae_args(&r.config, &r.captions, &out, &[]));
    let ckpts = out.join("checkpoints");
    // A newer checkpoint whose weights file lost its second half (a torn copy, a full disk),
    // and what a kill in the middle of writing a checkpoint leaves: a temporary directory.
    let torn = ckpts.join("checkpoint-10/vae.safetensors");
    let bytes = std::fs::read(&torn).unwrap();
    std::fs::write(&torn, &bytes[..bytes.len() / 2]).unwrap();
    let partial = ckpts.join(".tmp-checkpoint-15-4242");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("vae.safetensors"), &bytes[..100]).unwrap();

    let resumed = ok(&vae_args(&r.config, &r.captions, &out, &["--resume"]));
    assert!(
        resumed.contains("skipping a damaged checkpoint") && resumed.contains("checkpoint-10"),
        "{resumed}"
    );
    assert!(resumed.contains("checkpoint-5 at step 5"), "{resumed}");
    // Steps 6..10 done again give the uninterrupted run's weights; the damaged checkpoint is
    // replaced by a good one and the temporary directory swept away.
    let weights = "diffusion_pytorch_model.safetensors";
    assert_same_weights(&r.out.join(weights), &out.join(weights));
    assert_same_metrics(
        &metrics(&r.out),
        &metrics(&out),
        10,
        "resumed from checkpoint-5",
    );
    assert!(
        !partial.exists(),
        "the temporary checkpoint directory was left behind"
    );
    let latest = Checkpoints::new(&ckpts, 2).latest().unwrap();
    assert!(latest.rejected.is_empty(), "{:?}", latest.rejected);
    assert_eq!(latest.found.unwrap().state.step, 10);

    // A change to anything but train.steps is named on resume.
    let changed = ok(&vae_args(
        &r.config,
        &r.captions,
        &out,
        &["--resume", "--steps", "10", "--learning-rate", "0.5"],
    ));
    let warning = changed
        .lines()
        .find(|l| l.contains("config differs"))
        .unwrap_or_else(|| panic!("no warning:\n{changed}"));
    assert!(
        warning.contains("train.learning_rate: 0.002 -> 0.5"),
        "{warning}"
    );
    assert!(!warning.contains("train.steps"), "{warning}");
}

#[test]
fn nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let root = scratch("nan");
    let captions = make_dataset(&root.join("data"));
    let config = UNET_CONFIG
        .replace("warmup_steps = 16", "warmup_steps = 0")
        .replace("checkpoint_every = 3", "checkpoint_every = 4");
    let config = write_config(&root, "unet.toml", &config);
    let (out, cache) = (root.join("out"), root.join("cache"));
    ok(&train_args(
        &config,
        &captions,
        &out,
        &cache,
        &["--steps", "4"],
    ));

    // A learning rate of 1e30 blows the weights up at step 5; the loss of a later step is not
    // finite, and the run stops there before checkpoint-8.
    let error = fails(&train_args(
        &config,
        &captions,
        &out,
        &cache,
        &["--resume", "--steps", "8", "--learning-rate", "1e30"],
    ));
    println!("{error}");
    let step: u64 = error
        .split(" at step ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no step named in: {error}"));
    assert!((6..=8).contains(&step), "{error}");
    assert!(
        error.contains("loss is NaN")
            || error.contains("loss is inf")
            || error.contains("gradient norm is"),
        "{error}"
    );
    assert!(
        error.contains("checkpoints/checkpoint-4, is kept"),
        "{error}"
    );

    // The checkpoint left is step 4's, whole and finite, and the run continues from it.
    let latest = Checkpoints::new(&out.join("checkpoints"), 3)
        .latest()
        .unwrap();
    let ckpt = latest.found.expect("the last good checkpoint");
    assert_eq!(ckpt.state.step, 4);
    assert!(latest.rejected.is_empty(), "{:?}", latest.rejected);
    for file in [
        "unet.safetensors",
        "text_encoder.safetensors",
        "ema.safetensors",
        "optimizer.safetensors",
    ] {
        for (name, t) in load_tensors(&ckpt.dir.join(file)) {
            assert!(
                f32_values(&t).iter().all(|v| v.is_finite()),
                "{file}: {name} is not finite"
            );
        }
    }
    ok(&train_args(
        &config,
        &captions,
        &out,
        &cache,
        &["--resume", "--steps", "8"],
    ));
    let m = metrics(&out);
    assert_eq!(
        m.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert!(
        m.iter().all(|r| r.loss.is_finite() && r.lr == 1e-3),
        "{m:?}"
    );
}

#[test]
fn bad_inputs_fail_cleanly_or_are_skipped_and_counted() {
    let root = scratch("bad_inputs");
    let data = root.join("data");
    make_dataset(&data);
    let config = write_config(&root, "unet.toml", UNET_CONFIG);
    let vae_config = write_config(&root, "vae.toml", VAE_CONFIG);
    let cache = root.join("cache");
    // Random bytes named .png.
    let noise: Vec<u8> = (0..300u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(data.join("img/corrupt.png"), noise).unwrap();
    let captions = data.join("bad.jsonl");
    std::fs::write(
        &captions,
        "{\"file_name\": \"img/000.png\", \"text\": \"a red square\"}\n\
         {\"file_name\": \"img/001.png\", \"text\": \"a blue square\"}\n\
         {\"file_name\": \"img/002.png\", \"text\": broken\n\
         {\"file_name\": \"img/missing.png\", \"text\": \"a ghost\"}\n\
         {\"file_name\": \"img/corrupt.png\", \"text\": \"noise\"}\n\
         {\"file_name\": \"img/003.png\", \"text\": \"a yellow square\"}\n",
    )
    .unwrap();
    let two_steps = ["--steps", "2"];

    // Without --strict: the bad line and the missing image are reported with file:line and
    // counted, the corrupt image reported once by name, and the run trains on the rest.
    let stderr = ok(&train_args(
        &config,
        &captions,
        &root.join("lenient"),
        &cache,
        &two_steps,
    ));
    let bad = s(&captions);
    assert!(
        stderr.contains(&format!("{bad}:3: not a JSON object")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{bad}:4: image")) && stderr.contains("missing.png not found"),
        "{stderr}"
    );
    assert!(stderr.contains("dataset: 4 images (2 skipped)"), "{stderr}");
    assert_eq!(
        stderr.matches("corrupt.png: decoding image").count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("1 unreadable images skipped"), "{stderr}");
    assert_eq!(last_logged_step(&root.join("lenient")), 2);

    // With --strict each is fatal, naming the file (and line).
    let error = fails(&train_args(
        &config,
        &captions,
        &root.join("strict"),
        &cache,
        &["--strict"],
    ));
    assert!(
        error.contains(&format!(
            "2 problems in the dataset (strict mode): the first is {bad}:3: not a JSON object"
        )),
        "{error}"
    );
    let corrupt_only = data.join("corrupt.jsonl");
    std::fs::write(
        &corrupt_only,
        "{\"file_name\": \"img/000.png\", \"text\": \"a red square\"}\n{\"file_name\": \"img/corrupt.png\", \"text\": \"noise\"}\n",
    )
    .unwrap();
    let error = fails(&train_args(
        &config,
        &corrupt_only,
        &root.join("strict2"),
        &cache,
        &["--strict"],
    ));
    assert!(
        error.contains("strict mode") && error.contains("corrupt.png"),
        "{error}"
    );

    // train-vae: the corrupt image skipped and reported once, or fatal with --strict.
    let stderr = ok(&vae_args(
        &vae_config,
        &corrupt_only,
        &root.join("vae-lenient"),
        &two_steps,
    ));
    assert_eq!(stderr.matches("warning: skipped").count(), 1, "{stderr}");
    assert!(stderr.contains("corrupt.png: decoding image"), "{stderr}");
    let error = fails(&vae_args(
        &vae_config,
        &corrupt_only,
        &root.join("vae-strict"),
        &["--strict"],
    ));
    assert!(
        error.contains("strict mode") && error.contains("corrupt.png"),
        "{error}"
    );

    // Nothing to train on: an empty file, only bad lines, only unreadable images.
    let empty = data.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let error = fails(&train_args(
        &config,
        &empty,
        &root.join("empty"),
        &cache,
        &[],
    ));
    assert!(
        error.contains(&format!("the dataset {} has no usable images", s(&empty))),
        "{error}"
    );
    let error = fails(&vae_args(&vae_config, &empty, &root.join("vae-empty"), &[]));
    assert!(error.contains("has no usable images"), "{error}");
    let all_bad = data.join("all_bad.jsonl");
    std::fs::write(
        &all_bad,
        "nonsense\n{\"file_name\": \"img/missing.png\", \"text\": \"x\"}\n",
    )
    .unwrap();
    let error = fails(&train_args(
        &config,
        &all_bad,
        &root.join("all_bad"),
        &cache,
        &[],
    ));
    assert!(
        error.contains("has no usable images (2 problems above)"),
        "{error}"
    );
    let unreadable = data.join("unreadable.jsonl");
    std::fs::write(
        &unreadable,
        "{\"file_name\": \"img/corrupt.png\", \"text\": \"noise\"}\n",
    )
    .unwrap();
    let error = fails(&train_args(
        &config,
        &unreadable,
        &root.join("unreadable"),
        &cache,
        &[],
    ));
    assert!(
        error.contains("none of the 1 images") && error.contains("could be read"),
        "{error}"
    );

    // An output directory that cannot be made (its parent is a regular file; tests run as root,
    // so permissions would not stop the write).
    let file = root.join("a-file");
    std::fs::write(&file, "not a directory").unwrap();
    let error = fails(&train_args(
        &config,
        &captions,
        &file.join("out"),
        &cache,
        &[],
    ));
    assert!(
        error.contains(&format!("creating {}", s(&file.join("out")))),
        "{error}"
    );
    let error = fails(&vae_args(&vae_config, &captions, &file.join("out"), &[]));
    assert!(
        error.contains(&format!("creating {}", s(&file.join("out")))),
        "{error}"
    );

    // --resume with nothing to resume, and a fresh start over an existing run.
    let error = fails(&train_args(
        &config,
        &captions,
        &root.join("fresh"),
        &cache,
        &["--resume"],
    ));
    assert!(
        error.contains(&format!(
            "no checkpoint in {}",
            s(&root.join("fresh/checkpoints"))
        )),
        "{error}"
    );
    let error = fails(&vae_args(
        &vae_config,
        &captions,
        &root.join("vae-fresh"),
        &["--resume"],
    ));
    assert!(error.contains("no checkpoint in"), "{error}");
    // (Other captions, so a from-scratch tokenizer written before the refusal would differ.)
    let tokenizer = root.join("lenient/tokenizer/tokenizer.json");
    let before = std::fs::read(&tokenizer).unwrap();
    let error = fails(&train_args(
        &config,
        &corrupt_only,
        &root.join("lenient"),
        &cache,
        &two_steps,
    ));
    assert!(
        error.contains("already holds checkpoints of a run: pass --resume"),
        "{error}"
    );
    assert_eq!(
        std::fs::read(&tokenizer).unwrap(),
        before,
        "the refused run rewrote the tokenizer"
    );
}

#[test]
fn fine_tune_the_pretrained_fixture_then_generate() {
    let root = scratch("fine_tune");
    let captions = make_dataset(&root.join("data"));
    let out = root.join("out");
    let model = fixture();
    let args: Vec<String> = [
        "train",
        "--model",
        &s(&model),
        "--captions",
        &s(&captions),
        "-o",
        &s(&out),
        "--steps",
        "5",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--cache-dir",
        &s(&root.join("cache")),
        "--device",
        "cpu",
    ]
    .map(String::from)
    .to_vec();
    ok(&args);
    assert_eq!(last_logged_step(&out), 5);

    // The U-Net was trained; the text encoder stayed frozen (copied byte for byte).
    let (n, differing, max) = compare_weights(&unet_weights(&model), &unet_weights(&out));
    println!("fine-tuned U-Net: {differing} values of {n} tensors differ from the fixture, max abs diff {max:e}");
    assert!(
        differing > 0 && max > 1e-6,
        "the U-Net did not change: {differing} values, max {max}"
    );
    let te = "text_encoder/model.safetensors";
    assert_eq!(
        std::fs::read(model.join(te)).unwrap(),
        std::fs::read(out.join(te)).unwrap()
    );

    // The output is a model directory `generate` loads; the default size is the model's native
    // 32x32, which is also what the fine-tune trained at.
    let png = root.join("red.png");
    let args: Vec<String> = [
        "generate",
        "--model",
        &s(&out),
        "a red square",
        "--steps",
        "3",
        "--seed",
        "1",
        "-o",
        &s(&png),
        "--device",
        "cpu",
    ]
    .map(String::from)
    .to_vec();
    ok(&args);
    let image = image::open(&png).unwrap().to_rgb8();
    assert_eq!(image.dimensions(), (32, 32));
    // A fine-tune keeps the usual sampling defaults: no generation_config.json.
    assert!(!out.join("generation_config.json").exists());
}

/// A model trained from scratch carries the sampling settings it was validated with
/// (generation_config.json), and `generate` uses them when the command line does not say.
#[test]
fn scratch_model_carries_its_sampling_defaults() {
    let r = unet_reference();
    let text = std::fs::read_to_string(r.out.join("generation_config.json")).unwrap();
    let defaults: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        defaults,
        serde_json::json!({"num_inference_steps": 20, "guidance_scale": 4.0, "sampler": "euler"})
    );
    // Its config does not set clip_sample, whose DDPM/DDIM default (true) would clip the
    // predicted latents to [-1, 1]; the new model's scheduler turns it off.
    let scheduler = std::fs::read_to_string(r.out.join("scheduler/scheduler_config.json")).unwrap();
    let scheduler: serde_json::Value = serde_json::from_str(&scheduler).unwrap();
    assert_eq!(scheduler["clip_sample"], serde_json::json!(false));
    let png = scratch("sampling_defaults").join("red.png");
    ok(&[
        "generate",
        "--model",
        &s(&r.out),
        "a red square",
        "-o",
        &s(&png),
        "--device",
        "cpu",
    ]
    .map(String::from));
    let parameters = sd_rs::io::png_meta::read_parameters(&png).unwrap().unwrap();
    assert!(
        parameters.contains("Steps: 20, Sampler: Euler, CFG scale: 4,"),
        "{parameters}"
    );

    // A fine-tune of that model keeps them.
    let tuned = scratch("sampling_defaults").join("tuned");
    let mut args: Vec<String> = [
        "train",
        "--model",
        &s(&r.out),
        "--captions",
        &s(&r.captions),
    ]
    .map(String::from)
    .to_vec();
    let cache = tuned.with_file_name("cache");
    args.extend(
        [
            "-o",
            &s(&tuned),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--cache-dir",
            &s(&cache),
            "--device",
            "cpu",
        ]
        .map(String::from),
    );
    ok(&args);
    assert_eq!(
        std::fs::read_to_string(tuned.join("generation_config.json")).unwrap(),
        text
    );
}
