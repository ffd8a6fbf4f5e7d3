//! Times the forward pass and the backward pass (input, weight and bias gradients) of every
//! convolution of the small bench U-Net's training step (`data/bench/small`, batch 32, 16x16
//! latents), for comparison with PyTorch on the same shapes and thread count:
//!
//!     cargo run --release --example train_convs [-- --case i --runs n]
//!     scripts/.venv/bin/python scripts/torch_train_convs.py
//!
//! Each line is the best of several runs; the last line sums them weighted by the number of such
//! convolutions in one step. On a shared machine run the two back to back, more than once.
use anyhow::Result;
use sd_rs::model::ops;
use std::time::Instant;

mod common;
use common::{flag_number, pattern};

/// (convolutions of this shape in one step, batch, channels in, size, channels out, kernel,
/// stride): the U-Net's conv_in, resnets (3x3 and 1x1 shortcuts), downsamplers, the
/// transformers' 1x1 proj_in/proj_out and conv_out, as `torch_train_convs.py` lists them.
pub const CONVS: [(usize, usize, usize, usize, usize, usize, usize); 23] = [
    (1, 32, 4, 16, 64, 3, 1),
    (4, 32, 64, 16, 64, 3, 1),
    (6, 32, 64, 16, 64, 1, 1),
    (1, 32, 64, 16, 64, 3, 2),
    (1, 32, 64, 8, 128, 3, 1),
    (4, 32, 128, 8, 128, 3, 1),
    (1, 32, 64, 8, 128, 1, 1),
    (6, 32, 128, 8, 128, 1, 1),
    (1, 32, 128, 8, 128, 3, 2),
    (8, 32, 128, 4, 128, 3, 1),
    (2, 32, 128, 4, 128, 1, 1),
    (2, 32, 256, 4, 128, 3, 1),
    (2, 32, 256, 4, 128, 1, 1),
    (1, 32, 256, 8, 128, 3, 1),
    (1, 32, 256, 8, 128, 1, 1),
    (1, 32, 192, 8, 128, 3, 1),
    (1, 32, 192, 8, 128, 1, 1),
    (1, 32, 128, 16, 128, 3, 1),
    (1, 32, 192, 16, 64, 3, 1),
    (1, 32, 192, 16, 64, 1, 1),
    (1, 32, 128, 16, 64, 3, 1),
    (1, 32, 128, 16, 64, 1, 1),
    (1, 32, 64, 16, 4, 3, 1),
];

/// The best time of `runs` calls of `f`.
fn best_of(runs: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn main() -> Result<()> {
    // `--case i`: only the i-th shape, `--runs n` timed runs each (for perf).
    let (case, runs) = (flag_number("--case"), flag_number("--runs").unwrap_or(6));
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    println!("threads: {}", pool.current_num_threads());
    pool.install(|| -> Result<()> {
        let (mut fwd_total, mut bwd_total) = (0.0, 0.0);
        for (i, (count, b, c, size, c_out, k, stride)) in CONVS.into_iter().enumerate() {
            if case.is_some_and(|case| case != i) {
                continue;
            }
            let x = pattern(b * c * size * size, 0.37)?.reshape((b, c, size, size))?;
            let weight = (pattern(c_out * c * k * k, 0.11)?.reshape((c_out, c, k, k))? * 0.05)?;
            let bias = pattern(c_out, 0.3)?;
            let pad = [k / 2; 4];
            let y = ops::conv2d(&x, &weight, Some(&bias), stride, pad)?;
            let dy = pattern(y.elem_count(), 0.23)?.reshape(y.shape())?;
            let fwd = best_of(runs, || {
                ops::conv2d(&x, &weight, Some(&bias), stride, pad)?;
                Ok(())
            })?;
            let bwd = best_of(runs, || {
                ops::conv2d_backward(&x, &weight, Some(&bias), stride, pad, &dy)?;
                Ok(())
            })?;
            let (dx, dw, _) = ops::conv2d_backward(&x, &weight, Some(&bias), stride, pad, &dy)?;
            println!(
                "{count} x b {b} c {c:3} {size:2}x{size:<2} -> {c_out:3} k {k} s {stride}: fwd {:6.2} ms bwd {:6.2} ms (means {:.5} {:.5} {:.5})",
                fwd * 1e3,
                bwd * 1e3,
                y.mean_all()?.to_scalar::<f32>()?,
                dx.mean_all()?.to_scalar::<f32>()?,
                dw.mean_all()?.to_scalar::<f32>()?,
            );
            fwd_total += count as f64 * fwd;
            bwd_total += count as f64 * bwd;
        }
        println!(
            "one step's convolutions: fwd {:.1} ms bwd {:.1} ms total {:.1} ms",
            fwd_total * 1e3,
            bwd_total * 1e3,
            (fwd_total + bwd_total) * 1e3
        );
        Ok(())
    })
}
