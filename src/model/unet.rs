//! The noise predictor: diffusers' `UNet2DConditionModel` as used by Stable Diffusion 1.x, 2.x
//! and SDXL, written for candle.
//!
//! We own this instead of reusing candle-transformers' U-Net because training needs (1) one
//! timestep per sample (theirs takes one scalar for the batch) and (2) gradients for every
//! weight (their fused softmax/LayerNorm give 70 of 326 tensors no gradient, silently).
//! Tensor names are diffusers' checkpoint keys, so diffusers checkpoints load and our saved
//! models load in diffusers.

use anyhow::{bail, Context};
use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::layers::{
    check_act_fn, conv2d, group_norm, timestep_embedding, Conv2d, Downsample2D, GroupNorm,
    ResnetBlock2D, ResnetBlock2DConfig, TimestepEmbedding, Transformer2DConfig, Transformer2DModel,
    Upsample2D,
};

/// A config value that is either one value for every block or a list with one per block
/// (diffusers accepts both for many keys). `Other` keeps anything else so that the error can
/// name the offending value instead of serde's "did not match any variant".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
    Other(Value),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// One value per block, checking the list length.
    pub fn expand(&self, key: &str, n_blocks: usize) -> anyhow::Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n_blocks]),
            PerBlock::Each(v) if v.len() == n_blocks => Ok(v.clone()),
            PerBlock::Each(v) => bail!(
                "unet config: {key} = {v:?} has {} entries but there are {n_blocks} down blocks",
                v.len()
            ),
            PerBlock::Other(v) => bail!("unet config: unsupported {key} = {v}"),
        }
    }
}

fn default_4() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_down_block_types() -> Vec<String> {
    let mut v = vec!["CrossAttnDownBlock2D".to_string(); 3];
    v.push("DownBlock2D".to_string());
    v
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}
fn default_up_block_types() -> Vec<String> {
    let mut v = vec!["UpBlock2D".to_string()];
    v.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
    v
}
fn default_only_cross_attention() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_1usize() -> usize {
    1
}
fn default_1f64() -> f64 {
    1.0
}
fn default_silu() -> String {
    "silu".to_string()
}
fn default_norm_num_groups() -> Option<usize> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_cross_attention_dim() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn default_transformer_layers() -> Value {
    Value::from(1)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_default() -> String {
    "default".to_string()
}
fn default_positional() -> String {
    "positional".to_string()
}
fn default_3() -> usize {
    3
}
fn default_64() -> usize {
    64
}

/// diffusers' `unet/config.json` for `UNet2DConditionModel`. Every constructor argument of the
/// diffusers class is listed (with diffusers' default) so that nothing is silently ignored;
/// values this implementation does not support are rejected by [`UNet2DConditionModel::new`]
/// with an error naming the key and value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default)]
    pub sample_size: Option<Value>,
    #[serde(default = "default_4")]
    pub in_channels: usize,
    #[serde(default = "default_4")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_only_cross_attention")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    #[serde(default = "default_1usize")]
    pub downsample_padding: usize,
    #[serde(default = "default_1f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_cross_attention_dim")]
    pub cross_attention_dim: PerBlock<usize>,
    /// An int, one int per block, or (rare) one list per block with a count per layer.
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: Value,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    /// For SD1.x/2.x/SDXL this is, despite its name, the number of heads (a diffusers quirk
    /// kept for compatibility); the head width is channels / heads.
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `None` (SD1.x/2.x) or `"text_time"` (SDXL).
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// Only affects half-precision inference; our attention always computes scores in f32 for
    /// half inputs.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "default_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "default_1f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "default_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_3")]
    pub conv_out_kernel: usize,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "default_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default = "default_64")]
    pub addition_embed_type_num_heads: usize,
}

