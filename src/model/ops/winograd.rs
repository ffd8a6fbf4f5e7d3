//! 3x3 convolutions (stride 1, padding 1) by Winograd's minimal filtering, F(2x2, 3x3)
//! (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks").
//!
//! Why: the U-Net and the VAE spend most of their convolution time in 3x3 kernels, where
//! im2col and a GEMM cost 9 multiply-adds per output pixel, input channel and output channel.
//! Cut into tiles of 2x2 output pixels, a tile's 4x4 input patch d and the kernel g are carried
//! into a 4x4 "transform domain" (V = Bᵀ d B, U = G g Gᵀ), where the convolution becomes an
//! element-wise product (M = U ⊙ V, summed over input channels), and back (Y = Aᵀ M A). Over
//! all tiles and channels the products are 16 GEMMs (one per transform-domain position),
//! (C_out x C) · (C x tiles): 16 multiply-adds per 4 output pixels instead of 36, 2.25x fewer.
//! The transforms are additions only, and the values they write (16 per tile and channel, 4 per
//! pixel) are fewer than im2col's 9 per pixel.
//!
//! The matrices (Lavin & Gray, section 4.1) have entries 0, ±1 and ±1/2, so the transforms add
//! little rounding: the results agree with the direct convolution to 1e-13 in f64 (tests
//! below) and within f32 rounding in f32.
//!
//! The input is worked through in bands of whole rows of tiles, each band's transformed input
//! and products in buffers its worker reuses, small enough to stay in cache, as the direct
//! convolution does with its im2col bands. The kernels' transform is made per call (training,
//! whose weights change every step) or once and kept (inference, [`conv3x3_transformed`]).

use std::ops::Range;

use candle_core::WithDType;
use rayon::prelude::*;

use super::{gemm_threads, Scratch, SendPtr, Switch};

/// The fewest input channels worth it. The GEMMs' inner dimension is C (im2col's is 9·C): at 64
/// channels (the small default model's first level) they ran at half the rate of im2col's and
/// the convolution took 1.2x its time (`examples/op_shapes.rs`).
const MIN_CHANNELS: usize = 128;

/// The narrowest images worth it, in tiles: the transforms run along rows of tiles, and rows
/// of 4 tiles (8x8 images) made the convolution 1.7x slower than im2col's.
const MIN_TILES_X: usize = 8;

/// The fewest tiles (4 output pixels each, all images together) worth it when the kernels are
/// transformed in the call ([`conv3x3`], training) and when that was done once before
/// ([`conv3x3_transformed`], inference). The kernels' transform reads the weight and writes
/// 16/9 of it; with few tiles that costs more than the GEMMs save (`examples/op_shapes.rs`,
/// SD's 32x32 level at 512x512, 512 tiles: even; its 16x16 level, 128 tiles: 2.3x slower than
/// im2col with the transform in the call, 1.5x faster without it).
const MIN_TILES: usize = 512;
const MIN_TILES_KEPT: usize = 128;

/// The largest kernels (C·C_out) whose transform is kept between calls: it is 16/9 of the
/// weight, in memory next to it. SD 1.5's U-Net at 512x512 with every 3x3 transform kept peaked
/// at 5.5 GB instead of 3.6 GB (PyTorch: 4.4 GB), 1.3 GB of it its 1280-channel level's;
/// up to 1024 x 1024 its 320- and 640-channel levels keep theirs (0.4 GB), which give most of
/// the speed-up (`examples/op_shapes.rs`: 1.6-1.7x each, against 1.5x at 1280 channels).
const MAX_KEPT: usize = 1 << 20;

/// Whether the transform of `c_out` x `c` 3x3 kernels is worth keeping (see [`MAX_KEPT`]).
pub(super) fn worth_keeping(c: usize, c_out: usize) -> bool {
    c * c_out <= MAX_KEPT
}

/// Values of one band's transformed input plus its products (16·(C + C_out) per tile): 4 MiB
/// of f32, cache-sized as the direct convolution's im2col bands.
const BAND_VALUES: usize = 1 << 20;

/// Tiles in a band are a multiple of this: the GEMMs are vectorised over tiles, 64 at a time.
const TILE_STEP: usize = 64;

static ENABLED: Switch = Switch::new("SD_RS_WINOGRAD");

/// Switches Winograd's convolutions on or off for the whole process. They are on unless the
/// environment variable `SD_RS_WINOGRAD` is `0`; off, every convolution is im2col + GEMM (how
/// the two are compared).
pub fn set_enabled(on: bool) {
    ENABLED.set(on);
}

