//! Building blocks shared by the U-Net and the autoencoder, named exactly like diffusers'
//! modules so that `VarBuilder` paths are diffusers' checkpoint keys.
//!
//! Everything here has a backward pass: the same code serves inference and training. candle's
//! fused fast paths (`softmax_last_dim`, `candle_nn::LayerNorm`'s kernel, `ops::layer_norm`) stop
//! gradients without an error, so they are not used. Instead, on the CPU in f32/f64 the hot
//! patterns (GroupNorm+SiLU, convolution, linear, LayerNorm, attention, GEGLU, layout changes,
//! upsampling) go through the fused kernels of [`super::ops`], which carry their own backward;
//! elsewhere (CUDA, Metal, half precision) the same layers are composed from candle ops, which
//! is the reference the kernels are tested against.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::ops;
use crate::profile;

/// `w` in the dtype of the activations `x`. Mixed-precision training keeps f32 weights and runs
/// the network in bf16/f16; the cast is differentiable, so the gradients reach the f32 weights.
/// When the dtypes already agree (inference, plain training) this is a cheap handle copy.
pub fn cast_like(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    if w.dtype() == x.dtype() {
        Ok(w.clone())
    } else {
        w.to_dtype(x.dtype())
    }
}

/// SiLU ("swish"), the only activation Stable Diffusion's U-Net and VAE use.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    x.silu()
}

/// Views `x` as (A, P, Q, R), swaps P and Q, and reshapes to `out`: the layout changes between
/// feature maps, tokens and heads. One fused node on the CPU.
pub(crate) fn swap(
    x: &Tensor,
    view: (usize, usize, usize, usize),
    out: &[usize],
) -> Result<Tensor> {
    let _profile = profile::scope("transpose (channels <-> tokens, heads)", x.device());
    if ops::applies(x) {
        ops::swap_dims(x, view, out)
    } else {
        x.reshape(view)?.transpose(1, 2)?.contiguous()?.reshape(out)
    }
}

/// Checks an activation name from a config and returns an error naming it if it isn't SiLU.
pub fn check_act_fn(key: &str, value: &str) -> anyhow::Result<()> {
    match value {
        "silu" | "swish" => Ok(()),
        other => anyhow::bail!("unsupported {key} = {other:?} in config.json (only \"silu\")"),
    }
}

/// `torch.nn.GroupNorm` (weight, bias) over (B, C, *).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// The composed version: plain tensor ops (differentiable), half precision computed in f32.
    composed: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// GroupNorm followed by SiLU, the pair every ResnetBlock2D and output head uses; one fused
    /// kernel on the CPU.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = profile::scope("group norm", x.device());
        if ops::applies(x) {
            ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, true)
        } else {
            silu(&self.composed(x)?.forward(x)?)
        }
    }

    /// candle's GroupNorm with the weights in `x`'s dtype.
    fn composed(&self, x: &Tensor) -> Result<candle_nn::GroupNorm> {
        if self.weight.dtype() == x.dtype() {
            return Ok(self.composed.clone());
        }
        let channels = self.weight.elem_count();
        candle_nn::GroupNorm::new(
            cast_like(&self.weight, x)?,
            cast_like(&self.bias, x)?,
            channels,
            self.groups,
            self.eps,
        )
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = profile::scope("group norm", x.device());
        if ops::applies(x) {
            ops::group_norm(x, &self.weight, &self.bias, self.groups, self.eps, false)
        } else {
            self.composed(x)?.forward(x)
        }
    }
}

/// `nn.GroupNorm(groups, channels, eps)`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
    let composed = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
    Ok(GroupNorm {
        weight,
        bias,
        groups,
        eps,
        composed,
    })
}

/// `nn.Conv2d` with a square kernel, equal stride and padding on both axes.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    composed: candle_nn::Conv2d,
    /// Weights loaded for inference (not trained variables): their Winograd transform, made on
    /// first use (see [`ops::conv2d_fixed_weights`]).
    winograd: OnceLock<Tensor>,
}

