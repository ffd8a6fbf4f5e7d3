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
//! Every op here is a `CustomOp` whose `bwd` computes its gradient with another kernel, so the
//! graph gets one node per layer instead of dozens. The kernels run on `f32`/`f64` CPU tensors
//! only and are parallel over independent slices with rayon. Callers check [`applies`] and fall
//! back to the composed candle ops (CUDA, Metal, half precision), which remain the reference:
//! the results agree up to float rounding (the unit tests below check forward and backward).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result};
use candle_core::{Shape, Tensor, WithDType};
use rayon::prelude::*;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Switches the fused kernels on or off for the whole process (on by default). Off forces the
/// composed candle ops everywhere, which is how the kernels are compared with the reference.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether the fused kernels are switched on.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the fused kernels handle `t`: switched on, on the CPU, in f32 or f64.
pub fn applies(t: &Tensor) -> bool {
    enabled() && t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The float operations the kernels need beyond `WithDType`'s arithmetic.
trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
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

fn sigmoid<T: Real>(z: T) -> T {
    T::one() / (T::one() + (T::zero() - z).exp())
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)
// ---------------------------------------------------------------------------------------------

/// Mean and 1/sqrt(var + eps) of one group, accumulated in f64 (two passes, like the composed
/// version: mean first, then the mean of squared deviations).
fn moments<T: WithDType>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = x
        .iter()
        .map(|v| {
            let d = v.to_f64() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `torch.nn.GroupNorm` on (B, C, *) with per-channel affine, optionally followed by SiLU.
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl GroupNormOp {
    fn dims(&self, l: &Layout, c: usize) -> Result<(usize, usize)> {
        let dims = l.dims();
        if dims.len() < 3 || dims[1] != c || c % self.groups != 0 {
            bail!("group-norm: input {dims:?} for {c} channels in {} groups", self.groups)
        }
        let spatial: usize = dims[2..].iter().product();
        Ok((dims[0], spatial))
    }

    fn fwd<T: Real>(&self, x: &[T], gamma: &[T], beta: &[T], spatial: usize) -> Vec<T> {
        let c = gamma.len();
        let cg = c / self.groups;
        let group_len = cg * spatial;
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let g = i % self.groups;
                let (mean, rstd) = moments(x, self.eps);
                let mean = T::from_f64(mean);
                for ci in 0..cg {
                    let ch = g * cg + ci;
                    let a = gamma[ch] * T::from_f64(rstd);
                    let b = beta[ch];
                    let range = ci * spatial..(ci + 1) * spatial;
                    for (o, &v) in out[range.clone()].iter_mut().zip(&x[range]) {
                        let z = (v - mean) * a + b;
                        *o = if self.silu { z * sigmoid(z) } else { z };
                    }
                }
            });
        out
    }

    /// Returns dx (len of x) followed by dgamma and dbeta (C each).
    fn bwd<T: Real>(&self, x: &[T], dy: &[T], gamma: &[T], beta: &[T], spatial: usize) -> Vec<T> {
        let c = gamma.len();
        let cg = c / self.groups;
        let group_len = cg * spatial;
        let n = x.len();
        let mut out = vec![T::zero(); n + 2 * c];
        let (dx, dparams) = out.split_at_mut(n);
        // Per (sample, channel): (dgamma, dbeta) partial sums, reduced over the batch below.
        let partials: Vec<Vec<(f64, f64)>> = dx
            .par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .zip(dy.par_chunks(group_len))
            .enumerate()
            .map(|(i, ((dx, x), dy))| {
                let g = i % self.groups;
                let (mean, rstd) = moments(x, self.eps);
                let (mean_t, rstd_t) = (T::from_f64(mean), T::from_f64(rstd));
                let mut part = Vec::with_capacity(cg);
                // dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = dz * gamma.
                let (mut sum1, mut sum2) = (0f64, 0f64);
                for ci in 0..cg {
                    let ch = g * cg + ci;
                    let (gm, bt) = (gamma[ch], beta[ch]);
                    let (mut dgamma, mut dbeta) = (0f64, 0f64);
                    let range = ci * spatial..(ci + 1) * spatial;
                    for ((d, &v), &gy) in dx[range.clone()]
                        .iter_mut()
                        .zip(&x[range.clone()])
                        .zip(&dy[range])
                    {
                        let xhat = (v - mean_t) * rstd_t;
                        let dz = if self.silu {
                            let z = xhat * gm + bt;
                            let s = sigmoid(z);
                            gy * s * (T::one() + z * (T::one() - s))
                        } else {
                            gy
                        };
                        let (dz64, xhat64) = (dz.to_f64(), xhat.to_f64());
                        dbeta += dz64;
                        dgamma += dz64 * xhat64;
                        let dxhat = dz * gm;
                        sum1 += dxhat.to_f64();
                        sum2 += dxhat.to_f64() * xhat64;
                        *d = dxhat;
                    }
                    part.push((dgamma, dbeta));
                }
                let len = x.len() as f64;
                let (m1, m2) = (T::from_f64(sum1 / len), T::from_f64(sum2 / len));
                for (d, &v) in dx.iter_mut().zip(x) {
                    let xhat = (v - mean_t) * rstd_t;
                    *d = rstd_t * (*d - m1 - xhat * m2);
                }
                part
            })
            .collect();
        let mut acc = vec![(0f64, 0f64); c];
        for (i, part) in partials.iter().enumerate() {
            let g = i % self.groups;
            for (ci, (dg, db)) in part.iter().enumerate() {
                acc[g * cg + ci].0 += dg;
                acc[g * cg + ci].1 += db;
            }
        }
        for (ch, (dg, db)) in acc.into_iter().enumerate() {
            dparams[ch] = T::from_f64(dg);
            dparams[c + ch] = T::from_f64(db);
        }
        out
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
        let (_, spatial) = self.dims(xl, gl.shape().elem_count())?;
        dispatch!(self.name(), xs, T => {
            let x = slice::<T>(xs, xl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            let b = slice::<T>(bs, bl, self.name())?;
            Ok(storage(self.fwd(x, g, b, spatial), xl.shape().clone()))
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
        let c = gamma.elem_count();
        let n = x.elem_count();
        let params = Tensor::cat(&[gamma, beta], 0)?;
        let packed = grad.contiguous()?.apply_op3_no_bwd(
            x,
            &params,
            &GroupNormBwd {
                op: GroupNormOp {
                    groups: self.groups,
                    eps: self.eps,
                    silu: self.silu,
                },
            },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, c)?;
        let dbeta = packed.narrow(0, n + c, c)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward kernel of [`GroupNormOp`]: (dy, x, [gamma; beta]) -> [dx; dgamma; dbeta].
struct GroupNormBwd {
    op: GroupNormOp,
}

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "fused-group-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = pl.shape().elem_count() / 2;
        let (_, spatial) = self.op.dims(xl, c)?;
        dispatch!(self.name(), xs, T => {
            let dy = slice::<T>(dys, dyl, self.name())?;
            let x = slice::<T>(xs, xl, self.name())?;
            let p = slice::<T>(ps, pl, self.name())?;
            let out = self.op.bwd(x, dy, &p[..c], &p[c..], spatial);
            let len = out.len();
            Ok(storage(out, len))
        })
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

struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn fwd<T: Real>(&self, x: &[T], gamma: &[T], beta: &[T]) -> Vec<T> {
        let d = gamma.len();
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(out, x)| {
                for (o, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, rstd) = moments(x, self.eps);
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    for (((o, &v), &g), &b) in o.iter_mut().zip(x).zip(gamma).zip(beta) {
                        *o = (v - mean) * rstd * g + b;
                    }
                }
            });
        out
    }

    /// Returns dx followed by dgamma and dbeta (D each).
    fn bwd<T: Real>(&self, x: &[T], dy: &[T], gamma: &[T]) -> Vec<T> {
        let d = gamma.len();
        let n = x.len();
        let mut out = vec![T::zero(); n + 2 * d];
        let (dx, dparams) = out.split_at_mut(n);
        let partials: Vec<Vec<f64>> = dx
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .zip(dy.par_chunks(d * ROWS_PER_TASK))
            .map(|((dx, x), dy)| {
                // dgamma (d) then dbeta (d) for these rows.
                let mut part = vec![0f64; 2 * d];
                for ((dx, x), dy) in dx.chunks_mut(d).zip(x.chunks(d)).zip(dy.chunks(d)) {
                    let (mean, rstd) = moments(x, self.eps);
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    let (mut sum1, mut sum2) = (0f64, 0f64);
                    for (j, ((d_out, &v), &gy)) in dx.iter_mut().zip(x).zip(dy).enumerate() {
                        let xhat = (v - mean) * rstd;
                        part[j] += (gy * xhat).to_f64();
                        part[d + j] += gy.to_f64();
                        let dxhat = gy * gamma[j];
                        sum1 += dxhat.to_f64();
                        sum2 += (dxhat * xhat).to_f64();
                        *d_out = dxhat;
                    }
                    let (m1, m2) = (T::from_f64(sum1 / d as f64), T::from_f64(sum2 / d as f64));
                    for (d_out, &v) in dx.iter_mut().zip(x) {
                        let xhat = (v - mean) * rstd;
                        *d_out = rstd * (*d_out - m1 - xhat * m2);
                    }
                }
                part
            })
            .collect();
        let mut acc = vec![0f64; 2 * d];
        for part in &partials {
            for (a, p) in acc.iter_mut().zip(part) {
                *a += p;
            }
        }
        for (o, a) in dparams.iter_mut().zip(acc) {
            *o = T::from_f64(a);
        }
        out
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
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = gamma.elem_count();
        let n = x.elem_count();
        let packed = grad.contiguous()?.apply_op3_no_bwd(
            x,
            gamma,
            &LayerNormBwd {
                op: LayerNormOp { eps: self.eps },
            },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, n, d)?;
        let dbeta = packed.narrow(0, n + d, d)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward kernel of [`LayerNormOp`]: (dy, x, gamma) -> [dx; dgamma; dbeta].
struct LayerNormBwd {
    op: LayerNormOp,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "fused-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        dispatch!(self.name(), xs, T => {
            let dy = slice::<T>(dys, dyl, self.name())?;
            let x = slice::<T>(xs, xl, self.name())?;
            let g = slice::<T>(gs, gl, self.name())?;
            let out = self.op.bwd(x, dy, g);
            let len = out.len();
            Ok(storage(out, len))
        })
    }
}

/// LayerNorm over the last dimension with `gamma`/`beta` of that size. Requires [`applies`].
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, LayerNormOp { eps })
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last dimension, with a scale folded in
// ---------------------------------------------------------------------------------------------

/// softmax(scale * x) over the last dimension.
struct ScaledSoftmax {
    scale: f64,
}

impl ScaledSoftmax {
    fn fwd<T: Real>(&self, x: &[T], d: usize) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(x.par_chunks(d * ROWS_PER_TASK))
            .for_each(|(out, x)| {
                for (o, x) in out.chunks_mut(d).zip(x.chunks(d)) {
                    let mut max = x[0] * scale;
                    for &v in x {
                        let v = v * scale;
                        if v > max {
                            max = v;
                        }
                    }
                    let mut sum = T::zero();
                    for (o, &v) in o.iter_mut().zip(x) {
                        let e = (v * scale - max).exp();
                        *o = e;
                        sum += e;
                    }
                    for o in o.iter_mut() {
                        *o /= sum;
                    }
                }
            });
        out
    }

    /// dx = scale * y * (dy - sum(dy * y)) per row.
    fn bwd<T: Real>(&self, y: &[T], dy: &[T], d: usize) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let mut out = vec![T::zero(); y.len()];
        out.par_chunks_mut(d * ROWS_PER_TASK)
            .zip(y.par_chunks(d * ROWS_PER_TASK))
            .zip(dy.par_chunks(d * ROWS_PER_TASK))
            .for_each(|((out, y), dy)| {
                for ((o, y), dy) in out.chunks_mut(d).zip(y.chunks(d)).zip(dy.chunks(d)) {
                    let mut dot = T::zero();
                    for (&a, &b) in y.iter().zip(dy) {
                        dot += a * b;
                    }
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(dy) {
                        *o = scale * y * (g - dot);
                    }
                }
            });
        out
    }
}

