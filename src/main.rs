//! The `sd-rs` binary: parse the command line, run the library, turn errors into messages.
use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    // candle asks for its thread count before every matmul and, unless RAYON_NUM_THREADS is
    // set, derives it again from /proc/cpuinfo each time: 5-8% of a run of the small default
    // model. Fix it once, to the count candle would use anyway (rayon's pool then has the same).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
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
