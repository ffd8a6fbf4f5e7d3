//! Times the fused attention's forward and backward passes on the small bench U-Net's training
//! shapes (batch 32, heads in the token layout), for comparison with PyTorch's
//! `scaled_dot_product_attention` on the same shapes (`scripts/torch_train_attention.py`):
//!
//!     cargo run --release --example train_attention [-- --case i --runs n]
//!     scripts/.venv/bin/python scripts/torch_train_attention.py
use anyhow::Result;
use candle_core::Var;
use sd_rs::model::ops;
use std::time::Instant;

mod common;
use common::{flag_number, pattern};

/// (attentions of this shape in one step, query tokens, key tokens, heads, head width): the
/// self- and cross-attention (32 text tokens) of the transformers at 16x16, 8x8 and 4x4.
const ATTENTION: [(usize, usize, usize, usize, usize); 5] = [
    (3, 256, 256, 8, 8),
    (3, 256, 32, 8, 8),
    (3, 64, 64, 8, 16),
    (3, 64, 32, 8, 16),
    (1, 16, 16, 8, 16),
];

fn main() -> Result<()> {
    let (case, runs) = (flag_number("--case"), flag_number("--runs").unwrap_or(8));
    let pool = rayon::ThreadPoolBuilder::new().build()?;
    println!("threads: {}", pool.current_num_threads());
    pool.install(|| -> Result<()> {
        let (mut fwd_total, mut bwd_total) = (0.0, 0.0);
        for (i, (count, nq, nk, heads, d)) in ATTENTION.into_iter().enumerate() {
            if case.is_some_and(|case| case != i) {
                continue;
            }
            let b = 32;
            let q = Var::from_tensor(&pattern(b * nq * heads * d, 0.37)?.reshape((b, nq, heads * d))?)?;
            let k = Var::from_tensor(&pattern(b * nk * heads * d, 0.41)?.reshape((b, nk, heads * d))?)?;
            let v = Var::from_tensor(&pattern(b * nk * heads * d, 0.23)?.reshape((b, nk, heads * d))?)?;
            let dy = pattern(b * nq * heads * d, 0.19)?.reshape((b, nq, heads * d))?;
            let scale = 1.0 / (d as f64).sqrt();
            let (mut fwd, mut bwd) = (f64::MAX, f64::MAX);
            let mut means = (0.0, 0.0);
            for _ in 0..runs {
                let t = Instant::now();
                let y = ops::attention_tokens(&q, &k, &v, heads, scale, false)?;
                fwd = fwd.min(t.elapsed().as_secs_f64());
                let loss = (&y * &dy)?.sum_all()?;
                let t = Instant::now();
                let grads = loss.backward()?;
                bwd = bwd.min(t.elapsed().as_secs_f64());
                let dq = grads.get(&q).unwrap();
                means = (
                    y.mean_all()?.to_scalar::<f32>()?,
                    dq.mean_all()?.to_scalar::<f32>()?,
                );
            }
            println!(
                "{count} x q {nq:3} k {nk:3} heads {heads} d {d:2}: fwd {:6.2} ms bwd {:6.2} ms (means {:.6} {:.6})",
                fwd * 1e3,
                bwd * 1e3,
                means.0,
                means.1
            );
            fwd_total += count as f64 * fwd;
            bwd_total += count as f64 * bwd;
        }
        println!(
            "one step's attention: fwd {:.1} ms bwd {:.1} ms total {:.1} ms",
            fwd_total * 1e3,
            bwd_total * 1e3,
            (fwd_total + bwd_total) * 1e3
        );
        Ok(())
    })
}
