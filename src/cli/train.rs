//! `sd-rs train`: the DDPM objective in latent space on captioned images.
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Captions: a .jsonl file ({"file_name": ..., "text": ...}), a folder with metadata.jsonl,
    /// or a folder of images with sidecar .txt captions.
    #[arg(long)]
    pub captions: PathBuf,

    /// A training config (TOML, see configs/); every option below overrides it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Start from this model (directory or Hugging Face repo id) instead of from scratch.
    #[arg(long)]
    pub model: Option<String>,

    /// Where the trained model directory (diffusers layout) is written.
    #[arg(long, short = 'o')]
    pub output: PathBuf,

    /// Continue the run whose checkpoints are in --output.
    #[arg(long)]
    pub resume: bool,

    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,

    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

pub fn run(_args: TrainArgs) -> Result<()> {
    Err(super::not_built_yet(
        "train",
        "the train command is issue 6",
    ))
}
