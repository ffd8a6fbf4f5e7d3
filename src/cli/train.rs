//! `sd-rs train`: the DDPM objective in latent space, on captioned images.
//!
//! Per step, for a batch of cached VAE latents z0 and their captions:
//!
//! ```text
//! t   ~ Uniform{0 .. T-1}, one per sample        eps ~ N(0, I)
//! z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps   (closed form q(z_t | z0))
//! loss = mean over samples of w(t) * || target - unet(z_t, t, text(caption)) ||^2
//! ```
//! where the target is eps, v or z0 per the scheduler's `prediction_type`, and w(t) is 1 or
//! the min-SNR-gamma weight. Captions are dropped (replaced by "") 10% of the time so the model
//! also learns the unconditional prediction that classifier-free guidance needs.
//!
//! From scratch, the config gives the U-Net and text encoder architectures, a trained VAE
//! (`sd-rs train-vae`) and the noise schedule; a word-level tokenizer is built from the captions.
//! With `--model`, a diffusers Stable Diffusion model is fine-tuned (its text encoder frozen
//! unless `train_text_encoder = true`).
use super::train_common::{
    check_fresh_output, load_dataset, read_toml, OptimOptions, Run, RunArgs,
};
use crate::io::model_dir::ModelIndex;
use crate::model::clip::{ClipTextConfig, ClipTextModel, ContextLayer};
use crate::model::tokenizer::{ids_tensor, PromptTokenizer};
use crate::model::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::model::weights::{
    diffusers_config_json, find_weight_files, load_component, load_varmap_from_component,
    save_component, save_safetensors_atomic, varmap_tensors,
};
use crate::pipeline::{image_grid, GenerateRequest, Pipeline};
use crate::sampler::SamplerKind;
use crate::schedule::{NoiseSchedule, PredictionType, SchedulerConfig};
use crate::train::data::{BatchConfig, Batcher, CropMode, Loader};
use crate::train::init::seeded_var_builder;
use crate::train::latent_cache::{file_identity, sample_latent, CacheSettings, LatentCache};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use indicatif::ProgressBar;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Captions: a .jsonl file ({"file_name": ..., "text": ...}), a folder with metadata.jsonl,
    /// or a folder of images with sidecar .txt captions.
    #[arg(long)]
    pub captions: PathBuf,

    /// Fine-tune this diffusers model directory instead of training from scratch.
    #[arg(long)]
    pub model: Option<PathBuf>,

    /// The VAE (a diffusers `vae/` folder, e.g. from `sd-rs train-vae`) for training from
    /// scratch; overrides the config's `model.vae`.
    #[arg(long)]
    pub vae: Option<PathBuf>,

    /// Where encoded latents are cached and reused across runs
    /// (default: $SD_RS_CACHE, else ~/.cache/sd-rs).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,

    /// Save the final weights in f16 (half the size; what the shipped model uses).
    #[arg(long)]
    pub save_f16: bool,

    /// Run the U-Net in bf16 with f32 master weights (overrides the config's mixed_precision;
    /// meant for CUDA: on the CPU bf16 is slower than f32).
    #[arg(long, value_enum)]
    pub mixed_precision: Option<MixedPrecision>,

    #[command(flatten)]
    pub run: RunArgs,
}

