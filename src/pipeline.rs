//! The text-to-image pipeline: load a diffusers model directory, encode prompts, run the
//! guided reverse process in latent space, decode with the VAE.
//!
//! It follows diffusers' `StableDiffusionPipeline` / `StableDiffusionXLPipeline` step by step,
//! so the same weights, latents and noise give the same image:
//!
//! 1. tokenize prompt and negative prompt (long prompts in 75-token chunks, A1111 style);
//! 2. encode them (SDXL: both encoders, penultimate layers concatenated, pooled from the second);
//! 3. latents = N(0, I) * init_noise_sigma (or the noised init image for img2img);
//! 4. per step: the U-Net on [uncond, cond] in one batch, eps = uncond + g (cond - uncond),
//!    then the sampler's update;
//! 5. decode latents / scaling_factor with the VAE and map [-1, 1] to 8-bit RGB.
use crate::io::model_dir::ModelIndex;
use crate::model::clip::{ClipTextConfig, ClipTextModel, ContextLayer, PromptEmbeds};
use crate::model::tokenizer::{ids_tensor, PromptTokenizer};
use crate::model::unet::{SdxlAddedCond, UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::model::weights::load_component;
use crate::sampler::{build_sampler, img2img_start_index, NoiseSource, SamplerKind, SeededNoise};
use crate::schedule::SchedulerConfig;
use crate::train::data::rgb_to_tensor;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;

/// The model families whose defaults differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x, SD 2.x and sd-rs's own small models: one CLIP text encoder.
    StableDiffusion,
    /// SDXL: two text encoders, pooled text and size conditioning.
    Sdxl,
}

/// An optional file of a model directory with the sampling settings the model is meant to be
/// used with (`sd-rs train` writes it for models trained from scratch); diffusers ignores it.
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// The contents of [`GENERATION_CONFIG`]; every field optional. Field names follow the
/// diffusers pipeline's call arguments.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerationConfig {
    num_inference_steps: Option<usize>,
    guidance_scale: Option<f64>,
    /// Any name `--sampler` takes.
    #[serde(default, deserialize_with = "sampler_by_name")]
    sampler: Option<SamplerKind>,
}

fn sampler_by_name<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SamplerKind>, D::Error> {
    use serde::Deserialize;
    Option::<String>::deserialize(d)?
        .map(|name| name.parse().map_err(serde::de::Error::custom))
        .transpose()
}

/// What `generate` uses when the command line leaves a setting out.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineDefaults {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
}

/// A text encoder with its tokenizer.
pub struct TextEncoder {
    pub tokenizer: PromptTokenizer,
    pub model: ClipTextModel,
    pub layer: ContextLayer,
}

pub struct Pipeline {
    name: String,
    family: Family,
    turbo: bool,
    text_encoders: Vec<TextEncoder>,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    /// SDXL: an empty negative prompt is encoded as zeros (model_index.json's
    /// `force_zeros_for_empty_prompt`, true by default), as diffusers does.
    force_zeros_for_empty_prompt: bool,
    /// The model's own sampling defaults, from [`GENERATION_CONFIG`].
    generation: GenerationConfig,
    device: Device,
    dtype: DType,
}

/// One denoising run: a prompt and settings, and one seed per image of the batch.
pub struct GenerateRequest<'a> {
    pub prompt: &'a str,
    pub negative_prompt: &'a str,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance_scale: f64,
    pub sampler: SamplerKind,
    pub width: usize,
    pub height: usize,
    /// img2img: an image tensor (1, 3, H, W) in [-1, 1], resized to width x height here.
    pub init_image: Option<&'a Tensor>,
    pub strength: f64,
    /// 1-based step numbers at which to record the decoded x0 prediction.
    pub show_x0: &'a [usize],
}

pub struct GenerateOutput {
    pub images: Vec<image::RgbImage>,
    /// One strip per image when `show_x0` asked for some steps.
    pub x0_strips: Vec<image::RgbImage>,
}

