//! The autoencoder: diffusers' `AutoencoderKL` (the Stable Diffusion VAE), with the encoder's
//! diagonal Gaussian posterior, the decoder, and diffusers' tiled encode/decode for images too
//! large to run in one piece.

use anyhow::bail;
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::layers::{
    check_act_fn, conv2d, group_norm, Attention, AttentionConfig, Conv2d, Downsample2D, GroupNorm,
    ResnetBlock2D, ResnetBlock2DConfig, Upsample2D,
};

fn default_3() -> usize {
    3
}
fn default_4() -> usize {
    4
}
fn default_1() -> usize {
    1
}
fn default_32() -> usize {
    32
}
fn default_true() -> bool {
    true
}
fn default_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".to_string()]
}
fn default_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".to_string()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_silu() -> String {
    "silu".to_string()
}
fn default_sample_size() -> Value {
    Value::from(32)
}
fn default_scaling_factor() -> f64 {
    0.18215
}

/// diffusers' `vae/config.json` for `AutoencoderKL`, with diffusers' defaults.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "default_3")]
    pub in_channels: usize,
    #[serde(default = "default_3")]
    pub out_channels: usize,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_1")]
    pub layers_per_block: usize,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_4")]
    pub latent_channels: usize,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    /// Image size the model was trained at (an int or [h, w]); also the tile size of
    /// [`AutoencoderKL::tiled_decode`] as in diffusers.
    #[serde(default = "default_sample_size")]
    pub sample_size: Value,
    /// Latents given to the U-Net are `(z - shift_factor) * scaling_factor`
    /// (SD1.x/2.x 0.18215, SDXL 0.13025).
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some VAEs carry; when present they replace the shift.
    #[serde(default)]
    pub latents_mean: Option<Vec<f64>>,
    #[serde(default)]
    pub latents_std: Option<Vec<f64>>,
    /// diffusers' hint to run the VAE in f32; the caller chooses the dtype here.
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

impl AutoencoderKLConfig {
    /// The tile size in pixels diffusers derives from `sample_size` (its first entry if a list).
    pub fn sample_size(&self) -> anyhow::Result<usize> {
        let v = match &self.sample_size {
            Value::Array(items) => items.first().cloned().unwrap_or(Value::Null),
            v => v.clone(),
        };
        v.as_u64().map(|n| n as usize).ok_or_else(|| {
            anyhow::anyhow!("vae config: unsupported sample_size = {}", self.sample_size)
        })
    }