impl CustomOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "fused-scaled-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = *l.dims().last().unwrap_or(&1);
        dispatch!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            Ok(storage(self.fwd(x, d), l.shape().clone()))
        })
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = grad.contiguous()?.apply_op2_no_bwd(
            res,
            &ScaledSoftmaxBwd {
                op: ScaledSoftmax { scale: self.scale },
            },
        )?;
        Ok(Some(dx))
    }
}

/// The backward kernel of [`ScaledSoftmax`]: (dy, y) -> dx.
struct ScaledSoftmaxBwd {
    op: ScaledSoftmax,
}

impl CustomOp2 for ScaledSoftmaxBwd {
    fn name(&self) -> &'static str {
        "fused-scaled-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = *yl.dims().last().unwrap_or(&1);
        dispatch!(self.name(), ys, T => {
            let dy = slice::<T>(dys, dyl, self.name())?;
            let y = slice::<T>(ys, yl, self.name())?;
            Ok(storage(self.op.bwd(y, dy, d), yl.shape().clone()))
        })
    }
}

/// softmax(scale * x) over the last dimension. Requires [`applies`].
pub fn scaled_softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(ScaledSoftmax { scale })
}

// ---------------------------------------------------------------------------------------------
// GEGLU: value * gelu(gate) on the two halves of the last dimension
// ---------------------------------------------------------------------------------------------

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn erf<T: WithDType>(x: T) -> T {
    T::from_f64(candle_core::cpu::erf::erf_f64(x.to_f64()))
}