fn enabled() -> bool {
    ENABLED.get()
}

/// Whether a convolution of `c` input channels over `b` images of `h` x `w` by a `kh` x `kw`
/// kernel goes through [`conv3x3`], or with `kept` (kernels transformed beforehand) through
/// [`conv3x3_transformed`].
pub(super) fn applies(
    (b, c, h, w): (usize, usize, usize, usize),
    (kh, kw): (usize, usize),
    stride: usize,
    pad: [usize; 4],
    kept: bool,
) -> bool {
    let min_tiles = if kept { MIN_TILES_KEPT } else { MIN_TILES };
    enabled()
        && kh == 3
        && kw == 3
        && stride == 1
        && pad == [1; 4]
        && c >= MIN_CHANNELS
        && w.div_ceil(2) >= MIN_TILES_X
        && b * h.div_ceil(2) * w.div_ceil(2) >= min_tiles
}

/// A 3x3, stride 1, padding 1 convolution of `x` (B, C, H, W) by `weight` (C_out, C, 3, 3),
/// plus `bias` (C_out): the output (B, C_out, H, W).
pub(super) fn conv3x3<T: WithDType>(
    x: &[T],
    weight: &[T],
    bias: Option<&[T]>,
    dims: (usize, usize, usize, usize),
    c_out: usize,
) -> Vec<T> {
    let u = transform_kernels(weight, dims.1, c_out);
    conv3x3_transformed(x, &u, bias, dims, c_out)
}

/// [`conv3x3`] with the kernels already transformed by [`transform_kernels`] (16 matrices
/// (C_out, C)).
pub(super) fn conv3x3_transformed<T: WithDType>(
    x: &[T],
    u: &[T],
    bias: Option<&[T]>,
    (b, c, h, w): (usize, usize, usize, usize),
    c_out: usize,
) -> Vec<T> {
    let geometry = Geometry {
        c,
        h,
        w,
        tiles_y: h.div_ceil(2),
        tiles_x: w.div_ceil(2),
    };
    let tile_rows = b * geometry.tiles_y;

    // A band is whole rows of tiles (of one image or running on into the next), so that the
    // transforms run along rows; about `TILE_STEP`-tile multiples within `BAND_VALUES`.
    let tiles_wanted = (BAND_VALUES / (16 * (c + c_out)) / TILE_STEP).max(1) * TILE_STEP;
    let rows = tiles_wanted.div_ceil(geometry.tiles_x).clamp(1, tile_rows);
    let bands: Vec<usize> = (0..tile_rows).step_by(rows).collect();
    let threads = rayon::current_num_threads();
    // Enough bands keep every worker busy with its own; otherwise the GEMMs are parallel.
    let parallel_gemm = bands.len() < 2 * threads;
    let gemm_parallelism = gemm_threads(if parallel_gemm { threads } else { 1 });

    // Every value is written by the output transform of the tile it lies in.
    let mut out: Vec<T> = Vec::with_capacity(b * c_out * h * w);
    let dst = SendPtr(out.as_mut_ptr());
    let run = |(v, m): &mut (Scratch<T>, Scratch<T>), &r0: &usize| {
        let band_rows = r0..(r0 + rows).min(tile_rows);
        let n = band_rows.len() * geometry.tiles_x;
        let (v, m) = (&mut v[..16 * c * n], &mut m[..16 * c_out * n]);
        geometry.transform_input(x, band_rows.clone(), v);
        for xi in 0..16 {
            // SAFETY: u[xi] is (c_out, c), v[xi] (c, n) and m[xi] (c_out, n), all row-major
            // and in bounds.
            unsafe {
                gemm::gemm(
                    c_out,
                    n,
                    c,
                    m[xi * c_out * n..].as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    u[xi * c_out * c..].as_ptr(),
                    1,
                    c as isize,
                    v[xi * c * n..].as_ptr(),
                    1,
                    n as isize,
                    T::zero(),
                    T::one(),
                    false,
                    false,
                    false,
                    gemm_parallelism,
                )
            }
        }
        // SAFETY: the output pixels of these tile rows, which no other band writes, inside
        // `out`'s capacity, which outlives the call.
        unsafe { geometry.transform_output(m, bias, c_out, band_rows, dst) };
    };
    let n_max = rows * geometry.tiles_x;
    let buffers = || {
        (
            Scratch::new(16 * c * n_max),
            Scratch::new(16 * c_out * n_max),
        )
    };
    if parallel_gemm {
        let mut buffers = buffers();
        bands.iter().for_each(|r0| run(&mut buffers, r0));
    } else {
        bands.par_iter().for_each_init(buffers, run);
    }
    // SAFETY: the bands cover all tile rows, and each tile's output transform wrote every pixel
    // of its 2x2 block that lies inside the image, for every output channel: all B·C_out·H·W.
    unsafe { out.set_len(b * c_out * h * w) };
    out
}