/// A training config file (configs/*.toml).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Side of the square training images; by default the model's native size (the U-Net's
    /// `sample_size` times the VAE's downscale factor: 512 for SD 1.x).
    #[serde(default)]
    pub resolution: Option<u32>,
    #[serde(default)]
    pub random_flip: bool,
    /// Probability of training on the empty caption (for classifier-free guidance).
    #[serde(default = "default_caption_dropout")]
    pub caption_dropout: f64,
    /// Probability of leaving out each comma-separated tag after the first `caption_keep_tags`
    /// when a caption is used (kohya's `caption_tag_dropout_rate` / `keep_tokens`), so prompts
    /// that name only some of a caption's tags are in the training distribution; 0 (the
    /// default) uses captions as written.
    #[serde(default)]
    pub caption_tag_dropout: f64,
    #[serde(default)]
    pub caption_keep_tags: usize,
    /// Shuffle the tags after the first `caption_keep_tags` each time a caption is used
    /// (kohya's `shuffle_caption`), so that a tag means the same wherever a prompt puts it.
    #[serde(default)]
    pub caption_shuffle_tags: bool,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023); 0 turns it off.
    #[serde(default)]
    pub min_snr_gamma: f64,
    /// Adds noise_offset * N(0, 1) per sample and channel to eps (brighter/darker images).
    #[serde(default)]
    pub noise_offset: f64,
    /// Train the text encoder jointly (always on from scratch).
    #[serde(default)]
    pub train_text_encoder: bool,
    /// "bf16" runs the U-Net's forward and backward in bfloat16 while the optimizer keeps f32
    /// weights (mixed precision, for CUDA); "no" (the default) trains in f32.
    #[serde(default)]
    pub mixed_precision: MixedPrecision,
    #[serde(default)]
    pub validation: Validation,
    #[serde(default)]
    pub train: OptimOptions,
    /// The architecture when training from scratch.
    pub model: Option<ScratchModel>,
}

/// accelerate's `--mixed_precision` values. fp16 is not offered: without bf16's exponent range
/// its gradients underflow unless the loss is scaled, which bf16 makes unnecessary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    #[default]
    No,
    Bf16,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Validation {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: String,
}

