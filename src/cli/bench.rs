//! `sd-rs bench`: time one piece of work on a model directory and print one JSON line.
//!
//! scripts/bench.py runs each case here and the same work in diffusers/PyTorch, each in its own
//! process (so peak memory is per case), on the random-weight models of
//! scripts/make_bench_models.py, and writes the side-by-side table of BENCHMARKS.md.
//!
//! Every case builds its inputs deterministically (`sin(k * i)` over the flat index, token ids
//! from a formula) so that bench.py's PyTorch side makes the same tensors and the reported
//! output statistics (`check`) show the two tools computed the same function. Only the timed
//! work is timed: loading is outside the loop except in the `load` case.
use crate::device::{describe_device, parse_dtype, select_device};
use crate::model::clip::{ClipTextConfig, ClipTextModel, ContextLayer};
use crate::model::tokenizer::{ids_tensor, PromptTokenizer};
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::model::weights::{load_component, load_varmap_from_component, read_config};
use crate::pipeline::{GenerateRequest, Pipeline};
use crate::profile;
use crate::sampler::SamplerKind;
use crate::train::init::seeded_var_builder;
use crate::train::optim::{named_vars, AdamW, AdamWConfig};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The prompt of the text and generate cases (bench.py passes the same one to diffusers).
pub const PROMPT: &str = "masterpiece, best quality, anime girl with long red hair and blue \
                          eyes, a photo of the horse";

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// One U-Net forward pass (batch 2: the guidance pair of one image).
    Unet,
    /// VAE decode of latents to an image (batch 1).
    VaeDecode,
    /// Tokenize and encode prompts (batch 2: negative and prompt).
    Text,
    /// A whole text-to-image run: encode, `--steps` Euler steps with guidance, decode (1 image).
    Generate,
    /// One training step on the U-Net and text encoder (batch 32): forward, MSE, backward, AdamW.
    Train,
    /// Load the whole pipeline (tokenizer, text encoder, U-Net, VAE, scheduler).
    Load,
}

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// A diffusers model directory (scripts/make_bench_models.py writes data/bench/sd15 and
    /// data/bench/small; `train` needs only unet/ and text_encoder/).
    #[arg(long)]
    pub model: PathBuf,

    #[arg(long, value_enum)]
    pub case: Case,

    /// Image size; by default the model's native size (the U-Net's sample_size).
    #[arg(long)]
    pub width: Option<usize>,
    #[arg(long)]
    pub height: Option<usize>,

    /// Batch size; by default unet 2, vae-decode 1, text 2, generate 1 image, train 32.
    #[arg(long)]
    pub batch: Option<usize>,

    /// Denoising steps of the generate case.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,

    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,

    /// Untimed runs first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,

    #[arg(long, default_value = PROMPT)]
    pub prompt: String,

    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// auto, f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// Also report the time of each kind of layer (convolution, group norm, attention, ...)
    /// per timed run, on stderr and as "profile" in the JSON line. Each layer then waits for
    /// the device before and after its work, so on a GPU the runs themselves get slower.
    #[arg(long)]
    pub profile: bool,
}

#[derive(Default)]
struct Timings {
    /// The untimed-for-the-median warm-up runs, reported anyway.
    warmup: Vec<f64>,
    timed: Vec<f64>,
    /// With --profile: time by kind of layer over all the timed runs.
    profile: BTreeMap<&'static str, profile::Total>,
}

/// What a case reports besides its timings.
struct Measured {
    times: Timings,
    shapes: Value,
    /// Output statistics to compare with PyTorch's (same weights and inputs: same numbers).
    check: Value,
}

pub fn run(args: BenchArgs) -> Result<()> {
    ensure!(args.repeat > 0, "--repeat must be at least 1");
    profile::set_enabled(args.profile);
    let device = select_device(&args.device.parse()?)?;
    let dtype = parse_dtype(&args.dtype, &device)?;
    let m = match args.case {
        Case::Unet => unet(&args, &device, dtype)?,
        Case::VaeDecode => vae_decode(&args, &device, dtype)?,
        Case::Text => text(&args, &device, dtype)?,
        Case::Generate => generate(&args, &device, dtype)?,
        Case::Train => train(&args, &device, dtype)?,
        Case::Load => load(&args, &device, dtype)?,
    };
    let mut report = json!({
        "tool": "sd-rs",
        "case": format!("{:?}", args.case),
        "median_s": median(&m.times.timed),
        "times_s": m.times.timed,
        "warmup_s": m.times.warmup,
        "shapes": m.shapes,
        "check": m.check,
        "device": describe_device(&device),
        "dtype": format!("{dtype:?}").to_lowercase(),
        "threads": candle_core::utils::get_num_threads(),
        "peak_rss_mb": peak_rss_mb(),
    });
    if args.profile {
        report["profile"] = profile_report(&m.times, args.repeat);
    }
    println!("{report}");
    Ok(())
}