impl Conv2d {
    /// The convolution with explicit zero padding [top, bottom, left, right] instead of the
    /// configured one (the VAE downsampler pads only bottom and right).
    pub fn forward_padded(&self, x: &Tensor, pad: [usize; 4]) -> Result<Tensor> {
        let _profile = profile::scope("conv2d", x.device());
        if ops::applies(x) {
            return ops::conv2d(x, &self.weight, self.bias.as_ref(), self.stride, pad);
        }
        let [top, bottom, left, right] = pad;
        let x = x
            .pad_with_zeros(2, top, bottom)?
            .pad_with_zeros(3, left, right)?;
        let y = same_parity(&x)?.conv2d(&cast_like(&self.weight, &x)?, 0, self.stride, 1, 1)?;
        match &self.bias {
            Some(bias) => y.broadcast_add(&cast_like(bias, &y)?.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = profile::scope("conv2d", x.device());
        if ops::applies(x) {
            let (p, bias) = ([self.padding; 4], self.bias.as_ref());
            if self.weight.is_variable() {
                ops::conv2d(x, &self.weight, bias, self.stride, p)
            } else {
                ops::conv2d_fixed_weights(x, &self.weight, bias, self.stride, p, &self.winograd)
            }
        } else if self.weight.dtype() == x.dtype() {
            self.composed.forward(x)
        } else {
            let bias = self.bias.as_ref().map(|b| cast_like(b, x)).transpose()?;
            candle_nn::Conv2d::new(cast_like(&self.weight, x)?, bias, *self.composed.config())
                .forward(x)
        }
    }
}

/// `nn.Conv2d(in, out, kernel, stride, padding)` with bias.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    let composed = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?;
    Ok(Conv2d {
        weight: composed.weight().clone(),
        bias: composed.bias().cloned(),
        stride,
        padding,
        composed,
        winograd: OnceLock::new(),
    })
}

/// `nn.Linear`, applied over the last dimension of inputs of any rank.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// (out, in), as checkpoints store it.
    OutIn(Tensor),
    /// Stored transposed, (in, out), from its first use on: see
    /// [`Linear::transposed_for_inference`].
    InOut(Arc<TransposeOnFirstUse>),
}

/// A weight transposed when it is first used rather than when it is loaded: loading then only
/// maps the file (crate::mapped), and the original's pages are freed once the copy is made, so
/// the weight is resident once.
#[derive(Debug)]
struct TransposeOnFirstUse {
    original: Mutex<Option<Tensor>>,
    transposed: OnceLock<Tensor>,
}

impl TransposeOnFirstUse {
    fn get(&self) -> Result<&Tensor> {
        if let Some(t) = self.transposed.get() {
            return Ok(t);
        }
        let mut original = self.original.lock().unwrap();
        // Another thread may have made it while this one waited for the lock.
        if let Some(t) = self.transposed.get() {
            return Ok(t);
        }
        let weight = original.take().expect("held until transposed");
        match ops::transpose_2d(&weight) {
            Ok(t) => Ok(self.transposed.get_or_init(|| t)),
            Err(e) => {
                *original = Some(weight);
                Err(e)
            }
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = profile::scope("linear", x.device());
        let weight = match &self.weight {
            LinearWeight::OutIn(w) => w.clone(),
            LinearWeight::InOut(lazy) => {
                let weight_t = lazy.get()?;
                if ops::applies(x) {
                    return ops::linear_kn(x, weight_t, self.bias.as_ref());
                }
                weight_t.t()?
            }
        };
        if ops::applies(x) {
            ops::linear(x, &weight, self.bias.as_ref())
        } else if weight.dtype() == x.dtype() {
            candle_nn::Linear::new(weight, self.bias.clone()).forward(x)
        } else {
            let bias = self.bias.as_ref().map(|b| cast_like(b, x)).transpose()?;
            candle_nn::Linear::new(cast_like(&weight, x)?, bias).forward(x)
        }
    }
}

impl Linear {
    /// From its weight (out, in) and optional bias (out).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: LinearWeight::OutIn(weight),
            bias,
        }
    }

    /// A frozen weight on the CPU stored transposed, (in, out), for the fused GEMM to read with
    /// unit stride: 1.1-1.8x faster GEMMs on CLIP-L's shapes, where 77 tokens per prompt meet
    /// 768x3072 weights (scripts/gemm-vs-mkl). Trained weights (variables) and other devices are
    /// left as they are; so are layers with many input rows (the U-Net's), where packing the
    /// weight is a small part of the GEMM and the transposition would only lengthen loading.
    /// The copy is made on first use, so loading stays a memory map (0.1-0.25 s for CLIP-L).
    pub fn transposed_for_inference(self) -> Self {
        match &self.weight {
            // `applies`: on the CPU, in f32/f64, with the fused kernels on (they read it).
            LinearWeight::OutIn(w) if !w.is_variable() && ops::applies(w) => Self {
                weight: LinearWeight::InOut(Arc::new(TransposeOnFirstUse {
                    original: Mutex::new(Some(w.clone())),
                    transposed: OnceLock::new(),
                })),
                bias: self.bias,
            },
            _ => self,
        }
    }
}