struct Geglu;

impl Geglu {
    /// (rows, 2 * inner) -> (rows, inner)
    fn fwd<T: Real>(&self, h: &[T], inner: usize) -> Vec<T> {
        let half = T::from_f64(0.5);
        let inv_sqrt2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
        let rows = h.len() / (2 * inner);
        let mut out = vec![T::zero(); rows * inner];
        out.par_chunks_mut(inner * ROWS_PER_TASK)
            .zip(h.par_chunks(2 * inner * ROWS_PER_TASK))
            .for_each(|(out, h)| {
                for (o, h) in out.chunks_mut(inner).zip(h.chunks(2 * inner)) {
                    let (value, gate) = h.split_at(inner);
                    for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate) {
                        let gelu = half * g * (T::one() + erf(g * inv_sqrt2));
                        *o = v * gelu;
                    }
                }
            });
        out
    }

    /// (h, dy) -> dh: d value = dy * gelu(gate), d gate = dy * value * gelu'(gate).
    fn bwd<T: Real>(&self, h: &[T], dy: &[T], inner: usize) -> Vec<T> {
        let half = T::from_f64(0.5);
        let inv_sqrt2 = T::from_f64(std::f64::consts::FRAC_1_SQRT_2);
        let c = T::from_f64(FRAC_1_SQRT_2PI);
        let mut out = vec![T::zero(); h.len()];
        out.par_chunks_mut(2 * inner * ROWS_PER_TASK)
            .zip(h.par_chunks(2 * inner * ROWS_PER_TASK))
            .zip(dy.par_chunks(inner * ROWS_PER_TASK))
            .for_each(|((out, h), dy)| {
                for ((o, h), dy) in out
                    .chunks_mut(2 * inner)
                    .zip(h.chunks(2 * inner))
                    .zip(dy.chunks(inner))
                {
                    let (value, gate) = h.split_at(inner);
                    let (d_value, d_gate) = o.split_at_mut(inner);
                    for j in 0..inner {
                        let (v, g, gy) = (value[j], gate[j], dy[j]);
                        let cdf = half * (T::one() + erf(g * inv_sqrt2));
                        let pdf = c * (T::zero() - half * g * g).exp();
                        d_value[j] = gy * g * cdf;
                        d_gate[j] = gy * v * (cdf + g * pdf);
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let last = *dims.last().unwrap_or(&0);
        if last % 2 != 0 {
            bail!("geglu: last dimension of {dims:?} is odd")
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().unwrap() = last / 2;
        dispatch!(self.name(), s, T => {
            let h = slice::<T>(s, l, self.name())?;
            Ok(storage(self.fwd(h, last / 2), out_dims))
        })
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(arg, &GegluBwd)?))
    }
}

/// The backward kernel of [`Geglu`]: (dy, h) -> dh.
struct GegluBwd;

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "fused-geglu-bwd"
    }

    fn cpu_fwd(
        &self,
        dys: &CpuStorage,
        dyl: &Layout,
        hs: &CpuStorage,
        hl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let inner = *hl.dims().last().unwrap_or(&0) / 2;
        dispatch!(self.name(), hs, T => {
            let dy = slice::<T>(dys, dyl, self.name())?;
            let h = slice::<T>(hs, hl, self.name())?;
            Ok(storage(Geglu.bwd(h, dy, inner), hl.shape().clone()))
        })
    }
}