/// Per timed run: each kind's calls and seconds, largest first, then the rest of the run's time
/// (element-wise ops outside the instrumented layers, sampler, host work). Also printed as a
/// table on stderr.
fn profile_report(times: &Timings, runs: usize) -> Value {
    let per_run = |d: std::time::Duration| d.as_secs_f64() / runs as f64;
    let mut kinds: Vec<_> = times.profile.iter().collect();
    kinds.sort_by_key(|(_, total)| std::cmp::Reverse(total.time));
    let run_s = times.timed.iter().sum::<f64>() / runs as f64;
    let layers_s: f64 = kinds.iter().map(|(_, t)| per_run(t.time)).sum();
    eprintln!("per timed run ({run_s:.4} s):");
    let mut rows = Vec::new();
    for (kind, total) in &kinds {
        let seconds = per_run(total.time);
        let calls = total.calls as f64 / runs as f64;
        eprintln!(
            "  {:>9.4} s {:>5.1}%  {calls:>6.0} calls  {kind}",
            seconds,
            100.0 * seconds / run_s
        );
        rows.push(json!({"kind": kind, "calls": calls, "seconds": seconds}));
    }
    let rest = run_s - layers_s;
    eprintln!(
        "  {rest:>9.4} s {:>5.1}%  everything else",
        100.0 * rest / run_s
    );
    json!({"run_s": run_s, "layers": rows, "other_s": rest})
}

/// Runs `f` `warmup` times, then `repeat` times (waiting for the device after each run), and
/// returns the timings of both kinds and the last run's output.
fn time_runs<T>(
    args: &BenchArgs,
    device: &Device,
    mut f: impl FnMut() -> Result<T>,
) -> Result<(Timings, T)> {
    let mut times = Timings::default();
    let mut last = None;
    for i in 0..args.warmup + args.repeat {
        if i == args.warmup {
            // Only the timed runs go into the profile.
            profile::take();
        }
        let start = Instant::now();
        let out = f()?;
        device.synchronize()?;
        let seconds = start.elapsed().as_secs_f64();
        if i < args.warmup {
            times.warmup.push(seconds);
        } else {
            times.timed.push(seconds);
        }
        last = Some(out);
    }
    times.profile = profile::take();
    Ok((times, last.expect("repeat >= 1")))
}

fn unet(args: &BenchArgs, device: &Device, dtype: DType) -> Result<Measured> {
    let (cfg, vb) =
        load_component::<UNet2DConditionConfig>(&args.model.join("unet"), None, dtype, device)?;
    let unet = UNet2DConditionModel::new(vb, &cfg).context("building the U-Net")?;
    if unet.needs_added_cond() {
        bail!(
            "the unet case runs SD 1.x/2.x-shaped U-Nets; this one needs SDXL's added conditioning"
        );
    }
    let b = args.batch.unwrap_or(2);
    let (h, w) = latent_size(args, &cfg)?;
    let sample = pattern(&[b, cfg.in_channels, h, w], 0.01, device, dtype)?;
    let t = Tensor::full(500f32, b, device)?;
    let context_dim = cfg
        .cross_attention_dim
        .expand("cross_attention_dim", cfg.down_block_types.len())?[0];
    let context_len = context_length(&args.model)?;
    let context = pattern(&[b, context_len, context_dim], 0.003, device, dtype)?;
    let (times, out) = time_runs(args, device, || unet.forward(&sample, &t, &context, None))?;
    Ok(Measured {
        times,
        shapes: json!({"sample": sample.dims(), "context": context.dims(), "timestep": 500}),
        check: stats(&out)?,
    })
}

fn vae_decode(args: &BenchArgs, device: &Device, dtype: DType) -> Result<Measured> {
    // As the pipeline does: the VAE decodes in f32 when asked for f16 (f16 overflows there).
    let vae_dtype = if dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    };
    let (cfg, vb) =
        load_component::<AutoencoderKLConfig>(&args.model.join("vae"), None, vae_dtype, device)?;
    let vae = AutoencoderKL::new(vb, &cfg).context("building the VAE")?;
    let f = cfg.downscale_factor();
    let (width, height) = (args.width.unwrap_or(512), args.height.unwrap_or(512));
    ensure!(
        width % f == 0 && height % f == 0,
        "size {width}x{height} must be a multiple of {f}"
    );
    let b = args.batch.unwrap_or(1);
    let latents = pattern(
        &[b, cfg.latent_channels, height / f, width / f],
        0.01,
        device,
        vae_dtype,
    )?;
    let (times, image) = time_runs(args, device, || vae.image_from_latents(&latents))?;
    Ok(Measured {
        times,
        shapes: json!({"latents": latents.dims(), "image": image.dims()}),
        check: stats(&image)?,
    })
}