/// `nn.Linear` with or without bias.
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let composed = if bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    };
    Ok(Linear::new(
        composed.weight().clone(),
        composed.bias().cloned(),
    ))
}

/// `nn.LayerNorm` over the last dimension, written from mean and variance so that it has a
/// backward pass (candle_nn::LayerNorm's fused kernel has none). Half inputs are normalised in
/// f32, as PyTorch does internally.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let _profile = profile::scope("layer norm", x.device());
        if ops::applies(x) {
            return ops::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        let dtype = x.dtype();
        let x = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let normed = normed.to_dtype(dtype)?;
        normed
            .broadcast_mul(&cast_like(&self.weight, &normed)?)?
            .broadcast_add(&cast_like(&self.bias, &normed)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Timesteps
// ---------------------------------------------------------------------------------------------

/// diffusers' `get_timestep_embedding`: sinusoidal features of one (possibly fractional)
/// timestep per sample. `timesteps` has shape (B,); the result is (B, dim) in f32.
///
/// The frequencies are computed in f32 in the same order of operations as diffusers so that the
/// large arguments (t up to 999) round the same way.
pub fn timestep_embedding(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let log_max_period = -(10000f64.ln()) as f32;
    let denom = half as f32 - freq_shift as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((log_max_period * i as f32) / denom).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let t = timesteps.to_dtype(DType::F32)?.unsqueeze(1)?;
    let args = t.broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// diffusers' `TimestepEmbedding`: linear_1, SiLU, linear_2.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, time_embed_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, time_embed_dim, true, vb.pp("linear_1"))?,
            linear_2: linear(time_embed_dim, time_embed_dim, true, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&silu(&self.linear_1.forward(x)?)?)
    }
}

// ---------------------------------------------------------------------------------------------
// ResnetBlock2D, Downsample2D, Upsample2D
// ---------------------------------------------------------------------------------------------

/// Settings of diffusers' `ResnetBlock2D` (time_embedding_norm "default", pre_norm, SiLU).
#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `None` for the autoencoder, whose blocks take no time embedding.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(cfg: &ResnetBlock2DConfig, vb: VarBuilder) -> Result<Self> {
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(linear(t, cout, true, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(conv2d(cin, cout, 1, 1, 0, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, cin, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(cin, cout, 3, 1, 1, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: group_norm(cfg.groups, cout, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(cout, cout, 3, 1, 1, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is the (B, temb_channels) time embedding, `None` for the autoencoder.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(&silu(temb)?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            (None, _) => h,
            (Some(_), None) => {
                candle_core::bail!("ResnetBlock2D has time_emb_proj but got no time embedding")
            }
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let x = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (x + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// diffusers' `Downsample2D` with a convolution (`downsamplers.0.conv`), stride 2.
/// With `padding == 0` (the autoencoder) diffusers pads one zero row/column at the bottom/right
/// first, which makes the result differ from padding 1 on both sides.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(
        channels: usize,
        out_channels: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, out_channels, 3, 2, padding, vb.pp("conv"))?,
            pad_bottom_right: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            self.conv.forward_padded(x, [0, 1, 0, 1])
        } else if ops::applies(x) {
            // The fused convolution's backward has no parity restriction.
            self.conv.forward(x)
        } else {
            self.conv.forward(&same_parity(x)?)
        }
    }
}

/// candle 0.11's conv2d backward (the composed path) derives the transposed convolution's output padding from the
/// height alone, so a stride-2 conv over a map whose height and width differ in parity (e.g. a
/// 16x9 latent) fails in backward with a shape mismatch. One extra zero row/column at the end of
/// the odd dimension makes both even without changing the forward result: for a 3x3 stride-2
/// window the last output of an odd-sized input already reads that position as padding (or
/// never reaches it).
fn same_parity(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    match (h % 2, w % 2) {
        (1, 0) => x.pad_with_zeros(2, 0, 1),
        (0, 1) => x.pad_with_zeros(3, 0, 1),
        _ => Ok(x.clone()),
    }
}

/// Nearest-neighbour upsampling to `(out_h, out_w)` with PyTorch's index rule
/// `src = floor(dst * in / out)`.
///
/// The exact 2x case is a broadcast + reshape rather than candle's `upsample_nearest2d`, whose
/// backward overwrites (instead of accumulating into) the input's gradient. Other sizes (odd
/// latent sizes, where diffusers passes `upsample_size`) use `index_select`, also differentiable.
pub fn upsample_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let _profile = profile::scope("upsample", x.device());
    let (b, c, h, w) = x.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        if ops::applies(x) {
            return ops::upsample_nearest_2x(x);
        }
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .reshape((b, c, out_h, out_w));
    }
    let index = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..n_out)
            .map(|i| ((i * n_in) / n_out).min(n_in - 1) as u32)
            .collect();
        Tensor::new(idx, x.device())
    };
    let x = if out_h != h {
        x.index_select(&index(h, out_h)?, 2)?
    } else {
        x.clone()
    };
    if out_w != w {
        x.index_select(&index(w, out_w)?, 3)
    } else {
        Ok(x)
    }
}

/// diffusers' `Upsample2D` with a convolution (`upsamplers.0.conv`): nearest x2 (or to the
/// size of the matching skip connection), then a 3x3 conv.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, out_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv2d(channels, out_channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// `size`: the output (height, width); `None` doubles both.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest(x, oh, ow)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Upper bound on the number of attention-score elements materialised at once. Larger problems
/// are split over query rows, which is exact (softmax is per query) and bounds memory.
const ATTENTION_SCORE_CHUNK: usize = 1 << 24;

/// Scaled dot-product attention, the one place all attention in the crate goes through.
/// `q`: (B, H, Nq, d), `k`, `v`: (B, H, Nk, d); returns (B, H, Nq, d).
///
/// Scores and softmax are computed in f32 for half-precision inputs (diffusers'
/// `upcast_attention`/`upcast_softmax`, and what PyTorch's SDPA does internally), then the
/// probabilities are cast back for the product with `v`.
///
/// On the CPU in f32/f64 this is one fused kernel (with its own backward) that holds only a
/// block of scores per head at a time; elsewhere it is [`attention_chunked`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let _profile = profile::scope("attention (scores, softmax, values)", q.device());
    if ops::applies(q) && ops::applies(k) && ops::applies(v) {
        return ops::attention(q, k, v, scale);
    }
    attention_chunked(q, k, v, scale, ATTENTION_SCORE_CHUNK)
}

/// [`attention`] over `heads` heads of tokens: `q` (B, Nq, heads * d), `k`, `v`
/// (B, Nk, heads * d), as the projections make them; returns (B, Nq, heads * d) for the output
/// projection. On the CPU in f32/f64 the fused kernel reads and writes this layout itself;
/// elsewhere the heads are split off and merged back around [`attention_chunked`].
pub fn attention_tokens(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let _profile = profile::scope("attention (scores, softmax, values)", q.device());
    if ops::applies(q) && ops::applies(k) && ops::applies(v) {
        return ops::attention_tokens(q, k, v, heads, scale, false);
    }
    let (b, nq, hd) = q.dims3()?;
    let d = hd / heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        let n = x.dim(1)?;
        swap(x, (b, n, heads, d), &[b, heads, n, d])
    };
    let out = attention_chunked(
        &split(q)?,
        &split(k)?,
        &split(v)?,
        scale,
        ATTENTION_SCORE_CHUNK,
    )?;
    swap(&out, (b, heads, nq, d), &[b, nq, hd])
}

