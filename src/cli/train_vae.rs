//! `sd-rs train-vae`: train an AutoencoderKL (reconstruction + weighted KL).
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TrainVaeArgs {
    /// Images: a captions .jsonl, a folder with metadata.jsonl, or a folder of images.
    #[arg(long)]
    pub images: PathBuf,

    /// A VAE training config (TOML, see configs/); options below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Where the trained VAE (diffusers layout: config.json + safetensors) is written.
    #[arg(long, short = 'o')]
    pub output: PathBuf,

    /// Continue the run whose checkpoints are in --output.
    #[arg(long)]
    pub resume: bool,

    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,

    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(_args: TrainVaeArgs) -> Result<()> {
    Err(super::not_built_yet(
        "train-vae",
        "the train-vae command is issue 6",
    ))
}