/// diffusers' GEGLU on `h` (..., 2 * inner): first half * gelu_erf(second half). Requires
/// [`applies`].
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1(Geglu)
}

// ---------------------------------------------------------------------------------------------
// Transposes: (A, P, Q, R) -> (A, Q, P, R)
// ---------------------------------------------------------------------------------------------

/// Swaps the two middle dimensions of a contiguous (A, P, Q, R) tensor. Its own backward.
#[derive(Clone, Copy)]
struct SwapMiddle {
    a: usize,
    p: usize,
    q: usize,
    r: usize,
}

impl SwapMiddle {
    fn run<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let Self { p, q, r, .. } = *self;
        let mut out = vec![T::zero(); x.len()];
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

impl CustomOp1 for SwapMiddle {
    fn name(&self) -> &'static str {
        "swap-middle-dims"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        if l.shape().elem_count() != self.a * self.p * self.q * self.r {
            bail!("swap-middle-dims: input {:?}", l.dims())
        }
        dispatch!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            Ok(storage(self.run(x), (self.a, self.q, self.p, self.r)))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = SwapMiddle {
            a: self.a,
            p: self.q,
            q: self.p,
            r: self.r,
        };
        Ok(Some(grad.contiguous()?.apply_op1(back)?))
    }
}

/// `x.transpose(d, d + 1).contiguous()` where `x` has dims (A.., P, Q, R..) with P at `d`.
/// Requires [`applies`].
pub fn transpose_contiguous(x: &Tensor, d: usize) -> Result<Tensor> {
    let dims = x.dims();
    if d + 1 >= dims.len() {
        bail!("transpose_contiguous: dim {d} of {dims:?}")
    }
    let a: usize = dims[..d].iter().product();
    let r: usize = dims[d + 2..].iter().product();
    let (p, q) = (dims[d], dims[d + 1]);
    let mut out_dims = dims.to_vec();
    out_dims.swap(d, d + 1);
    x.contiguous()?
        .apply_op1(SwapMiddle { a, p, q, r })?
        .reshape(out_dims)
}

