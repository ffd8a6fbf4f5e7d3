//! `sd-rs train-vae`: train an AutoencoderKL on images.
//!
//! The objective is the VAE's: reconstruct the image through a sampled latent,
//! L1(decode(z), x) with z ~ q(z | x), plus `kl_weight` * KL(q(z | x) || N(0, I)) so the latent
//! space stays smooth. After training the latents' scale is measured on the data and written as
//! the config's `scaling_factor`, so the U-Net sees unit-variance latents (as Stable Diffusion's
//! 0.18215 was chosen).
//!
//! With `--decoder-only` the encoder of `--init` stays fixed and only the decoder learns, from the
//! reconstruction loss alone: the latents do not change, so a U-Net trained on them stays valid
//! while the decoded images get sharper (how Stable Diffusion's ft-EMA/ft-MSE VAEs were made).
use super::train_common::{load_dataset, read_toml, OptimOptions, Run, RunArgs};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::model::weights::{load_varmap_from_component, read_config, save_component};
use crate::pipeline::{image_grid, tensor_to_images};
use crate::train::data::{image_loader, BatchConfig, Batcher, CropMode, ImageTransform, Loader};
use crate::train::init::seeded_var_builder;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct TrainVaeArgs {
    /// Images: a captions .jsonl, a folder with metadata.jsonl, or a folder of images
    /// (captions are not needed; sidecar .txt files are not required here).
    #[arg(long)]
    pub images: PathBuf,

    /// Start from this VAE (a diffusers `vae/` folder) instead of random weights.
    #[arg(long)]
    pub init: Option<PathBuf>,

    /// Fine-tune only the decoder of --init (the encoder, and so the latents, stay as they are).
    #[arg(long, requires = "init")]
    pub decoder_only: bool,

    #[command(flatten)]
    pub run: RunArgs,
}

/// A VAE training config file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaeTrainConfig {
    /// Side of the square training images.
    #[serde(default = "default_resolution")]
    pub resolution: u32,
    #[serde(default)]
    pub random_flip: bool,
    /// Weight of the KL term (summed over the latent) against the mean L1 reconstruction error.
    #[serde(default = "default_kl_weight")]
    pub kl_weight: f64,
    #[serde(default)]
    pub train: OptimOptions,
    /// The architecture: diffusers' AutoencoderKL config.json fields.
    pub vae: AutoencoderKLConfig,
}

fn default_resolution() -> u32 {
    64
}
fn default_kl_weight() -> f64 {
    1e-6
}

pub fn run(args: TrainVaeArgs) -> Result<()> {
    let mut cfg: VaeTrainConfig = match &args.run.config {
        Some(path) => read_toml(Some(path), &args.run.set)?,
        None => anyhow::bail!(
            "train-vae needs --config with the VAE's architecture, e.g. configs/sd-rs-anime/vae.toml"
        ),
    };
    args.run.apply(&mut cfg.train);

    let device = crate::device::select_device(&args.run.device.parse()?)?;
    eprintln!("device: {}", crate::device::describe_device(&device));
    let items = load_dataset(&args.images, args.run.strict)?;
    std::fs::create_dir_all(&args.run.output)
        .with_context(|| format!("creating {}", args.run.output.display()))?;

    let varmap = VarMap::new();
    let vae = AutoencoderKL::new(
        seeded_var_builder(&varmap, cfg.train.seed, DType::F32, &device),
        &cfg.vae,
    )?;
    if let Some(init) = &args.init {
        load_varmap_from_component(&varmap, init, None)?;
    }
    // The tensors the optimizer (and the checkpoints) see; the rest stay as loaded.
    let trained = if args.decoder_only {
        let decoder = VarMap::new();
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if is_decoder_tensor(name) {
                decoder
                    .data()
                    .lock()
                    .unwrap()
                    .insert(name.clone(), var.clone());
            }
        }
        decoder
    } else {
        varmap.clone()
    };
    let mut run = Run::start(
        &args.run.output,
        cfg.train.clone(),
        vec![("vae".to_string(), trained)],
        serde_json::to_value(&cfg)?,
        args.run.resume,
    )?;

    let transform = ImageTransform {
        resolution: cfg.resolution,
        crop: CropMode::Center,
        random_flip: cfg.random_flip,
    };
    let batch_config = BatchConfig::plain(cfg.train.batch_size, cfg.train.seed, args.run.strict);
    let items = Arc::new(items);
    let batcher = Batcher::new(
        items.clone(),
        image_loader(transform.clone()),
        batch_config.clone(),
        run.data,
    )?;
    let mut loader = Loader::spawn(batcher, 4)?;
    // A fixed set of images to show reconstructions of while training.
    let shown = {
        let fixed = BatchConfig {
            batch_size: 8.min(items.len()),
            seed: 0,
            ..batch_config
        };
        Batcher::new(
            items.clone(),
            image_loader(transform),
            fixed,
            Default::default(),
        )?
        .next_batch()?
        .samples
    };

    while !run.done() {
        let batch = loader.next_batch()?;
        for s in &batch.skipped {
            run.println(format!(
                "warning: skipped {}: {}",
                s.path.display(),
                s.error
            ));
        }
        let x = batch.samples.to_device(&device)?;
        let posterior = vae.encode(&x)?;
        let noise = crate::train::randn(&mut run.rng, posterior.mean.shape(), &device)?;
        let z = posterior.sample(&noise)?;
        let loss = if args.decoder_only {
            // The KL term only moves the encoder, which is not trained here.
            (vae.decode(&z.detach())? - &x)?.abs()?.mean_all()?
        } else {
            let l1 = (vae.decode(&z)? - &x)?.abs()?.mean_all()?;
            let kl = posterior.kl()?.mean_all()?;
            (l1 + (kl * cfg.kl_weight)?)?
        };
        let grads = run.optimizer.grads(&loss.backward()?);
        let loss = loss.to_scalar::<f32>()? as f64;
        if run.micro_step(loss, grads, batch.next)? && run.validation_due() {
            let weights = published_weights(&run, &varmap)?;
            let ema_vae = AutoencoderKL::new(
                VarBuilder::from_varmap(&weights, DType::F32, &device),
                &cfg.vae,
            )?;
            let path = args
                .run
                .output
                .join("samples")
                .join(format!("step-{:06}.png", run.step));
            save_reconstructions(&ema_vae, &shown, &device, &path)?;
            run.println(format!(
                "step {}: reconstructions in {}",
                run.step,
                path.display()
            ));
        }
    }
    run.finish();

    let weights = published_weights(&run, &varmap)?;
    let trained = AutoencoderKL::new(
        VarBuilder::from_varmap(&weights, DType::F32, &device),
        &cfg.vae,
    )?;
    let mut out_cfg = cfg.vae.clone();
    out_cfg.scaling_factor = match &args.init {
        // Same encoder, same latents: keep the scale a U-Net may already have been trained with.
        Some(init) if args.decoder_only => read_config::<AutoencoderKLConfig>(init)?.scaling_factor,
        _ => measure_scaling_factor(&trained, &items, cfg.resolution, &device)?,
    };
    out_cfg.sample_size = serde_json::Value::from(cfg.resolution);
    save_component(&args.run.output, "AutoencoderKL", &out_cfg, &weights, None)?;
    eprintln!(
        "wrote {} (scaling_factor {:.5}); use it with `sd-rs train --vae {}`",
        args.run.output.display(),
        out_cfg.scaling_factor,
        args.run.output.display()
    );
    Ok(())
}

