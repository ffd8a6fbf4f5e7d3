//! The `sd-rs` binary: parse the command line, run the library, turn errors into messages.
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = sd_rs::cli::Cli::parse();
    match sd_rs::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line: what failed and why.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
