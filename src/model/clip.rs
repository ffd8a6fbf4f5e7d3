//! CLIP text encoders: transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.
//!
//! We own this code instead of using candle-transformers' CLIP because the text encoder must
//! also train (jointly with the U-Net for the small default model, or fine-tuned): candle's fused
//! `LayerNorm` and `softmax_last_dim` have no backward pass, so gradients would silently stop.
//! Everything here is built from differentiable ops, and the numbers follow transformers 5.23
//! exactly (tests/clip_parity.rs compares against it, tests/gradients_clip.rs checks training).
//!
//! Tensor names follow the diffusers `text_encoder/` checkpoints:
//! `text_model.embeddings.{token,position}_embedding`, `text_model.encoder.layers.N.*`,
//! `text_model.final_layer_norm` and, for the projection variant, `text_projection`.
//! transformers 5 saves a plain `CLIPTextModel` without the `text_model.` prefix; both load.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Init, VarBuilder};
use serde::Deserialize;
use std::path::Path;

// The differentiable LayerNorm shared with the U-Net (candle's fused one has no backward).
use super::layers::{swap, LayerNorm};
// On the CPU in f32 its forward and backward are one fused GEMM node (`ops::linear`).
use super::layers::Linear;
use super::ops;
use crate::profile;

/// The activation between the two MLP layers (transformers' `hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP (SD 1.x, SDXL's first encoder).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP (SD 2.x, SDXL's second encoder).
    Gelu,
    /// tanh approximation of GELU.
    #[serde(alias = "gelu_pytorch_tanh")]
    GeluNew,
}

impl ClipActivation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::QuickGelu if ops::applies(xs) => ops::quick_gelu(xs)?,
            Self::QuickGelu => (xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?)?,
            Self::Gelu => xs.gelu_erf()?,
            Self::GeluNew => xs.gelu()?,
        })
    }
}

/// transformers' `CLIPTextConfig`, read from `text_encoder/config.json`. Defaults are
/// transformers' defaults, so a config that omits a field means what it means there.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    #[serde(default = "default_num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: ClipActivation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_pad_token_id")]
    pub pad_token_id: Option<u32>,
    #[serde(default = "default_bos_token_id")]
    pub bos_token_id: Option<u32>,
    /// `2` is the legacy value of the original SD checkpoints; it switches pooling to the
    /// position of the largest id (see [`ClipTextModel::eos_positions`]).
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
    /// `["CLIPTextModel"]` or `["CLIPTextModelWithProjection"]` (SDXL's second encoder).
    #[serde(default)]
    pub architectures: Vec<String>,
}

fn default_vocab_size() -> usize {
    49408
}
fn default_hidden_size() -> usize {
    512
}
fn default_intermediate_size() -> usize {
    2048
}
fn default_projection_dim() -> usize {
    512
}
fn default_num_hidden_layers() -> usize {
    12
}
fn default_num_attention_heads() -> usize {
    8
}
fn default_max_position_embeddings() -> usize {
    77
}
fn default_hidden_act() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pad_token_id() -> Option<u32> {
    Some(1)
}
fn default_bos_token_id() -> Option<u32> {
    Some(49406)
}
fn default_eos_token_id() -> u32 {
    49407
}

impl ClipTextConfig {
    /// Reads a transformers `config.json` (e.g. `model/text_encoder/config.json`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading CLIP text config {}", path.display()))?;
        let cfg: Self = serde_json::from_str(&text)
            .with_context(|| format!("parsing CLIP text config {}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("invalid CLIP text config {}", path.display()))?;
        Ok(cfg)
    }

    /// Whether the model has a `text_projection` (transformers' `CLIPTextModelWithProjection`).
    pub fn with_projection(&self) -> bool {
        self.architectures
            .iter()
            .any(|a| a == "CLIPTextModelWithProjection")
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.num_attention_heads > 0
                && self.hidden_size.is_multiple_of(self.num_attention_heads),
            "hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(self.num_hidden_layers > 0, "num_hidden_layers must be > 0");
        Ok(())
    }
}

/// A linear layer initialised like transformers' `CLIPPreTrainedModel._init_weights` when it is
/// created fresh in a `VarMap` (normal weights of the given std, zero bias); pretrained weights
/// ignore the hints.
fn linear(in_dim: usize, out_dim: usize, std: f64, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: std,
    };
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    let bias = if bias {
        Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
    } else {
        None
    };
    Ok(Linear::new(weight, bias).transposed_for_inference())
}