fn text(args: &BenchArgs, device: &Device, dtype: DType) -> Result<Measured> {
    let tokenizer = PromptTokenizer::from_dir(args.model.join("tokenizer"))?;
    let (cfg, vb) =
        load_component::<ClipTextConfig>(&args.model.join("text_encoder"), None, dtype, device)?;
    let encoder = ClipTextModel::new(vb, &cfg).context("building the text encoder")?;
    // The guidance pair [negative, prompt], repeated to the batch size.
    let b = args.batch.unwrap_or(2);
    let texts: Vec<&str> = (0..b)
        .map(|i| if i % 2 == 0 { "" } else { args.prompt.as_str() })
        .collect();
    let (times, context) = time_runs(args, device, || {
        let mut tokens = texts
            .iter()
            .map(|t| tokenizer.tokenize(t))
            .collect::<Result<Vec<_>>>()?;
        tokenizer.equalize_chunks(&mut tokens);
        let ids = ids_tensor(&tokens, device)?;
        Ok(encoder
            .encode(&ids, ContextLayer::Final { clip_skip: 0 })?
            .context)
    })?;
    Ok(Measured {
        times,
        shapes: json!({"prompts": b, "context": context.dims()}),
        check: stats(&context)?,
    })
}

fn generate(args: &BenchArgs, device: &Device, dtype: DType) -> Result<Measured> {
    let pipeline = Pipeline::load(&args.model, device, dtype)?;
    let defaults = pipeline.defaults();
    let request = GenerateRequest {
        prompt: &args.prompt,
        negative_prompt: "",
        seeds: (0..args.batch.unwrap_or(1) as u64).collect(),
        steps: args.steps,
        guidance_scale: 7.5,
        sampler: SamplerKind::Euler,
        width: args.width.unwrap_or(defaults.width),
        height: args.height.unwrap_or(defaults.height),
        init_image: None,
        strength: 1.0,
        show_x0: &[],
    };
    let (times, out) = time_runs(args, device, || pipeline.generate(&request, &mut |_, _| {}))?;
    Ok(Measured {
        times,
        shapes: json!({
            "images": out.images.len(), "width": request.width, "height": request.height,
            "steps": request.steps, "guidance_scale": request.guidance_scale, "sampler": "euler",
        }),
        check: json!({}),
    })
}

/// One optimisation step as `sd-rs train` takes it (text encoder and U-Net trained jointly),
/// without data loading, loss weighting or EMA: what PyTorch's side does too.
fn train(args: &BenchArgs, device: &Device, dtype: DType) -> Result<Measured> {
    let unet_cfg: UNet2DConditionConfig = read_config(&args.model.join("unet"))?;
    let text_cfg = ClipTextConfig::from_file(args.model.join("text_encoder/config.json"))?;
    let (unet_vm, text_vm) = (VarMap::new(), VarMap::new());
    let unet =
        UNet2DConditionModel::new(seeded_var_builder(&unet_vm, 0, dtype, device), &unet_cfg)?;
    let encoder = ClipTextModel::new(seeded_var_builder(&text_vm, 0, dtype, device), &text_cfg)?;
    // The same weights as PyTorch's side: overwrite the seeded initialisation with the files.
    load_varmap_from_component(&unet_vm, &args.model.join("unet"), None)?;
    load_varmap_from_component(&text_vm, &args.model.join("text_encoder"), None)?;
    let mut vars = named_vars(&unet_vm, "unet.");
    vars.extend(named_vars(&text_vm, "text_encoder."));
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut optimizer = AdamW::new(vars, AdamWConfig::default())?;

    let b = args.batch.unwrap_or(32);
    let (h, w) = latent_size(args, &unet_cfg)?;
    let shape = [b, unet_cfg.in_channels, h, w];
    let z0 = pattern(&shape, 0.01, device, dtype)?;
    let eps = pattern(&shape, 0.013, device, dtype)?;
    // z_t = sqrt(abar) z0 + sqrt(1 - abar) eps with fixed coefficients: the cost does not depend
    // on them.
    let z_t = ((&z0 * 0.8)? + (&eps * 0.6)?)?;
    let t: Vec<f32> = (0..b).map(|i| ((i * 37) % 1000) as f32).collect();
    let t = Tensor::new(t.as_slice(), device)?;
    let len = text_cfg.max_position_embeddings;
    let ids = Tensor::from_vec(train_ids(b, &text_cfg), (b, len), device)?;

    let mut losses = Vec::new();
    let (times, ()) = time_runs(args, device, || {
        let context = encoder
            .encode(&ids, ContextLayer::Final { clip_skip: 0 })?
            .context;
        let prediction = unet.forward(&z_t, &t, &context, None)?;
        let loss = (prediction - &eps)?.sqr()?.mean_all()?;
        // Each layer's backward is timed by its own scope; what is left of the backward pass is
        // candle's: its own ops' gradients and the summing of gradients.
        let grads = profile::remainder("backward: candle's ops and gradient sums", device, || {
            loss.backward()
        })?;
        let grads = optimizer.grads(&grads);
        let _profile = profile::scope("AdamW step", device);
        optimizer.step(&grads, 1e-4)?;
        losses.push(loss.to_dtype(DType::F32)?.to_scalar::<f32>()?);
        Ok(())
    })?;
    let median_s = median(&times.timed);
    Ok(Measured {
        times,
        shapes: json!({
            "batch": b, "latents": shape, "token_ids": [b, text_cfg.max_position_embeddings],
            "trained_parameters": n_params,
        }),
        check: json!({
            "samples_per_s": b as f64 / median_s,
            "first_loss": losses.first(),
            "losses": losses,
        }),
    })
}