// ---------------------------------------------------------------------------------------------
// Convolution as im2col + one GEMM
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
    /// Append a column of ones, so that the bias rides along in the GEMM.
    ones: bool,
}

impl ConvGeom {
    fn out_hw(&self) -> (usize, usize) {
        let oh = (self.h + self.pad[0] + self.pad[1] - self.kh) / self.stride + 1;
        let ow = (self.w + self.pad[2] + self.pad[3] - self.kw) / self.stride + 1;
        (oh, ow)
    }

    fn row_len(&self) -> usize {
        self.c * self.kh * self.kw + usize::from(self.ones)
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

    /// (B, C, H, W) -> (B * oh * ow, C * kh * kw [+ 1]), rows ordered (b, oy, ox) and columns
    /// (c, ky, kx) like a flattened (C_out, C, kh, kw) weight.
    fn im2col<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let (oh, ow) = self.out_hw();
        let kp = self.row_len();
        let plane = self.h * self.w;
        let ranges: Vec<_> = (0..self.kw).map(|kx| self.valid_ox(kx, ow)).collect();
        let mut out = vec![T::zero(); self.b * oh * ow * kp];
        out.par_chunks_mut(ow * kp).enumerate().for_each(|(r, dst)| {
            let (b, oy) = (r / oh, r % oh);
            for c in 0..self.c {
                let src_plane = &x[(b * self.c + c) * plane..][..plane];
                for ky in 0..self.kh {
                    let Some(iy) = self.in_y(oy, ky) else {
                        continue;
                    };
                    let src = &src_plane[iy * self.w..][..self.w];
                    for (kx, range) in ranges.iter().enumerate() {
                        let k = (c * self.kh + ky) * self.kw + kx;
                        for ox in range.clone() {
                            let ix = ox * self.stride + kx - self.pad[2];
                            dst[ox * kp + k] = src[ix];
                        }
                    }
                }
            }
            if self.ones {
                for ox in 0..ow {
                    dst[ox * kp + kp - 1] = T::one();
                }
            }
        });
        out
    }