impl Default for Validation {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            seeds: vec![0, 1, 2, 3],
            steps: 20,
            guidance_scale: 4.0,
            sampler: "euler".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchModel {
    /// A trained VAE folder (config.json + safetensors).
    pub vae: Option<PathBuf>,
    /// Context length of the word-level tokenizer built from the captions.
    #[serde(default = "default_max_length")]
    pub tokenizer_max_length: usize,
    pub unet: UNet2DConditionConfig,
    /// A CLIP text encoder config; `vocab_size`, `max_position_embeddings` and the special
    /// token ids are set from the tokenizer.
    pub text_encoder: ClipTextConfig,
    pub scheduler: SchedulerConfig,
}

fn default_caption_dropout() -> f64 {
    0.1
}
fn default_max_length() -> usize {
    77
}

/// Everything the loop needs, whichever way it was obtained.
struct Components {
    tokenizer: PromptTokenizer,
    tokenizer_dir: PathBuf,
    text_config: ClipTextConfig,
    unet_config: UNet2DConditionConfig,
    vae_dir: PathBuf,
    scheduler: SchedulerConfig,
    /// The pretrained weights directory to start from, if fine-tuning.
    init: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> Result<()> {
    let mut cfg: TrainConfig = match &args.run.config {
        Some(path) => read_toml(Some(path), &args.run.set)?,
        None if args.model.is_some() => read_toml(None, &args.run.set)?,
        None => bail!("training from scratch needs --config (see configs/sd-rs-anime/unet.toml); to fine-tune pass --model"),
    };
    args.run.apply(&mut cfg.train);
    for (name, p) in [
        ("caption_dropout", cfg.caption_dropout),
        ("caption_tag_dropout", cfg.caption_tag_dropout),
    ] {
        ensure!(
            (0.0..=1.0).contains(&p),
            "{name} is a probability: give a value in 0..1, not {p}"
        );
    }
    if let Some(mp) = args.mixed_precision {
        cfg.mixed_precision = mp;
    }
    let device = crate::device::select_device(&args.run.device.parse()?)?;
    eprintln!("device: {}", crate::device::describe_device(&device));
    if cfg.mixed_precision == MixedPrecision::Bf16 && device.is_cpu() {
        bail!(
            "mixed_precision bf16 needs a CUDA device (--device cuda:0): candle's CPU backend has \
             no bf16 matrix multiply. On the CPU train in f32 (--mixed-precision no)"
        );
    }
    let items = load_dataset(&args.captions, args.run.strict)?;
    std::fs::create_dir_all(&args.run.output)
        .with_context(|| format!("creating {}", args.run.output.display()))?;
    check_fresh_output(&args.run.output, args.run.resume)?;

    let c = components(&args, &cfg, &items)?;
    let train_text_encoder = trains_text_encoder(&cfg, &c);

    // The frozen VAE encodes every image once; its latents are reused by later runs.
    let vae_files = find_weight_files(&c.vae_dir, None)?;
    let (vae_cfg, vb) =
        load_component::<AutoencoderKLConfig>(&c.vae_dir, None, DType::F32, &device)?;
    let vae = AutoencoderKL::new(vb, &vae_cfg)?;
    let resolution = *cfg
        .resolution
        .get_or_insert_with(|| native_resolution(&c.unet_config, &vae_cfg));
    let mut identity: Vec<&Path> = vae_files.iter().map(|p| p.as_path()).collect();
    let vae_config_path = c.vae_dir.join("config.json");
    identity.push(&vae_config_path);
    let settings = CacheSettings {
        resolution,
        crop: CropMode::Center,
        flip: cfg.random_flip,
        encoder_id: format!("{} f32 moments", file_identity(&identity)?),
    };
    let cache_dir = args
        .cache_dir
        .clone()
        .unwrap_or_else(default_cache_dir)
        .join("latents");
    let cache = LatentCache::open(&cache_dir, settings)?;
    let bar = ProgressBar::new(items.len() as u64);
    bar.set_message("encoding images");
    let report = cache.prepare(
        &items,
        cfg.train.batch_size,
        args.run.strict,
        |pixels| {
            let post = vae.encode(&pixels.to_device(&device)?)?;
            Ok(Tensor::cat(&[&post.mean, &post.logvar], 1)?.to_device(&Device::Cpu)?)
        },
        |done, _| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    for skipped in &report.skipped {
        eprintln!(
            "warning: skipped {}: {}",
            skipped.path.display(),
            skipped.error
        );
    }
    eprintln!(
        "latents: {} encoded, {} from the cache in {}, {} unreadable images skipped",
        report.encoded,
        report.reused,
        cache_dir.display(),
        report.skipped.len()
    );
    // Train on the images that were encoded, so unreadable ones are reported once, above.
    let (usable, entries): (Vec<_>, Vec<_>) = items
        .iter()
        .zip(report.entries)
        .filter_map(|(item, entry)| Some((item.clone(), Some(entry?))))
        .unzip();
    if usable.is_empty() {
        bail!(
            "none of the {} images of {} could be read (see the warnings above)",
            items.len(),
            args.captions.display()
        );
    }
    let items = Arc::new(usable);

    // The trained networks live in VarMaps so the optimizer can update them. Their initial
    // weights come from the run's seed, so a run stopped and resumed ends where an
    // uninterrupted one does (candle's CPU init is unseeded).
    let unet_vm = VarMap::new();
    let seed = cfg.train.seed;
    let mut unet = UNet2DConditionModel::new(
        seeded_var_builder(&unet_vm, seed, DType::F32, &device),
        &c.unet_config,
    )?;
    if cfg.mixed_precision == MixedPrecision::Bf16 {
        unet.set_compute_dtype(DType::BF16);
    }
    let te_vm = VarMap::new();
    let text_encoder = if train_text_encoder {
        ClipTextModel::new(
            seeded_var_builder(&te_vm, seed, DType::F32, &device),
            &c.text_config,
        )?
    } else {
        let dir = c.init.as_ref().unwrap().join("text_encoder");
        let (cfg, vb) = load_component::<ClipTextConfig>(&dir, None, DType::F32, &device)?;
        ClipTextModel::new(vb, &cfg)?
    };
    if let Some(init) = &c.init {
        load_varmap_from_component(&unet_vm, &init.join("unet"), None)?;
        if train_text_encoder {
            load_varmap_from_component(&te_vm, &init.join("text_encoder"), None)?;
        }
    }
    let mut trained = vec![("unet".to_string(), unet_vm.clone())];
    if train_text_encoder {
        trained.push(("text_encoder".to_string(), te_vm.clone()));
    }
    let mut run = Run::start(
        &args.run.output,
        cfg.train.clone(),
        trained,
        serde_json::to_value(&cfg)?,
        args.run.resume,
    )?;

    let schedule = NoiseSchedule::new(&c.scheduler)?;
    let n_train = schedule.num_train_timesteps() as u32;
    let batch_config = BatchConfig {
        batch_size: cfg.train.batch_size,
        seed: cfg.train.seed,
        caption_dropout: cfg.caption_dropout,
        caption_tag_dropout: cfg.caption_tag_dropout,
        caption_keep_tags: cfg.caption_keep_tags,
        caption_shuffle_tags: cfg.caption_shuffle_tags,
        strict: args.run.strict,
    };
    let batcher = Batcher::new(
        items,
        LatentCache::loader(entries, cfg.random_flip),
        batch_config,
        run.data,
    )?;
    let mut loader = Loader::spawn(batcher, 4)?;

    let gamma = cfg.min_snr_gamma;
    while !run.done() {
        let batch = loader.next_batch()?;
        for skipped in &batch.skipped {
            run.println(format!(
                "warning: skipped {}: {}",
                skipped.path.display(),
                skipped.error
            ));
        }
        let b = batch.indices.len();
        let z0 =
            vae.scale_latents(&sample_latent(&batch.samples, &mut run.rng)?.to_device(&device)?)?;
        let context = encode_captions(&c.tokenizer, &text_encoder, &batch.captions, &device)?;

        // The forward process in closed form, one timestep per sample.
        let steps: Vec<u32> = (0..b).map(|_| run.rng.random_range(0..n_train)).collect();
        let t = Tensor::new(steps.as_slice(), &device)?;
        let mut eps = crate::train::randn(&mut run.rng, z0.shape(), &device)?;
        if cfg.noise_offset > 0.0 {
            let offset = crate::train::randn(&mut run.rng, (b, z0.dim(1)?, 1, 1), &device)?;
            eps = eps.broadcast_add(&(offset * cfg.noise_offset)?)?;
        }
        let z_t = schedule.q_sample(&z0, &t, &eps)?;
        let prediction = unet
            .forward(&z_t, &t.to_dtype(DType::F32)?, &context, None)?
            .to_dtype(DType::F32)?;
        let target = schedule.training_target(&z0, &eps, &t)?;
        let per_sample = (prediction - target)?.sqr()?.flatten_from(1)?.mean(1)?;
        let loss = if gamma > 0.0 {
            let weights: Vec<f32> = steps
                .iter()
                .map(|&t| {
                    min_snr_weight(schedule.snr(t as usize), gamma, schedule.prediction_type) as f32
                })
                .collect();
            (per_sample * Tensor::new(weights.as_slice(), &device)?)?.mean_all()?
        } else {
            per_sample.mean_all()?
        };
        let grads = run.optimizer.grads(&loss.backward()?);
        let loss_value = loss.to_scalar::<f32>()? as f64;
        if run.micro_step(loss_value, grads, batch.next)? && run.validation_due() {
            save_model_dir(&args.run.output, &run, &c, &cfg, None)?;
            if !cfg.validation.prompts.is_empty() {
                let path = validate(&args.run.output, &cfg.validation, run.step, &device)?;
                run.println(format!(
                    "step {}: validation images in {}",
                    run.step,
                    path.display()
                ));
            }
        }
    }
    run.finish();
    save_model_dir(
        &args.run.output,
        &run,
        &c,
        &cfg,
        args.save_f16.then_some(DType::F16),
    )?;
    eprintln!(
        "wrote the model to {}; try: sd-rs generate --model {} \"...\"",
        args.run.output.display(),
        args.run.output.display()
    );
    Ok(())
}

/// The image size a model was made for: the U-Net's latent `sample_size` (an int, or [h, w];
/// 64 when absent, as SD 1.x) times how much the VAE shrinks images.
fn native_resolution(unet: &UNet2DConditionConfig, vae: &AutoencoderKLConfig) -> u32 {
    let latent = match &unet.sample_size {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::Array(a)) => a.first().and_then(|v| v.as_u64()),
        _ => None,
    };
    (latent.unwrap_or(64) as usize * vae.downscale_factor()) as u32
}

/// The min-SNR-gamma weight of a sample at `snr`, for the loss in the model's parameterisation:
/// min(snr, gamma) / snr for eps, / (snr + 1) for v, and min(snr, gamma) for x0.
pub fn min_snr_weight(snr: f64, gamma: f64, prediction: PredictionType) -> f64 {
    let clipped = snr.min(gamma);
    match prediction {
        PredictionType::Epsilon => clipped / snr.max(1e-12),
        PredictionType::VPrediction => clipped / (snr + 1.0),
        PredictionType::Sample => clipped,
    }
}

/// Captions -> the U-Net's context. Long captions are truncated to one window, as diffusers'
/// training scripts do (prompts at sampling time are chunked instead).
fn encode_captions(
    tokenizer: &PromptTokenizer,
    encoder: &ClipTextModel,
    captions: &[String],
    device: &Device,
) -> Result<Tensor> {
    let tokens = captions
        .iter()
        .map(|c| tokenizer.tokenize_truncated(c))
        .collect::<Result<Vec<_>>>()?;
    let ids = ids_tensor(&tokens, device)?;
    Ok(encoder
        .encode(&ids, ContextLayer::Final { clip_skip: 0 })?
        .context)
}

fn default_cache_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SD_RS_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| ".".into())).join(".cache")
        });
    base.join("sd-rs")
}

