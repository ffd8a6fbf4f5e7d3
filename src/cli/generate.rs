//! `sd-rs generate`: text-to-image, img2img and scripted batches.
use crate::io::png_meta::{write_png, GenerationParams};
use crate::io::prompt_file::{in_shard, parse_shard, read_prompt_file, PromptJob};
use crate::pipeline::{GenerateRequest, Pipeline, PipelineDefaults};
use crate::sampler::{img2img_start_index, SamplerKind};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::str::FromStr;

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// The prompt. Omit it with --from-file or --from-png.
    pub prompt: Option<String>,

    /// A local diffusers model directory or a Hugging Face repo id
    /// (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5). Default: the small model shipped
    /// with sd-rs in models/.
    #[arg(long, short = 'm')]
    pub model: Option<String>,

    /// What the image should not contain.
    #[arg(long, short = 'n', default_value = "")]
    pub negative_prompt: String,

    /// Denoising steps. Default: per model family (e.g. 20; 1 for turbo models).
    #[arg(long)]
    pub steps: Option<usize>,

    /// Classifier-free guidance scale; <= 1 turns guidance off (as turbo models need).
    #[arg(long, visible_alias = "cfg-scale")]
    pub guidance_scale: Option<f64>,

    /// ddpm, ddim, euler, euler-a, dpm++2m, dpm++2m-karras (AUTOMATIC1111 names such as
    /// "Euler a" or "DPM++ 2M Karras" work too).
    #[arg(long)]
    pub sampler: Option<String>,

    /// Seed of the first image; image i uses seed + i. Random when omitted or -1.
    #[arg(long, allow_hyphen_values = true)]
    pub seed: Option<i64>,

    /// Image width in pixels (a multiple of 8). Default: the model's native size.
    #[arg(long, short = 'W')]
    pub width: Option<usize>,

    /// Image height in pixels (a multiple of 8). Default: the model's native size.
    #[arg(long, short = 'H')]
    pub height: Option<usize>,

    /// Images to make per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,

    /// Images denoised together. They share the prompt encoding and sampler steps; the U-Net
    /// still runs per image, so that each image equals the run of its seed alone.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,

    /// A PNG file, or a folder where images are named by --name-pattern.
    #[arg(long, short = 'o', default_value = "outputs")]
    pub output: PathBuf,

    /// File names inside an output folder: {index} {seed} {prompt} {line} are replaced.
    #[arg(long, default_value = "{index}-{seed}.png")]
    pub name_pattern: String,

    /// Replace existing output files instead of skipping them.
    #[arg(long)]
    pub overwrite: bool,

    /// Start from this image (img2img).
    #[arg(long)]
    pub init_image: Option<PathBuf>,

    /// img2img: how much of the init image to repaint, 0..1.
    // Negative numbers parse as values so `--strength -0.5` gets our range message, not clap's
    // "unexpected argument".
    #[arg(long, default_value_t = 0.75, allow_negative_numbers = true)]
    pub strength: f64,

    /// Read prompts from a file: one per line, AUTOMATIC1111 options or JSON Lines.
    #[arg(long, conflicts_with = "from_png")]
    pub from_file: Option<PathBuf>,

    /// Run only shard i of n of the prompt file (e.g. 2/4), to split work across processes.
    #[arg(long, requires = "from_file")]
    pub shard: Option<String>,

    /// Re-make an image from the parameters stored in a PNG.
    #[arg(long)]
    pub from_png: Option<PathBuf>,

    /// Also save a strip of the predicted x0 (decoded) at these steps, e.g. 1,5,10,20.
    #[arg(long, value_delimiter = ',')]
    pub show_x0: Vec<usize>,

    /// Compute dtype: auto (bf16 on CUDA, f32 on CPU), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,

    /// Also write an upscaled copy (nearest neighbour, this factor) for viewing small images.
    #[arg(long)]
    pub preview_scale: Option<u32>,
}

/// One image to make, with every setting resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageJob {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
    pub width: usize,
    pub height: usize,
    pub output: PathBuf,
    /// Where the job came from, for messages: "prompt", "FILE:LINE" or the PNG path.
    pub origin: String,
}