    /// The adjoint of [`Self::im2col`]: sums each column entry back into its input position.
    fn col2im<T: WithDType>(&self, cols: &[T]) -> Vec<T> {
        let (oh, ow) = self.out_hw();
        let kp = self.row_len();
        let kk = self.kh * self.kw;
        let mut out = vec![T::zero(); self.b * self.c * self.h * self.w];
        let ranges: Vec<_> = (0..self.kw).map(|kx| self.valid_ox(kx, ow)).collect();
        out.par_chunks_mut(self.h * self.w)
            .enumerate()
            .for_each(|(i, dst)| {
                let (b, c) = (i / self.c, i % self.c);
                for oy in 0..oh {
                    let rows = &cols[(b * oh + oy) * ow * kp..][..ow * kp];
                    for ky in 0..self.kh {
                        let Some(iy) = self.in_y(oy, ky) else {
                            continue;
                        };
                        let dst_row = &mut dst[iy * self.w..][..self.w];
                        for (kx, range) in ranges.iter().enumerate() {
                            let k = c * kk + ky * self.kw + kx;
                            for ox in range.clone() {
                                let ix = ox * self.stride + kx - self.pad[2];
                                dst_row[ix] += rows[ox * kp + k];
                            }
                        }
                    }
                }
            });
        out
    }
}

struct Im2Col(ConvGeom);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        if l.dims() != [g.b, g.c, g.h, g.w] {
            bail!("im2col: input {:?}, expected {:?}", l.dims(), [g.b, g.c, g.h, g.w])
        }
        let (oh, ow) = g.out_hw();
        dispatch!(self.name(), s, T => {
            let x = slice::<T>(s, l, self.name())?;
            Ok(storage(g.im2col(x), (g.b * oh * ow, g.row_len())))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Col2Im(self.0))?))
    }
}

struct Col2Im(ConvGeom);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (oh, ow) = g.out_hw();
        if l.dims() != [g.b * oh * ow, g.row_len()] {
            bail!("col2im: input {:?}", l.dims())
        }
        dispatch!(self.name(), s, T => {
            let cols = slice::<T>(s, l, self.name())?;
            Ok(storage(g.col2im(cols), (g.b, g.c, g.h, g.w)))
        })
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Im2Col(self.0))?))
    }
}

