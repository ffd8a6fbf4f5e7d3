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
    // candle runs its large element-wise ops on a pool of its own, whose idle worker spins for
    // about a millisecond after each op: on 2 cores that spin took a core from the rayon workers
    // running the GEMMs. One pool for everything: candle's element-wise ops run on the calling
    // thread, itself a rayon worker (below). Text encoding 0.21 -> 0.15 s (BENCHMARKS.md).
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    keep_freed_memory();
    let cli = sd_rs::cli::Cli::parse();
    match on_worker_pool(|| sd_rs::cli::run(cli)) {
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

/// Runs `work` on a rayon worker. A parallel op called from outside the pool hands its tasks
/// over and puts the caller to sleep until they finish: thousands of sleeps and wake-ups per
/// text encoding or training step (a quarter of a text encoding's time on 2 cores). Called from
/// a worker, the caller takes part in each op and only the other workers wait for work. A pool
/// of its own rather than rayon's global one, so that a thread outside it (the training data
/// loader) can never wait for a worker that is blocked waiting for it.
fn on_worker_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("sd-rs worker {i}"))
        .build()
    {
        Ok(pool) => pool.install(work),
        // No threads to be had: the same work, only with the hand-offs.
        Err(_) => work(),
    }
}