impl Pipeline {
    /// Loads every component of a diffusers model directory in `dtype` on `device`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let index = ModelIndex::read(dir)?;
        let family = match index.class_name.as_str() {
            "StableDiffusionXLPipeline" | "StableDiffusionXLImg2ImgPipeline" => Family::Sdxl,
            "StableDiffusionPipeline" | "StableDiffusionImg2ImgPipeline" => Family::StableDiffusion,
            other => bail!(
                "{}: pipeline class {other} is not supported (sd-rs runs StableDiffusionPipeline \
                 and StableDiffusionXLPipeline models)",
                dir.join("model_index.json").display()
            ),
        };
        // Half-precision weights ship as `*.fp16.safetensors` in many repos; use them when
        // computing in half precision and they exist, else the full files (cast on load).
        let variant = (dtype != DType::F32).then_some("fp16");
        let encoder_names: &[(&str, &str)] = match family {
            Family::StableDiffusion => &[("tokenizer", "text_encoder")],
            Family::Sdxl => &[
                ("tokenizer", "text_encoder"),
                ("tokenizer_2", "text_encoder_2"),
            ],
        };
        let mut text_encoders = Vec::new();
        for (tok, enc) in encoder_names {
            let tokenizer = PromptTokenizer::from_dir(dir.join(tok))
                .with_context(|| format!("loading {}", dir.join(tok).display()))?;
            let (cfg, vb) =
                load_component::<ClipTextConfig>(&dir.join(enc), variant, dtype, device)?;
            let model = ClipTextModel::new(vb, &cfg)
                .with_context(|| format!("building {}", dir.join(enc).display()))?;
            let layer = match family {
                Family::StableDiffusion => ContextLayer::Final { clip_skip: 0 },
                Family::Sdxl => ContextLayer::Penultimate { clip_skip: 0 },
            };
            text_encoders.push(TextEncoder {
                tokenizer,
                model,
                layer,
            });
        }
        let (unet_cfg, vb) =
            load_component::<UNet2DConditionConfig>(&dir.join("unet"), variant, dtype, device)?;
        let unet = UNet2DConditionModel::new(vb, &unet_cfg).context("building the U-Net")?;
        // The VAE decodes in f32 unless asked for bf16: f16 overflows to inf in its decoder.
        let vae_dtype = if dtype == DType::F16 {
            DType::F32
        } else {
            dtype
        };
        let (vae_cfg, vb) =
            load_component::<AutoencoderKLConfig>(&dir.join("vae"), variant, vae_dtype, device)?;
        let vae = AutoencoderKL::new(vb, &vae_cfg).context("building the VAE")?;
        let scheduler = SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))?;
        let raw_index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("model_index.json"))?)?;
        let force_zeros_for_empty_prompt = raw_index
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(family == Family::Sdxl);
        let name = model_name(dir);
        let turbo = name.to_ascii_lowercase().contains("turbo");
        let generation_path = dir.join(GENERATION_CONFIG);
        let generation: GenerationConfig = if generation_path.is_file() {
            let text = std::fs::read_to_string(&generation_path)?;
            serde_json::from_str(&text)
                .with_context(|| format!("invalid {}", generation_path.display()))?
        } else {
            GenerationConfig::default()
        };
        Ok(Self {
            name,
            family,
            turbo,
            text_encoders,
            unet,
            vae,
            scheduler,
            force_zeros_for_empty_prompt,
            generation,
            device: device.clone(),
            dtype,
        })
    }

    /// The model's name for the PNG parameters: the repo id or the directory name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How much smaller the latents are than the image (8 for Stable Diffusion).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downscale_factor()
    }

    /// The native size comes from the U-Net's `sample_size` (diffusers does the same); turbo
    /// models sample in 1 step without guidance.
    pub fn defaults(&self) -> PipelineDefaults {
        // sample_size is an int, or [h, w] in some configs; 64 latents when absent (SD 1.x).
        let sample = |i: usize| -> usize {
            match &self.unet.config().sample_size {
                Some(serde_json::Value::Number(n)) => n.as_u64().unwrap_or(64) as usize,
                Some(serde_json::Value::Array(a)) => {
                    a.get(i).and_then(|v| v.as_u64()).unwrap_or(64) as usize
                }
                _ => 64,
            }
        };
        let f = self.vae_scale_factor();
        let (width, height) = (sample(1) * f, sample(0) * f);
        let (steps, guidance_scale) = if self.turbo { (1, 0.0) } else { (20, 7.5) };
        let sampler = if self.turbo {
            SamplerKind::EulerAncestral
        } else {
            SamplerKind::Euler
        };
        let g = &self.generation;
        PipelineDefaults {
            width,
            height,
            steps: g.num_inference_steps.unwrap_or(steps),
            guidance_scale: g.guidance_scale.unwrap_or(guidance_scale),
            sampler: g.sampler.unwrap_or(sampler),
        }
    }

    /// Words of `prompt` that the (first) tokenizer does not know: they are ignored.
    pub fn unknown_words(&self, prompt: &str) -> Vec<String> {
        self.text_encoders[0]
            .tokenizer
            .tokenize(prompt)
            .map(|t| t.unknown_words)
            .unwrap_or_default()
    }

    /// Encodes `[negative, prompt]` (or just `[prompt]` without guidance) into the U-Net's
    /// context (2 or 1, L, D) and, for SDXL, the pooled text embedding.
    pub fn encode_prompts(
        &self,
        prompt: &str,
        negative: &str,
        guidance: bool,
    ) -> Result<PromptEmbeds> {
        let zero_uncond = guidance && self.force_zeros_for_empty_prompt && negative.is_empty();
        let texts: Vec<&str> = if guidance {
            vec![negative, prompt]
        } else {
            vec![prompt]
        };
        let mut contexts = Vec::new();
        let mut pooled = None;
        for enc in &self.text_encoders {
            let mut tokens = texts
                .iter()
                .map(|t| enc.tokenizer.tokenize(t))
                .collect::<Result<Vec<_>>>()?;
            enc.tokenizer.equalize_chunks(&mut tokens);
            let ids = ids_tensor(&tokens, &self.device)?;
            let embeds = enc.model.encode(&ids, enc.layer)?;
            contexts.push(embeds.context);
            pooled = Some(embeds.pooled);
        }
        let mut context = Tensor::cat(&contexts, D::Minus1)?;
        let mut pooled = pooled.expect("at least one text encoder");
        if zero_uncond {
            // diffusers: negative_prompt_embeds = torch.zeros_like(prompt_embeds).
            let keep = Tensor::new(&[0f32, 1.0], &self.device)?.to_dtype(context.dtype())?;
            context = context.broadcast_mul(&keep.reshape((2, 1, 1))?)?;
            pooled = pooled.broadcast_mul(&keep.to_dtype(pooled.dtype())?.reshape((2, 1))?)?;
        }
        Ok(PromptEmbeds { context, pooled })
    }

    /// Runs a request with noise from its seeds (image i of the batch uses `seeds[i]`).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        let mut noise = SeededNoise::per_sample(&req.seeds);
        self.generate_with_noise(req, &mut noise, progress)
    }

    /// As [`Self::generate`], with the noise (initial latents, then any per-step noise) drawn
    /// from `noise`: tests feed diffusers' exact tensors through it.
    pub fn generate_with_noise(
        &self,
        req: &GenerateRequest,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<GenerateOutput> {
        let (latents, x0_frames) = self.denoise(req, noise, progress)?;
        let images = self.decode_each(&latents)?;
        let x0_strips = if x0_frames.is_empty() {
            Vec::new()
        } else {
            let frames: Vec<Vec<image::RgbImage>> = x0_frames
                .iter()
                .map(|x0| self.decode_each(x0))
                .collect::<Result<_>>()?;
            (0..req.seeds.len())
                .map(|b| hstack(frames.iter().map(|f| &f[b])))
                .collect()
        };
        Ok(GenerateOutput { images, x0_strips })
    }

    /// The reverse process alone: the final latents (B, C, h, w) in f32, and the predicted x0
    /// latents at the steps `req.show_x0` asked for.
    pub fn denoise(
        &self,
        req: &GenerateRequest,
        noise: &mut dyn NoiseSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let f = self.vae_scale_factor();
        if !req.width.is_multiple_of(f) || !req.height.is_multiple_of(f) {
            bail!(
                "size {}x{} must be a multiple of {f}",
                req.width,
                req.height
            );
        }
        let batch = req.seeds.len();
        let guidance = req.guidance_scale > 1.0;
        let embeds = self.encode_prompts(req.prompt, req.negative_prompt, guidance)?;
        let mut sampler = build_sampler(req.sampler, &self.scheduler, req.steps)?;
        let timesteps = sampler.timesteps().to_vec();
        let shape = [
            batch,
            self.unet.config().in_channels,
            req.height / f,
            req.width / f,
        ];

        let (mut latents, start) = match req.init_image {
            None => {
                let x = noise.sample(&shape, DType::F32, &self.device)?;
                ((x * sampler.init_noise_sigma())?, 0)
            }
            Some(image) => {
                let start = img2img_start_index(req.steps, req.strength);
                if start >= req.steps {
                    bail!(
                        "--strength {} leaves no denoising steps out of {}",
                        req.strength,
                        req.steps
                    );
                }
                let image =
                    resize_image_tensor(image, req.width, req.height)?.to_device(&self.device)?;
                let z0 = self
                    .vae
                    .latents_from_image(&image.to_dtype(self.vae_dtype())?, None)?;
                let z0 = z0.to_dtype(DType::F32)?.repeat((batch, 1, 1, 1))?;
                let eps = noise.sample(&shape, DType::F32, &self.device)?;
                (sampler.add_noise(&z0, &eps, start)?, start)
            }
        };

        // The U-Net runs once per image, on that image's [uncond, cond] pair, exactly as a run
        // of that image's seed alone does. One call on the whole batch would be faster, but
        // candle folds the batch into its GEMMs' rows, which changes the float rounding (~1e-6)
        // and flips 8-bit pixels: image i of a batch would not be byte-identical to a run of
        // seed + i alone. The prompts are encoded and the sampler steps taken once per batch.
        let groups = if guidance { 2 } else { 1 };
        let context = &embeds.context;
        let added = match self.family {
            Family::Sdxl => Some(SdxlAddedCond {
                text_embeds: embeds.pooled.clone(),
                time_ids: Tensor::new(
                    &[
                        req.height as f32,
                        req.width as f32,
                        0.,
                        0.,
                        req.height as f32,
                        req.width as f32,
                    ],
                    &self.device,
                )?
                .reshape((1, 6))?
                .repeat((groups, 1))?,
            }),
            Family::StableDiffusion => None,
        };

        let total = timesteps.len() - start;
        if let Some(bad) = req.show_x0.iter().find(|&&s| s == 0 || s > total) {
            bail!("--show-x0 step {bad} is outside this run's steps 1..={total}");
        }
        let mut x0_frames: Vec<Tensor> = Vec::new();
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            let scaled = sampler.scale_model_input(&latents, i)?;
            let t_groups = Tensor::full(t as f32, groups, &self.device)?;
            let mut eps = Vec::with_capacity(batch);
            for b in 0..batch {
                let x = scaled.narrow(0, b, 1)?;
                let model_in = if guidance {
                    Tensor::cat(&[&x, &x], 0)?
                } else {
                    x
                };
                let out = self.unet.forward(
                    &model_in.to_dtype(self.dtype)?,
                    &t_groups,
                    context,
                    added.as_ref(),
                )?;
                let out = out.to_dtype(DType::F32)?;
                eps.push(if guidance {
                    let uncond = out.narrow(0, 0, 1)?;
                    let cond = out.narrow(0, 1, 1)?;
                    (&uncond + ((cond - &uncond)? * req.guidance_scale)?)?
                } else {
                    out
                });
            }
            let eps = Tensor::cat(&eps, 0)?;
            latents = sampler.step(&eps, i, &latents, noise)?;
            if req.show_x0.contains(&(i - start + 1)) {
                if let Some(x0) = sampler.predicted_original() {
                    x0_frames.push(x0.clone());
                }
            }
            progress(i - start + 1, total);
        }

        Ok((latents, x0_frames))
    }

    fn vae_dtype(&self) -> DType {
        if self.dtype == DType::F16 {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// Latents -> 8-bit images, decoded one at a time so that an image does not depend on the
    /// batch it was made in (see `denoise`).
    fn decode_each(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        let mut images = Vec::new();
        for b in 0..latents.dim(0)? {
            images.append(&mut tensor_to_images(
                &self.decode(&latents.narrow(0, b, 1)?)?,
            )?);
        }
        Ok(images)
    }

    /// Latents -> images in [-1, 1], (B, 3, H, W), f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let images = self
            .vae
            .image_from_latents(&latents.to_dtype(self.vae_dtype())?)?;
        Ok(images.to_dtype(DType::F32)?)
    }
}