fn load(args: &BenchArgs, device: &Device, dtype: DType) -> Result<Measured> {
    let (times, name) = time_runs(args, device, || {
        Ok(Pipeline::load(&args.model, device, dtype)?
            .name()
            .to_string())
    })?;
    Ok(Measured {
        times,
        shapes: json!({"model": name}),
        check: json!({}),
    })
}

/// Token ids for the train case, (batch, len) row-major, each row [BOS, 10 words, EOS, PAD...]
/// (bench.py makes the same).
fn train_ids(batch: usize, cfg: &ClipTextConfig) -> Vec<u32> {
    let len = cfg.max_position_embeddings;
    let (bos, eos, pad) = (
        cfg.bos_token_id.unwrap_or(0),
        cfg.eos_token_id,
        cfg.pad_token_id.unwrap_or(0),
    );
    // Word ids after the 4 special tokens of sd-rs' word-level tokenizer.
    let words = (cfg.vocab_size as u32).saturating_sub(4).max(1);
    (0..batch as u32)
        .flat_map(|i| {
            let mut row = vec![bos];
            row.extend((0..10u32).map(|j| 4 + (i * 7 + j) % words));
            row.push(eos);
            row.resize(len, pad);
            row
        })
        .collect()
}

/// The latent (height, width): --width/--height over the VAE's downscale factor (8 unless the
/// model has a vae/config.json saying otherwise), else the U-Net's native sample_size.
fn latent_size(args: &BenchArgs, cfg: &UNet2DConditionConfig) -> Result<(usize, usize)> {
    let factor = match read_config::<AutoencoderKLConfig>(&args.model.join("vae")) {
        Ok(vae) => vae.downscale_factor(),
        Err(_) => 8,
    };
    let native = match &cfg.sample_size {
        Some(Value::Number(n)) => n.as_u64().unwrap_or(64) as usize,
        _ => 64,
    };
    let side = |pixels: Option<usize>| -> Result<usize> {
        match pixels {
            None => Ok(native),
            Some(p) if p % factor == 0 => Ok(p / factor),
            Some(p) => bail!("image side {p} is not a multiple of the VAE factor {factor}"),
        }
    };
    Ok((side(args.height)?, side(args.width)?))
}

/// The text encoder's sequence length (77 for CLIP): the U-Net's context length.
fn context_length(model: &Path) -> Result<usize> {
    let path = model.join("text_encoder/config.json");
    Ok(if path.is_file() {
        ClipTextConfig::from_file(path)?.max_position_embeddings
    } else {
        77
    })
}

/// `sin(k * i)` over the flat index i, in f32 (PyTorch: `torch.sin(torch.arange(n) * k)`).
fn pattern(shape: &[usize], k: f64, device: &Device, dtype: DType) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let i = Tensor::arange(0u32, n as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
    Ok((i * k)?
        .sin()?
        .reshape(shape)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Mean and mean absolute value of an output, for comparing with PyTorch's.
fn stats(x: &Tensor) -> Result<Value> {
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_all()?.to_scalar::<f32>()?;
    let mean_abs = x.abs()?.mean_all()?.to_scalar::<f32>()?;
    Ok(json!({"mean": mean, "mean_abs": mean_abs}))
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// This process's peak resident memory (VmHWM) in MiB, where /proc has it (Linux).
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
