//! GFLOP/s of `gemm` 0.19 (AVX-512 kernels) and MKL's `cblas_sgemm` on the same row-major f32
//! problems C (m x n) = A (m x k) B (k x n), single-threaded; and for the linear layers also
//! `gemm` on two threads with B read as the transpose of an (n, k) weight, as sd-rs's fused
//! linear does, against a weight stored (k, n).
use std::time::Instant;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn cblas_sgemm(
        layout: i32, trans_a: i32, trans_b: i32, m: i32, n: i32, k: i32, alpha: f32,
        a: *const f32, lda: i32, b: *const f32, ldb: i32, beta: f32, c: *mut f32, ldc: i32,
    );
}

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;

/// Best of three timings of `f`, each averaged over enough calls for about 10 GFLOP.
fn gflops(m: usize, n: usize, k: usize, mut f: impl FnMut()) -> f64 {
    let flops = 2.0 * (m * n * k) as f64;
    let reps = ((1e10 / flops) as usize).max(3);
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    flops / best / 1e9
}

fn data(len: usize, mul: usize) -> Vec<f32> {
    (0..len).map(|i| ((i * mul) % 13) as f32 * 0.01).collect()
}

/// `gemm` with B given by its (row, column) strides.
fn run_gemm(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], b_strides: (isize, isize), c: &mut [f32], threads: usize) {
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: a is (m, k) row-major, c (m, n) row-major, b holds k * n values read with the strides.
    unsafe {
        gemm::gemm(
            m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize,
            b.as_ptr(), b_strides.1, b_strides.0, 0.0, 1.0, false, false, false, par,
        )
    }
}

fn main() {
    println!("single thread, C = A B, all row-major (GFLOP/s)");
    // SD 1.5's U-Net convolutions as sd-rs runs them (weight (c_out, 9 c_in) times one band of
    // im2col, 64-wide rows at 64x64, ...) and two VAE decoder convolutions.
    let conv = [
        (320, 704, 2880), (640, 352, 5760), (1280, 176, 11520), (1280, 64, 11520),
        (128, 16384, 1152), (512, 2048, 4608),
    ];
    for (m, n, k) in conv {
        let (a, b, mut c) = (data(m * k, 7), data(k * n, 5), vec![0f32; m * n]);
        let g = gflops(m, n, k, || run_gemm(m, n, k, &a, &b, (n as isize, 1), &mut c, 1));
        let mkl = gflops(m, n, k, || unsafe {
            cblas_sgemm(ROW_MAJOR, NO_TRANS, NO_TRANS, m as i32, n as i32, k as i32, 1.0,
                a.as_ptr(), k as i32, b.as_ptr(), n as i32, 0.0, c.as_mut_ptr(), n as i32)
        });
        println!("  m={m:5} n={n:5} k={k:5}: gemm {g:6.1}  mkl {mkl:6.1}");
    }
    println!("CLIP-L's linears on 2 x 77 tokens, gemm on 2 threads (GFLOP/s)");
    for (m, n, k) in [(154, 768, 768), (154, 2304, 768), (154, 3072, 768), (154, 768, 3072)] {
        let (a, w, mut c) = (data(m * k, 7), data(k * n, 5), vec![0f32; m * n]);
        let strided = gflops(m, n, k, || run_gemm(m, n, k, &a, &w, (1, k as isize), &mut c, 2));
        let stored_kn = gflops(m, n, k, || run_gemm(m, n, k, &a, &w, (n as isize, 1), &mut c, 2));
        println!("  m={m:5} n={n:5} k={k:5}: weight (n, k) read transposed {strided:6.1}, weight stored (k, n) {stored_kn:6.1}");
    }
}