/// U = G g Gᵀ for every (output, input) channel pair, as 16 matrices (C_out, C), one per
/// transform-domain position. G = [1 0 0; ½ ½ ½; ½ -½ ½; 0 0 1].
///
/// Per output channel, the nine taps are first gathered into nine rows over the input
/// channels, so that the transform is element-wise over contiguous rows (vectorised) and
/// writes each matrix's row for this output channel contiguously.
#[allow(clippy::needless_range_loop)] // ci indexes nine tap rows and writes 16 matrix rows
pub(super) fn transform_kernels<T: WithDType>(weight: &[T], c: usize, c_out: usize) -> Vec<T> {
    let half = T::from_f64(0.5);
    let plane = c_out * c;
    let mut u: Vec<T> = Vec::with_capacity(16 * plane);
    let dst = SendPtr(u.as_mut_ptr());
    weight.par_chunks_exact(9 * c).enumerate().for_each_init(
        || vec![T::zero(); 9 * c],
        |taps, (co, kernels)| {
            for (ci, g) in kernels.chunks_exact(9).enumerate() {
                for (k, &value) in g.iter().enumerate() {
                    taps[k * c + ci] = value;
                }
            }
            let g: [&[T]; 9] = std::array::from_fn(|k| &taps[k * c..][..c]);
            // Row co of each of the 16 matrices, which only this worker writes.
            let rows: [*mut T; 16] =
                std::array::from_fn(|xi| unsafe { dst.get().add(xi * plane + co * c) });
            for ci in 0..c {
                // g Gᵀ (3 x 4), then G (g Gᵀ) (4 x 4).
                let g_gt = [0, 3, 6].map(|r| {
                    let (a, b, d) = (g[r][ci], g[r + 1][ci], g[r + 2][ci]);
                    [a, (a + b + d) * half, (a - b + d) * half, d]
                });
                for j in 0..4 {
                    let (a, b, d) = (g_gt[0][j], g_gt[1][j], g_gt[2][j]);
                    // SAFETY: ci < c, inside row co of matrix (i, j).
                    unsafe {
                        *rows[j].add(ci) = a;
                        *rows[4 + j].add(ci) = (a + b + d) * half;
                        *rows[8 + j].add(ci) = (a - b + d) * half;
                        *rows[12 + j].add(ci) = d;
                    }
                }
            }
        },
    );
    // SAFETY: every output channel's worker wrote its row of all 16 matrices.
    unsafe { u.set_len(16 * plane) };
    u
}

/// Where the tiles are: tile row r of all images is image r / tiles_y, row r % tiles_y in it;
/// tile (ty, tx) covers output rows 2ty..2ty + 2 and columns 2tx..2tx + 2, and reads the 4x4
/// input patch from row 2ty - 1 and column 2tx - 1 (the padding).
#[derive(Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    w: usize,
    tiles_y: usize,
    tiles_x: usize,
}