    /// How many times the encoder halves the resolution (8 for SD's VAE is 2^3).
    pub fn downscale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    fn check_supported(&self) -> anyhow::Result<()> {
        check_act_fn("act_fn", &self.act_fn)?;
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("vae config: block_out_channels is empty");
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            if t != "DownEncoderBlock2D" {
                bail!("vae config: unsupported down_block_types[{i}] = {t:?}");
            }
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            if t != "UpDecoderBlock2D" {
                bail!("vae config: unsupported up_block_types[{i}] = {t:?}");
            }
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "vae config: block_out_channels has {n} entries but down_block_types has {} and \
                 up_block_types {}",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for (key, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if let Some(v) = v {
                if v.len() != self.latent_channels {
                    bail!(
                        "vae config: {key} has {} entries for {} latent channels",
                        v.len(),
                        self.latent_channels
                    );
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Encoder / decoder
// ---------------------------------------------------------------------------------------------

/// `UNetMidBlock2D` without time embedding: resnet, attention (with its own group norm and
/// residual), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<Attention>,
}

impl MidBlock {
    fn new(
        c: usize,
        groups: usize,
        add_attention: bool,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let eps = 1e-6;
        let rcfg = ResnetBlock2DConfig {
            in_channels: c,
            out_channels: c,
            temb_channels: None,
            groups,
            eps,
            output_scale_factor: 1.0,
        };
        let attention = if add_attention {
            // attention_head_dim = channels: one head.
            Some(Attention::new(
                &AttentionConfig {
                    query_dim: c,
                    cross_attention_dim: None,
                    heads: 1,
                    dim_head: c,
                    qkv_bias: true,
                    group_norm: Some((groups, eps)),
                    residual_connection: true,
                    rescale_output_factor: 1.0,
                },
                vb.pp("attentions.0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::new(&rcfg, vb.pp("resnets.0"))?,
                ResnetBlock2D::new(&rcfg, vb.pp("resnets.1"))?,
            ],
            attention,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h, None)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

fn resnet_cfg(cin: usize, cout: usize, groups: usize) -> ResnetBlock2DConfig {
    ResnetBlock2DConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

#[derive(Debug, Clone)]
struct EncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// diffusers' `Encoder` with `double_z`: image -> 2 x latent_channels moments.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<EncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let g = cfg.norm_num_groups;
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, &block_c) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = block_c;
            let vb_block = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { in_c } else { out_c };
                    ResnetBlock2D::new(
                        &resnet_cfg(cin, out_c, g),
                        vb_block.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            // The encoder's downsamplers use padding 0 (pad bottom/right, then stride-2 conv).
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    out_c,
                    out_c,
                    0,
                    vb_block.pp("downsamplers.0"),
                )?)
            } else {
                None
            };
            down_blocks.push(EncoderBlock {
                resnets,
                downsampler,
            });
        }
        let c = boc[n - 1];
        Ok(Self {
            conv_in: conv2d(cfg.in_channels, boc[0], 3, 1, 1, vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(c, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(g, c, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(c, 2 * cfg.latent_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Encoder {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug, Clone)]
struct DecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// diffusers' `Decoder`: latent -> image.
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<DecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &AutoencoderKLConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let g = cfg.norm_num_groups;
        let top = boc[n - 1];
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = top;
        for i in 0..n {
            let prev_c = out_c;
            out_c = boc[n - 1 - i];
            let vb_block = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let cin = if j == 0 { prev_c } else { out_c };
                    ResnetBlock2D::new(
                        &resnet_cfg(cin, out_c, g),
                        vb_block.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(out_c, out_c, vb_block.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsampler });
        }
        Ok(Self {
            conv_in: conv2d(cfg.latent_channels, top, 3, 1, 1, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(top, g, cfg.mid_block_add_attention, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: group_norm(g, boc[0], 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(boc[0], cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?,
        })
    }
}

impl Module for Decoder {
    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block.forward(&h)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Posterior
// ---------------------------------------------------------------------------------------------

/// diffusers' `DiagonalGaussianDistribution`: the encoder's posterior q(z | x).
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as in diffusers.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits the encoder's moments (B, 2C, h, w) into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> candle_core::Result<Self> {
        let c = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, c)?;
        let logvar = moments.narrow(1, c, c)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    pub fn std(&self) -> candle_core::Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    pub fn var(&self) -> candle_core::Result<Tensor> {
        self.logvar.exp()
    }

    /// A reparameterised sample `mean + std * noise`, with `noise` ~ N(0, I) of the mean's
    /// shape supplied by the caller (so seeds are the caller's business).
    pub fn sample(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        let noise = noise.to_dtype(self.mean.dtype())?;
        self.mean.broadcast_add(&self.std()?.broadcast_mul(&noise)?)
    }

    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// KL(q || N(0, I)) per sample, summed over (C, h, w): shape (B,).
    pub fn kl(&self) -> candle_core::Result<Tensor> {
        let terms = ((self.mean.sqr()? + self.var()?)? - 1.0)?;
        (terms - &self.logvar)?.sum((1, 2, 3))? * 0.5
    }
}

// ---------------------------------------------------------------------------------------------
// AutoencoderKL
// ---------------------------------------------------------------------------------------------

/// Tile geometry for [`AutoencoderKL::tiled_decode`]/[`AutoencoderKL::tiled_encode`], in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiling {
    /// Tile edge in image pixels (diffusers: `tile_sample_min_size` = config `sample_size`).
    pub sample_size: usize,
    /// Fraction of a tile shared with its neighbour (diffusers: 0.25).
    pub overlap_factor: f64,
}

#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    dtype: DType,
    pub encoder: Encoder,
    pub decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> anyhow::Result<Self> {
        cfg.check_supported()?;
        let l = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv2d(2 * l, 2 * l, 1, 1, 0, vb.pp("quant_conv"))?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv2d(l, l, 1, 1, 0, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        Ok(Self {
            config: cfg.clone(),
            dtype: vb.dtype(),
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            quant_conv,
            post_quant_conv,
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// diffusers' tiling defaults: tiles of `sample_size` pixels overlapping by a quarter.
    pub fn default_tiling(&self) -> anyhow::Result<Tiling> {
        Ok(Tiling {
            sample_size: self.config.sample_size()?,
            overlap_factor: 0.25,
        })
    }

    /// Encoder + quant_conv: the posterior's moments (B, 2 x latent_channels, H/f, W/f).
    fn moments(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.encoder.forward(&x.to_dtype(self.dtype)?)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&h),
            None => Ok(h),
        }
    }

    /// post_quant_conv + decoder.
    fn decode_tile(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }

    /// Encodes images (B, in_channels, H, W) in [-1, 1] into the posterior over raw latents.
    pub fn encode(&self, x: &Tensor) -> anyhow::Result<DiagonalGaussian> {
        Ok(DiagonalGaussian::from_moments(&self.moments(x)?)?)
    }

    /// Decodes raw (unscaled) latents into images in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> anyhow::Result<Tensor> {
        Ok(self.decode_tile(z)?)
    }

    /// diffusers' `_tiled_encode`: overlapping tiles encoded one at a time and blended, so
    /// memory depends on the tile size, not the image size.
    pub fn tiled_encode(&self, x: &Tensor, tiling: &Tiling) -> anyhow::Result<DiagonalGaussian> {
        let f = self.config.downscale_factor();
        let sample_tile = tiling.sample_size;
        let latent_tile = sample_tile / f;
        let stride = (sample_tile as f64 * (1.0 - tiling.overlap_factor)) as usize;
        let blend = (latent_tile as f64 * tiling.overlap_factor) as usize;
        let moments = tiled(x, sample_tile, stride, blend, latent_tile - blend, |t| {
            self.moments(t)
        })?;
        Ok(DiagonalGaussian::from_moments(&moments)?)
    }

    /// diffusers' `tiled_decode`: overlapping latent tiles decoded one at a time, blended
    /// linearly across the seams.
    pub fn tiled_decode(&self, z: &Tensor, tiling: &Tiling) -> anyhow::Result<Tensor> {
        let f = self.config.downscale_factor();
        let sample_tile = tiling.sample_size;
        let latent_tile = sample_tile / f;
        let stride = (latent_tile as f64 * (1.0 - tiling.overlap_factor)) as usize;
        let blend = (sample_tile as f64 * tiling.overlap_factor) as usize;
        Ok(tiled(
            z,
            latent_tile,
            stride,
            blend,
            sample_tile - blend,
            |t| self.decode_tile(t),
        )?)
    }

    /// Per-channel (shift, scale) taking raw latents to the U-Net's latent space:
    /// `unet_latent = (raw - shift) * scale`.
    fn latent_affine(&self, like: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let c = cfg.latent_channels;
        let dev = like.device();
        let (shift, scale): (Vec<f32>, Vec<f32>) = match (&cfg.latents_mean, &cfg.latents_std) {
            // diffusers' SDXL pipeline: (z - mean) * scaling_factor / std.
            (Some(mean), Some(std)) => mean
                .iter()
                .zip(std)
                .map(|(m, s)| (*m as f32, (cfg.scaling_factor / s) as f32))
                .unzip(),
            _ => (
                vec![cfg.shift_factor.unwrap_or(0.0) as f32; c],
                vec![cfg.scaling_factor as f32; c],
            ),
        };
        let shape = (1, c, 1, 1);
        Ok((
            Tensor::from_vec(shift, shape, dev)?.to_dtype(like.dtype())?,
            Tensor::from_vec(scale, shape, dev)?.to_dtype(like.dtype())?,
        ))
    }

    /// Raw VAE latents -> the U-Net's latent space, using the config's `scaling_factor`
    /// (and `shift_factor` or `latents_mean`/`latents_std` when present).
    pub fn scale_latents(&self, raw: &Tensor) -> anyhow::Result<Tensor> {
        let (shift, scale) = self.latent_affine(raw)?;
        Ok(raw.broadcast_sub(&shift)?.broadcast_mul(&scale)?)
    }

    /// The U-Net's latent space -> raw VAE latents (inverse of [`Self::scale_latents`]).
    pub fn unscale_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        let (shift, scale) = self.latent_affine(latents)?;
        Ok(latents.broadcast_div(&scale)?.broadcast_add(&shift)?)
    }

    /// Images in [-1, 1] -> scaled latents for the U-Net. `noise`: `Some` samples the
    /// posterior (training), `None` takes its mean (img2img, caching).
    pub fn latents_from_image(
        &self,
        image: &Tensor,
        noise: Option<&Tensor>,
    ) -> anyhow::Result<Tensor> {
        let posterior = self.encode(image)?;
        let raw = match noise {
            Some(noise) => posterior.sample(noise)?,
            None => posterior.mean.clone(),
        };
        self.scale_latents(&raw)
    }

    /// Scaled U-Net latents -> images in about [-1, 1].
    pub fn image_from_latents(&self, latents: &Tensor) -> anyhow::Result<Tensor> {
        self.decode(&self.unscale_latents(latents)?)
    }
}

/// Runs `f` on overlapping square tiles of `x` (tile edge `tile_in`, step `stride`) and stitches
/// the outputs exactly like diffusers: tiles are visited in raster order, each is blended
/// in place with the (already blended) tile above and then the one to its left over `blend`
/// output pixels, and the top-left `keep` x `keep` of each tile is kept.
fn tiled<F>(
    x: &Tensor,
    tile_in: usize,
    stride: usize,
    blend: usize,
    keep: usize,
    f: F,
) -> candle_core::Result<Tensor>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    if stride == 0 || tile_in == 0 {
        candle_core::bail!("tiling: tile size {tile_in} with stride {stride} is too small");
    }
    let (_, _, h, w) = x.dims4()?;
    let starts = |n: usize| (0..n).step_by(stride).collect::<Vec<_>>();
    let (rows, cols) = (starts(h), starts(w));
    let mut grid: Vec<Vec<Tensor>> = Vec::with_capacity(rows.len());
    for (ri, &i) in rows.iter().enumerate() {
        let mut row: Vec<Tensor> = Vec::with_capacity(cols.len());
        for (ci, &j) in cols.iter().enumerate() {
            let tile = x
                .narrow(2, i, tile_in.min(h - i))?
                .narrow(3, j, tile_in.min(w - j))?;
            let mut out = f(&tile)?;
            if ri > 0 {
                out = blend_axis(&grid[ri - 1][ci], &out, blend, 2)?;
            }
            if ci > 0 {
                out = blend_axis(&row[ci - 1], &out, blend, 3)?;
            }
            row.push(out);
        }
        grid.push(row);
    }
    let mut result_rows = Vec::with_capacity(grid.len());
    for row in &grid {
        let cropped = row
            .iter()
            .map(|t| {
                let (_, _, th, tw) = t.dims4()?;
                t.narrow(2, 0, keep.min(th))?.narrow(3, 0, keep.min(tw))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        result_rows.push(Tensor::cat(&cropped, 3)?);
    }
    Tensor::cat(&result_rows, 2)
}

/// diffusers' `blend_v` (axis 2) / `blend_h` (axis 3): the first `extent` rows/columns of `b`
/// become a linear ramp from the last `extent` of `a` to `b`.
fn blend_axis(a: &Tensor, b: &Tensor, extent: usize, axis: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(axis)?).min(b.dim(axis)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let a_len = a.dim(axis)?;
    let b_len = b.dim(axis)?;
    let a_tail = a.narrow(axis, a_len - extent, extent)?;
    let b_head = b.narrow(axis, 0, extent)?;
    let ramp: Vec<f32> = (0..extent).map(|y| y as f32 / extent as f32).collect();
    let mut shape = vec![1usize; 4];
    shape[axis] = extent;
    let wb = Tensor::from_vec(ramp, shape, b.device())?.to_dtype(b.dtype())?;
    let wa = (wb.ones_like()? - &wb)?;
    let blended = (a_tail.broadcast_mul(&wa)? + b_head.broadcast_mul(&wb)?)?;
    if b_len == extent {
        Ok(blended)
    } else {
        Tensor::cat(&[&blended, &b.narrow(axis, extent, b_len - extent)?], axis)
    }
}