/// SDXL's extra conditioning (`added_cond_kwargs`): the pooled text embedding of the second
/// text encoder, (B, P), and the six size/crop numbers per sample, (B, 6).
#[derive(Debug, Clone)]
pub struct SdxlAddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// How many transformer layers each resnet of a block is followed by.
fn transformer_layers(
    key: &str,
    value: &Value,
    n_blocks: usize,
) -> anyhow::Result<Vec<Vec<usize>>> {
    let bad = || anyhow::anyhow!("unet config: unsupported {key} = {value}");
    let as_count = |v: &Value| v.as_u64().map(|n| n as usize).ok_or_else(bad);
    match value {
        Value::Number(_) => Ok(vec![vec![as_count(value)?]; n_blocks]),
        Value::Array(items) if items.len() == n_blocks => items
            .iter()
            .map(|item| match item {
                Value::Array(per_layer) => per_layer.iter().map(as_count).collect(),
                _ => Ok(vec![as_count(item)?]),
            })
            .collect(),
        Value::Array(items) => bail!(
            "unet config: {key} = {value} has {} entries but there are {n_blocks} blocks",
            items.len()
        ),
        _ => Err(bad()),
    }
}

/// The transformer depth of layer `j` from a per-block entry (one count or one per layer).
fn depth_at(counts: &[usize], j: usize) -> usize {
    if counts.len() == 1 {
        counts[0]
    } else {
        counts[j.min(counts.len() - 1)]
    }
}

impl UNet2DConditionConfig {
    /// Rejects every setting that would make this implementation differ from diffusers.
    fn check_supported(&self) -> anyhow::Result<()> {
        macro_rules! require {
            ($cond:expr, $key:literal, $value:expr) => {
                if !$cond {
                    bail!(
                        "unet config: unsupported {} = {:?} (sd-rs implements the SD1.x/2.x/SDXL U-Net)",
                        $key,
                        $value
                    );
                }
            };
        }
        check_act_fn("act_fn", &self.act_fn)?;
        require!(self.dropout == 0.0, "dropout", self.dropout);
        require!(
            self.norm_num_groups.is_some(),
            "norm_num_groups",
            self.norm_num_groups
        );
        require!(
            self.encoder_hid_dim.is_none(),
            "encoder_hid_dim",
            self.encoder_hid_dim
        );
        require!(
            self.encoder_hid_dim_type.is_none(),
            "encoder_hid_dim_type",
            self.encoder_hid_dim_type
        );
        require!(!self.dual_cross_attention, "dual_cross_attention", true);
        require!(
            self.class_embed_type.is_none(),
            "class_embed_type",
            self.class_embed_type
        );
        require!(
            self.num_class_embeds.is_none(),
            "num_class_embeds",
            self.num_class_embeds
        );
        require!(
            matches!(
                self.addition_embed_type.as_deref(),
                None | Some("text_time")
            ),
            "addition_embed_type",
            self.addition_embed_type
        );
        require!(
            self.resnet_time_scale_shift == "default",
            "resnet_time_scale_shift",
            self.resnet_time_scale_shift
        );
        require!(!self.resnet_skip_time_act, "resnet_skip_time_act", true);
        require!(
            self.time_embedding_type == "positional",
            "time_embedding_type",
            self.time_embedding_type
        );
        require!(
            self.time_embedding_act_fn.is_none(),
            "time_embedding_act_fn",
            self.time_embedding_act_fn
        );
        require!(
            self.timestep_post_act.is_none(),
            "timestep_post_act",
            self.timestep_post_act
        );
        require!(
            self.time_cond_proj_dim.is_none(),
            "time_cond_proj_dim",
            self.time_cond_proj_dim
        );
        require!(
            self.conv_in_kernel % 2 == 1,
            "conv_in_kernel",
            self.conv_in_kernel
        );
        require!(
            self.conv_out_kernel % 2 == 1,
            "conv_out_kernel",
            self.conv_out_kernel
        );
        require!(
            self.attention_type == "default",
            "attention_type",
            self.attention_type
        );
        require!(
            !self.class_embeddings_concat,
            "class_embeddings_concat",
            true
        );
        require!(
            self.mid_block_only_cross_attention != Some(true),
            "mid_block_only_cross_attention",
            self.mid_block_only_cross_attention
        );
        require!(
            self.cross_attention_norm.is_none(),
            "cross_attention_norm",
            self.cross_attention_norm
        );
        if self.num_attention_heads.is_some() {
            // diffusers itself refuses this key for UNet2DConditionModel (its
            // `attention_head_dim` is the head count), so a config with it is not a valid one.
            bail!(
                "unet config: num_attention_heads = {:?} is not accepted by diffusers' \
                 UNet2DConditionModel; attention_head_dim gives the number of heads",
                self.num_attention_heads
            );
        }
        let n = self.block_out_channels.len();
        let only_cross = self
            .only_cross_attention
            .expand("only_cross_attention", n)?;
        require!(
            only_cross.iter().all(|b| !b),
            "only_cross_attention",
            self.only_cross_attention
        );
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "unet config: block_out_channels has {n} entries but down_block_types has {} and \
                 up_block_types {}",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        Ok(())
    }