/// [`attention`] composed from candle ops, materialising at most about `max_score_elems`
/// scores at a time (at least one query row per chunk).
pub fn attention_chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    max_score_elems: usize,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let upcast = matches!(dtype, DType::F16 | DType::BF16);
    let (b, h, nq, _) = q.dims4()?;
    let nk = k.dim(2)?;
    let (q, kt) = if upcast {
        (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?.t()?)
    } else {
        (q.clone(), k.t()?)
    };
    let kt = kt.contiguous()?;
    let v = v.contiguous()?;
    let rows_per_chunk = (max_score_elems / (b * h * nk).max(1)).clamp(1, nq);
    let mut outs = Vec::with_capacity(nq.div_ceil(rows_per_chunk));
    let mut start = 0;
    while start < nq {
        let len = rows_per_chunk.min(nq - start);
        let q_chunk = if len == nq {
            q.clone()
        } else {
            q.narrow(2, start, len)?
        };
        let scores = (q_chunk.contiguous()?.matmul(&kt)? * scale)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(dtype)?;
        outs.push(probs.matmul(&v)?);
        start += len;
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 2)
    }
}

/// Settings of diffusers' `Attention` module as Stable Diffusion uses it.
#[derive(Debug, Clone, Copy)]
pub struct AttentionConfig {
    pub query_dim: usize,
    /// Width of the context for cross-attention; `None` for self-attention.
    pub cross_attention_dim: Option<usize>,
    pub heads: usize,
    pub dim_head: usize,
    /// Bias on to_q/to_k/to_v (false in the U-Net, true in the VAE).
    pub qkv_bias: bool,
    /// `Some((groups, eps))`: the VAE mid-block's `group_norm` applied to the input.
    pub group_norm: Option<(usize, f64)>,
    /// Add the input back (the VAE mid-block attention).
    pub residual_connection: bool,
    pub rescale_output_factor: f64,
}

