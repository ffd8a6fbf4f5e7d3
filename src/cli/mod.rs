//! The `sd-rs` command line: one file per command, each a clap `Args` struct and a `run`.
use anyhow::Result;
use clap::{Parser, Subcommand};

pub mod bench;
pub mod generate;
pub mod info;
pub mod noise_strip;
pub mod train;
pub mod train_common;
pub mod train_vae;

#[derive(Parser, Debug)]
#[command(
    name = "sd-rs",
    version,
    about = "Text-to-image latent diffusion (Stable Diffusion) in Rust: generate and train",
    long_about = "Text-to-image latent diffusion (Stable Diffusion) in Rust: generate and train.\n\n\
                  Quick start:\n  sd-rs generate \"anime girl, red hair\"\n  \
                  sd-rs train --captions data.jsonl --output my-model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate images from a prompt, a prompt file, or a PNG's parameters.
    Generate(generate::GenerateArgs),
    /// Train the U-Net (and optionally the text encoder) on captioned images.
    Train(train::TrainArgs),
    /// Train an AutoencoderKL (the VAE) on images.
    TrainVae(train_vae::TrainVaeArgs),
    /// Print the generation parameters stored in PNG files.
    Info(info::InfoArgs),
    /// Write the forward-noising strip x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps of an image.
    NoiseStrip(noise_strip::NoiseStripArgs),
    /// Time one piece of work (U-Net step, VAE decode, text, generate, train step, load) and
    /// print one JSON line; scripts/bench.py compares it with diffusers.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::TrainVae(args) => train_vae::run(args),
        Command::Info(args) => info::run(args),
        Command::NoiseStrip(args) => noise_strip::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
