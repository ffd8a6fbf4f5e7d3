//! Fused CPU kernels, each with its own backward pass, for the patterns that dominate a training
//! step of the small models on a CPU.
//!
//! Why they exist: candle's autograd records one node per elementary op, and its backward
//! allocates a zero gradient and adds into it for every node. A GroupNorm written from ~10 ops
//! therefore costs ~10 full-size passes forward and ~30 backward; candle 0.11's conv2d backward
//! goes through a direct (non-GEMM) `conv_transpose2d` and a conv2d whose "kernel" is the whole
//! feature map, both far slower than the forward. Profiles of a VAE/U-Net step showed those
//! costs dominating, not the convolution/matmul FLOPs.
//!
//! Every op here is a `CustomOp` whose `bwd` computes its gradient directly (GEMMs through
//! candle's `matmul` where there are any), so the graph gets one node per layer instead of
//! dozens. The kernels run on `f32`/`f64` CPU tensors only, parallel over independent slices
//! with rayon, and the elementwise ones are compiled a second time for AVX2 (picked at run
//! time; the crate targets baseline x86-64). Callers check [`applies`] and otherwise use the
//! composed candle ops (CUDA, Metal, half precision), which remain the reference: the results
//! agree up to float rounding. In f32, `exp` and `erf` are branch-free approximations within a
//! few ulp so that loops vectorise; f64 uses the library functions, so the f64 unit tests below
//! match the composed ops to ~1e-12, forward and backward. `SD_RS_FUSED_CPU_OPS=0` switches the
//! kernels off.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result};
use candle_core::{Device, Shape, Storage, Tensor, WithDType, D};
use rayon::prelude::*;

mod winograd;
pub use winograd::set_enabled as set_winograd;

/// A process-wide on/off switch: on unless the environment variable `var` is `0` (read on first
/// use), or as last [`Switch::set`].
struct Switch {
    /// 0: not decided yet, 1: on, 2: off.
    state: AtomicU8,
    var: &'static str,
}

impl Switch {
    const fn new(var: &'static str) -> Self {
        Self {
            state: AtomicU8::new(0),
            var,
        }
    }

    fn set(&self, on: bool) {
        self.state.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    fn get(&self) -> bool {
        match self.state.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let on = std::env::var(self.var).map_or(true, |v| v.trim() != "0");
                self.set(on);
                on
            }
        }
    }
}

static ENABLED: Switch = Switch::new("SD_RS_FUSED_CPU_OPS");

/// Switches the fused kernels on or off for the whole process. They are on unless the
/// environment variable `SD_RS_FUSED_CPU_OPS` is `0`; off forces the composed candle ops
/// everywhere, which is how the kernels are compared with the reference.
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

/// Whether the fused kernels are switched on.
pub fn enabled() -> bool {
    ENABLED.get()
}

/// Whether the fused kernels handle `t`: switched on, on the CPU, in f32 or f64, not empty.
pub fn applies(t: &Tensor) -> bool {
    enabled()
        && t.device().is_cpu()
        && matches!(t.dtype(), DType::F32 | DType::F64)
        && t.elem_count() > 0
}

/// The float operations the kernels need beyond `WithDType`'s arithmetic. f32 gets branch-free
/// `exp`/`erf` that the compiler vectorises (within ~2 ulp of libm); f64, used by the
/// finite-difference gradient checks, keeps the exact library functions.
trait Real: WithDType {
    fn exp(self) -> Self;
    fn erf(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f32(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// e^x for f32 (Cephes' expf: range reduction by ln 2, then a polynomial), relative error
/// below 1e-7 over the clamped range [-87, 88]. No branches or calls, so loops over it
/// vectorise.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let n = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    y * f32::from_bits(((n + 127) as u32) << 23)
}

/// erf(x) for f32: its Taylor series below 0.5 (where 1 - erfc would lose the relative
/// precision), above that Numerical Recipes' erfc (Chebyshev fit, fractional error < 1.2e-7)
/// with [`exp_f32`]. Absolute error below 2e-7; branch-free.
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let tail = (1.0 - t * exp_f32(-z * z + poly)).copysign(x);
    let x2 = x * x;
    let series = x
        * (std::f32::consts::FRAC_2_SQRT_PI
            + x2 * (-0.376_126_4
                + x2 * (0.112_837_92
                    + x2 * (-0.026_866_17 + x2 * (0.005_223_977 + x2 * -0.000_854_832_7)))));
    if z < 0.5 {
        series
    } else {
        tail
    }
}

/// Whether the CPU has AVX2 (the std macro caches the answer).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// Whether the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
fn has_avx512f() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Defines a kernel that runs compiled for AVX-512 or AVX2 where the CPU has them (the crate
/// is built for baseline x86-64, i.e. SSE2), otherwise as the baseline build. Every build does
/// the same operations in the same order (no FMA contraction; the loops accumulate in
/// fixed-size lane arrays), so they give identical results.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident<T: Real>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        fn $name<T: Real>($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp<T: Real>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2<T: Real>($($arg: $ty),*) {
                    imp::<T>($($arg),*)
                }
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                fn avx512<T: Real>($($arg: $ty),*) {
                    imp::<T>($($arg),*)
                }
                if has_avx512f() {
                    // SAFETY: the CPU has the feature `avx512` is compiled for.
                    return unsafe { avx512::<T>($($arg),*) };
                }
                if has_avx2() {
                    // SAFETY: the CPU has the feature `avx2` is compiled for.
                    return unsafe { avx2::<T>($($arg),*) };
                }
            }
            imp::<T>($($arg),*)
        }
    };
}

/// Sum of `f(x)` in f64, accumulated in eight lanes of `T` over blocks of 256 values (so that
/// the loop vectorises) and the block sums in f64.
#[inline(always)]
fn sum_f64<T: Real>(x: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(256) {
        let mut lanes = [T::zero(); 8];
        let mut chunks = block.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                lanes[l] += f(c[l]);
            }
        }
        for &v in chunks.remainder() {
            lanes[0] += f(v);
        }
        total += lanes.iter().map(|v| v.to_f64()).sum::<f64>();
    }
    total
}

/// (sum of a, sum of a * (b - shift)) in f64, like [`sum_f64`].
#[inline(always)]
fn sum2_f64<T: Real>(a: &[T], b: &[T], shift: T) -> (f64, f64) {
    let (mut t1, mut t2) = (0f64, 0f64);
    for (ba, bb) in a.chunks(256).zip(b.chunks(256)) {
        let (mut l1, mut l2) = ([T::zero(); 8], [T::zero(); 8]);
        let (mut ca, mut cb) = (ba.chunks_exact(8), bb.chunks_exact(8));
        for (x, y) in (&mut ca).zip(&mut cb) {
            for l in 0..8 {
                l1[l] += x[l];
                l2[l] += x[l] * (y[l] - shift);
            }
        }
        for (&x, &y) in ca.remainder().iter().zip(cb.remainder()) {
            l1[0] += x;
            l2[0] += x * (y - shift);
        }
        t1 += l1.iter().map(|v| v.to_f64()).sum::<f64>();
        t2 += l2.iter().map(|v| v.to_f64()).sum::<f64>();
    }
    (t1, t2)
}

/// Mean and 1/sqrt(var + eps) in f64 (two passes: mean, then mean squared deviation).
#[inline(always)]
fn moments<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = sum_f64(x, |v| v) / n;
    let m = T::from_f64(mean);
    let var = sum_f64(x, |v| (v - m) * (v - m)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// The contiguous data of a kernel input (callers make inputs contiguous first).
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: input is not contiguous ({:?})", l.stride()),
    }
}

/// Runs `$body` with `$t` bound to the element type of the CPU storage `$s` (f32 or f64).
macro_rules! dispatch {
    ($op:expr, $s:expr, $t:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => bail!("{}: unsupported dtype {:?}", $op, other.dtype()),
        }
    };
}

fn storage<T: WithDType>(v: Vec<T>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (T::to_cpu_storage_owned(v), shape.into())
}

// ---------------------------------------------------------------------------------------------
// Helpers for kernels that call GEMMs: CPU data of tensors, and tensors of CPU data
// ---------------------------------------------------------------------------------------------

/// Runs `$body` with `$t` bound to the Rust type of `$dtype` (f32 or f64).
macro_rules! dispatch_dtype {
    ($op:expr, $dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            other => bail!("{}: unsupported dtype {other:?}", $op),
        }
    };
}

/// Runs `f` on the contiguous CPU data of `ts` (all of element type `T`).
fn with_data<T: WithDType, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (s, l) in &guards {
        match &**s {
            Storage::Cpu(cpu) => slices.push(slice::<T>(cpu, l, "fused kernel")?),
            _ => bail!("fused kernels run on the CPU only"),
        }
    }
    f(&slices)
}

/// Elements per task of the element-wise work spread over the rayon workers.
const ELEMENTS_PER_TASK: usize = 1 << 14;

/// `len` zeros, written on the rayon workers: `vec![0; len]` clears reused heap memory on the
/// calling thread alone while the other cores wait (memset was 4-7% of a U-Net or training step).
fn zeros<T: WithDType>(len: usize) -> Vec<T> {
    filled_planes(len, ELEMENTS_PER_TASK, |_| T::zero())
}

/// `len` values in planes of `plane`, every value of plane i being `value(i)` (a convolution's
/// output filled with its channels' biases), written on the rayon workers in one pass.
fn filled_planes<T: WithDType>(
    len: usize,
    plane: usize,
    value: impl Fn(usize) -> T + Sync,
) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.spare_capacity_mut()[..len]
        .par_chunks_mut(plane.max(1))
        .with_min_len(ELEMENTS_PER_TASK / plane.max(1))
        .enumerate()
        .for_each(|(i, p)| p.fill(std::mem::MaybeUninit::new(value(i))));
    // SAFETY: the chunks above cover all `len` values, each written once.
    unsafe { v.set_len(len) };
    v
}

/// `rows` copies of `row` one after another (a linear layer's output filled with its bias),
/// written on the rayon workers.
fn repeated_rows<T: WithDType>(row: &[T], rows: usize) -> Vec<T> {
    let n = row.len();
    let mut v = Vec::with_capacity(n * rows);
    v.spare_capacity_mut()[..n * rows]
        .par_chunks_mut(n.max(1))
        .with_min_len(ELEMENTS_PER_TASK / n.max(1))
        .for_each(|out| {
            for (o, &x) in out.iter_mut().zip(row) {
                o.write(x);
            }
        });
    // SAFETY: the chunks above cover all n * rows values, each written once.
    unsafe { v.set_len(n * rows) };
    v
}

thread_local! {
    /// Buffers that kernels on this thread have finished with, for [`Scratch`] to hand out again.
    static SCRATCH_POOL: std::cell::RefCell<Vec<Vec<u64>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A working buffer of `len` values of `T` from this thread's pool, holding whatever its last
/// user left (every bit pattern is a value of the float and integer types the kernels run on),
/// given back to the pool when dropped. For buffers a kernel writes before it reads them (an
/// im2col block, a GEMM's output): a fresh `vec![0; n]` of megabytes per call and worker cost
/// a fill with zeros, and page faults where the allocator had returned the memory, about a
/// twentieth of a training step.
struct Scratch<T> {
    words: Vec<u64>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: WithDType> Scratch<T> {
    fn new(len: usize) -> Self {
        const { assert!(std::mem::align_of::<T>() <= 8) };
        let words = (len * std::mem::size_of::<T>()).div_ceil(8);
        let mut buf = SCRATCH_POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            // The smallest buffer large enough, else the largest (grown below).
            let fits = (0..pool.len())
                .filter(|&i| pool[i].len() >= words)
                .min_by_key(|&i| pool[i].len());
            let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].len()));
            pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
        });
        if buf.len() < words {
            buf.resize(words, 0);
        }
        Self {
            words: buf,
            len,
            _values: std::marker::PhantomData,
        }
    }
}

impl<T> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `words` holds at least `len` values of T (see `new`), aligned to 8 >= T's
        // alignment, and initialised: every bit pattern is a valid T.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len) }
    }
}