/// Tensors that `--decoder-only` trains: everything after the latent.
fn is_decoder_tensor(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// The whole VAE to save or show: the trained tensors as published (EMA) plus any frozen ones.
fn published_weights(run: &Run, all: &VarMap) -> Result<VarMap> {
    let published = run.output_weights("vae")?;
    // Without an EMA `published` is `all` itself: one lock at a time.
    let every: Vec<(String, candle_core::Var)> = all
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    let mut out = published.data().lock().unwrap();
    for (name, var) in every {
        out.entry(name).or_insert(var);
    }
    drop(out);
    Ok(published)
}

/// 1 / std of the latent means over up to 256 images: the factor that gives the U-Net
/// unit-variance latents (how Stable Diffusion's 0.18215 was found).
fn measure_scaling_factor(
    vae: &AutoencoderKL,
    items: &Arc<Vec<crate::io::captions::CaptionedImage>>,
    resolution: u32,
    device: &Device,
) -> Result<f64> {
    let transform = ImageTransform {
        resolution,
        crop: CropMode::Center,
        random_flip: false,
    };
    let config = BatchConfig::plain(16.min(items.len()), 1, false);
    let mut batcher = Batcher::new(
        items.clone(),
        image_loader(transform),
        config,
        Default::default(),
    )?;
    let mut means = Vec::new();
    for _ in 0..(256 / 16).min(items.len().div_ceil(16)) {
        let x = batcher.next_batch()?.samples.to_device(device)?;
        means.push(vae.encode(&x)?.mean.flatten_all()?);
    }
    let all = Tensor::cat(&means, 0)?;
    let mean = all.mean_all()?.to_scalar::<f32>()? as f64;
    let var = all.sqr()?.mean_all()?.to_scalar::<f32>()? as f64 - mean * mean;
    let std = var.max(1e-12).sqrt();
    Ok(1.0 / std)
}

/// Originals on the top row, their reconstructions (through the latent mean) below.
fn save_reconstructions(
    vae: &AutoencoderKL,
    x: &Tensor,
    device: &Device,
    path: &Path,
) -> Result<()> {
    let x = x.to_device(device)?;
    let reconstruction = vae.decode(vae.encode(&x)?.mode())?;
    let mut images = tensor_to_images(&x)?;
    images.extend(tensor_to_images(&reconstruction)?);
    let grid = image_grid(&images, x.dim(0)?);
    crate::io::png_meta::write_png(
        path,
        grid.as_raw(),
        grid.width(),
        grid.height(),
        "sd-rs train-vae reconstructions",
    )
}