fn model_name(dir: &Path) -> String {
    // A hub snapshot lives at .../models--owner--name/snapshots/<rev>: name it owner/name.
    let parts: Vec<String> = dir
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(pos) = parts.iter().rposition(|p| p == "snapshots") {
        if let Some(repo) = pos
            .checked_sub(1)
            .and_then(|i| parts[i].strip_prefix("models--"))
        {
            return repo.replacen("--", "/", 1);
        }
    }
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

/// Reads an image file as 8-bit RGB.
pub fn read_rgb(path: &Path) -> Result<image::RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("{} is not a readable image", path.display()))?
        .to_rgb8())
}

/// Reads an image file as a (1, 3, H, W) f32 tensor in [-1, 1] on the CPU.
pub fn load_image(path: &Path) -> Result<Tensor> {
    Ok(rgb_to_tensor(&read_rgb(path)?)?.unsqueeze(0)?)
}

/// Resizes a (1, 3, H, W) image tensor with a Lanczos filter when its size differs.
fn resize_image_tensor(image: &Tensor, width: usize, height: usize) -> Result<Tensor> {
    let (_, _, h, w) = image.dims4()?;
    if (h, w) == (height, width) {
        return Ok(image.clone());
    }
    let rgb = tensor_to_images(image)?.remove(0);
    let resized = image::imageops::resize(
        &rgb,
        width as u32,
        height as u32,
        image::imageops::FilterType::Lanczos3,
    );
    Ok(rgb_to_tensor(&resized)?.unsqueeze(0)?)
}

