//! `sd-rs noise-strip`: show the forward process on a real image.
use crate::pipeline::{image_grid, read_rgb, tensor_to_images};
use crate::schedule::{NoiseSchedule, SchedulerConfig};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct NoiseStripArgs {
    /// The image to noise.
    pub image: PathBuf,

    /// Timesteps to show, e.g. 0,100,250,500,750,999.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,50,100,250,500,750,999"
    )]
    pub t: Vec<usize>,

    /// A diffusers scheduler_config.json; default: the DDPM paper's linear 1e-4..0.02, T=1000.
    #[arg(long)]
    pub scheduler_config: Option<PathBuf>,

    /// Side of each square tile in the strip.
    #[arg(long, default_value_t = 128)]
    pub size: u32,

    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    #[arg(long, short = 'o', default_value = "noise-strip.png")]
    pub output: PathBuf,
}

pub fn run(args: NoiseStripArgs) -> Result<()> {
    let config = match &args.scheduler_config {
        Some(path) => SchedulerConfig::from_file(path)?,
        None => SchedulerConfig::default(),
    };
    let schedule = NoiseSchedule::new(&config)?;
    let n = schedule.num_train_timesteps();
    if let Some(&t) = args.t.iter().find(|&&t| t >= n) {
        bail!("--t {t} is outside 0..{n} (the schedule has {n} training timesteps)");
    }
    let size = args.size as usize;
    let image = image::imageops::resize(
        &read_rgb(&args.image)?,
        args.size,
        args.size,
        image::imageops::FilterType::Lanczos3,
    );
    let x0 = crate::train::data::rgb_to_tensor(&image)?.unsqueeze(0)?;
    // One eps for every column, so the strip shows the same noise growing.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let eps = crate::train::randn(&mut rng, (1, 3, size, size), &Device::Cpu)?;
    let frames = args
        .t
        .iter()
        .map(|&t| {
            let t = Tensor::new(&[t as u32], &Device::Cpu)?;
            Ok(tensor_to_images(&schedule.q_sample(&x0, &t, &eps)?)?.remove(0))
        })
        .collect::<Result<Vec<_>>>()?;
    let strip = image_grid(&frames, frames.len());
    let abar: Vec<String> = args
        .t
        .iter()
        .map(|&t| format!("t={t}: abar={:.4}", schedule.alphas_cumprod()[t]))
        .collect();
    crate::io::png_meta::write_png(
        &args.output,
        strip.as_raw(),
        strip.width(),
        strip.height(),
        &abar.join(", "),
    )?;
    eprintln!("wrote {} ({})", args.output.display(), abar.join(", "));
    Ok(())
}