/// 2D convolution of `x` (B, C, H, W) with `weight` (C_out, C, kh, kw) and an optional bias,
/// zero padding `pad` = [top, bottom, left, right] and equal strides: im2col, then a single
/// (B·oh·ow, C·kh·kw) x (C·kh·kw, C_out) GEMM whose backward is two more GEMMs and a col2im.
/// Requires [`applies`].
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: [usize; 4],
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (c_out, c_w, kh, kw) = weight.dims4()?;
    if c_w != c {
        bail!("conv2d: input has {c} channels, weight {:?}", weight.dims())
    }
    if h + pad[0] + pad[1] < kh || w + pad[2] + pad[3] < kw {
        bail!("conv2d: input {h}x{w} (padding {pad:?}) smaller than the {kh}x{kw} kernel")
    }
    let geom = ConvGeom {
        b,
        c,
        h,
        w,
        kh,
        kw,
        stride,
        pad,
        ones: bias.is_some(),
    };
    let (oh, ow) = geom.out_hw();
    let cols = x.contiguous()?.apply_op1(Im2Col(geom))?;
    let w2 = weight.reshape((c_out, c * kh * kw))?;
    let w2 = match bias {
        Some(bias) => Tensor::cat(&[&w2, &bias.reshape((c_out, 1))?], 1)?,
        None => w2,
    };
    // (B·oh·ow, C_out) rows are channels-last; one transpose gives NCHW.
    let rows = cols.matmul(&w2.t()?)?;
    rows.reshape((b, oh * ow, c_out))?
        .apply_op1(SwapMiddle {
            a: b,
            p: oh * ow,
            q: c_out,
            r: 1,
        })?
        .reshape((b, c_out, oh, ow))
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
            let mut out = vec![T::zero(); x.len() * 4];
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
            let mut out = vec![T::zero(); b * c * h * w];
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
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
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
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
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
        let xs = xs.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap()).unwrap();
        xs.reshape(x.shape())
            .unwrap()
            .broadcast_mul(&g.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
            .unwrap()
    }

    #[test]
    fn group_norm_and_silu_match_composed_ops() {
        let x = (randn(&[3, 8, 5, 6], 1) * 3.0 + 0.5).unwrap();
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
        let x = (randn(&[2, 7, 12], 4) * 2.0 - 1.0).unwrap();
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
    fn softmax_geglu_transpose_upsample_match_composed_ops() {
        let x = (randn(&[2, 3, 5, 9], 7) * 4.0).unwrap();
        check(
            "softmax",
            &[x.clone()],
            &|t| scaled_softmax_last_dim(&t[0], 0.3).unwrap(),
            &|t| candle_nn::ops::softmax(&(&t[0] * 0.3).unwrap(), D::Minus1).unwrap(),
            1e-12,
        );
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
        for d in 0..3 {
            check(
                &format!("transpose {d}"),
                &[x.clone()],
                &|t| transpose_contiguous(&t[0], d).unwrap(),
                &|t| t[0].transpose(d, d + 1).unwrap().contiguous().unwrap(),
                1e-15,
            );
        }
        check(
            "upsample",
            &[x],
            &|t| upsample_nearest_2x(&t[0]).unwrap(),
            &|t| t[0].upsample_nearest2d(10, 18).unwrap(),
            1e-12,
        );
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
        // Asymmetric padding (the VAE's downsampler) against explicit zero padding.
        let inputs = [randn(&[2, 3, 8, 8], 40), randn(&[4, 3, 3, 3], 41)];
        check(
            "conv2d pad bottom/right",
            &inputs,
            &|t| conv2d(&t[0], &t[1], None, 2, [0, 1, 0, 1]).unwrap(),
            &|t| {
                let x = t[0].pad_with_zeros(2, 0, 1).unwrap().pad_with_zeros(3, 0, 1).unwrap();
                x.conv2d(&t[1], 0, 2, 1, 1).unwrap()
            },
            1e-12,
        );
    }
}