fn embedding(n: usize, dim: usize, std: f64, vb: VarBuilder) -> Result<Embedding> {
    let init = Init::Randn {
        mean: 0.0,
        stdev: std,
    };
    let table = vb.get_with_hints((n, dim), "weight", init)?;
    Ok(Embedding::new(table, dim))
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let in_std = (d as f64).powf(-0.5) * ((2 * cfg.num_hidden_layers) as f64).powf(-0.5);
        let out_std = (d as f64).powf(-0.5);
        Ok(Self {
            q_proj: linear(d, d, in_std, true, vb.pp("q_proj"))?,
            k_proj: linear(d, d, in_std, true, vb.pp("k_proj"))?,
            v_proj: linear(d, d, in_std, true, vb.pp("v_proj"))?,
            out_proj: linear(d, d, out_std, true, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `causal_mask` is (L, L): 0 where a query may look, -inf above the diagonal.
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, l, d) = xs.dims3()?;
        let (h, hd) = (self.num_heads, self.head_dim);
        let (q, k, v) = (
            self.q_proj.forward(xs)?,
            self.k_proj.forward(xs)?,
            self.v_proj.forward(xs)?,
        );
        let scale = (self.head_dim as f64).powf(-0.5);
        if crate::model::ops::applies(&q) {
            // One fused node (the mask applied inside) that reads the heads from the tokens:
            // no (L, L) score tensors per head, no transposes.
            let out = {
                let _profile = profile::scope("attention (scores, softmax, values)", q.device());
                crate::model::ops::attention_tokens(&q, &k, &v, h, scale, true)?
            };
            return Ok(self.out_proj.forward(&out)?);
        }
        let heads = |t: Tensor| -> Result<Tensor> { Ok(swap(&t, (b, l, h, hd), &[b, h, l, hd])?) };
        let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(causal_mask)?;
        // transformers takes the softmax of half-precision scores in f32; `ops::softmax` (not
        // `softmax_last_dim`) because only it has a backward pass.
        let probs = match xs.dtype() {
            DType::F16 | DType::BF16 => {
                candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?
                    .to_dtype(xs.dtype())?
            }
            _ => candle_nn::ops::softmax(&scores, D::Minus1)?,
        };
        let out = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, l, d))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipMlp {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size as f64;
        let fc1_std = (2.0 * d).powf(-0.5);
        let fc2_std = d.powf(-0.5) * ((2 * cfg.num_hidden_layers) as f64).powf(-0.5);
        Ok(Self {
            fc1: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                fc1_std,
                true,
                vb.pp("fc1"),
            )?,
            fc2: linear(
                cfg.intermediate_size,
                cfg.hidden_size,
                fc2_std,
                true,
                vb.pp("fc2"),
            )?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.activation.forward(&self.fc1.forward(xs)?)?;
        Ok(self.fc2.forward(&h)?)
    }
}

/// One pre-norm transformer block (`text_model.encoder.layers.N`).
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            mlp: ClipMlp::new(cfg, vb.pp("mlp"))?,
            layer_norm2: LayerNorm::new(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        Ok((xs + h)?)
    }
}

/// Everything one forward pass produces, named as in transformers' output classes.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// Output of the last layer after `final_layer_norm`, (B, L, D).
    pub last_hidden_state: Tensor,
    /// transformers' `hidden_states`: `[0]` is the embedding output and `[i]` the output of layer
    /// `i` (no final layer norm), so `hidden_states[len - 2]` is SDXL's "penultimate" state.
    pub hidden_states: Vec<Tensor>,
    /// `last_hidden_state` at the EOS position of each sequence (`pooler_output`), (B, D).
    pub pooled: Tensor,
    /// `text_projection(pooled)` for `CLIPTextModelWithProjection` (`text_embeds`), (B, P).
    pub text_embeds: Option<Tensor>,
}