/// (B, 3, H, W) in [-1, 1] -> 8-bit RGB images, rounding as diffusers' `numpy_to_pil`
/// ((x / 2 + 0.5).clamp(0, 1) * 255, rounded).
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (b, c, h, w) = x.dims4()?;
    if c != 3 {
        bail!("expected 3 image channels, got {c}");
    }
    let x = ((x.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let x = (x * 255.0)?
        .round()?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?
        .contiguous()?;
    let data: Vec<u8> = x
        .flatten_all()?
        .to_vec1::<f32>()?
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| {
            image::RgbImage::from_raw(w as u32, h as u32, data[i * per..(i + 1) * per].to_vec())
                .unwrap()
        })
        .collect())
}

fn hstack<'a>(frames: impl Iterator<Item = &'a image::RgbImage>) -> image::RgbImage {
    let frames: Vec<image::RgbImage> = frames.cloned().collect();
    image_grid(&frames, frames.len())
}

/// Lays images out left to right, `cols` per row (all images the size of the first).
pub fn image_grid(images: &[image::RgbImage], cols: usize) -> image::RgbImage {
    let (w, h) = images[0].dimensions();
    let cols = cols.clamp(1, images.len()) as u32;
    let rows = (images.len() as u32).div_ceil(cols);
    let mut out = image::RgbImage::new(w * cols, h * rows);
    for (i, img) in images.iter().enumerate() {
        let (c, r) = (i as u32 % cols, i as u32 / cols);
        image::imageops::replace(&mut out, img, (c * w) as i64, (r * h) as i64);
    }
    out
}