/// Where each component comes from: a pretrained model (fine-tuning) or the config (scratch).
fn components(
    args: &TrainArgs,
    cfg: &TrainConfig,
    items: &[crate::io::captions::CaptionedImage],
) -> Result<Components> {
    if let Some(model) = &args.model {
        let index = ModelIndex::read(model)?;
        if index.class_name != "StableDiffusionPipeline" {
            bail!(
                "{}: fine-tuning supports StableDiffusionPipeline models (SD 1.x/2.x), not {}",
                model.display(),
                index.class_name
            );
        }
        return Ok(Components {
            tokenizer: PromptTokenizer::from_dir(model.join("tokenizer"))?,
            tokenizer_dir: model.join("tokenizer"),
            text_config: ClipTextConfig::from_file(model.join("text_encoder/config.json"))?,
            unet_config: crate::model::weights::read_config(&model.join("unet"))?,
            vae_dir: args.vae.clone().unwrap_or_else(|| model.join("vae")),
            scheduler: SchedulerConfig::from_file(model.join("scheduler/scheduler_config.json"))?,
            init: Some(model.clone()),
        });
    }
    let scratch = cfg.model.as_ref().context(
        "the config has no [model] section: add one to train from scratch, or pass --model",
    )?;
    let vae_dir = args.vae.clone().or_else(|| scratch.vae.clone()).context(
        "no VAE: set model.vae in the config or pass --vae (train one with `sd-rs train-vae`)",
    )?;
    // The tokenizer is built once from the captions and kept with the run, so a resumed run
    // (even on edited captions) keeps the ids its text encoder learned.
    let tokenizer_dir = args.run.output.join("tokenizer");
    if !(args.run.resume && tokenizer_dir.join("tokenizer.json").is_file()) {
        let vocab = crate::train::vocab::build_vocab(items.iter().map(|i| i.caption.as_str()));
        crate::train::vocab::write_word_tokenizer(
            &tokenizer_dir,
            &vocab,
            scratch.tokenizer_max_length,
        )?;
        eprintln!("tokenizer: {} words from the captions", vocab.len() - 4);
    }
    let tokenizer = PromptTokenizer::from_dir(&tokenizer_dir)?;
    let mut text_config = scratch.text_encoder.clone();
    text_config.vocab_size = tokenizer.vocab_size();
    text_config.max_position_embeddings = tokenizer.max_length();
    text_config.bos_token_id = tokenizer.bos_id();
    text_config.eos_token_id = tokenizer
        .eos_id()
        .context("the tokenizer has no end-of-text token")?;
    text_config.pad_token_id = Some(tokenizer.pad_id());
    if text_config.architectures.is_empty() {
        text_config.architectures = vec!["CLIPTextModel".into()];
    }
    // DDPM and DDIM clip their predicted x0 to [-1, 1] when the config does not say otherwise
    // (diffusers' default, made for pixel-space models); a latent model's x0 is not in that
    // range, so a new model's config says so unless the user asked for clipping.
    let mut scheduler = scratch.scheduler.clone();
    scheduler.clip_sample.get_or_insert(false);
    Ok(Components {
        tokenizer,
        tokenizer_dir,
        text_config,
        unet_config: scratch.unet.clone(),
        vae_dir,
        scheduler,
        init: None,
    })
}