/// Which hidden state conditions the U-Net, as diffusers' `encode_prompt` picks it.
///
/// `clip_skip` counts as in diffusers: 0 = no skip (diffusers' `None`); 1 = use the layer before
/// the last (AUTOMATIC1111's "Clip skip: 2").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextLayer {
    /// SD 1.x / 2.x (`StableDiffusionPipeline`): `final_layer_norm(hidden_states[-(clip_skip + 1)])`,
    /// which for `clip_skip == 0` is exactly `last_hidden_state`. (SD 2.x checkpoints get their
    /// "penultimate layer" by shipping a text encoder config with one layer fewer.)
    Final { clip_skip: usize },
    /// SDXL (`StableDiffusionXLPipeline`, both encoders): `hidden_states[-(clip_skip + 2)]`,
    /// without the final layer norm.
    Penultimate { clip_skip: usize },
}

impl Default for ContextLayer {
    fn default() -> Self {
        Self::Final { clip_skip: 0 }
    }
}

/// The text conditioning of a batch of prompts.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// (B, n_chunks * L, D): the chunks' selected hidden states concatenated along the sequence.
    pub context: Tensor,
    /// (B, P): `text_embeds` for a model with projection, else `pooler_output`; taken from the
    /// first chunk, as AUTOMATIC1111 does for long SDXL prompts.
    pub pooled: Tensor,
}

/// transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` (text tower only).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model from a `VarBuilder` rooted at the checkpoint's top level: mmaped
    /// safetensors for pretrained weights, or a `VarMap` to train from scratch (fresh variables
    /// get transformers' initialisation and the `text_model.` prefix).
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate()?;
        // diffusers checkpoints and transformers' `CLIPTextModelWithProjection` keep everything
        // under `text_model.`; transformers 5 saves a bare `CLIPTextModel` without it.
        let bare = !vb.contains_tensor("text_model.embeddings.token_embedding.weight")
            && vb.contains_tensor("embeddings.token_embedding.weight");
        let tm = if bare {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let d = cfg.hidden_size;
        let emb = tm.pp("embeddings");
        let token_embedding = embedding(cfg.vocab_size, d, 0.02, emb.pp("token_embedding"))
            .context("loading text_model.embeddings.token_embedding")?;
        let position_embedding = embedding(
            cfg.max_position_embeddings,
            d,
            0.02,
            emb.pp("position_embedding"),
        )
        .context("loading text_model.embeddings.position_embedding")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                ClipEncoderLayer::new(cfg, tm.pp("encoder.layers").pp(i))
                    .with_context(|| format!("loading text_model.encoder.layers.{i}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(d, cfg.layer_norm_eps, tm.pp("final_layer_norm"))
            .context("loading text_model.final_layer_norm")?;
        let text_projection = if cfg.with_projection() {
            let std = (d as f64).powf(-0.5);
            Some(
                linear(d, cfg.projection_dim, std, false, vb.pp("text_projection"))
                    .context("loading text_projection (CLIPTextModelWithProjection)")?,
            )
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Width of the context this model produces (the U-Net's `cross_attention_dim` share).
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Width of [`PromptEmbeds::pooled`].
    pub fn pooled_size(&self) -> usize {
        match self.text_projection {
            Some(_) => self.config.projection_dim,
            None => self.config.hidden_size,
        }
    }

    /// The position pooled in each row of `ids` (B, L), exactly as transformers 5.23 picks it:
    /// the legacy `eos_token_id == 2` configs take the (first) largest id, which is the EOS token
    /// in CLIP's vocabulary; the others take the first `eos_token_id`, or 0 if there is none.
    pub fn eos_positions(&self, ids: &Tensor) -> Result<Vec<usize>> {
        let rows = ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        let eos = self.config.eos_token_id as i64;
        Ok(rows
            .iter()
            .map(|row| {
                if eos == 2 {
                    // First index of the maximum, like torch.argmax.
                    let mut best = 0;
                    for (i, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    row.iter().position(|&v| v == eos).unwrap_or(0)
                }
            })
            .collect())
    }

    /// Runs the encoder on token ids of shape (B, L) (u32 or i64) and returns every output.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, l) = input_ids
            .dims2()
            .context("CLIP text encoder input ids must be (batch, seq_len)")?;
        let max = self.config.max_position_embeddings;
        if l > max {
            bail!("sequence length {l} exceeds the text encoder's max_position_embeddings {max}");
        }
        let device = input_ids.device();
        let positions = Tensor::arange(0u32, l as u32, device)?;
        let tokens = self.token_embedding.forward(input_ids)?;
        let mut xs = tokens.broadcast_add(&self.position_embedding.forward(&positions)?)?;

        let mask = causal_mask(l, xs.dtype(), device)?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(xs.clone());
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
            hidden_states.push(xs.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;

        let d = self.config.hidden_size;
        let flat_index: Vec<u32> = self
            .eos_positions(input_ids)?
            .iter()
            .enumerate()
            .map(|(row, &pos)| (row * l + pos) as u32)
            .collect();
        let flat_index = Tensor::from_vec(flat_index, b, device)?;
        let pooled = last_hidden_state
            .reshape((b * l, d))?
            .index_select(&flat_index, 0)?;
        let text_embeds = match &self.text_projection {
            Some(proj) => Some(proj.forward(&pooled)?),
            None => None,
        };
        Ok(ClipTextOutput {
            last_hidden_state,
            hidden_states,
            pooled,
            text_embeds,
        })
    }

    /// Picks the U-Net context out of a forward pass (see [`ContextLayer`]).
    pub fn select_context(&self, out: &ClipTextOutput, layer: ContextLayer) -> Result<Tensor> {
        let n = out.hidden_states.len();
        let (back, norm) = match layer {
            ContextLayer::Final { clip_skip: 0 } => return Ok(out.last_hidden_state.clone()),
            ContextLayer::Final { clip_skip } => (clip_skip + 1, true),
            ContextLayer::Penultimate { clip_skip } => (clip_skip + 2, false),
        };
        if back > n {
            bail!(
                "{layer:?} needs hidden state -{back}, but the text encoder has only {} layers",
                self.layers.len()
            );
        }
        let h = &out.hidden_states[n - back];
        Ok(if norm {
            self.final_layer_norm.forward(h)?
        } else {
            h.clone()
        })
    }

    /// Encodes prompts for the U-Net. `input_ids` is (B, L) or, for prompts split into
    /// AUTOMATIC1111-style chunks, (B, n_chunks, L): every chunk is encoded on its own and the
    /// chunks' states are concatenated along the sequence axis, giving (B, n_chunks * L, D).
    pub fn encode(&self, input_ids: &Tensor, layer: ContextLayer) -> Result<PromptEmbeds> {
        let (b, n, l) = match *input_ids.dims() {
            [b, l] => (b, 1, l),
            [b, n, l] => (b, n, l),
            ref dims => {
                bail!("prompt ids must be (batch, len) or (batch, chunks, len), got {dims:?}")
            }
        };
        let out = self.forward(&input_ids.reshape((b * n, l))?)?;
        let context = self.select_context(&out, layer)?;
        let d = context.dim(D::Minus1)?;
        let context = context.reshape((b, n * l, d))?;
        let pooled = out.text_embeds.as_ref().unwrap_or(&out.pooled);
        let p = pooled.dim(1)?;
        let pooled = pooled.reshape((b, n, p))?.narrow(1, 0, 1)?.squeeze(1)?;
        Ok(PromptEmbeds { context, pooled })
    }
}

/// Additive causal mask (L, L) in `dtype`: 0 on and below the diagonal, -inf above. A row is
/// never fully masked, so the softmax stays finite.
fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(values, (l, l), device)?.to_dtype(dtype)?)
}