    /// Width of the time embedding fed to every resnet.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }
}

// ---------------------------------------------------------------------------------------------
// Blocks
// ---------------------------------------------------------------------------------------------

/// `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// Returns the block output and the skip connections it contributes (one per resnet, plus
    /// one after the downsampler).
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }
}

/// `CrossAttnUpBlock2D` or `UpBlock2D`.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

impl UpBlock {
    /// `skips` is the stack of down-path outputs; this block pops one per resnet.
    /// `upsample_size` is the size of the next skip connection (diffusers' `upsample_size`).
    fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::msg("U-Net ran out of skip connections"))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, upsample_size)?;
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.resnets[0].forward(x, Some(temb))?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

/// SDXL's `add_time_proj` + `add_embedding`.
#[derive(Debug, Clone)]
struct AddTimeEmbedding {
    time_dim: usize,
    input_dim: usize,
    add_embedding: TimestepEmbedding,
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    dtype: DType,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    add_time: Option<AddTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

fn heads_and_dim(channels: usize, heads: usize, block: &str) -> anyhow::Result<(usize, usize)> {
    if heads == 0 || !channels.is_multiple_of(heads) {
        bail!("unet config: {block} has {channels} channels, not divisible into {heads} attention heads (attention_head_dim)");
    }
    Ok((heads, channels / heads))
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (pretrained weights or a `VarMap` for training). Tensors are
    /// read at diffusers' names under `vb`'s prefix.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> anyhow::Result<Self> {
        cfg.check_supported()?;
        let n = cfg.block_out_channels.len();
        let boc = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups.unwrap_or(32);
        let eps = cfg.norm_eps;
        let layers = cfg.layers_per_block.expand("layers_per_block", n)?;
        let heads = cfg.attention_head_dim.expand("attention_head_dim", n)?;
        let cross_dims = cfg.cross_attention_dim.expand("cross_attention_dim", n)?;
        let depth = transformer_layers(
            "transformer_layers_per_block",
            &cfg.transformer_layers_per_block,
            n,
        )?;
        let reverse_depth = match &cfg.reverse_transformer_layers_per_block {
            Some(v) => transformer_layers("reverse_transformer_layers_per_block", v, n)?,
            None => depth.iter().rev().cloned().collect(),
        };
        let temb_dim = cfg.time_embed_dim();
        let resnet_cfg = |cin: usize, cout: usize, scale: f64| ResnetBlock2DConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(temb_dim),
            groups,
            eps,
            output_scale_factor: scale,
        };
        let transformer_cfg =
            |c: usize, heads: (usize, usize), layers: usize, cross: usize| Transformer2DConfig {
                in_channels: c,
                heads: heads.0,
                dim_head: heads.1,
                num_layers: layers,
                cross_attention_dim: cross,
                norm_num_groups: groups,
                use_linear_projection: cfg.use_linear_projection,
            };