/// Whether the text encoder is trained: when asked, and always from scratch (there is no
/// pretrained one to keep).
fn trains_text_encoder(cfg: &TrainConfig, c: &Components) -> bool {
    cfg.train_text_encoder || c.init.is_none()
}

/// Writes the model as a diffusers directory into `out`: the EMA weights of what was trained,
/// the frozen parts copied, and model_index.json last, so the folder only claims to be a model
/// once every part is in place.
fn save_model_dir(
    out: &Path,
    run: &Run,
    c: &Components,
    cfg: &TrainConfig,
    dtype: Option<DType>,
) -> Result<()> {
    let trained_text_encoder = trains_text_encoder(cfg, c);
    save_component(
        &out.join("unet"),
        "UNet2DConditionModel",
        &c.unet_config,
        &run.output_weights("unet")?,
        dtype,
    )?;

    let te_dir = out.join("text_encoder");
    std::fs::create_dir_all(&te_dir)?;
    let mut te_config = serde_json::to_value(&c.text_config)?;
    te_config["model_type"] = "clip_text_model".into();
    crate::io::write_atomic(
        &te_dir.join("config.json"),
        serde_json::to_string_pretty(&te_config)?.as_bytes(),
    )?;
    if trained_text_encoder {
        let weights = varmap_tensors(&run.output_weights("text_encoder")?);
        save_safetensors_atomic(&te_dir.join("model.safetensors"), &weights, dtype)?;
    } else {
        copy_files(
            &find_weight_files(&c.init.as_ref().unwrap().join("text_encoder"), None)?,
            &te_dir,
        )?;
    }

    let tok_dir = out.join("tokenizer");
    if c.tokenizer_dir != tok_dir {
        let files: Vec<PathBuf> = std::fs::read_dir(&c.tokenizer_dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        copy_files(&files, &tok_dir)?;
    }
    let vae_out = out.join("vae");
    if c.vae_dir != vae_out {
        let mut files = find_weight_files(&c.vae_dir, None)?;
        files.push(c.vae_dir.join("config.json"));
        copy_files(&files, &vae_out)?;
    }

    let mut scheduler = serde_json::to_value(&c.scheduler)?;
    if scheduler.get("_class_name").is_none_or(|v| v.is_null()) {
        scheduler["_class_name"] = "EulerDiscreteScheduler".into();
    }
    let sched_dir = out.join("scheduler");
    std::fs::create_dir_all(&sched_dir)?;
    crate::io::write_atomic(
        &sched_dir.join("scheduler_config.json"),
        serde_json::to_string_pretty(&scheduler)?.as_bytes(),
    )?;

    let tokenizer_class = if c.tokenizer_dir.join("vocab.json").is_file() {
        "CLIPTokenizer"
    } else {
        "PreTrainedTokenizerFast"
    };
    let mut index = diffusers_config_json("StableDiffusionPipeline", &serde_json::json!({}))?;
    index["unet"] = serde_json::json!(["diffusers", "UNet2DConditionModel"]);
    index["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
    index["text_encoder"] = serde_json::json!(["transformers", "CLIPTextModel"]);
    index["tokenizer"] = serde_json::json!(["transformers", tokenizer_class]);
    index["scheduler"] = serde_json::json!([
        "diffusers",
        scheduler["_class_name"]
            .as_str()
            .unwrap_or("EulerDiscreteScheduler")
    ]);
    index["safety_checker"] = serde_json::json!([null, null]);
    index["feature_extractor"] = serde_json::json!([null, null]);
    index["requires_safety_checker"] = false.into();
    // A model trained from scratch samples best with the settings it was validated with (a
    // small model wants less guidance than Stable Diffusion's 7.5): `generate` uses them when
    // the command line does not say. A fine-tune keeps those of the model it started from, if
    // that model has any, and otherwise the usual defaults.
    let generation_config = out.join(crate::pipeline::GENERATION_CONFIG);
    match &c.init {
        None => {
            let v = &cfg.validation;
            let defaults = serde_json::json!({
                "num_inference_steps": v.steps,
                "guidance_scale": v.guidance_scale,
                "sampler": v.sampler,
            });
            crate::io::write_atomic(
                &generation_config,
                serde_json::to_string_pretty(&defaults)?.as_bytes(),
            )?;
        }
        Some(init) => {
            let base = init.join(crate::pipeline::GENERATION_CONFIG);
            if base.is_file() {
                let bytes =
                    std::fs::read(&base).with_context(|| format!("reading {}", base.display()))?;
                crate::io::write_atomic(&generation_config, &bytes)?;
            }
        }
    }
    crate::io::write_atomic(
        &out.join("model_index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )
}

fn copy_files(files: &[PathBuf], dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for f in files.iter().filter(|f| f.is_file()) {
        let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        crate::io::write_atomic(&dir.join(f.file_name().unwrap()), &bytes)?;
    }
    Ok(())
}

/// Generates the validation prompts (one row per prompt, one column per seed) with the model
/// just saved in `out`, into out/samples/step-N.png.
fn validate(out: &Path, v: &Validation, step: u64, device: &Device) -> Result<PathBuf> {
    let pipeline = Pipeline::load(out, device, DType::F32)?;
    let defaults = pipeline.defaults();
    let sampler: SamplerKind = v.sampler.parse()?;
    let mut images = Vec::new();
    for prompt in &v.prompts {
        let request = GenerateRequest {
            prompt,
            negative_prompt: "",
            seeds: v.seeds.clone(),
            steps: v.steps,
            guidance_scale: v.guidance_scale,
            sampler,
            width: defaults.width,
            height: defaults.height,
            init_image: None,
            strength: 1.0,
            show_x0: &[],
        };
        images.extend(pipeline.generate(&request, &mut |_, _| {})?.images);
    }
    let grid = image_grid(&images, v.seeds.len());
    let path = out.join("samples").join(format!("step-{step:06}.png"));
    let text = format!("validation at step {step}: {}", v.prompts.join(" | "));
    crate::io::png_meta::write_png(&path, grid.as_raw(), grid.width(), grid.height(), &text)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_snr_weights() {
        // Below gamma the eps weight is 1; above it gamma / snr.
        assert_eq!(min_snr_weight(2.0, 5.0, PredictionType::Epsilon), 1.0);
        assert_eq!(min_snr_weight(10.0, 5.0, PredictionType::Epsilon), 0.5);
        assert_eq!(
            min_snr_weight(10.0, 5.0, PredictionType::VPrediction),
            5.0 / 11.0
        );
        assert_eq!(min_snr_weight(10.0, 5.0, PredictionType::Sample), 5.0);
    }
}