impl ImageJob {
    /// Jobs that can share one batched denoising run: everything equal but the seed.
    fn batchable_with(&self, other: &ImageJob) -> bool {
        (
            &self.prompt,
            &self.negative_prompt,
            self.steps,
            self.sampler,
            self.width,
            self.height,
        ) == (
            &other.prompt,
            &other.negative_prompt,
            other.steps,
            other.sampler,
            other.width,
            other.height,
        ) && self.guidance_scale == other.guidance_scale
    }
}

/// A bad line of a prompt file: reported, and the rest still runs.
#[derive(Debug)]
pub struct SkippedLine {
    pub origin: String,
    pub reason: String,
}

/// The settings one request (the command line, a prompt-file line, a PNG) may set.
#[derive(Debug, Default, Clone)]
struct Request {
    prompt: String,
    negative_prompt: Option<String>,
    seed: Option<i64>,
    steps: Option<usize>,
    guidance_scale: Option<f64>,
    sampler: Option<String>,
    width: Option<usize>,
    height: Option<usize>,
    num_images: Option<usize>,
    origin: String,
    line: Option<usize>,
    /// The run-wide number of this request's first image, for `{index}` in file names.
    first_index: usize,
}

fn random_seed() -> u64 {
    // Stay within 2^32 so seeds are easy to type and match A1111's range.
    rand::random::<u32>() as u64
}

/// Turns the command line into the list of images to make.
pub fn plan_jobs(
    args: &GenerateArgs,
    defaults: &PipelineDefaults,
) -> Result<(Vec<ImageJob>, Vec<SkippedLine>)> {
    let mut requests = Vec::new();
    let mut skipped = Vec::new();
    let cli = Request {
        prompt: args.prompt.clone().unwrap_or_default(),
        negative_prompt: None,
        seed: args.seed,
        steps: args.steps,
        guidance_scale: args.guidance_scale,
        sampler: args.sampler.clone(),
        width: args.width,
        height: args.height,
        num_images: Some(args.num_images),
        origin: "prompt".into(),
        line: None,
        first_index: 0,
    };
    if let Some(file) = &args.from_file {
        if args.prompt.is_some() {
            bail!("give either a PROMPT or --from-file, not both");
        }
        let shard = args.shard.as_deref().map(parse_shard).transpose()?;
        let entries = read_prompt_file(file)?;
        if entries.is_empty() {
            bail!(
                "{} has no prompts (only empty lines and # comments)",
                file.display()
            );
        }
        // Every line, good or bad, belongs to exactly one shard, and images are numbered over
        // the whole file: the shards of a file together make the images of the whole file,
        // under the same names, and report each bad line once.
        let mut first_index = 0;
        for (n, entry) in entries.into_iter().enumerate() {
            let mine = shard.is_none_or(|s| in_shard(n, s));
            match entry {
                Ok(job) => {
                    let request = merge_prompt_job(&cli, job, file, args, first_index);
                    first_index += request.num_images.unwrap_or(1);
                    if mine {
                        requests.push(request);
                    }
                }
                Err(e) if mine => skipped.push(SkippedLine {
                    origin: format!("{}:{}", file.display(), e.line),
                    reason: e.message,
                }),
                Err(_) => {}
            }
        }
        if let Some((i, n)) = shard.filter(|_| requests.is_empty() && skipped.is_empty()) {
            eprintln!("shard {i}/{n} of {} has no prompts", file.display());
        }
    } else if let Some(png) = &args.from_png {
        let text = crate::io::png_meta::read_parameters(png)?
            .with_context(|| format!("{} has no generation parameters to re-run", png.display()))?;
        let p = GenerationParams::from_a1111(&text)
            .with_context(|| format!("reading {}", png.display()))?;
        if let (Some(strength), None) = (p.denoising_strength, &args.init_image) {
            eprintln!(
                "warning: {} was made by img2img (denoising strength {strength}); without \
                 --init-image this makes a new image from noise",
                png.display()
            );
        }
        // The command line overrides what the PNG says, so a re-run can vary one setting.
        requests.push(Request {
            prompt: args.prompt.clone().unwrap_or(p.prompt),
            negative_prompt: Some(if args.negative_prompt.is_empty() {
                p.negative_prompt
            } else {
                args.negative_prompt.clone()
            }),
            seed: Some(args.seed.unwrap_or(p.seed as i64)),
            steps: Some(args.steps.unwrap_or(p.steps)),
            guidance_scale: Some(args.guidance_scale.unwrap_or(p.cfg_scale)),
            sampler: Some(args.sampler.clone().unwrap_or(p.sampler)),
            width: Some(args.width.unwrap_or(p.width)),
            height: Some(args.height.unwrap_or(p.height)),
            num_images: Some(args.num_images),
            origin: png.display().to_string(),
            line: None,
            first_index: 0,
        });
    } else {
        if cli.prompt.is_empty() {
            bail!("no prompt: give one, e.g. sd-rs generate \"anime girl, red hair\", or use --from-file / --from-png");
        }
        requests.push(Request {
            negative_prompt: Some(args.negative_prompt.clone()),
            ..cli
        });
    }

    let mut jobs = Vec::new();
    for request in requests {
        match expand(&request, args, defaults) {
            Ok(mut more) => jobs.append(&mut more),
            // A prompt-file line fails alone; a prompt or a PNG is the whole run.
            Err(e) if args.from_file.is_none() => return Err(e),
            Err(e) => skipped.push(SkippedLine {
                origin: request.origin.clone(),
                reason: format!("{e:#}"),
            }),
        }
    }
    Ok((jobs, skipped))
}

