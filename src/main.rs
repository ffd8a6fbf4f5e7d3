//! The `sd-rs` binary: parse the command line, run the library, turn errors into messages.
use clap::Parser;
use std::process::ExitCode;

/// The system allocator, able to own tensors that lie in memory-mapped weight files, so models
/// load without copying their weights (see `sd_rs::mapped`).
#[global_allocator]
static ALLOC: sd_rs::mapped::MappedAlloc = sd_rs::mapped::MappedAlloc;

fn main() -> ExitCode {
    // candle asks for its thread count before every matmul and, unless RAYON_NUM_THREADS is
    // set, derives it again from /proc/cpuinfo each time: 5-8% of a run of the small default
    // model. Fix it once, to the count candle would use anyway (rayon's pool then has the same).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    keep_freed_memory();
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

/// Every op allocates its output afresh. glibc's defaults give large freed blocks back to the
/// kernel (mmap threshold adjusted up to the largest block freed, heap trimmed above twice
/// that), so the next step's buffers arrive as new pages the kernel must fault in and zero.
/// A fixed 32 MiB threshold (glibc's maximum) and no trimming keep those blocks for reuse:
/// 5-8% off a training step of the default model, about the same peak memory (BENCHMARKS.md).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