impl<T> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`, through the unique borrow of `words`.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len) }
    }
}

impl<T> Drop for Scratch<T> {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        // (During thread teardown the pool may be gone: the buffer is then just freed.)
        let _ = SCRATCH_POOL.try_with(|pool| pool.borrow_mut().push(words));
    }
}

fn cpu_tensor<T: WithDType>(data: Vec<T>, shape: impl Into<Shape>) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)
// ---------------------------------------------------------------------------------------------

multiversion! {
    /// One (sample, group) of GroupNorm(+SiLU): `x` and `out` hold the group's channels
    /// (`gamma.len()` of them) of `spatial` values each.
    fn group_norm_fwd<T: Real>(
        x: &[T],
        out: &mut [T],
        gamma: &[T],
        beta: &[T],
        spatial: usize,
        eps: f64,
        silu: bool,
    ) {
        let (mean, rstd) = moments(x, eps);
        let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
        for ci in 0..gamma.len() {
            let (a, b) = (gamma[ci] * rstd, beta[ci]);
            let xs = &x[ci * spatial..][..spatial];
            let os = &mut out[ci * spatial..][..spatial];
            if silu {
                for (o, &v) in os.iter_mut().zip(xs) {
                    let z = (v - mean) * a + b;
                    *o = z / (T::one() + (T::zero() - z).exp());
                }
            } else {
                for (o, &v) in os.iter_mut().zip(xs) {
                    *o = (v - mean) * a + b;
                }
            }
        }
    }
}

multiversion! {
    /// The backward of [`group_norm_fwd`] for one (sample, group): writes dx and this
    /// sample's (dgamma, dbeta) per channel into `dparams` (2 * channels).
    fn group_norm_bwd<T: Real>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        gamma: &[T],
        beta: &[T],
        dparams: &mut [f64],
        spatial: usize,
        eps: f64,
        silu: bool,
    ) {
        let cg = gamma.len();
        let (mean, rstd) = moments(x, eps);
        let rstd64 = rstd;
        let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
        // dz (the gradient before the affine+norm) into dx, and per channel
        // dbeta = sum dz, dgamma = sum dz * xhat. With dxhat = dz * gamma:
        // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
        let (mut sum1, mut sum2) = (0f64, 0f64);
        for ci in 0..cg {
            let range = ci * spatial..(ci + 1) * spatial;
            let (xs, gs) = (&x[range.clone()], &dy[range.clone()]);
            let ds = &mut dx[range];
            if silu {
                let (a, b) = (gamma[ci] * rstd, beta[ci]);
                for ((d, &v), &g) in ds.iter_mut().zip(xs).zip(gs) {
                    let z = (v - mean) * a + b;
                    let s = T::one() / (T::one() + (T::zero() - z).exp());
                    *d = g * s * (T::one() + z * (T::one() - s));
                }
            } else {
                ds.copy_from_slice(gs);
            }
            let (sdz, sdzx) = sum2_f64(ds, xs, mean);
            let (dgamma, dbeta) = (sdzx * rstd64, sdz);
            dparams[ci] = dgamma;
            dparams[cg + ci] = dbeta;
            let g = gamma[ci].to_f64();
            sum1 += g * dbeta;
            sum2 += g * dgamma;
        }
        let n = x.len() as f64;
        let (m1, m2) = (T::from_f64(sum1 / n), T::from_f64(sum2 / n));
        for (ci, &g) in gamma.iter().enumerate() {
            let range = ci * spatial..(ci + 1) * spatial;
            for (d, &v) in dx[range.clone()].iter_mut().zip(&x[range]) {
                let xhat = (v - mean) * rstd;
                *d = rstd * (*d * g - m1 - xhat * m2);
            }
        }
    }
}

/// `torch.nn.GroupNorm` on (B, C, *) with per-channel affine, optionally followed by SiLU.
#[derive(Debug, Clone, Copy)]
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    /// (channels per group, spatial size)
    fn dims(&self, dims: &[usize], c: usize) -> Result<(usize, usize)> {
        if dims.len() < 3 || dims[1] != c || !c.is_multiple_of(self.groups) {
            bail!(
                "group-norm: input {dims:?} for {c} channels in {} groups",
                self.groups
            )
        }
        Ok((c / self.groups, dims[2..].iter().product()))
    }

    fn fwd<T: Real>(&self, x: &[T], gamma: &[T], beta: &[T], cg: usize, spatial: usize) -> Vec<T> {
        let mut out = zeros(x.len());
        out.par_chunks_mut(cg * spatial)
            .zip(x.par_chunks(cg * spatial))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let ch = (i % self.groups) * cg..(i % self.groups + 1) * cg;
                group_norm_fwd(
                    x,
                    out,
                    &gamma[ch.clone()],
                    &beta[ch],
                    spatial,
                    self.eps,
                    self.silu,
                );
            });
        out
    }

    /// (dx, dgamma, dbeta)
    fn bwd<T: Real>(
        &self,
        x: &[T],
        dy: &[T],
        gamma: &[T],
        beta: &[T],
        cg: usize,
        spatial: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let c = gamma.len();
        let mut dx = zeros(x.len());
        // Per (sample, group): dgamma and dbeta of its channels, summed over samples below.
        let mut partials = vec![0f64; x.len() / spatial * 2];
        dx.par_chunks_mut(cg * spatial)
            .zip(x.par_chunks(cg * spatial))
            .zip(dy.par_chunks(cg * spatial))
            .zip(partials.par_chunks_mut(2 * cg))
            .enumerate()
            .for_each(|(i, (((dx, x), dy), part))| {
                let ch = (i % self.groups) * cg..(i % self.groups + 1) * cg;
                group_norm_bwd(
                    x,
                    dy,
                    dx,
                    &gamma[ch.clone()],
                    &beta[ch],
                    part,
                    spatial,
                    self.eps,
                    self.silu,
                );
            });
        let (mut dgamma, mut dbeta) = (vec![0f64; c], vec![0f64; c]);
        for (i, part) in partials.chunks(2 * cg).enumerate() {
            let c0 = (i % self.groups) * cg;
            for ci in 0..cg {
                dgamma[c0 + ci] += part[ci];
                dbeta[c0 + ci] += part[cg + ci];
            }
        }
        let to_t = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
        (dx, to_t(dgamma), to_t(dbeta))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (cg, spatial) = self.dims(xl.dims(), gl.shape().elem_count())?;
        dispatch!(self.name(), xs, T => {
            let x = slice::<T>(xs, xl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            let b = slice::<T>(bs, bl, self.name())?;
            Ok(storage(self.fwd(x, g, b, cg, spatial), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _profile = crate::profile::scope("group norm backward", x.device());
        let (cg, spatial) = self.dims(x.dims(), gamma.elem_count())?;
        let (dx, dg, db) = dispatch_dtype!(self.name(), x.dtype(), T => {
            with_data::<T, _>(&[x, grad, gamma, beta], |d| {
                let (dx, dg, db) = self.bwd(d[0], d[1], d[2], d[3], cg, spatial);
                Ok((
                    cpu_tensor(dx, x.shape())?,
                    cpu_tensor(dg, gamma.shape())?,
                    cpu_tensor(db, beta.shape())?,
                ))
            })?
        });
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// GroupNorm over (B, C, *) with `groups` groups and per-channel `gamma`/`beta` (C,), followed
/// by SiLU when `silu`. Fused kernel; requires [`applies`].
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        GroupNormOp { groups, eps, silu },
    )
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last dimension
// ---------------------------------------------------------------------------------------------

/// Rows per parallel task of the row-wise kernels.
const ROWS_PER_TASK: usize = 64;

multiversion! {
    /// LayerNorm of the rows (of `gamma.len()` values) in `x` into `out`.
    fn layer_norm_fwd<T: Real>(x: &[T], out: &mut [T], gamma: &[T], beta: &[T], eps: f64) {
        let d = gamma.len();
        for (o, x) in out.chunks_mut(d).zip(x.chunks(d)) {
            let (mean, rstd) = moments(x, eps);
            let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
            for (((o, &v), &g), &b) in o.iter_mut().zip(x).zip(gamma).zip(beta) {
                *o = (v - mean) * rstd * g + b;
            }
        }
    }
}

multiversion! {
    /// The backward of [`layer_norm_fwd`] for some rows (at most [`ROWS_PER_TASK`]): dx, and
    /// the rows' dgamma (first d) and dbeta (last d) added into `part`. The rows' sums are
    /// taken in `T` and added to `part` in f64 once, so that the per-row loop vectorises.
    fn layer_norm_bwd<T: Real>(
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        gamma: &[T],
        part: &mut [f64],
        eps: f64,
    ) {
        let d = gamma.len();
        let (mut sum_g, mut sum_b) = (vec![T::zero(); d], vec![T::zero(); d]);
        for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
            let (mean, rstd) = moments(x, eps);
            let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
            let sums = sum_g.iter_mut().zip(sum_b.iter_mut());
            for ((((dx, &x), &dy), &g), (sg, sb)) in dx.iter_mut().zip(x).zip(dy).zip(gamma).zip(sums) {
                let xhat = (x - mean) * rstd;
                *sg += dy * xhat;
                *sb += dy;
                *dx = dy * g;
            }
            // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
            let (s1, s2) = sum2_f64(dx, x, mean);
            let m1 = T::from_f64(s1 / d as f64);
            let m2 = T::from_f64(s2 / d as f64) * rstd;
            for (g, &v) in dx.iter_mut().zip(x) {
                let xhat = (v - mean) * rstd;
                *g = rstd * (*g - m1 - xhat * m2);
            }
        }
        for (p, v) in part.iter_mut().zip(sum_g.iter().chain(&sum_b)) {
            *p += v.to_f64();
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn fwd<T: Real>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let d = gamma.len();
        let mut out = zeros(x.len());
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(out, x)| layer_norm_fwd(x, out, gamma, beta, self.eps));
        out
    }

    /// (dx, dgamma, dbeta)
    fn bwd<T: Real>(&self, x: &[T], dy: &[T], gamma: &[T]) -> (Vec<T>, Vec<T>, Vec<T>) {
        let d = gamma.len();
        let mut dx = zeros(x.len());
        let parts: Vec<Vec<f64>> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .zip(dy.par_chunks(d * ROWS_PER_TASK))
            .map(|((dx, x), dy)| {
                let mut part = vec![0f64; 2 * d];
                layer_norm_bwd(x, dy, dx, gamma, &mut part, self.eps);
                part
            })
            .collect();
        let mut acc = vec![0f64; 2 * d];
        for part in &parts {
            for (a, p) in acc.iter_mut().zip(part) {
                *a += p;
            }
        }
        let dgamma = acc[..d].iter().map(|&v| T::from_f64(v)).collect();
        let dbeta = acc[d..].iter().map(|&v| T::from_f64(v)).collect();
        (dx, dgamma, dbeta)
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = gl.shape().elem_count();
        if xl.dims().last() != Some(&d) || bl.shape().elem_count() != d {
            bail!("layer-norm: input {:?} for {d} features", xl.dims())
        }
        dispatch!(self.name(), xs, T => {
            let x = slice::<T>(xs, xl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            let b = slice::<T>(bs, bl, self.name())?;
            Ok(storage(self.fwd(x, g, b), xl.shape().clone()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _profile = crate::profile::scope("layer norm backward", x.device());
        let (dx, dg, db) = dispatch_dtype!(self.name(), x.dtype(), T => {
            with_data::<T, _>(&[x, grad, gamma], |d| {
                let (dx, dg, db) = self.bwd(d[0], d[1], d[2]);
                Ok((
                    cpu_tensor(dx, x.shape())?,
                    cpu_tensor(dg, gamma.shape())?,
                    cpu_tensor(db, beta.shape())?,
                ))
            })?
        });
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// LayerNorm over the last dimension with `gamma`/`beta` of that size. Requires [`applies`].
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNormOp { eps },
    )
}

// ---------------------------------------------------------------------------------------------
// Attention: softmax(scale · q kᵀ) v per head, scores never materialised beyond a block
// ---------------------------------------------------------------------------------------------

/// Query rows per block. The kernels keep a block's scores transposed, (Nk, ROWS), so that
/// every inner loop runs over ROWS queries held in fixed-size arrays: vector registers. A
/// training step of the default model took 3% less time with 128 than with 64, and 20% more
/// with 32 (the longer loops keep more independent vector operations in flight).
const ROWS: usize = 128;

/// `out[c][r] = x[(r0 + r) * d + c] * scale` for the block starting at row `r0` (zero past the
/// last row).
#[inline(always)]
fn block_transposed<T: Real, const R: usize>(
    x: &[T],
    r0: usize,
    d: usize,
    scale: T,
    out: &mut [[T; R]],
) {
    let rows = (x.len() / d - r0).min(R);
    for (c, o) in out.iter_mut().enumerate() {
        for (r, o) in o.iter_mut().enumerate() {
            *o = if r < rows {
                x[(r0 + r) * d + c] * scale
            } else {
                T::zero()
            };
        }
    }
}

/// Dot product of two row blocks, in eight lanes.
#[inline(always)]
fn dot_rows<T: Real, const R: usize>(a: &[T; R], b: &[T; R]) -> T {
    let mut lanes = [T::zero(); 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut s = T::zero();
    for v in lanes {
        s += v;
    }
    s
}

/// The probabilities of a block of queries (`qt`: (d, ROWS), already scaled) against the keys
/// `k` (nk, d), transposed: `pt[j][r]` = softmax over j of q_r . k_j. With `causal` =
/// Some(r0), the block's row r is query r0 + r and sees only keys j <= r0 + r.
#[inline(always)]
fn block_probs<T: Real, const R: usize>(
    qt: &[[T; R]],
    k: &[T],
    d: usize,
    pt: &mut [[T; R]],
    causal: Option<usize>,
) {
    for (s, kj) in pt.iter_mut().zip(k.chunks(d)) {
        *s = [T::zero(); R];
        for (qc, &kc) in qt.iter().zip(kj) {
            for r in 0..R {
                s[r] += kc * qc[r];
            }
        }
    }
    if let Some(r0) = causal {
        // Key j is hidden from rows r < j - r0; those scores get -inf (probability 0 below).
        for (j, s) in pt.iter_mut().enumerate().skip(r0 + 1) {
            for v in s.iter_mut().take((j - r0).min(R)) {
                *v = T::from_f64(f64::NEG_INFINITY);
            }
        }
    }
    let mut max = pt[0];
    for s in pt.iter() {
        for r in 0..R {
            max[r] = if s[r] > max[r] { s[r] } else { max[r] };
        }
    }
    let mut sum = [T::zero(); R];
    for s in pt.iter_mut() {
        for r in 0..R {
            s[r] = (s[r] - max[r]).exp();
            sum[r] += s[r];
        }
    }
    if let Some(r0) = causal {
        // f32's branch-free exp clamps its argument, so exp(-inf) came out as ~1e-38, not 0.
        for (j, s) in pt.iter_mut().enumerate().skip(r0 + 1) {
            for v in s.iter_mut().take((j - r0).min(R)) {
                *v = T::zero();
            }
        }
    }
    for v in sum.iter_mut() {
        *v = T::one() / *v;
    }
    for s in pt.iter_mut() {
        for r in 0..R {
            s[r] *= sum[r];
        }
    }
}

multiversion! {
    /// One head: `o` (nq, d) = softmax(scale q kᵀ) v for q (nq, d), k and v (nk, d); when
    /// `causal`, query i sees keys 0..=i only.
    fn attention_head_fwd<T: Real>(q: &[T], k: &[T], v: &[T], o: &mut [T], nk: usize, d: usize, scale: f64, causal: bool) {
        match block_rows(q.len() / d) {
            16 => head_fwd::<T, 16>(q, k, v, o, nk, d, scale, causal),
            32 => head_fwd::<T, 32>(q, k, v, o, nk, d, scale, causal),
            64 => head_fwd::<T, 64>(q, k, v, o, nk, d, scale, causal),
            _ => head_fwd::<T, ROWS>(q, k, v, o, nk, d, scale, causal),
        }
    }
}

/// [`attention_head_fwd`] in blocks of `R` query rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_fwd<T: Real, const R: usize>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &mut [T],
    nk: usize,
    d: usize,
    scale: f64,
    causal: bool,
) {
    let scale = T::from_f64(scale);
    let nq = q.len() / d;
    let mut qt = vec![[T::zero(); R]; d];
    let mut pt = vec![[T::zero(); R]; nk];
    for r0 in (0..nq).step_by(R) {
        let rows = (nq - r0).min(R);
        block_transposed(q, r0, d, scale, &mut qt);
        block_probs(&qt, k, d, &mut pt, causal.then_some(r0));
        for c in 0..d {
            let mut acc = [T::zero(); R];
            for (p, vj) in pt.iter().zip(v.chunks(d)) {
                let vjc = vj[c];
                for r in 0..R {
                    acc[r] += vjc * p[r];
                }
            }
            for r in 0..rows {
                o[(r0 + r) * d + c] = acc[r];
            }
        }
    }
}

/// Query rows per block of [`attention_head_fwd_gemm`]. Each block's two GEMMs repack all of
/// k and v, so larger blocks pack them fewer times; at SD's 4096 keys a block's scores are
/// then 4 MiB, past the L2 cache, and yet 256 rows ran 8-10% faster than 64 (the U-Net's first
/// level at 512x512: 0.28-0.31 -> 0.26 s per self-attention; 512 rows no faster).
const GEMM_ROWS: usize = 256;

/// Heads with fewer query rows than this stay with the register-blocked loops.
const GEMM_MIN_ROWS: usize = 64;

/// Whether a head is large enough for [`attention_head_fwd_gemm`]: its two GEMMs then run
/// near the machine's FLOP rate, against the register-blocked loops of [`attention_head_fwd`]
/// (which profiles put at a third of a U-Net step at 512x512). Smaller heads, such as the
/// 8-wide ones of the shipped model, stay with the loops.
fn attention_uses_gemm(nq: usize, nk: usize, d: usize) -> bool {
    d >= 16 && nk >= 64 && nq >= GEMM_MIN_ROWS
}

multiversion! {
    /// Each row of `s` (`nk` values) -> exp(row - its max), in place; `sums` gets the rows' sums.
    fn exp_rows<T: Real>(s: &mut [T], sums: &mut [T], nk: usize) {
        for (row, sum) in s.chunks_mut(nk).zip(sums.iter_mut()) {
            // Sixteen independent lanes, so that both passes vectorise.
            const L: usize = 16;
            let mut lanes = [row[0]; L];
            let mut chunks = row.chunks_exact(L);
            for chunk in &mut chunks {
                for l in 0..L {
                    lanes[l] = if chunk[l] > lanes[l] { chunk[l] } else { lanes[l] };
                }
            }
            let mut max = row[0];
            for &x in lanes.iter().chain(chunks.remainder()) {
                max = if x > max { x } else { max };
            }
            let mut lanes = [T::zero(); L];
            let mut chunks = row.chunks_exact_mut(L);
            for chunk in &mut chunks {
                for l in 0..L {
                    chunk[l] = (chunk[l] - max).exp();
                    lanes[l] += chunk[l];
                }
            }
            let mut total = lanes.iter().fold(T::zero(), |a, &b| a + b);
            for x in chunks.into_remainder() {
                *x = (*x - max).exp();
                total += *x;
            }
            *sum = total;
        }
    }
}

/// One head, as [`attention_head_fwd`], with GEMMs: per block of query rows, the scores
/// S = scale q kᵀ (one GEMM), P = exp(S - row max) in place, o = P v (a second GEMM) divided
/// by the rows' sums.
#[allow(clippy::too_many_arguments)]
fn attention_head_fwd_gemm<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &mut [T],
    nk: usize,
    d: usize,
    scale: f64,
    causal: bool,
) {
    let nq = q.len() / d;
    let mut scores = vec![T::zero(); GEMM_ROWS.min(nq) * nk];
    let mut sums = [T::zero(); GEMM_ROWS];
    for r0 in (0..nq).step_by(GEMM_ROWS) {
        let rows = (nq - r0).min(GEMM_ROWS);
        let (s, sums) = (&mut scores[..rows * nk], &mut sums[..rows]);
        let (q, o) = (&q[r0 * d..][..rows * d], &mut o[r0 * d..][..rows * d]);
        // SAFETY: every matrix lies inside its slice: q (rows, d), k read as kᵀ (d, nk) with
        // unit row and d column strides, s (rows, nk), v (nk, d), o (rows, d), all row-major.
        unsafe {
            gemm::gemm(
                rows,
                nk,
                d,
                s.as_mut_ptr(),
                1,
                nk as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                k.as_ptr(),
                d as isize,
                1,
                T::zero(),
                T::from_f64(scale),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        if causal {
            // Query r0 + r sees keys 0..=r0 + r: the rest of its row gets -inf, then 0.
            for (r, row) in s.chunks_mut(nk).enumerate() {
                row[(r0 + r + 1).min(nk)..].fill(T::from_f64(f64::NEG_INFINITY));
            }
        }
        exp_rows(s, sums, nk);
        if causal {
            // (f32's branch-free exp clamps its argument: exp(-inf) came out as ~1e-38.)
            for (r, row) in s.chunks_mut(nk).enumerate() {
                row[(r0 + r + 1).min(nk)..].fill(T::zero());
            }
        }
        unsafe {
            gemm::gemm(
                rows,
                d,
                nk,
                o.as_mut_ptr(),
                1,
                d as isize,
                false,
                s.as_ptr(),
                1,
                nk as isize,
                v.as_ptr(),
                1,
                d as isize,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (row, &sum) in o.chunks_mut(d).zip(sums.iter()) {
            let inv = T::one() / sum;
            for x in row {
                *x *= inv;
            }
        }
    }
}

/// dv_j += sum_r p_jr do_r and dk_j += sum_r ds_jr q_r over one block of query rows, for
/// heads `D` wide: `q` and `dout` are the block's rows, (rows, D). Each key's two sums stay in
/// registers while the rows stream past, `J` keys at a time so that consecutive additions do
/// not wait on one another. (Dot products over the block's rows, the general path, need a
/// horizontal sum per key and channel: most of the backward's time with the default model's
/// 8-wide heads.)
#[inline(always)]
fn accumulate_dk_dv<T: Real, const R: usize, const D: usize, const J: usize>(
    pt: &[[T; R]],
    dst: &[[T; R]],
    q: &[T],
    dout: &[T],
    dk: &mut [T],
    dv: &mut [T],
) {
    let rows = q.len() / D;
    assert!(rows <= R && dout.len() >= rows * D);
    let whole = pt.len() - pt.len() % J;
    for j0 in (0..whole).step_by(J) {
        let mut sum_v = [[T::zero(); D]; J];
        let mut sum_k = [[T::zero(); D]; J];
        let p: [&[T; R]; J] = std::array::from_fn(|jj| &pt[j0 + jj]);
        let ds: [&[T; R]; J] = std::array::from_fn(|jj| &dst[j0 + jj]);
        for r in 0..rows {
            let q_r = window::<T, { D }>(q, r * D);
            let do_r = window::<T, { D }>(dout, r * D);
            for jj in 0..J {
                let (p, ds) = (p[jj][r], ds[jj][r]);
                for c in 0..D {
                    sum_v[jj][c] += p * do_r[c];
                    sum_k[jj][c] += ds * q_r[c];
                }
            }
        }
        for jj in 0..J {
            let at = (j0 + jj) * D;
            for c in 0..D {
                dv[at + c] += sum_v[jj][c];
                dk[at + c] += sum_k[jj][c];
            }
        }
    }
    // The last keys, fewer than J: one at a time.
    if whole < pt.len() {
        let (dk, dv) = (&mut dk[whole * D..], &mut dv[whole * D..]);
        accumulate_dk_dv::<T, R, { D }, 1>(&pt[whole..], &dst[whole..], q, dout, dk, dv);
    }
}

// Narrow heads (8 or 16 wide, the shipped model's): a head's few multiply-adds per score make
// the passes over a block's scores the cost, so these kernels make fewer of them. The scores'
// pass also takes each row's maximum. The forward then takes a sub-block of W rows at a time:
// one pass makes its exponentials and row sums into a buffer that stays in the L1 cache, and
// the product with v reads that buffer four channels per pass, their accumulators in registers
// (the general kernels reread all scores from the L2 cache once per channel). The backward's
// dq is made by sub-blocks the same way, and its softmax centre is do . o (the forward's
// output) instead of a pass over the scores.

/// The rows of `x`, `D` values each, as arrays: fixed lengths let the compiler unroll the loops
/// over a row and keep their accumulators in registers.
#[inline(always)]
fn rows_of<T, const D: usize>(x: &[T]) -> impl Iterator<Item = &[T; D]> {
    x.chunks_exact(D)
        .map(|row| row.try_into().expect("chunks of D"))
}

/// `x[at..at + W]` as an array.
#[inline(always)]
fn window<T, const W: usize>(x: &[T], at: usize) -> &[T; W] {
    x[at..at + W].try_into().expect("W values")
}

/// `acc[i][w] = sum_j x_j[c + i] * rows[j][w]` for four channels c..c + 4 of the rows `x_j`
/// (`D` values each): four accumulators, so that additions over j do not wait on one another,
/// and one pass over `rows` for the four.
#[inline(always)]
fn four_channels<T: Real, const D: usize, const W: usize>(
    rows: impl Iterator<Item = [T; W]>,
    x: &[T],
    c: usize,
) -> [[T; W]; 4] {
    let (mut a0, mut a1, mut a2, mut a3) = (
        [T::zero(); W],
        [T::zero(); W],
        [T::zero(); W],
        [T::zero(); W],
    );
    for (row, xj) in rows.zip(rows_of::<T, { D }>(x)) {
        let (x0, x1, x2, x3) = (xj[c], xj[c + 1], xj[c + 2], xj[c + 3]);
        for w in 0..W {
            a0[w] += x0 * row[w];
            a1[w] += x1 * row[w];
            a2[w] += x2 * row[w];
            a3[w] += x3 * row[w];
        }
    }
    [a0, a1, a2, a3]
}

/// The attention kernels' rows per block for `nq` queries: a head of few queries does not
/// compute a whole block of padding rows.
fn block_rows(nq: usize) -> usize {
    nq.next_power_of_two().clamp(16, ROWS)
}

/// Scores s = qt . k_j of a block (`qt`: (D, R), scaled) for every key into `st` (nk, R), and
/// each row's maximum.
#[inline(always)]
fn scores_and_max<T: Real, const R: usize, const D: usize>(
    qt: &[[T; R]; D],
    k: &[T],
    st: &mut [[T; R]],
) -> [T; R] {
    let mut max = [T::from_f64(f64::NEG_INFINITY); R];
    for (s, kj) in st.iter_mut().zip(rows_of::<T, { D }>(k)) {
        let mut acc = [T::zero(); R];
        for c in 0..D {
            for r in 0..R {
                acc[r] += kj[c] * qt[c][r];
            }
        }
        for r in 0..R {
            max[r] = if acc[r] > max[r] { acc[r] } else { max[r] };
        }
        *s = acc;
    }
    max
}

/// [`attention_head_fwd`] for heads `D` wide (not causal), in blocks of `R` rows and
/// sub-blocks of `W`.
#[inline(always)]
fn narrow_head_fwd<T: Real, const R: usize, const D: usize, const W: usize>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &mut [T],
    scale: T,
) {
    let (nq, nk) = (q.len() / D, k.len() / D);
    let mut qt = [[T::zero(); R]; D];
    let mut st = vec![[T::zero(); R]; nk];
    // A sub-block's probabilities, (nk, W): in the L1 cache for the D passes of p v.
    let mut pw = vec![[T::zero(); W]; nk];
    for r0 in (0..nq).step_by(R) {
        let rows = (nq - r0).min(R);
        block_transposed(q, r0, D, scale, &mut qt);
        let max = scores_and_max(&qt, k, &mut st);
        for w0 in (0..rows).step_by(W) {
            let m = window::<T, { W }>(&max, w0);
            let mut sum = [T::zero(); W];
            for (p, s) in pw.iter_mut().zip(&st) {
                let s = window::<T, { W }>(s, w0);
                for w in 0..W {
                    p[w] = (s[w] - m[w]).exp();
                    sum[w] += p[w];
                }
            }
            for c in (0..D).step_by(4) {
                let acc = four_channels::<T, { D }, { W }>(pw.iter().copied(), v, c);
                for w in 0..W.min(rows - w0) {
                    for (i, acc) in acc.iter().enumerate() {
                        o[(r0 + w0 + w) * D + c + i] = acc[w] / sum[w];
                    }
                }
            }
        }
    }
}

/// [`attention_head_bwd`] for heads `D` wide (not causal), in blocks of `R` rows and
/// sub-blocks of `W`; `o` is the forward's output.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn narrow_head_bwd<T: Real, const R: usize, const D: usize, const W: usize, const J: usize>(
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    scale: T,
) {
    let (nq, nk) = (q.len() / D, k.len() / D);
    let (mut qt, mut dot) = ([[T::zero(); R]; D], [[T::zero(); R]; D]);
    let (mut pt, mut dst) = (vec![[T::zero(); R]; nk], vec![[T::zero(); R]; nk]);
    for r0 in (0..nq).step_by(R) {
        let rows = (nq - r0).min(R);
        block_transposed(q, r0, D, scale, &mut qt);
        block_transposed(dout, r0, D, T::one(), &mut dot);
        let max = scores_and_max(&qt, k, &mut pt);
        let mut sum = [T::zero(); R];
        for p in pt.iter_mut() {
            for r in 0..R {
                p[r] = (p[r] - max[r]).exp();
                sum[r] += p[r];
            }
        }
        let inv: [T; R] = std::array::from_fn(|r| T::one() / sum[r]);
        // centre_r = sum_j p_jr (do_r . v_j) = do_r . o_r
        let mut centre = [T::zero(); R];
        let (ob, dob) = (&o[r0 * D..][..rows * D], &dout[r0 * D..][..rows * D]);
        for (c, (o_r, do_r)) in centre
            .iter_mut()
            .zip(rows_of::<T, { D }>(ob).zip(rows_of::<T, { D }>(dob)))
        {
            for i in 0..D {
                *c += o_r[i] * do_r[i];
            }
        }
        // p_jr normalised in place; ds_jr = scale p_jr (do_r . v_j - centre_r).
        for ((p, ds), vj) in pt
            .iter_mut()
            .zip(dst.iter_mut())
            .zip(rows_of::<T, { D }>(v))
        {
            let mut dp = [T::zero(); R];
            for c in 0..D {
                let vjc = vj[c];
                for r in 0..R {
                    dp[r] += vjc * dot[c][r];
                }
            }
            for r in 0..R {
                p[r] *= inv[r];
                ds[r] = p[r] * (dp[r] - centre[r]) * scale;
            }
        }
        // dq_r = sum_j ds_jr k_j, a sub-block of rows at a time (its ds in the L1 cache).
        for w0 in (0..rows).step_by(W) {
            for c in (0..D).step_by(4) {
                let ds = dst.iter().map(|ds| *window::<T, { W }>(ds, w0));
                let acc = four_channels::<T, { D }, { W }>(ds, k, c);
                for w in 0..W.min(rows - w0) {
                    for (i, acc) in acc.iter().enumerate() {
                        dq[(r0 + w0 + w) * D + c + i] = acc[w];
                    }
                }
            }
        }
        let qb = &q[r0 * D..][..rows * D];
        accumulate_dk_dv::<T, R, { D }, J>(&pt, &dst, qb, dob, dk, dv);
    }
}

multiversion! {
    /// [`narrow_head_fwd`] for `d` = 8 or 16 and its block and sub-block sizes.
    fn narrow_fwd<T: Real>(q: &[T], k: &[T], v: &[T], o: &mut [T], d: usize, scale: f64) {
        let s = T::from_f64(scale);
        match (d, block_rows(q.len() / d)) {
            (8, 16) => narrow_head_fwd::<T, 16, 8, 16>(q, k, v, o, s),
            (8, 32) => narrow_head_fwd::<T, 32, 8, 32>(q, k, v, o, s),
            (8, 64) => narrow_head_fwd::<T, 64, 8, 32>(q, k, v, o, s),
            (8, _) => narrow_head_fwd::<T, 128, 8, 32>(q, k, v, o, s),
            (16, 16) => narrow_head_fwd::<T, 16, 16, 16>(q, k, v, o, s),
            (16, 32) => narrow_head_fwd::<T, 32, 16, 16>(q, k, v, o, s),
            (16, 64) => narrow_head_fwd::<T, 64, 16, 16>(q, k, v, o, s),
            (16, _) => narrow_head_fwd::<T, 128, 16, 16>(q, k, v, o, s),
            _ => unreachable!("narrow heads are 8 or 16 wide"),
        }
    }
}

multiversion! {
    /// [`narrow_head_bwd`] for `d` = 8 or 16 and its block and sub-block sizes.
    fn narrow_bwd<T: Real>(
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        dout: &[T],
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
        d: usize,
        scale: f64,
    ) {
        let s = T::from_f64(scale);
        match (d, block_rows(q.len() / d)) {
            (8, 16) => narrow_head_bwd::<T, 16, 8, 16, 4>(q, k, v, o, dout, dq, dk, dv, s),
            (8, 32) => narrow_head_bwd::<T, 32, 8, 32, 4>(q, k, v, o, dout, dq, dk, dv, s),
            (8, 64) => narrow_head_bwd::<T, 64, 8, 32, 4>(q, k, v, o, dout, dq, dk, dv, s),
            (8, _) => narrow_head_bwd::<T, 128, 8, 32, 4>(q, k, v, o, dout, dq, dk, dv, s),
            (16, 16) => narrow_head_bwd::<T, 16, 16, 16, 2>(q, k, v, o, dout, dq, dk, dv, s),
            (16, 32) => narrow_head_bwd::<T, 32, 16, 16, 2>(q, k, v, o, dout, dq, dk, dv, s),
            (16, 64) => narrow_head_bwd::<T, 64, 16, 16, 2>(q, k, v, o, dout, dq, dk, dv, s),
            (16, _) => narrow_head_bwd::<T, 128, 16, 16, 2>(q, k, v, o, dout, dq, dk, dv, s),
            _ => unreachable!("narrow heads are 8 or 16 wide"),
        }
    }
}

/// Whether a head goes to the narrow kernels.
fn attention_is_narrow(d: usize, causal: bool) -> bool {
    (d == 8 || d == 16) && !causal
}

multiversion! {
    /// The backward of [`attention_head_fwd`]: dq (nq, d), dk and dv (nk, d), zero on entry.
    fn attention_head_bwd<T: Real>(
        q: &[T],
        k: &[T],
        v: &[T],
        dout: &[T],
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
        nk: usize,
        d: usize,
        scale: f64,
        causal: bool,
    ) {
        let args = (nk, d, scale, causal);
        match block_rows(q.len() / d) {
            16 => head_bwd::<T, 16>(q, k, v, dout, dq, dk, dv, args),
            32 => head_bwd::<T, 32>(q, k, v, dout, dq, dk, dv, args),
            64 => head_bwd::<T, 64>(q, k, v, dout, dq, dk, dv, args),
            _ => head_bwd::<T, ROWS>(q, k, v, dout, dq, dk, dv, args),
        }
    }
}

/// [`attention_head_bwd`] in blocks of `R` query rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn head_bwd<T: Real, const R: usize>(
    q: &[T],
    k: &[T],
    v: &[T],
    dout: &[T],
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    (nk, d, scale, causal): (usize, usize, f64, bool),
) {
    let scale = T::from_f64(scale);
    let nq = q.len() / d;
    let (mut qt, mut qt_scaled, mut dot) = (
        vec![[T::zero(); R]; d],
        vec![[T::zero(); R]; d],
        vec![[T::zero(); R]; d],
    );
    let (mut pt, mut dst) = (vec![[T::zero(); R]; nk], vec![[T::zero(); R]; nk]);
    for r0 in (0..nq).step_by(R) {
        let rows = (nq - r0).min(R);
        block_transposed(q, r0, d, scale, &mut qt_scaled);
        block_transposed(dout, r0, d, T::one(), &mut dot);
        block_probs(&qt_scaled, k, d, &mut pt, causal.then_some(r0));
        // dp_jr = do_r . v_j; centre_r = sum_j p_jr dp_jr; ds_jr = scale p_jr (dp_jr - centre_r)
        let mut centre = [T::zero(); R];
        for ((ds, p), vj) in dst.iter_mut().zip(&pt).zip(v.chunks(d)) {
            *ds = [T::zero(); R];
            for (doc, &vc) in dot.iter().zip(vj) {
                for r in 0..R {
                    ds[r] += vc * doc[r];
                }
            }
            for r in 0..R {
                centre[r] += p[r] * ds[r];
            }
        }
        for (ds, p) in dst.iter_mut().zip(&pt) {
            for r in 0..R {
                ds[r] = p[r] * (ds[r] - centre[r]) * scale;
            }
        }
        // dv_j += sum_r p_jr do_r; dk_j += sum_r ds_jr q_r
        let (qb, dob) = (&q[r0 * d..][..rows * d], &dout[r0 * d..][..rows * d]);
        match d {
            8 => accumulate_dk_dv::<T, R, 8, 4>(&pt, &dst, qb, dob, dk, dv),
            16 => accumulate_dk_dv::<T, R, 16, 2>(&pt, &dst, qb, dob, dk, dv),
            32 => accumulate_dk_dv::<T, R, 32, 1>(&pt, &dst, qb, dob, dk, dv),
            40 => accumulate_dk_dv::<T, R, 40, 1>(&pt, &dst, qb, dob, dk, dv),
            64 => accumulate_dk_dv::<T, R, 64, 1>(&pt, &dst, qb, dob, dk, dv),
            _ => {
                // The unscaled queries transposed, needed by this path only.
                block_transposed(q, r0, d, T::one(), &mut qt);
                for (j, (p, ds)) in pt.iter().zip(&dst).enumerate() {
                    for c in 0..d {
                        dv[j * d + c] += dot_rows(p, &dot[c]);
                        dk[j * d + c] += dot_rows(ds, &qt[c]);
                    }
                }
            }
        }
        // dq_r = sum_j ds_jr k_j
        for c in 0..d {
            let mut acc = [T::zero(); R];
            for (ds, kj) in dst.iter().zip(k.chunks(d)) {
                let kjc = kj[c];
                for r in 0..R {
                    acc[r] += kjc * ds[r];
                }
            }
            for r in 0..rows {
                dq[(r0 + r) * d + c] = acc[r];
            }
        }
    }
}

/// Scaled dot-product attention: one task per head, whose scores exist only one block of query
/// rows at a time. The backward recomputes them.
#[derive(Debug, Clone, Copy)]
struct AttentionOp {
    scale: f64,
    /// Query i sees keys 0..=i only (a text encoder's self-attention; needs nq = nk).
    causal: bool,
    /// `None`: q, k, v and the output are (B, H, N, d). `Some(h)`: they are (B, N, h * d), head
    /// j in columns j * d..(j + 1) * d, as the projections make and take them; each task then
    /// copies its head's rows in and out, which spares the model four transposes (graph
    /// nodes, each with a backward) per attention.
    token_heads: Option<usize>,
}

/// A task's copies of its head's rows (token layout) and its results.
struct HeadScratch<T> {
    q: Vec<T>,
    o: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    dout: Vec<T>,
    out: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

impl<T> Default for HeadScratch<T> {
    fn default() -> Self {
        let v = Vec::new;
        Self {
            q: v(),
            o: v(),
            k: v(),
            v: v(),
            dout: v(),
            out: v(),
            dk: v(),
            dv: v(),
        }
    }
}

/// `buf` cleared and resized to `len` zeros.
fn zeroed<T: WithDType>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    buf.clear();
    buf.resize(len, T::zero());
    buf
}

impl AttentionOp {
    /// (heads in all, nq, nk, d)
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> Result<(usize, usize, usize, usize)> {
        match (self.token_heads, q, k) {
            (None, &[b, h, nq, d], &[bk, hk, nk, dk])
                if (bk, hk, dk) == (b, h, d) && v == k && nk > 0 && d > 0 =>
            {
                Ok((b * h, nq, nk, d))
            }
            (Some(h), &[b, nq, hd], &[bk, nk, hdk])
                if (bk, hdk) == (b, hd) && v == k && nk > 0 && h > 0 && hd % h == 0 =>
            {
                Ok((b * h, nq, nk, hd / h))
            }
            _ => bail!(
                "attention ({:?} heads in the token layout): q {q:?}, k {k:?}, v {v:?}",
                self.token_heads
            ),
        }
    }

    /// Head `g`'s `n` rows of `d` values in `x`: a slice of `x` in the (B, H, N, d) layout, a
    /// copy into `buf` in the token layout.
    fn head<'a, T: WithDType>(
        &self,
        x: &'a [T],
        g: usize,
        (n, d): (usize, usize),
        buf: &'a mut Vec<T>,
    ) -> &'a [T] {
        match self.token_heads {
            None => &x[g * n * d..][..n * d],
            Some(h) => {
                let (b, j) = (g / h, g % h);
                let rows = x[b * n * h * d..][..n * h * d].chunks_exact(h * d);
                let rows = rows.map(|row| &row[j * d..][..d]);
                buf.clear();
                // Narrow heads' rows as fixed-size copies (a memcpy call per 8-value row
                // cost more than the copy).
                match d {
                    8 => rows.for_each(|row| buf.extend_from_slice(window::<T, 8>(row, 0))),
                    16 => rows.for_each(|row| buf.extend_from_slice(window::<T, 16>(row, 0))),
                    _ => rows.for_each(|row| buf.extend_from_slice(row)),
                }
                buf
            }
        }
    }

    /// Writes head `g`'s rows (`n` x `d`) into its place in `out`, a whole output of this
    /// layout.
    ///
    /// # Safety
    /// `out` points to `n * d` values per head for all heads, and no other task writes head
    /// `g`'s place while this runs.
    unsafe fn put_head<T: WithDType>(
        &self,
        rows: &[T],
        out: SendPtr<T>,
        g: usize,
        (n, d): (usize, usize),
    ) {
        let out = out.get();
        match self.token_heads {
            None => std::ptr::copy_nonoverlapping(rows.as_ptr(), out.add(g * n * d), n * d),
            Some(h) => {
                let (b, j) = (g / h, g % h);
                for (r, row) in rows.chunks_exact(d).enumerate() {
                    let at = out.add(((b * n + r) * h + j) * d);
                    match d {
                        8 => (at as *mut [T; 8]).write_unaligned(*window::<T, 8>(row, 0)),
                        16 => (at as *mut [T; 16]).write_unaligned(*window::<T, 16>(row, 0)),
                        _ => std::ptr::copy_nonoverlapping(row.as_ptr(), at, d),
                    }
                }
            }
        }
    }

    fn fwd_impl<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        (heads, nq, nk, d): (usize, usize, usize, usize),
    ) -> Vec<T> {
        let mut o = zeros(q.len());
        let out = SendPtr(o.as_mut_ptr());
        (0..heads)
            .into_par_iter()
            .for_each_init(HeadScratch::<T>::default, |s, g| {
                let hq = self.head(q, g, (nq, d), &mut s.q);
                let hk = self.head(k, g, (nk, d), &mut s.k);
                let hv = self.head(v, g, (nk, d), &mut s.v);
                let ho = zeroed(&mut s.out, nq * d);
                if attention_uses_gemm(nq, nk, d) {
                    attention_head_fwd_gemm(hq, hk, hv, ho, nk, d, self.scale, self.causal);
                } else if attention_is_narrow(d, self.causal) {
                    narrow_fwd(hq, hk, hv, ho, d, self.scale);
                } else {
                    attention_head_fwd(hq, hk, hv, ho, nk, d, self.scale, self.causal);
                }
                // SAFETY: `o` holds every head's rows; head g is this task's alone.
                unsafe { self.put_head(ho, out, g, (nq, d)) };
            });
        o
    }

    /// (dq, dk, dv); `o` is the forward's output.
    #[allow(clippy::too_many_arguments)]
    fn bwd_impl<T: Real>(
        &self,
        q: &[T],
        k: &[T],
        v: &[T],
        o: &[T],
        dout: &[T],
        (heads, nq, nk, d): (usize, usize, usize, usize),
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let mut dq = zeros(q.len());
        let mut dk = zeros(k.len());
        let mut dv = zeros(v.len());
        let ptrs = (
            SendPtr(dq.as_mut_ptr()),
            SendPtr(dk.as_mut_ptr()),
            SendPtr(dv.as_mut_ptr()),
        );
        (0..heads)
            .into_par_iter()
            .for_each_init(HeadScratch::<T>::default, |s, g| {
                let hq = self.head(q, g, (nq, d), &mut s.q);
                let hk = self.head(k, g, (nk, d), &mut s.k);
                let hv = self.head(v, g, (nk, d), &mut s.v);
                let hdo = self.head(dout, g, (nq, d), &mut s.dout);
                let hdq = zeroed(&mut s.out, nq * d);
                let hdk = zeroed(&mut s.dk, nk * d);
                let hdv = zeroed(&mut s.dv, nk * d);
                if attention_is_narrow(d, self.causal) {
                    let ho = self.head(o, g, (nq, d), &mut s.o);
                    narrow_bwd(hq, hk, hv, ho, hdo, hdq, hdk, hdv, d, self.scale);
                } else {
                    attention_head_bwd(
                        hq,
                        hk,
                        hv,
                        hdo,
                        hdq,
                        hdk,
                        hdv,
                        nk,
                        d,
                        self.scale,
                        self.causal,
                    );
                }
                let (pq, pk, pv) = ptrs;
                // SAFETY: dq, dk and dv hold every head's rows; head g is this task's alone.
                unsafe {
                    self.put_head(hdq, pq, g, (nq, d));
                    self.put_head(hdk, pk, g, (nk, d));
                    self.put_head(hdv, pv, g, (nk, d));
                }
            });
        (dq, dk, dv)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql.dims(), kl.dims(), vl.dims())?;
        dispatch!(self.name(), qs, T => {
            let q = slice::<T>(qs, ql, self.name())?;
            let k = slice::<T>(ks, kl, self.name())?;
            let v = slice::<T>(vs, vl, self.name())?;
            Ok(storage(self.fwd_impl(q, k, v, dims), ql.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _profile = crate::profile::scope("attention backward", q.device());
        let dims = self.dims(q.dims(), k.dims(), v.dims())?;
        let (dq, dk, dv) = dispatch_dtype!(self.name(), q.dtype(), T => {
            with_data::<T, _>(&[q, k, v, res, grad], |t| {
                let (dq, dk, dv) = self.bwd_impl(t[0], t[1], t[2], t[3], t[4], dims);
                Ok((
                    cpu_tensor(dq, q.shape())?,
                    cpu_tensor(dk, k.shape())?,
                    cpu_tensor(dv, v.shape())?,
                ))
            })?
        });
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

fn apply_attention(q: &Tensor, k: &Tensor, v: &Tensor, op: AttentionOp) -> Result<Tensor> {
    if op.causal && q.dims() != k.dims() {
        bail!(
            "causal attention: q {:?} and k {:?} differ",
            q.dims(),
            k.dims()
        )
    }
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// softmax(scale · q kᵀ) v for `q` (B, H, Nq, d), `k`, `v` (B, H, Nk, d), as one graph node
/// that never holds more than a block of scores per head. Requires [`applies`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = AttentionOp {
        scale,
        causal: false,
        token_heads: None,
    };
    apply_attention(q, k, v, op)
}

/// [`attention`] where query i sees only keys 0..=i (CLIP's causal self-attention): the same
/// as adding a mask of -inf above the diagonal to the scores. Requires [`applies`] and
/// nq = nk.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let op = AttentionOp {
        scale,
        causal: true,
        token_heads: None,
    };
    apply_attention(q, k, v, op)
}

/// [`attention`] (or [`causal_attention`]) over `heads` heads of tokens: `q` (B, Nq, heads * d),
/// `k`, `v` (B, Nk, heads * d), head j in columns j * d..(j + 1) * d; returns (B, Nq, heads * d),
/// ready for the output projection. Requires [`applies`].
pub fn attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    causal: bool,
) -> Result<Tensor> {
    let op = AttentionOp {
        scale,
        causal,
        token_heads: Some(heads),
    };
    apply_attention(q, k, v, op)
}

// ---------------------------------------------------------------------------------------------
// GEGLU: value * gelu(gate) on the two halves of the last dimension
// ---------------------------------------------------------------------------------------------

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

multiversion! {
    /// Rows of `h` (2 * inner: value, gate) -> rows of `out` (inner): value * gelu_erf(gate).
    fn geglu_fwd<T: Real>(h: &[T], out: &mut [T], inner: usize) {
        let half = T::from_f64(0.5);
        let inv_sqrt2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
        for (o, h) in out.chunks_mut(inner).zip(h.chunks(2 * inner)) {
            let (value, gate) = h.split_at(inner);
            for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate) {
                *o = v * (half * g * (T::one() + (g * inv_sqrt2).erf()));
            }
        }
    }
}

multiversion! {
    /// The backward of [`geglu_fwd`]: d value = dy gelu(gate), d gate = dy value gelu'(gate).
    fn geglu_bwd<T: Real>(h: &[T], dy: &[T], dh: &mut [T], inner: usize) {
        let half = T::from_f64(0.5);
        let inv_sqrt2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
        let c = T::from_f64(FRAC_1_SQRT_2PI);
        for ((o, h), dy) in dh.chunks_mut(2 * inner).zip(h.chunks(2 * inner)).zip(dy.chunks(inner)) {
            let (value, gate) = h.split_at(inner);
            let (d_value, d_gate) = o.split_at_mut(inner);
            let inputs = value.iter().zip(gate).zip(dy);
            for ((dv, dg), ((&v, &g), &gy)) in d_value.iter_mut().zip(d_gate).zip(inputs) {
                let cdf = half * (T::one() + (g * inv_sqrt2).erf());
                let pdf = c * (T::zero() - half * g * g).exp();
                *dv = gy * g * cdf;
                *dg = gy * v * (cdf + g * pdf);
            }
        }
    }
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let last = *dims.last().unwrap_or(&0);
        if !last.is_multiple_of(2) {
            bail!("geglu: last dimension of {dims:?} is odd")
        }
        let inner = last / 2;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = inner;
        dispatch!(self.name(), s, T => {
            let h = slice::<T>(s, l, self.name())?;
            let mut out = zeros(h.len() / 2);
            out.par_chunks_mut(inner * ROWS_PER_TASK)
                .zip(h.par_chunks(2 * inner * ROWS_PER_TASK))
                .for_each(|(out, h)| geglu_fwd(h, out, inner));
            Ok(storage(out, out_dims))
        })
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _profile = crate::profile::scope("geglu backward", h.device());
        let inner = h.dim(D::Minus1)? / 2;
        let dh = dispatch_dtype!(self.name(), h.dtype(), T => {
            with_data::<T, _>(&[h, grad], |t| {
                let mut dh = zeros(t[0].len());
                dh.par_chunks_mut(2 * inner * ROWS_PER_TASK)
                    .zip(t[0].par_chunks(2 * inner * ROWS_PER_TASK))
                    .zip(t[1].par_chunks(inner * ROWS_PER_TASK))
                    .for_each(|((dh, h), dy)| geglu_bwd(h, dy, dh, inner));
                cpu_tensor(dh, h.shape())
            })?
        });
        Ok(Some(dh))
    }
}

/// diffusers' GEGLU on `h` (..., 2 * inner): first half * gelu_erf(second half). Requires
/// [`applies`].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1(Geglu)
}

// ---------------------------------------------------------------------------------------------
// Quick GELU: x * sigmoid(1.702 x), OpenAI CLIP's activation
// ---------------------------------------------------------------------------------------------

const QUICK_GELU_ALPHA: f64 = 1.702;

multiversion! {
    /// `out = x * sigmoid(1.702 x)`.
    fn quick_gelu_fwd<T: Real>(x: &[T], out: &mut [T]) {
        let alpha = T::from_f64(QUICK_GELU_ALPHA);
        for (o, &x) in out.iter_mut().zip(x) {
            *o = x / (T::one() + (T::zero() - alpha * x).exp());
        }
    }
}

multiversion! {
    /// `dx = dy (s + 1.702 x s (1 - s))` with `s = sigmoid(1.702 x)`.
    fn quick_gelu_bwd<T: Real>(x: &[T], dy: &[T], dx: &mut [T]) {
        let alpha = T::from_f64(QUICK_GELU_ALPHA);
        for ((d, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let s = T::one() / (T::one() + (T::zero() - alpha * x).exp());
            *d = dy * (s + alpha * x * s * (T::one() - s));
        }
    }
}

struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "fused-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            let mut out = zeros(x.len());
            out.par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(x.par_chunks(ELEMENTS_PER_TASK))
                .for_each(|(out, x)| quick_gelu_fwd(x, out));
            Ok(storage(out, l.shape().clone()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _profile = crate::profile::scope("quick gelu backward", x.device());
        let dx = dispatch_dtype!(self.name(), x.dtype(), T => {
            with_data::<T, _>(&[x, grad], |t| {
                let mut dx = zeros(t[0].len());
                dx.par_chunks_mut(ELEMENTS_PER_TASK)
                    .zip(t[0].par_chunks(ELEMENTS_PER_TASK))
                    .zip(t[1].par_chunks(ELEMENTS_PER_TASK))
                    .for_each(|((dx, x), dy)| quick_gelu_bwd(x, dy, dx));
                cpu_tensor(dx, x.shape())
            })?
        });
        Ok(Some(dx))
    }
}

/// `x * sigmoid(1.702 x)` in one parallel pass (candle's three ops ran one after another on
/// one thread, 6% of a text encoding). Requires [`applies`].
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(QuickGelu)
}

// ---------------------------------------------------------------------------------------------
// Transposes: (A, P, Q, R) -> (A, Q, P, R)
// ---------------------------------------------------------------------------------------------

/// Swaps the two middle dimensions of contiguous data viewed as (A, P, Q, R).
#[derive(Debug, Clone, Copy)]
struct Swap {
    a: usize,
    p: usize,
    q: usize,
    r: usize,
}

impl Swap {
    fn back(&self) -> Self {
        Self {
            a: self.a,
            p: self.q,
            q: self.p,
            r: self.r,
        }
    }

    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let Self { p, q, r, .. } = *self;
        let mut out = zeros(x.len());
        if x.is_empty() {
            return out;
        }
        if r >= 16 {
            // Whole runs of r values move: one task per output (a, q) row of p runs.
            out.par_chunks_mut(p * r).enumerate().for_each(|(i, dst)| {
                let (ai, qi) = (i / q, i % q);
                for (pi, d) in dst.chunks_mut(r).enumerate() {
                    d.copy_from_slice(&x[((ai * p + pi) * q + qi) * r..][..r]);
                }
            });
            return out;
        }
        out.par_chunks_mut(p * q * r)
            .zip(x.par_chunks(p * q * r))
            .for_each(|(out, x)| {
                if r == 1 {
                    // Tiled so that reads stay in a few cache lines while writes stream.
                    const TILE: usize = 16;
                    for q0 in (0..q).step_by(TILE) {
                        let q1 = (q0 + TILE).min(q);
                        for pi in 0..p {
                            let row = &x[pi * q..];
                            for qi in q0..q1 {
                                out[qi * p + pi] = row[qi];
                            }
                        }
                    }
                } else {
                    for pi in 0..p {
                        for qi in 0..q {
                            out[(qi * p + pi) * r..][..r]
                                .copy_from_slice(&x[(pi * q + qi) * r..][..r]);
                        }
                    }
                }
            });
        out
    }
}

/// [`Swap`] as a graph node whose output has the shape `out`; its backward swaps back.
struct SwapOp {
    swap: Swap,
    out: Shape,
}

impl CustomOp1 for SwapOp {
    fn name(&self) -> &'static str {
        "swap-dims"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Swap { a, p, q, r } = self.swap;
        if l.shape().elem_count() != a * p * q * r || self.out.elem_count() != a * p * q * r {
            bail!("swap-dims: input {:?} as {:?}", l.dims(), (a, p, q, r))
        }
        dispatch!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            Ok(storage(self.swap.run(x), self.out.clone()))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _profile = crate::profile::scope("transpose backward", arg.device());
        let back = SwapOp {
            swap: self.swap.back(),
            out: arg.shape().clone(),
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// Views `x` as (A, P, Q, R), swaps P and Q, and returns the result with shape `out`: one node
/// for what would be reshape, transpose, copy, reshape. Requires [`applies`].
pub fn swap_dims(
    x: &Tensor,
    view: (usize, usize, usize, usize),
    out: impl Into<Shape>,
) -> Result<Tensor> {
    let (a, p, q, r) = view;
    x.contiguous()?.apply_op1(SwapOp {
        swap: Swap { a, p, q, r },
        out: out.into(),
    })
}

// ---------------------------------------------------------------------------------------------
// Linear layer as one node
// ---------------------------------------------------------------------------------------------

/// The width of the column slabs that [`LinearOp::fwd`] hands to the workers, or None for
/// gemm's own parallel split. With few rows gemm splits the rows, so that every worker packs the
/// whole weight: on CLIP-L's layers (154 rows) 155-250 GFLOP/s on two threads, against
/// 290-320 with the columns split (and the SD U-Net's deepest layers at 512x512, 512 rows of
/// k = 5120: 261 -> 288). With thousands of rows gemm's split is as fast or faster (8192 rows
/// of 320: 333 against 314). Slabs are multiples of 64 columns (gemm's widest kernel), about
/// two per worker, and at least 128 wide.
fn linear_column_parts(m: usize, n: usize, threads: usize) -> Option<usize> {
    const MAX_ROWS: usize = 4096;
    const MIN_WIDTH: usize = 128;
    if threads < 2 || m >= MAX_ROWS || n < 2 * MIN_WIDTH {
        return None;
    }
    let parts = (2 * threads).min(n / MIN_WIDTH);
    Some((n.div_ceil(parts)).next_multiple_of(64))
}

/// `x @ w^T + b` over the last dimension of `x`; one GEMM forward, two (and a row sum) backward.
/// The weight is PyTorch's (out, in), or with `weight_kn` the same weight stored transposed,
/// (in, out) row-major, which the GEMM reads with unit stride (see [`linear_kn`]).
struct LinearOp {
    weight_kn: bool,
}

impl LinearOp {
    /// One GEMM straight on the input and weight slices: wrapping them in tensors for candle's
    /// `matmul` copied the whole weight on every call (CLIP-L: 0.5 GB per text encoding, 12% of
    /// its profile). The bias, when there is one, is written first and the GEMM adds onto it.
    ///
    /// With few rows (see [`linear_column_parts`]) the workers each take a slab of output
    /// columns, one single-threaded GEMM apiece, instead of gemm's own split: each then packs
    /// only its share of the weight.
    fn fwd<T: WithDType>(&self, x: &[T], w: &[T], b: Option<&[T]>, k: usize) -> Result<Vec<T>> {
        let n = w.len() / k;
        let m = x.len() / k;
        if n == 0 || m == 0 {
            return Ok(vec![T::zero(); m * n]);
        }
        let mut out = match b {
            Some(b) => repeated_rows(b, m),
            None => zeros(m * n),
        };
        let threads = rayon::current_num_threads();
        // The GEMM of output columns j0..j0 + nj: w^T's columns as (column, row) strides, (n, k)
        // read with strides (k, 1), or (k, n) as stored.
        let columns = |dst: SendPtr<T>, j0: usize, nj: usize, parallelism: gemm::Parallelism| {
            let (w_at, w_cs, w_rs) = if self.weight_kn {
                (j0, 1, n as isize)
            } else {
                (j0 * k, k as isize, 1)
            };
            // SAFETY: `dst` is `out`, (m, n) row-major, and j0 + nj <= n; `x` is (m, k) and `w`
            // n * k long, row-major; with the strides above, `w` from `w_at` on is read as the
            // (k, nj) block of w^T. Callers give each GEMM columns of its own.
            unsafe {
                gemm::gemm(
                    m,
                    nj,
                    k,
                    dst.get().add(j0),
                    1,
                    n as isize,
                    b.is_some(),
                    x.as_ptr(),
                    1,
                    k as isize,
                    w.as_ptr().add(w_at),
                    w_cs,
                    w_rs,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    parallelism,
                )
            }
        };
        let dst = SendPtr(out.as_mut_ptr());
        match linear_column_parts(m, n, threads) {
            Some(width) => (0..n.div_ceil(width)).into_par_iter().for_each(|p| {
                let j0 = p * width;
                columns(dst, j0, width.min(n - j0), gemm::Parallelism::None)
            }),
            None => columns(dst, 0, n, gemm_threads(threads)),
        }
        Ok(out)
    }

    fn out_shape(&self, xl: &Layout, wl: &Layout) -> Result<(Shape, usize)> {
        let (n, k) = match wl.shape().dims2()? {
            (k, n) if self.weight_kn => (n, k),
            nk => nk,
        };
        let dims = xl.dims();
        if dims.last() != Some(&k) {
            bail!("linear: input {dims:?} for weight {:?}", wl.dims())
        }
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = n;
        Ok((out.into(), k))
    }

    /// (dx, dw, db) for `grad` of the output; dw in the weight's own layout.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        bias: bool,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let k = *x.dims().last().unwrap_or(&0);
        dispatch_dtype!("linear-bwd", x.dtype(), T => {
            let (dx, dw, db) = with_data::<T, _>(&[x, w, grad], |d| {
                Ok(self.bwd_slices(d[0], d[1], d[2], k, bias))
            })?;
            let dx = cpu_tensor(dx, x.shape())?;
            let dw = cpu_tensor(dw, w.shape())?;
            let db = db
                .map(|db| {
                    let len = db.len();
                    cpu_tensor(db, len)
                })
                .transpose()?;
            Ok((dx, dw, db))
        })
    }

    /// The backward pass as GEMMs on the slices: dx = dy w, and dw = dy^T x (or x^T dy where
    /// the weight is stored (k, n)) with db = the column sums of dy. A training step's layers
    /// have thousands of rows and a few dozen to hundreds of channels: gemm parallelises over
    /// its output, which for dw is then too small to share, so tall inputs are split into row
    /// blocks, one per worker, whose partial sums are added at the end. (candle's `matmul` did
    /// dw in one GEMM and zero-filled every output on one thread first.)
    fn bwd_slices<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        dy: &[T],
        k: usize,
        bias: bool,
    ) -> (Vec<T>, Vec<T>, Option<Vec<T>>) {
        let n = w.len() / k.max(1);
        let m = x.len() / k.max(1);
        let threads = rayon::current_num_threads();
        // w as the (n, k) matrix in (column, row) strides: stored (n, k), or (k, n) read
        // transposed.
        let (w_cs, w_rs) = if self.weight_kn {
            (n as isize, 1)
        } else {
            (1, k as isize)
        };
        let mut dx = zeros(m * k);
        if m * n * k > 0 {
            // SAFETY: dx is (m, k), dy (m, n), both row-major, and w (n, k) with the strides
            // above.
            unsafe {
                gemm::gemm(
                    m,
                    k,
                    n,
                    dx.as_mut_ptr(),
                    1,
                    k as isize,
                    false,
                    dy.as_ptr(),
                    1,
                    n as isize,
                    w.as_ptr(),
                    w_cs,
                    w_rs,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    gemm_threads(threads),
                )
            }
        }
        // Rows r0..r1's share of dw (in its stored layout) and db.
        let partial = |(r0, r1): (usize, usize), parallelism: gemm::Parallelism| {
            let mut dw = vec![T::zero(); n * k];
            let mut db = vec![T::zero(); if bias { n } else { 0 }];
            let rows = r1 - r0;
            let (x, dy) = (&x[r0 * k..r1 * k], &dy[r0 * n..r1 * n]);
            if rows * n * k > 0 {
                // dw (n, k) = dy^T x, dy^T read from dy with strides (n, 1); or dw (k, n) =
                // x^T dy, x^T read from x with strides (k, 1).
                let (dst_m, dst_n, lhs, lhs_cs, rhs, rhs_rs) = if self.weight_kn {
                    (k, n, x, k, dy, n)
                } else {
                    (n, k, dy, n, x, k)
                };
                // SAFETY: dw is (dst_m, dst_n) row-major; lhs is (dst_m, rows) with the
                // strides above and rhs (rows, dst_n) row-major, both within the row block.
                unsafe {
                    gemm::gemm(
                        dst_m,
                        dst_n,
                        rows,
                        dw.as_mut_ptr(),
                        1,
                        dst_n as isize,
                        false,
                        lhs.as_ptr(),
                        lhs_cs as isize,
                        1,
                        rhs.as_ptr(),
                        1,
                        rhs_rs as isize,
                        T::zero(),
                        T::one(),
                        false,
                        false,
                        false,
                        parallelism,
                    )
                }
            }
            for row in dy.chunks_exact(n.max(1)) {
                db.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
            }
            (dw, db)
        };
        // Tall and narrow: row blocks per worker; otherwise one GEMM shared by the workers.
        let (dw, db) = if threads > 1 && m >= 4 * n.max(k) {
            let block = m.div_ceil(threads);
            (0..threads)
                .into_par_iter()
                .map(|i| {
                    let rows = ((i * block).min(m), ((i + 1) * block).min(m));
                    partial(rows, gemm::Parallelism::None)
                })
                .reduce_with(|(dw1, db1), (dw2, db2)| (add_into(dw1, dw2), add_into(db1, db2)))
                .unwrap_or_else(|| partial((0, 0), gemm::Parallelism::None))
        } else {
            partial((0, m), gemm_threads(threads))
        };
        (dx, dw, bias.then_some(db))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, k) = self.out_shape(xl, wl)?;
        dispatch!("fused-linear", xs, T => {
            let x = slice::<T>(xs, xl, "fused-linear")?;
            let w = slice::<T>(ws, wl, "fused-linear")?;
            Ok(storage(self.fwd(x, w, None, k)?, shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _profile = crate::profile::scope("linear backward", x.device());
        let (dx, dw, _) = self.bwd(x, w, grad, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (shape, k) = self.out_shape(xl, wl)?;
        dispatch!("fused-linear", xs, T => {
            let x = slice::<T>(xs, xl, "fused-linear")?;
            let w = slice::<T>(ws, wl, "fused-linear")?;
            let b = slice::<T>(bs, bl, "fused-linear")?;
            Ok(storage(self.fwd(x, w, Some(b), k)?, shape))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _profile = crate::profile::scope("linear backward", x.device());
        let (dx, dw, db) = self.bwd(x, w, grad, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// `x @ weight^T + bias` over the last dimension of `x` (any rank), as one graph node.
/// Requires [`applies`].
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_op(x, weight, bias, LinearOp { weight_kn: false })
}

/// [`linear`] with the weight stored transposed: `weight_t` is (in, out), row-major. The GEMM
/// reads it with unit stride instead of gathering PyTorch's (out, in) rows; where few input rows
/// meet a large weight (a text encoder's 77 tokens per prompt) packing the weight was a third of
/// the GEMM's time. Requires [`applies`].
pub fn linear_kn(x: &Tensor, weight_t: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_op(x, weight_t, bias, LinearOp { weight_kn: true })
}

fn linear_op(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, op: LinearOp) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op),
        None => x.apply_op2(&w, op),
    }
}

/// `w` (rows, cols) as (cols, rows), row-major: for [`linear_kn`]'s weights, made once at load.
/// candle's strided copy walks the source a column at a time (0.7 s for CLIP-L's linear
/// weights on 2 cores); this copies tiles of 32 source columns, each task writing 32 whole
/// output rows. Requires [`applies`]; no backward (for frozen weights).
pub fn transpose_2d(w: &Tensor) -> Result<Tensor> {
    w.contiguous()?.apply_op1_no_bwd(&Transpose2d)
}

struct Transpose2d;

impl CustomOp1 for Transpose2d {
    fn name(&self) -> &'static str {
        "transpose-2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        const TILE: usize = 32;
        let (rows, cols) = l.shape().dims2()?;
        dispatch!("transpose-2d", s, T => {
            let w = slice::<T>(s, l, "transpose-2d")?;
            // Allocated on a rayon worker: the loader read the weights on the workers, and glibc
            // returns a freed block to the arena of the thread that allocated it, so the copy
            // reuses the memory of the layers transposed before it instead of growing the heap.
            let (out, ()) = rayon::join(
                || {
                    let mut out = vec![T::from_f64(0.0); rows * cols];
                    if rows > 0 {
                        out.par_chunks_mut(TILE * rows)
                            .enumerate()
                            .for_each(|(tile, block)| {
                                let c0 = tile * TILE;
                                let width = block.len() / rows;
                                for (r, src) in w.chunks_exact(cols).enumerate() {
                                    for (c, &v) in src[c0..c0 + width].iter().enumerate() {
                                        block[c * rows + r] = v;
                                    }
                                }
                            });
                    }
                    out
                },
                || (),
            );
            Ok(storage(out, (cols, rows)))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Convolution as im2col + one GEMM, as one node
// ---------------------------------------------------------------------------------------------

/// Geometry of a 2D convolution over (B, C, H, W) with a (kh, kw) kernel.
#[derive(Debug, Clone, Copy)]
struct ConvGeom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    /// top, bottom, left, right
    pad: [usize; 4],
}

impl ConvGeom {
    fn out_hw(&self) -> (usize, usize) {
        let oh = (self.h + self.pad[0] + self.pad[1] - self.kh) / self.stride + 1;
        let ow = (self.w + self.pad[2] + self.pad[3] - self.kw) / self.stride + 1;
        (oh, ow)
    }

    /// A 1x1 convolution with stride 1 and no padding over images of at least 64 pixels: a
    /// GEMM per image on its planes as they lie. (Smaller images go side by side through
    /// im2col, whose wider GEMMs suit the GEMM's 64-pixel kernels better.)
    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride == 1
            && self.pad == [0; 4]
            && self.h * self.w >= 64
    }

    /// The output columns `ox` whose input column `ox * stride + kx - pad_left` is inside.
    fn valid_ox(&self, kx: usize, ow: usize) -> std::ops::Range<usize> {
        let s = self.stride as isize;
        let off = kx as isize - self.pad[2] as isize;
        // ox * s + off >= 0  and  ox * s + off <= w - 1
        let lo = if off >= 0 { 0 } else { (-off + s - 1) / s };
        let hi_num = self.w as isize - 1 - off;
        let hi = if hi_num < 0 { 0 } else { hi_num / s + 1 };
        (lo as usize).min(ow)..(hi as usize).min(ow)
    }

    /// The input row for output row `oy` and kernel row `ky`, if inside.
    fn in_y(&self, oy: usize, ky: usize) -> Option<usize> {
        let iy = (oy * self.stride + ky) as isize - self.pad[0] as isize;
        (iy >= 0 && (iy as usize) < self.h).then_some(iy as usize)
    }

    /// Fills `dst` (one output row, `ow` values) with the input values under kernel tap
    /// (`ky`, `kx`) of input plane `src_plane` for output row `oy`, zero in the padding.
    fn tap_row<T: WithDType>(
        &self,
        src_plane: &[T],
        ky: usize,
        kx: usize,
        oy: usize,
        dst: &mut [T],
    ) {
        let Some(iy) = self.in_y(oy, ky) else {
            dst.fill(T::zero());
            return;
        };
        let range = self.valid_ox(kx, dst.len());
        dst[..range.start].fill(T::zero());
        dst[range.end..].fill(T::zero());
        let src = &src_plane[iy * self.w..][..self.w];
        let ix0 = range.start * self.stride + kx - self.pad[2];
        if self.stride == 1 {
            dst[range.clone()].copy_from_slice(&src[ix0..][..range.len()]);
        } else {
            for (d, &v) in dst[range]
                .iter_mut()
                .zip(src[ix0..].iter().step_by(self.stride))
            {
                *d = v;
            }
        }
    }

    /// The im2col block of output rows `oy0..oy1` of `count` images from image `b0`:
    /// (C·kh·kw, count·(oy1 - oy0)·ow), the images side by side in each row, written over `out`
    /// (a reused buffer of that size).
    fn im2col_block<T: WithDType>(
        &self,
        x: &[T],
        (b0, count): (usize, usize),
        (oy0, oy1): (usize, usize),
        out: &mut [T],
    ) {
        let (_, ow) = self.out_hw();
        // Const widths turn each row's copy into a few vector moves (a call to memcpy per row
        // of 16 values, and the edge tests, were most of im2col's time).
        let band = ((b0, count), (oy0, oy1));
        match (self.stride, ow) {
            (1, 4) => return self.im2col_padded::<T, 1, 4>(x, band.0, band.1, out),
            (1, 8) => return self.im2col_padded::<T, 1, 8>(x, band.0, band.1, out),
            (1, 16) => return self.im2col_padded::<T, 1, 16>(x, band.0, band.1, out),
            (1, 32) => return self.im2col_padded::<T, 1, 32>(x, band.0, band.1, out),
            (1, _) => return self.im2col_padded::<T, 1, 0>(x, band.0, band.1, out),
            (2, 4) => return self.im2col_padded::<T, 2, 4>(x, band.0, band.1, out),
            (2, 8) => return self.im2col_padded::<T, 2, 8>(x, band.0, band.1, out),
            (2, 16) => return self.im2col_padded::<T, 2, 16>(x, band.0, band.1, out),
            (2, _) => return self.im2col_padded::<T, 2, 0>(x, band.0, band.1, out),
            _ => {}
        }
        let plane = self.h * self.w;
        let per_image = (oy1 - oy0) * ow;
        for (k, dst) in out.chunks_exact_mut(count * per_image).enumerate() {
            let (c, ky, kx) = (k / (self.kh * self.kw), k / self.kw % self.kh, k % self.kw);
            for (b, dst) in (b0..b0 + count).zip(dst.chunks_exact_mut(per_image)) {
                let src_plane = &x[(b * self.c + c) * plane..][..plane];
                for (oy, dst) in (oy0..oy1).zip(dst.chunks_exact_mut(ow)) {
                    self.tap_row(src_plane, ky, kx, oy, dst);
                }
            }
        }
    }

    /// [`Self::im2col_block`] for stride `S`, with `OW` the output width (0: any width). Each
    /// (image, channel) plane's rows for the band are first laid out with their zero padding,
    /// so that every kernel tap's rows are plain copies of `ow` values (every `S`th) from that
    /// buffer.
    fn im2col_padded<T: WithDType, const S: usize, const OW: usize>(
        &self,
        x: &[T],
        (b0, count): (usize, usize),
        (oy0, oy1): (usize, usize),
        out: &mut [T],
    ) {
        let (_, ow) = self.out_hw();
        debug_assert!(self.stride == S && (OW == 0 || OW == ow));
        let [top, _, left, right] = self.pad;
        let (plane, per_image) = (self.h * self.w, (oy1 - oy0) * ow);
        // Padded rows oy0 * S..(oy1 - 1) * S + kh of one plane, each `pw` wide.
        let pw = left + self.w + right;
        let mut padded = Scratch::<T>::new(((oy1 - oy0 - 1) * S + self.kh) * pw);
        let taps = self.kh * self.kw;
        for c in 0..self.c {
            for b in b0..b0 + count {
                let src = &x[(b * self.c + c) * plane..][..plane];
                for (py, row) in (oy0 * S..).zip(padded.chunks_exact_mut(pw)) {
                    match py.checked_sub(top).filter(|&iy| iy < self.h) {
                        Some(iy) => {
                            row[..left].fill(T::zero());
                            row[left..left + self.w].copy_from_slice(&src[iy * self.w..][..self.w]);
                            row[left + self.w..].fill(T::zero());
                        }
                        None => row.fill(T::zero()),
                    }
                }
                for tap in 0..taps {
                    let (ky, kx) = (tap / self.kw, tap % self.kw);
                    let k = c * taps + tap;
                    let dst = &mut out[(k * count + b - b0) * per_image..][..per_image];
                    for (r, dst) in dst.chunks_exact_mut(ow).enumerate() {
                        let src = &padded[(r * S + ky) * pw + kx..];
                        if OW > 0 && S == 1 {
                            let dst: &mut [T; OW] = dst.try_into().expect("OW values");
                            dst.copy_from_slice(&src[..OW]);
                        } else if OW > 0 {
                            let dst: &mut [T; OW] = dst.try_into().expect("OW values");
                            for (ox, d) in dst.iter_mut().enumerate() {
                                *d = src[ox * S];
                            }
                        } else {
                            for (d, &v) in dst.iter_mut().zip(src.iter().step_by(S)) {
                                *d = v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// How many whole images of `plane` output pixels one GEMM should take. At the deep levels
    /// an image has 16-64 pixels, too few for the GEMM's 48-pixel-wide kernels, and every GEMM
    /// call repacks the whole weight (59 MB per call at SD's 4x4 level), so such images go side
    /// by side, up to [`GEMM_PIXELS`], in one wider GEMM per weight pack. Larger groups only
    /// make the im2col block outgrow the cache (eight 16x16 images a GEMM made a training
    /// step's 16x16 convolutions 1.7x slower). `images` are shared out among the workers
    /// first, at two groups each where there are enough.
    fn images_per_gemm(k: usize, plane: usize, images: usize, threads: usize) -> usize {
        let fit = (BAND_VALUES / (k * plane).max(1)).clamp(1, GEMM_PIXELS.div_ceil(plane));
        let per_worker = if images >= 2 * threads {
            images / (2 * threads)
        } else {
            images
        };
        let groups = images.div_ceil(fit.min(per_worker).max(1));
        images.div_ceil(groups)
    }

    /// The adjoint of [`Self::im2col`]: sums each entry back into its input position.
    fn col2im<T: WithDType>(&self, cols: &[T]) -> Vec<T> {
        let (oh, ow) = self.out_hw();
        let n = self.b * oh * ow;
        let mut out = zeros(self.b * self.c * self.h * self.w);
        out.par_chunks_mut(self.h * self.w)
            .enumerate()
            .for_each(|(i, dst)| {
                let (b, c) = (i / self.c, i % self.c);
                for ky in 0..self.kh {
                    for kx in 0..self.kw {
                        let k = (c * self.kh + ky) * self.kw + kx;
                        let range = self.valid_ox(kx, ow);
                        let ix0 = range.start * self.stride + kx - self.pad[2];
                        for oy in 0..oh {
                            let Some(iy) = self.in_y(oy, ky) else {
                                continue;
                            };
                            let src = &cols[k * n + (b * oh + oy) * ow..][..ow];
                            let dst = &mut dst[iy * self.w..][..self.w];
                            let src = &src[range.clone()];
                            if self.stride == 1 {
                                // Unit stride as a plain zip, which vectorises (`step_by` with
                                // a run-time step did not: 5% of a training step).
                                for (d, &v) in dst[ix0..].iter_mut().zip(src) {
                                    *d += v;
                                }
                            } else {
                                for (d, &v) in dst[ix0..].iter_mut().step_by(self.stride).zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
            });
        out
    }
}

/// A 2D convolution node: forward, im2col and a GEMM per band of output rows (see
/// [`ConvOp::fwd`]); the backward recomputes each image's im2col block for the weight's
/// gradient (see [`ConvOp::weight_grad`]) and gets the input's gradient as a transposed
/// convolution (stride 1) or a GEMM and a col2im.
struct ConvOp(ConvGeom);

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Values in one band's im2col block in [`ConvOp::fwd`] (8 MiB of f32): large enough that the
/// GEMM's repacking of the weight per band costs little, small enough to stay in cache.
const BAND_VALUES: usize = 1 << 21;

/// Output pixels (columns) of a convolution's GEMM wide enough that images are not grouped
/// further (see [`ConvGeom::images_per_gemm`]).
const GEMM_PIXELS: usize = 256;

/// `a + b` elementwise, in `a`'s buffer: the workers' partial sums of a weight gradient.
fn add_into<T: WithDType>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    a
}

/// gemm's own parallel split over `threads` workers, or none for one.
fn gemm_threads(threads: usize) -> gemm::Parallelism {
    if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// A pointer that rayon may hand to several workers, for writes to disjoint regions.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

impl<T> SendPtr<T> {
    /// (A method, so that closures capture the whole `SendPtr`, not its raw-pointer field.)
    fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: used only where each worker writes a region of its own (see `ConvOp::fwd`).
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl ConvOp {
    /// The forward pass in bands of output rows: each band's im2col block goes into a buffer
    /// its worker reuses, and one GEMM writes the band's pixels of every output channel in
    /// place. A single im2col matrix of the whole input would be gigabytes at 512x512 (the VAE's
    /// last up block: 512·512·256·9 floats), and a fresh buffer of it costs a page fault per
    /// 4 KiB on every call, which profiles showed as a fifth of a VAE decode.
    fn fwd<T: WithDType>(&self, x: &[T], w: &[T], b: Option<&[T]>) -> Result<(CpuStorage, Shape)> {
        let (oh, ow) = self.0.out_hw();
        let c_out = w.len() / (self.0.c * self.0.kh * self.0.kw);
        Ok(storage(self.fwd_vec(x, w, b), (self.0.b, c_out, oh, ow)))
    }

    /// [`Self::fwd`]'s output values, (B, C_out, OH, OW).
    fn fwd_vec<T: WithDType>(&self, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let k = g.c * g.kh * g.kw;
        let c_out = w.len() / k;
        let dims = (g.b, g.c, g.h, g.w);
        if winograd::applies(dims, (g.kh, g.kw), g.stride, g.pad, false) {
            return winograd::conv3x3(x, w, b, dims, c_out);
        }
        let plane = oh * ow;
        let mut out = filled_planes(g.b * c_out * plane, plane, |i| match b {
            Some(bias) => bias[i % c_out],
            None => T::zero(),
        });
        if g.is_pointwise() {
            // Each image's planes are already its GEMM operand, (C, H·W): no im2col copy.
            let inner = gemm_threads(if g.b >= 2 * rayon::current_num_threads() {
                1
            } else {
                rayon::current_num_threads()
            });
            out.par_chunks_mut(c_out * plane)
                .zip(x.par_chunks(g.c * plane))
                .for_each(|(out, x)| {
                    // SAFETY: out (c_out, plane), w (c_out, c) and x (c, plane), row-major.
                    unsafe {
                        gemm::gemm(
                            c_out,
                            plane,
                            g.c,
                            out.as_mut_ptr(),
                            1,
                            plane as isize,
                            b.is_some(),
                            w.as_ptr(),
                            1,
                            g.c as isize,
                            x.as_ptr(),
                            1,
                            plane as isize,
                            T::one(),
                            T::one(),
                            false,
                            false,
                            false,
                            inner,
                        )
                    }
                });
            return out;
        }
        let mut rows = (BAND_VALUES / (k * ow)).clamp(1, oh);
        // Whole bands of 64 pixels where the image has more rows than a band: the GEMM is
        // vectorised over 64 pixels at a time and runs a narrower, slower kernel on the rest
        // (a band of 11 rows of 16 pixels left 48; 10% of a U-Net step at 256x256 was spent in
        // those kernels).
        let rows_per_64 = 64 / gcd(ow, 64);
        if rows < oh && rows >= rows_per_64 {
            rows -= rows % rows_per_64;
        }
        let threads = rayon::current_num_threads();
        // A band is (first image, images, first output row); several images only when whole
        // images fit.
        let images = if rows == oh {
            ConvGeom::images_per_gemm(k, plane, g.b, threads)
        } else {
            1
        };
        let bands: Vec<(usize, usize, usize)> = (0..g.b)
            .step_by(images)
            .flat_map(|b| {
                let count = images.min(g.b - b);
                (0..oh).step_by(rows).map(move |oy| (b, count, oy))
            })
            .collect();
        // Enough bands keep every core busy with its own; otherwise the GEMMs are parallel.
        let inner = if bands.len() >= 2 * threads {
            gemm::Parallelism::None
        } else {
            gemm::Parallelism::Rayon(threads)
        };
        let dst = SendPtr(out.as_mut_ptr());
        let band = |(cols, product): &mut (Scratch<T>, Scratch<T>),
                    &(b0, count, oy0): &(usize, usize, usize)| {
            let oy1 = (oy0 + rows).min(oh);
            let n = count * (oy1 - oy0) * ow;
            let cols = &mut cols[..k * n];
            g.im2col_block(x, (b0, count), (oy0, oy1), cols);
            // One image: the GEMM adds onto its output rows in place, rows apart by `plane`.
            // Several: their pixels are side by side in the GEMM's columns, which no strides
            // map onto the (B, C_out, OH, OW) output, so it writes `product` and the images'
            // blocks are added onto the output from there.
            let (target, row_stride, read_dst) = if count == 1 {
                // SAFETY: in bounds: image b0's output rows from oy0.
                (
                    unsafe { dst.get().add(b0 * c_out * plane + oy0 * ow) },
                    plane,
                    true,
                )
            } else {
                (product[..c_out * n].as_mut_ptr(), n, false)
            };
            // SAFETY: `target` is either this band's output rows oy0..oy1 of image b0 in every
            // channel (rows apart by `plane`), a region no other band touches, in `out`, which
            // outlives this call; or this worker's own `product` buffer, (c_out, n). `w` is
            // (c_out, k) and `cols` (k, n), both row-major.
            unsafe {
                gemm::gemm(
                    c_out,
                    n,
                    k,
                    target,
                    1,
                    row_stride as isize,
                    read_dst && b.is_some(),
                    w.as_ptr(),
                    1,
                    k as isize,
                    cols.as_ptr(),
                    1,
                    n as isize,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    inner,
                )
            }
            if count > 1 {
                for (i, image) in (b0..b0 + count).enumerate() {
                    for co in 0..c_out {
                        let src = &product[co * n + i * plane..][..plane];
                        // SAFETY: image `image`'s plane of channel `co`, which only this band
                        // writes.
                        let out = unsafe {
                            std::slice::from_raw_parts_mut(
                                dst.get().add((image * c_out + co) * plane),
                                plane,
                            )
                        };
                        out.iter_mut().zip(src).for_each(|(o, &v)| *o += v);
                    }
                }
            }
        };
        let product_len = if images > 1 {
            c_out * images * plane
        } else {
            0
        };
        let buffers = || {
            (
                Scratch::new(k * rows * ow * images),
                Scratch::new(product_len),
            )
        };
        match inner {
            gemm::Parallelism::None => bands.par_iter().for_each_init(buffers, band),
            _ => {
                let mut buffers = buffers();
                bands.iter().for_each(|b| band(&mut buffers, b));
            }
        }
        out
    }

    /// The input gradient of a stride-1 convolution, as the forward pass of another one: the
    /// output gradient `dy` (B, C_out, OH, OW) correlated with the kernel flipped in both axes
    /// and with its two channel axes swapped, padded by kernel size - 1 - the padding. Unlike
    /// the GEMM into a whole (C·kh·kw, B·OH·OW) matrix and its col2im, this runs in the
    /// forward's cache-sized bands and writes dx once.
    fn input_grad_stride1<T: WithDType>(&self, dy: &[T], w: &[T], c_out: usize) -> Vec<T> {
        let g = self.0;
        let (kh, kw) = (g.kh, g.kw);
        let mut flipped = Vec::with_capacity(w.len());
        for ci in 0..g.c {
            for co in 0..c_out {
                for ky in 0..kh {
                    for kx in 0..kw {
                        flipped.push(w[((co * g.c + ci) * kh + kh - 1 - ky) * kw + kw - 1 - kx]);
                    }
                }
            }
        }
        let (oh, ow) = g.out_hw();
        let [top, bottom, left, right] = g.pad;
        let transposed = ConvOp(ConvGeom {
            b: g.b,
            c: c_out,
            h: oh,
            w: ow,
            kh,
            kw,
            stride: 1,
            pad: [kh - 1 - top, kh - 1 - bottom, kw - 1 - left, kw - 1 - right],
        });
        transposed.fwd_vec(dy, &flipped, None)
    }

    /// (dx, dw, db)
    fn bwd_impl(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (c_out, _, kh, kw) = w.dims4()?;
        let k = g.c * kh * kw;
        let n = g.b * oh * ow;
        // Profiled in two parts: their costs differ by level and stride.
        dispatch_dtype!("conv2d-bwd", x.dtype(), T => {
            let profile = crate::profile::scope("conv2d backward: weight", x.device());
            let (dw, db) = with_data::<T, _>(&[grad, x], |d| {
                Ok(self.weight_grad(d[1], d[0], c_out, b.is_some()))
            })?;
            drop(profile);
            let _profile = crate::profile::scope("conv2d backward: input", x.device());
            let pads_fit = g.pad[..2].iter().all(|&p| p < kh) && g.pad[2..].iter().all(|&p| p < kw);
            let dx = if g.stride == 1 && pads_fit {
                with_data::<T, _>(&[grad, w], |d| Ok(self.input_grad_stride1(d[0], d[1], c_out)))?
            } else {
                let grad_t = with_data::<T, _>(&[grad], |d| {
                    let swap = Swap { a: 1, p: g.b, q: c_out, r: oh * ow };
                    cpu_tensor(swap.run(d[0]), (c_out, n))
                })?;
                let dcols = w.reshape((c_out, k))?.t()?.matmul(&grad_t)?;
                with_data::<T, _>(&[&dcols], |d| Ok(g.col2im(d[0])))?
            };
            let dx = cpu_tensor(dx, (g.b, g.c, g.h, g.w))?;
            let dw = cpu_tensor(dw, w.shape())?;
            let db = db.map(|db| cpu_tensor(db, c_out)).transpose()?;
            Ok((dx, dw, db))
        })
    }

    /// The weight's gradient, sum over images of dy (C_out, OH·OW) times the image's im2col
    /// block transposed, and with `bias` the bias's, sum of dy over images and pixels. Each
    /// worker takes a share of the images, makes their im2col blocks one at a time in a buffer
    /// of its own and keeps its own partial sums, added at the end: no im2col matrix of the
    /// whole batch, and dy is used as laid out (a GEMM on the batch needed it transposed to
    /// (C_out, B·OH·OW) first).
    fn weight_grad<T: Real>(
        &self,
        x: &[T],
        dy: &[T],
        c_out: usize,
        bias: bool,
    ) -> (Vec<T>, Option<Vec<T>>) {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        let (plane, k) = (oh * ow, g.c * g.kh * g.kw);
        let threads = rayon::current_num_threads();
        // Fewer images than workers: the GEMMs themselves run in parallel instead.
        let parallelism = if g.b < threads {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // Made as dw, gemm packs the im2col block (k rows n apart) value by value: a sixth of
        // the convolutions' time in a training step. With output channels in whole vectors
        // the GEMM makes dwᵀ instead, its kernels reading dy transposed, a copy of c_out rows
        // per image instead of k: worth it where k is several times c_out (3x3 kernels).
        let by_channel = c_out.is_multiple_of(16) && k >= 4 * c_out;
        let partial = |images: &[usize]| {
            let mut dw = vec![T::zero(); c_out * k];
            let mut db = vec![T::zero(); if bias { c_out } else { 0 }];
            // Images side by side in one GEMM, as in the forward pass (see
            // `images_per_gemm`): the GEMM's inner dimension is their pixels.
            // A pointwise convolution's image is its own im2col block.
            let group = if g.is_pointwise() {
                1
            } else {
                ConvGeom::images_per_gemm(k, plane, images.len(), 1)
            };
            let mut cols = Scratch::<T>::new(if g.is_pointwise() {
                0
            } else {
                k * plane * group
            });
            let mut dy_group = Scratch::<T>::new(if group > 1 || by_channel {
                c_out * plane * group
            } else {
                0
            });
            for chunk in images.chunks(group) {
                let (b0, count) = (chunk[0], chunk.len());
                let n = count * plane;
                let cols: &[T] = if g.is_pointwise() {
                    &x[b0 * k * plane..][..k * n]
                } else {
                    g.im2col_block(x, (b0, count), (0, oh), &mut cols[..k * n]);
                    &cols[..k * n]
                };
                let dy = &dy[b0 * c_out * plane..][..count * c_out * plane];
                if by_channel {
                    // dy transposed, (n, c_out), pixels in the same order as `cols`.
                    let dy_t = &mut dy_group[..n * c_out];
                    for (i, image) in dy.chunks_exact(c_out * plane).enumerate() {
                        for (co, row) in image.chunks_exact(plane).enumerate() {
                            let dst = dy_t[i * plane * c_out + co..].iter_mut().step_by(c_out);
                            dst.zip(row).for_each(|(d, &v)| *d = v);
                        }
                    }
                    // SAFETY: dw is dwᵀ, (k, c_out) row-major, read as (c_out, k) with
                    // strides (1, c_out); dy_t is (n, c_out), read as (c_out, n) likewise;
                    // cols (k, n) row-major, read as (n, k) with strides (1, n).
                    unsafe {
                        gemm::gemm(
                            c_out,
                            k,
                            n,
                            dw.as_mut_ptr(),
                            c_out as isize,
                            1,
                            true,
                            dy_t.as_ptr(),
                            c_out as isize,
                            1,
                            cols.as_ptr(),
                            n as isize,
                            1,
                            T::one(),
                            T::one(),
                            false,
                            false,
                            false,
                            parallelism,
                        )
                    }
                } else {
                    // dy in the same column order as `cols`: (c_out, images side by side).
                    let dy_rows: &[T] = if count == 1 {
                        dy
                    } else {
                        for (i, image) in dy.chunks_exact(c_out * plane).enumerate() {
                            for (co, row) in image.chunks_exact(plane).enumerate() {
                                dy_group[co * n + i * plane..][..plane].copy_from_slice(row);
                            }
                        }
                        &dy_group[..c_out * n]
                    };
                    // SAFETY: dw is (c_out, k), dy_rows (c_out, n) and cols (k, n), all
                    // row-major; cols is read as its transpose (n, k) with strides (1, n).
                    unsafe {
                        gemm::gemm(
                            c_out,
                            k,
                            n,
                            dw.as_mut_ptr(),
                            1,
                            k as isize,
                            true,
                            dy_rows.as_ptr(),
                            1,
                            n as isize,
                            cols.as_ptr(),
                            n as isize,
                            1,
                            T::one(),
                            T::one(),
                            false,
                            false,
                            false,
                            parallelism,
                        )
                    }
                }
                for image in dy.chunks_exact(c_out * plane) {
                    for (sum, row) in db.iter_mut().zip(image.chunks(plane)) {
                        *sum += row.iter().fold(T::zero(), |a, &v| a + v);
                    }
                }
            }
            (dw, db)
        };
        let images: Vec<usize> = (0..g.b).collect();
        let (dw, db) = images
            .par_chunks(g.b.div_ceil(threads).max(1))
            .map(&partial)
            .reduce_with(|(dw1, db1), (dw2, db2)| (add_into(dw1, dw2), add_into(db1, db2)))
            .unwrap_or_else(|| partial(&[]));
        let dw = if by_channel {
            Swap {
                a: 1,
                p: k,
                q: c_out,
                r: 1,
            }
            .run(&dw)
        } else {
            dw
        };
        (dw, bias.then_some(db))
    }

    fn check(&self, xl: &Layout, wl: &Layout) -> Result<()> {
        let g = self.0;
        let (_, c, kh, kw) = wl.shape().dims4()?;
        if xl.dims() != [g.b, g.c, g.h, g.w] || c != g.c || kh != g.kh || kw != g.kw {
            bail!("conv2d: input {:?}, weight {:?}", xl.dims(), wl.dims())
        }
        Ok(())
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "fused-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(xl, wl)?;
        dispatch!("fused-conv2d", xs, T => {
            let x = slice::<T>(xs, xl, "fused-conv2d")?;
            let w = slice::<T>(ws, wl, "fused-conv2d")?;
            self.fwd(x, w, None)
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.bwd_impl(x, w, None, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for ConvOp {
    fn name(&self) -> &'static str {
        "fused-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(xl, wl)?;
        dispatch!("fused-conv2d", xs, T => {
            let x = slice::<T>(xs, xl, "fused-conv2d")?;
            let w = slice::<T>(ws, wl, "fused-conv2d")?;
            let b = slice::<T>(bs, bl, "fused-conv2d")?;
            self.fwd(x, w, Some(b))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.bwd_impl(x, w, Some(b), grad)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// 2D convolution of `x` (B, C, H, W) with `weight` (C_out, C, kh, kw) and an optional bias,
/// zero padding `pad` = [top, bottom, left, right] and equal strides, as one graph node.
/// Requires [`applies`].
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (_, c_w, kh, kw) = weight.dims4()?;
    if c_w != c {
        bail!("conv2d: input has {c} channels, weight {:?}", weight.dims())
    }
    if h + pad[0] + pad[1] < kh || w + pad[2] + pad[3] < kw || stride == 0 {
        bail!("conv2d: input {h}x{w} (padding {pad:?}, stride {stride}) vs a {kh}x{kw} kernel")
    }
    let op = ConvOp(ConvGeom {
        b,
        c,
        h,
        w,
        kh,
        kw,
        stride,
        pad,
    });
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    match bias {
        Some(bias) => x.apply_op3(&weight, &bias.contiguous()?, op),
        None => x.apply_op2(&weight, op),
    }
}

/// The gradients (dx, dw, db) of [`conv2d`] for the output gradient `dy`, as its backward pass
/// computes them: for timing the backward alone (`examples/train_convs.rs`).
pub fn conv2d_backward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (b, c, h, w) = x.dims4()?;
    let (_, _, kh, kw) = weight.dims4()?;
    let op = ConvOp(ConvGeom {
        b,
        c,
        h,
        w,
        kh,
        kw,
        stride,
        pad,
    });
    op.bwd_impl(
        &x.contiguous()?,
        &weight.contiguous()?,
        bias,
        &dy.contiguous()?,
    )
}

/// A 3x3 convolution (stride 1, padding 1, with bias) whose kernels were transformed once by
/// [`winograd_kernels`]: forward only, for inference (see [`conv2d_fixed_weights`]).
struct WinogradOp {
    dims: (usize, usize, usize, usize),
    c_out: usize,
}

impl CustomOp3 for WinogradOp {
    fn name(&self) -> &'static str {
        "winograd-conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = self.dims;
        if xl.dims() != [b, c, h, w] || ul.dims() != [16, self.c_out, c] {
            bail!(
                "winograd-conv3x3: input {:?}, kernels {:?}",
                xl.dims(),
                ul.dims()
            )
        }
        dispatch!(self.name(), xs, T => {
            let x = slice::<T>(xs, xl, self.name())?;
            let u = slice::<T>(us, ul, self.name())?;
            let bias = slice::<T>(bs, bl, self.name())?;
            let out = winograd::conv3x3_transformed(x, u, Some(bias), self.dims, self.c_out);
            Ok(storage(out, (b, self.c_out, h, w)))
        })
    }
}

/// The Winograd transform of 3x3 kernels (C_out, C, 3, 3): (16, C_out, C).
pub fn winograd_kernels(weight: &Tensor) -> Result<Tensor> {
    let (c_out, c, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) {
        bail!("winograd_kernels: a {kh}x{kw} kernel, not 3x3")
    }
    dispatch_dtype!("winograd_kernels", weight.dtype(), T => {
        with_data::<T, _>(&[weight], |d| {
            cpu_tensor(winograd::transform_kernels(d[0], c, c_out), (16, c_out, c))
        })
    })
}

/// [`conv2d`] for weights that stay the same from call to call (a model loaded for inference):
/// where Winograd's 3x3 convolution applies, nothing needs a gradient and the kernels are not
/// too large to keep a copy of, the kernels' transform is made on the first call and kept in
/// `kernels` (16/9 of the weight's size) instead of being redone every call.
pub fn conv2d_fixed_weights(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
    kernels: &std::sync::OnceLock<Tensor>,
) -> Result<Tensor> {
    let dims = x.dims4()?;
    let (c_out, c, kh, kw) = weight.dims4()?;
    let untracked = !x.track_op() && !weight.track_op();
    match bias {
        Some(bias)
            if untracked
                && !bias.track_op()
                && c == dims.1
                && weight.dtype() == x.dtype()
                && winograd::worth_keeping(c, c_out)
                && winograd::applies(dims, (kh, kw), stride, pad, true) =>
        {
            let u = match kernels.get() {
                Some(u) => u,
                None => {
                    let _ = kernels.set(winograd_kernels(weight)?);
                    kernels.get().expect("set above")
                }
            };
            x.contiguous()?
                .apply_op3(u, &bias.contiguous()?, WinogradOp { dims, c_out })
        }
        _ => conv2d(x, weight, bias, stride, pad),
    }
}

// ---------------------------------------------------------------------------------------------
// Nearest-neighbour 2x upsampling
// ---------------------------------------------------------------------------------------------

/// (B, C, H, W) -> (B, C, 2H, 2W), each pixel repeated 2x2; backward sums each 2x2 block.
struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        dispatch!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            let mut out = zeros(x.len() * 4);
            out.par_chunks_mut(4 * h * w)
                .zip(x.par_chunks(h * w))
                .for_each(|(dst, src)| {
                    for y in 0..h {
                        let (top, bottom) = dst[2 * y * 2 * w..][..4 * w].split_at_mut(2 * w);
                        for (xi, &v) in src[y * w..][..w].iter().enumerate() {
                            top[2 * xi] = v;
                            top[2 * xi + 1] = v;
                        }
                        bottom.copy_from_slice(top);
                    }
                });
            Ok(storage(out, (b, c, 2 * h, 2 * w)))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let _profile = crate::profile::scope("upsample backward", grad.device());
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&Sum2x2)?))
    }
}

/// (B, C, 2H, 2W) -> (B, C, H, W), summing 2x2 blocks.
struct Sum2x2;

impl CustomOp1 for Sum2x2 {
    fn name(&self) -> &'static str {
        "sum-2x2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h2, w2) = l.shape().dims4()?;
        let (h, w) = (h2 / 2, w2 / 2);
        dispatch!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            let mut out = zeros(b * c * h * w);
            out.par_chunks_mut(h * w)
                .zip(x.par_chunks(h2 * w2))
                .for_each(|(dst, src)| {
                    for y in 0..h {
                        let top = &src[2 * y * w2..][..w2];
                        let bottom = &src[(2 * y + 1) * w2..][..w2];
                        for (xi, d) in dst[y * w..][..w].iter_mut().enumerate() {
                            *d = top[2 * xi] + top[2 * xi + 1] + bottom[2 * xi] + bottom[2 * xi + 1];
                        }
                    }
                });
            Ok(storage(out, (b, c, h, w)))
        })
    }
}

/// Nearest-neighbour 2x upsampling of (B, C, H, W). Requires [`applies`].
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Upsample2x)
}

#[cfg(test)]
mod tests {
    //! Each fused op against the composed candle ops it replaces, forward and backward, in f64
    //! (and the conv also in f32), on random inputs.
    use super::*;
    use candle_core::{Device, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // A small deterministic generator so the tests don't depend on candle's RNG.
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f64> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Runs `f` on fresh variables made from `inputs`, with a random linear loss, and returns
    /// the output and the gradient of every input.
    fn run(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> (Tensor, Vec<Tensor>) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts);
        let probe = randn(out.dims(), 99).to_dtype(out.dtype()).unwrap();
        let loss = (&out * &probe).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = ts.iter().map(|t| grads.get(t).unwrap().clone()).collect();
        (out, g)
    }

    /// The fused op and the reference agree forward and backward within `tol`.
    fn check(
        what: &str,
        inputs: &[Tensor],
        fused: &dyn Fn(&[Tensor]) -> Tensor,
        reference: &dyn Fn(&[Tensor]) -> Tensor,
        tol: f64,
    ) {
        let (a, ga) = run(inputs, fused);
        let (b, gb) = run(inputs, reference);
        let d = max_diff(&a, &b);
        assert!(d < tol, "{what}: forward differs by {d:e}");
        for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
            let d = max_diff(x, y);
            assert!(d < tol, "{what}: gradient of input {i} differs by {d:e}");
        }
    }

    fn reference_group_norm(x: &Tensor, g: &Tensor, b: &Tensor, groups: usize) -> Tensor {
        let (n, c) = (x.dim(0).unwrap(), x.dim(1).unwrap());
        let xs = x.reshape((n, groups, ())).unwrap();
        let mean = xs.mean_keepdim(2).unwrap();
        let xs = xs.broadcast_sub(&mean).unwrap();
        let var = xs.sqr().unwrap().mean_keepdim(2).unwrap();
        let xs = xs
            .broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap())
            .unwrap();
        xs.reshape(x.shape())
            .unwrap()
            .broadcast_mul(&g.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    #[test]
    fn group_norm_and_silu_match_composed_ops() {
        let x = ((randn(&[3, 8, 5, 6], 1) * 3.0).unwrap() + 0.5).unwrap();
        let inputs = [x, randn(&[8], 2), randn(&[8], 3)];
        for silu in [false, true] {
            check(
                &format!("group_norm silu={silu}"),
                &inputs,
                &|t| group_norm(&t[0], &t[1], &t[2], 4, 1e-6, silu).unwrap(),
                &|t| {
                    let y = reference_group_norm(&t[0], &t[1], &t[2], 4);
                    if silu {
                        y.silu().unwrap()
                    } else {
                        y
                    }
                },
                1e-12,
            );
        }
    }

    #[test]
    fn layer_norm_matches_composed_ops() {
        let x = ((randn(&[2, 7, 12], 4) * 2.0).unwrap() - 1.0).unwrap();
        check(
            "layer_norm",
            &[x, randn(&[12], 5), randn(&[12], 6)],
            &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            &|t| {
                let mean = t[0].mean_keepdim(D::Minus1).unwrap();
                let xc = t[0].broadcast_sub(&mean).unwrap();
                let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                xc.broadcast_div(&(var + 1e-5).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&t[1])
                    .unwrap()
                    .broadcast_add(&t[2])
                    .unwrap()
            },
            1e-12,
        );
    }

    #[test]
    fn geglu_swap_upsample_match_composed_ops() {
        let x = (randn(&[2, 3, 5, 9], 7) * 4.0).unwrap();
        check(
            "geglu",
            &[randn(&[4, 3, 10], 8)],
            &|t| geglu(&t[0]).unwrap(),
            &|t| {
                let v = t[0].narrow(D::Minus1, 0, 5).unwrap();
                let g = t[0].narrow(D::Minus1, 5, 5).unwrap();
                (v * g.gelu_erf().unwrap()).unwrap()
            },
            // candle's gelu_erf backward rounds 1/sqrt(2 pi) to 0.398942.
            1e-6,
        );
        check(
            "quick_gelu",
            &[(randn(&[4, 3, 10], 9) * 4.0).unwrap()],
            &|t| quick_gelu(&t[0]).unwrap(),
            &|t| (&t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702).unwrap()).unwrap()).unwrap(),
            1e-12,
        );
        check(
            "swap_dims",
            std::slice::from_ref(&x),
            &|t| swap_dims(&t[0], (2, 3, 5, 9), (2, 5, 27)).unwrap(),
            &|t| {
                t[0].transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .reshape((2, 5, 27))
                    .unwrap()
            },
            1e-15,
        );
        check(
            "swap_dims r=1",
            std::slice::from_ref(&x),
            &|t| swap_dims(&t[0], (6, 5, 9, 1), (6, 9, 5)).unwrap(),
            &|t| {
                t[0].reshape((6, 5, 9))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            },
            1e-15,
        );
        check(
            "upsample",
            &[x],
            &|t| upsample_nearest_2x(&t[0]).unwrap(),
            &|t| t[0].upsample_nearest2d(10, 18).unwrap(),
            1e-12,
        );
    }

    #[test]
    fn linear_and_attention_match_composed_ops() {
        // A tiny layer, one large enough for gemm's own blocking and threads, a tall, narrow
        // one (801 rows of 24), the shape of a training step's layers, and one whose output
        // columns the workers split (two slabs, 192 and 108 wide, on two or more threads).
        let cases = [
            (vec![2, 5, 6], 4, 50),
            (vec![3, 70, 300], 130, 53),
            (vec![3, 267, 24], 16, 56),
            (vec![2, 77, 96], 300, 57),
        ];
        for (x, n, seed) in cases {
            let k = x[2];
            let inputs = [
                randn(&x, seed),
                randn(&[n, k], seed + 1),
                randn(&[n], seed + 2),
            ];
            // The weight as checkpoints store it, (out, in), and transposed, (in, out), as
            // `linear_kn` takes it: its gradient comes back in that layout too.
            let w_t = transpose_2d(&inputs[1]).unwrap();
            assert_eq!(max_diff(&w_t, &inputs[1].t().unwrap()), 0.0);
            type LinearFn = fn(&Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>;
            let layouts: [(&str, Tensor, LinearFn); 2] = [
                ("(out, in)", inputs[1].clone(), linear),
                ("(in, out)", w_t, linear_kn),
            ];
            for (layout, w, fused) in layouts {
                let stored_out_in = layout == "(out, in)";
                let matmul = |t: &[Tensor]| {
                    let w = if stored_out_in {
                        t[1].t().unwrap()
                    } else {
                        t[1].clone()
                    };
                    t[0].broadcast_matmul(&w).unwrap()
                };
                let inputs = [inputs[0].clone(), w, inputs[2].clone()];
                check(
                    &format!("linear, weight {layout}"),
                    &inputs,
                    &|t| fused(&t[0], &t[1], Some(&t[2])).unwrap(),
                    &|t| matmul(t).broadcast_add(&t[2]).unwrap(),
                    1e-12,
                );
                check(
                    &format!("linear without bias, weight {layout}"),
                    &inputs[..2],
                    &|t| fused(&t[0], &t[1], None).unwrap(),
                    &matmul,
                    1e-12,
                );
            }
        }
        // Self-attention with more query rows than one block (ROWS = 128 in the loops,
        // GEMM_ROWS = 256 in the GEMMs), and cross-attention; with the register-blocked loops
        // (d = 5, 8) and with GEMMs (wider heads, last block partial).
        assert!(!attention_uses_gemm(140, 70, 5) && attention_uses_gemm(70, 70, 16));
        assert_eq!(linear_column_parts(154, 300, 2), Some(192));
        assert_eq!(linear_column_parts(154, 768, 2), Some(192));
        assert_eq!(linear_column_parts(154, 3072, 2), Some(768));
        assert_eq!(linear_column_parts(154, 3072, 1), None);
        assert_eq!(linear_column_parts(8192, 320, 2), None);
        assert_eq!(linear_column_parts(1024, 128, 2), None);
        // The backward's accumulation of dk and dv has its own code for some widths (8, with
        // keys four at a time: 70 leaves two; 16; 40) and a general one (5, 20). Heads 8 and
        // 16 wide go to the narrow kernels, in blocks of 16 (9 rows: a partial sub-block), 32
        // (20 rows: a whole sub-block of 16 and a partial one), 64 (45 rows) and 128 rows (300:
        // two whole blocks and a partial one whose last sub-block is partial).
        for (nq, nk, d) in [
            (140, 70, 5),
            (9, 4, 5),
            (140, 70, 8),
            (9, 4, 8),
            (20, 33, 16),
            (45, 45, 16),
            (300, 80, 8),
            (70, 70, 16),
            (130, 80, 20),
            (300, 80, 20),
            (70, 9, 40),
        ] {
            let inputs = [
                (randn(&[2, 3, nq, d], 60) * 2.0).unwrap(),
                (randn(&[2, 3, nk, d], 61) * 2.0).unwrap(),
                randn(&[2, 3, nk, d], 62),
            ];
            check(
                &format!("attention {nq}x{nk}, d {d}"),
                &inputs,
                &|t| attention(&t[0], &t[1], &t[2], 0.4).unwrap(),
                &|t| {
                    let scores = (t[0].matmul(&t[1].t().unwrap()).unwrap() * 0.4).unwrap();
                    candle_nn::ops::softmax(&scores, D::Minus1)
                        .unwrap()
                        .matmul(&t[2])
                        .unwrap()
                },
                1e-12,
            );
        }
    }

    #[test]
    fn attention_over_tokens_matches_attention_over_split_heads() {
        // Heads read from and written to (B, N, H * d) against the same attention on heads
        // split off with candle's reshape and transpose: the loops (d = 8) and the GEMMs
        // (d = 20, 80 rows), causal and not; f64 forward and backward.
        for (nq, nk, d, causal) in [
            (37, 21, 8, false),
            (80, 80, 20, false),
            (77, 77, 8, true),
            (80, 80, 20, true),
        ] {
            let (b, h) = (2, 3);
            let inputs = [
                (randn(&[b, nq, h * d], 93) * 2.0).unwrap(),
                (randn(&[b, nk, h * d], 94) * 2.0).unwrap(),
                randn(&[b, nk, h * d], 95),
            ];
            let split = |t: &Tensor| {
                let n = t.dim(1).unwrap();
                t.reshape((b, n, h, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            check(
                &format!("attention over tokens {nq}x{nk}, d {d}, causal {causal}"),
                &inputs,
                &|t| attention_tokens(&t[0], &t[1], &t[2], h, 0.3, causal).unwrap(),
                &|t| {
                    let (q, k, v) = (split(&t[0]), split(&t[1]), split(&t[2]));
                    let out = if causal {
                        causal_attention(&q, &k, &v, 0.3)
                    } else {
                        attention(&q, &k, &v, 0.3)
                    };
                    out.unwrap()
                        .transpose(1, 2)
                        .unwrap()
                        .reshape((b, nq, h * d))
                        .unwrap()
                },
                1e-12,
            );
        }
        let q = randn(&[2, 5, 12], 96);
        let err = attention_tokens(&q, &q, &q, 5, 0.3, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("q [2, 5, 12]"), "{err}");
    }

    #[test]
    fn causal_attention_matches_masked_composed_ops() {
        // A text encoder's 77 tokens: one partial block of query rows in the loops (d = 8),
        // one partial GEMM block (d = 16); 150 tokens: two blocks in the loops; 300 tokens: a
        // full and a partial GEMM block; 20 tokens 32 wide (the small text encoder's heads): a
        // block of 32 rows. f64 forward and backward, and f32 forward.
        for (n, d) in [(77, 8), (150, 8), (77, 16), (300, 16), (20, 32)] {
            let inputs = [
                (randn(&[2, 3, n, d], 90) * 2.0).unwrap(),
                (randn(&[2, 3, n, d], 91) * 2.0).unwrap(),
                randn(&[2, 3, n, d], 92),
            ];
            let reference = |t: &[Tensor]| {
                let mask: Vec<f64> = (0..n * n)
                    .map(|i| {
                        if i % n > i / n {
                            f64::NEG_INFINITY
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let mask = Tensor::from_vec(mask, (n, n), t[0].device())
                    .unwrap()
                    .to_dtype(t[0].dtype())
                    .unwrap();
                let scores = (t[0].matmul(&t[1].t().unwrap()).unwrap() * 0.3).unwrap();
                candle_nn::ops::softmax(&scores.broadcast_add(&mask).unwrap(), D::Minus1)
                    .unwrap()
                    .matmul(&t[2])
                    .unwrap()
            };
            check(
                &format!("causal attention {n}x{n}, d {d}"),
                &inputs,
                &|t| causal_attention(&t[0], &t[1], &t[2], 0.3).unwrap(),
                &reference,
                1e-12,
            );
            let f32s: Vec<Tensor> = inputs
                .iter()
                .map(|t| t.to_dtype(DType::F32).unwrap())
                .collect();
            let err = (causal_attention(&f32s[0], &f32s[1], &f32s[2], 0.3).unwrap()
                - reference(&f32s))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
            assert!(
                err < 1e-5,
                "causal attention f32, d {d}: max abs error {err}"
            );
        }
    }

    #[test]
    fn f32_exp_and_erf_are_within_a_few_ulp() {
        let (mut worst_exp, mut worst_erf) = (0f64, 0f64);
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let rel = (exp_f32(x as f32) as f64 - x.exp()).abs() / x.exp();
            worst_exp = worst_exp.max(rel);
            let x = -6.0 + 12.0 * i as f64 / 200_000.0;
            let abs = (erf_f32(x as f32) as f64 - candle_core::cpu::erf::erf_f64(x)).abs();
            worst_erf = worst_erf.max(abs);
        }
        // One f32 ulp is 1.2e-7 relative; the input rounding to f32 alone contributes up to
        // |x| * 6e-8 to exp's relative error.
        assert!(worst_exp < 6e-6, "exp_f32 relative error {worst_exp:e}");
        assert!(worst_erf < 2e-7, "erf_f32 absolute error {worst_erf:e}");
    }

    #[test]
    fn f32_kernels_match_composed_ops() {
        let f32s = |ts: &[Tensor]| -> Vec<Tensor> {
            ts.iter().map(|t| t.to_dtype(DType::F32).unwrap()).collect()
        };
        let x = ((randn(&[2, 8, 6, 6], 70) * 3.0).unwrap() + 0.5).unwrap();
        check(
            "group_norm+silu f32",
            &f32s(&[x, randn(&[8], 71), randn(&[8], 72)]),
            &|t| group_norm(&t[0], &t[1], &t[2], 4, 1e-6, true).unwrap(),
            &|t| reference_group_norm(&t[0], &t[1], &t[2], 4).silu().unwrap(),
            1e-5,
        );
        for d in [8, 40] {
            check(
                &format!("attention f32, d {d}"),
                &f32s(&[
                    (randn(&[2, 2, 70, d], 73) * 3.0).unwrap(),
                    (randn(&[2, 2, 70, d], 74) * 3.0).unwrap(),
                    randn(&[2, 2, 70, d], 75),
                ]),
                &|t| attention(&t[0], &t[1], &t[2], 0.35).unwrap(),
                &|t| {
                    let scores = (t[0].matmul(&t[1].t().unwrap()).unwrap() * 0.35).unwrap();
                    candle_nn::ops::softmax(&scores, D::Minus1)
                        .unwrap()
                        .matmul(&t[2])
                        .unwrap()
                },
                1e-5,
            );
        }
        check(
            "quick_gelu f32",
            &f32s(&[(randn(&[5, 3, 16], 77) * 4.0).unwrap()]),
            &|t| quick_gelu(&t[0]).unwrap(),
            &|t| (&t[0] * candle_nn::ops::sigmoid(&(&t[0] * 1.702).unwrap()).unwrap()).unwrap(),
            1e-5,
        );
        check(
            "geglu f32",
            &f32s(&[(randn(&[5, 3, 16], 76) * 3.0).unwrap()]),
            &|t| geglu(&t[0]).unwrap(),
            &|t| {
                let v = t[0].narrow(D::Minus1, 0, 8).unwrap();
                let g = t[0].narrow(D::Minus1, 8, 8).unwrap();
                (v * g.gelu_erf().unwrap()).unwrap()
            },
            1e-5,
        );
    }

    #[test]
    fn conv2d_in_bands_of_rows_matches_candle_conv() {
        // Inputs large enough that the forward splits into bands of output rows, the last one
        // partial: four bands (the parallel path) and two (the sequential one, with parallel
        // GEMMs), with stride 2 and the VAE downsampler's asymmetric padding in the second.
        let cases = [
            ([2, 64, 64, 64], 8, 1, [1; 4], 4),
            ([1, 256, 64, 64], 4, 2, [0, 1, 0, 1], 2),
        ];
        for (shape, c_out, stride, pad, bands) in cases {
            let f32 = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let x = f32(randn(&shape, 1));
            let w = f32(randn(&[c_out, shape[1], 3, 3], 2));
            let bias = f32(randn(&[c_out], 3));
            let (oh, ow) = (
                (shape[2] + pad[0] + pad[1] - 3) / stride + 1,
                (shape[3] + pad[2] + pad[3] - 3) / stride + 1,
            );
            let rows = BAND_VALUES / (shape[1] * 9 * ow);
            assert_eq!(shape[0] * oh.div_ceil(rows), bands, "{shape:?}");
            assert!(oh % rows != 0, "{shape:?}: the last band should be partial");

            let ours = conv2d(&x, &w, Some(&bias), stride, pad).unwrap();
            let reference = x
                .pad_with_zeros(2, pad[0], pad[1])
                .unwrap()
                .pad_with_zeros(3, pad[2], pad[3])
                .unwrap()
                .conv2d(&w, 0, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            let scale = reference
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let err = (ours - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                err <= 1e-5 * scale,
                "{shape:?}: max abs error {err} (outputs up to {scale})"
            );
        }
    }

    /// Shapes where the forward pass and the input gradient (a convolution by the flipped
    /// kernels) go through Winograd's F(2x2, 3x3): forward and gradients against candle's
    /// convolution, in f64 and f32; and the inference path with kernels transformed once.
    #[test]
    fn winograd_conv2d_matches_candle_conv() {
        if !winograd::applies((4, 128, 32, 32), (3, 3), 1, [1; 4], false) {
            return; // SD_RS_WINOGRAD=0
        }
        // (input, c_out): even and odd sizes (tiles half outside the image), at least 512
        // tiles.
        let cases = [([4, 128, 32, 32], 128), ([5, 128, 21, 19], 130)];
        for (i, (shape, c_out)) in cases.into_iter().enumerate() {
            let inputs = [
                randn(&shape, 60 + i as u64),
                randn(&[c_out, shape[1], 3, 3], 70 + i as u64),
                randn(&[c_out], 80 + i as u64),
            ];
            let reference = |t: &[Tensor]| {
                t[0].conv2d(&t[1], 1, 1, 1, 1)
                    .unwrap()
                    .broadcast_add(&t[2].reshape((1, c_out, 1, 1)).unwrap())
                    .unwrap()
            };
            for dtype in [DType::F64, DType::F32] {
                let inputs: Vec<Tensor> =
                    inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
                let tol = if dtype == DType::F64 { 1e-11 } else { 1e-3 };
                check(
                    &format!("winograd conv2d case {i} {dtype:?}"),
                    &inputs,
                    &|t| conv2d(&t[0], &t[1], Some(&t[2]), 1, [1; 4]).unwrap(),
                    &reference,
                    tol,
                );
                let kernels = std::sync::OnceLock::new();
                let expected = reference(&inputs);
                for call in 0..2 {
                    let (x, w, b) = (&inputs[0], &inputs[1], &inputs[2]);
                    let ours = conv2d_fixed_weights(x, w, Some(b), 1, [1; 4], &kernels).unwrap();
                    let d = max_diff(&ours, &expected);
                    assert!(
                        d < tol,
                        "fixed weights, case {i} {dtype:?}, call {call}: {d:e}"
                    );
                    assert_eq!(kernels.get().unwrap().dims(), [16, c_out, shape[1]]);
                }
            }
        }
    }

    #[test]
    fn images_per_gemm_groups_small_images() {
        // SD 1.5's 4x4 level, guidance pair: both images in one GEMM (one weight pack).
        assert_eq!(ConvGeom::images_per_gemm(11520, 16, 2, 2), 2);
        // Training batch of 32 on 2 workers: four groups of eight, two per worker.
        assert_eq!(ConvGeom::images_per_gemm(1152, 16, 32, 2), 8);
        // Nine images: groups of at most two, the last one shorter.
        assert_eq!(ConvGeom::images_per_gemm(27, 16, 9, 2), 2);
        // Images of 256 pixels or more: one each.
        assert_eq!(ConvGeom::images_per_gemm(576, 256, 32, 2), 1);
        assert_eq!(ConvGeom::images_per_gemm(2880, 1024, 2, 2), 1);
        // 8x8 images: four to a GEMM.
        assert_eq!(ConvGeom::images_per_gemm(1152, 64, 200, 2), 4);
        // A group's im2col block stays within a band (2^21 values, 11 images of 11520 x 16):
        // 200 images in 19 groups of at most 11.
        assert_eq!(ConvGeom::images_per_gemm(11520, 16, 200, 2), 11);
    }

    #[test]
    fn conv2d_matches_candle_conv() {
        // (input, c_out, kernel, stride, padding) incl. odd sizes and a 1x1 kernel.
        let cases = [
            ([2, 3, 7, 6], 4, 3, 1, 1),
            // candle's own conv2d backward needs height and width of equal parity.
            ([2, 3, 7, 7], 5, 3, 2, 1),
            ([1, 4, 9, 9], 2, 3, 2, 0),
            ([2, 6, 5, 5], 3, 1, 1, 0),
            // A pointwise convolution over 72 pixels: a GEMM per image on its planes (with
            // gemm's own threads for 2 images on two workers, single-threaded ones for 5).
            ([2, 6, 8, 9], 3, 1, 1, 0),
            ([5, 6, 8, 9], 3, 1, 1, 0),
            // Small images, several to a GEMM, the last GEMM with fewer (see
            // `images_per_gemm_groups_small_images`).
            ([9, 3, 4, 4], 4, 3, 1, 1),
            // 16 output channels and k = 72 >= 4 * 16: the weight gradient made transposed,
            // one image per GEMM and several.
            ([2, 8, 6, 7], 16, 3, 1, 1),
            ([9, 8, 4, 4], 16, 3, 1, 1),
        ];
        for (i, (shape, c_out, k, stride, pad)) in cases.into_iter().enumerate() {
            let inputs = [
                randn(&shape, 10 + i as u64),
                randn(&[c_out, shape[1], k, k], 20 + i as u64),
                randn(&[c_out], 30 + i as u64),
            ];
            for dtype in [DType::F64, DType::F32] {
                let inputs: Vec<Tensor> =
                    inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
                check(
                    &format!("conv2d case {i} {dtype:?}"),
                    &inputs,
                    &|t| conv2d(&t[0], &t[1], Some(&t[2]), stride, [pad; 4]).unwrap(),
                    &|t| {
                        t[0].conv2d(&t[1], pad, stride, 1, 1)
                            .unwrap()
                            .broadcast_add(&t[2].reshape((1, c_out, 1, 1)).unwrap())
                            .unwrap()
                    },
                    tol,
                );
            }
        }
        // Uneven padding against explicit zero padding: the VAE's downsampler (stride 2), and
        // stride 1, whose input gradient is a transposed convolution.
        let cases = [
            ([2, 3, 8, 8], 2, [0, 1, 0, 1]),
            ([2, 3, 6, 7], 1, [1, 0, 0, 2]),
        ];
        for (i, (shape, stride, [top, bottom, left, right])) in cases.into_iter().enumerate() {
            let inputs = [
                randn(&shape, 40 + i as u64),
                randn(&[4, 3, 3, 3], 50 + i as u64),
            ];
            check(
                &format!(
                    "conv2d stride {stride}, padding {:?}",
                    [top, bottom, left, right]
                ),
                &inputs,
                &|t| conv2d(&t[0], &t[1], None, stride, [top, bottom, left, right]).unwrap(),
                &|t| {
                    let x = t[0]
                        .pad_with_zeros(2, top, bottom)
                        .unwrap()
                        .pad_with_zeros(3, left, right)
                        .unwrap();
                    x.conv2d(&t[1], 0, stride, 1, 1).unwrap()
                },
                1e-12,
            );
        }
    }
}