fn merge_prompt_job(
    cli: &Request,
    job: PromptJob,
    file: &Path,
    args: &GenerateArgs,
    first_index: usize,
) -> Request {
    let num_images = job
        .batch_size
        .map(|b| b * job.n_iter.unwrap_or(1))
        .or(job.n_iter.map(|n| n * args.num_images));
    Request {
        prompt: job.prompt,
        negative_prompt: Some(
            job.negative_prompt
                .unwrap_or_else(|| args.negative_prompt.clone()),
        ),
        seed: job.seed.or(cli.seed),
        steps: job.steps.or(cli.steps),
        guidance_scale: job.cfg_scale.or(cli.guidance_scale),
        sampler: job.sampler_name.or(cli.sampler.clone()),
        width: job.width.or(cli.width),
        height: job.height.or(cli.height),
        num_images: num_images.or(cli.num_images),
        origin: format!("{}:{}", file.display(), job.line),
        line: Some(job.line),
        first_index,
    }
}

fn expand(r: &Request, args: &GenerateArgs, defaults: &PipelineDefaults) -> Result<Vec<ImageJob>> {
    let width = r.width.unwrap_or(defaults.width);
    let height = r.height.unwrap_or(defaults.height);
    if !is_valid_side(width) || !is_valid_side(height) {
        bail!(
            "size {width}x{height}: width and height must be positive multiples of 8 (e.g. {}x{})",
            valid_side(width),
            valid_side(height)
        );
    }
    let sampler = match &r.sampler {
        Some(name) => SamplerKind::from_str(name).map_err(|e| anyhow::anyhow!("{e}"))?,
        None => defaults.sampler,
    };
    let steps = r.steps.unwrap_or(defaults.steps);
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.init_image.is_some() && img2img_start_index(steps, args.strength) >= steps {
        bail!(
            "--strength {} leaves no denoising steps: img2img runs int({steps} x {}) = {} of \
             the {steps} steps; raise --strength or --steps",
            args.strength,
            args.strength,
            (steps as f64 * args.strength) as usize
        );
    }
    let seed = match r.seed {
        None | Some(-1) => {
            let s = random_seed();
            eprintln!("{}: seed {s}", r.origin);
            s
        }
        Some(s) if s < 0 => bail!("seed {s} is negative; use -1 for a random seed"),
        Some(s) => s as u64,
    };
    let n = r.num_images.unwrap_or(1);
    Ok((0..n)
        .map(|i| {
            let seed = seed + i as u64;
            let index = r.first_index + i;
            ImageJob {
                prompt: r.prompt.clone(),
                negative_prompt: r.negative_prompt.clone().unwrap_or_default(),
                seed,
                steps,
                guidance_scale: r.guidance_scale.unwrap_or(defaults.guidance_scale),
                sampler,
                width,
                height,
                output: output_path(
                    &args.output,
                    &args.name_pattern,
                    index,
                    seed,
                    &r.prompt,
                    r.line,
                ),
                origin: r.origin.clone(),
            }
        })
        .collect())
}

fn is_valid_side(pixels: usize) -> bool {
    pixels > 0 && pixels.is_multiple_of(8)
}

/// The nearest valid side at or above `pixels`, for suggestions.
fn valid_side(pixels: usize) -> usize {
    if is_valid_side(pixels) {
        pixels
    } else {
        (pixels / 8 + 1) * 8
    }
}