/// diffusers' `Attention` (to_q, to_k, to_v, to_out.0, optional group_norm) with the default
/// processor's semantics. Accepts (B, N, C) tokens or, like diffusers, a (B, C, H, W) map.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    group_norm: Option<GroupNorm>,
    heads: usize,
    dim_head: usize,
    residual_connection: bool,
    rescale_output_factor: f64,
}

impl Attention {
    pub fn new(cfg: &AttentionConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let kv_dim = cfg.cross_attention_dim.unwrap_or(cfg.query_dim);
        let group_norm = match cfg.group_norm {
            Some((groups, eps)) => {
                Some(group_norm(groups, cfg.query_dim, eps, vb.pp("group_norm"))?)
            }
            None => None,
        };
        Ok(Self {
            to_q: linear(cfg.query_dim, inner, cfg.qkv_bias, vb.pp("to_q"))?,
            to_k: linear(kv_dim, inner, cfg.qkv_bias, vb.pp("to_k"))?,
            to_v: linear(kv_dim, inner, cfg.qkv_bias, vb.pp("to_v"))?,
            to_out: linear(inner, cfg.query_dim, true, vb.pp("to_out.0"))?,
            group_norm,
            heads: cfg.heads,
            dim_head: cfg.dim_head,
            residual_connection: cfg.residual_connection,
            rescale_output_factor: cfg.rescale_output_factor,
        })
    }