impl Geometry {
    /// V = Bᵀ d B of the tiles of `tile_rows`, for every input channel, into `v` as 16 matrices
    /// (C, n), tiles in order. Bᵀ = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1].
    ///
    /// Along a row of tiles: Bᵀ d combines four input rows column by column, then (Bᵀ d) B
    /// combines columns 2tx - 1..2tx + 3 of those; split into even and odd columns, tile tx
    /// reads even[tx], odd[tx], even[tx + 1], odd[tx + 1], so both steps are loops over
    /// contiguous values that the compiler vectorises.
    fn transform_input<T: WithDType>(&self, x: &[T], tile_rows: Range<usize>, v: &mut [T]) {
        let (c, h, w, tx_n) = (self.c, self.h, self.w, self.tiles_x);
        let n = tile_rows.len() * tx_n;
        let plane = h * w;
        // Columns -1..2·tiles_x + 1 of the four combined rows, split by parity: even[t] holds
        // column 2t - 1 of each, odd[t] column 2t.
        let mut even = vec![[T::zero(); 4]; tx_n + 1];
        let mut odd = vec![[T::zero(); 4]; tx_n + 1];
        let zero_row = vec![T::zero(); w];
        for ci in 0..c {
            for (row_index, r) in tile_rows.clone().enumerate() {
                let (image, ty) = (r / self.tiles_y, r % self.tiles_y);
                let src = &x[(image * c + ci) * plane..][..plane];
                let input_row = |i: usize| -> &[T] {
                    let y = (2 * ty + i).wrapping_sub(1);
                    if y < h {
                        &src[y * w..][..w]
                    } else {
                        &zero_row
                    }
                };
                let (d0, d1, d2, d3) = (input_row(0), input_row(1), input_row(2), input_row(3));
                // Bᵀ d for column x lands at even/odd (x + 1) / 2.
                for xx in 0..2 * tx_n + 2 {
                    let col = xx.wrapping_sub(1);
                    let combined = if col < w {
                        let (a, b, c2, d) = (d0[col], d1[col], d2[col], d3[col]);
                        [a - c2, b + c2, c2 - b, b - d]
                    } else {
                        [T::zero(); 4]
                    };
                    if xx % 2 == 0 {
                        even[xx / 2] = combined;
                    } else {
                        odd[xx / 2] = combined;
                    }
                }
                let k0 = row_index * tx_n;
                for i in 0..4 {
                    let at = |j: usize| ((i * 4 + j) * c + ci) * n + k0;
                    let v0 = &mut v[at(0)..][..tx_n];
                    for t in 0..tx_n {
                        v0[t] = even[t][i] - even[t + 1][i];
                    }
                    let v1 = &mut v[at(1)..][..tx_n];
                    for t in 0..tx_n {
                        v1[t] = odd[t][i] + even[t + 1][i];
                    }
                    let v2 = &mut v[at(2)..][..tx_n];
                    for t in 0..tx_n {
                        v2[t] = even[t + 1][i] - odd[t][i];
                    }
                    let v3 = &mut v[at(3)..][..tx_n];
                    for t in 0..tx_n {
                        v3[t] = odd[t][i] - odd[t + 1][i];
                    }
                }
            }
        }
    }