        let k_in = cfg.conv_in_kernel;
        let conv_in = conv2d(
            cfg.in_channels,
            boc[0],
            k_in,
            1,
            (k_in - 1) / 2,
            vb.pp("conv_in"),
        )?;
        let time_embedding = TimestepEmbedding::new(boc[0], temb_dim, vb.pp("time_embedding"))?;
        let add_time = match cfg.addition_embed_type.as_deref() {
            Some("text_time") => {
                let time_dim = cfg.addition_time_embed_dim.context(
                    "unet config: addition_embed_type \"text_time\" needs addition_time_embed_dim",
                )?;
                let input_dim = cfg.projection_class_embeddings_input_dim.context(
                    "unet config: addition_embed_type \"text_time\" needs \
                     projection_class_embeddings_input_dim",
                )?;
                Some(AddTimeEmbedding {
                    time_dim,
                    input_dim,
                    add_embedding: TimestepEmbedding::new(
                        input_dim,
                        temb_dim,
                        vb.pp("add_embedding"),
                    )?,
                })
            }
            _ => None,
        };

        // Down path.
        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = boc[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_c = out_c;
            out_c = boc[i];
            let vb_block = vb.pp(format!("down_blocks.{i}"));
            let with_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => bail!("unet config: unsupported down_block_types[{i}] = {other:?}"),
            };
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers[i] {
                let cin = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &resnet_cfg(cin, out_c, cfg.resnet_out_scale_factor),
                    vb_block.pp(format!("resnets.{j}")),
                )?);
                if with_attention {
                    let hd = heads_and_dim(out_c, heads[i], &format!("down_blocks.{i}"))?;
                    attentions.push(Transformer2DModel::new(
                        &transformer_cfg(out_c, hd, depth_at(&depth[i], j), cross_dims[i]),
                        vb_block.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    out_c,
                    out_c,
                    cfg.downsample_padding,
                    vb_block.pp("downsamplers.0"),
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        // Middle.
        let mid_block = match cfg.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {
                let c = boc[n - 1];
                let vb_mid = vb.pp("mid_block");
                let hd = heads_and_dim(c, heads[n - 1], "mid_block")?;
                let resnet = |j: usize| {
                    ResnetBlock2D::new(
                        &resnet_cfg(c, c, cfg.mid_block_scale_factor),
                        vb_mid.pp(format!("resnets.{j}")),
                    )
                };
                Some(MidBlock {
                    resnets: vec![resnet(0)?, resnet(1)?],
                    attentions: vec![Transformer2DModel::new(
                        &transformer_cfg(c, hd, depth_at(&depth[n - 1], 0), cross_dims[n - 1]),
                        vb_mid.pp("attentions.0"),
                    )?],
                })
            }
            None => None,
            Some(other) => bail!("unet config: unsupported mid_block_type = {other:?}"),
        };

        // Up path: channels, heads and depths mirror the down path.
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = boc[n - 1];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let rev = n - 1 - i;
            let prev_c = out_c;
            out_c = boc[rev];
            let in_c = boc[rev.saturating_sub(1)];
            let vb_block = vb.pp(format!("up_blocks.{i}"));
            let with_attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => bail!("unet config: unsupported up_block_types[{i}] = {other:?}"),
            };
            let num_layers = layers[rev] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num_layers {
                let skip_c = if j == num_layers - 1 { in_c } else { out_c };
                let cin = if j == 0 { prev_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &resnet_cfg(cin + skip_c, out_c, cfg.resnet_out_scale_factor),
                    vb_block.pp(format!("resnets.{j}")),
                )?);
                if with_attention {
                    let hd = heads_and_dim(out_c, heads[rev], &format!("up_blocks.{i}"))?;
                    attentions.push(Transformer2DModel::new(
                        &transformer_cfg(
                            out_c,
                            hd,
                            depth_at(&reverse_depth[i], j),
                            cross_dims[rev],
                        ),
                        vb_block.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(out_c, out_c, vb_block.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        let k_out = cfg.conv_out_kernel;
        Ok(Self {
            config: cfg.clone(),
            dtype: vb.dtype(),
            conv_in,
            time_embedding,
            add_time,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(groups, boc[0], eps, vb.pp("conv_norm_out"))?,
            conv_out: conv2d(
                boc[0],
                cfg.out_channels,
                k_out,
                1,
                (k_out - 1) / 2,
                vb.pp("conv_out"),
            )?,
        })
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Runs the network in `dtype` whatever the weights' dtype: each layer casts its weights
    /// to the activations' dtype. Mixed-precision training uses this with f32 weights (the
    /// master copy the optimizer updates) and bf16/f16 activations. The output is in `dtype`.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.dtype = dtype;
    }

    /// Whether this model needs [`SdxlAddedCond`] (SDXL's `addition_embed_type: "text_time"`).
    pub fn needs_added_cond(&self) -> bool {
        self.add_time.is_some()
    }

    /// The time embedding (B, time_embed_dim), including SDXL's added conditioning.
    fn time_embed(
        &self,
        timesteps: &Tensor,
        batch: usize,
        added: Option<&SdxlAddedCond>,
    ) -> anyhow::Result<Tensor> {
        let timesteps = match timesteps.elem_count() {
            1 if batch > 1 => timesteps.flatten_all()?.broadcast_as(batch)?.contiguous()?,
            n if n == batch => timesteps.flatten_all()?,
            n => bail!(
                "unet forward: got {n} timesteps for a batch of {batch} (need one per sample)"
            ),
        };
        let cfg = &self.config;
        let t_emb = timestep_embedding(
            &timesteps,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )?
        .to_dtype(self.dtype)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        match (&self.add_time, added) {
            (None, _) => Ok(emb),
            (Some(_), None) => bail!(
                "unet forward: this U-Net has addition_embed_type \"text_time\" (SDXL) and needs \
                 text_embeds and time_ids"
            ),
            (Some(add), Some(added)) => {
                let time_ids = added.time_ids.to_dtype(DType::F32)?;
                let n_ids = time_ids.elem_count();
                let time_embeds = timestep_embedding(
                    &time_ids.flatten_all()?,
                    add.time_dim,
                    cfg.flip_sin_to_cos,
                    cfg.freq_shift,
                )?
                .reshape((batch, n_ids / batch * add.time_dim))?;
                let text_embeds = added.text_embeds.to_dtype(DType::F32)?;
                let add_embeds = Tensor::cat(&[&text_embeds, &time_embeds], 1)?;
                if add_embeds.dim(1)? != add.input_dim {
                    bail!(
                        "unet forward: text_embeds {:?} and time_ids {:?} give {} added features, \
                         projection_class_embeddings_input_dim is {}",
                        added.text_embeds.dims(),
                        added.time_ids.dims(),
                        add_embeds.dim(1)?,
                        add.input_dim
                    );
                }
                let aug = add
                    .add_embedding
                    .forward(&add_embeds.to_dtype(self.dtype)?)?;
                Ok((emb + aug)?)
            }
        }
    }

    /// Predicts the noise (or v) for `sample` (B, in_channels, H, W) at `timesteps` (B,) — one
    /// timestep per sample, f32, may be fractional — given `encoder_hidden_states`
    /// (B, L, cross_attention_dim). `added` is required for SDXL, ignored otherwise.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<&SdxlAddedCond>,
    ) -> anyhow::Result<Tensor> {
        let batch = sample.dim(0)?;
        let emb = self.time_embed(timesteps, batch, added)?;
        let context = encoder_hidden_states.to_dtype(self.dtype)?;
        let sample = sample.to_dtype(self.dtype)?;
        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample
        };

        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, &emb, &context)?;
            h = out;
            skips.extend(block_skips);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, &context)?;
        }
        for block in &self.up_blocks {
            let remaining = skips.len().saturating_sub(block.resnets.len());
            // Upsample to the size of the skip connection the next block concatenates: 2x for
            // sizes divisible by 2^levels, otherwise what diffusers' `upsample_size` gives.
            let upsample_size = match (remaining, &block.upsampler) {
                (r, Some(_)) if r > 0 => {
                    let (_, _, sh, sw) = skips[r - 1].dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            h = block.forward(&h, &mut skips, &emb, &context, upsample_size)?;
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        Ok(self.conv_out.forward(&h)?)
    }
}