/// `--output` ending in .png is a file (numbered when a run makes several images); anything
/// else is a folder where `--name-pattern` names the files.
fn output_path(
    output: &Path,
    pattern: &str,
    index: usize,
    seed: u64,
    prompt: &str,
    line: Option<usize>,
) -> PathBuf {
    let is_file = output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_file {
        if index == 0 {
            return output.to_path_buf();
        }
        let stem = output.file_stem().unwrap().to_string_lossy();
        return output.with_file_name(format!("{stem}-{index}.png"));
    }
    let name = pattern
        .replace("{index}", &format!("{index:05}"))
        .replace("{seed}", &seed.to_string())
        .replace("{line}", &line.map(|l| l.to_string()).unwrap_or_default())
        .replace("{prompt}", &slug(prompt));
    output.join(name)
}

/// A file-name-safe short form of a prompt.
fn slug(prompt: &str) -> String {
    let s: String = prompt
        .chars()
        .map(|c| {
            if c.is_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let s = s
        .split('_')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join("_");
    s.chars().take(60).collect()
}

/// Groups consecutive batchable jobs into runs of at most `batch_size`.
pub fn batches(jobs: &[ImageJob], batch_size: usize) -> Vec<&[ImageJob]> {
    let mut out = Vec::new();
    let mut start = 0;
    for end in 1..=jobs.len() {
        if end == jobs.len()
            || end - start == batch_size.max(1)
            || !jobs[start].batchable_with(&jobs[end])
        {
            out.push(&jobs[start..end]);
            start = end;
        }
    }
    out
}

/// Checks what can be checked without the model, so a mistake costs no model load.
fn check_args(args: &GenerateArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.strength) {
        bail!("--strength {} must be between 0 and 1", args.strength);
    }
    if args.from_file.is_some() && args.prompt.is_some() {
        bail!("give either a PROMPT or --from-file, not both");
    }
    let has_prompt = args.prompt.as_deref().is_some_and(|p| !p.trim().is_empty());
    if !has_prompt && args.from_file.is_none() && args.from_png.is_none() {
        bail!(
            "no prompt: give one, e.g. sd-rs generate \"anime girl, red hair\", or use \
             --from-file / --from-png"
        );
    }
    if let Some(spec) = &args.shard {
        parse_shard(spec)?;
    }
    if args.num_images == 0 || args.batch_size == 0 {
        bail!("--num-images and --batch-size must be at least 1");
    }
    if args.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if let Some(seed) = args.seed.filter(|&s| s < -1) {
        bail!("--seed {seed} is negative; use -1 for a random seed");
    }
    if let Some(name) = &args.sampler {
        SamplerKind::from_str(name)?;
    }
    for (flag, value) in [("--width", args.width), ("--height", args.height)] {
        if let Some(v) = value.filter(|&v| !is_valid_side(v)) {
            bail!(
                "{flag} {v} must be a positive multiple of 8 (e.g. {})",
                valid_side(v)
            );
        }
    }
    if args.show_x0.contains(&0) {
        bail!("--show-x0 counts steps from 1");
    }
    Ok(())
}

/// Makes sure images can be written where `--output` points before any work is done, so a
/// typo fails in a second, not after the last image is computed.
fn prepare_output(output: &Path) -> Result<()> {
    let is_file = output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    let dir = if is_file {
        if output.is_dir() {
            bail!("--output {} is a folder, not a PNG file", output.display());
        }
        output
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    } else {
        output
    };
    // A file where a folder should be is the usual mistake; name it.
    if let Some(blocker) = dir
        .ancestors()
        .find(|a| !a.as_os_str().is_empty() && a.exists())
        .filter(|a| !a.is_dir())
    {
        bail!(
            "cannot write images to {}: {} is a file, not a folder",
            dir.display(),
            blocker.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    let probe = dir.join(format!(".sd-rs-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("cannot write images to {}", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_args(&args)?;
    prepare_output(&args.output)?;
    let init_image = args
        .init_image
        .as_deref()
        .map(crate::pipeline::load_image)
        .transpose()
        .context("reading --init-image")?;
    let device = crate::device::select_device(&args.device.parse()?)?;
    let dtype = crate::device::parse_dtype(&args.dtype, &device)?;
    let variant = (dtype != candle_core::DType::F32).then_some("fp16");
    let model_dir = crate::io::model_dir::resolve_model(args.model.as_deref(), variant)?;
    let started = std::time::Instant::now();
    let pipeline = Pipeline::load(&model_dir, &device, dtype)?;
    eprintln!(
        "loaded {} in {:.2}s",
        pipeline.name(),
        started.elapsed().as_secs_f64()
    );

    let (jobs, mut failed) = plan_jobs(&args, &pipeline.defaults())?;
    for s in &failed {
        eprintln!("{}: skipped: {}", s.origin, s.reason);
    }
    let (todo, existing): (Vec<ImageJob>, Vec<ImageJob>) = jobs
        .into_iter()
        .partition(|j| args.overwrite || !j.output.exists());
    if !existing.is_empty() {
        eprintln!(
            "{} images already exist and are kept (use --overwrite to replace them)",
            existing.len()
        );
    }

    let bar = ProgressBar::new(todo.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images, ETA {eta} {msg}",
        )
        .unwrap(),
    );
    let mut written = 0;
    let mut warned = std::collections::HashSet::new();
    for batch in batches(&todo, args.batch_size) {
        let job = &batch[0];
        let request = GenerateRequest {
            prompt: &job.prompt,
            negative_prompt: &job.negative_prompt,
            seeds: batch.iter().map(|j| j.seed).collect(),
            steps: job.steps,
            guidance_scale: job.guidance_scale,
            sampler: job.sampler,
            width: job.width,
            height: job.height,
            init_image: init_image.as_ref(),
            strength: args.strength,
            show_x0: &args.show_x0,
        };
        bar.set_message(job.origin.clone());
        if warned.insert(job.prompt.clone()) {
            let unknown = pipeline.unknown_words(&job.prompt);
            if !unknown.is_empty() {
                bar.suspend(|| {
                    eprintln!(
                        "warning: {}: the model does not know {}; generating without them",
                        job.origin,
                        unknown
                            .iter()
                            .map(|w| format!("{w:?}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                });
            }
        }
        let result = pipeline.generate(&request, &mut |_step, _total| bar.tick());
        match result {
            Ok(output) => {
                for (j, image) in batch.iter().zip(&output.images) {
                    let params = GenerationParams {
                        prompt: j.prompt.clone(),
                        negative_prompt: j.negative_prompt.clone(),
                        steps: j.steps,
                        sampler: j.sampler.to_string(),
                        cfg_scale: j.guidance_scale,
                        seed: j.seed,
                        width: j.width,
                        height: j.height,
                        model: Some(pipeline.name().to_string()),
                        denoising_strength: init_image.as_ref().map(|_| args.strength),
                        extra: Vec::new(),
                    };
                    save_image(&j.output, image, &params.to_a1111(), args.preview_scale)?;
                    bar.suspend(|| eprintln!("{} (seed {})", j.output.display(), j.seed));
                    written += 1;
                }
                for (j, strip) in batch.iter().zip(&output.x0_strips) {
                    let path = j.output.with_file_name(format!(
                        "{}-x0.png",
                        j.output.file_stem().unwrap().to_string_lossy()
                    ));
                    save_image(&path, strip, "predicted x0 at the chosen steps", None)?;
                }
            }
            Err(e) => failed.push(SkippedLine {
                origin: job.origin.clone(),
                reason: format!("{e:#}"),
            }),
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    eprintln!(
        "done: {written} images written, {} kept, {} failed, in {:.1}s",
        existing.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        for f in &failed {
            eprintln!("  {}: {}", f.origin, f.reason);
        }
        bail!("{} requests failed", failed.len());
    }
    Ok(())
}

fn save_image(
    path: &Path,
    image: &image::RgbImage,
    parameters: &str,
    preview_scale: Option<u32>,
) -> Result<()> {
    write_png(
        path,
        image.as_raw(),
        image.width(),
        image.height(),
        parameters,
    )?;
    if let Some(scale) = preview_scale.filter(|&s| s > 1) {
        let big = image::imageops::resize(
            image,
            image.width() * scale,
            image.height() * scale,
            image::imageops::FilterType::Nearest,
        );
        let preview = path.with_file_name(format!(
            "{}-preview.png",
            path.file_stem().unwrap().to_string_lossy()
        ));
        write_png(
            &preview,
            big.as_raw(),
            big.width(),
            big.height(),
            parameters,
        )?;
    }
    Ok(())
}