    /// Y = Aᵀ M A (+ bias) of the tiles of `tile_rows`, for every output channel, from the
    /// products `m` (16 matrices (C_out, n)) into the output (B, C_out, H, W) at `dst`, the
    /// pixels inside the image only. Aᵀ = [1 1 1 0; 0 1 -1 -1].
    ///
    /// # Safety
    /// `dst` must point to B·C_out·H·W values that no other thread writes at these tiles'
    /// pixels during the call.
    unsafe fn transform_output<T: WithDType>(
        &self,
        m: &[T],
        bias: Option<&[T]>,
        c_out: usize,
        tile_rows: Range<usize>,
        dst: SendPtr<T>,
    ) {
        let (h, w, tx_n) = (self.h, self.w, self.tiles_x);
        let n = tile_rows.len() * tx_n;
        let plane = h * w;
        // The two output rows of a row of tiles, 2·tiles_x wide (one more than w when w is odd).
        let (mut top, mut bottom) = (vec![T::zero(); 2 * tx_n], vec![T::zero(); 2 * tx_n]);
        for co in 0..c_out {
            let b = bias.map_or(T::zero(), |b| b[co]);
            for (row_index, r) in tile_rows.clone().enumerate() {
                let (image, ty) = (r / self.tiles_y, r % self.tiles_y);
                let k0 = row_index * tx_n;
                let mat = |i: usize, j: usize| &m[((i * 4 + j) * c_out + co) * n + k0..][..tx_n];
                // Aᵀ M: row 0 = m0 + m1 + m2, row 1 = m1 - m2 - m3 (rows of M), per column j;
                // then each times A.
                let [a0, a1, a2, a3] = [0, 1, 2, 3].map(|j| {
                    let (p, q, s) = (mat(0, j), mat(1, j), mat(2, j));
                    move |t: usize| p[t] + q[t] + s[t]
                });
                let [b0, b1, b2, b3] = [0, 1, 2, 3].map(|j| {
                    let (q, s, u) = (mat(1, j), mat(2, j), mat(3, j));
                    move |t: usize| q[t] - s[t] - u[t]
                });
                for t in 0..tx_n {
                    top[2 * t] = a0(t) + a1(t) + a2(t) + b;
                    top[2 * t + 1] = a1(t) - a2(t) - a3(t) + b;
                    bottom[2 * t] = b0(t) + b1(t) + b2(t) + b;
                    bottom[2 * t + 1] = b1(t) - b2(t) - b3(t) + b;
                }
                let out = dst.get().add((image * c_out + co) * plane);
                for (i, row) in [&top, &bottom].into_iter().enumerate() {
                    let oy = 2 * ty + i;
                    if oy < h {
                        std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(oy * w), w);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution by its definition, in f64.
    fn direct(
        x: &[f64],
        weight: &[f64],
        bias: &[f64],
        (b, c, h, w): (usize, usize, usize, usize),
        c_out: usize,
    ) -> Vec<f64> {
        let mut out = vec![0.0; b * c_out * h * w];
        for image in 0..b {
            for co in 0..c_out {
                for y in 0..h {
                    for xx in 0..w {
                        let mut sum = bias[co];
                        for ci in 0..c {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (y + ky, xx + kx);
                                    if iy < 1 || ix < 1 || iy > h || ix > w {
                                        continue;
                                    }
                                    sum += x[((image * c + ci) * h + iy - 1) * w + ix - 1]
                                        * weight[((co * c + ci) * 3 + ky) * 3 + kx];
                                }
                            }
                        }
                        out[((image * c_out + co) * h + y) * w + xx] = sum;
                    }
                }
            }
        }
        out
    }

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect()
    }

    /// Odd and even sizes (tiles half outside the image), several images, bands that split
    /// images (a 5x7 image has 12 tiles; 64-tile bands end mid-image), one band and many.
    #[test]
    fn matches_the_direct_convolution() {
        for (dims, c_out) in [
            ((3, 2, 5, 7), 3),
            ((1, 3, 8, 8), 2),
            ((2, 1, 1, 1), 1),
            ((1, 2, 2, 9), 4),
            ((11, 2, 5, 7), 2),
        ] {
            let (b, c, h, w) = dims;
            let x = values(b * c * h * w, 1);
            let weight = values(c_out * c * 9, 2);
            let bias = values(c_out, 3);
            let expected = direct(&x, &weight, &bias, dims, c_out);
            let got = conv3x3(&x, &weight, Some(&bias), dims, c_out);
            let worst = expected
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(
                worst < 1e-13,
                "{dims:?} -> {c_out}: worst difference {worst}"
            );
        }
    }

    /// In f32 as the models run it, against f64: errors of the order of the direct
    /// convolution's own rounding (sums of 9·C products).
    #[test]
    fn f32_error_is_that_of_rounding() {
        let (dims, c_out) = ((2, 64, 12, 10), 32);
        let (b, c, h, w) = dims;
        let x = values(b * c * h * w, 4);
        let weight = values(c_out * c * 9, 5);
        let bias = values(c_out, 6);
        let expected = direct(&x, &weight, &bias, dims, c_out);
        let f = |v: &[f64]| v.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let got = conv3x3(&f(&x), &f(&weight), Some(&f(&bias)), dims, c_out);
        let worst = expected
            .iter()
            .zip(&got)
            .map(|(a, &b)| (a - b as f64).abs())
            .fold(0.0, f64::max);
        // Values are sums of 576 products of magnitude < 1: about ±8.
        assert!(worst < 2e-5, "worst difference {worst}");
    }

    #[test]
    fn applies_to_3x3_stride_1_padding_1_with_enough_channels_and_tiles() {
        if !enabled() {
            return; // SD_RS_WINOGRAD=0
        }
        let big = (2, 128, 32, 32);
        for kept in [false, true] {
            assert!(applies(big, (3, 3), 1, [1; 4], kept));
            assert!(!applies(big, (3, 3), 2, [1; 4], kept));
            assert!(!applies(big, (3, 3), 1, [0, 1, 0, 1], kept));
            assert!(!applies(big, (1, 1), 1, [0; 4], kept));
            assert!(!applies((2, 64, 32, 32), (3, 3), 1, [1; 4], kept));
            assert!(!applies((32, 128, 8, 8), (3, 3), 1, [1; 4], kept));
            assert!(applies((32, 128, 16, 16), (3, 3), 1, [1; 4], kept));
        }
        assert!(worth_keeping(640, 1280) && !worth_keeping(1280, 1280));
        // SD's 16x16 level, guidance pair: 128 tiles.
        assert!(applies((2, 1280, 16, 16), (3, 3), 1, [1; 4], true));
        assert!(!applies((2, 1280, 16, 16), (3, 3), 1, [1; 4], false));
    }
}
