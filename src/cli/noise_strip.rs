//! `sd-rs noise-strip`: show the forward process on a real image.
use anyhow::Result;
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

pub fn run(_args: NoiseStripArgs) -> Result<()> {
    Err(super::not_built_yet(
        "noise-strip",
        "waiting on the schedule module",
    ))
}
