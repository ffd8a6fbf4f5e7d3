//! Times sd-rs's fused linear layer and attention on the shapes of SD 1.5 (CLIP-L's 2 x 77
//! tokens; the U-Net at 512x512, batch 2), for comparison with PyTorch on the same shapes and
//! thread count (`scripts/torch_op_shapes.py` prints the same lines):
//!
//!     cargo run --release --example op_shapes
//!     scripts/.venv/bin/python scripts/torch_op_shapes.py
//!
//! Inputs are `sin` patterns, so both print the same output means. Each line is the best of
//! several runs; on a shared machine run the two back to back, more than once.
use anyhow::Result;
use candle_core::Tensor;
use sd_rs::model::ops;
use std::time::Instant;

mod common;
use common::{flag_number, flag_value, pattern};

/// (rows, out features, in features): CLIP-L's q/k/v/out, fused q/k/v width, fc1 and fc2 (154
/// rows: weights stored (in, out), as sd-rs's text encoder keeps them); the U-Net's projections,
/// GEGLU and feed-forward outputs at its three transformer levels at 512x512, then at 256x256
/// (PyTorch's (out, in)).
const LINEAR: [(usize, usize, usize); 22] = [
    (154, 768, 768),
    (154, 2304, 768),
    (154, 3072, 768),
    (154, 768, 3072),
    (8192, 320, 320),
    (8192, 2560, 320),
    (8192, 320, 1280),
    (2048, 640, 640),
    (2048, 5120, 640),
    (2048, 640, 2560),
    (512, 1280, 1280),
    (512, 10240, 1280),
    (512, 1280, 5120),
    (2048, 320, 320),
    (2048, 2560, 320),
    (2048, 320, 1280),
    (512, 640, 640),
    (512, 5120, 640),
    (512, 640, 2560),
    (128, 1280, 1280),
    (128, 10240, 1280),
    (128, 1280, 5120),
];

/// (query tokens, key tokens, head width) with batch 2 and 8 heads: the U-Net's self- and
/// cross-attention per level.
const ATTENTION: [(usize, usize, usize); 4] = [
    (4096, 4096, 40),
    (4096, 77, 40),
    (1024, 1024, 80),
    (256, 256, 160),
];

/// (batch, channels in, height, width, channels out) of 3x3 convolutions: the U-Net's levels at
/// 512x512 and 256x256 (batch 2), the VAE decoder's at 512x512 (not its 512x512 level: 2^25
/// values are beyond the exact f32 `arange` of the inputs), the small default model's U-Net in
/// training (batch 32). GFLOP/s count the direct convolution's multiply-adds.
const CONV: [(usize, usize, usize, usize, usize); 13] = [
    (2, 320, 64, 64, 320),
    (2, 640, 32, 32, 640),
    (2, 1280, 16, 16, 1280),
    (2, 1280, 8, 8, 1280),
    (2, 320, 32, 32, 320),
    (2, 640, 16, 16, 640),
    (1, 512, 64, 64, 512),
    (1, 512, 128, 128, 512),
    (1, 256, 256, 256, 256),
    (1, 128, 256, 256, 128),
    (32, 64, 16, 16, 64),
    (32, 192, 16, 16, 64),
    (32, 128, 8, 8, 128),
];

fn best_of(runs: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<(f64, f32)> {
    let (mut best, mut mean) = (f64::MAX, 0.0);
    for _ in 0..runs {
        let t = Instant::now();
        let out = f()?;
        best = best.min(t.elapsed().as_secs_f64());
        mean = out.mean_all()?.to_scalar::<f32>()?;
    }
    Ok((best, mean))
}

fn main() -> Result<()> {
    // As the sd-rs binary does (src/main.rs): the work runs on a rayon worker.
    // `--kn`: every layer's weight stored (in, out), to see what that layout would give the U-Net.
    let kn_everywhere = std::env::args().any(|a| a == "--kn");
    // `--only linear|conv|attention`: one table; `--case i`: only the i-th convolution.
    let only = flag_value("--only");
    let wanted = |table: &str| only.as_deref().is_none_or(|o| o == table);
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    println!("threads: {}", pool.current_num_threads());
    pool.install(|| -> Result<()> {
        for (m, n, k) in LINEAR.into_iter().filter(|_| wanted("linear")) {
            let x = pattern(m * k, 0.37)?.reshape((m, k))?;
            let w = (pattern(n * k, 0.11)?.reshape((n, k))? * 0.05)?;
            let b = pattern(n, 0.3)?;
            let (t, mean) = if m == 154 || kn_everywhere {
                let w_t = ops::transpose_2d(&w)?;
                best_of(8, || Ok(ops::linear_kn(&x, &w_t, Some(&b))?))?
            } else {
                best_of(8, || Ok(ops::linear(&x, &w, Some(&b))?))?
            };
            let gflops = 2.0 * (m * n * k) as f64 / t / 1e9;
            println!(
                "linear m {m:5} n {n:5} k {k:5}: {:8.2} ms {gflops:4.0} GFLOP/s (mean {mean:.5})",
                t * 1e3
            );
        }
        let case = flag_number("--case");
        for (i, (b, c, h, w, c_out)) in CONV.into_iter().enumerate().filter(|_| wanted("conv")) {
            if case.is_some_and(|case| case != i) {
                continue;
            }
            let x = pattern(b * c * h * w, 0.37)?.reshape((b, c, h, w))?;
            let weight = (pattern(c_out * c * 9, 0.11)?.reshape((c_out, c, 3, 3))? * 0.05)?;
            let bias = pattern(c_out, 0.3)?;
            let gflop = 2.0 * (b * h * w * c_out * c * 9) as f64 / 1e9;
            let mut line = format!("conv b {b:2} c {c:4} {h:3}x{w:<3} -> {c_out:4}:");
            // im2col + GEMM; Winograd transforming the kernels in every call (training);
            // Winograd with the kernels transformed once (inference).
            for (name, winograd, keep) in [
                ("im2col", false, false),
                ("winograd", true, false),
                ("kept", true, true),
            ] {
                ops::set_winograd(winograd);
                let kernels = std::sync::OnceLock::new();
                let run = || {
                    Ok(if keep {
                        ops::conv2d_fixed_weights(&x, &weight, Some(&bias), 1, [1; 4], &kernels)?
                    } else {
                        ops::conv2d(&x, &weight, Some(&bias), 1, [1; 4])?
                    })
                };
                let (t, mean) = best_of(if gflop > 20.0 { 3 } else { 6 }, run)?;
                line += &format!(
                    " {name} {:7.2} ms {:4.0} GFLOP/s (mean {mean:.5})",
                    t * 1e3,
                    gflop / t
                );
            }
            println!("{line}");
        }
        for (nq, nk, d) in ATTENTION.into_iter().filter(|_| wanted("attention")) {
            let q = pattern(16 * nq * d, 0.37)?.reshape((2, 8, nq, d))?;
            let k = pattern(16 * nk * d, 0.37)?.reshape((2, 8, nk, d))?;
            let v = pattern(16 * nk * d, 0.23)?.reshape((2, 8, nk, d))?;
            let scale = 1.0 / (d as f64).sqrt();
            let (t, mean) = best_of(4, || Ok(ops::attention(&q, &k, &v, scale)?))?;
            println!(
                "attention q {nq:5} k {nk:5} d {d:4}: {:8.2} ms (mean {mean:.5})",
                t * 1e3
            );
        }
        Ok(())
    })
}