    /// `context`: (B, L, cross_attention_dim) for cross-attention, `None` for self-attention.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let residual = x;
        let (tokens, shape4) = match (x.rank(), &self.group_norm) {
            (4, norm) => {
                let (b, c, h, w) = x.dims4()?;
                // GroupNorm wants channels second: normalise the map, then make tokens.
                let x = match norm {
                    Some(norm) => norm.forward(x)?,
                    None => x.clone(),
                };
                (
                    swap(&x, (b, c, h * w, 1), &[b, h * w, c])?,
                    Some((b, c, h, w)),
                )
            }
            (_, Some(norm)) => {
                let (b, n, c) = x.dims3()?;
                let normed = norm.forward(&swap(x, (b, n, c, 1), &[b, c, n])?)?;
                (swap(&normed, (b, c, n, 1), &[b, n, c])?, None)
            }
            (_, None) => (x.contiguous()?, None),
        };
        let context = context.unwrap_or(&tokens);
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let scale = 1.0 / (self.dim_head as f64).sqrt();
        let out = attention_tokens(&q, &k, &v, self.heads, scale)?;
        let out = self.to_out.forward(&out)?;
        let out = match shape4 {
            Some((b, c, h, w)) => swap(&out, (b, h * w, c, 1), &[b, c, h, w])?,
            None => out,
        };
        let out = if self.residual_connection {
            (out + residual)?
        } else {
            out
        };
        if self.rescale_output_factor == 1.0 {
            Ok(out)
        } else {
            out / self.rescale_output_factor
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Transformer blocks
// ---------------------------------------------------------------------------------------------

/// diffusers' `FeedForward` with GEGLU: ff.net.0.proj (to 2 x inner), value * gelu(gate),
/// ff.net.2. GELU is the exact (erf) one, as `F.gelu`'s default.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(dim: usize, mult: usize, vb: VarBuilder) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj_in: linear(dim, inner * 2, true, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, true, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let activated = {
            let _profile = profile::scope("geglu", h.device());
            if ops::applies(&h) {
                ops::geglu(&h)?
            } else {
                let inner = h.dim(D::Minus1)? / 2;
                let value = h.narrow(D::Minus1, 0, inner)?;
                let gate = h.narrow(D::Minus1, inner, inner)?;
                (value * gate.gelu_erf()?)?
            }
        };
        self.proj_out.forward(&activated)
    }
}

/// diffusers' `BasicTransformerBlock` (norm_type "layer_norm"): self-attention, cross-attention
/// on the text context, GEGLU feed-forward, each pre-normed with a residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let attn = |cross: Option<usize>| AttentionConfig {
            query_dim: dim,
            cross_attention_dim: cross,
            heads,
            dim_head,
            qkv_bias: false,
            group_norm: None,
            residual_connection: false,
            rescale_output_factor: 1.0,
        };
        // BasicTransformerBlock's norm_eps default; Transformer2DModel never overrides it in SD.
        let eps = 1e-5;
        Ok(Self {
            norm1: LayerNorm::new(dim, eps, vb.pp("norm1"))?,
            attn1: Attention::new(&attn(None), vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, eps, vb.pp("norm2"))?,
            attn2: Attention::new(&attn(Some(cross_attention_dim)), vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, eps, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, 4, vb.pp("ff"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// Settings of diffusers' `Transformer2DModel` with continuous (image) input.
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub in_channels: usize,
    pub heads: usize,
    pub dim_head: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    /// Linear proj_in/proj_out (SD2, SDXL) instead of 1x1 convolutions (SD1).
    pub use_linear_projection: bool,
}

#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel`: GroupNorm, proj_in, transformer_blocks, proj_out, residual.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(cfg: &Transformer2DConfig, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.heads * cfg.dim_head;
        let c = cfg.in_channels;
        let (proj_in, proj_out) = if cfg.use_linear_projection {
            (
                Projection::Linear(linear(c, inner, true, vb.pp("proj_in"))?),
                Projection::Linear(linear(inner, c, true, vb.pp("proj_out"))?),
            )
        } else {
            (
                Projection::Conv(conv2d(c, inner, 1, 1, 0, vb.pp("proj_in"))?),
                Projection::Conv(conv2d(inner, c, 1, 1, 0, vb.pp("proj_out"))?),
            )
        };
        let blocks = vb.pp("transformer_blocks");
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    inner,
                    cfg.heads,
                    cfg.dim_head,
                    cfg.cross_attention_dim,
                    blocks.pp(i),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            // Transformer2DModel hard-codes eps 1e-6 for this norm.
            norm: group_norm(cfg.norm_num_groups, c, 1e-6, vb.pp("norm"))?,
            proj_in,
            transformer_blocks,
            proj_out,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        // (B, C, H, W) <-> (B, H*W, C)
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            swap(t, (b, ch, h * w, 1), &[b, h * w, ch])
        };
        let to_map = |t: &Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            swap(t, (b, h * w, ch, 1), &[b, ch, h, w])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        out + x
    }
}
