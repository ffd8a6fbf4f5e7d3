//! `sd-rs info`: print the generation parameters stored in PNGs.
use crate::io::png_meta::read_parameters;
use anyhow::{bail, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    /// PNG files made by sd-rs, AUTOMATIC1111 or any tool writing a `parameters` text chunk.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

pub fn run(args: InfoArgs) -> Result<()> {
    let mut missing = 0;
    for path in &args.images {
        if args.images.len() > 1 {
            println!("== {}", path.display());
        }
        match read_parameters(path)? {
            Some(text) => println!("{text}"),
            None => {
                eprintln!("{}: no generation parameters in this PNG", path.display());
                missing += 1;
            }
        }
    }
    if missing > 0 {
        bail!(
            "{missing} of {} images had no parameters",
            args.images.len()
        );
    }
    Ok(())
}
